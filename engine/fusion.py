"""The CUDA variant of the step graph: each GroupNorm32 (+ the SiLU after it) as one fused kernel.

The exported UNet normalises with ``GroupNorm32``, which computes its statistics in fp32 and returns
the input dtype. In ONNX that is an island of seven nodes per norm, and the SiLU after it is two more:

    x -> Cast(fp32) -> Reshape(0, G, -1) -> InstanceNormalization(ones, zeros, eps) -> Reshape(Shape)
      -> Mul(gamma) -> Add(beta) -> Cast(back to x's type) [-> Sigmoid, Mul]          (SiLU)

On the GPU each node is a memory-bound kernel over the whole activation, about 20 passes over it.
:func:`fuse_group_norms` rewrites each island into ONNX Runtime's ``com.microsoft.GroupNorm``
(channels-last, fp32 statistics inside the kernel, ``activation=1`` when the SiLU follows it and
nothing else reads the norm's output), with a Transpose into and out of channels-last around it:

    x [N, C, H, W] -> Transpose(0, 2, 3, 1) -> GroupNorm -> Transpose(0, 3, 1, 2)
    x [N, C, L]    -> Transpose(0, 2, 1) -> Unsqueeze(1) -> GroupNorm -> Squeeze(1) -> Transpose(0, 2, 1)

(the second form is the attention blocks' norm, which runs on [N, C, H*W]). ONNX Runtime's CUDA
provider with ``prefer_nhwc`` runs the convolutions channels-last and its transpose optimiser can
then cancel the Transposes between a norm and its neighbours; without it they are two copies per
norm, still far fewer passes than the island.

Why not ONNX Runtime's own optimiser (``onnxruntime.transformers.optimizer``, model type ``unet``)?
Tried first, on the digits fp16 step graph: it fuses 21 of the 25 norms, keeps the fp32 Casts
around each (two extra passes per norm: it matches the island from the first Reshape, so the
GroupNorm reads and writes fp32), and misses the four attention norms (3-D input); it also turns
every convolution into ``NhwcConv``. This module matches this export's island exactly, including
its Casts, and leaves the convolutions to the provider.

The kernel's limits (ONNX Runtime's ``group_norm_impl.cu``): channels divisible by the groups, an
even number of channels per group (two channels per thread) and at most 32 groups. A norm outside
them stays as it was (``supported`` decides; :func:`cuda_supports`). ``com.microsoft.GroupNorm`` has
no CPU kernel: the fused graph runs only on the CUDA provider. CI checks it on the CPU through
:func:`expand_fused`, which turns every fused node back into standard ONNX ops (the inverse), and
:func:`group_norm_reference`, a numpy statement of the op's documented semantics.

Written and checked on a CPU-only machine: what of the fused graph ran on a GPU is recorded in
docs/gpu.md and ``benchmarks/results/``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "CONTRIB_DOMAIN",
    "GROUP_NORMALIZATION_OPSET",
    "as_group_normalization",
    "cuda_supports",
    "expand_fused",
    "fuse_group_norms",
    "fused_counts",
    "group_norm_reference",
]

CONTRIB_DOMAIN = "com.microsoft"


def cuda_supports(channels: int, groups: int) -> bool:
    """Whether ONNX Runtime's CUDA GroupNorm kernel takes this shape (its ``group_norm_impl.cu``)."""
    return groups <= 32 and channels % groups == 0 and (channels // groups) % 2 == 0


class _Graph:
    """Producer/consumer maps and constant lookup over one ONNX graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = defaultdict(list)
        for n in graph.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.outputs = {o.name for o in graph.output}
        self.initializers = {i.name: i for i in graph.initializer}

    def const(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def only_consumer(self, name: str, op_type: str):
        """The single node reading ``name`` if it is an ``op_type`` and ``name`` is not a graph output."""
        users = self.consumers.get(name, [])
        if len(users) != 1 or name in self.outputs or users[0].op_type != op_type:
            return None
        return users[0]


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _match(g: _Graph, norm) -> dict | None:
    """The island around one InstanceNormalization node, or None when it is not a GroupNorm32's."""
    scale, bias = g.const(norm.input[1]), g.const(norm.input[2]) if len(norm.input) > 2 else None
    if scale is None or bias is None or scale.ndim != 1 or not np.all(scale == 1) or not np.all(bias == 0):
        return None
    groups = int(scale.shape[0])
    r1 = g.producer.get(norm.input[0])
    only = g.only_consumer(r1.output[0], "InstanceNormalization") if r1 is not None and r1.op_type == "Reshape" else None
    if only is None or only.name != norm.name:
        return None
    shape = g.const(r1.input[1])
    if shape is None or shape.tolist() != [0, groups, -1]:
        return None
    cast_in = g.producer.get(r1.input[0])
    if cast_in is None or cast_in.op_type != "Cast" or _attr(cast_in, "to") != TensorProto.FLOAT:
        return None
    r2 = g.only_consumer(norm.output[0], "Reshape")
    if r2 is None:
        return None
    shape_node = g.producer.get(r2.input[1])
    if shape_node is None or shape_node.op_type != "Shape" or shape_node.input[0] != cast_in.output[0]:
        return None
    mul = g.only_consumer(r2.output[0], "Mul")
    if mul is None:
        return None
    gamma = g.const(mul.input[1] if mul.input[0] == r2.output[0] else mul.input[0])
    add = g.only_consumer(mul.output[0], "Add")
    if gamma is None or add is None:
        return None
    beta = g.const(add.input[1] if add.input[0] == mul.output[0] else add.input[0])
    cast_out = g.only_consumer(add.output[0], "Cast")
    if beta is None or cast_out is None:
        return None
    channels = int(gamma.shape[0]) if gamma.ndim else 0
    rank = gamma.ndim + 1  # gamma is [C, 1, 1] for [N, C, H, W] and [C, 1] for [N, C, L]
    if rank not in (3, 4) or gamma.shape != (channels,) + (1,) * (rank - 2) or beta.shape != gamma.shape:
        return None
    if channels % groups:
        return None
    # Every node of the island feeds only the next one (checked above). The Cast into fp32 also
    # feeds the Shape, and may feed more: in an fp32 graph it is the identity and the exporter reads
    # its output for the residual too. Then it stays for those readers; the fused norm reads x.
    if len(g.consumers[shape_node.output[0]]) != 1 or shape_node.output[0] in g.outputs:
        return None
    island = [r1, norm, shape_node, r2, mul, add, cast_out]
    others = {n.name for n in g.consumers[cast_in.output[0]]} - {r1.name, shape_node.name}
    if not others and cast_in.output[0] not in g.outputs:
        island.insert(0, cast_in)
    out = cast_out.output[0]
    # SiLU: y -> Sigmoid(y), Mul(y, Sigmoid(y)), and nothing else reads y.
    users = g.consumers.get(out, [])
    activation = 0
    if out not in g.outputs and len(users) == 2:
        sig = next((u for u in users if u.op_type == "Sigmoid"), None)
        silu = next((u for u in users if u.op_type == "Mul"), None)
        if sig is not None and silu is not None and sorted(silu.input) == sorted([out, sig.output[0]]) \
                and getattr(g.only_consumer(sig.output[0], "Mul"), "name", None) == silu.name:
            island += [sig, silu]
            out, activation = silu.output[0], 1
    return {
        "x": cast_in.input[0], "out": out, "nodes": island,
        "core": [r1, norm, shape_node, r2, mul, add], "x32": cast_in.output[0], "normed": add.output[0], "groups": groups, "channels": channels,
        "rank": rank, "epsilon": float(_attr(norm, "epsilon", 1e-5)), "activation": activation,
        "gamma": gamma.reshape(-1).astype(np.float32), "beta": beta.reshape(-1).astype(np.float32),
        "name": norm.name.rsplit("/", 1)[0] or norm.name,
    }


def _fused_nodes(m: dict, k: int, initializers: list) -> list:
    """The replacement of island ``m``: layout change, com.microsoft.GroupNorm, layout change back."""
    p = f"fused_group_norm_{k}"
    gamma, beta = f"{p}.gamma", f"{p}.beta"
    initializers += [numpy_helper.from_array(m["gamma"], gamma), numpy_helper.from_array(m["beta"], beta)]
    norm = helper.make_node(
        "GroupNorm", [f"{p}.nhwc", gamma, beta], [f"{p}.y"], name=f"{p}/GroupNorm", domain=CONTRIB_DOMAIN,
        activation=m["activation"], channels_last=1, epsilon=m["epsilon"], groups=m["groups"],
    )
    if m["rank"] == 4:
        return [
            helper.make_node("Transpose", [m["x"]], [f"{p}.nhwc"], name=f"{p}/to_nhwc", perm=[0, 2, 3, 1]),
            norm,
            helper.make_node("Transpose", [f"{p}.y"], [m["out"]], name=f"{p}/to_nchw", perm=[0, 3, 1, 2]),
        ]
    axis = f"{p}.axis"
    initializers.append(numpy_helper.from_array(np.array([1], dtype=np.int64), axis))
    return [
        helper.make_node("Transpose", [m["x"]], [f"{p}.nlc"], name=f"{p}/to_nlc", perm=[0, 2, 1]),
        helper.make_node("Unsqueeze", [f"{p}.nlc", axis], [f"{p}.nhwc"], name=f"{p}/to_nhwc"),
        norm,
        helper.make_node("Squeeze", [f"{p}.y", axis], [f"{p}.ylc"], name=f"{p}/from_nhwc"),
        helper.make_node("Transpose", [f"{p}.ylc"], [m["out"]], name=f"{p}/to_ncl", perm=[0, 2, 1]),
    ]


def _drop_dead(graph: onnx.GraphProto) -> None:
    """Remove nodes and initializers nothing reads any more (the islands' constants)."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    produced = {o for n in graph.node for o in n.output}
    for vi in [v for v in graph.value_info if v.name not in produced]:
        graph.value_info.remove(vi)


def _with_domain(model: onnx.ModelProto, domain: str, version: int = 1) -> None:
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, version))


def _islands(model: onnx.ModelProto, supported: Callable[[int, int], bool]) -> tuple[onnx.ModelProto, list, list, int]:
    """A copy of ``model`` (node names made unique: nodes are matched by name), its islands that
    ``supported(channels, groups)`` allows, the norms left and why, and the number of norms."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    seen: set = set()
    for i, n in enumerate(copy.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.name or n.op_type}__{i}"
        seen.add(n.name)
    g = _Graph(copy.graph)
    matches, skipped = [], []
    norms = [n for n in copy.graph.node if n.op_type == "InstanceNormalization"]
    for norm in norms:
        m = _match(g, norm)
        if m is None:
            skipped.append({"node": norm.name, "why": "not a GroupNorm32 island"})
        elif not supported(m["channels"], m["groups"]):
            skipped.append({"node": m["name"], "why": f"{m['channels']} channels in {m['groups']} groups: not supported by the kernel"})
        else:
            matches.append(m)
    return copy, matches, skipped, len(norms)


def _replace(model: onnx.ModelProto, matches: list, removed_of, anchor_of, make) -> None:
    """Replace, in place, each match's ``removed_of(m)`` nodes by ``make(m, k, initializers)``, emitted
    where its ``anchor_of(m)`` node was (the last of them: every input is produced by then)."""
    anchors = {anchor_of(m).name: (k, m) for k, m in enumerate(matches)}
    removed = {n.name for m in matches for n in removed_of(m)}
    new_inits: list = []
    nodes = []
    for n in model.graph.node:
        if n.name in anchors:
            k, m = anchors[n.name]
            nodes += make(m, k, new_inits)
        elif n.name not in removed:
            nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(new_inits)
    _drop_dead(model.graph)


def fuse_group_norms(
    model: onnx.ModelProto, supported: Callable[[int, int], bool] = cuda_supports
) -> tuple[onnx.ModelProto, dict]:
    """A copy of ``model`` with every GroupNorm32 island that ``supported(channels, groups)`` allows
    replaced by ``com.microsoft.GroupNorm``; returns (model, report). The report counts the norms
    found, fused, fused with their SiLU, and lists the ones left as they were and why."""
    fused, matches, skipped, norms = _islands(model, supported)
    _replace(fused, matches, lambda m: m["nodes"], lambda m: m["nodes"][-1], _fused_nodes)
    if matches:
        _with_domain(fused, CONTRIB_DOMAIN)
    report = {
        "norms": norms,
        "fused": len(matches),
        "fused_with_silu": sum(m["activation"] for m in matches),
        "attention_norms_fused": sum(m["rank"] == 3 for m in matches),
        "left": skipped,
    }
    return fused, report


#: The opset of :func:`as_group_normalization`'s graphs: GroupNormalization-21 (per-channel scale and
#: bias, ``stash_type`` for the statistics' precision).
GROUP_NORMALIZATION_OPSET = 21


def as_group_normalization(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """For TensorRT builds: a copy of ``model`` at opset 21 where each island's core (Reshape,
    InstanceNormalization, Reshape, Mul, Add) is one standard ``GroupNormalization`` (fp32 statistics,
    ``stash_type`` 1), which TensorRT's ONNX parser maps to its native normalisation layer. The Casts
    around it stay (the norm runs on the fp32 tensor, as GroupNorm32 does), and so does the SiLU
    (TensorRT fuses pointwise ops itself). Standard ONNX: ONNX Runtime's CPU provider runs it, which
    is how CI checks it."""
    from onnx import version_converter

    upgraded = version_converter.convert_version(model, GROUP_NORMALIZATION_OPSET)
    out, matches, skipped, norms = _islands(upgraded, lambda channels, groups: True)

    def make(m, k, initializers):
        p = f"group_normalization_{k}"
        initializers += [numpy_helper.from_array(m["gamma"], f"{p}.scale"), numpy_helper.from_array(m["beta"], f"{p}.bias")]
        # GroupNormalization takes any rank >= 3 with channels second: [N, C, H, W] and [N, C, L] alike.
        return [helper.make_node("GroupNormalization", [m["x32"], f"{p}.scale", f"{p}.bias"], [m["normed"]], name=f"{p}/GroupNormalization",
                                 epsilon=m["epsilon"], num_groups=m["groups"], stash_type=1)]

    _replace(out, matches, lambda m: m["core"], lambda m: m["core"][-1], make)
    return out, {"norms": norms, "group_normalization": len(matches), "left": skipped}


def fused_counts(model: onnx.ModelProto) -> dict:
    """Op counts of a graph: com.microsoft ops by name, and the norm islands' ops still present."""
    ops = Counter((n.domain or "ai.onnx", n.op_type) for n in model.graph.node)
    return {
        "GroupNorm": ops[(CONTRIB_DOMAIN, "GroupNorm")],
        "GroupNorm+SiLU": sum(1 for n in model.graph.node if n.op_type == "GroupNorm" and _attr(n, "activation") == 1),
        "InstanceNormalization": ops[("ai.onnx", "InstanceNormalization")],
        "Sigmoid": ops[("ai.onnx", "Sigmoid")],
        "Cast": ops[("ai.onnx", "Cast")],
        "Transpose": ops[("ai.onnx", "Transpose")],
    }


def expand_fused(model: onnx.ModelProto) -> onnx.ModelProto:
    """The inverse of the rewrite: every ``com.microsoft.GroupNorm`` (channels-last) expanded into
    standard ONNX ops that ONNX Runtime's CPU provider runs: back to channels-first, fp32 statistics
    (InstanceNormalization over [N, G, -1]), gamma, beta, the SiLU when ``activation`` is 1, the
    input's dtype (CastLike), channels-last again."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits: list = []
    nodes = []
    for k, n in enumerate(out.graph.node):
        if not (n.domain == CONTRIB_DOMAIN and n.op_type == "GroupNorm"):
            nodes.append(n)
            continue
        if _attr(n, "channels_last", 1) != 1:
            raise ValueError(f"{n.name}: only channels_last GroupNorm is expanded")
        x, gamma, beta = n.input[:3]
        (y,) = n.output
        groups, eps, act = int(_attr(n, "groups")), float(_attr(n, "epsilon", 1e-5)), int(_attr(n, "activation"))
        p = f"expanded_{k}"

        def c(name, value, _p=p):
            inits.append(numpy_helper.from_array(np.asarray(value), f"{_p}.{name}"))
            return f"{_p}.{name}"

        chw = c("chw", np.array([-1, 1, 1], dtype=np.int64))
        steps = [
            helper.make_node("Transpose", [x], [f"{p}.nchw"], perm=[0, 3, 1, 2]),
            helper.make_node("Cast", [f"{p}.nchw"], [f"{p}.f32"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", [f"{p}.f32", c("groups", np.array([0, groups, -1], dtype=np.int64))], [f"{p}.ng"]),
            helper.make_node(
                "InstanceNormalization",
                [f"{p}.ng", c("ones", np.ones(groups, np.float32)), c("zeros", np.zeros(groups, np.float32))],
                [f"{p}.norm"], epsilon=eps,
            ),
            helper.make_node("Shape", [f"{p}.f32"], [f"{p}.shape"]),
            helper.make_node("Reshape", [f"{p}.norm", f"{p}.shape"], [f"{p}.normed"]),
            helper.make_node("Reshape", [gamma, chw], [f"{p}.gamma"]),
            helper.make_node("Reshape", [beta, chw], [f"{p}.beta"]),
            helper.make_node("Mul", [f"{p}.normed", f"{p}.gamma"], [f"{p}.scaled"]),
            helper.make_node("Add", [f"{p}.scaled", f"{p}.beta"], [f"{p}.affine"]),
        ]
        last = f"{p}.affine"
        if act == 1:
            steps += [
                helper.make_node("Sigmoid", [last], [f"{p}.sig"]),
                helper.make_node("Mul", [last, f"{p}.sig"], [f"{p}.silu"]),
            ]
            last = f"{p}.silu"
        steps += [
            helper.make_node("CastLike", [last, x], [f"{p}.typed"]),
            helper.make_node("Transpose", [f"{p}.typed"], [y], perm=[0, 2, 3, 1]),
        ]
        for j, s in enumerate(steps):
            s.name = f"{p}/{j}_{s.op_type}"
        nodes += steps
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(inits)
    if not any(n.domain == CONTRIB_DOMAIN for n in out.graph.node):
        keep = [o for o in out.opset_import if o.domain != CONTRIB_DOMAIN]
        del out.opset_import[:]
        out.opset_import.extend(keep)
    return out


def group_norm_reference(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, groups: int, epsilon: float,
                         activation: int) -> np.ndarray:
    """``com.microsoft.GroupNorm`` as documented, in float64 numpy: ``x`` is [N, H, W, C]; per sample
    and group of C / groups channels, y = gamma * (x - mean) / sqrt(var + epsilon) + beta (biased
    variance over H, W and the group's channels); then y * sigmoid(y) when ``activation`` is 1.
    Returns the input's dtype."""
    n, h, w, ch = x.shape
    v = x.astype(np.float64).reshape(n, h * w, groups, ch // groups)
    mean = v.mean(axis=(1, 3), keepdims=True)
    var = v.var(axis=(1, 3), keepdims=True)
    y = ((v - mean) / np.sqrt(var + epsilon)).reshape(n, h, w, ch) * gamma.astype(np.float64) + beta.astype(np.float64)
    if activation == 1:
        y = y / (1.0 + np.exp(-y))
    return y.astype(x.dtype)
