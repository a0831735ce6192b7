"""ONNX export of the two graphs, declared as specs and validated against their PyTorch parents.

- ``step``: (x [batch x C x H x W] f32, noise [batch x C x H x W] f32, scalars [batch x 8] f32: each row's reverse-step numbers) -> x_next
  [batch x C x H x W] f32. The UNet plus the posterior update (:class:`export.step.DenoiseStep`): one
  graph for every sigma and every b. In fp16 the UNet's block convolutions run in fp16 and
  GroupNorm statistics, softmax, the timestep embedding, the output head and all scheduler
  arithmetic stay float32 (they are float32 in the parent module, and the exporter keeps its casts).
- ``classifier``: (image [batch x C x H x W] f32 in [-1, 1]) -> (labels [batch] int64, logits
  [batch x classes] f32), resize and normalisation inside.

Each spec declares its tolerances beside its shapes; :func:`validate_graph` compares every output
with the parent on fresh random inputs and raises one error listing every output that fails.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from densepure_rt.errors import DensePureError
from densepure_rt.schedule import STEP_SCALARS

__all__ = [
    "TensorSpec", "GraphSpec", "step_spec", "classifier_spec", "export_graph", "validate_graph", "ExportValidationError",
    "max_elements_per_row", "compose_classifier", "export_composed",
]

OPSET = 17
#: Graphs whose weights exceed this are saved with external data (protobuf's hard limit is 2 GB).
EXTERNAL_DATA_BYTES = 1_900_000_000


class ExportValidationError(DensePureError):
    """An exported graph disagrees with its PyTorch parent beyond the declared tolerances."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input/output: name, shape ('batch' marks the dynamic axis) and numpy dtype name."""

    name: str
    shape: tuple
    dtype: str

    def as_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class GraphSpec:
    """An exported graph: its file, inputs, outputs, and per-output tolerances vs the parent.

    ``atol`` is the max absolute error allowed; ``rel_l2`` the relative L2 error; ``exact`` outputs
    (labels) must agree on at least ``min_agreement`` of the rows.
    """

    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    atol: dict
    rel_l2: dict
    exact: tuple[str, ...] = ()
    min_agreement: float = 1.0

    def as_dict(self) -> dict:
        return {
            "file": self.file,
            "inputs": [t.as_dict() for t in self.inputs],
            "outputs": [t.as_dict() for t in self.outputs],
            "tolerances": {"atol": self.atol, "rel_l2": self.rel_l2, "exact": list(self.exact)},
        }


def step_spec(image_shape: Sequence[int], precision: str) -> GraphSpec:
    """The denoise-step graph's spec. fp16 tolerances are against the fp16 parent module."""
    img = ("batch", *image_shape)
    fp16 = precision == "fp16"
    return GraphSpec(
        name="step",
        file="step.onnx",
        inputs=(
            TensorSpec("x", img, "float32"),
            TensorSpec("noise", img, "float32"),
            TensorSpec("scalars", ("batch", len(STEP_SCALARS)), "float32"),
        ),
        outputs=(TensorSpec("x_next", img, "float32"),),
        atol={"x_next": 5e-2 if fp16 else 1e-4},
        rel_l2={"x_next": 5e-3 if fp16 else 1e-5},
    )


def classifier_spec(image_shape: Sequence[int], num_classes: int, strict: bool = False) -> GraphSpec:
    """The classifier graph's spec (always float32 on the ONNX Runtime backend). ``strict`` (a
    user's classifier): logits within 1e-4 relative (L2) of the original model and every label equal."""
    if strict:
        return GraphSpec(
            name="classifier",
            file="classifier.onnx",
            inputs=(TensorSpec("image", ("batch", *image_shape), "float32"),),
            outputs=(TensorSpec("labels", ("batch",), "int64"), TensorSpec("logits", ("batch", num_classes), "float32")),
            atol={},
            rel_l2={"logits": 1e-4},
            exact=("labels",),
            min_agreement=1.0,
        )
    return GraphSpec(
        name="classifier",
        file="classifier.onnx",
        inputs=(TensorSpec("image", ("batch", *image_shape), "float32"),),
        outputs=(TensorSpec("labels", ("batch",), "int64"), TensorSpec("logits", ("batch", num_classes), "float32")),
        atol={"logits": 1e-3},
        rel_l2={"logits": 1e-4},
        exact=("labels",),
        min_agreement=0.99,
    )


