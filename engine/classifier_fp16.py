"""An fp16 classifier graph with fused attention, for CUDA engines.

:func:`fp16_classifier` takes the fp32 ``classifier.onnx`` that :func:`densepure_rt.export.onnx_export.export_graph`
writes (input ``image`` [batch x C x H x W] float32, outputs ``labels`` [batch] int64 and ``logits``
[batch x classes] float32) and returns a graph with the same inputs and outputs whose network runs
in fp16, with each self-attention of a timm ViT replaced by ONNX Runtime's fused ``com.microsoft``
``Attention`` op. Meant for ONNX Runtime's CUDA provider. Uses onnx, onnxruntime and NumPy only.

What ONNX Runtime's own transformer optimizer does with these graphs (onnxruntime 1.32, on this
project's exports of timm 1.0 ViTs: torch 2.x TorchScript exporter, opset 17; measured on a CPU
machine): no model type of ``onnxruntime.transformers.optimizer.MODEL_TYPES`` (``vit``, ``bert``,
``clip``, ``sam2``, ``swin``, ``unet``, ...) fuses timm's attention, and neither do the session's own
C++ fusions at ``ORT_ENABLE_ALL``. Its ``FusionAttention`` wants three separate Q, K and V MatMuls
fed by the LayerNorm, as Hugging Face's ``ViTModel`` exports; timm computes one packed ``qkv``
MatMul, reshapes it to [B, S, 3, heads, head_dim], permutes it to [3, B, heads, S, head_dim] and
splits it (the ``sam2`` fusion knows a packed Split, but of another layout, with a Transpose after
each Squeeze). So :func:`fuse_timm_attention` matches that subgraph itself and writes
``Attention(x, W_qkv, b_qkv)``: timm's packed weight [D, 3D] (columns q | k | v, head-major inside
each) is the layout ``Attention`` takes, so the weights are used as they are. ONNX Runtime's
optimizer (``model_type="vit"``) then fuses the rest: LayerNorm after a residual Add ->
``SkipLayerNormalization``, bias + Erf GELU -> ``BiasGelu``.

Only attention with nothing added to its scores is fused. BEiT (the ``imagenet`` preset) adds a
relative position bias before the softmax: nothing in ONNX Runtime's optimizer matches it, and it is
left unfused here on purpose (``report["attention_fused"]`` is then below
``report["attention_blocks"]``); its blocks still run in fp16.

fp16: ONNX Runtime's float16 converter (``onnxruntime.transformers.float16``) with ``keep_io_types``;
the preprocessing and the head stay float32 (see :func:`fp16_classifier` for why). Softmax (BEiT's,
unfused), LayerNorm and GELU are left to fp16 graph ops because ONNX Runtime's CUDA kernels for them
accumulate in float32 (its softmax's ``AccumulateType<MLFloat16>`` is float, its LayerNorm and
SkipLayerNorm kernels keep float32 statistics, its fused Attention kernels a float32 softmax): read
in ONNX Runtime's sources, not measured. Where this was run: everything on a 2-core x86-64 CPU with
onnxruntime 1.32 (no GPU); tests/test_classifier_fp16.py says what the CPU provider can and cannot
run in fp16, and what the label-agreement checks run instead. No CUDA run of these graphs yet.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["fp16_classifier", "fused_fp32", "fuse_timm_attention", "fused_counts", "attention_softmaxes"]


def fused_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Node count of each ``com.microsoft`` contrib op in ``model``, e.g. ``{"Attention": 12,
    "SkipLayerNormalization": 24, "BiasGelu": 12}`` (ops that do not occur are left out)."""
    return dict(Counter(n.op_type for n in model.graph.node if n.domain == "com.microsoft"))


def attention_softmaxes(model: onnx.ModelProto) -> int:
    """Softmax nodes of an unfused graph: one per self-attention of a transformer (how many
    attention blocks there are, whether or not a fusion matches them)."""
    return sum(n.op_type == "Softmax" for n in model.graph.node)


