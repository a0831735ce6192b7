"""Continuous batching (densepure_rt/sampling/scheduler.py).

On the shipped digits engine (trained weights, sigma 0.6 where votes split): for the same seed the
scheduler's per-job counts and runs (so its UNet evaluations) equal those of the step-by-step
oracle (tests/oracle.py) run one job at a time, whatever the slot count (one row, fewer rows than
a sample's first runs, a prime count that splits samples across calls, many rows), with jobs of
several images and phases sharing calls.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import build_digits_engine, digits_test_images
from densepure_rt.cli import main
from densepure_rt.runtime import open_engine
from densepure_rt.sampling.noise import ESTIMATION, SELECTION
from densepure_rt.sampling.scheduler import Job, Scheduler, SchedulerStats
from densepure_rt.stats.vote import vote_waves
from oracle import open_reference

#: The oracle's (counts, runs) per job, by (votes, steps, seed): computed once per module.
_ORACLE: dict = {}

SIGMA, STEPS = 0.6, 2


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    return build_digits_engine(tmp_path_factory, "scheduler")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return digits_test_images(4)


def _jobs(n0: int, n: int, count: int) -> list[Job]:
    jobs = []
    for k in range(count):
        jobs += [Job(k, 10 + k, SELECTION, n0), Job(k, 10 + k, ESTIMATION, n)]
    return jobs


def _oracle_counts(engine, images, jobs, votes, seed, steps=STEPS):
    """The step-by-step oracle, one job at a time: per-job counts and runs (cached)."""
    key = (str(engine), tuple(jobs), votes, seed, steps)
    if key not in _ORACLE:
        counts, runs = [], []
        with open_reference(engine) as ref:
            ref._prepare(SIGMA, steps, votes, 16)
            for job in jobs:
                labels, took = ref.loop.voted_labels(images[job.image], seed, job.image_index, job.phase, range(job.num), runs=True)
                counts.append(np.bincount(labels, minlength=10))
                runs.append(int(took.sum()))
        _ORACLE[key] = (counts, runs)
    return _ORACLE[key]


@pytest.mark.parametrize("votes", [1, 3, 4, 10])
@pytest.mark.parametrize("slots", [1, 2, 7, 64])
def test_counts_and_work_equal_the_oracle_one_job_at_a_time(engine, images, votes, slots):
    jobs = _jobs(5, 9, 3)
    want_counts, want_runs = _oracle_counts(engine, images, jobs, votes, seed=7)
    with open_engine(engine) as eng:
        eng._prepare(SIGMA, STEPS, votes, 16)
        stats = SchedulerStats()
        got = Scheduler(eng.loop, slots).counts(eng.loop.device.stage(images), jobs, seed=7, stats=stats)
    for job, g, w in zip(jobs, got, want_counts):
        np.testing.assert_array_equal(g, w, err_msg=str(job))
    assert stats.per_job_runs == want_runs  # the same runs per sample: the same UNet evaluations
    assert stats.unet_evals == sum(want_runs) * STEPS
    assert stats.classifier_evals == sum(want_runs)
    assert stats.busy_rows == stats.unet_evals and 0 <= stats.idle_fraction < 1
    if votes > 1:  # some votes split at sigma 0.6 (so some samples ran more than the first wave)
        assert sum(want_runs) > sum(j.num for j in jobs) * vote_waves(votes)[0]


@pytest.mark.parametrize("slots", [7, 64])
def test_full_calls_give_the_same_counts_and_count_their_free_rows_idle(engine, images, slots):
    """full_calls (the default where the executor replays a CUDA graph): every call runs all rows,
    the free ones on stale values; the counts and the work are the same, and every call's free rows
    are counted idle (calls x slots rows in all)."""
    jobs = _jobs(5, 9, 3)
    want_counts, want_runs = _oracle_counts(engine, images, jobs, 3, seed=7)
    with open_engine(engine) as eng:
        eng._prepare(SIGMA, STEPS, 3, 16)
        stats = SchedulerStats()
        sch = Scheduler(eng.loop, slots, full_calls=True)
        assert Scheduler(eng.loop, slots).full_calls is False  # ONNX Runtime on the CPU replays no graph
        got = sch.counts(eng.loop.device.stage(images), jobs, seed=7, stats=stats)
    for g, w in zip(got, want_counts):
        np.testing.assert_array_equal(g, w)
    assert stats.per_job_runs == want_runs and stats.unet_evals == sum(want_runs) * STEPS
    assert stats.busy_rows + stats.idle_rows == stats.calls * slots and stats.idle_rows > 0


@pytest.mark.parametrize("steps", ["none", "one-shot", 1])
def test_the_word_paths_and_one_step_equal_the_oracle(engine, images, steps):
    """--steps none (no reverse step: the classifier sees x_{t*}), one-shot and b = 1."""
    jobs = _jobs(3, 7, 2)
    want_counts, want_runs = _oracle_counts(engine, images, jobs, 3, seed=1, steps=steps)
    with open_engine(engine) as eng:
        eng._prepare(SIGMA, steps, 3, 16)
        stats = SchedulerStats()
        got = Scheduler(eng.loop, 4).counts(eng.loop.device.stage(images), jobs, seed=1, stats=stats)
        calls = eng.loop.calls
    assert calls == {"none": 0, "one-shot": 1, 1: 1}[steps]
    for g, w in zip(got, want_counts):
        np.testing.assert_array_equal(g, w)
    assert stats.per_job_runs == want_runs and stats.unet_evals == sum(want_runs) * calls


@pytest.mark.slow
def test_calls_stay_full_while_samples_exit_early(engine, images):
    """The point of it: with early exit at K = 10 most samples stop after their first runs and the
    undecided ones go on one run at a time; the scheduler's calls hold every slot until the work
    runs out."""
    jobs = _jobs(20, 60, 4)
    with open_engine(engine) as eng:
        eng._prepare(SIGMA, STEPS, 10, 16)
        stats = SchedulerStats()
        Scheduler(eng.loop, 40).counts(eng.loop.device.stage(images), jobs, seed=0, stats=stats)
    full_calls = stats.unet_evals / 40
    print(f"calls {stats.calls}, full-call equivalent {full_calls:.1f}, idle fraction {stats.idle_fraction:.3f}")
    assert stats.calls <= full_calls * 1.15 + 2 * STEPS  # idle rows only while the last samples drain
    assert stats.idle_fraction < 0.1


@pytest.mark.slow
def test_round_is_independent_of_the_call_size_on_the_cli(engine, images, tmp_path):
    """--round sets the sequential test's round; --batch only the calls' rows: --batch 8 --round 5
    gives the rows of --batch 5 --round 5 (calls of other sizes, the same rounds), and the options
    file records round 5."""
    import json

    data = tmp_path / "imgs.npz"
    np.savez(data, images=images[:2], labels=np.array([0, 1]))
    base = ["certify", "--engine", str(engine), "--data", str(data), "--sigma", "0.5", "--steps", "2", "--votes", "3",
            "--n0", "30", "--n-max", "200", "--radius", "0.25", "--quiet"]
    runner = CliRunner()
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    assert runner.invoke(main, base + ["--batch", "8", "--round", "5", "--out", str(a)]).exit_code == 0
    assert runner.invoke(main, base + ["--batch", "5", "--round", "5", "--out", str(b)]).exit_code == 0

    def rows(path):
        lines = path.read_text().splitlines()
        header = lines[0].split("\t")
        # Not the wall time, nor the work: samples started past a test's stop are dropped, and how
        # many depends on the call's rows.
        skip = {header.index("time"), header.index(header[-1])}
        # Rows in image order: the scheduler writes each as its image finishes.
        return [[c for i, c in enumerate(line.split("\t")) if i not in skip] for line in lines[:1] + sorted(lines[1:])]

    assert rows(a) == rows(b)
    options = json.loads(Path(f"{a}.json").read_text())
    assert options["round"] == 5 and options["batch"] == 8 and "scheduling" not in options
    result = runner.invoke(main, ["certify", "--engine", str(engine), "--data", str(data), "--sigma", "0.5", "--round", "4",
                                  "--out", str(tmp_path / "c.tsv")])
    assert result.exit_code == 2 and "--round goes with --radius or --tol" in result.stderr


def test_a_bounded_job_starts_what_its_test_promises_and_drops_nothing(engine, images):
    """A sequential job (rounds of one vote, ahead 1) whose test stops after 30 samples: told only
    "go on" (True) it has one sample in flight and drops nothing; told how many more samples the
    test reads whatever the votes (deliver returns k), it starts them together, so the same labels
    arrive in fewer calls, and still drops nothing. Past every bound it may start SPECULATION of
    what it has read: 0 samples after 30."""
    got = {}
    for promise in (False, True):
        labels = []

        def deliver(job, lab, labels=labels, promise=promise):
            labels.extend(lab.tolist())
            left = 30 - len(labels)
            return left if promise else left > 0

        with open_engine(engine) as eng:
            eng._prepare(SIGMA, STEPS, 3, 16)
            stats = SchedulerStats()
            Scheduler(eng.loop, 24).run(eng.loop.device.stage(images), [Job(0, 10, ESTIMATION, 200, 1, 1, 12)], 7, deliver,
                                        stats=stats)
        assert len(labels) == 30 and stats.per_job_dropped_evals == [0] and stats.dropped_evals == 0
        assert stats.per_job_delivered_evals == stats.per_job_unet_evals == [stats.unet_evals]
        got[promise] = (labels, stats.calls)
    assert got[True][0] == got[False][0]  # sample order: the same votes
    assert got[True][1] < got[False][1] / 2


class _Recording:
    """The engine's real ONNX Runtime executor, with TensorRT's binding rules recorded: each bound
    array's byte offset from the start of the buffer it is a view of (TensorRT takes only 256-byte
    aligned addresses; the buffers themselves come aligned from CuPy's pool), the row counts of
    the step calls, and the row counts reserved. ``classifier_rows`` and ``fixed_rows`` as a TensorRT
    profile of 40 rows would set them."""

    def __init__(self, inner, classifier_rows=40, fixed_rows=True):
        self.inner, self.classifier_rows, self.fixed_rows = inner, classifier_rows, fixed_rows
        self.cuda_graph = False
        self.offsets, self.step_rows, self.reserved = [], [], []

    def _offset(self, a) -> int:
        root = a
        while isinstance(root.base, np.ndarray):
            root = root.base
        return a.__array_interface__["data"][0] - root.__array_interface__["data"][0]

    def reserve(self, rows, image_shape) -> None:
        self.reserved.append(int(rows))

    def step(self, x, noise, scalars, out) -> None:
        self.offsets += [self._offset(a) for a in (x, noise, scalars, out)]
        self.step_rows.append(int(x.shape[0]))
        self.inner.step(x, noise, scalars, out)

    def classify(self, images, labels, logits) -> None:
        self.offsets += [self._offset(a) for a in (images, labels, logits)]
        self.inner.classify(images, labels, logits)

    def close(self) -> None:
        self.inner.close()


def test_bound_views_are_256_byte_aligned_and_a_fixed_shape_executor_gets_full_reserved_calls(engine, images):
    """TensorRT's rule for bound addresses (256-byte alignment), checked where the scheduler slices
    its buffers (every classifier chunk is the queue's first rows, at most the profile's 40 of a
    48-row call). With a fixed-shape executor (TensorRT, ONNX Runtime's CUDA graph) it reserves its
    row count and runs every step call full. The counts equal the plain executor's."""
    jobs = _jobs(5, 16, 2)
    with open_engine(engine) as eng:
        eng._prepare(SIGMA, STEPS, 3, 16, samples=16)
        staged = eng.loop.device.stage(images)
        want = Scheduler(eng.loop, 48).counts(staged, jobs, seed=3)
        recording = eng.loop.executor = _Recording(eng.loop.executor)
        sch = Scheduler(eng.loop, 48)
        got = sch.counts(staged, jobs, seed=3)
        assert sch.full_calls and recording.reserved == [48] and set(recording.step_rows) == {48}
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert recording.offsets and all(offset % 256 == 0 for offset in recording.offsets), sorted(set(recording.offsets))
