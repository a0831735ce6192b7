"""The CUDA step graph's fused GroupNorm (issue 23), checked on the CPU.

``com.microsoft.GroupNorm`` has no CPU kernel, so the rewrite is checked three ways here:
structurally (which norms were fused, counted from the PyTorch network, not from the graph),
numerically through its inverse (:func:`expand_fused` turns every fused node back into standard ONNX
ops; the expanded graph must equal the exported one, and reproduce the official code's trajectory),
and the inverse itself against a numpy statement of the op's documented semantics, which is in turn
checked against PyTorch's ``group_norm``. The fused graph itself runs only on a GPU (not here).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import load_file

from conftest import fixture_dir, load_fixture_unet, read_json
from densepure_rt.engine.build import BuildOptions, build_engine
from densepure_rt.engine.fusion import (
    CONTRIB_DOMAIN,
    cuda_supports,
    expand_fused,
    fuse_group_norms,
    fused_counts,
    group_norm_reference,
)
from densepure_rt.export.reference import to_diffusion_input
from densepure_rt.export.unet import AttentionBlock, GroupNorm32, ResBlock
from oracle import open_reference
from test_export_parity import KINDS, fixture_preset, small_classifier

#: One test process runs this module (``--dist loadgroup``): its module fixtures (the fixture UNet's fp32
#: and fp16 engines, the digits graphs and the --device cuda engine) are set up once, not once in each
#: process.
pytestmark = pytest.mark.xdist_group("fusion")

ALL = lambda channels, groups: True  # noqa: E731 -  # fuse every norm (the inverse check does not need the kernel's limits)


def _session(model: onnx.ModelProto):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _group_norm_model(shape, groups, eps, activation, dtype):
    """One com.microsoft.GroupNorm node over an [N, H, W, C] input, as the rewrite writes it."""
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    rng = np.random.default_rng(3)
    gamma = rng.uniform(0.5, 1.5, shape[-1]).astype(np.float32)
    beta = rng.uniform(-0.5, 0.5, shape[-1]).astype(np.float32)
    node = helper.make_node("GroupNorm", ["x", "gamma", "beta"], ["y"], domain=CONTRIB_DOMAIN,
                            activation=activation, channels_last=1, epsilon=eps, groups=groups)
    graph = helper.make_graph(
        [node], "gn", [helper.make_tensor_value_info("x", elem, list(shape))],
        [helper.make_tensor_value_info("y", elem, list(shape))],
        [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(beta, "beta")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(CONTRIB_DOMAIN, 1)])
    return model, gamma, beta


@pytest.mark.parametrize("activation", [0, 1])
def test_numpy_reference_is_pytorch_group_norm(activation):
    """The numpy statement of the op's semantics equals PyTorch's group_norm (+ SiLU), channels-last."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 7, 64)) * 3 + 1
    gamma, beta = rng.standard_normal(64), rng.standard_normal(64)
    want = torch.nn.functional.group_norm(torch.from_numpy(x).permute(0, 3, 1, 2), 32, torch.from_numpy(gamma),
                                          torch.from_numpy(beta), 1e-5)
    if activation:
        want = torch.nn.functional.silu(want)
    got = group_norm_reference(x, gamma, beta, 32, 1e-5, activation)
    assert np.abs(got - want.permute(0, 2, 3, 1).numpy()).max() < 1e-12


@pytest.mark.parametrize("dtype, tol", [(np.float32, 2e-5), (np.float16, 4e-3)])
@pytest.mark.parametrize("activation", [0, 1])
@pytest.mark.parametrize("shape, groups", [((2, 4, 5, 64), 32), ((3, 1, 64, 128), 32), ((1, 8, 8, 96), 16)])
def test_expansion_matches_the_documented_semantics(shape, groups, activation, dtype, tol):
    """expand_fused's standard-op expansion of one GroupNorm, on ONNX Runtime's CPU provider, equals
    the numpy reference (fp32 to float32 rounding; fp16 in and out to half-precision rounding)."""
    model, gamma, beta = _group_norm_model(shape, groups, 1e-5, activation, dtype)
    expanded = expand_fused(model)
    assert not any(n.domain == CONTRIB_DOMAIN for n in expanded.graph.node)
    onnx.checker.check_model(expanded)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    got = _session(expanded).run(None, {"x": x})[0]
    assert got.dtype == dtype and got.shape == x.shape
    want = group_norm_reference(x, gamma, beta, groups, 1e-5, activation)
    assert np.abs(got.astype(np.float64) - want.astype(np.float64)).max() < tol


