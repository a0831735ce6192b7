"""Checks of the arguments the Python API's sampling entry points share, in one place: the seed
(also :class:`densepure_rt.spec.RunSpec`'s), image indices, the engine being open, the images staged
at once, and the graph set."""

from __future__ import annotations

import functools
import inspect

import numpy as np

from densepure_rt.errors import ConfigError, EngineError, param
from densepure_rt.files.manifest import KERNELS, Manifest, graph_path

__all__ = ["sampling", "check_seed", "check_staging", "check_kernels"]


def check_seed(seed) -> None:
    """Refuse a noise seed that is not an integer from 0 to 2^32 - 1 (the Philox key is 32 bits)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= 2**32 - 1:
        raise ConfigError(f"{param('seed')} must be an integer from 0 to 2^32 - 1 (got {seed!r})")


def _check_image_index(index) -> None:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= int(index) <= 2**32 - 1:
        raise ConfigError(f"{param('image_index')} must be an integer from 0 to 2^32 - 1 (got {index!r})")


#: Checks of the arguments every sampling entry point shares, by name (one place for all of them).
_ARGUMENT_CHECKS = {"seed": check_seed, "image_index": _check_image_index}


def sampling(method):
    """An :class:`Engine` entry point that samples: refused on a closed engine or one opened with
    ``metadata_only``, its shared arguments (seed, image indices) checked first, and ``batch=None``
    (the default) made the engine's own default batch, as on the command line."""
    signature = inspect.signature(method)

    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        if self._closed:
            raise EngineError(f"the engine {self.directory} is closed: open it again (open_engine) to run it")
        if self.loop is None:
            raise EngineError(f"the engine {self.directory} was opened with metadata_only=True, which cannot sample: "
                              "open it without metadata_only")
        bound = signature.bind(self, *args, **kwargs)
        for name, value in bound.arguments.items():
            if name in _ARGUMENT_CHECKS:
                _ARGUMENT_CHECKS[name](value)
        if "batch" in signature.parameters and bound.arguments.get("batch") is None:
            # The command line's default: the engine's own batch (its manifest's default_batch).
            manifest = getattr(self, "manifest", None)
            bound.arguments["batch"] = manifest.default_batch if manifest is not None else 32
        return method(*bound.args, **bound.kwargs)

    return checked


def check_staging(in_flight: int, image_shape, device: str, name: str = "in_flight=") -> None:
    """Refuse ``in_flight`` staged images whose float32 buffer alone would take more than half the
    memory available (a MemoryError deep in the run otherwise); ``name``: how the caller spells the
    setting (the CLI: ``--images-per-call ``)."""
    from densepure_rt.limits import available_memory

    need = 4 * in_flight * int(np.prod(image_shape))
    free = available_memory("cuda" if device == "cuda" else "cpu")
    if free is not None and need > free // 2:
        raise ConfigError(
            f"{name}{in_flight} images in flight take {need / 2**30:.1f} GiB of staging, more than half the "
            f"{free / 2**30:.1f} GiB available: stage fewer images at once"
        )


def check_kernels(kernels: str, manifest: Manifest, device: str, directory) -> str:
    """Refuse, in one line, a graph set the engine or the device cannot run: the fused graphs need
    an engine built with ``--device cuda``, the onnxruntime backend and ``--device cuda``
    (``com.microsoft.GroupNorm`` has no CPU kernel)."""
    if kernels not in KERNELS:
        raise ConfigError(f"{param('kernels')} must be {' or '.join(KERNELS)} (got {kernels!r})")
    if kernels == "fused":
        if manifest.backend != "onnxruntime":
            raise EngineError(f"{param('kernels', 'fused')} runs ONNX Runtime's fused CUDA graphs; this engine is a "
                              f"{manifest.backend} engine: use {param('kernels', 'portable')}")
        if device != "cuda":
            raise EngineError(f"{param('kernels', 'fused')} runs only on a GPU (ONNX Runtime's GroupNorm has no CPU kernel): pass "
                              f"{param('device', 'cuda')}, or use {param('kernels', 'portable')}")
        graph_path(directory, manifest, "step", "fused")  # one line when the engine has none
    return kernels
