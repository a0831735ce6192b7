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

What a sample computes is exactly the wave loop's (:class:`densepure_rt.sampling.loop.BatchLoop`):
the same noise (a pure function of seed, image, phase, sample and draw), the same x_{t*}, the same
runs: ceil(K/2) first (:func:`densepure_rt.stats.vote.vote_waves`), then
:func:`densepure_rt.stats.vote.runs_to_decide` at a time (the fewest that could decide the vote,
so never more than the wave loop's one-by-one runs, and it stops at the same run). So the voted
labels, the counts and the UNet evaluations per sample equal the wave loop's; what changes is that
the calls stay full while samples exit early (tests: tests/test_scheduler.py).

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
from densepure_rt.stats.vote import majority_vote, runs_to_decide, undecided, vote_waves

__all__ = ["Job", "SchedulerStats", "Scheduler"]


@dataclass(frozen=True)
class Job:
    """``num`` noisy samples (0 .. num-1) of phase ``phase`` of image ``image`` (staged slot) whose
    noise is keyed by ``image_index``."""

    image: int
    image_index: int
    phase: int
    num: int


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
    per_job_runs: list = field(default_factory=list)

    @property
    def idle_fraction(self) -> float:
        total = self.busy_rows + self.idle_rows
        return self.idle_rows / total if total else 0.0


class Scheduler:
    """Continuous batching over a prepared :class:`densepure_rt.sampling.loop.BatchLoop`'s executor,
    device and noise (see the module doc). ``slots``: rows per step call (the engine's row limit
    and memory are checked by the caller, as for the wave loop's batch x K)."""

    def __init__(self, loop, slots: int, chunk: int | None = None, early_exit: bool = True):
        if loop.rs is None:
            raise RuntimeError("prepare the loop first")
        self.loop, self.xp, self.device = loop, loop.xp, loop.device
        self.executor, self.noise = loop.executor, loop.noise
        self.rs, self.votes = loop.rs, int(loop.votes)
        self.calls = int(self.rs.num_calls)
        self.slots = int(slots)
        if self.slots < 1:
            raise ValueError(f"slots must be >= 1 (got {slots})")
        limit = loop.executor.classifier_rows or loop.CLASSIFIER_ROWS
        if loop.classifier_rows is not None:
            limit = min(limit, int(loop.classifier_rows))
        #: Rows per classifier call: fixed (a partial chunk only to drain the queue).
        self.chunk = max(min(int(chunk or self.slots), int(limit)), 1)
        #: Samples in flight at most: every slot's sample, plus those whose runs wait in the queue.
        self.capacity = self.slots + self.chunk + self.slots
        #: Runs a sample starts with: ceil(K/2) with the vote's exact early exit, else all K.
        self.first = vote_waves(self.votes)[0] if early_exit else self.votes
        self._allocate()

    def _allocate(self) -> None:
        xp, f32, u32 = self.xp, np.float32, np.uint32
        shape, R, P, Q = self.loop.image_shape, self.slots, self.capacity, self.chunk + self.slots
        self.x = xp.empty((R, *shape), dtype=f32)
        self.x_next = xp.empty_like(self.x)
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
        with self.device.stream():
            return self._counts(images, jobs, int(seed), progress, stats if stats is not None else SchedulerStats())

    def _counts(self, images, jobs, seed, progress, stats) -> list[np.ndarray]:
        xp, R, K, calls, P = self.xp, self.slots, self.votes, self.calls, self.capacity
        num_classes = self.loop.num_classes
        if not 0 <= seed < 2**32:
            raise ValueError("seed must be in [0, 2^32) for the Philox key and counter")
        for job in jobs:
            for name, key in (("image index", job.image_index), ("phase", job.phase), ("sample index", max(job.num - 1, 0))):
                if not 0 <= int(key) < 2**32:
                    raise ValueError(f"{name} must be in [0, 2^32) for the Philox key and counter")
        counts = [np.zeros(num_classes, dtype=np.int64) for _ in jobs]
        runs_of = np.zeros(len(jobs), dtype=np.int64)
        stats.slots = R
        # Slots (rows): which sample (place in the sample table), run and step each holds; -1: free.
        slot_place = np.full(R, -1, dtype=np.int64)
        slot_run = np.zeros(R, dtype=np.int64)
        slot_step = np.zeros(R, dtype=np.int64)
        # The sample table (host): job, sample index, runs launched / wanted, labels of its runs.
        p_job = np.full(P, -1, dtype=np.int64)
        p_sample = np.zeros(P, dtype=np.int64)
        p_launched = np.zeros(P, dtype=np.int64)
        p_target = np.zeros(P, dtype=np.int64)
        p_known = np.zeros(P, dtype=np.int64)  # labels received (always runs 0 .. known-1)
        p_labels = np.zeros((P, K), dtype=np.int64)
        free_places = list(range(P - 1, -1, -1))
        order: list[int] = []  # places in admission order (oldest first): who gets free slots first
        queue_rows: list[tuple[int, int]] = []  # (place, run) of each purified image in the queue
        next_job, next_sample = 0, 0

        def admit(count: int) -> None:
            """Take up to ``count`` new samples (in job and sample order) into the table, with their
            x_{t*} computed on the device."""
            nonlocal next_job, next_sample
            places, imgs, keys = [], [], []
            while len(places) < count and free_places and next_job < len(jobs):
                job = jobs[next_job]
                if next_sample >= job.num:
                    next_job, next_sample = next_job + 1, 0
                    continue
                place = free_places.pop()
                p_job[place], p_sample[place] = next_job, next_sample
                p_launched[place], p_target[place], p_known[place] = 0, self.first, 0
                places.append(place)
                imgs.append(job.image)
                keys.append((job.image_index, job.phase, next_sample))
                order.append(place)
                next_sample += 1
            if not places:
                return
            m = len(places)
            keys_a = np.asarray(keys, dtype=np.int64)
            self._put(self.a_image, keys_a[:, 0])
            self._put(self.a_phase, keys_a[:, 1])
            self._put(self.a_sample, keys_a[:, 2])
            delta = self.delta[:m]
            self.noise.fill(delta, seed, self.a_image, self.a_phase, self.a_sample, self.a_zero, 0, float(self.loop.sigma))
            where = xp.asarray(np.asarray(places, dtype=np.int64))
            picked = xp.take(images, xp.asarray(np.asarray(imgs, dtype=np.int64)), axis=0)
            # x_{t*} = (2 (x + delta) - 1) / sqrt(1 + 4 sigma^2): the wave loop's float32 arithmetic.
            self.start[where] = xp.multiply(self.loop.scale, 2 * (picked + delta) - 1)

        def fill_slots() -> None:
            """Give every free slot the next run of the oldest sample that wants one, admitting new
            samples when no sample in flight does."""
            free = np.flatnonzero(slot_place < 0)
            if not len(free):
                return
            launches: list[tuple[int, int]] = []
            pos = 0
            while pos < len(free):
                wanting = [p for p in order if p_launched[p] < p_target[p]]
                if not wanting:
                    before = len(order)
                    admit(len(free) - pos)
                    if len(order) == before:
                        break
                    continue
                for place in wanting:
                    while pos < len(free) and p_launched[place] < p_target[place]:
                        launches.append((int(free[pos]), place))
                        slot_place[free[pos]], slot_run[free[pos]], slot_step[free[pos]] = place, p_launched[place], 0
                        p_launched[place] += 1
                        pos += 1
                    if pos == len(free):
                        break
            if launches:
                rows = np.asarray([s for s, _ in launches], dtype=np.int64)
                from_places = np.asarray([p for _, p in launches], dtype=np.int64)
                self.x[xp.asarray(rows)] = self.start[xp.asarray(from_places)]

        def classify(rows: int) -> None:
            """Classify the first ``rows`` queued images, read their labels, update the votes."""
            nonlocal queue_rows
            self.executor.classify(self.queue[:rows], self.q_labels[:rows], self.q_logits[:rows])
            stats.classifier_calls += 1
            stats.classifier_evals += rows
            # Read with the labels (one host wait per chunk): a NaN image would get some label, and
            # a label outside the classes would hide the real fault.
            if not bool(xp.isfinite(self.queue[:rows]).all()):
                raise EngineError(
                    "the denoise step produced non-finite values (NaN or inf) in the purified images: the engine is "
                    "broken or was built for other inputs; rebuild it (densepure-rt build --force)"
                )
            labels = self.device.to_host(self.q_labels[:rows])
            if labels.shape != (rows,) or labels.dtype.kind not in "iu":
                raise EngineError(f"the classifier returned labels of shape {labels.shape} for {rows} images: rebuild the engine")
            if rows and (labels.min() < 0 or labels.max() >= num_classes):
                bad_label = int(labels[(labels < 0) | (labels >= num_classes)][0])
                raise EngineError(
                    f"the classifier returned label {bad_label}, outside the engine's {num_classes} classes: "
                    "the engine's classifier does not match its manifest; rebuild the engine"
                )
            touched = []
            for (place, run), label in zip(queue_rows[:rows], labels.tolist()):
                p_labels[place, run] = label
                p_known[place] = max(p_known[place], run + 1)
                touched.append(place)
            left = len(queue_rows) - rows
            if left:
                self.queue[:left] = self.queue[rows:rows + left].copy()
            queue_rows = queue_rows[rows:]
            self._decide(sorted(set(touched)), p_job, p_known, p_target, p_launched, p_labels, counts, runs_of,
                         free_places, order, progress)

        # ---------------------------------------------------------------------------------------- #
        while True:
            fill_slots()
            busy = slot_place >= 0
            if not busy.any():
                if queue_rows:
                    classify(len(queue_rows))  # drain: nothing else can run until these are voted
                    continue
                break
            hi = int(np.flatnonzero(busy)[-1]) + 1  # slots fill lowest first: the call covers 0 .. hi-1
            if calls:
                self._step(jobs, slot_place[:hi], slot_run[:hi], slot_step[:hi], p_job, p_sample, seed)
                stats.calls += 1
                stats.busy_rows += int(busy[:hi].sum())
                stats.idle_rows += hi - int(busy[:hi].sum())
                stats.unet_evals += int(busy[:hi].sum())
                slot_step[busy] += 1
            # (--steps none: no reverse step, a run's image is x_{t*} itself, classified at once)
            done = np.flatnonzero(busy & (slot_step == calls))
            if len(done):
                q0 = len(queue_rows)
                self.queue[q0:q0 + len(done)] = self.x[xp.asarray(done)]
                queue_rows += [(int(slot_place[s]), int(slot_run[s])) for s in done]
                slot_place[done] = -1
            while len(queue_rows) >= self.chunk:
                classify(self.chunk)
        for job, c in zip(jobs, counts):
            if int(c.sum()) != job.num:
                raise EngineError(f"the engine counted {int(c.sum())} labels for {job.num} samples: rebuild the engine")
        stats.per_job_runs = runs_of.tolist()
        self.loop.unet_evals += stats.unet_evals
        self.loop.classifier_evals += stats.classifier_evals
        return counts

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
        # The wave loop's draw of run k at step s: 1 + k * calls + s (noise keyed by sample, not by row).
        self._put(self.r_draw, 1 + runs * calls + np.minimum(steps, calls - 1))
        self._put(self.r_step, np.minimum(steps, calls - 1))
        xp.take(self.loop.table, self.r_step[:hi], axis=0, out=self.scalars[:hi])
        z = self.z[:hi]
        self.noise.fill(z, seed, self.r_image, self.r_phase, self.r_sample, self.r_draw, 0, 1.0)
        self.executor.step(self.x[:hi], z, self.scalars[:hi], self.x_next[:hi])
        self.x, self.x_next = self.x_next, self.x

    def _decide(self, places, p_job, p_known, p_target, p_launched, p_labels, counts, runs_of, free_places, order,
                progress) -> None:
        """Samples whose wanted runs are all labelled: vote if decided (or all K ran), else want the
        fewest further runs that could decide."""
        ready = [p for p in places if p_known[p] == p_target[p] == p_launched[p]]
        if not ready:
            return
        K = self.votes
        finished = []
        by_prefix: dict[int, list[int]] = {}
        for p in ready:
            by_prefix.setdefault(int(p_known[p]), []).append(p)
        for known, group in by_prefix.items():
            labels = p_labels[group, :known]
            if known == K:
                voted = majority_vote(labels)
                finished += list(zip(group, voted.tolist()))
                continue
            still = undecided(labels, K)
            voted = majority_vote(labels)
            more = runs_to_decide(labels, K)
            for i, p in enumerate(group):
                if still[i]:
                    p_target[p] = known + int(more[i])
                else:
                    finished.append((p, int(voted[i])))
        for p, label in finished:
            job = int(p_job[p])
            counts[job][label] += 1
            runs_of[job] += int(p_known[p])
            p_job[p] = -1
            free_places.append(p)
            order.remove(p)
        if progress is not None and finished:
            progress(len(finished))
