"""The fp16 classifier graph with fused attention (engine/classifier_fp16.py), checked on the CPU.

Every graph here is exported as the engine builder exports classifiers (``export_graph`` with
``classifier_spec``), and every number is compared with an independent reference: the unfused fp32
graph that the exporter wrote (or the PyTorch module).

fp16 on ONNX Runtime's CPU provider (onnxruntime 1.32, x86-64; measured with one fp16 node per
graph, reading the graph the session saves): LayerNormalization and SkipLayerNormalization have fp16
CPU kernels; MatMul, Gemm, Conv, Add, Relu, MaxPool, Softmax, Erf and the contrib ops Attention,
MultiHeadAttention and BiasGelu do not. The session still runs the fp16 graph: its
InsertCastTransformer computes those nodes in float32 between Casts, silently, and it joins
neighbouring such nodes into one float32 region with no fp16 rounding inside (in the ViT
Attention -> MatMul and MatMul -> BiasGelu -> MatMul; fp16-capable nodes caught between float32
ones join the region too). So the real fp16 graph on the CPU rounds the weights and the tensors at
region boundaries (the residual stream around SkipLayerNormalization) to fp16, and no more.

The agreement tests therefore run two things against the fp32 graph: the real fp16 graph as the CPU
provider runs it, and :func:`_fp16_storage_emulation` of it: the same graph in float32 with explicit
Cast pairs that round every tensor the fp16 graph holds in fp16 (the CPU provider keeps such Casts),
i.e. fp16 weights and fp16 storage of every activation, with float32 arithmetic inside each op. That
is what a GPU run does up to the arithmetic inside its kernels (ONNX Runtime's CUDA Attention,
LayerNorm and softmax kernels, and its cuBLAS fp16 GEMMs, accumulate in float32; not run here: this
machine has no GPU).
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

import densepure_rt
from densepure_rt.engine.classifier_fp16 import fp16_classifier, fused_counts, fused_fp32
from densepure_rt.export.classifiers import _CIFAR10_HF_CONFIG, PurifiedClassifier, timm_vit_from_hf_config
from densepure_rt.export.models import load_classifier
from densepure_rt.export.onnx_export import classifier_spec, export_graph

#: The cifar10 preset's classifier (ViT-B/16 at 224, GELU, LayerNorm eps 1e-12, qkv bias, the uint8
#: PIL preprocessing from 32 x 32) narrowed for speed: 3 blocks of width 192 with 3 heads of 64 (the
#: head size of ViT-B), so every structure the fusions match is there.
SMALL_VIT = dict(_CIFAR10_HF_CONFIG, num_hidden_layers=3, hidden_size=192, num_attention_heads=3, intermediate_size=768)


def _export(module: torch.nn.Module, channels: int, side: int, num_classes: int, folder) -> onnx.ModelProto:
    spec = classifier_spec((channels, side, side), num_classes)
    export_graph(module, spec, folder, (torch.rand(2, channels, side, side) * 2 - 1,))
    return onnx.load(str(folder / spec.file))


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto, images: np.ndarray, batch: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """(labels, logits) of ``model`` on ONNX Runtime's CPU provider."""
    session = _session(model)
    outs = [session.run(["labels", "logits"], {"image": images[i : i + batch]}) for i in range(0, len(images), batch)]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def _offset_images(count: int, side: int, seed: int) -> np.ndarray:
    """Purified-looking images in [-1, 1]: a random level per channel plus pixel noise (std 0.3).
    Pure noise images would not do: the random-weight ViT of this file gives all 400 of 400
    uniform-noise images one label, so agreement would be trivial."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (count, 3, 1, 1)) + 0.3 * rng.standard_normal((count, 3, side, side))
    return np.clip(x, -1, 1).astype(np.float32)


def _io(model: onnx.ModelProto) -> list[tuple]:
    def dims(v):
        return tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)

    return [(v.name, v.type.tensor_type.elem_type, dims(v)) for v in (*model.graph.input, *model.graph.output)]


def _cpu_float32_nodes(model: onnx.ModelProto, tmp_path) -> dict[str, int]:
    """Op types of the nodes that read an fp16 tensor through a float32 Cast that ONNX Runtime's
    CPU provider inserted (the first node of each float32 region): from the graph the session
    saves with graph optimisations off."""
    saved = str(tmp_path / "cpu_session.onnx")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.optimized_model_filepath = saved
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(saved).graph
    inserted = {o for n in graph.node if n.op_type == "Cast" and n.name.startswith("InsertedPrecisionFreeCast") for o in n.output}
    return dict(collections.Counter(n.op_type for n in graph.node if n.op_type != "Cast" and inserted & set(n.input)))


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor (ONNX Runtime's symbolic shape inference knows the contrib ops)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
    return {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input)}


def _fp16_storage_emulation(fp16: onnx.ModelProto) -> onnx.ModelProto:
    """``fp16`` computed in float32 with fp16 storage: fp16 initializers widened to float32 (exact),
    and after every node output that is fp16 in ``fp16`` a Cast to fp16 and back, so the next op
    reads the fp16-rounded value. Types from ONNX Runtime's symbolic shape inference."""
    from onnx import helper, numpy_helper

    half = {name for name, t in _elem_types(fp16).items() if t == TensorProto.FLOAT16}
    model = onnx.ModelProto()
    model.CopyFrom(fp16)
    for t in model.graph.initializer:
        if t.data_type == TensorProto.FLOAT16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        for i, out in enumerate(list(node.output)):
            if out in half:
                node.output[i] = f"{out}/computed"
                nodes.append(helper.make_node("Cast", [f"{out}/computed"], [f"{out}/fp16"], to=TensorProto.FLOAT16))
                nodes.append(helper.make_node("Cast", [f"{out}/fp16"], [out], to=TensorProto.FLOAT))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.value_info[:]
    return model