class _ClassifierGraph(nn.Module):
    """Wraps a classifier (image in [-1,1] -> logits) to return (labels, logits)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, image: torch.Tensor):
        logits = self.classifier(image).float()
        return logits.argmax(dim=1), logits


def as_graph_module(spec: GraphSpec, module: nn.Module) -> nn.Module:
    """The module whose outputs are exactly ``spec.outputs`` (the classifier gains labels)."""
    return _ClassifierGraph(module) if spec.name == "classifier" else module


def export_graph(module: nn.Module, spec: GraphSpec, directory: str | Path, example: Sequence[torch.Tensor],
                 opset: int = OPSET) -> list[str]:
    """Export ``module`` to ``directory/spec.file`` (``opset``, dynamic batch); returns the files written.

    Graphs over 2 GB (the full-size fp32 ImageNet UNet) are saved with their weights as external
    data beside the graph (``<file>.data``).
    """
    import onnx

    directory = Path(directory)
    graph = as_graph_module(spec, module).eval()
    dynamic = {t.name: {i: "batch" for i, d in enumerate(t.shape) if d == "batch"} for t in (*spec.inputs, *spec.outputs)}
    dynamic = {k: v for k, v in dynamic.items() if v}
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        raw = Path(tmp) / spec.file
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph,
                tuple(example),
                str(raw),
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_axes=dynamic,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        return save_graph(onnx.load(str(raw), load_external_data=True), directory, spec.file)


def save_graph(model, directory: str | Path, file: str) -> list[str]:
    """Save ``model`` as ``directory/file``, its weights as external data ``<file>.data`` when they
    pass 2 GB (protobuf's limit); returns the files written."""
    import onnx

    target = Path(directory) / file
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size > EXTERNAL_DATA_BYTES:
        data = file + ".data"
        onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True, location=data)
        return [file, data]
    onnx.save_model(model, str(target))
    return [file]


def _shapes_at(model, rows: int, sizes: dict[str, Sequence[int]] | None) -> dict[str, int]:
    """Element count of every tensor of ``model`` with ``rows`` rows per call (ONNX Runtime's
    symbolic shape inference: it follows the shape arithmetic of reshapes, which ONNX's own shape
    inference leaves unknown). ``sizes`` fixes other dynamic input dimensions (name -> full shape,
    ``"batch"`` where the rows go)."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    initializers = {t.name for t in fixed.graph.initializer}
    for value in fixed.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        wanted = (sizes or {}).get(value.name) or [d.dim_param or d.dim_value for d in dims]
        for dim, want in zip(dims, wanted):
            if isinstance(want, str):  # the dynamic batch axis: the rows of one call
                if want != "batch":
                    raise ValueError(f"input {value.name} has the dynamic axis {want!r}: give its size")
                want = rows
            dim.ClearField("dim_param")
            dim.dim_value = int(want)
    inferred = SymbolicShapeInference.infer_shapes(fixed, auto_merge=True)
    counts = {}
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        if any(d is None for d in dims):
            raise ValueError(f"the shape of {value.name} could not be inferred")
        counts[value.name] = int(np.prod(dims, dtype=np.int64)) if dims else 1
    return counts


def _without_external_weights(model):
    """``model`` (loaded without its external data) with every externally stored initializer turned
    into a graph input of the same type and shape: shape inference needs the shapes of the weights,
    not their gigabytes, and would otherwise try to read the data file. Small initializers, which
    may hold shapes that reshapes read, are stored inline and stay."""
    import onnx
    from onnx import TensorProto, helper

    external = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    if not external:
        return model
    names = {t.name for t in external}
    kept = [t for t in model.graph.initializer if t.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in external)
    return model


def max_elements_per_row(model, sizes: dict[str, Sequence[int]] | None = None) -> int:
    """The largest number of elements any tensor of ``model`` (an ONNX ModelProto or a path) holds
    per row of its dynamic batch axis: the growth of each tensor from one row to two, maximised
    over the graph's intermediate values and outputs. ONNX Runtime's CUDA kernels and TensorRT
    index tensors with 32-bit integers, so ``(2**31 - 1) // max_elements_per_row`` rows is the most
    one call may hold (the ImageNet UNet: 512 x 256 x 256 = 2^25 per row, in its first decoder
    concatenation, so 63 rows). Shape inference only: nothing runs, weights need not be loaded."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = _without_external_weights(onnx.load(str(model), load_external_data=False))
    one, two = _shapes_at(model, 1, sizes), _shapes_at(model, 2, sizes)
    return max(two[name] - one[name] for name in one)


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def validate_graph(
    path: str | Path,
    parent: nn.Module,
    spec: GraphSpec,
    make_inputs: Callable[[torch.Generator], Sequence[torch.Tensor]],
    trials: int = 2,
    seed: int = 1234,
) -> dict:
    """Run the graph and its parent on ``trials`` fresh random inputs; raise one error listing every
    output outside its tolerance. Returns the worst errors seen (for logs and manifests)."""
    session = _session(Path(path))
    graph = as_graph_module(spec, parent).eval()
    gen = torch.Generator().manual_seed(seed)
    worst: dict[str, dict] = {}
    failures: list[str] = []
    for trial in range(trials):
        inputs = make_inputs(gen)
        with torch.no_grad():
            want = graph(*inputs)
        want = want if isinstance(want, tuple) else (want,)
        feeds = {t.name: x.cpu().numpy() for t, x in zip(spec.inputs, inputs)}
        got = session.run([t.name for t in spec.outputs], feeds)
        for out, g, w in zip(spec.outputs, got, want):
            w = w.float().cpu().numpy() if w.is_floating_point() else w.cpu().numpy()
            stats = worst.setdefault(out.name, {"max_abs": 0.0, "rel_l2": 0.0, "agreement": 1.0})
            if g.shape != w.shape:
                failures.append(f"{out.name}: shape {g.shape} vs parent {w.shape}")
                continue
            if out.name in spec.exact:
                agreement = float(np.mean(g == w))
                stats["agreement"] = min(stats["agreement"], agreement)
                if agreement < spec.min_agreement:
                    failures.append(f"{out.name}: {agreement:.1%} agree with the parent (need {spec.min_agreement:.0%})")
                continue
            if not np.all(np.isfinite(g)):
                failures.append(f"{out.name}: non-finite values")
                continue
            max_abs = float(np.max(np.abs(g - w)))
            rel = float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-12))
            stats["max_abs"], stats["rel_l2"] = max(stats["max_abs"], max_abs), max(stats["rel_l2"], rel)
            if max_abs > spec.atol.get(out.name, np.inf) or rel > spec.rel_l2.get(out.name, np.inf):
                failures.append(
                    f"{out.name} (trial {trial}): max abs {max_abs:.2e} (tol {spec.atol.get(out.name)}), "
                    f"rel L2 {rel:.2e} (tol {spec.rel_l2.get(out.name)})"
                )
    if failures:
        raise ExportValidationError(f"{spec.name} graph {path} disagrees with PyTorch: " + "; ".join(failures))
    return worst