class _Graph:
    """Producer and consumer maps and constant lookup over one ``onnx.GraphProto``."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers = defaultdict(list)
        for n in graph.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.initializers = {t.name: t for t in graph.initializer}
        self.constants = {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute[0].name == "value"}

    def source(self, name: str) -> str:
        """``name`` with Identity nodes skipped (the exporter writes one for each initializer
        equal to an earlier one, e.g. the zero qkv biases of freshly initialised blocks)."""
        while name in self.producer and self.producer[name].op_type == "Identity":
            name = self.producer[name].input[0]
        return name

    def const(self, name: str) -> np.ndarray | None:
        name = self.source(name)
        tensor = self.initializers.get(name) or self.constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def scalar(self, name: str) -> float | None:
        value = self.const(name)
        return float(value.reshape(())) if value is not None and value.size == 1 else None

    def parent(self, node, index: int, op: str):
        """The node of type ``op`` that writes ``node.input[index]``, or None."""
        if node is None or index >= len(node.input):
            return None
        found = self.producer.get(node.input[index])
        return found if found is not None and found.op_type == op else None

    def only_child(self, node, op: str):
        """The single consumer of ``node``'s first output if it is an ``op``, else None."""
        children = self.consumers.get(node.output[0], [])
        return children[0] if len(children) == 1 and children[0].op_type == op else None


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _sdpa_default_factor(g: _Graph, factor_name: str, q_name: str) -> bool:
    """Whether ``factor_name`` is ``sqrt(1 / sqrt(q.shape[-1]))``: the default scale of
    ``scaled_dot_product_attention`` as the TorchScript exporter writes it, applied to q and to k^T."""
    node = g.producer.get(factor_name)
    path = []
    for op, index in (("Sqrt", 0), ("Cast", 0), ("Div", 1), ("Sqrt", 0), ("Cast", 0), ("Slice", 0), ("Shape", None)):
        if node is None or node.op_type != op:
            return False
        path.append(node)
        node = g.producer.get(node.input[index]) if index is not None else None
    div, slice_, shape = path[2], path[5], path[6]
    return g.scalar(div.input[0]) == 1.0 and g.scalar(slice_.input[1]) == -1 and shape.input[0] == q_name


def _scaled(g: _Graph, name: str):
    """(the tensor before an optional ``Mul``, its factor) for the MatMul input ``name``: the
    factor is 1.0 without a Mul, a constant's value, ``("sdpa", factor tensor)`` when the factor
    is computed (checked by :func:`_sdpa_default_factor`), None when not recognised."""
    mul = g.producer.get(name)
    if mul is None or mul.op_type != "Mul":
        return name, 1.0
    for data, other in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
        value = g.scalar(other)
        if value is not None:
            return data, value
        if g.producer.get(other) is not None and g.producer[other].op_type == "Sqrt":
            return data, ("sdpa", other)
    return name, None


def _match_timm_attention(g: _Graph, softmax):
    """The pieces of one timm attention around ``softmax``, or None when it is not that pattern:

    x -> MatMul(W [D, 3D]) -> Add(b [3D]) -> Reshape [B, S, 3, N, H] -> Transpose (2, 0, 3, 1, 4)
      -> Split(axis 0) -> Squeeze: q, k, v -> Softmax((q * a) @ (k^T * c)) @ v
      -> Transpose (0, 2, 1, 3) -> Reshape [B, S, D]

    with a * c = 1 / sqrt(H) (constants, or the SDPA export's default factors)."""
    if _attr(softmax, "axis", -1) not in (-1, 3):
        return None
    qk = g.parent(softmax, 0, "MatMul")  # BEiT: an Add of the relative position bias sits here
    av = g.only_child(softmax, "MatMul")
    if qk is None or av is None or av.input[0] != softmax.output[0]:
        return None
    v = g.parent(av, 1, "Squeeze")
    split = g.parent(v, 0, "Split")
    if split is None or len(split.output) != 3 or _attr(split, "axis", 0) != 0 or v.input[0] != split.output[2]:
        return None
    q_name, q_factor = _scaled(g, qk.input[0])
    kt_name, k_factor = _scaled(g, qk.input[1])
    kt = g.producer.get(kt_name)
    q = g.producer.get(q_name)
    if None in (q_factor, k_factor, kt, q) or kt.op_type != "Transpose" or _attr(kt, "perm") != [0, 1, 3, 2]:
        return None
    k = g.parent(kt, 0, "Squeeze")
    if q.op_type != "Squeeze" or q.input[0] != split.output[0] or k is None or k.input[0] != split.output[1]:
        return None
    permute = g.parent(split, 0, "Transpose")
    reshape = g.parent(permute, 0, "Reshape")
    add = g.parent(reshape, 0, "Add")
    if permute is None or _attr(permute, "perm") != [2, 0, 3, 1, 4] or add is None:
        return None
    matmul = next((g.producer.get(i) for i in add.input if getattr(g.producer.get(i), "op_type", "") == "MatMul"), None)
    bias = next((g.source(i) for i in add.input if g.source(i) in g.initializers), None)
    if matmul is None or bias is None or g.source(matmul.input[1]) not in g.initializers:
        return None
    weight = g.initializers[g.source(matmul.input[1])]
    # [3, heads, head_dim] are the constant last three entries of the Reshape's target shape.
    target = g.const(reshape.input[1])
    if target is None:
        concat = g.parent(reshape, 1, "Concat")
        parts = [g.const(i) for i in concat.input[-3:]] if concat is not None else [None]
        target = None if any(p is None for p in parts) else np.concatenate([p.reshape(-1) for p in parts])
    if target is None or len(target) < 3 or int(target[-3]) != 3:
        return None
    heads, head_dim = int(target[-2]), int(target[-1])
    if list(weight.dims) != [weight.dims[0], 3 * heads * head_dim] or list(g.initializers[bias].dims) != [3 * heads * head_dim]:
        return None
    back = g.only_child(av, "Transpose")
    out = g.only_child(back, "Reshape") if back is not None else None
    if back is None or _attr(back, "perm") != [0, 2, 1, 3] or out is None:
        return None
    scale = 1.0
    for factor, data in ((q_factor, q_name), (k_factor, q_name)):
        if isinstance(factor, tuple):
            if not _sdpa_default_factor(g, factor[1], data):
                return None
            factor = head_dim**-0.25
        scale *= factor
    return dict(x=matmul.input[0], weight=weight.name, bias=bias, heads=heads, head_dim=head_dim, scale=scale, out=out)