def _agreement(labels16, logits16, labels32, logits32) -> dict:
    """Label agreement of the fp16 graph with the fp32 one, and where they disagree: a disagreement
    is explained when the fp32 top-two gap of that row is within twice the row's largest logit
    error (each of the two logits may have moved by that much)."""
    top = np.sort(logits32, axis=1)
    gap = top[:, -1] - top[:, -2]
    row_err = np.abs(logits16 - logits32).max(axis=1)
    differ = labels16 != labels32
    return {
        "agreement": float(np.mean(~differ)),
        "unexplained": int(np.sum(differ & (gap > 2 * row_err))),
        "near_ties": float(np.mean(gap <= 2 * row_err.max())),
        "max_abs": float(row_err.max()),
        "rel_l2": float(np.linalg.norm(logits16 - logits32) / np.linalg.norm(logits32)),
        "classes": np.bincount(labels32, minlength=logits32.shape[1]),
    }


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """(PyTorch classifier, its exported fp32 graph, fp16 graph, report) for the narrowed cifar10 ViT.

    timm's initialisation (``init_weights_vit_timm``): every Linear, the head included, gets
    truncated-normal weights of std 0.02 and zero biases, so the head is not zero and the logits
    move with the image (standard deviation 0.26 across this file's images, against a largest
    fp16 logit error of 8e-4)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        net = timm_vit_from_hf_config(SMALL_VIT)
    module = PurifiedClassifier.for_preset("cifar10", net.eval()).eval()
    graph = _export(module, 3, 32, 10, tmp_path_factory.mktemp("vit"))
    fp16, report = fp16_classifier(graph)
    return module, graph, fp16, report


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The digits preset's classifier with its shipped weights, loaded as the engine build loads it."""
    module = load_classifier("digits")
    graph = _export(module, 1, 16, 10, tmp_path_factory.mktemp("digits"))
    fp16, report = fp16_classifier(graph)
    return module, graph, fp16, report


@pytest.mark.slow
def test_one_fused_attention_per_transformer_block(vit):
    module, graph, fp16, report = vit
    blocks = len(module.net.blocks)  # counted on the PyTorch module
    heads = module.net.blocks[0].attn.num_heads
    assert blocks == 3 and report["attention_blocks"] == blocks and report["attention_fused"] == blocks
    fused, written = fused_fp32(graph)
    for g in (fused, fp16):
        counts = fused_counts(g)
        assert counts["Attention"] == blocks
        # ONNX Runtime's own fusions: LayerNorm after each residual Add (norm2 of every block, norm1
        # of every block but the first, the final norm) and bias + exact GELU of each MLP.
        assert counts["SkipLayerNormalization"] == 2 * blocks and counts["BiasGelu"] == blocks
        attention = [n for n in g.graph.node if n.op_type == "Attention"]
        assert all(onnx.helper.get_attribute_value(a) == heads for n in attention for a in n.attribute if a.name == "num_heads")
        assert not any(n.op_type in ("Softmax", "Split") for n in g.graph.node)
    assert written == blocks


