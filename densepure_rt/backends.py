"""Execution backends: run b reverse steps x K runs, the classifier and the vote for a batch.

A backend owns its buffers and its noise. The runtime hands it the frozen reverse schedule once per
(sigma, b) (:meth:`Backend.prepare`) and then asks only for voted labels of batches of noisy
samples (:meth:`Backend.voted_labels`): nothing inside that call needs a host value between steps,
so a GPU backend can capture the whole loop (steps, classifier, argmax, vote) in one CUDA graph and
replay it per batch.

:class:`OnnxRuntimeBackend` runs the engine's ONNX graphs with ONNX Runtime: the CPU provider, or the
CUDA provider where onnxruntime-gpu is installed and ``device="cuda"`` is asked for. Its noise comes
from :mod:`densepure_rt.sampling.noise` on the host (the same numbers as the PyTorch reference gets).
"""

from __future__ import annotations

import abc
import sys
from contextlib import nullcontext as _nullcontext
from pathlib import Path
from typing import Sequence

import numpy as np

from densepure_rt.errors import EngineError
from densepure_rt.files.manifest import check_graph_io, graph_path
from densepure_rt.sampling.noise import sample_noise
from densepure_rt.schedule import ReverseSchedule
from densepure_rt.stats.vote import majority_vote, undecided, vote_waves

__all__ = ["Backend", "OnnxRuntimeBackend", "LoopBackend", "open_backend", "check_finite", "check_labels"]


