"""TensorRT plans at run time: refusal of foreign plans and the batch loop's executor.

Written against the documented TensorRT 10.x / 11.x Python API (what has run on which hardware:
docs/backends.md; docs/design.md section 5 says why). What is checked, in CI
(``tests/test_tensorrt.py``): every TensorRT name used here exists in the pinned
``tensorrt-cu13-bindings`` wheel (its compiled module's strings); the refusal of foreign plans, the
report of TensorRT's own refusal and the executor's context and shape bookkeeping against a fake of
the few TensorRT objects used; the whole-batch graph's bookkeeping on numpy. The GPU tests (TensorRT
labels against ONNX Runtime's, graph replays against eager runs) run unchanged wherever
``import tensorrt`` works, and are skipped everywhere else.

- :func:`require_tensorrt`: the ``tensorrt`` module, or a one-line :class:`EngineError` saying how to
  install it.
- :func:`check_plans`: from the manifest alone, before anything is deserialized, refuses plans built
  by another TensorRT version or for another compute capability.
- :func:`open_plans`: that check, then each plan deserialized once; TensorRT's own refusal in one line.
- :class:`TensorRTExecutor`: the step and classifier plans on the loop's CuPy buffers, enqueued with
  ``execute_async_v3`` on the loop's CUDA stream.

Imported only for a TensorRT engine. Imports neither torch nor, at import time, tensorrt or CuPy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from densepure_rt.errors import EngineError
from densepure_rt.errors import first_line as _first_line
from typing import Mapping

from densepure_rt.files.manifest import Manifest, as_manifest, plan_path

__all__ = [
    "INSTALL_TENSORRT",
    "require_tensorrt",
    "device_properties",
    "make_logger",
    "check_plans",
    "open_plans",
    "TensorRTExecutor",
]

INSTALL_TENSORRT = "pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu13 (tensorrt-cu12 for CUDA 12)"

GRAPHS = ("step", "classifier")
#: Each plan's I/O tensors as the exporter declares them (export/onnx_export.py): name -> (is an
#: input, dtype). The step graph's fp16 arithmetic is inside: its inputs and outputs are float32.
PLAN_IO = {
    "step": {"x": (True, "float32"), "noise": (True, "float32"), "scalars": (True, "float32"), "x_next": (False, "float32")},
    "classifier": {"image": (True, "float32"), "labels": (False, "int64"), "logits": (False, "float32")},
}
#: The inputs whose first axis is the row (batch) axis of the optimization profile.
BATCHED_INPUTS = {"step": ("x", "noise", "scalars"), "classifier": ("image",)}



def require_tensorrt():
    """The ``tensorrt`` module, or an :class:`EngineError` saying how to install it (one line)."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        if exc.name == "tensorrt":
            detail = "TensorRT is not installed"
        else:  # the bindings are there but not their libraries (libnvinfer, libnvonnxparser)
            detail = f"TensorRT cannot be imported ({_first_line(exc)})"
        raise EngineError(f"{detail}; TensorRT engines need it: {INSTALL_TENSORRT}") from None
    except OSError as exc:  # Windows: a TensorRT DLL not found on PATH
        raise EngineError(f"TensorRT cannot be loaded ({_first_line(exc)}): {INSTALL_TENSORRT}") from None
    return trt


def device_properties(cupy) -> dict:
    """The current GPU as the manifest records it: name, compute capability ('9.0'), CUDA runtime
    version ('13.0'), read through CuPy."""
    cudart = cupy.cuda.runtime
    props = cudart.getDeviceProperties(cupy.cuda.Device().id)
    gpu = props["name"]
    version = int(cudart.runtimeGetVersion())
    return {
        "gpu": gpu.decode(errors="replace") if isinstance(gpu, bytes) else str(gpu),
        "compute_capability": f"{int(props['major'])}.{int(props['minor'])}",
        "cuda_version": f"{version // 1000}.{version % 1000 // 10}",
    }


def make_logger(trt, echo=None):
    """A ``trt.ILogger`` that keeps TensorRT's errors (for one-line messages) and hands its warnings
    to ``echo`` (a callable of one string) when one is given; other messages are dropped."""

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity == trt.ILogger.Severity.ERROR or severity == trt.ILogger.Severity.INTERNAL_ERROR:
                self.errors.append(str(msg))
            elif severity == trt.ILogger.Severity.WARNING and echo is not None:
                echo(f"TensorRT: {_first_line(str(msg))}")

        def last(self, since: int = 0) -> str:
            """The first line of the last error logged after the first ``since`` ones."""
            new = self.errors[since:]
            return _first_line(new[-1]) if new else "TensorRT logged no reason"

    return _Logger()


def _capability(text: str) -> tuple[int, int]:
    major, _, minor = str(text).partition(".")
    return int(major), int(minor or 0)