@pytest.mark.slow
def test_fused_fp32_graph_equals_the_unfused_graph_on_the_cpu(vit):
    # Attention, SkipLayerNormalization and BiasGelu have float32 CPU kernels: the fused graph runs
    # as it is. Bound: 1e-5 absolute on logits of magnitude ~1 (measured: 3.9e-7; a wrong head
    # count or scale in the Attention node moves them by 1e-3 or more).
    module, graph, _, _ = vit
    images = _offset_images(16, 32, seed=1)
    fused, _ = fused_fp32(graph)
    labels, logits = _run(fused, images)
    want_labels, want = _run(graph, images)
    assert np.abs(want).max() > 0.1
    assert np.abs(logits - want).max() <= 1e-5
    assert np.array_equal(labels, want_labels)
    with torch.no_grad():  # and the PyTorch module itself, at the exporter's own tolerance
        torch_logits = module(torch.from_numpy(images)).numpy()
    assert np.abs(logits - torch_logits).max() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("run", ["fp16 graph", "fp16 storage emulation"])
def test_fp16_vit_labels_agree_with_the_fp32_graph(vit, run):
    _, graph, fp16, _ = vit
    images = _offset_images(400, 32, seed=2)
    labels32, logits32 = _run(graph, images)
    labels16, logits16 = _run(fp16 if run == "fp16 graph" else _fp16_storage_emulation(fp16), images)
    stats = _agreement(labels16, logits16, labels32, logits32)
    # The check means something: the labels spread over the classes, and few rows are near-ties
    # (measured: all 10 classes, the largest 32%; 0.5% of rows have a top-two gap within twice
    # the largest logit error, which was 7.5e-4 for the fp16 graph and 8.3e-4 for the emulation).
    assert (stats["classes"] > 0).sum() >= 5 and stats["classes"].max() <= 0.5 * len(images), stats
    assert stats["near_ties"] <= 0.05, stats
    assert stats["agreement"] >= 0.995 and stats["unexplained"] == 0, stats
    assert stats["rel_l2"] <= 1e-2, stats


@pytest.mark.parametrize("run", ["fp16 graph", "fp16 storage emulation"])
def test_fp16_digits_labels_agree_with_the_fp32_graph(digits, run):
    module, graph, fp16, report = digits
    assert report["attention_blocks"] == 0 and report["attention_fused"] == 0
    with np.load(Path(densepure_rt.__file__).resolve().parent / "assets" / "digits_test.npz") as npz:
        clean, truth = npz["images"] * 2 - 1, npz["labels"]  # [0, 1] -> the purified range [-1, 1]
    noisy = np.clip(clean + 0.5 * np.random.default_rng(3).standard_normal(clean.shape), -1, 1)
    images = np.concatenate([clean, noisy]).astype(np.float32)  # 720 rows
    labels32, logits32 = _run(graph, images)
    labels16, logits16 = _run(fp16 if run == "fp16 graph" else _fp16_storage_emulation(fp16), images)
    assert np.mean(labels32[: len(clean)] == truth) >= 0.97  # the shipped weights, really loaded
    with torch.no_grad():
        assert np.array_equal(module(torch.from_numpy(images)).argmax(1).numpy(), labels32)
    stats = _agreement(labels16, logits16, labels32, logits32)
    assert len(images) >= 400 and stats["agreement"] >= 0.995 and stats["unexplained"] == 0, stats
    assert stats["rel_l2"] <= 1e-2, stats


@pytest.mark.parametrize("which", [pytest.param("vit", marks=pytest.mark.slow), "digits"])
def test_graph_inputs_and_outputs_are_unchanged(which, request):
    _, graph, fp16, report = request.getfixturevalue(which)
    assert _io(fp16) == _io(graph)
    side, channels = (32, 3) if which == "vit" else (16, 1)
    assert _io(graph) == [
        ("image", TensorProto.FLOAT, ("batch", channels, side, side)),
        ("labels", TensorProto.INT64, ("batch",)),
        ("logits", TensorProto.FLOAT, ("batch", 10)),
    ]
    labels, logits = _session(fp16).run(["labels", "logits"], {"image": np.zeros((3, channels, side, side), np.float32)})
    assert labels.dtype == np.int64 and labels.shape == (3,) and logits.dtype == np.float32 and logits.shape == (3, 10)
    assert report["nodes_fp16"] > report["nodes_fp32"] > 0


