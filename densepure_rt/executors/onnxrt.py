"""ONNX Runtime: run an engine's step and classifier graphs on the batch loop's buffers.

:class:`OrtExecutor` binds the loop's arrays with ONNX Runtime's IOBinding: with the CPU provider
over numpy arrays (the path CI runs), with the CUDA provider over CuPy arrays (device pointers bound
directly, nothing copied to the host). On the GPU ONNX Runtime runs on the loop's CUDA stream
(``user_compute_stream``), so its kernels and the loop's CuPy kernels are ordered on one stream
without host waits, and the run does not synchronise at its end
(``disable_synchronize_execution_providers``).

The CUDA path was written on a machine without a GPU; what of it ran on a lent H100 is recorded in
docs/backends.md's status table and in ``benchmarks/results/``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from densepure_rt.errors import EngineError
from densepure_rt.errors import first_line as _first_line
from densepure_rt.files.manifest import Manifest, as_manifest, check_graph_io, graph_path

__all__ = ["OrtExecutor", "ort_providers"]



def ort_providers(
    device: str, stream_ptr: int | None = None, device_id: int = 0, cuda_graph: bool = False, tf32: bool = True
) -> list:
    """ONNX Runtime providers for ``device`` (cpu or cuda), or an :class:`EngineError` saying what to install."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device != "cuda":
        raise EngineError(f"--device must be cpu or cuda for the onnxruntime backend (got {device!r})")
    if "CUDAExecutionProvider" not in available:
        raise EngineError(
            "--device cuda needs onnxruntime-gpu (the installed onnxruntime only has "
            f"{', '.join(available)}): pip install onnxruntime-gpu, or use --device cpu"
        )
    # Arenas grow by what is asked, not to the next power of two: the step and the classifier
    # sessions each keep their own, and doubling both can exhaust the card at large batches.
    options = {"device_id": str(device_id), "arena_extend_strategy": "kSameAsRequested", "use_tf32": "1" if tf32 else "0"}
    if os.environ.get("DENSEPURE_ORT_PREFER_NHWC") == "1":  # an experiment of benchmarks/runtime_bench.py
        options["prefer_nhwc"] = "1"
    # cuDNN's convolution algorithm search (an experiment of benchmarks/runtime_bench.py
    # --cudnn-search): ONNX Runtime's default, EXHAUSTIVE, benchmarks every algorithm once per new
    # input shape; with fixed call shapes (the scheduler) that is once per shape, HEURISTIC never.
    search = os.environ.get("DENSEPURE_ORT_CUDNN_SEARCH")
    if search:
        if search not in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
            raise EngineError(f"DENSEPURE_ORT_CUDNN_SEARCH must be EXHAUSTIVE, HEURISTIC or DEFAULT (got {search!r})")
        options["cudnn_conv_algo_search"] = search
    if stream_ptr is not None:
        options["user_compute_stream"] = str(int(stream_ptr))
        options["has_user_compute_stream"] = "1"
    if cuda_graph:
        options["enable_cuda_graph"] = "1"
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