def _prune(model: onnx.ModelProto) -> None:
    """Drop the nodes no graph output depends on, and the initializers nothing reads."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def fuse_timm_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """(a copy of ``model`` with every timm self-attention replaced by one ``com.microsoft``
    ``Attention`` node, how many were replaced). See :func:`_match_timm_attention` for the pattern;
    anything else (BEiT's relative position bias, a mask) is left as it is. fp32 in, fp32 out."""
    model = _copy(model)
    g = _Graph(model.graph)
    replaced = {}
    for softmax in [n for n in model.graph.node if n.op_type == "Softmax"]:
        m = _match_timm_attention(g, softmax)
        if m is None:
            continue
        attrs = {"num_heads": m["heads"]}
        if abs(m["scale"] * m["head_dim"] ** 0.5 - 1.0) > 1e-6:  # Attention's default is 1 / sqrt(head_dim)
            attrs["scale"] = float(m["scale"])
        fused = helper.make_node(
            "Attention", [m["x"], m["weight"], m["bias"]], [m["out"].output[0]],
            name=f"{m['out'].name}/FusedAttention", domain="com.microsoft", **attrs,
        )
        replaced[id(m["out"])] = fused
    nodes = [replaced.get(id(n), n) for n in model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if replaced and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _prune(model)
    return model, len(replaced)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _ort_fusions(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's transformer optimizer, ``model_type="vit"``, its Python fusions only
    (``opt_level=0``: nothing specific to one provider is baked in). ``FusionOptions("vit")`` keeps
    GELU exact (no tanh approximation) and uses no attention mask. Its log (INFO lines for each
    fusion, a warning that num_heads was not given: its own attention fusion is not used) is hushed."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    loggers = [logging.getLogger(n) for n in ("optimizer", "onnxruntime.transformers.optimizer", "onnx_model", "onnx_model_bert", "fusion_base", "fusion_utils")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        return optimize_model(model, model_type="vit", optimization_options=FusionOptions("vit"), opt_level=0).model
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def _network_input_ancestors(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes that compute the data input of the first Conv/MatMul/Gemm: the preprocessing."""
    g = _Graph(model.graph)
    first = next((n for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")), None)
    found, todo = {}, [first.input[0]] if first is not None else []
    while todo:
        node = g.producer.get(todo.pop())
        if node is not None and id(node) not in found:
            found[id(node)] = node
            todo.extend(node.input)
    return [n for n in model.graph.node if id(n) in found]


def _io(model: onnx.ModelProto) -> list[tuple]:
    """(name, elem type, dims) of each graph input and output: what must not change."""
    def dims(v):
        return tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)

    return [(v.name, v.type.tensor_type.elem_type, dims(v)) for v in (*model.graph.input, *model.graph.output)]


def fused_fp32(model: onnx.ModelProto, fuse_attention: bool = True) -> tuple[onnx.ModelProto, int]:
    """(``model`` with its fusions applied, still fp32; the number of Attention nodes written):
    :func:`fuse_timm_attention` when ``fuse_attention``, then ONNX Runtime's transformer optimizer
    (``model_type="vit"``). ``model`` is not modified."""
    fused, attention = fuse_timm_attention(model) if fuse_attention else (_copy(model), 0)
    return _ort_fusions(fused), attention


def fp16_classifier(model: onnx.ModelProto, fuse_attention: bool = True) -> tuple[onnx.ModelProto, dict]:
    """The fp16 version of an fp32 classifier graph, and a report of what was done.

    ``model``: the ``classifier.onnx`` of :func:`densepure_rt.export.onnx_export.export_graph` (it is
    not modified). Steps: :func:`fused_fp32`, then ONNX Runtime's float16 converter
    (``onnxruntime.transformers.float16``) with ``keep_io_types=True``: the graph's inputs and
    outputs keep their names, dtypes and shapes (``image`` float32 in, ``labels`` int64 and
    ``logits`` float32 out; checked, a RuntimeError otherwise). Kept in float32, by node:

    - the preprocessing (the nodes computing the input of the first Conv/MatMul/Gemm): the
      ``cifar10`` preset's uint8 round trip rounds values of 0..255, where fp16 is only 0.125 apart,
      and ``imagenet``'s bicubic resize. Measured (the test ViT, 400 images, every tensor stored in
      fp16): with it in fp16, 3.9% of the network's input values moved by one uint8 step and the
      largest logit error doubled (8e-4 -> 1.7e-3); in float32 none moved. A few elementwise ops:
      nothing to gain in fp16.
    - the head (the node that writes ``logits``) and the nodes reading its output (the ArgMax that
      writes ``labels``): both outputs then come from float32 sums of the fp16 features, not from
      fp16-rounded logits (~0.008 apart at magnitude 10, which turns near-ties into exact ties,
      broken towards the lower class). Measured on the test ViT: no label changed either way and
      the largest logit error went from 8.0e-4 to 7.5e-4, so this guards near-ties only; it costs
      one [D x classes] Gemm. Blocking the head alone is not enough: the converter then casts its
      float32 output to fp16 for an fp16 ArgMax.
    - the ops of ``float16.DEFAULT_OP_BLOCK_LIST`` (none occurs in these graphs).

    Everything else runs in fp16, LayerNorm, Softmax and GELU included (see the module docstring).

    Returns ``(graph, report)``; report = ``{"attention_blocks": Softmax nodes of ``model`` (one per
    attention), "attention_fused": Attention nodes written, "fused": fused_counts(graph),
    "nodes_fp16": nodes reading or writing fp16 tensors, "nodes_fp32": nodes reading or writing
    float32 ones and no fp16 (both leave out Cast and Constant nodes), "kept_fp32": [{"op",
    "nodes", "why"}] for the latter}``.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel

    fused, attention = fused_fp32(model, fuse_attention)
    # Preprocessing found in the exporter's node order (topological, as torch ran the module).
    kept = {n.name: "preprocessing (computes the network input)" for n in _network_input_ancestors(model)}
    # The head, and what reads its output: the float16 converter would otherwise cast the float32
    # logits to fp16 for the ArgMax that writes ``labels``.
    head = next((n for n in fused.graph.node if "logits" in n.output), None)
    tail = [n for n in fused.graph.node if n is head or (head is not None and set(head.output) & set(n.input))]
    kept.update({n.name: "head (writes logits) and the ArgMax reading them" for n in tail})
    converted = OnnxModel(fused)
    converted.convert_float_to_float16(keep_io_types=True, node_block_list=list(kept), op_block_list=list(DEFAULT_OP_BLOCK_LIST))
    out = converted.model
    if _io(out) != _io(model):
        raise RuntimeError(f"fp16 conversion changed the graph's inputs/outputs: {_io(out)} vs {_io(model)}")

    types = _elem_types(out)
    fp16 = fp32 = 0
    why: Counter = Counter()
    for node in out.graph.node:
        if node.op_type in ("Cast", "Constant"):
            continue
        made = {types.get(t) for t in (*node.input, *node.output)}
        if TensorProto.FLOAT16 in made:
            fp16 += 1
        elif TensorProto.FLOAT in made:
            fp32 += 1
            why[(node.op_type, kept.get(node.name, "float32 by the converter"))] += 1
    report = {
        "attention_blocks": attention_softmaxes(model),
        "attention_fused": attention,
        "fused": fused_counts(out),
        "nodes_fp16": fp16,
        "nodes_fp32": fp32,
        "kept_fp32": [{"op": op, "nodes": n, "why": w} for (op, w), n in sorted(why.items())],
    }
    return out, report


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor of ``model`` (ONNX Runtime's symbolic shape inference, which
    knows the contrib ops)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
    values = (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input)
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    return types
