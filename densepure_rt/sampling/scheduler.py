"""Continuous batching: every step call holds rows of many noisy samples, runs and images, each at
its own reverse step; freed rows are refilled after every call (iteration-level scheduling, as LLM
servers do it).

    slots (rows of one call)     call t          call t+1        call t+2
      0  sample 4, run 0, step 3  -> finished ->  sample 9, run 0, step 0  ...
      1  sample 4, run 1, step 3  -> finished ->  sample 9, run 1, step 0
      2  sample 7, run 5, step 1               ->  sample 7, run 5, step 2
      3  sample 8, run 0, step 0               ->  sample 8, run 0, step 1
                                   finished runs -> classifier queue -> labels -> votes
                                   a sample whose vote is decided frees its place; an undecided
                                   one gets the fewest further runs that could decide it

Per call (over numpy on the CPU, CuPy on a GPU, the same code): the rows' keys (image index,
phase, sample, draw = 1 + run * calls + step) and steps are put, the step scalars gathered per row
(``table[step]``: engine format 3), the noise drawn per row, the step graph run once over every
occupied row. Rows that took their last step are copied into the classifier queue; the queue is
classified in chunks of a fixed size (a partial chunk only when nothing else can run); labels come
back to the host, where each sample's vote reads the completed prefix of its runs
(:func:`densepure_rt.stats.vote.undecided`, the official tie rule).

What a sample computes (:mod:`densepure_rt.sampling.loop`): noise that is a pure function of
(seed, image, phase, sample, draw), its x_{t*}, and its runs: ceil(K/2) first
(:func:`densepure_rt.stats.vote.vote_waves`), then :func:`densepure_rt.stats.vote.runs_to_decide`
at a time (the fewest that could decide the vote; it stops at the first run after which the vote
is decided). So the voted labels equal those of all K runs with the same noise, and the counts do
not depend on the calls' other rows (tests: tests/test_scheduler.py against tests/oracle.py).

The host keeps the bookkeeping (which sample, run and step each row holds: all known without
reading the device); the device is read once per classifier chunk (its labels, and whether any of its
purified images is non-finite). Runs of one sample are launched in run order and take
the same number of calls, so they finish in run order and the vote's prefix is always contiguous.
On a GPU this runs over CuPy with the device's stream; it has not been run on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from densepure_rt.errors import EngineError
from densepure_rt.sampling.loop import NON_FINITE, check_labels
from densepure_rt.stats.vote import majority_vote, runs_to_decide, undecided, vote_waves

__all__ = ["Job", "SchedulerStats", "Scheduler", "SPECULATION"]

#: Past every bound (no other work can fill the call), a bounded job may start this fraction of the
#: samples it has delivered beyond them: a long test (the last images of a run) still fills more of
#: the calls as it goes on, and its dropped work stays within about 1.5% of its delivered work.
#: Digits --radius 0.25, K = 10, b = 4, 20 images: 0.56% of all UNet evaluations dropped, all of
#: them by the two images left alone at the end (1/32: 1.53%).
SPECULATION = 1 / 64


@dataclass(frozen=True)
class Job:
    """``num`` noisy samples (0 .. num-1) of phase ``phase`` of image ``image`` (staged slot) whose
    noise is keyed by ``image_index``."""

    image: int
    image_index: int
    phase: int
    num: int
    #: Samples per delivery (0: all ``num`` at once): a sequential test's round.
    round: int = 0
    #: Samples started and not yet delivered, at most (0: no bound), beyond those its test certainly
    #: reads (``sure``, and what ``deliver`` returns). A sequential test's job is bounded, so free rows
    #: go to other images' samples rather than to samples its test may never read; with nothing else
    #: to run it may exceed it by :data:`SPECULATION` of what it has delivered.
    ahead: int = 0
    #: Samples the job's test reads whatever the votes (it cannot stop before): started freely.
    sure: int = 0


@dataclass
class SchedulerStats:
    """What a :meth:`Scheduler.counts` call did: calls, occupied and idle rows (of the ``slots``
    rows a full call holds), UNet and classifier evaluations (one per row each)."""

    slots: int = 0
    calls: int = 0
    busy_rows: int = 0
    idle_rows: int = 0
    classifier_calls: int = 0
    unet_evals: int = 0
    classifier_evals: int = 0
    #: Per job: runs of its delivered samples, UNet evaluations of all its rows (dropped ones too),
    #: and UNet evaluations of its samples delivered to ``deliver`` (the rest were dropped).
    per_job_runs: list = field(default_factory=list)
    per_job_unet_evals: list = field(default_factory=list)
    per_job_delivered_evals: list = field(default_factory=list)
    #: (job, sample) in the order votes completed (not the order they are delivered in).
    completion_order: list = field(default_factory=list)

    @property
    def per_job_dropped_evals(self) -> list:
        """Per job: UNet evaluations of samples started and never delivered (dropped when the job
        stopped). Final once the job is stopped or done; 0 for a job that delivered every sample."""
        return [int(e) - int(d) for e, d in zip(self.per_job_unet_evals, self.per_job_delivered_evals)]

    @property
    def dropped_evals(self) -> int:
        """UNet evaluations of samples never delivered, all jobs together."""
        return int(sum(self.per_job_dropped_evals))

    @property
    def idle_fraction(self) -> float:
        total = self.busy_rows + self.idle_rows
        return self.idle_rows / total if total else 0.0


class Scheduler:
    """Continuous batching over a prepared :class:`densepure_rt.sampling.loop.BatchLoop`'s executor,
    device and noise (see the module doc). ``slots``: rows per step call (the engine's row limit
    and memory are checked by the caller: batch x K)."""

    def __init__(self, loop, slots: int, chunk: int | None = None, early_exit: bool = True, full_calls: bool | None = None):
        if loop.rs is None:
            raise RuntimeError("prepare the loop first")
        self.loop, self.xp, self.device = loop, loop.xp, loop.device
        self.executor, self.noise = loop.executor, loop.noise
        self.rs, self.votes = loop.rs, int(loop.votes)
        self.calls = int(self.rs.num_calls)
        self.slots = int(slots)
        if self.slots < 1:
            raise ValueError(f"slots must be >= 1 (got {slots})")
        #: Rows per classifier call: fixed (a partial chunk only to drain the queue). Every chunk is
        #: the queue's first rows, so its views start where the buffers do (aligned: TensorRT).
        self.chunk = max(min(int(chunk or self.slots), loop.classifier_limit()), 1)
        #: Samples in flight at most: every slot's sample, plus those whose runs wait in the queue.
        self.capacity = self.slots + self.chunk + self.slots
        #: Runs a sample starts with: ceil(K/2) with the vote's exact early exit, else all K.
        self.first = vote_waves(self.votes)[0] if early_exit else self.votes
        #: Every step call runs all ``slots`` rows (free rows on stale values, counted idle): one shape,
        #: so a captured CUDA graph replays for every call and a TensorRT context keeps its shape.
        #: Default: where the executor asks for it (``fixed_rows``: ONNX Runtime replaying CUDA graphs,
        #: TensorRT), which then reserves that row count; otherwise a call covers the occupied rows
        #: only (cheaper on a CPU).
        self.full_calls = bool(getattr(loop.executor, "fixed_rows", False)) if full_calls is None else bool(full_calls)
        if self.full_calls:
            loop.executor.reserve(self.slots, loop.image_shape)
        # On the loop's stream: the zero fills must be ordered before the
        # kernels that later use these buffers there (a non-blocking stream does not wait for the
        # default one), and done before the first call.
        with self.device.stream():
            self._allocate()
        self.device.synchronize()

    def _allocate(self) -> None:
        xp, f32, u32 = self.xp, np.float32, np.uint32
        shape, R, P, Q = self.loop.image_shape, self.slots, self.capacity, self.chunk + self.slots
        self.x = xp.zeros((R, *shape), dtype=f32)  # free rows run on these: finite from the start
        self.x_next = xp.zeros_like(self.x)
        self.z = xp.empty_like(self.x)
        self.scalars = xp.empty((R, self.loop.table.shape[1]), dtype=f32)
        self.start = xp.empty((P, *shape), dtype=f32)  # x_{t*} of each sample in flight
        self.delta = xp.empty((P, *shape), dtype=f32)
        self.queue = xp.empty((Q, *shape), dtype=f32)
        self.q_labels = xp.empty(Q, dtype=np.int64)
        self.q_logits = xp.empty((Q, self.loop.num_classes), dtype=f32)
        self.r_image, self.r_phase, self.r_sample, self.r_draw = (xp.zeros(R, dtype=u32) for _ in range(4))
        self.r_step = xp.zeros(R, dtype=np.int64)
        self.a_image, self.a_phase, self.a_sample = (xp.zeros(P, dtype=u32) for _ in range(3))
        self.a_zero = xp.zeros(P, dtype=u32)

    def _put(self, buf, host) -> None:
        self.loop._put(buf, host)

    # -------------------------------------------------------------------------------------------- #
    def counts(self, images, jobs: list[Job], seed: int, progress: Optional[Callable[[int], None]] = None,
               stats: SchedulerStats | None = None) -> list[np.ndarray]:
        """Per-class counts [num_classes] int64 of each job's voted labels (in job order).

        images: [N x C x H x W] float32 in [0, 1] staged on the loop's device (``Job.image`` indexes
        it). ``progress(k)``: k more samples voted. ``stats``: filled with what the call did."""
        counts = [np.zeros(self.loop.num_classes, dtype=np.int64) for _ in jobs]

        def add(job: int, labels: np.ndarray) -> bool:
            counts[job] += np.bincount(labels, minlength=self.loop.num_classes)
            return True

        self.run(images, list(jobs), seed, add, progress=progress, stats=stats)
        for job, c in zip(jobs, counts):
            if int(c.sum()) != job.num:
                raise EngineError(f"the engine counted {int(c.sum())} labels for {job.num} samples: rebuild the engine")
        return counts

    def run(self, images, jobs: list[Job], seed: int, deliver: Callable[[int, np.ndarray], bool],
            progress: Optional[Callable[[int], None]] = None, stats: SchedulerStats | None = None,
            refill: Optional[Callable[[], bool]] = None) -> SchedulerStats:
        """Run ``jobs`` (a list the caller may append to from ``deliver``: a job that depends on an
        earlier one's outcome, as estimation on selection) and hand each job's voted labels to
        ``deliver(job, labels)`` **in sample order**, ``job.round`` samples at a time (the last
        round may be shorter; round 0: all ``num`` at once). ``deliver`` returns False (or 0) to
        stop the job: no more of its samples start, and its samples in flight are dropped (their
        work is counted in ``stats.per_job_unet_evals`` and ``stats.per_job_dropped_evals``, never
        delivered); True to go on; or an integer k >= 1: go on, and the next k samples will be
        read whatever their votes (a test that cannot stop before them), so they start freely.

        Sample order is what keeps a sequential test valid: votes complete out of order (a
        unanimous sample needs fewer runs than a split one, and unanimity goes with the majority
        class), so a test fed in completion order would see the majority class early and certify
        too often (tests/test_scheduler_validity.py measures it). Labels that complete early wait
        until their predecessors are in.

        Rows are filled with: the next run of an undecided sample, else the next sample of the jobs
        in flight (oldest job first, each within its bound: the samples its test surely reads, and
        ``ahead`` more), else ``refill()``'s work (a callable that appends jobs, e.g. the next
        image's, and returns whether it did), else samples past the bounds, at most
        :data:`SPECULATION` of each job's delivered samples; else rows stay free (a smaller call,
        or an idle row with ``full_calls``). New samples are admitted by rows: as many as the free
        rows can start (a sample takes ``first`` rows at once), one more for a remainder, so at
        most one sample waits for rows after its admission. ``stats.per_job_unet_evals`` and
        ``stats.per_job_delivered_evals`` are kept up to date while running (a stopped job's counts
        are final when ``deliver`` returns False: no step call comes between)."""
        stats = stats if stats is not None else SchedulerStats()
        with self.device.stream():
            _Run(self, images, jobs, int(seed), deliver, progress, stats, refill).go()
        self.loop.unet_evals += stats.unet_evals
        self.loop.classifier_evals += stats.classifier_evals
        self.loop.dropped_evals += stats.dropped_evals
        return stats

    def _step(self, jobs, places, runs, steps, p_job, p_sample, seed: int) -> None:
        """One step call over rows 0 .. len(places)-1: each row's keys, step scalars and noise put,
        the step graph run, x and x_next swapped. Free rows (place -1) run on stale values and are
        ignored."""
        xp, hi, calls = self.xp, len(places), self.calls
        held = places >= 0
        job_of = np.where(held, p_job[np.maximum(places, 0)], 0)
        self._put(self.r_image, np.fromiter((jobs[j].image_index for j in job_of), dtype=np.int64, count=hi))
        self._put(self.r_phase, np.fromiter((jobs[j].phase for j in job_of), dtype=np.int64, count=hi))
        self._put(self.r_sample, np.where(held, p_sample[np.maximum(places, 0)], 0))
        # The draw of run k at step s: 1 + k * calls + s (noise keyed by sample, not by row).
        self._put(self.r_draw, 1 + runs * calls + np.minimum(steps, calls - 1))
        self._put(self.r_step, np.minimum(steps, calls - 1))
        xp.take(self.loop.table, self.r_step[:hi], axis=0, out=self.scalars[:hi])
        z = self.z[:hi]
        self.noise.fill(z, seed, self.r_image, self.r_phase, self.r_sample, self.r_draw, 0, 1.0)
        self.executor.step(self.x[:hi], z, self.scalars[:hi], self.x_next[:hi])
        self.x, self.x_next = self.x_next, self.x


class _Run:
    """The host state of one :meth:`Scheduler.run`: slots, the sample table, the classifier queue,
    each job's delivered prefix."""

    def __init__(self, sch: Scheduler, images, jobs, seed, deliver, progress, stats, refill=None):
        self.sch, self.images, self.jobs, self.seed = sch, images, jobs, seed
        self.deliver, self.progress, self.stats, self.refill = deliver, progress, stats, refill
        if not 0 <= seed < 2**32:
            raise ValueError("seed must be in [0, 2^32) for the Philox key and counter")
        R, P, K = sch.slots, sch.capacity, sch.votes
        stats.slots = R
        # Slots (rows): which sample (place in the sample table), run and step each holds; -1: free.
        self.slot_place = np.full(R, -1, dtype=np.int64)
        self.slot_run = np.zeros(R, dtype=np.int64)
        self.slot_step = np.zeros(R, dtype=np.int64)
        # The sample table: job, sample index, runs launched / wanted / labelled, labels, rows queued.
        self.p_job = np.full(P, -1, dtype=np.int64)
        self.p_sample = np.zeros(P, dtype=np.int64)
        self.p_launched = np.zeros(P, dtype=np.int64)
        self.p_target = np.zeros(P, dtype=np.int64)
        self.p_known = np.zeros(P, dtype=np.int64)  # labels received: always runs 0 .. known-1
        self.p_labels = np.zeros((P, K), dtype=np.int64)
        self.p_queued = np.zeros(P, dtype=np.int64)
        self.p_evals = np.zeros(P, dtype=np.int64)  # UNet evaluations of its rows so far
        self.p_dead = np.zeros(P, dtype=bool)  # its job was stopped: its rows are dropped
        self.free_places = list(range(P - 1, -1, -1))
        # One vote of each class as a read-only [1] int64 array: what a round of one delivers.
        self.single = [np.full(1, c, dtype=np.int64) for c in range(sch.loop.num_classes)]
        for one in self.single:
            one.flags.writeable = False
        self.order: list[int] = []  # live places in admission order: who gets free slots first
        self.queue_rows: list[tuple[int, int]] = []  # (place, run) of each purified image queued
        # Per job: next sample to start, voted (label, UNet evaluations) of samples not yet delivered,
        # delivered count, stopped.
        self.live: list[int] = []  # jobs with samples left to start, oldest first
        self.started: list[int] = []
        self.voted: list[dict] = []
        self.delivered: list[int] = []
        self.sure: list[int] = []  # samples the job's test reads whatever the votes
        self.stopped: list[bool] = []
        self.runs_of = stats.per_job_runs = []
        self.evals_of = stats.per_job_unet_evals = []
        self.delivered_evals_of = stats.per_job_delivered_evals = []

    # -- jobs ------------------------------------------------------------------------------------
    def _sync_jobs(self) -> None:
        """Pick up jobs appended since the last look (checked as the first were)."""
        while len(self.started) < len(self.jobs):
            job = self.jobs[len(self.started)]
            for name, key in (("image index", job.image_index), ("phase", job.phase), ("sample index", max(job.num - 1, 0))):
                if not 0 <= int(key) < 2**32:
                    raise ValueError(f"{name} must be in [0, 2^32) for the Philox key and counter")
            if job.num < 0 or job.round < 0:
                raise ValueError(f"a job needs num >= 0 and round >= 0 (got {job})")
            if job.num > 0:
                self.live.append(len(self.started))
            self.started.append(0)
            self.voted.append({})
            self.delivered.append(0)
            self.sure.append(max(int(job.sure), 0))
            self.stopped.append(job.num == 0)
            self.runs_of.append(0)
            self.evals_of.append(0)
            self.delivered_evals_of.append(0)

    def _stop(self, j: int) -> None:
        """No more samples of job j start; its samples in flight are dropped."""
        self.stopped[j] = True
        if j in self.live:
            self.live.remove(j)
        for place in [p for p in self.order if self.p_job[p] == j]:
            self.slot_place[self.slot_place == place] = -1
            self.order.remove(place)
            self.p_dead[place] = True
            if self.p_queued[place] == 0:
                self._free(place)

    def _free(self, place: int) -> None:
        self.p_job[place] = -1
        self.p_dead[place] = False
        self.free_places.append(place)

    # -- admission and slots -------------------------------------------------------------------------
    def _admit(self, count: int) -> int:
        """Take up to ``count`` new samples into the table (each job's in sample order; jobs oldest
        first, within their bounds, then ``refill``'s jobs, then past the bounds by at most
        :data:`SPECULATION`), their x_{t*} computed on the device. Returns how many."""
        sch, xp = self.sch, self.sch.xp
        places, imgs, keys = [], [], []
        self._sync_jobs()

        jobs, delivered, sure, started = self.jobs, self.delivered, self.sure, self.started

        def take(bounded: bool) -> None:
            for j in list(self.live):
                job = jobs[j]
                # The samples job j may have started: all of them without an ``ahead`` bound; else
                # those its test surely reads and ``ahead`` more, and past the bounds
                # :data:`SPECULATION` of those it has delivered more.
                if not job.ahead:
                    limit = job.num
                else:
                    done = delivered[j]
                    limit = max(done + job.ahead, sure[j])
                    if not bounded:
                        limit = max(limit, done + int(done * SPECULATION))
                    limit = min(job.num, limit)
                while len(places) < count and self.free_places and started[j] < limit:
                    place = self.free_places.pop()
                    self.p_job[place], self.p_sample[place] = j, started[j]
                    self.p_launched[place], self.p_target[place], self.p_known[place] = 0, sch.first, 0
                    self.p_evals[place] = 0
                    places.append(place)
                    imgs.append(job.image)
                    keys.append((job.image_index, job.phase, started[j]))
                    self.order.append(place)
                    started[j] += 1
                if started[j] >= job.num:
                    self.live.remove(j)
                if len(places) >= count or not self.free_places:
                    return

        take(bounded=True)
        while len(places) < count and self.free_places and self.refill is not None and self.refill():
            self._sync_jobs()
            take(bounded=True)
        if len(places) < count:
            take(bounded=False)
        if not places:
            return 0
        m = len(places)
        keys_a = np.asarray(keys, dtype=np.int64)
        sch._put(sch.a_image, keys_a[:, 0])
        sch._put(sch.a_phase, keys_a[:, 1])
        sch._put(sch.a_sample, keys_a[:, 2])
        delta = sch.delta[:m]
        sch.noise.fill(delta, self.seed, sch.a_image, sch.a_phase, sch.a_sample, sch.a_zero, 0, float(sch.loop.sigma))
        where = xp.asarray(np.asarray(places, dtype=np.int64))
        picked = xp.take(self.images, xp.asarray(np.asarray(imgs, dtype=np.int64)), axis=0)
        # x_{t*} = (2 (x + delta) - 1) / sqrt(1 + 4 sigma^2), in float32 as the reference computes it.
        sch.start[where] = xp.multiply(sch.loop.scale, 2 * (picked + delta) - 1)
        return m

    def _fill_slots(self) -> None:
        """Give every free slot the next run of the oldest sample that wants one, admitting new
        samples when no sample in flight does."""
        free = np.flatnonzero(self.slot_place < 0)
        rows, sources = [], []
        pos = 0
        while pos < len(free):
            wanting = [p for p in self.order if self.p_launched[p] < self.p_target[p]]
            if not wanting:
                # By rows: a new sample takes ``first`` rows at once, so admitting one per free row
                # would start samples whose first runs wait for later calls (ahead of their tests,
                # often past the point where a test stops: dropped work). A remainder below
                # ``first`` rows takes one more sample, whose other first runs lead the next call.
                if not self._admit(-(-(len(free) - pos) // self.sch.first)):
                    break
                continue
            for place in wanting:
                while pos < len(free) and self.p_launched[place] < self.p_target[place]:
                    slot = int(free[pos])
                    self.slot_place[slot], self.slot_run[slot], self.slot_step[slot] = place, self.p_launched[place], 0
                    self.p_launched[place] += 1
                    rows.append(slot)
                    sources.append(place)
                    pos += 1
                if pos == len(free):
                    break
        if rows:
            xp = self.sch.xp
            self.sch.x[xp.asarray(np.asarray(rows, dtype=np.int64))] = self.sch.start[xp.asarray(np.asarray(sources, dtype=np.int64))]

    # -- the loop ------------------------------------------------------------------------------------
    def go(self) -> None:
        sch, xp, stats, calls = self.sch, self.sch.xp, self.stats, self.sch.calls
        self._sync_jobs()
        while True:
            self._fill_slots()
            busy = self.slot_place >= 0
            if not busy.any():
                if self.queue_rows:
                    self._classify(len(self.queue_rows))  # drain: nothing else can run until these are voted
                    continue
                self._sync_jobs()
                if self.live:
                    if not self.free_places:  # cannot happen: with nothing running every place is free
                        raise RuntimeError("scheduler stalled with work left")
                    continue  # a job appended by deliver, not admitted yet
                break
            # Slots fill lowest first: the call covers 0 .. hi-1 (all slots with full_calls).
            hi = sch.slots if sch.full_calls else int(np.flatnonzero(busy)[-1]) + 1
            if calls:
                sch._step(self.jobs, self.slot_place[:hi], self.slot_run[:hi], self.slot_step[:hi], self.p_job, self.p_sample,
                          self.seed)
                n_busy = int(busy[:hi].sum())
                stats.calls += 1
                stats.busy_rows += n_busy
                stats.idle_rows += hi - n_busy
                stats.unet_evals += n_busy
                held = self.slot_place[busy]
                np.add.at(self.p_evals, held, 1)
                for j in self.p_job[held].tolist():
                    self.evals_of[j] += 1
                self.slot_step[busy] += 1
            # (--steps none: no reverse step, a run's image is x_{t*} itself, classified at once)
            done = np.flatnonzero(busy & (self.slot_step == calls))
            if len(done):
                q0 = len(self.queue_rows)
                sch.queue[q0:q0 + len(done)] = sch.x[xp.asarray(done)]
                for s in done.tolist():
                    place = int(self.slot_place[s])
                    self.queue_rows.append((place, int(self.slot_run[s])))
                    self.p_queued[place] += 1
                self.slot_place[done] = -1
            while len(self.queue_rows) >= sch.chunk:
                self._classify(sch.chunk)

    def _classify(self, rows: int) -> None:
        """Classify the first ``rows`` queued images, read their labels, update the votes."""
        sch, xp, stats, num_classes = self.sch, self.sch.xp, self.stats, self.sch.loop.num_classes
        sch.executor.classify(sch.queue[:rows], sch.q_labels[:rows], sch.q_logits[:rows])
        stats.classifier_calls += 1
        stats.classifier_evals += rows
        # Read with the labels (one host wait per chunk): a NaN image would get some label, and a
        # label outside the classes would hide the real fault.
        if not bool(xp.isfinite(sch.queue[:rows]).all()):
            raise EngineError(NON_FINITE)
        labels = check_labels(sch.device.to_host(sch.q_labels[:rows]), rows, num_classes)
        touched = set()
        for (place, run), label in zip(self.queue_rows[:rows], labels.tolist()):
            self.p_queued[place] -= 1
            if self.p_dead[place]:
                if self.p_queued[place] == 0:
                    self._free(place)
                continue
            self.p_labels[place, run] = label
            self.p_known[place] = max(self.p_known[place], run + 1)
            touched.add(place)
        left = len(self.queue_rows) - rows
        if left:
            sch.queue[:left] = sch.queue[rows:rows + left].copy()
        self.queue_rows = self.queue_rows[rows:]
        self._decide(sorted(touched))

    def _decide(self, places) -> None:
        """Samples whose wanted runs are all labelled: vote if decided (or all K ran), else want the
        fewest further runs that could decide; then deliver what is in sample order."""
        K = self.sch.votes
        ready = [p for p in places if self.p_known[p] == self.p_target[p] == self.p_launched[p]]
        finished = []
        by_prefix: dict[int, list[int]] = {}
        for p in ready:
            by_prefix.setdefault(int(self.p_known[p]), []).append(p)
        for known, group in by_prefix.items():
            labels = self.p_labels[group, :known]
            voted = majority_vote(labels)
            if known == K:
                finished += list(zip(group, voted.tolist()))
                continue
            still = undecided(labels, K)
            more = runs_to_decide(labels, K)
            for i, p in enumerate(group):
                if still[i]:
                    self.p_target[p] = known + int(more[i])
                else:
                    finished.append((p, int(voted[i])))
        jobs_touched = set()
        for p, label in finished:
            j = int(self.p_job[p])
            self.voted[j][int(self.p_sample[p])] = (label, int(self.p_evals[p]))
            self.runs_of[j] += int(self.p_known[p])
            self.stats.completion_order.append((j, int(self.p_sample[p])))
            self.order.remove(p)
            self._free(p)
            jobs_touched.add(j)
        for j in sorted(jobs_touched):
            self._deliver(j)

    def _deliver(self, j: int) -> None:
        """Hand job j its next rounds of labels in sample order, while they are complete."""
        job = self.jobs[j]
        size = job.round or job.num
        waiting = self.voted[j]
        while not self.stopped[j] and self.delivered[j] < job.num:
            first = self.delivered[j]
            take = min(size, job.num - first)
            if take == 1:  # rounds of one vote: the common case of the sequential tests, kept lean
                if first not in waiting:
                    break  # its predecessor is still running: wait for it
                label, evals = waiting.pop(first)
                labels = self.single[label]
            else:
                if any(first + i not in waiting for i in range(take)):
                    break  # a predecessor is still running: wait for it (sample order, not completion order)
                voted = [waiting.pop(first + i) for i in range(take)]
                labels = np.asarray([label for label, _ in voted], dtype=np.int64)
                evals = sum(e for _, e in voted)
            self.delivered[j] += take
            self.delivered_evals_of[j] += evals
            if self.progress is not None:
                self.progress(take)
            more = self.deliver(j, labels)
            if not more:
                self._stop(j)
            else:
                self.sure[j] = max(self.sure[j], self.delivered[j] + int(more))
            if len(self.started) < len(self.jobs):
                self._sync_jobs()
