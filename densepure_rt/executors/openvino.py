"""OpenVINO: run an engine's fp32 ONNX graphs on the CPU at the engine's explicit precision
(fp32 or bf16), on the batch loop's numpy buffers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from densepure_rt.errors import EngineError
from densepure_rt.errors import first_line as _first_line
from densepure_rt.files.manifest import GRAPH_IO, Manifest, as_manifest, check_graph_io, graph_path

__all__ = ["OpenVinoExecutor"]


def _port_names(ports, expected) -> list[str]:
    """One name per OpenVINO port: the expected name where it is among the port's tensor names
    (OpenVINO keeps the graph's internal tensor names beside the input's), else any of them."""
    names = []
    for port in ports:
        own = port.get_names()
        names.append(next((name for name in expected if name in own), port.get_any_name()))
    return names


#: OpenVINO's name for each precision an engine may ask for.
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}


class OpenVinoExecutor:
    """OpenVINO on the CPU over an engine's fp32 ONNX graphs, at the engine's explicit precision.

    OpenVINO runs bf16 by default on CPUs with AMX (and may elsewhere), which would make the base
    classifier depend on the machine; the executor always sets ``INFERENCE_PRECISION_HINT`` to the
    engine's precision (``f32`` or ``bf16``) and reads back what OpenVINO compiled
    (:attr:`effective_precision`); an engine whose precision the CPU cannot run is refused.
    """

    name = "openvino"
    xp = np
    #: OpenVINO replays no CUDA graphs, and has no row limit of its own.
    cuda_graph = False
    fixed_rows = False
    classifier_rows = None

    def __init__(self, directory: str | Path, manifest: Manifest, threads: int | None = None):
        try:
            import openvino as ov
        except ImportError:
            raise EngineError("this engine is for OpenVINO: pip install openvino (or rebuild it with --backend onnxruntime)") from None
        manifest = as_manifest(manifest)
        precision = manifest.step_precision
        if precision not in _OV_PRECISION:
            raise EngineError(f"an OpenVINO engine runs fp32 or bf16, not {precision!r}: rebuild the engine")
        core = ov.Core()
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise EngineError(
                "this engine runs in bf16, which this CPU does not support (no AVX-512 BF16 or AMX): "
                "rebuild it with --precision fp32"
            )
        hint = getattr(ov.Type, _OV_PRECISION[precision])
        config = {
            "INFERENCE_PRECISION_HINT": hint,
            "PERFORMANCE_HINT": "LATENCY",  # one stream: the batch loop issues one request at a time
            "NUM_STREAMS": "1",
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(int(threads))
        directory = Path(directory)
        step_file, cls_file = graph_path(directory, manifest, "step"), graph_path(directory, manifest, "classifier")
        try:
            self._step = core.compile_model(str(step_file), "CPU", config)
            self._cls = core.compile_model(str(cls_file), "CPU", config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own types
            raise EngineError(f"OpenVINO could not load the engine in {directory}: {_first_line(exc)}") from None
        for graph, model in (("step", self._step), ("classifier", self._cls)):
            want_in, want_out = GRAPH_IO[graph]
            check_graph_io(directory, graph, _port_names(model.inputs, want_in), _port_names(model.outputs, want_out))
        names = {v: k for k, v in _OV_PRECISION.items()}
        got = {names.get(m.get_property("INFERENCE_PRECISION_HINT").get_type_name(), "?") for m in (self._step, self._cls)}
        #: What OpenVINO compiled, read back from both compiled graphs: 'fp32' or 'bf16'.
        self.effective_precision = got.pop() if len(got) == 1 else "mixed"
        if self.effective_precision != precision:
            raise EngineError(f"OpenVINO compiled this {precision} engine as {self.effective_precision}: rebuild it for this CPU")
        self._step_req = self._step.create_infer_request()
        self._cls_req = self._cls.create_infer_request()
        self.version = ov.__version__
        self.providers = {"step": ["OpenVINO CPU"], "classifier": ["OpenVINO CPU"]}
        self.device = "cpu"

    def reserve(self, rows: int, image_shape) -> None:
        """Nothing to get ready: OpenVINO compiled the graphs for any number of rows."""

    def step(self, x, noise, scalars, out) -> None:
        try:
            result = self._step_req.infer({"x": x, "noise": noise, "scalars": scalars}, share_inputs=True)
        except Exception as exc:  # noqa: BLE001
            raise EngineError(f"OpenVINO failed running the denoise-step graph: {_first_line(exc)}") from None
        out[...] = result[self._step.output("x_next")]

    def classify(self, images, labels, logits) -> None:
        try:
            result = self._cls_req.infer({"image": images}, share_inputs=True)
        except Exception as exc:  # noqa: BLE001
            raise EngineError(f"OpenVINO failed running the classifier graph: {_first_line(exc)}") from None
        labels[...] = result[self._cls.output("labels")]
        logits[...] = result[self._cls.output("logits")]

    def close(self) -> None:
        self._step = self._cls = self._step_req = self._cls_req = None  # type: ignore[assignment]
