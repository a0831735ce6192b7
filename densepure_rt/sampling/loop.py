"""What the scheduler runs the engine's graphs with, written once over an array module: numpy on
the CPU, CuPy on a GPU.

:class:`BatchLoop` holds the executor, the device and its noise source, and the prepared reverse
schedule of one (sigma, b, K): the per-step scalars uploaded once (``table`` [calls x S] float32),
the input scale and sigma. The one sampling path, :class:`densepure_rt.sampling.scheduler.Scheduler`,
runs over it; what a noisy sample computes there is:

    delta      = sigma * N(seed; image, phase, sample, draw 0)                  [per sample]
    x_{t*}     = input_scale * (2 (image + delta) - 1)                           [per sample]
    run k, step s: z = N(seed; image, phase, sample, draw 1 + k * calls + s)     [per row]
                   x = step(x, z, table[s])                                      (the engine's step graph)
    labels[k]  = classify(x after the last step); the vote reads the runs' labels (official tie rule)

Every number a sample gets is a pure function of (seed, image index, phase, sample, draw) (see
:mod:`densepure_rt.sampling.noise`), so the labels do not depend on the batch or on the other
samples of a call; on a GPU the noise equals the host's to float32 rounding (the kernel's
double-precision log/sin/cos may differ from glibc's in the last bit), so a rare vote can differ
between devices.

The executor runs the two graphs on buffers of the loop's array module (``step(x, noise, scalars,
out)`` and ``classify(images, labels, logits)``): :class:`densepure_rt.executors.onnxrt.OrtExecutor`
binds them with ONNX Runtime's IOBinding, on the CPU provider over numpy or on the CUDA provider
over CuPy. The noise source fills per-row buffers: :func:`densepure_rt.sampling.philox.row_normals`
on the host, the ``philox_rows`` CUDA kernel on a GPU (:mod:`densepure_rt.sampling.device`); the
same numbers to float32 rounding. :meth:`BatchLoop.purify` and :meth:`BatchLoop.classify` run the
graphs on host arrays (parity checks).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from densepure_rt.errors import EngineError
from densepure_rt.executors.base import Executor
from densepure_rt.schedule import ReverseSchedule

__all__ = ["NoiseSource", "BatchLoop", "check_labels", "NON_FINITE"]

#: The error when a purified image holds NaN or inf (a NaN image would still get some label).
NON_FINITE = (
    "the denoise step produced non-finite values (NaN or inf) in the purified images: the engine is "
    "broken or was built for other inputs; rebuild it (densepure-rt build --force)"
)


class NoiseSource(Protocol):
    def fill(self, out, seed: int, images, phases, samples, draws, offset: int, scale: float) -> None:
        """out[r] = scale * normals of (images[r], phases[r], samples[r], draws[r] + offset), float32."""


class BatchLoop:
    """The executor, device, noise and prepared reverse schedule the scheduler runs with (see module doc)."""

    #: Rows per classifier call at most: a ViT at thousands of rows needs gigabytes of attention
    #: scratch for no gain in speed.
    CLASSIFIER_ROWS = 512

    def __init__(self, executor: Executor, device, image_shape: Sequence[int], num_classes: int,
                 classifier_rows: int | None = None):
        #: The device (:mod:`densepure_rt.sampling.device`): array module, stream, noise, staging.
        self.device = device
        self.executor, self.noise, self.xp = executor, device.noise, device.xp
        #: The most rows one classifier call may hold (the engine's row limit of its classifier
        #: graph, :mod:`densepure_rt.limits`); None: :attr:`CLASSIFIER_ROWS` only.
        self.classifier_rows = classifier_rows
        self.image_shape = tuple(int(d) for d in image_shape)
        self.num_classes = int(num_classes)
        self.rs: ReverseSchedule | None = None
        #: Work done so far: UNet (step) and classifier evaluations, one per row each.
        self.unet_evals = 0
        self.classifier_evals = 0
        #: Of ``unet_evals``: those of samples never delivered to a test (started by the scheduler,
        #: then dropped when their test stopped).
        self.dropped_evals = 0

    # -- preparation ------------------------------------------------------------------------------
    def prepare(self, rs: ReverseSchedule, votes: int, batch: int, early_exit: bool = True) -> None:
        """Prepare (sigma, b, K): the schedule's per-step scalars uploaded on the device's stream
        (returns once the device is done with them), ``votes`` runs per noisy sample, calls of
        ``batch`` noisy samples x ``votes`` rows (the scheduler's slots), and ``early_exit``: a
        sample's runs stop once its vote is decided (:func:`densepure_rt.stats.vote.undecided`; the
        voted labels are those of all K runs with the same noise, only the work differs)."""
        if not np.all(np.isfinite(rs.scalars)):
            raise EngineError(f"the reverse schedule for sigma {rs.sigma}, steps {rs.steps} is not finite: choose fewer steps")
        self.rs, self.votes, self.batch, self.early_exit = rs, int(votes), int(batch), bool(early_exit)
        self.sigma = np.float32(rs.sigma)
        self.scale = np.float32(rs.input_scale)
        with self.device.stream():
            self.table = self.xp.asarray(np.ascontiguousarray(rs.scalars, dtype=np.float32))  # [calls x S]
        self.device.synchronize()

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

    def classifier_limit(self) -> int:
        """The most rows one classifier call may hold: the executor's limit (TensorRT: its profile)
        or :attr:`CLASSIFIER_ROWS`, and the engine's (:mod:`densepure_rt.limits`)."""
        limit = self.executor.classifier_rows or self.CLASSIFIER_ROWS
        if self.classifier_rows is not None:
            limit = min(limit, int(self.classifier_rows))
        return max(int(limit), 1)

    # -- on host arrays ------------------------------------------------------------------------------
    def voted_labels(self, image: np.ndarray, seed: int, image_index: int, phase: int, samples: Sequence[int]) -> np.ndarray:
        """Voted labels [len(samples)] int64 on the host of noisy samples ``samples`` (0, 1, ...,
        n-1) of ``image`` [C x H x W] float32 in [0, 1], through the scheduler (calls of batch x K
        rows, after :meth:`prepare`)."""
        from densepure_rt.sampling.scheduler import Job, Scheduler

        n = len(samples)
        if list(samples) != list(range(n)):
            raise ValueError("voted_labels takes the samples 0, 1, ..., n-1 of a phase")
        labels: list[np.ndarray] = []
        sch = Scheduler(self, self.batch * self.votes, early_exit=self.early_exit)
        staged = self.device.stage(np.asarray(image, dtype=np.float32)[None])
        sch.run(staged, [Job(0, int(image_index), int(phase), n)], int(seed), lambda job, got: labels.append(got) or True)
        return np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)

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