class Backend(abc.ABC):
    """What the runtime needs from an execution backend."""

    name: str = "abstract"

    #: Work done so far: UNet (denoise-step) and classifier evaluations, one per row each.
    unet_evals: int = 0
    classifier_evals: int = 0

    @abc.abstractmethod
    def prepare(self, rs: ReverseSchedule, votes: int, batch: int, early_exit: bool = True) -> None:
        """Upload the per-step scalars of ``rs`` and size the buffers for ``batch`` samples x ``votes`` runs.

        ``early_exit``: run the K runs in waves (:func:`densepure_rt.stats.vote.vote_waves`) and stop a
        sample's runs once its vote is decided (:func:`densepure_rt.stats.vote.undecided`). The voted
        labels are identical to the full vote with the same noise; only the work differs.
        """

    @abc.abstractmethod
    def voted_labels(self, image: np.ndarray, seed: int, image_index: int, phase: int, samples: Sequence[int]) -> np.ndarray:
        """Voted labels [len(samples)] int64 of noisy samples ``samples`` of ``image`` [C x H x W] in [0, 1]."""

    @abc.abstractmethod
    def purify(self, x_t: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """One reverse run from x_{t*} [N x C x H x W] with draws ``noise`` [calls x N x C x H x W] -> x0_hat."""

    @abc.abstractmethod
    def classify(self, images: np.ndarray) -> np.ndarray:
        """Labels [N] int64 of purified images [N x C x H x W] in [-1, 1]."""

    def close(self) -> None:
        """Free the backend's resources."""


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime over the engine's ``step.onnx`` and ``classifier.onnx``."""

    name = "onnxruntime"

    def __init__(self, directory: str | Path, manifest: dict, device: str = "cpu", threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:  # pragma: no cover - onnxruntime is a dependency
            raise EngineError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from None
        available = ort.get_available_providers()
        if device == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise EngineError(
                    "--device cuda needs onnxruntime-gpu (the installed onnxruntime only has "
                    f"{', '.join(available)}): pip install onnxruntime-gpu, or use --device cpu"
                )
            providers = [("CUDAExecutionProvider", {}), "CPUExecutionProvider"]
        elif device == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise EngineError(f"--device must be cpu or cuda for the onnxruntime backend (got {device!r})")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
        directory = Path(directory)
        # Only plain file names listed (and, via load_manifest, checksummed) in manifest["files"].
        step_file, cls_file = graph_path(directory, manifest, "step"), graph_path(directory, manifest, "classifier")
        try:
            self._step = ort.InferenceSession(str(step_file), options, providers=providers)
            self._cls = ort.InferenceSession(str(cls_file), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(f"onnxruntime could not load the engine in {directory}: {str(exc).splitlines()[0][:200]}") from None
        for graph, session in (("step", self._step), ("classifier", self._cls)):
            check_graph_io(directory, graph, [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
        self.version = ort.__version__
        self.device = device
        self.image_shape = tuple(manifest["image_shape"])
        self.num_classes = int(manifest["num_classes"])
        self._rs: ReverseSchedule | None = None

    def prepare(self, rs: ReverseSchedule, votes: int, batch: int, early_exit: bool = True) -> None:
        if not np.all(np.isfinite(rs.scalars)):
            raise EngineError(f"the reverse schedule for sigma {rs.sigma}, steps {rs.steps} is not finite: choose fewer steps")
        self._rs = rs
        self._votes = int(votes)
        self._waves = vote_waves(votes) if early_exit else (int(votes),)
        self._scalars = [np.ascontiguousarray(row, dtype=np.float32) for row in rs.scalars]
        self._scale = np.float32(rs.input_scale)

    def purify(self, x_t: np.ndarray, noise: np.ndarray) -> np.ndarray:
        assert self._rs is not None, "call prepare() first"
        x = np.ascontiguousarray(x_t, dtype=np.float32)
        # On the CPU provider host memory is the device. With the CUDA provider each run() copies x
        # to the GPU and back per step; IOBinding with device-resident OrtValues would remove that
        # round trip, but it has not been written because it cannot be tested without a GPU.
        for s, row in enumerate(self._scalars):
            x = self._step.run(["x_next"], {"x": x, "noise": noise[s], "scalars": row})[0]
        return x

    def classify(self, images: np.ndarray) -> np.ndarray:
        labels = self._cls.run(["labels"], {"image": np.ascontiguousarray(images, dtype=np.float32)})[0]
        return check_labels(labels, len(images), self.num_classes)

    def voted_labels(self, image: np.ndarray, seed: int, image_index: int, phase: int, samples: Sequence[int]) -> np.ndarray:
        assert self._rs is not None, "call prepare() first"
        rs, votes, n = self._rs, self._votes, len(samples)
        delta, z = sample_noise(seed, image_index, phase, samples, votes, rs.num_calls, self.image_shape, rs.sigma)
        # x_{t*} = (2 (x + delta) - 1) / sqrt(1 + 4 sigma^2); row b*K + k of z is run k of sample b.
        start = self._scale * (2 * (image[None] + delta) - 1)
        labels = np.empty((n, votes), dtype=np.int64)
        voted = np.empty(n, dtype=np.int64)
        active, done = np.arange(n), 0
        for wave in self._waves:  # one wave of K runs, or ceil(K/2) runs then one run per wave
            runs = np.arange(done, done + wave)
            rows = (active[:, None] * votes + runs[None, :]).reshape(-1)
            purified = self.purify(np.repeat(start[active], wave, axis=0), z[:, rows])
            check_finite(purified)
            labels[active[:, None], runs[None, :]] = self.classify(purified).reshape(len(active), wave)
            self.unet_evals += len(rows) * rs.num_calls
            self.classifier_evals += len(rows)
            done += wave
            still = undecided(labels[active, :done], votes)
            finished = active[~still]
            voted[finished] = majority_vote(labels[finished, :done])
            active = active[still]
            if active.size == 0:
                break
        return voted

    def close(self) -> None:
        self._step = self._cls = None  # type: ignore[assignment]


class LoopBackend(Backend):
    """The batch loop (:class:`densepure_rt.sampling.loop.BatchLoop`) over an :class:`densepure_rt.executors.onnxrt.OrtExecutor`.

    ``device="cpu"``: numpy buffers, the host Philox noise, ONNX Runtime's CPU provider through
    IOBinding. ``device="cuda"``: CuPy buffers on one CUDA stream, the Philox CUDA kernel, ONNX
    Runtime's CUDA provider on that stream; images staged through pinned memory. Same labels as
    :class:`OnnxRuntimeBackend` for the same noise (tests), and batches may mix images
    (:meth:`voted_labels_many`). ``runtime="tensorrt"`` (GPU only): the same CuPy loop over
    :class:`densepure_rt.executors.tensorrt.TensorRTExecutor`, full batches without early exit captured whole
    in a CUDA graph (``cuda_graph``); written against the documented API, not run by this project.
    """

    name = "onnxruntime"

    def __init__(self, directory: str | Path, manifest: dict, device: str = "cpu", threads: int | None = None,
                 cuda_graph: bool = True, runtime: str = "onnxruntime"):
        from densepure_rt.executors.onnxrt import OrtExecutor
        from densepure_rt.executors.openvino import OpenVinoExecutor
        from densepure_rt.sampling.loop import BatchLoop, HostNoise

        self.name = runtime
        self.device = device
        self.image_shape = tuple(manifest["image_shape"])
        self.num_classes = int(manifest["num_classes"])
        self._ctx = None
        graphs = None
        if runtime == "tensorrt":  # issue 13: written against the documented API, not run by this project
            if device != "cuda":
                raise EngineError("this engine holds TensorRT plans, which run on a GPU: pass --device cuda (device='cuda')")
            from densepure_rt.sampling.device import CudaContext, CupyNoise, require_cupy
            from densepure_rt.executors.tensorrt import TensorRTExecutor, require_tensorrt
            from densepure_rt.sampling.device import WholeBatchGraphs

            require_tensorrt()  # its one-line install hint before any CUDA work
            cupy = require_cupy()
            self._ctx = CudaContext(cupy)
            xp, noise = cupy, CupyNoise(cupy, self._ctx.stream)
            self._executor = TensorRTExecutor(directory, manifest, self._ctx.stream, xp=cupy)
            graphs = WholeBatchGraphs(cupy, self._ctx.stream, log=_warn) if cuda_graph else None
        elif runtime == "openvino":
            if device != "cpu":
                raise EngineError("OpenVINO engines run on the CPU (--device cpu); for a GPU build with --backend onnxruntime")
            xp, noise = np, HostNoise()
            self._executor = OpenVinoExecutor(directory, manifest, threads)
        elif device == "cuda":
            from densepure_rt.sampling.device import CudaContext, CupyNoise, require_cupy

            cupy = require_cupy()
            self._ctx = CudaContext(cupy)
            xp, noise = cupy, CupyNoise(cupy, self._ctx.stream)
            self._executor = OrtExecutor(directory, manifest, device, threads, stream=self._ctx.stream, xp=cupy,
                                         cuda_graph=cuda_graph, log=_warn)
        elif device == "cpu":
            xp, noise = np, HostNoise()
            self._executor = OrtExecutor(directory, manifest, device, threads, xp=np)
        else:
            raise EngineError(f"--device must be cpu or cuda for the onnxruntime backend (got {device!r})")
        self.xp = xp
        self.version = self._executor.version
        #: The arithmetic the graphs run in: the engine's precision, as the executor compiled it.
        self.effective_precision = getattr(self._executor, "effective_precision", manifest["precision"]["step"])
        from densepure_rt.limits import rows_per_call

        self.loop = BatchLoop(self._executor, noise, self.image_shape, self.num_classes, xp=xp, graphs=graphs,
                              classifier_rows=rows_per_call(manifest)[1])

    @property
    def unet_evals(self) -> int:  # type: ignore[override]
        return self.loop.unet_evals

    @property
    def classifier_evals(self) -> int:  # type: ignore[override]
        return self.loop.classifier_evals

    def prepare(self, rs: ReverseSchedule, votes: int, batch: int, early_exit: bool = True) -> None:
        if self._ctx is not None:
            with self._ctx.stream:
                self.loop.prepare(rs, votes, batch, early_exit)
            self._ctx.synchronize()
        else:
            self.loop.prepare(rs, votes, batch, early_exit)

    def _images(self, images: np.ndarray):
        return self._ctx.stage(images) if self._ctx is not None else np.ascontiguousarray(images, dtype=np.float32)

    def voted_labels_many(self, images: np.ndarray, slots, image_indices, phases, samples, seed: int, runs: bool = False):
        """Voted labels [n] int64 of a batch whose sample i is sample ``samples[i]`` of phase
        ``phases[i]`` of image ``images[slots[i]]`` (index ``image_indices[i]``); ``images`` [N x C x H x W].
        ``runs=True``: also the runs [n] int64 each sample took (its UNet evaluations / calls)."""
        staged = self._images(images)
        n = len(samples)
        if self._ctx is None:
            voted = np.array(self.loop.run(staged, slots, image_indices, phases, samples, seed), dtype=np.int64)
            return (voted, self.loop.runs[:n].copy()) if runs else voted
        with self._ctx.stream:
            voted = self.loop.run(staged, slots, image_indices, phases, samples, seed)
            voted = self.xp.asnumpy(voted, stream=self._ctx.stream, blocking=True).astype(np.int64)
            if runs:
                return voted, self.xp.asnumpy(self.loop.runs[:n], stream=self._ctx.stream, blocking=True)
            return voted

    @property
    def calls(self) -> int:
        """UNet evaluations per run of the prepared schedule."""
        return self.loop.rs.num_calls

    def voted_labels(self, image: np.ndarray, seed: int, image_index: int, phase: int, samples: Sequence[int]) -> np.ndarray:
        n = len(samples)
        fill = np.zeros(n, dtype=np.int64)
        return self.voted_labels_many(image[None], fill, fill + image_index, fill + phase, np.asarray(samples, dtype=np.int64), seed)

    def _host(self, a) -> np.ndarray:
        if self._ctx is None:
            return np.array(a)
        return self.xp.asnumpy(a, stream=self._ctx.stream, blocking=True)

    def purify(self, x_t: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """One reverse run (after :meth:`prepare`), through the loop's executor: x0_hat on the host."""
        rs, xp = self.loop.rs, self.xp
        assert rs is not None, "call prepare() first"
        with (self._ctx.stream if self._ctx is not None else _nullcontext()):
            x = xp.array(np.asarray(x_t, dtype=np.float32), order="C", copy=True)  # the caller's array stays as it was
            out = xp.empty_like(x)
            for s in range(rs.num_calls):
                z = xp.asarray(np.ascontiguousarray(noise[s], dtype=np.float32))
                self._executor.step(x, z, self.loop.table[s], out)
                x, out = out, x
            return self._host(x)

    def classify(self, images: np.ndarray) -> np.ndarray:
        """Labels [N] int64 of purified images, through the loop's executor."""
        xp, n = self.xp, len(images)
        with (self._ctx.stream if self._ctx is not None else _nullcontext()):
            x = xp.asarray(np.ascontiguousarray(images, dtype=np.float32))
            labels = xp.empty(n, dtype=np.int64)
            logits = xp.empty((n, self.num_classes), dtype=np.float32)
            self._executor.classify(x, labels, logits)
            return check_labels(self._host(labels), n, self.num_classes)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.close()
            self._executor = None  # type: ignore[assignment]


def _warn(message: str) -> None:
    print(f"densepure-rt: {message}", file=sys.stderr)


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


def check_finite(purified: np.ndarray) -> None:
    """Refuse to classify a non-finite purified image: the classifier would answer some class
    (argmax of NaN logits) and CERTIFY would certify it. Such an image comes from a broken engine."""
    if not np.all(np.isfinite(purified)):
        raise EngineError(
            "the denoise step produced non-finite values (NaN or inf) in the purified images: the engine is "
            "broken or was built for other inputs; rebuild it (densepure-rt build --force)"
        )


def open_backend(
    name: str,
    directory: str | Path,
    manifest: dict,
    device: str = "cpu",
    threads: int | None = None,
    loop: bool = True,
    cuda_graph: bool = True,
) -> Backend:
    """The backend ``name`` for an engine directory; refuses one the manifest was not built for.

    ``loop=False``: the plain step-by-step ONNX Runtime path (:class:`OnnxRuntimeBackend`, the
    reference the batch loop is tested against) instead of :class:`LoopBackend`."""
    built = manifest["backend"]["name"]
    if name in ("auto", built):
        name = built
    else:
        raise EngineError(f"this engine was built for the {built} backend, not {name}: rebuild it with --backend {name}")
    if name == "openvino":
        return LoopBackend(directory, manifest, device=device, threads=threads, runtime="openvino")
    if name == "tensorrt":  # the batch loop only (loop=False is ONNX Runtime's step-by-step reference)
        return LoopBackend(directory, manifest, device=device, threads=threads, cuda_graph=cuda_graph, runtime="tensorrt")
    if name == "onnxruntime":
        if loop:
            return LoopBackend(directory, manifest, device=device, threads=threads, cuda_graph=cuda_graph)
        return OnnxRuntimeBackend(directory, manifest, device=device, threads=threads)
    raise EngineError(f"backend {name!r} is not supported by this densepure-rt: rebuild the engine for onnxruntime, openvino or tensorrt")
