"""Monte-Carlo validity of the sequential tests run through the scheduler: the completion-order trap.

Votes complete out of sample order: a unanimous sample is decided after ceil(K/2) runs, a split one
needs more, and unanimity goes with the majority class. A sequential test fed votes in the order they
complete would see the majority class early and certify too often. The scheduler delivers in sample
order (densepure_rt/sampling/scheduler.py, ``_Run._deliver``); these tests measure both orders on an
engine whose p_A is known exactly.

The synthetic engine: the digits engine's loop, schedule, Philox noise and scheduler, with its two
graphs replaced by :class:`SplitVotes` (the graphs are what decides p_A; everything the scheduler
does, and the noise it keys by sample, is the real code). The image is 0.5 everywhere, so row 0 of
x_{t*} is ``scale * 2 * sigma * N(0, 1)`` per pixel, shared by every run of a sample: the sample is
"good" when that row's sum exceeds ``-Phi^-1(P_A) sqrt(width)`` in the same units, an event of
probability exactly ``P_A = 0.7`` (scipy's normal CDF is the reference). Every run of a good sample
says class 0, so its vote is decided at the first ceil(K/2) runs; a bad sample's runs say 1 or 2 at
random (the sign of the per-run noise the step added: one reverse step adding RUN_NOISE = sqrt(3)
times its noise, the variance of three unit steps, so the runs' own noise outweighs the sample's
shared one), so its vote is never 0 and usually needs more runs. p_A of class 0 is P_A, and good
samples finish first: the trap's exact shape.

The target radius R = sigma * Phi^-1(P_A) puts the truth on the null's boundary (p_A = Phi(R/sigma)),
so every certificate of R is false and the rate must stay within alpha.

Measured (2-core CPU, seeds as fixed here): fixed-n streams fed to the --radius test in sample order
certified R_BOUNDARY in 8 of 120 trials, fed in completion order in 107 of 120 (alpha 0.05: at most
17 of 120 would be consistent with a valid test at level 1e-4); certify_radii and certify_until
through the scheduler with rounds of one vote: 1 false certificate in 120 trials each (at most 17
consistent).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from conftest import build_digits_engine
from densepure_rt.runtime import open_engine
from densepure_rt.sampling.noise import ESTIMATION
from densepure_rt.sampling.scheduler import Job, SchedulerStats
from densepure_rt.stats.sequential import TargetRadiiTest

P_A, SIGMA, VOTES, STEPS, ALPHA = 0.7, 0.6, 9, 1, 0.05
RUN_NOISE = np.float32(np.sqrt(3))  # the synthetic step's noise scale (the module doc)
TRIALS, N_MAX, N0, BATCH = 120, 300, 20, 16
ENTRY_TRIALS = 120  # per entry point (each trial also runs its selection phase)
R_BOUNDARY = SIGMA * stats.norm.ppf(P_A)


def _most_false(trials: int) -> int:
    """The most false certificates a valid test (rate <= ALPHA) shows in ``trials`` with probability
    >= 1 - 1e-4: a count above it is evidence of invalidity at level 1e-4 (the seeds are fixed, so a
    pass or failure is reproducible)."""
    return int(stats.binom.ppf(1 - 1e-4, trials, ALPHA))


class SplitVotes:
    """Step and classifier graphs of known p_A (see the module doc): the step keeps row 0 of x and adds
    RUN_NOISE times its noise to the other rows; the classifier says 0 for a good sample, else 1 or 2
    by the sign of the noise the runs added."""

    classifier_rows = None

    def __init__(self, inner, image_shape, scale: float, sigma: float):
        self.inner = inner
        width = image_shape[-1]
        self.threshold = -stats.norm.ppf(P_A) * np.sqrt(width) * scale * 2 * sigma

    def reserve(self, rows, image_shape) -> None:
        pass

    def step(self, x, noise, scalars, out) -> None:
        out[:] = x
        out[:, :, 1:, :] += RUN_NOISE * noise[:, :, 1:, :]

    def classify(self, images, labels, logits) -> None:
        good = images[:, 0, 0, :].sum(axis=1) > self.threshold
        labels[:] = np.where(good, 0, np.where(images[:, 0, 1:, :].sum(axis=(1, 2)) > 0, 1, 2))
        logits[:] = 0

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory) -> Path:
    return build_digits_engine(tmp_path_factory, "validity")


def _synthetic(engine_dir):
    eng = open_engine(engine_dir)
    loop = eng.loop
    loop.executor = SplitVotes(loop.executor, loop.image_shape, 1 / np.sqrt(1 + 4 * SIGMA**2), SIGMA)
    image = np.full(loop.image_shape, 0.5, dtype=np.float32)
    return eng, image


def _feed(test, labels) -> bool:
    """Feed ``test`` one vote at a time (successes: class 0) until it is done; certified?"""
    i = 0
    while not test.done:
        test.update(int(labels[i] == 0), 1)
        i += 1
    return test.result().certified


pytestmark = pytest.mark.slow  # about a minute: CI runs it (python -m pytest -q runs every test)


def test_sample_order_is_valid_and_completion_order_is_not(engine_dir):
    """Fixed-n runs of N_MAX estimation samples through the scheduler, per trial: the labels in the
    order the scheduler delivers them (sample order) and in the order the votes completed
    (``SchedulerStats.completion_order``). The same boundary test fed each way: sample order keeps
    false certificates within alpha, completion order certifies far more often."""
    eng, image = _synthetic(engine_dir)
    with eng:
        eng._prepare(SIGMA, STEPS, VOTES, BATCH, samples=N_MAX)
        sch = eng.scheduler()
        staged = eng.loop.device.stage(image[None])
        in_order = by_completion = 0
        good = 0
        for trial in range(TRIALS):
            delivered: list[int] = []
            stats_ = SchedulerStats()
            sch.run(staged, [Job(0, trial, ESTIMATION, N_MAX)], 0, lambda j, lab: delivered.extend(lab.tolist()) or True,
                    stats=stats_)
            assert len(delivered) == N_MAX
            completed = [delivered[s] for _, s in stats_.completion_order]
            assert sorted(s for _, s in stats_.completion_order) == list(range(N_MAX))
            good += delivered.count(0)
            in_order += _feed(TargetRadiiTest(SIGMA, [R_BOUNDARY], ALPHA, N_MAX), delivered)
            by_completion += _feed(TargetRadiiTest(SIGMA, [R_BOUNDARY], ALPHA, N_MAX), completed)
    # The synthetic engine's p_A is what scipy says (within 4 standard errors of TRIALS * N_MAX votes).
    total = TRIALS * N_MAX
    assert abs(good / total - P_A) < 4 * np.sqrt(P_A * (1 - P_A) / total), good / total
    print(f"false certificates of R_BOUNDARY in {TRIALS} trials: {in_order} in sample order, {by_completion} in completion order "
          f"(a valid test shows at most {_most_false(TRIALS)} with probability 1 - 1e-4)")
    # Votes do complete out of order here (else the check below would be empty).
    assert by_completion > _most_false(TRIALS), (in_order, by_completion)
    assert in_order <= _most_false(TRIALS), (in_order, by_completion)


@pytest.mark.parametrize("mode", ["radius", "tol"])
def test_certify_through_the_scheduler_stays_within_alpha(engine_dir, mode):
    """The real entry points (``certify_radii``, ``certify_until`` through the scheduler,
    rounds of one vote, selection included) on the boundary engine: false certificates <= alpha.
    ``--radius``: certifying R_BOUNDARY is false. ``--tol``: a radius above sigma * Phi^-1(p_A) =
    R_BOUNDARY is false."""
    eng, image = _synthetic(engine_dir)
    false = 0
    with eng:
        for trial in range(ENTRY_TRIALS):
            common = dict(steps=STEPS, votes=VOTES, n0=N0, n_max=N_MAX, alpha=ALPHA, seed=trial, image_index=trial,
                          batch=BATCH, round_size=1)
            if mode == "radius":
                cert = eng.certify_radii(image, SIGMA, [R_BOUNDARY], **common)
                false += cert.prediction == 0 and cert.radius >= R_BOUNDARY
            else:
                cert = eng.certify_until(image, SIGMA, 0.05, **common)
                false += cert.prediction == 0 and cert.radius > R_BOUNDARY
            assert cert.c_a in (0, 1, 2)
    assert false <= _most_false(ENTRY_TRIALS), false