def check_plans(info: Mapping, version: str, compute_capability: str) -> None:
    """Refuse, in one sentence and before anything is deserialized, plans (``info``: the manifest's
    ``tensorrt`` section) that this TensorRT
    ``version`` on a GPU of ``compute_capability`` ('9.0') cannot run: built by another TensorRT
    version (a plan is tied to the exact version), or for another compute capability (with hardware
    compatibility ``ampere_plus``: any GPU of compute capability 8.0 or newer)."""
    rebuild = "rebuild the engine on this machine (densepure-rt build --backend tensorrt --force ...)"
    if info["version"] != version:
        raise EngineError(
            f"this engine's TensorRT plans were built by TensorRT {info['version']} but this machine runs TensorRT "
            f"{version}, which cannot load them: {rebuild}"
        )
    here = _capability(compute_capability)
    if info["hardware_compatibility"] == "ampere_plus":
        fits, wanted = here >= (8, 0), "8.0 or newer (hardware compatibility ampere_plus)"
    else:
        fits, wanted = here == _capability(info["compute_capability"]), info["compute_capability"]
    if not fits:
        raise EngineError(
            f"this engine's TensorRT plans were built for GPUs of compute capability {wanted} (on {info['gpu']}) "
            f"but this GPU has compute capability {compute_capability}: {rebuild}"
        )


def _dtype_name(trt, dtype) -> str:
    for name, value in (("float32", trt.float32), ("float16", trt.float16), ("int64", trt.int64), ("int32", trt.int32)):
        if dtype == value:
            return name
    return str(dtype)


def check_io(trt, engine: "trt.ICudaEngine", graph: str, path) -> None:
    """Refuse a deserialized plan whose I/O tensors are not the exporter's (:data:`PLAN_IO`)."""
    found = {}
    for i in range(int(engine.num_io_tensors)):
        name = str(engine.get_tensor_name(i))
        found[name] = (engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT, _dtype_name(trt, engine.get_tensor_dtype(name)))
    want = PLAN_IO[graph]
    if found != want:
        show = lambda io: ", ".join(f"{k} ({'in' if v[0] else 'out'}, {v[1]})" for k, v in sorted(io.items()))  # noqa: E731
        raise EngineError(f"the {graph} plan {path} has tensors {show(found)} where {show(want)} were expected: rebuild the engine")


def open_plans(directory, manifest: dict, trt, compute_capability: str, logger=None):
    """(runtime, {graph: engine}): :func:`check_plans`, then each plan of ``manifest['tensorrt']['plans']``
    deserialized once. A plan TensorRT refuses (corrupt, or for another GPU despite the manifest) is an
    :class:`EngineError` of one line holding TensorRT's own reason."""
    check_plans(as_manifest(manifest).tensorrt, str(trt.__version__), compute_capability)
    logger = make_logger(trt) if logger is None else logger
    runtime = trt.Runtime(logger)
    engines = {}
    for graph in GRAPHS:
        path = plan_path(directory, manifest, graph)  # a plain name listed, and checksummed, in files
        before = len(logger.errors)
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise EngineError(f"TensorRT refused the {graph} plan {path}: {logger.last(before)}; rebuild the engine on this machine")
        check_io(trt, engine, graph, path)
        engines[graph] = engine
    return runtime, engines


def _ptr(a) -> int:
    """The device address of a C-contiguous CuPy array (a numpy array's host address in the fakes)."""
    if not a.flags.c_contiguous:
        raise ValueError("TensorRT binds C-contiguous buffers only")
    data = a.data
    return int(data.ptr) if hasattr(data, "ptr") else int(a.ctypes.data)


#: TensorRT's rule for ``set_tensor_address``: "the pointer must have at least 256-byte alignment".
TENSOR_ALIGNMENT = 256


def _tensor_address(a, name: str, what: str) -> int:
    """The address to bind for tensor ``name`` of the ``what`` graph: refused in one line unless it is
    256-byte aligned (the scheduler's buffers are, and so are the views it binds)."""
    ptr = _ptr(a)
    if ptr % TENSOR_ALIGNMENT:
        raise EngineError(
            f"the buffer of {name} of the {what} graph starts at an address {ptr % TENSOR_ALIGNMENT} bytes past a "
            f"{TENSOR_ALIGNMENT}-byte boundary, which TensorRT does not accept: a bug of densepure-rt's loop, please "
            "report it (the onnxruntime backend has no such rule)"
        )
    return ptr


