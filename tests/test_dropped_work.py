"""Dropped work: UNet evaluations of noisy samples the scheduler started and no test read.

A sequential test (--radius, --tol) stops at a data-dependent sample; samples started past it are
dropped. The scheduler admits a new sample only when rows can start its first runs, starts freely
only the samples a test reads whatever their votes (densepure_rt.stats.sequential's look-aheads),
and otherwise at most ``ahead`` samples past what the test has read, or SPECULATION of it when
nothing else can fill a call. Measured on the shipped digits engine (trained weights) through
densepure_rt.scale.work.run_stream, the CLI's path: the dropped evaluations each image reports
(``Outcome.dropped_evals``) equal its UNet evaluations minus those of the samples its tests read
(recomputed sample by sample by the step-by-step oracle, tests/oracle.py, on three of the images:
the two that dropped most and the one that dropped least), and stay within 2% of all at K = 10.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import build_digits_engine, digits_test_images
from densepure_rt.runtime import open_engine
from densepure_rt.sampling.noise import ESTIMATION, SELECTION
from densepure_rt.scale.work import RunSpec, run_stream
from oracle import open_reference

SIGMA, STEPS, VOTES, N0, N_MAX, SEED = 0.5, 1, 10, 100, 2000, 0


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    return build_digits_engine(tmp_path_factory, "dropped")


def _read_runs(ref, image, idx, phase, count):
    """Runs each of samples 0 .. count - 1 of ``phase`` took, by the oracle (the same noise and
    votes as the scheduler's, tests/test_scheduler.py)."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    _, took = ref.loop.voted_labels(image, SEED, idx, phase, range(count), runs=True)
    return took


@pytest.mark.slow
def test_dropped_work_is_what_no_test_read_and_stays_within_two_percent_at_k10(engine):
    # --radius 0.25 at K = 10 on 20 images (every 9th of the test split), the engine's default batch,
    # rounds of one vote (the CLI's defaults), one reverse step to keep it short.
    images = digits_test_images(180)[::9]
    indices = list(range(0, 180, 9))  # as --skip 9 --max 180: 20 images
    with open_engine(engine) as eng:
        batch = int(eng.manifest.get("default_batch", 32))
        task = RunSpec(mode="certify-radii", sigma=SIGMA, steps=STEPS, votes=VOTES, alpha=0.001, n0=N0, n=N_MAX, seed=SEED,
                       batch=batch, radii=(0.25,))
        outcomes = {}
        run_stream(eng, task, list(zip(indices, images)), lambda o, samples: outcomes.__setitem__(o.idx, (o, samples)))
        assert sorted(outcomes) == indices
    by_drop = sorted(indices, key=lambda i: outcomes[i][0].dropped_evals)
    checked = by_drop[-2:] + by_drop[:1]
    assert outcomes[by_drop[-1]][0].dropped_evals > 0  # the recount covers real drops
    with open_reference(engine) as ref:
        ref._prepare(SIGMA, STEPS, VOTES, batch)
        for idx in checked:
            image = images[indices.index(idx)]
            outcome, samples = outcomes[idx]
            n = outcome.result.n
            read = _read_runs(ref, image, idx, SELECTION, samples - n).sum() + _read_runs(ref, image, idx, ESTIMATION, n).sum()
            assert outcome.dropped_evals == outcome.unet_evals - STEPS * int(read), idx
    total = sum(o.unet_evals for o, _ in outcomes.values())
    dropped = sum(o.dropped_evals for o, _ in outcomes.values())
    certified = sum(o.result.prediction >= 0 for o, _ in outcomes.values())
    print(f"K = {VOTES}, batch {batch}: {dropped} of {total} UNet evaluations dropped ({dropped / total:.2%}); "
          f"median per image {np.median([o.unet_evals for o, _ in outcomes.values()]):.0f}; {certified}/{len(indices)} certified")
    assert dropped <= 0.02 * total


def test_fixed_n_drops_nothing_and_a_lone_test_starts_the_samples_it_surely_reads_at_once(engine):
    # Fixed-n CERTIFY reads every sample it starts: nothing dropped. A --radius image alone (in
    # flight alone, no other image to fill the calls, one reverse step): were its samples started one
    # at a time, each sample read would take a call of its own; the look-ahead starts those no
    # decision can come before together (10 at first for the selection and for R = 0.5 sigma).
    images = digits_test_images(2)
    with open_engine(engine) as eng:
        fixed = RunSpec(mode="certify", sigma=SIGMA, steps=STEPS, votes=3, alpha=0.001, n0=10, n=30, seed=SEED, batch=8)
        got = []
        run_stream(eng, fixed, [(0, images[0]), (1, images[1])], lambda o, s: got.append(o))
        assert [o.dropped_evals for o in got] == [0, 0]
        alone = []
        stats = eng.stream("certify-radii", [(0, images[0])], alone.append, sigma=SIGMA, steps=STEPS, votes=3, n0=100, n=200,
                           alpha=0.001, radii=[0.25], seed=SEED, batch=8, round_size=1, in_flight=1)
    (streamed,) = alone
    print(f"alone: {streamed.samples} samples read in {stats.calls} calls, {streamed.dropped_evals} of "
          f"{streamed.unet_evals} UNet evaluations dropped")
    assert streamed.result.prediction >= 0 and stats.calls < streamed.samples / 2
    assert streamed.dropped_evals <= 0.05 * streamed.unet_evals