@pytest.mark.slow
def test_the_fused_graph_does_not_run_on_the_cpu_provider(digits_graphs):
    fused, _ = fuse_group_norms(digits_graphs["fp16"])
    with pytest.raises(Exception, match="GroupNorm"):
        _session(fused)


# -- the digits and fixture networks -------------------------------------------------------------------


def _norm_census(unet: torch.nn.Module) -> dict:
    """What the rewrite should find, counted from the PyTorch modules: every GroupNorm32 and the
    channels it normalises; a SiLU follows each ResBlock's first norm and the output head's norm
    (a scale-shift ResBlock's second norm is followed by the scale and shift first)."""
    norms = [m for m in unet.modules() if isinstance(m, GroupNorm32)]
    resblocks = [m for m in unet.modules() if isinstance(m, ResBlock)]
    silu_after = [r.in_layers[0] for r in resblocks] + [unet.out[0]]
    silu_after += [r.out_layers[0] for r in resblocks if not r.use_scale_shift_norm]
    return {
        "norms": norms,
        "silu": silu_after,
        "attention": [m.norm for m in unet.modules() if isinstance(m, AttentionBlock)],
    }


@pytest.fixture(scope="module")
def fixture_engines(tmp_path_factory):
    """The official code's guided-diffusion fixture UNet, exported in fp32 and fp16 (random linear classifier)."""
    unet, _ = load_fixture_unet(KINDS["guided"][0])
    built = {}
    for precision in ("fp32", "fp16"):
        out = tmp_path_factory.mktemp("fusion") / precision
        build_engine(out, fixture_preset("guided"), unet, small_classifier(), BuildOptions(precision=precision), log=lambda m: None)
        built[precision] = out
    return unet, built


