"""The runtime's batch loop, written once over an array module: numpy on the CPU, CuPy on a GPU.

One call of :meth:`BatchLoop.run` takes a batch of noisy samples, each naming its image (a slot in
a staged array of images, so one batch may hold samples of several images), its image index, its
phase and its sample index, and returns their voted labels. Inside:

    delta      = sigma * N(seed; image, phase, sample, draw 0)                  [per sample]
    x_{t*}     = input_scale * (2 (image + delta) - 1)                           [per sample]
    for each wave of runs (all K at once, or ceil(K/2) then one by one with early exit):
        x      = x_{t*} repeated over the wave's runs                           [samples x runs rows]
        for s in 0 .. calls-1:
            z  = N(seed; image, phase, sample, draw 1 + k * calls + s)          [per row: run k]
            x  = step(x, z, scalars[s] for every row)                            (the engine's step graph)
        labels[:, runs] = classify(x)
        finished samples vote (official tie rule); undecided ones go on to the next wave

Every number a sample gets is a pure function of (seed, image index, phase, sample, draw) (see
:mod:`densepure_rt.sampling.noise`), so the labels do not depend on the batch or on its other samples; on a
GPU the noise equals the host's to float32 rounding (the kernel's double-precision log/sin/cos may
differ from glibc's in the last bit), so a rare vote can differ between devices. The buffers are
allocated once per (schedule, K, batch) in :meth:`BatchLoop.prepare`; on a GPU a step allocates
nothing (on the host the numpy noise draws allocate; each wave's gathers allocate temporaries).
The loop never reads a device value inside a wave: with early exit it reads the undecided samples
once per wave (a handful of integers) to compact the next wave; without it (``early_exit=False``) a
batch is one asynchronous stream of launches until its labels are read back.

The executor runs the two graphs on buffers of the loop's array module (``step(x, noise, scalars,
out)`` and ``classify(images, labels, logits)``): :class:`densepure_rt.executors.onnxrt.OrtExecutor` binds them
with ONNX Runtime's IOBinding, on the CPU provider over numpy or on the CUDA provider over CuPy.
The noise source fills per-row buffers: :func:`densepure_rt.sampling.philox.row_normals` on the host, the
``philox_rows`` CUDA kernel on a GPU (:mod:`densepure_rt.sampling.device`); the same numbers to float32 rounding.

Optional, off by default (``graphs=None``): a full batch without early exit (one fixed sequence of
launches after the keys are put) can be handed to a graph object that captures it once and replays
it (:class:`densepure_rt.sampling.device.WholeBatchGraphs`, used for TensorRT engines).
The numpy path is unchanged by it.
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence

import numpy as np

from densepure_rt.errors import EngineError
from densepure_rt.executors.base import Executor
from densepure_rt.schedule import ReverseSchedule
from densepure_rt.stats.vote import majority_vote, undecided, vote_waves

__all__ = ["NoiseSource", "BatchLoop", "check_labels", "classifier_chunk", "NON_FINITE", "ALIGNMENT"]

#: Bytes to which every buffer address handed to an executor is aligned: TensorRT's rule for
#: ``setTensorAddress`` ("at least 256-byte alignment"). The buffers themselves come from the array
#: module (CuPy's pool hands out 512-byte aligned blocks); views into them start at row offsets that
#: keep it (:func:`classifier_chunk`).
ALIGNMENT = 256

#: The error when a purified image holds NaN or inf (a NaN image would still get some label).
NON_FINITE = (
    "the denoise step produced non-finite values (NaN or inf) in the purified images: the engine is "
    "broken or was built for other inputs; rebuild it (densepure-rt build --force)"
)


class NoiseSource(Protocol):
    def fill(self, out, seed: int, images, phases, samples, draws, offset: int, scale: float) -> None:
        """out[r] = scale * normals of (images[r], phases[r], samples[r], draws[r] + offset), float32."""


class BatchLoop:
    """Noise, x_{t*}, b steps x K runs, classifier, vote for a batch of noisy samples (see module doc)."""

    #: Rows per classifier call at most: a ViT at thousands of rows needs gigabytes of attention
    #: scratch for no gain in speed.
    CLASSIFIER_ROWS = 512

    def __init__(self, executor: Executor, device, image_shape: Sequence[int], num_classes: int,
                 graphs=None, classifier_rows: int | None = None):
        #: The device (:mod:`densepure_rt.sampling.device`): array module, stream, noise, staging.
        self.device = device
        self.executor, self.noise, self.xp = executor, device.noise, device.xp
        #: The most rows one classifier call may hold (the engine's row limit of its classifier
        #: graph, :mod:`densepure_rt.limits`); None: :attr:`CLASSIFIER_ROWS` only.
        self.classifier_rows = classifier_rows
        #: Off by default (None): every batch runs eagerly. Else an object like
        #: :class:`densepure_rt.sampling.device.WholeBatchGraphs` that captures a full batch without early
        #: exit (a fixed sequence of launches) once and replays it for the next full batches.
        self.graphs = graphs
        self.image_shape = tuple(int(d) for d in image_shape)
        self.num_classes = int(num_classes)
        self.rs: ReverseSchedule | None = None
        #: Work done so far: UNet (step) and classifier evaluations, one per row each.
        self.unet_evals = 0
        self.classifier_evals = 0
        #: Of ``unet_evals``: those of samples never delivered to a test (started by the scheduler,
        #: then dropped when their test stopped). The wave loop drops none.
        self.dropped_evals = 0

    # -- buffers ----------------------------------------------------------------------------------
    def prepare(self, rs: ReverseSchedule, votes: int, batch: int, early_exit: bool = True) -> None:
        """Allocate every buffer for ``batch`` noisy samples x ``votes`` runs and upload the schedule,
        on the device's stream; returns once the device is done with it.

        ``early_exit``: run the K runs in waves (:func:`densepure_rt.stats.vote.vote_waves`) and stop a
        sample's runs once its vote is decided (:func:`densepure_rt.stats.vote.undecided`). The voted
        labels are identical to the full vote with the same noise; only the work differs."""
        with self.device.stream():
            self._prepare(rs, votes, batch, early_exit)
        self.device.synchronize()

    def _prepare(self, rs: ReverseSchedule, votes: int, batch: int, early_exit: bool) -> None:
        if not np.all(np.isfinite(rs.scalars)):
            raise EngineError(f"the reverse schedule for sigma {rs.sigma}, steps {rs.steps} is not finite: choose fewer steps")
        xp = self.xp
        self.rs, self.votes, self.batch = rs, int(votes), int(batch)
        self.waves = vote_waves(self.votes) if early_exit else (self.votes,)
        rows = self.batch * self.votes
        f32 = np.float32
        self.sigma = f32(rs.sigma)
        self.scale = f32(rs.input_scale)
        self.table = xp.asarray(np.ascontiguousarray(rs.scalars, dtype=f32))  # [calls x S]
        self.x = xp.empty((rows, *self.image_shape), dtype=f32)
        self.x_next = xp.empty_like(self.x)
        self.z = xp.empty_like(self.x)
        self.delta = xp.empty((self.batch, *self.image_shape), dtype=f32)
        self.start = xp.empty_like(self.delta)
        self.run_labels = xp.empty(rows, dtype=np.int64)
        self.logits = xp.empty((rows, self.num_classes), dtype=f32)
        self.labels = xp.zeros((self.batch, self.votes), dtype=np.int64)
        self.voted = xp.zeros(self.batch, dtype=np.int64)
        #: Runs each sample of the last batch took (K, or fewer where its vote was decided early).
        self.runs = xp.zeros(self.batch, dtype=np.int64)
        u32 = np.uint32
        # Per-sample keys (image index, phase, sample) and per-row keys of the current wave.
        self.s_image, self.s_phase, self.s_sample = (xp.zeros(self.batch, dtype=u32) for _ in range(3))
        self.s_slot = xp.zeros(self.batch, dtype=np.int64)
        self.s_zero = xp.zeros(self.batch, dtype=u32)
        self.r_image, self.r_phase, self.r_sample, self.r_draw = (xp.zeros(rows, dtype=u32) for _ in range(4))
        #: Per-row step scalars [rows x S] (engine format 3: each row names its own reverse step).
        self.r_scalars = xp.zeros((rows, self.table.shape[1]), dtype=f32)
        #: Whether the batch's purified images hold a non-finite value (read once, after the batch).
        self.bad = xp.zeros((), dtype=bool)
        if self.graphs is not None:
            self.graphs.reset()  # captured graphs point at the buffers just replaced
        if self.waves == (self.votes,):  # early-exit waves never fill the batch
            self.executor.reserve(rows, self.image_shape)

    def _put(self, buf, host) -> None:
        """buf[:len(host)] = host (a small host -> device copy into a preallocated buffer).

        On a GPU the copy is queued on the loop's stream, named explicitly: CuPy 14 takes the
        current stream when none is given, but older releases copied synchronously on the legacy
        default stream, which a non-blocking stream does not wait for (the copy could then overwrite
        keys a queued noise kernel has yet to read). From pageable memory the driver takes the source
        before the call returns, so ``host`` may be freed at once."""
        host = np.ascontiguousarray(host, dtype=buf.dtype)
        if self.xp is np:
            buf[: len(host)] = host
        else:
            buf[: len(host)].set(host, stream=self.device.stream())

    # -- one batch ---------------------------------------------------------------------------------
    def run(self, images, slots, image_indices, phases, samples, seed: int):
        """Voted labels [n] int64 (an array of the loop's module) of n <= batch noisy samples, queued
        on the device's stream (the loop enters it itself).

        images: [slots x C x H x W] float32 in [0, 1] on the loop's device; sample i uses image
        ``images[slots[i]]`` with key (``image_indices[i]``, ``phases[i]``, ``samples[i]``).
        """
        with self.device.stream():
            return self._run(images, slots, image_indices, phases, samples, seed)

    def _run(self, images, slots, image_indices, phases, samples, seed: int):
        if self.rs is None:
            raise RuntimeError("call prepare() first")
        n = len(samples)
        if not 0 < n <= self.batch:
            raise ValueError(f"a batch holds 1 to {self.batch} samples (got {n})")
        votes, calls = self.votes, self.rs.num_calls
        for name, keys in (("seed", [seed]), ("image index", image_indices), ("phase", phases), ("sample index", samples)):
            keys = np.asarray(keys)
            if keys.size and (keys.min() < 0 or keys.max() >= 2**32):  # uint32 would wrap onto other noise
                raise ValueError(f"{name} must be in [0, 2^32) for the Philox key and counter")
        for buf, host in ((self.s_slot, slots), (self.s_image, image_indices), (self.s_phase, phases), (self.s_sample, samples)):
            self._put(buf, host)
        if self.graphs is not None and n == self.batch and len(self.waves) == 1:
            # A full batch without early exit: the same launches every batch, so one captured graph per
            # seed (the noise kernel takes the seed as an argument) replays it; the keys were put above.
            key = (self.batch, calls, votes, int(seed))
            self.graphs.run(key, lambda staged: self._waves(staged, n, seed), images, self.batch)
            unet, classifier = n * votes * calls, n * votes
        else:
            unet, classifier = self._waves(images, n, seed)
        self.unet_evals += unet
        self.classifier_evals += classifier
        if bool(self.bad):
            raise EngineError(NON_FINITE)
        low, high = int(self.labels[:n].min()), int(self.labels[:n].max())
        if low < 0 or high >= self.num_classes:
            bad_label = low if low < 0 else high
            raise EngineError(
                f"the classifier returned label {bad_label}, outside the engine's {self.num_classes} classes: "
                "the engine's classifier does not match its manifest; rebuild the engine"
            )
        return self.voted[:n]

    def _waves(self, images, n: int, seed: int) -> tuple[int, int]:
        """The device work of one batch (after its keys are put): noise, x_{t*}, the waves of steps,
        classifier and vote, into the loop's buffers and :attr:`bad`. Returns the (UNet, classifier)
        evaluations it ran. Without early exit it reads nothing back from the device."""
        xp, votes, calls = self.xp, self.votes, self.rs.num_calls
        unet = classifier = 0
        # Chunk c's views start at row c * chunk: a row count that keeps them 256-byte aligned.
        chunk = classifier_chunk(self.classifier_limit(), self.image_shape, self.num_classes)
        delta, start = self.delta[:n], self.start[:n]
        self.noise.fill(delta, seed, self.s_image, self.s_phase, self.s_sample, self.s_zero, 0, float(self.sigma))
        # x_{t*} = (2 (x + delta) - 1) / sqrt(1 + 4 sigma^2), in float32 as the reference computes it.
        xp.multiply(self.scale, 2 * (xp.take(images, self.s_slot[:n], axis=0) + delta) - 1, out=start)
        self.labels[:n] = 0
        active = xp.arange(n)
        done = 0
        self.bad[...] = False
        for wave in self.waves:
            m = int(active.shape[0])
            rows = m * wave
            x, x_next, z = self.x[:rows], self.x_next[:rows], self.z[:rows]
            x[...] = xp.repeat(start[active], wave, axis=0)
            runs = xp.arange(done, done + wave, dtype=np.uint32)
            self.r_image[:rows] = xp.repeat(self.s_image[active], wave)
            self.r_phase[:rows] = xp.repeat(self.s_phase[active], wave)
            self.r_sample[:rows] = xp.repeat(self.s_sample[active], wave)
            self.r_draw[:rows] = xp.tile(1 + runs * np.uint32(calls), m)
            scalars = self.r_scalars[:rows]
            for s in range(calls):
                self.noise.fill(z, seed, self.r_image, self.r_phase, self.r_sample, self.r_draw, s, 1.0)
                scalars[...] = self.table[s]  # every row of a wave is at step s
                self.executor.step(x, z, scalars, x_next)
                x, x_next = x_next, x
            self.bad |= ~xp.isfinite(x).all()
            for c in range(0, rows, chunk):
                part = slice(c, min(rows, c + chunk))
                self.executor.classify(x[part], self.run_labels[part], self.logits[part])
            self.labels[active[:, None], xp.arange(done, done + wave)[None, :]] = self.run_labels[:rows].reshape(m, wave)
            unet += rows * calls
            classifier += rows
            done += wave
            if done == votes:
                self.voted[active] = majority_vote(self.labels[active, :done])
                self.runs[active] = done
                break
            still = undecided(self.labels[active, :done], votes)
            finished = active[~still]
            if finished.shape[0]:
                self.voted[finished] = majority_vote(self.labels[finished, :done])
                self.runs[finished] = done
            active = active[still]  # reads the undecided count: one small device -> host read per wave
            if active.shape[0] == 0:
                break
        return unet, classifier

    def classifier_limit(self) -> int:
        """The most rows one classifier call may hold: the executor's limit (TensorRT: its profile)
        or :attr:`CLASSIFIER_ROWS`, and the engine's (:mod:`densepure_rt.limits`)."""
        limit = self.executor.classifier_rows or self.CLASSIFIER_ROWS
        if self.classifier_rows is not None:
            limit = min(limit, int(self.classifier_rows))
        return max(int(limit), 1)

    # -- on host arrays ------------------------------------------------------------------------------
    def voted_labels_many(self, images: np.ndarray, slots, image_indices, phases, samples, seed: int, runs: bool = False):
        """Voted labels [n] int64 on the host of a batch whose sample i is sample ``samples[i]`` of
        phase ``phases[i]`` of image ``images[slots[i]]`` (index ``image_indices[i]``); ``images``
        [N x C x H x W] on the host. ``runs=True``: also the runs [n] int64 each sample took."""
        staged = self.device.stage(images)
        n = len(samples)
        with self.device.stream():
            voted = self.device.to_host(self._run(staged, slots, image_indices, phases, samples, seed)).astype(np.int64)
            return (voted, self.device.to_host(self.runs[:n])) if runs else voted

    def voted_labels(self, image: np.ndarray, seed: int, image_index: int, phase: int, samples: Sequence[int]) -> np.ndarray:
        """Voted labels [len(samples)] int64 of noisy samples ``samples`` of ``image`` [C x H x W] in [0, 1]."""
        n = len(samples)
        fill = np.zeros(n, dtype=np.int64)
        return self.voted_labels_many(image[None], fill, fill + image_index, fill + phase, np.asarray(samples, dtype=np.int64), seed)

    @property
    def calls(self) -> int:
        """UNet evaluations per run of the prepared schedule."""
        return self.rs.num_calls

    def purify(self, x_t: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """One reverse run (after :meth:`prepare`) from x_{t*} [N x C x H x W] with the draws ``noise``
        [calls x N x C x H x W], through the executor: x0_hat on the host (for tests and parity checks)."""
        assert self.rs is not None, "call prepare() first"
        xp = self.xp
        with self.device.stream():
            x = xp.array(np.asarray(x_t, dtype=np.float32), order="C", copy=True)  # the caller's array stays as it was
            out = xp.empty_like(x)
            scalars = xp.empty((x.shape[0], self.table.shape[1]), dtype=np.float32)
            for s in range(self.rs.num_calls):
                z = xp.asarray(np.ascontiguousarray(noise[s], dtype=np.float32))
                scalars[...] = self.table[s]
                self.executor.step(x, z, scalars, out)
                x, out = out, x
            return self.device.to_host(x)

    def classify(self, images: np.ndarray) -> np.ndarray:
        """Labels [N] int64 of purified images [N x C x H x W] in [-1, 1], through the executor."""
        xp, n = self.xp, len(images)
        with self.device.stream():
            x = xp.asarray(np.ascontiguousarray(images, dtype=np.float32))
            labels = xp.empty(n, dtype=np.int64)
            logits = xp.empty((n, self.num_classes), dtype=np.float32)
            self.executor.classify(x, labels, logits)
            return check_labels(self.device.to_host(labels), n, self.num_classes)


def check_labels(labels: np.ndarray, expected: int, num_classes: int) -> np.ndarray:
    """The classifier's labels as int64, or an :class:`EngineError` if they are not one integer in
    [0, num_classes) per image: a dropped or out-of-range label would shrink n and inflate the bound."""
    labels = np.asarray(labels)
    if labels.shape != (expected,) or labels.dtype.kind not in "iu":
        raise EngineError(
            f"the classifier returned labels of shape {labels.shape} and dtype {labels.dtype} for {expected} images: rebuild the engine"
        )
    if expected and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise EngineError(
            f"the classifier returned label {int(bad[0])}, outside the engine's {num_classes} classes: "
            "the engine's classifier does not match its manifest; rebuild the engine"
        )
    return labels.astype(np.int64, copy=False)


def classifier_chunk(limit: int, image_shape: Sequence[int], num_classes: int) -> int:
    """The most rows <= ``limit`` per classifier call such that chunk k's views of the loop's
    buffers (images float32, labels int64, logits float32 [classes]) start at a multiple of
    :data:`ALIGNMENT` bytes: the row counts after which each buffer is back on the alignment
    (256 / gcd(256, row bytes)), their least common multiple, and ``limit`` rounded down to it.
    A limit below that unit stays as it is (one chunk then covers all its rows, or an executor
    that checks alignment says so)."""
    unit = 1
    for row_bytes in (4 * int(np.prod(image_shape)), 8, 4 * int(num_classes)):
        unit = math.lcm(unit, ALIGNMENT // math.gcd(ALIGNMENT, row_bytes))
    limit = int(limit)
    return limit if limit < unit else limit - limit % unit