def test_network_is_fp16_and_preprocessing_and_head_stay_float32(vit, tmp_path):
    _, graph, fp16, report = vit
    initializers = {t.name: t.data_type for t in fp16.graph.initializer}
    types = _elem_types(fp16)
    for node in fp16.graph.node:
        weights = [initializers[i] for i in node.input if i in initializers]
        if node.op_type in ("Attention", "MatMul", "SkipLayerNormalization", "BiasGelu", "Conv"):
            assert weights and set(weights) == {TensorProto.FLOAT16}, node.name
            assert types[node.input[0]] == types[node.output[0]] == TensorProto.FLOAT16, node.name
        if node.op_type in ("Resize", "Round", "Floor", "Clip"):  # the uint8 PIL round trip
            assert types[node.input[0]] == types[node.output[0]] == TensorProto.FLOAT, node.name
    # The head Gemm computes in float32 from float32 weights, and ArgMax reads its float32 output.
    gemm = next(n for n in fp16.graph.node if n.op_type == "Gemm")
    argmax = next(n for n in fp16.graph.node if "labels" in n.output)
    assert {initializers[i] for i in gemm.input if i in initializers} == {TensorProto.FLOAT}
    assert types[gemm.input[0]] == types[gemm.output[0]] == types[argmax.input[0]] == TensorProto.FLOAT
    kept = {(k["op"], k["why"].split(" ")[0]) for k in report["kept_fp32"]}
    assert {("Resize", "preprocessing"), ("Round", "preprocessing"), ("Gemm", "head"), ("ArgMax", "head")} <= kept
    # The caveat of this file's docstring: the CPU provider computes these fp16 nodes in float32.
    # (Should this fail, ONNX Runtime has gained fp16 CPU kernels: update the docstring.)
    wrapped = _cpu_float32_nodes(fp16, tmp_path)
    assert {"Attention", "MatMul"} <= set(wrapped), wrapped


def test_beit_attention_with_relative_position_bias_is_left_unfused(tmp_path, monkeypatch):
    # The imagenet preset's BEiT adds a relative position bias to the scores before the softmax:
    # neither ONNX Runtime's optimizer nor fuse_timm_attention matches it, and nothing forces it.
    import timm

    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: create(name, **{**kw, "embed_dim": 64, "depth": 2, "num_heads": 2}))
    module = load_classifier("imagenet", random_weights=True, seed=3)
    graph = _export(module, 3, 256, 1000, tmp_path)
    fp16, report = fp16_classifier(graph)
    assert report["attention_blocks"] == len(module.net.blocks) == 2 and report["attention_fused"] == 0
    assert "Attention" not in fused_counts(fp16)
    images = np.random.default_rng(4).uniform(-1, 1, (4, 3, 256, 256)).astype(np.float32)
    _, logits32 = _run(graph, images)
    _, logits16 = _run(fp16, images)
    assert np.linalg.norm(logits16 - logits32) / np.linalg.norm(logits32) <= 1e-2


@pytest.mark.gpu
def test_fp16_vit_on_the_cuda_provider_agrees_with_the_fp32_graph(vit):
    """Issue 23 on a GPU: the fused fp16 ViT on ONNX Runtime's CUDA provider (its fp16 Attention,
    SkipLayerNormalization and BiasGelu kernels) against the fp32 graph on the CPU: >= 99.5% equal
    labels on 400 images. Skipped where onnxruntime-gpu or a GPU is missing (not run yet)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    _, graph, fp16, _ = vit
    images = _offset_images(400, 32, seed=3)
    labels32, logits32 = _run(graph, images)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(fp16.SerializeToString(), options, providers=["CUDAExecutionProvider"])
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    labels16, logits16 = session.run(["labels", "logits"], {"image": images})
    stats = _agreement(labels16, logits16, labels32, logits32)
    print(f"fp16 ViT on CUDA vs fp32 on CPU: {stats}")
    assert stats["agreement"] >= 0.995, stats