def _default_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def compose_classifier(pre, net, num_classes: int):
    """One classifier graph from two ONNX models: ``pre`` (image -> the network's input: the
    preprocessing, exported from PyTorch) and ``net`` (the user's network: one float input
    [N x C x H x W], its first output [N x classes]). The network's names are prefixed with
    ``net/``; the lower opset of the two is converted up to the higher (ONNX's version converter);
    the result has the classifier spec's names: image -> (labels [N] int64, logits [N x classes] f32)."""
    import onnx
    from onnx import TensorProto, compose, helper, version_converter

    target = max(_default_opset(pre), _default_opset(net))
    pre = pre if _default_opset(pre) == target else version_converter.convert_version(pre, target)
    if _default_opset(net) != target:
        try:
            net = version_converter.convert_version(net, target)
        except Exception as exc:  # noqa: BLE001 - the converter's own errors
            raise DensePureError(
                f"the classifier's ONNX opset {_default_opset(net)} cannot be converted to opset {target} for the "
                f"preprocessing ({type(exc).__name__}): export it at opset {target}"
            ) from None
    ir = max(pre.ir_version, net.ir_version)
    pre.ir_version = net.ir_version = ir
    initializers = {t.name for t in net.graph.initializer}
    (net_input,) = [v.name for v in net.graph.input if v.name not in initializers]
    net_output = net.graph.output[0].name
    net = compose.add_prefix(net, "net/")
    merged = compose.merge_models(pre, net, io_map=[(pre.graph.output[0].name, "net/" + net_input)],
                                  outputs=["net/" + net_output])
    graph = merged.graph
    graph.node.extend([
        helper.make_node("Cast", ["net/" + net_output], ["logits"], to=TensorProto.FLOAT, name="classifier/logits"),
        helper.make_node("ArgMax", ["logits"], ["labels"], axis=1, keepdims=0, name="classifier/labels"),
    ])
    del graph.output[:]
    graph.output.extend([
        helper.make_tensor_value_info("labels", TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", int(num_classes)]),
    ])
    onnx.checker.check_model(merged)
    return merged


def export_composed(preprocess: nn.Module, net_onnx: bytes, num_classes: int, spec: GraphSpec, directory: str | Path,
                    example: Sequence[torch.Tensor], opset: int = OPSET) -> list[str]:
    """Export ``preprocess`` (image -> the network's input) and compose it with the network's ONNX
    graph ``net_onnx`` into ``directory/spec.file`` (:func:`compose_classifier`); returns the files written."""
    import onnx

    net = onnx.load_from_string(net_onnx)
    opset = max(opset, _default_opset(net))
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        pre_spec = GraphSpec("preprocess", "preprocess.onnx", spec.inputs, (TensorSpec("net_input", ("batch",), "float32"),), {}, {})
        export_graph(preprocess, pre_spec, tmp, example, opset=opset)
        pre = onnx.load(str(Path(tmp) / pre_spec.file))
    return save_graph(compose_classifier(pre, net, num_classes), directory, spec.file)
