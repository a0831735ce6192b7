"""The one list of backends: for each, its executor, the devices it runs on, the precisions it
builds, how to install it, and what ``build --backend`` says of it. The CLI's choices, the build's
checks and the runtime's refusals all read this table; adding a backend is one entry here plus its
executor module (and its build step under ``engine/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from densepure_rt.errors import EngineError, param

__all__ = ["Backend", "BACKENDS", "get_backend", "backend_precisions"]


def _onnxruntime(directory, manifest, dev, *, device, threads, cuda_graph, kernels, log):
    from densepure_rt.executors.onnxrt import OrtExecutor

    return OrtExecutor(directory, manifest, device, threads, stream=dev.cuda_stream, xp=dev.xp,
                       cuda_graph=cuda_graph and device == "cuda", log=log, kernels=kernels)


def _openvino(directory, manifest, dev, *, device, threads, cuda_graph, kernels, log):  # noqa: ARG001 - one signature for all
    from densepure_rt.executors.openvino import OpenVinoExecutor

    return OpenVinoExecutor(directory, manifest, threads)


def _tensorrt(directory, manifest, dev, *, device, threads, cuda_graph, kernels, log):  # noqa: ARG001 - one signature for all
    from densepure_rt.executors.tensorrt import TensorRTExecutor

    return TensorRTExecutor(directory, manifest, dev.cuda_stream, xp=dev.xp)


def _require_tensorrt() -> None:
    from densepure_rt.executors.tensorrt import require_tensorrt

    require_tensorrt()


@dataclass(frozen=True)
class Backend:
    """A runtime that runs engines: its name (the manifest's ``backend.name``), the devices its
    engines run on, the precisions ``build`` writes for it (the first is the default), its help."""

    name: str
    devices: tuple[str, ...]
    precisions: tuple[str, ...]
    summary: str
    #: Opens the executor: ``(directory, manifest, device_handle, *, device, threads, cuda_graph,
    #: kernels, log) -> Executor``.
    open_executor: Callable
    #: Checks that the runtime is installed (a one-line error with the install hint) before any
    #: device work; None where the executor's import says it.
    require: Callable[[], None] | None = None
    #: The one line for a device outside :attr:`devices`.
    wrong_device: str = ""

    def check_device(self, device: str) -> None:
        """Refuse, in one line, a device this backend's engines do not run on."""
        if device not in ("cpu", "cuda"):
            raise EngineError(f"{param('device')} must be cpu or cuda for the {self.name} backend (got {device!r})")
        if device not in self.devices:
            raise EngineError(self.wrong_device)


#: Every backend, by name. ONNX Runtime runs an fp32 or fp16 step graph (CPU, and CUDA with
#: onnxruntime-gpu); OpenVINO the fp32 graphs at an inference precision it is told explicitly (fp32,
#: or bf16 on CPUs that have it); TensorRT a strongly typed plan of the fp16 (or fp32) step graph.
BACKENDS: dict[str, Backend] = {
    "onnxruntime": Backend("onnxruntime", ("cpu", "cuda"), ("fp32", "fp16"), "CPU and CUDA", _onnxruntime),
    "openvino": Backend("openvino", ("cpu",), ("fp32", "bf16"), "CPU (pip install openvino)", _openvino,
                        wrong_device=f"OpenVINO engines run on the CPU ({param('device', 'cpu')}); for a GPU build with "
                                     "--backend onnxruntime"),
    "tensorrt": Backend("tensorrt", ("cuda",), ("fp16", "fp32"),
                        "plans for this machine's GPU (pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu13)", _tensorrt, require=_require_tensorrt,
                        wrong_device=f"this engine holds TensorRT plans, which run on a GPU: pass {param('device', 'cuda')}"),
}


def get_backend(name: str) -> Backend:
    """The backend called ``name``, or a one-line :class:`EngineError` listing those that exist."""
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):
        raise EngineError(f"backend {name!r} is not supported by this densepure-rt: rebuild the engine for "
                          f"{', '.join(BACKENDS)}") from None


def backend_precisions() -> dict[str, tuple[str, ...]]:
    """``{backend: precisions build writes for it}``."""
    return {name: backend.precisions for name, backend in BACKENDS.items()}
