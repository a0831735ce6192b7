"""Images streamed through the scheduler: many images in flight, each with its own jobs and test.

    images ──refill──▶ in flight (at most ``in_flight``, each in a staging slot)
                        image 12: selection ✓, estimation test at n = 37 ─┐
                        image 13: selection, 2 of 20 samples voted        ├─▶ one scheduler: every
                        image 14: fixed-n estimation, sample 410 of 1000  ┘   call full of their rows
                                   ▼ an image whose work is done
                        emit(Streamed) ──▶ results row; its slot takes the next image

One :class:`densepure_rt.sampling.scheduler.Scheduler` run serves every image of a run: a freed row
takes the next run of an undecided sample, else the next sample of the images in flight (a
sequential test's job: the samples its test reads whatever their votes, e.g. 10 at first for a
target R = 0.5 sigma at alpha = 0.001, where no decision can come sooner, and ``ahead`` more),
else the next image (``refill``), else a few samples past those bounds
(:data:`densepure_rt.sampling.scheduler.SPECULATION`: the last images of a run). So a sequential
test with rounds of one vote does not leave the calls empty, and its calls are not filled with
samples it may never read: the work of samples started and dropped when a test stopped
(``Streamed.dropped_evals``) stays within a few percent.

What an image computes (its mode's work, :mod:`densepure_rt.modes`) is what it computes alone
(:class:`densepure_rt.runtime.Engine`'s single-image calls stream it alone): the noise is keyed by
(seed, image index, phase, sample), the scheduler delivers each job's votes in sample order and in
the same rounds, so counts, tests and decisions are the same (tests/test_stream.py). Only the work
spent on samples a test did not read (started, then dropped when it stopped) depends on what else
is in flight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import numpy as np

from densepure_rt.sampling.noise import ESTIMATION, SELECTION
from densepure_rt.sampling.scheduler import Job, SchedulerStats

__all__ = ["Streamed", "FixedWork", "SequentialWork", "run_stream"]


@dataclass(frozen=True)
class Streamed:
    """One image's outcome: ``result`` (its mode's result, :mod:`densepure_rt.modes`), the per-class counts
    of its last phase (fixed-n work), its UNet evaluations (dropped samples' too), the noisy samples
    its tests read, its share of the wall time (the time since the previous image finished), and
    ``dropped_evals``: those of its UNet evaluations spent on samples its tests never read (started,
    then dropped when a test stopped; 0 for fixed-n work)."""

    idx: int
    result: Any
    counts: Optional[np.ndarray]
    unet_evals: int
    samples: int
    seconds: float
    dropped_evals: int = 0


class _Work:
    """What one image computes: the jobs it adds and what their votes become."""

    def __init__(self, idx: int, num_classes: int):
        self.idx, self.num_classes = int(idx), int(num_classes)
        self.jobs: list[int] = []
        self.samples = 0
        self.result: Any = None
        self.counts: Optional[np.ndarray] = None
        self.finished = False
        #: Its UNet evaluations so far (set by the stream that runs it).
        self.evals: Callable[[], int] = lambda: 0

    def start(self, add: Callable[..., int]) -> None:
        raise NotImplementedError

    def take(self, job: int, labels: np.ndarray, add: Callable[..., int], evals: Callable[[], int]) -> int:
        """Votes of ``job`` in sample order; returns whether the job goes on: 0 (False) stops it, k >= 1
        (True is 1) goes on, k samples more being read whatever their votes."""
        raise NotImplementedError


class FixedWork(_Work):
    """Fixed-n phases ``[(phase, num), ...]`` (CERTIFY: selection n0, estimation n; PREDICT: n), all
    started at once; ``finish(counts_per_phase, unet_evals)`` gives the result."""

    def __init__(self, idx, num_classes, phases, finish):
        super().__init__(idx, num_classes)
        self.phases, self.finish = list(phases), finish
        self.per_phase = [np.zeros(num_classes, dtype=np.int64) for _ in self.phases]
        self.left = sum(int(num) for _, num in self.phases)

    def start(self, add) -> None:
        for phase, num in self.phases:
            self.jobs.append(add(phase, int(num), 0, 0))
        if self.left == 0:
            self._done(lambda: 0)

    def take(self, job, labels, add, evals) -> bool:
        k = self.jobs.index(job)
        self.per_phase[k] += np.bincount(labels, minlength=self.num_classes)
        self.samples += len(labels)
        self.left -= len(labels)
        if self.left == 0:
            self._done(evals)
        return True

    def _done(self, evals) -> None:
        self.result = self.finish(self.per_phase, int(evals()))
        self.counts = self.per_phase[-1]
        self.finished = True


class SequentialWork(_Work):
    """CERTIFY with a sequential test (``--radius``, ``--tol``): selection samples in rounds until
    :func:`densepure_rt.stats.sequential.selection_done`, then estimation rounds fed to ``test`` until
    it is done; ``finish(test, c_a, unet_evals)`` gives the result. The selection stops at the first
    round after which the leader is clear (c_a: the argmax so far, ties to the lowest class); it
    reads selection samples only, so the estimation samples stay fresh and independent of c_a.
    ``selection``: when the selection stops (a :class:`densepure_rt.stats.selection.SelectionRule`;
    None: the clear-leader rule)."""

    def __init__(self, idx, num_classes, n0: int, test, finish, round_size: int, ahead: int, selection=None):
        from densepure_rt.stats.selection import DEFAULT_SELECTION, selection_certain

        super().__init__(idx, num_classes)
        # The clear-leader rule's look-ahead is the cached function; another rule's, its own.
        rule = DEFAULT_SELECTION if selection is None else selection
        self.selection = rule
        self._certain = selection_certain if rule == DEFAULT_SELECTION else rule.certain
        self.n0, self.test, self.finish = int(n0), test, finish
        self.round, self.ahead = int(round_size), max(int(ahead), int(round_size))
        self.counts0 = np.zeros(num_classes, dtype=np.int64)
        self.drawn0 = 0  # selection samples read: counts0's sum
        self.c_a: Optional[int] = None
        #: Samples of the current phase its test reads whatever their votes (a look-ahead, asked
        #: again once they are read).
        self.sure = 0

    def start(self, add) -> None:
        self.sure = self._certain(self.counts0, self.n0)
        self.jobs.append(add(SELECTION, self.n0, self.round, self.ahead, self.sure))

    def take(self, job, labels, add, evals) -> int:
        self.samples += len(labels)
        if job == self.jobs[0]:
            if len(labels) == 1:  # rounds of one vote, without an array reduction
                self.counts0[int(labels[0])] += 1
            else:
                self.counts0 += np.bincount(labels, minlength=self.num_classes)
            self.drawn0 += len(labels)
            drawn = self.drawn0
            if drawn < self.sure:  # selection_done cannot be true yet
                return self.sure - drawn
            left = self.n0 - drawn
            more = self._certain(self.counts0, left) if left else 0
            if more:
                self.sure = drawn + more
                return more
            self.c_a = self.selection.choose(self.counts0)
            if self.test.done:  # cannot happen with n_max >= 1; kept so a finished test is never fed
                self._done(evals)
            else:
                self.sure = self.test.certain_more()
                self.jobs.append(add(ESTIMATION, int(self.test.remaining), self.round, self.ahead, self.sure))
            return 0
        if len(labels) == 1:  # rounds of one vote: the common case, without an array reduction
            self.test.update(int(int(labels[0]) == self.c_a), 1)
        else:
            self.test.update(int(np.count_nonzero(labels == self.c_a)), len(labels))
        if self.test.done:
            self._done(evals)
            return 0
        if self.test.n < self.sure:
            return self.sure - self.test.n
        more = self.test.certain_more()
        self.sure = self.test.n + more
        return more

    def _done(self, evals) -> None:
        self.result = self.finish(self.test, self.c_a, int(evals()))
        self.finished = True


def run_stream(scheduler, stage: Callable[[np.ndarray], Any], image_shape, items: Iterable[tuple[int, np.ndarray, Callable]],
               *, seed: int, in_flight: int, emit: Callable[[Streamed], None],
               progress: Optional[Callable[[int], None]] = None, stats: SchedulerStats | None = None) -> SchedulerStats:
    """Stream ``items`` ((image index, image [C x H x W] float32, make_work(idx) -> a work object),
    read lazily, each checked by the caller) through one ``scheduler`` run with at most
    ``in_flight`` images staged at a time; ``emit(Streamed)`` as each image finishes (in the order
    they finish). ``stage(images [N x C x H x W])``: the images on the scheduler's device."""
    if int(in_flight) < 1:
        raise ValueError(f"in_flight must be >= 1 (got {in_flight})")
    xp = scheduler.xp
    with scheduler.device.stream():  # zero-filled on the stream that later writes and reads it
        staged = xp.zeros((int(in_flight), *image_shape), dtype=np.float32)
    free_slots = list(range(int(in_flight) - 1, -1, -1))
    jobs: list[Job] = []
    owner: list[tuple[_Work, int, Callable[..., int]]] = []  # per job: its image's work, staging slot, add
    source = iter(items)
    exhausted = False
    stats = stats if stats is not None else SchedulerStats()
    last = [time.time()]

    def finish(work: _Work, slot: int) -> None:
        free_slots.append(slot)
        now = time.time()
        evals = _evals(work)
        emit(Streamed(work.idx, work.result, work.counts, evals, work.samples, now - last[0],
                      evals - _evals(work, stats.per_job_delivered_evals)))
        last[0] = now

    def _evals(work: _Work, per_job: Optional[list] = None) -> int:
        """UNet evaluations of the work's jobs (``per_job``: those of their delivered samples)."""
        per_job = stats.per_job_unet_evals if per_job is None else per_job
        return int(sum(per_job[j] for j in work.jobs if j < len(per_job)))

    def refill() -> bool:
        nonlocal exhausted
        while not exhausted and free_slots:
            try:
                idx, image, make_work = next(source)
            except StopIteration:
                exhausted = True
                return False
            slot = free_slots.pop()
            staged[slot] = stage(np.asarray(image, dtype=np.float32)[None])[0]
            work = make_work(int(idx))
            work.evals = lambda work=work: _evals(work)  # its UNet evaluations so far

            def add(phase, num, round_size, ahead, sure=0, work=work, slot=slot) -> int:
                jobs.append(Job(slot, work.idx, int(phase), int(num), int(round_size), int(ahead), int(sure)))
                owner.append((work, slot, add))
                return len(jobs) - 1

            work.start(add)
            if work.finished:  # nothing to sample (n = 0 cannot pass validation; kept for safety)
                finish(work, slot)
                continue
            return True
        return False

    def deliver(job: int, labels: np.ndarray) -> int:
        work, slot, add = owner[job]  # add: a job of the same image and slot
        goes_on = work.take(job, labels, add, work.evals)
        if work.finished:
            finish(work, slot)
        return goes_on

    scheduler.run(staged, jobs, seed, deliver, progress=progress, stats=stats, refill=refill)
    return stats
