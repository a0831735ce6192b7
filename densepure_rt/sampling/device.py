"""The device the batch loop runs on: its array module, stream, noise source and image staging.

:class:`CpuDevice` (numpy, the host Philox noise, nothing to enter or wait for) and
:class:`CudaDevice` (CuPy on one stream, the Philox CUDA kernel, pinned staging) give the loop one
interface, so that neither the loop nor the executors branch on where they run. Only this module
imports CuPy, and only when a GPU is asked for (``--device cuda``); the runtime never imports torch.
Why CuPy and not pycuda or raw cuda-python: docs/decisions.md.

- :class:`CudaContext`: the loop's CUDA stream (non-blocking), on which the noise kernel, the loop's
  elementwise work and ONNX Runtime (``user_compute_stream``) all run in order.
- :class:`CupyNoise`: :data:`densepure_rt.sampling.philox.CUDA_SOURCE`'s ``philox_rows`` kernel, compiled once
  with NVRTC; per-row keys are device buffers of the loop, so the kernel draws each batch's own noise.
- :meth:`CudaContext.stage`: images go host -> pinned host buffer -> device with an asynchronous copy
  on a second stream; the loop's stream waits on an event, not the host. Two pinned buffers
  alternate (double buffering), so a caller that queues the next batch before reading the current
  one's labels overlaps the copy with it. Today's callers read each batch's labels first (a batch's
  images are a few kilobytes to a megabyte beside seconds of UNet work), so nothing overlaps yet.

Written without a GPU; what ran on a lent H100 is recorded in README.md's backend table.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np

from densepure_rt.errors import EngineError, install_hint
from densepure_rt.sampling.philox import CUDA_SOURCE, row_normals

__all__ = ["CpuDevice", "CudaDevice", "open_device", "free_gpu_bytes", "HostNoise", "require_cupy", "CudaContext", "CupyNoise"]


class HostNoise:
    """The numpy noise source (:func:`densepure_rt.sampling.philox.row_normals`)."""

    def fill(self, out, seed: int, images, phases, samples, draws, offset: int, scale: float) -> None:
        rows = out.shape[0]
        size = int(np.prod(out.shape[1:]))
        z = row_normals(seed, images[:rows], phases[:rows], samples[:rows], draws[:rows] + np.uint32(offset), size,
                        scale=None if scale == 1.0 else scale)
        out[...] = z.reshape(out.shape)


class CpuDevice:
    """The host: numpy buffers, :class:`HostNoise`, no stream (work is done when a call returns)."""

    name = "cpu"
    xp = np
    #: The CUDA stream executors run on: none on the host.
    cuda_stream = None

    def __init__(self):
        self.noise = HostNoise()

    def stream(self):
        """A context manager that makes the device's stream current (the loop enters it): none here."""
        return nullcontext()

    def stage(self, images: np.ndarray) -> np.ndarray:
        """``images`` [N x C x H x W] as float32 arrays of the device."""
        return np.ascontiguousarray(images, dtype=np.float32)

    def to_host(self, a) -> np.ndarray:
        """A numpy copy of a device array, once the work that writes it is done."""
        return np.array(a)

    def synchronize(self) -> None:
        """Wait for the work queued on the device: nothing is queued on the host."""


class CudaDevice:
    """One GPU through CuPy: the loop's stream, :class:`CupyNoise` on it, images staged through
    pinned memory (:class:`CudaContext`). ``xp`` is the cupy module."""

    name = "cuda"

    def __init__(self, device_id: int = 0):
        cupy = require_cupy()
        self.xp = cupy
        self.context = CudaContext(cupy, device_id)
        #: The stream every kernel of the loop and every executor call runs on, in order.
        self.cuda_stream = self.context.stream
        self.noise = CupyNoise(cupy, self.cuda_stream)

    def stream(self):
        return self.cuda_stream  # a CuPy stream is a context manager that makes it current

    def stage(self, images: np.ndarray):
        return self.context.stage(images)

    def to_host(self, a) -> np.ndarray:
        return self.xp.asnumpy(a, stream=self.cuda_stream, blocking=True)

    def synchronize(self) -> None:
        self.context.synchronize()


