"""The ONNX Runtime engine reproduces the PyTorch reference (and so the official code) on the fixture UNets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import fixture_dir, fixture_schedule, load_fixture_unet, read_json, sample_counts
from densepure_rt.engine.build import BuildOptions, build_engine
from densepure_rt.export.classifiers import PurifiedClassifier
from densepure_rt.export.reference import DensePureReference, reverse_run, to_diffusion_input
from densepure_rt.sampling.noise import ESTIMATION, sample_noise
from densepure_rt.presets import Preset
from densepure_rt.runtime import open_engine
from oracle import open_reference
from densepure_rt.schedule import reverse_schedule

#: One test process runs this module (``--dist loadgroup``): its module fixtures (the engines built from the
#: fixture UNets) are set up once, not once in each process.
pytestmark = pytest.mark.xdist_group("export_parity")

KINDS = {
    "guided": ("guided_diffusion_unet", "linear", 1000, "densepure_guided_sigma0.5_b4"),
    "improved": ("improved_diffusion_unet", "cosine", 4000, "densepure_improved_sigma0.25_b3"),
}


def fixture_preset(kind: str) -> Preset:
    unet_name, schedule, steps, _ = KINDS[kind]
    cfg = read_json(fixture_dir(unet_name) / "config.json")
    return Preset(
        name=f"fixture-{kind}",
        unet_kwargs=cfg["create_model_kwargs"],
        schedule=schedule,
        num_timesteps=steps,
        rescale_timesteps=True,
        image_size=32,
        channels=3,
        num_classes=10,
        classifier="small-cnn",
        diffusion_ckpt_hint="",
        classifier_ckpt_hint="",
        unet_gflop=0.0,
        classifier_gflop=0.0,
    )


def small_classifier(seed: int = 0) -> PurifiedClassifier:
    # A random linear classifier on the pixels: its label moves with the purified image, so label
    # agreement between engine and reference is a real check.
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    return PurifiedClassifier(net.eval(), 10, image_size=32, size=None, mean=(0.5,) * 3, std=(0.5,) * 3).eval()


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    built = {}
    for kind in KINDS:
        unet, _ = load_fixture_unet(KINDS[kind][0])
        for precision in ("fp32", "fp16") if kind == "guided" else ("fp32",):
            out = tmp_path_factory.mktemp("engines") / f"{kind}-{precision}"
            build_engine(out, fixture_preset(kind), unet, small_classifier(), BuildOptions(precision=precision), log=lambda m: None)
            built[(kind, precision)] = out
    return built


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_engine_reproduces_official_trajectory(engines, kind):
    folder = fixture_dir(KINDS[kind][3])
    cfg = read_json(folder / "config.json")
    tr = load_file(str(folder / "trajectory.safetensors"))
    with open_engine(engines[(kind, "fp32")]) as engine:
        rs = engine._prepare(cfg["sigma"], cfg["steps"], votes=1, batch=4)
        x_t = to_diffusion_input(tr["x_clean"] + tr["delta"], rs).numpy()
        noise = np.stack([tr[f"noise_{i}"].numpy() for i in range(cfg["noise_draws"])])
        out = engine.loop.purify(x_t, noise)
    err = float(np.abs(out - tr["out"].numpy()).max())
    print(f"{kind}: engine vs official max abs error {err:.3e}")
    assert err < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("kind, sigma, steps", [("guided", 0.5, 3), ("guided", 0.25, "one-shot"), ("improved", 0.25, 2)])
def test_engine_matches_reference_images_and_labels_with_same_noise(engines, kind, sigma, steps):
    unet, _ = load_fixture_unet(KINDS[kind][0])
    classifier = small_classifier()
    preset = fixture_preset(kind)
    schedule = fixture_schedule({"schedule": f"{preset.schedule}-{preset.num_timesteps}"})
    reference = DensePureReference(unet, classifier, schedule, num_classes=10)
    rng = np.random.default_rng(7)
    image = rng.random((3, 32, 32), dtype=np.float32)
    votes, samples = 3, range(5)
    with open_engine(engines[(kind, "fp32")]) as engine:
        rs = engine._prepare(sigma, steps, votes, batch=len(samples))
        delta, z = sample_noise(11, 4, ESTIMATION, samples, votes, rs.num_calls, image.shape, sigma)
        x_t = np.repeat(rs.input_scale * (2 * (image[None] + delta) - 1), votes, axis=0)
        got = engine.loop.purify(x_t, z)
        got_labels = engine.loop.classify(got)
        got_votes = engine.loop.voted_labels(image, 11, 4, ESTIMATION, samples)
        engine_counts = sample_counts(engine, image, 7, ESTIMATION, seed=3, image_index=2)
    want = reverse_run(reference.step, torch.from_numpy(x_t), reverse_schedule(schedule, sigma, steps), [torch.from_numpy(zi) for zi in z])
    err = float(np.abs(got - want.numpy()).max())
    print(f"{kind} sigma={sigma} steps={steps}: engine vs reference max abs error {err:.3e}")
    assert err < 1e-4
    with torch.no_grad():
        want_labels = classifier(want).argmax(1).numpy()
    assert np.array_equal(got_labels, want_labels)
    want_votes = reference.labels(
        torch.from_numpy(image), torch.from_numpy(delta), [torch.from_numpy(zi) for zi in z], reverse_schedule(schedule, sigma, steps), votes
    ).numpy()
    assert np.array_equal(got_votes, want_votes)
    ref_counts = reference.sample_counts(image, 7, reverse_schedule(schedule, sigma, steps), votes, 3, 2, ESTIMATION, batch=7)
    assert np.array_equal(engine_counts, ref_counts)
    assert len(set(got_labels.tolist())) > 1, "labels should vary, or the label comparison proves little"


@pytest.mark.slow
def test_fp16_step_graph_stays_within_5e3_of_fp32_per_step(engines):
    rng = np.random.default_rng(3)
    image = rng.random((3, 32, 32), dtype=np.float32)
    # The graphs alone, through the step-by-step backend's sessions.
    with open_reference(engines[("guided", "fp32")]) as e32, open_reference(engines[("guided", "fp16")]) as e16:
        assert e16.manifest["precision"]["step"] == "fp16"
        rs = e32._prepare(0.5, 4, 2, 4)
        e16._prepare(0.5, 4, 2, 4)
        delta, z = sample_noise(0, 0, ESTIMATION, range(4), 2, rs.num_calls, image.shape, 0.5)
        x = np.repeat(rs.input_scale * (2 * (image[None] + delta) - 1), 2, axis=0)
        for s in range(rs.num_calls):
            feeds = {"x": x, "noise": z[s], "scalars": np.tile(rs.scalars[s].astype(np.float32), (len(x), 1))}
            y32 = e32.loop._step.run(["x_next"], feeds)[0]
            y16 = e16.loop._step.run(["x_next"], feeds)[0]
            rel = float(np.linalg.norm(y16 - y32) / np.linalg.norm(y32))
            print(f"step {s}: fp16 vs fp32 relative L2 {rel:.2e}")
            assert rel < 5e-3
            x = y32


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_rows_at_different_reverse_steps_share_one_call(engines, precision):
    """Engine format 3: each row of a step call carries its own reverse-step scalars, so the
    scheduler can put rows of different steps (runs, samples, images) in one call. A call of 6 rows
    at steps 0, 1, 2, 3, 0, 3 of two schedules equals each row run alone with its own step's scalars
    (to float32 rounding of batched kernels), and differs from running all rows at one step."""
    rng = np.random.default_rng(5)
    with open_reference(engines[("guided", precision)]) as ref:
        step = ref.loop._step
        tables = [ref._prepare(sigma, 4, 1, 1).scalars.astype(np.float32) for sigma in (0.25, 0.5)]
        picks = [(0, 0), (0, 1), (1, 2), (1, 3), (1, 0), (0, 3)]  # (schedule, step) per row
        scalars = np.stack([tables[t][s] for t, s in picks])
        x = rng.standard_normal((6, 3, 32, 32), dtype=np.float32)
        z = rng.standard_normal((6, 3, 32, 32), dtype=np.float32)
        mixed = step.run(["x_next"], {"x": x, "noise": z, "scalars": scalars})[0]
        alone = np.concatenate([step.run(["x_next"], {"x": x[i:i + 1], "noise": z[i:i + 1], "scalars": scalars[i:i + 1]})[0]
                                for i in range(6)])
        tol = 5e-2 if precision == "fp16" else 1e-4
        assert float(np.abs(mixed - alone).max()) < tol
        same = step.run(["x_next"], {"x": x, "noise": z, "scalars": np.tile(scalars[0], (6, 1))})[0]
        assert float(np.abs(same[1:] - alone[1:]).max()) > 0.5  # the per-row scalars are really used (the gap is O(1))


@pytest.mark.slow
def test_fp16_graph_keeps_scheduler_and_norm_arithmetic_in_float32(engines):
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(engines[("guided", "fp16")] / "step.onnx")))
    types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.value_info}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    conv_weights = [types.get(n.input[1]) for n in convs]
    # Every block convolution runs in fp16; only the output head stays fp32 (as the original).
    assert conv_weights.count(onnx.TensorProto.FLOAT16) == len(convs) - 1
    assert conv_weights.count(onnx.TensorProto.FLOAT) == 1
    softmax = [types.get(n.input[0]) for n in model.graph.node if n.op_type == "Softmax"]
    assert softmax and all(t == onnx.TensorProto.FLOAT for t in softmax)
    norms = [n for n in model.graph.node if n.op_type in ("GroupNormalization", "InstanceNormalization")]
    assert norms and all(types.get(n.input[0]) == onnx.TensorProto.FLOAT for n in norms)
    # The inputs, the output and the scalars are float32.
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in model.graph.input)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@pytest.mark.slow
def test_large_graphs_are_saved_with_external_data(tmp_path, monkeypatch):
    # The full-size fp32 ImageNet UNet is 2.2 GB, over protobuf's 2 GB limit; force the same path here.
    import densepure_rt.export.onnx_export as onnx_export
    from densepure_rt.files.manifest import load_manifest

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1000)
    unet, _ = load_fixture_unet("guided_diffusion_unet")
    out = tmp_path / "engine"
    build_engine(out, fixture_preset("guided"), unet, small_classifier(), BuildOptions(), log=lambda m: None)
    manifest = load_manifest(out)
    assert {"step.onnx", "step.onnx.data", "classifier.onnx", "classifier.onnx.data"} <= set(manifest["files"])
    assert (out / "step.onnx").stat().st_size < 1_000_000 < (out / "step.onnx.data").stat().st_size
    # The row limit's shape inference read the graph without its weights, from any working folder:
    # the same count as over the whole model loaded in memory.
    import onnx

    monkeypatch.chdir(tmp_path)
    whole = onnx.load(str(out / "step.onnx"))
    assert manifest["graphs"]["step"]["max_elements_per_row"] == onnx_export.max_elements_per_row(whole)
    assert onnx_export.max_elements_per_row(out / "step.onnx") == onnx_export.max_elements_per_row(whole)
    folder = fixture_dir(KINDS["guided"][3])
    cfg = read_json(folder / "config.json")
    tr = load_file(str(folder / "trajectory.safetensors"))
    with open_engine(out) as engine:
        rs = engine._prepare(cfg["sigma"], cfg["steps"], votes=1, batch=4)
        x_t = to_diffusion_input(tr["x_clean"] + tr["delta"], rs).numpy()
        noise = np.stack([tr[f"noise_{i}"].numpy() for i in range(cfg["noise_draws"])])
        assert float(np.abs(engine.loop.purify(x_t, noise) - tr["out"].numpy()).max()) < 1e-4
    # A changed external-data file is caught like any other engine file.
    data = out / "step.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[100] ^= 0xFF
    data.write_bytes(bytes(blob))
    from densepure_rt.errors import EngineError

    with pytest.raises(EngineError, match="step.onnx.data"):
        open_engine(out)