@pytest.fixture(scope="module")
def digits_graphs(tmp_path_factory):
    from densepure_rt.export.models import load_classifier, load_unet
    from densepure_rt.presets import PRESETS

    unet, classifier = load_unet("digits"), load_classifier("digits")

    graphs = {}
    for precision in ("fp32", "fp16"):
        out = tmp_path_factory.mktemp("digits-fusion") / precision
        build_engine(out, PRESETS["digits"], unet, classifier, BuildOptions(precision=precision, validate=False), log=lambda m: None)
        graphs[precision] = onnx.load(str(out / "step.onnx"))
    graphs["unet"] = unet
    return graphs


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_every_norm_of_the_digits_unet_is_found_and_the_kernels_limits_respected(digits_graphs, precision):
    census = _norm_census(digits_graphs["unet"])
    model = digits_graphs[precision]
    fused, report = fuse_group_norms(model, ALL)
    assert report["norms"] == len(census["norms"]) == 25
    assert report["fused"] == len(census["norms"]) and report["left"] == []
    assert report["fused_with_silu"] == len(census["silu"]) == 11
    assert report["attention_norms_fused"] == len(census["attention"]) == 4
    counts = fused_counts(fused)
    assert counts["GroupNorm"] == 25 and counts["GroupNorm+SiLU"] == 11 and counts["InstanceNormalization"] == 0
    assert counts["Sigmoid"] == fused_counts(model)["Sigmoid"] - 11  # each fused SiLU's Sigmoid is gone
    # With the CUDA kernel's limits: the digits UNet's 32- and 96-channel norms (1 and 3 channels per
    # group: the kernel reads two channels per thread) stay as they were.
    supported = [m for m in census["norms"] if m.num_channels // m.num_groups % 2 == 0]
    fused_cuda, report_cuda = fuse_group_norms(model)
    assert report_cuda["fused"] == len(supported) == 15
    assert len(report_cuda["left"]) == 25 - 15 and all("not supported by the kernel" in s["why"] for s in report_cuda["left"])
    assert fused_counts(fused_cuda)["InstanceNormalization"] == 10


def _step_feeds(shape, rows: int, seed: int):
    from densepure_rt.engine.build import _step_inputs
    from densepure_rt.presets import PRESETS

    preset = PRESETS["digits"] if shape[0] == 1 else fixture_preset("guided")
    return dict(zip(["x", "noise", "scalars"], (t.numpy() for t in _step_inputs(preset, rows)(torch.Generator().manual_seed(seed)))))


@pytest.mark.slow
@pytest.mark.parametrize("precision, fuse_all", [("fp32", True), ("fp16", True), ("fp16", False)])
def test_expanded_digits_graph_equals_the_exported_one(digits_graphs, precision, fuse_all):
    """Inverse check: the fused graph with every fused node expanded back, against the exported graph,
    rows at mixed reverse steps. fp32: <= 1e-5. fp16: the fused op applies its SiLU in fp32 before
    rounding (the export rounds first), so the graphs differ by half-precision rounding."""
    model = digits_graphs[precision]
    fused, _ = fuse_group_norms(model, ALL) if fuse_all else fuse_group_norms(model)
    feeds = _step_feeds((1, 16, 16), 6, seed=1)
    want = _session(model).run(None, feeds)[0]
    got = _session(expand_fused(fused)).run(None, feeds)[0]
    err = float(np.abs(got - want).max())
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    print(f"digits {precision}: expanded fused vs exported max abs {err:.2e}, rel L2 {rel:.2e}")
    if precision == "fp32":
        assert err <= 1e-5
    else:
        assert rel <= 1e-3 and err <= 5e-3


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_expanded_fused_fixture_graph_reproduces_the_official_trajectory(fixture_engines, precision):
    """The guided-diffusion fixture UNet with every norm fused, expanded back, and run step by step
    over the official code's trajectory: within 1e-4 of its output in fp32 (as the exported graph), and in fp16 within the
    export's fp16 tolerance of the official fp32 output."""
    unet, engines = fixture_engines
    census = _norm_census(unet)
    folder = fixture_dir(KINDS["guided"][3])
    cfg = read_json(folder / "config.json")
    tr = load_file(str(folder / "trajectory.safetensors"))
    with open_reference(engines[precision]) as ref:
        model = onnx.load(str(engines[precision] / "step.onnx"))
        # Fused as a CUDA build fuses it (the 32- and 96-channel norms stay: 1 and 3 channels per group)...
        fused_cuda, report = fuse_group_norms(model)
        supported = [m for m in census["norms"] if cuda_supports(m.num_channels, m.num_groups)]
        assert report["fused"] == len(supported) > 0 and len(report["left"]) == len(census["norms"]) - len(supported)
        # ... and every norm fused, so that the inverse check covers them all.
        fused, report = fuse_group_norms(model, ALL)
        assert report["fused"] == len(census["norms"]) and report["fused_with_silu"] == len(census["silu"])
        rs = ref._prepare(cfg["sigma"], cfg["steps"], votes=1, batch=4)
        x_t = to_diffusion_input(tr["x_clean"] + tr["delta"], rs).numpy()
        noise = np.stack([tr[f"noise_{i}"].numpy() for i in range(cfg["noise_draws"])])
        exported = ref.loop.purify(x_t, noise)
        ref.loop._step = _session(expand_fused(fused))
        expanded = ref.loop.purify(x_t, noise)
    official = tr["out"].numpy()
    err = float(np.abs(expanded - official).max())
    rel = float(np.linalg.norm(expanded - official) / np.linalg.norm(official))
    print(f"{precision}: expanded fused graph vs official max abs {err:.2e}, rel L2 {rel:.2e}; "
          f"exported graph vs official {float(np.abs(exported - official).max()):.2e}")
    if precision == "fp32":
        assert err < 1e-4
    else:
        assert rel < 5e-3


# -- on a GPU (the `gpu` marker: skipped where CuPy, a CUDA device or onnxruntime-gpu is missing) ------


@pytest.mark.gpu
def test_fused_graph_on_the_gpu_matches_the_portable_fp16_graph(tmp_path):
    """Issue 23's GPU parity: the digits fp16 engine built with --device cuda, run with --kernels fused
    and --kernels portable on the same GPU and the same noise: rel L2 <= 1e-3 after b = 4 steps of 400
    rows, and voted labels agree for >= 99.5% of runs."""
    from conftest import digits_test_images, gpu_cupy, run_labels
    from densepure_rt.export.models import load_classifier, load_unet
    from densepure_rt.presets import PRESETS
    from densepure_rt.runtime import open_engine
    from densepure_rt.sampling.noise import ESTIMATION

    gpu_cupy()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    out = tmp_path / "digits-cuda"
    build_engine(out, PRESETS["digits"], load_unet("digits"), load_classifier("digits"),
                 BuildOptions(precision="fp16", device="cuda"), log=lambda m: None)
    images = digits_test_images(6)
    with open_engine(out, device="cuda", early_exit=False) as portable, \
            open_engine(out, device="cuda", early_exit=False, kernels="fused") as fused:
        rs = portable._prepare(0.5, 4, 1, 400)
        fused._prepare(0.5, 4, 1, 400)
        rng = np.random.default_rng(0)
        x_t = rng.standard_normal((400, 1, 16, 16)).astype(np.float32) * 0.5
        noise = rng.standard_normal((rs.num_calls, 400, 1, 16, 16)).astype(np.float32)
        a, b = portable.loop.purify(x_t, noise), fused.loop.purify(x_t, noise)  # on the host
        rel = float(np.linalg.norm(a - b) / np.linalg.norm(a))
        agree = rows = 0
        for i, image in enumerate(images):
            labels = [run_labels(e, image, 0.5, 4, 3, 0, i, ESTIMATION, range(64)) for e in (portable, fused)]
            agree += int((labels[0] == labels[1]).sum())
            rows += labels[0].size
    print(f"fused vs portable fp16 on the GPU: rel L2 {rel:.2e} after 4 steps; labels {agree}/{rows}")
    assert rel <= 1e-3
    assert agree / rows >= 0.995


# -- build --device cuda and --kernels, as a user meets them on a CPU-only machine ---------------------


@pytest.fixture(scope="module")
def cuda_engine(tmp_path_factory):
    """The digits engine (fp32) built with --device cuda: portable and fused graphs."""
    from densepure_rt.cli import main

    out = tmp_path_factory.mktemp("cuda-engine") / "digits"
    result = CliRunner().invoke(main, ["build", "--model", "digits", "--device", "cuda", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_build_device_cuda_writes_the_fused_graph_beside_the_portable_ones(cuda_engine):
    from densepure_rt.files.manifest import graph_path, load_manifest

    manifest = load_manifest(cuda_engine)
    assert graph_path(cuda_engine, manifest, "step").name == "step.onnx"
    fused_file = graph_path(cuda_engine, manifest, "step", "fused")
    assert fused_file.name == "step.cuda.onnx" and fused_file.name in manifest["files"]
    report = manifest["fused"]["step"]["fusion"]
    assert (report["norms"], report["fused"], report["fused_with_silu"], report["attention_norms_fused"]) == (25, 15, 5, 4)
    assert fused_counts(onnx.load(str(fused_file)))["GroupNorm"] == 15
    # Validated through its expansion against PyTorch, with the portable fp32 graph's tolerance.
    assert manifest["fused"]["step"]["validation"]["x_next"]["max_abs"] <= 1e-4
    # The fp16 classifier (engine/classifier_fp16.py), used because its labels agree with fp32's.
    classifier = manifest["fused"]["classifier"]
    assert classifier["precision"] == "fp16" and classifier["file"] == "classifier.cuda.onnx" in manifest["files"]
    assert classifier["fp16"]["labels_agree"] >= 0.995 and classifier["fp16"]["nodes_fp16"] > 0
    assert graph_path(cuda_engine, manifest, "classifier", "fused").name == "classifier.cuda.onnx"
    assert graph_path(cuda_engine, manifest, "classifier").name == "classifier.onnx"
    from densepure_rt.cli import main

    info = CliRunner().invoke(main, ["info", "--engine", str(cuda_engine)])
    assert info.exit_code == 0 and "step step.cuda.onnx (15 of 25 GroupNorms fused, 5 with their SiLU)" in info.output


def test_without_validation_the_fp16_classifier_is_still_gated(tmp_path):
    """--no-validate skips the graphs' validation against PyTorch, not the fp16 classifier's label
    gate (what makes it safe to use): the manifest records the agreement either way."""
    from densepure_rt.export.models import load_classifier, load_unet
    from densepure_rt.presets import PRESETS

    manifest = build_engine(tmp_path / "e", PRESETS["digits"], load_unet("digits"), load_classifier("digits"),
                            BuildOptions(device="cuda", validate=False), log=lambda m: None)
    classifier = manifest["fused"]["classifier"]
    assert classifier["file"] == "classifier.cuda.onnx" and classifier["precision"] == "fp16"
    assert classifier["fp16"]["labels_agree"] >= 0.995
    assert "validation" not in manifest["fused"]["step"]  # the step's expansion check is validation


@pytest.mark.slow
def test_an_fp16_classifier_that_disagrees_is_not_used(tmp_path, monkeypatch):
    """The agreement gate: a converted classifier that changes labels is left out (here the
    conversion is replaced by one that swaps two logits, an fp16 classifier gone wrong)."""
    import densepure_rt.engine.classifier_fp16 as classifier_fp16
    from densepure_rt.export.models import load_classifier, load_unet
    from densepure_rt.presets import PRESETS

    real = classifier_fp16.fp16_classifier

    def broken(model):
        graph, report = real(model)
        # Negate the logits before the ArgMax: labels change on almost every image.
        for node in graph.graph.node:
            if node.op_type == "ArgMax":
                neg = helper.make_node("Neg", [node.input[0]], ["negated_logits"])
                node.input[0] = "negated_logits"
                graph.graph.node.insert(list(graph.graph.node).index(node), neg)
                break
        return graph, report

    monkeypatch.setattr(classifier_fp16, "fp16_classifier", broken)
    messages = []
    manifest = build_engine(tmp_path / "e", PRESETS["digits"], load_unet("digits"), load_classifier("digits"),
                            BuildOptions(device="cuda"), log=messages.append)
    classifier = manifest["fused"]["classifier"]
    assert classifier["precision"] == "fp32" and classifier["file"] == "classifier.onnx"
    assert classifier["fp16"]["labels_agree"] < 0.5
    assert any("keeps the fp32 classifier" in m for m in messages)
    assert "classifier.cuda.onnx" not in manifest["files"]


@pytest.mark.slow
def test_kernels_fused_is_refused_in_one_line_where_it_cannot_run(cuda_engine, tmp_path):
    from densepure_rt.cli import main

    def certify(*extra):
        return CliRunner().invoke(main, ["certify", "--engine", str(cuda_engine), "--sigma", "0.5", "--steps", "2", "--votes", "1",
                                         "--n0", "4", "--n", "8", "--max", "1", "--out", str(tmp_path / "r.tsv"), *extra])

    on_cpu = certify("--kernels", "fused")
    assert on_cpu.exit_code != 0 and "--kernels fused runs only on a GPU" in on_cpu.output
    assert len(on_cpu.output.strip().splitlines()) == 1 and "Traceback" not in on_cpu.output
    assert not (tmp_path / "r.tsv").exists()
    # The portable graphs of the same engine run on the CPU as any engine's.
    ok = certify()
    assert ok.exit_code == 0, ok.output
    # A results file written with the fused graphs is not continued with the portable ones (other rounding).
    options = tmp_path / "r.tsv.json"
    saved = json.loads(options.read_text())
    assert saved["kernels"] == "portable"
    saved["kernels"] = "fused"
    options.write_text(json.dumps(saved))
    again = certify("--max", "2")
    assert again.exit_code != 0 and "kernels 'fused' -> 'portable'" in again.output


def test_an_engine_without_fused_graphs_says_how_to_get_them(tmp_path):
    from densepure_rt.errors import EngineError
    from densepure_rt.runtime import open_engine

    out = tmp_path / "digits"
    from densepure_rt.cli import main

    assert CliRunner().invoke(main, ["build", "--model", "digits", "--no-validate", "--out", str(out)]).exit_code == 0
    with pytest.raises(EngineError, match=r"no fused GPU graphs .*build --device cuda --force"):
        open_engine(out, device="cuda", kernels="fused")
    refused = CliRunner().invoke(main, ["build", "--model", "digits", "--device", "cuda", "--backend", "openvino", "--out", str(tmp_path / "x")])
    assert refused.exit_code != 0 and "--device cuda" in refused.output and "onnxruntime" in refused.output


@pytest.mark.slow
def test_a_fused_entry_naming_an_unlisted_file_is_refused(cuda_engine, tmp_path):
    """A hostile manifest: fused.step.file pointing outside the checksummed files (sealed again)."""
    import shutil

    from densepure_rt.errors import EngineError
    from densepure_rt.files.manifest import load_manifest, write_manifest

    copy = tmp_path / "engine"
    shutil.copytree(cuda_engine, copy)
    manifest = load_manifest(copy).to_dict()
    manifest.pop("manifest_sha256")
    shutil.copy(copy / "step.onnx", copy / "extra.onnx")  # a real graph, but not one the manifest checksums
    manifest["fused"]["step"]["file"] = "extra.onnx"
    write_manifest(copy, manifest)
    with pytest.raises(EngineError, match="fused.step.file 'extra.onnx' is not listed"):
        load_manifest(copy)


# -- --backend tensorrt: GroupNormalization-21, standard ONNX (TensorRT itself is not run here) ---------


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_group_normalization_graph_equals_the_exported_one_on_the_cpu(digits_graphs, precision):
    from densepure_rt.engine.fusion import GROUP_NORMALIZATION_OPSET, as_group_normalization

    model = digits_graphs[precision]
    rewritten, report = as_group_normalization(model)
    onnx.checker.check_model(rewritten)
    census = _norm_census(digits_graphs["unet"])
    ops = [n.op_type for n in rewritten.graph.node]
    assert report["group_normalization"] == ops.count("GroupNormalization") == len(census["norms"]) == 25
    assert "InstanceNormalization" not in ops and report["left"] == []
    assert {o.domain or "": o.version for o in rewritten.opset_import}[""] == GROUP_NORMALIZATION_OPSET
    assert all(helper.get_attribute_value(a) == 1 for n in rewritten.graph.node if n.op_type == "GroupNormalization"
               for a in n.attribute if a.name == "stash_type")
    feeds = _step_feeds((1, 16, 16), 6, seed=2)
    want = _session(model).run(None, feeds)[0]
    got = _session(rewritten).run(None, feeds)[0]
    err, rel = float(np.abs(got - want).max()), float(np.linalg.norm(got - want) / np.linalg.norm(want))
    print(f"digits {precision}: GroupNormalization graph vs exported max abs {err:.2e}, rel L2 {rel:.2e}")
    assert (err <= 1e-5) if precision == "fp32" else (rel <= 1e-3)


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.__setitem__("fused", ["step.cuda.onnx"]), "fused"),
    (lambda m: m["fused"].pop("classifier"), "fused.classifier"),
    (lambda m: m["fused"]["step"].pop("file"), "fused.step.file"),
    (lambda m: m["fused"]["classifier"].__setitem__("precision", "fp64"), "fused.classifier.precision"),
    (lambda m: m["fused"]["step"].__setitem__("file", "../step.onnx"), "fused.step.file"),
])
@pytest.mark.slow
def test_a_hostile_fused_section_is_a_one_line_error(cuda_engine, tmp_path, edit, needle):
    import shutil

    from densepure_rt.cli import main
    from densepure_rt.errors import EngineError
    from densepure_rt.files.manifest import load_manifest, write_manifest

    copy = tmp_path / "engine"
    shutil.copytree(cuda_engine, copy)
    manifest = load_manifest(copy).to_dict()
    manifest.pop("manifest_sha256")
    edit(manifest)
    write_manifest(copy, manifest)
    with pytest.raises(EngineError, match=needle.replace(".", r"\.")):
        load_manifest(copy)
    info = CliRunner().invoke(main, ["info", "--engine", str(copy)])
    assert info.exit_code != 0 and "Traceback" not in info.output and len(info.output.strip().splitlines()) == 1
