"""What the batch loop and the engine read from an executor, all of it declared here.

An executor binds the loop's buffers (arrays of the device's module: numpy or CuPy) and runs one of
the engine's two graphs on them; nothing else (no noise, no vote, no staging: those are the loop's
and the device's). One file per runtime: :mod:`.onnxrt`, :mod:`.openvino`, :mod:`.tensorrt`.
"""

from __future__ import annotations

from typing import Optional, Protocol

__all__ = ["Executor"]


class Executor(Protocol):
    """Runs an engine's step and classifier graphs on buffers of one array module."""

    #: The runtime: ``"onnxruntime"``, ``"openvino"`` or ``"tensorrt"`` (the manifest's backend name).
    name: str
    #: The array module of the buffers it binds (numpy, or cupy on a GPU).
    xp: object
    #: The runtime's version (recorded in results' options).
    version: str
    #: The arithmetic the graphs run in, as the runtime compiled them (e.g. OpenVINO reads it back).
    effective_precision: str
    #: The runtime's own providers / devices per graph (``{"step": [...], "classifier": [...]}``).
    providers: dict
    #: Whether the runtime replays its own CUDA graphs of the step (ONNX Runtime's CUDA provider).
    cuda_graph: bool
    #: Whether step calls should keep one row count (a replayed CUDA graph; TensorRT's profile shape,
    #: set once per execution context): the scheduler then runs every call full and reserves it.
    fixed_rows: bool
    #: The most rows one classifier call may hold for this runtime (TensorRT: its profile); None: no own limit.
    classifier_rows: Optional[int]

    def reserve(self, rows: int, image_shape) -> None:
        """Get ready for calls of ``rows`` rows (a full batch): e.g. capture a graph of that shape."""

    def step(self, x, noise, scalars, out) -> None:
        """out[:] = step(x, noise, scalars): x, noise, out [R x C x H x W] float32; scalars [R x S] float32
        (each row's reverse-step numbers, engine format 3)."""

    def classify(self, images, labels, logits) -> None:
        """labels[:] (int64 [R]) and logits[:] (float32 [R x classes]) of images [R x C x H x W]."""

    def close(self) -> None:
        """Free the sessions."""