class TensorRTExecutor:
    """TensorRT over an engine's two plans, on the batch loop's CuPy buffers and CUDA stream.

    Each plan is deserialized once. A call binds the loop's buffers by address
    (``set_tensor_address``) and enqueues with ``execute_async_v3`` on the loop's stream, so the plans'
    kernels are ordered with the noise kernel and the vote without host waits.

    Execution contexts: one per plan for every shape (``set_input_shape`` whenever the rows change),
    and one per plan for each full batch's row count (:meth:`reserve`), whose shape is set once and
    never changes: a CUDA graph captured over those stays valid whatever shapes the shared contexts
    run in between. All contexts share one scratch buffer (user-managed device memory, the larger
    plan's need over its profile): they never run at the same time, being queued on one stream.
    """

    name = "tensorrt"
    #: TensorRT plans run without ONNX Runtime's CUDA graph.
    cuda_graph = False
    #: Step calls of one row count run on a reserved context whose shape is set once (TensorRT: a
    #: shape change costs a re-setup of the context before its next enqueue).
    fixed_rows = True

    def __init__(self, directory: str | Path, manifest: Manifest, stream, xp, trt=None, compute_capability: str | None = None):
        manifest = as_manifest(manifest)
        trt = require_tensorrt() if trt is None else trt
        if compute_capability is None:
            compute_capability = device_properties(xp)["compute_capability"]
        self._trt = trt
        self._logger = make_logger(trt)
        self._runtime, self._engines = open_plans(directory, manifest, trt, compute_capability, self._logger)
        self.xp, self._stream = xp, stream
        profile = manifest.tensorrt["profile"]
        self.min_rows, self.max_rows = int(profile["min"]), int(profile["max"])
        #: The scheduler classifies in chunks of up to this many rows (the profile's maximum).
        self.classifier_rows = self.max_rows
        size = max(int(self._engines[graph].device_memory_size_v2) for graph in GRAPHS)
        self._scratch = xp.empty(max(size, 1), dtype=np.uint8)
        self._contexts: dict = {}  # (graph, reserved rows or None) -> execution context
        self._rows: dict = {}  # the same keys -> rows its batched inputs were last given (None: not yet)
        self._reserved: set[int] = set()
        self.version = str(trt.__version__)
        self.device = "cuda"
        self.providers = {graph: [f"TensorRT {self.version}"] for graph in GRAPHS}
        #: The arithmetic of the step plan: the fp16 ONNX graph's own types (a strongly typed network).
        self.effective_precision = manifest.step_precision

    def _check_rows(self, rows: int, what: str) -> None:
        if not self.min_rows <= rows <= self.max_rows:
            raise EngineError(
                f"the {what} got {rows} rows but this engine's TensorRT plans take {self.min_rows} to {self.max_rows} "
                f"rows (noisy samples x K): use a smaller --batch, or rebuild the engine with --max-batch {rows} or more"
            )

    def reserve(self, rows: int, image_shape) -> None:
        """Full batches of ``rows`` rows run on execution contexts of their own (see the class doc)."""
        self._check_rows(int(rows), "full batch")
        self._reserved.add(int(rows))

    def _context(self, key):
        if key not in self._contexts:
            engine = self._engines[key[0]]
            context = engine.create_execution_context(self._trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if context is None:
                raise EngineError(f"TensorRT could not create an execution context for the {key[0]} plan: {self._logger.last()}")
            context.set_device_memory(_ptr(self._scratch), int(self._scratch.nbytes))
            self._contexts[key] = context
            self._rows[key] = None
        return self._contexts[key]

    def _run(self, graph: str, inputs, outputs, what: str) -> None:
        rows = int(inputs[0][1].shape[0])
        self._check_rows(rows, f"{what} graph")
        key = (graph, rows if rows in self._reserved else None)
        context = self._context(key)
        if self._rows[key] != rows:
            # A shape change. TensorRT's first enqueue after one must run eagerly, never inside a CUDA
            # graph capture: a reserved context's shape is set here once, in the whole-batch graph's
            # warm-up, before its capture.
            for name, a in inputs:
                if name in BATCHED_INPUTS[graph] and not context.set_input_shape(name, tuple(int(d) for d in a.shape)):
                    raise EngineError(f"TensorRT refused shape {tuple(a.shape)} for {name} of the {what} graph: {self._logger.last()}")
            self._rows[key] = rows
        for name, a in (*inputs, *outputs):
            if not context.set_tensor_address(name, _tensor_address(a, name, what)):
                raise EngineError(f"TensorRT refused the buffer of {name} of the {what} graph: {self._logger.last()}")
        if not context.execute_async_v3(int(self._stream.ptr)):
            raise EngineError(f"TensorRT failed running the {what} graph: {self._logger.last()}")

    # -- the executor interface (densepure_rt.sampling.loop.Executor) ----------------------------------------
    def step(self, x, noise, scalars, out) -> None:
        self._run("step", (("x", x), ("noise", noise), ("scalars", scalars)), (("x_next", out),), "denoise-step")

    def classify(self, images, labels, logits) -> None:
        self._run("classifier", (("image", images),), (("labels", labels), ("logits", logits)), "classifier")

    def close(self) -> None:
        # Contexts before their engines, engines before the runtime, the scratch they use last.
        self._contexts = {}
        self._engines = {}
        self._runtime = None
        self._scratch = None