def open_device(name: str):
    """:class:`CpuDevice` for ``"cpu"``, :class:`CudaDevice` for ``"cuda"``; anything else is refused."""
    if name == "cpu":
        return CpuDevice()
    if name == "cuda":
        return CudaDevice()
    raise EngineError(f"--device must be cpu or cuda (got {name!r})")


def free_gpu_bytes() -> int | None:
    """The current GPU's free memory in bytes, or None where it cannot be read (no CuPy, no driver:
    opening the device will say so)."""
    try:
        import cupy

        return int(cupy.cuda.runtime.memGetInfo()[0])
    except Exception:  # noqa: BLE001
        return None


def require_cupy():
    """The cupy module, or an :class:`EngineError` that says how to get it."""
    try:
        import cupy
    except ImportError:
        raise EngineError(
            f"--device cuda needs CuPy: {install_hint('gpu-cuda13')} (or gpu-cuda12, matching your CUDA)"
        ) from None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise EngineError("--device cuda: CuPy sees no CUDA device; use --device cpu")
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise EngineError(f"--device cuda: no usable CUDA driver ({exc}); use --device cpu") from None
    return cupy


class CupyNoise:
    """The Philox noise source on the GPU: the same numbers as :class:`HostNoise`."""

    THREADS = 256

    def __init__(self, cupy, stream):
        self.cupy, self.stream = cupy, stream
        self._kernel = cupy.RawModule(code=CUDA_SOURCE).get_function("philox_rows")

    def fill(self, out, seed: int, images, phases, samples, draws, offset: int, scale: float) -> None:
        rows = int(out.shape[0])
        size = int(np.prod(out.shape[1:]))
        total = rows * ((size + 3) // 4)
        if total == 0:
            return
        grid = ((total + self.THREADS - 1) // self.THREADS,)
        self._kernel(
            grid, (self.THREADS,),
            (np.uint32(seed), images, phases, samples, draws, np.uint32(offset), np.int32(rows), np.int32(size),
             np.float32(scale), out),
            stream=self.stream,
        )


class CudaContext:
    """The loop's stream, a copy stream and two pinned staging buffers for images."""

    def __init__(self, cupy, device_id: int = 0):
        self.cupy = cupy
        self.device = cupy.cuda.Device(device_id)
        self.device.use()
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.copy_stream = cupy.cuda.Stream(non_blocking=True)
        self._pinned: list = [None, None]
        self._device_images: list = [None, None]
        self._events = [None, None]
        self._turn = 0

    def stage(self, images: np.ndarray):
        """Device copy of ``images`` [N x C x H x W] float32, copied through pinned memory on the copy
        stream; the loop's stream waits for the copy (an event), the host does not. The returned array
        stays valid until the call after next (two buffers alternate)."""
        cupy = self.cupy
        images = np.ascontiguousarray(images, dtype=np.float32)
        i = self._turn
        self._turn ^= 1
        # Everything queued on the loop's stream so far ends with the previous call's batch, the one
        # reading the other buffer: mark it, so the call after this one can reuse that buffer.
        self._events[i ^ 1] = self.stream.record() if self._device_images[i ^ 1] is not None else None
        if self._events[i] is not None:
            self._events[i].synchronize()  # the batch of two calls ago, which read this buffer, is done
        if self._pinned[i] is None or self._pinned[i].size < images.size:
            mem = cupy.cuda.alloc_pinned_memory(images.nbytes)
            self._pinned[i] = np.frombuffer(mem, dtype=np.float32, count=images.size)
            self._device_images[i] = cupy.empty(images.size, dtype=np.float32)
        pinned = self._pinned[i][: images.size]
        pinned[...] = images.reshape(-1)
        dev = self._device_images[i][: images.size]
        dev.set(pinned, stream=self.copy_stream)  # asynchronous: the source is pinned
        copied = self.copy_stream.record()
        self.stream.wait_event(copied)
        return dev.reshape(images.shape)

    def synchronize(self) -> None:
        self.stream.synchronize()