class OrtExecutor:
    """ONNX Runtime over an engine's ``step.onnx`` and ``classifier.onnx``, bound with IOBinding.

    ``xp`` is numpy for ``device="cpu"`` and CuPy for ``device="cuda"``; the arrays handed to
    :meth:`step` and :meth:`classify` must be C-contiguous arrays of that module.
    """

    name = "onnxruntime"
    #: No limit of its own: the engine's row limit applies (:mod:`densepure_rt.limits`).
    classifier_rows = None

    def __init__(self, directory: str | Path, manifest: Manifest, device: str = "cpu", threads: int | None = None,
                 stream=None, xp=np, cuda_graph: bool = False, log=None, kernels: str = "portable"):
        try:
            import onnxruntime as ort
        except ImportError:  # pragma: no cover - onnxruntime is a dependency
            raise EngineError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from None
        manifest = as_manifest(manifest)
        self.xp, self.device = xp, device
        self.device_id = 0
        stream_ptr = None
        if device == "cuda":
            # onnxruntime-gpu >= 1.21 can load the CUDA libraries of pip's nvidia-* packages itself.
            preload = getattr(ort, "preload_dlls", None)
            if preload is not None:
                try:
                    preload()
                except Exception:  # noqa: BLE001 - the libraries may be found the usual way instead
                    pass
            self.device_id = int(xp.cuda.Device().id)
            stream_ptr = int(stream.ptr) if stream is not None else None
        # An fp32 engine is asked for fp32 arithmetic: no TF32 (10-bit mantissa) convolutions or matmuls.
        tf32 = manifest.step_precision != "fp32"
        providers = ort_providers(device, stream_ptr, self.device_id, tf32=tf32)
        graph_providers = ort_providers(device, stream_ptr, self.device_id, cuda_graph=True, tf32=tf32) if cuda_graph else None
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
        directory = Path(directory)
        # kernels "fused": the GPU graphs of `build --device cuda` (refused on the CPU by arguments.check_kernels).
        step_file, cls_file = graph_path(directory, manifest, "step", kernels), graph_path(directory, manifest, "classifier", kernels)
        self.kernels = kernels
        #: Why ONNX Runtime's CUDA graph is not used (None when it is, or was not asked for).
        self.cuda_graph_off: str | None = None if cuda_graph else "not asked for"
        self._step = None
        if graph_providers is not None:
            # ONNX Runtime refuses the CUDA graph unless every node of the graph is on the CUDA provider.
            try:
                self._step = ort.InferenceSession(str(step_file), options, providers=graph_providers)
            except Exception as exc:  # noqa: BLE001
                self.cuda_graph_off = f"onnxruntime refused it for the step graph: {_first_line(exc)}"
                if log is not None:
                    log(f"ONNX Runtime CUDA graph off: {self.cuda_graph_off}")
        try:
            if self._step is None:
                self._step = ort.InferenceSession(str(step_file), options, providers=providers)
            self._cls = ort.InferenceSession(str(cls_file), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(f"onnxruntime could not load the engine in {directory}: {_first_line(exc)}") from None
        for graph, session in (("step", self._step), ("classifier", self._cls)):
            check_graph_io(directory, graph, [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
        self.cuda_graph = graph_providers is not None and self.cuda_graph_off is None
        #: One captured graph per full-batch row count: rows -> (x, noise, scalars, out buffers,
        #: IOBinding, RunOptions with its own gpu_graph_id). A captured graph replays at the addresses
        #: and shapes it saw, so its buffers are kept for the executor's life and never rebound.
        self._graphs: dict[int, tuple] = {}
        self.providers = {"step": self._step.get_providers(), "classifier": self._cls.get_providers()}
        self.version = ort.__version__
        self.effective_precision = manifest.step_precision
        self._ort = ort
        self._run_options = self._options(-1 if self.cuda_graph else None)
        self._io_step = self._step.io_binding()
        self._io_cls = self._cls.io_binding()
        self._ort_device = "cuda" if device == "cuda" else "cpu"

    @property
    def fixed_rows(self) -> bool:
        """One row count per step call where ONNX Runtime replays a CUDA graph (captured per shape)."""
        return bool(self.cuda_graph)

    # -- binding -------------------------------------------------------------------------------------
    def _ptr(self, a) -> int:
        if not a.flags.c_contiguous:
            raise ValueError("IOBinding needs C-contiguous buffers")
        return int(a.ctypes.data) if self.xp is np else int(a.data.ptr)

    def _bind_in(self, io, name: str, a) -> None:
        io.bind_input(name, self._ort_device, self.device_id, a.dtype.type, list(a.shape), self._ptr(a))

    def _bind_out(self, io, name: str, a) -> None:
        io.bind_output(name, self._ort_device, self.device_id, a.dtype.type, list(a.shape), self._ptr(a))

    def _run(self, session, io, what: str, options=None) -> None:
        try:
            session.run_with_iobinding(io, self._run_options if options is None else options)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
            raise EngineError(f"onnxruntime failed running the {what} graph: {_first_line(exc)}") from None

    # -- the executor interface ------------------------------------------------------------------------
    def _options(self, graph_id: int | None):
        ro = self._ort.RunOptions()
        if self.device == "cuda":
            # The loop's next kernels are queued on the same stream: no host wait at the end of a run.
            ro.add_run_config_entry("disable_synchronize_execution_providers", "1")
            if graph_id is not None:  # -1: run without a graph (shapes other than a full batch)
                ro.add_run_config_entry("gpu_graph_id", str(graph_id))
        return ro

    def reserve(self, rows: int, image_shape) -> None:
        """Fixed buffers for ONNX Runtime's CUDA graph: the step of a full batch of ``rows`` rows runs
        on them, always at the same addresses, so the graph captured at its first run is replayed.
        Each row count gets its own graph id and buffers, kept for the executor's life."""
        if not self.cuda_graph or rows in self._graphs:
            return
        xp = self.xp
        gx = xp.empty((rows, *image_shape), dtype=np.float32)
        gz, gout = xp.empty_like(gx), xp.empty_like(gx)
        gscal = xp.empty((rows, self._scalar_count()), dtype=np.float32)
        io = self._step.io_binding()
        self._bind_in(io, "x", gx)
        self._bind_in(io, "noise", gz)
        self._bind_in(io, "scalars", gscal)
        self._bind_out(io, "x_next", gout)
        self._graphs[rows] = (gx, gz, gscal, gout, io, self._options(len(self._graphs)))  # ids 0, 1, ...; -1: none

    def _scalar_count(self) -> int:
        shape = self._step.get_inputs()[[i.name for i in self._step.get_inputs()].index("scalars")].shape
        return int(shape[-1])  # [rows x S]

    def step(self, x, noise, scalars, out) -> None:
        graph = self._graphs.get(x.shape[0])
        if graph is not None:
            gx, gz, gscal, gout, io, options = graph
            gx[...] = x  # device-to-device copies in and out: microseconds beside a UNet call
            gz[...] = noise
            gscal[...] = scalars
            self._run(self._step, io, "denoise-step", options)
            out[...] = gout
            return
        io = self._io_step
        self._bind_in(io, "x", x)
        self._bind_in(io, "noise", noise)
        self._bind_in(io, "scalars", scalars)
        self._bind_out(io, "x_next", out)
        self._run(self._step, io, "denoise-step")

    def classify(self, images, labels, logits) -> None:
        io = self._io_cls
        self._bind_in(io, "image", images)
        self._bind_out(io, "labels", labels)
        self._bind_out(io, "logits", logits)
        self._run(self._cls, io, "classifier")

    def close(self) -> None:
        self._step = self._cls = self._io_step = self._io_cls = None  # type: ignore[assignment]
