"""Your own classifier (build --classifier): the engine's classifier graph against the original model
for each source format, the manifest's record of every preprocessing choice, and the refusals."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from densepure_rt.cli import main
from densepure_rt.errors import ConfigError
from densepure_rt.presets import Preprocessing, classifier_request

RTOL = 1e-4


def _net(channels: int, classes: int, seed: int = 0) -> nn.Module:
    """A small CNN with weights large enough that the logits spread (a wrong resize moves them)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes),
        )
        for p in net.parameters():
            p.data.normal_(0.0, 0.5)
    return net.eval()


def _save_onnx(net: nn.Module, path: Path, shape, opset: int = 17, any_size: bool = False) -> Path:
    axes = {0: "n", 2: "h", 3: "w"} if any_size else {0: "n"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(shape),), str(path), input_names=["pixels"], output_names=["scores"],
                          dynamic_axes={"pixels": axes, "scores": {0: "n"}}, opset_version=opset, dynamo=False)
    return path


def _purified(batch: int, channels: int, side: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, side, side, generator=g) * 2 - 1


def _engine_graph(request, channels: int, side: int, tmp_path: Path) -> ort.InferenceSession:
    """The engine's classifier graph for ``request``, exported as the build exports it."""
    from densepure_rt.engine.build import _export_classifier
    from densepure_rt.export.onnx_export import classifier_spec
    from densepure_rt.export.sources import load_classifier_source

    module = load_classifier_source(request, channels, side)
    spec = classifier_spec((channels, side, side), module.num_classes, strict=True)
    out = tmp_path / "graph"
    out.mkdir()
    _export_classifier(module, spec, out, (_purified(2, channels, side, seed=9),))
    return ort.InferenceSession(str(out / spec.file), providers=["CPUExecutionProvider"])


def _hand_preprocess(x, size, mode, antialias, mean, std, bgr=False):
    """The documented preprocessing, written out with PyTorch's own functions: [-1, 1] -> [0, 1] ->
    resize -> channel order -> (v - mean) / std."""
    x = (x + 1) / 2
    if size is not None:
        x = F.interpolate(x, size=size, mode=mode, align_corners=None if mode == "nearest" else False, antialias=antialias)
    if bgr:
        x = x[:, [2, 1, 0]]
    c = x.shape[1]
    return (x - torch.tensor(mean).reshape(1, c, 1, 1)) / torch.tensor(std).reshape(1, c, 1, 1)


def _assert_parity(session, reference, x):
    labels, logits = session.run(["labels", "logits"], {"image": x.numpy()})
    want = reference.detach().numpy()
    rel = np.linalg.norm(logits - want) / np.linalg.norm(want)
    assert rel < RTOL, rel
    assert np.abs(logits - want).max() <= RTOL * np.abs(want).max()
    assert (labels == want.argmax(1)).all()


def test_an_onnx_classifier_at_an_older_opset_is_composed_with_its_declared_preprocessing(tmp_path):
    net = _net(3, 7)
    path = _save_onnx(net, tmp_path / "mine.onnx", (2, 3, 20, 20), opset=13)
    pre = Preprocessing(resize="bicubic", mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), channels="bgr")
    session = _engine_graph(classifier_request(str(path), preprocessing=pre), 3, 16, tmp_path)
    x = _purified(5, 3, 16)
    original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert original.get_inputs()[0].shape[2:] == [20, 20]  # the file fixes its input size: the default
    want = original.run(None, {"pixels": _hand_preprocess(x, (20, 20), "bicubic", False, pre.mean, pre.std, bgr=True).numpy()})[0]
    _assert_parity(session, torch.from_numpy(want), x)


def test_a_torchscript_classifier_with_antialiased_shrinking(tmp_path):
    net = _net(1, 10)
    path = tmp_path / "mine.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(net, torch.zeros(2, 1, 11, 11)), str(path))
    pre = Preprocessing(input_size=(11, 11), resize="bilinear", antialias=True, mean=(0.3,), std=(0.7,))
    session = _engine_graph(classifier_request(str(path), preprocessing=pre), 1, 16, tmp_path)
    x = _purified(4, 1, 16)
    with torch.no_grad():
        want = net(_hand_preprocess(x, (11, 11), "bilinear", True, (0.3,), (0.7,)))
    _assert_parity(session, want, x)


def test_a_torch_export_program_with_a_dynamic_batch(tmp_path):
    net = _net(3, 4)
    program = torch.export.export(net, (torch.zeros(2, 3, 24, 24),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path / "mine.pt2"
    torch.export.save(program, str(path))
    pre = Preprocessing(input_size=(24, 24), resize="nearest")
    session = _engine_graph(classifier_request(str(path), preprocessing=pre), 3, 16, tmp_path)
    x = _purified(3, 3, 16)
    with torch.no_grad():
        want = net(_hand_preprocess(x, (24, 24), "nearest", False, (0.0,) * 3, (1.0,) * 3))
    _assert_parity(session, want, x)


def test_a_timm_classifier_takes_its_mean_std_and_interpolation_from_timm(tmp_path):
    import timm
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        net = timm.create_model("test_resnet", pretrained=False, num_classes=10).eval()
    weights = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    cfg = net.pretrained_cfg  # mean = std = 0.5, bilinear: the defaults the build must take
    request = classifier_request("timm:test_resnet", str(weights), Preprocessing(input_size=(40, 40)))
    session = _engine_graph(request, 3, 16, tmp_path)
    x = _purified(3, 3, 16)
    with torch.no_grad():
        want = net(_hand_preprocess(x, (40, 40), cfg["interpolation"], False, cfg["mean"], cfg["std"]))
    _assert_parity(session, want, x)


def test_a_torchvision_classifier_takes_the_weights_transforms_defaults(tmp_path):
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        net = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=5).eval()
    weights = tmp_path / "mobilenet.pth"
    torch.save(net.state_dict(), weights)
    # torchvision's published weights: ImageNet mean and std, bilinear with antialiasing.
    request = classifier_request("torchvision:mobilenet_v3_small", str(weights), Preprocessing(input_size=(32, 32)))
    session = _engine_graph(request, 3, 16, tmp_path)
    x = _purified(3, 3, 16)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    with torch.no_grad():
        want = net(_hand_preprocess(x, (32, 32), "bilinear", True, mean, std))
    _assert_parity(session, want, x)


# -- the command line ----------------------------------------------------------------------------- #


def _build(args, cwd: Path):
    return CliRunner().invoke(main, ["build", "--model", "digits", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("own")
    return _save_onnx(_net(1, 10), folder / "digits.onnx", (2, 1, 16, 16), any_size=True)


@pytest.fixture(scope="module")
def cli_engine(digits_onnx, tmp_path_factory) -> tuple[Path, list[str]]:
    """An engine built by the command with every preprocessing flag, and those flags."""
    folder = tmp_path_factory.mktemp("cli")
    labels = folder / "labels.txt"
    labels.write_text("".join(f"digit {i}\n" for i in range(10)))
    out = folder / "engine"
    args = ["--classifier", str(digits_onnx), "--input-size", "20x24", "--resize", "bicubic", "--mean", "0.5", "--std", "0.25",
            "--outputs", "probabilities", "--labels", str(labels), "--out", str(out)]
    result = _build(args, folder)
    assert result.exit_code == 0, result.output
    return out, args


@pytest.mark.slow
def test_build_records_the_classifier_its_preprocessing_labels_and_the_image_space(digits_onnx, cli_engine, tmp_path):
    from densepure_rt.files.manifest import load_manifest, sha256_file

    out, args = cli_engine
    args = list(args)
    m = load_manifest(out)
    assert m.classifier_source == {"format": "onnx", "file": str(digits_onnx.resolve()), "sha256": sha256_file(digits_onnx)}
    assert m.preprocessing["resize"] == {"size": [20, 24], "mode": "bicubic", "align_corners": False, "antialias": False}
    assert (m.preprocessing["mean"], m.preprocessing["std"], m.preprocessing["channel_order"]) == ([0.5], [0.25], "rgb")
    assert m.preprocessing["scores"] == "probabilities"
    assert m.labels == tuple(f"digit {i}" for i in range(10))
    assert m.image_space["size"] == [1, 16, 16] and m.image_space["range"] == [0.0, 1.0]
    assert m["validation"]["classifier"]["labels"]["agreement"] == 1.0
    info = CliRunner().invoke(main, ["info", "--engine", str(out)])
    assert info.exit_code == 0, info.output
    assert "onnx digits.onnx" in info.output and "bicubic" in info.output and "digit 0" in info.output

    # Another preprocessing is another engine: its classifier graph differs, and so does its identity.
    other = tmp_path / "other"
    args[args.index("bicubic")] = "bilinear"
    assert _build([*args[:-1], str(other)], tmp_path).exit_code == 0
    assert load_manifest(other).identity != m.identity
    # ... so a results file written with one preprocessing is never continued with the other.
    fast = ["--sigma", "0.5", "--steps", "1", "--votes", "1", "--n0", "5", "--n", "10", "--max", "1", "--quiet",
            "--out", str(tmp_path / "r.tsv")]
    assert CliRunner().invoke(main, ["certify", "--engine", str(out), *fast]).exit_code == 0
    resumed = CliRunner().invoke(main, ["certify", "--engine", str(other), *fast, "--resume"])
    assert resumed.exit_code == 2 and "holds results of other settings (engine_id" in resumed.output, resumed.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--labels", "{labels3}"], "gives 10 scores per image but --labels names 3 classes"),
        (["--mean", "0.5,0.5,0.5"], "--mean gives 3 values but the images have 1 channel"),
        (["--channels", "bgr"], "--channels bgr needs 3-channel images"),
    ],
)
def test_build_refuses_a_classifier_that_does_not_fit_in_one_line(digits_onnx, tmp_path, args, message):
    labels3 = tmp_path / "three.txt"
    labels3.write_text("a\nb\nc\n")
    args = [a.format(labels3=labels3) for a in args]
    result = _build(["--classifier", str(digits_onnx), *args, "--out", str(tmp_path / "e")], tmp_path)
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "e").exists()


def test_build_refuses_a_classifier_for_other_channels(tmp_path):
    path = _save_onnx(_net(3, 10), tmp_path / "rgb.onnx", (2, 3, 16, 16))
    result = _build(["--classifier", str(path), "--out", str(tmp_path / "e")], tmp_path)
    assert result.exit_code == 2
    assert "takes 3-channel images but the diffusion model's images have 1" in result.output, result.output


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("model.onnx", b"this is not a model", "is not an ONNX model"),
        ("model.pt", b"PK\x03\x04 not a zip", "is not a TorchScript model"),
        ("model.pt2", b"\x00" * 64, "is not a torch.export program"),
        ("model.h5", b"keras", "not a format build reads; accepted: onnx: an ONNX file"),
    ],
)
def test_build_refuses_a_file_that_is_not_a_model_in_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    result = _build(["--classifier", str(path), "--out", str(tmp_path / "e")], tmp_path)
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_a_state_dict_saved_as_pt_is_pointed_to_the_named_sources(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(_net(1, 10).state_dict(), path)
    result = _build(["--classifier", str(path), "--out", str(tmp_path / "e")], tmp_path)
    assert result.exit_code == 2
    assert "is not a TorchScript model" in result.output and "--classifier-weights" in result.output


def test_the_request_is_checked_before_torch(tmp_path):
    with pytest.raises(ConfigError, match="needs --classifier-weights"):
        classifier_request("timm:resnet18")
    with pytest.raises(ConfigError, match="--input-size takes H or HxW"):
        Preprocessing.parse_size("0x3")
    with pytest.raises(ConfigError, match="--std takes one positive number"):
        Preprocessing.parse_numbers("0.5,0", "--std", positive=True)
    result = _build(["--resize", "bicubic"], tmp_path)
    assert result.exit_code == 2 and "--resize goes with --classifier" in result.output


def _worked_example() -> list[list[str]]:
    """The commands of docs/models.md's worked example (the bash block after its marker), as argv lists."""
    import shlex

    text = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    block = text.split("<!-- worked-example -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.slow
def test_the_worked_example_certifies_a_classifier_trained_here_above_chance(tmp_path, monkeypatch):
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "examples").mkdir()
    shutil.copy(root / "examples" / "own_classifier.py", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    commands = _worked_example()
    assert [c[0] for c in commands] == ["python", "densepure-rt", "densepure-rt"]
    for argv in commands:
        if argv[0] == "python":
            subprocess.run([sys.executable, *argv[1:]], check=True, capture_output=True, timeout=300, cwd=tmp_path)
        else:
            result = CliRunner().invoke(main, argv[1:], catch_exceptions=False)
            assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in (tmp_path / "mine.tsv").read_text().splitlines()]
    header, rows = rows[0], rows[1:]
    correct = [r[header.index("correct")] == "1" for r in rows]
    assert len(rows) == 10
    assert sum(correct) / len(rows) > 0.1 + 0.3  # chance is 10%; well above it, with room for a slow machine


@pytest.mark.slow
def test_a_guided_diffusion_checkpoint_with_its_flags_file_builds_beside_your_classifier(tmp_path):
    """A guided-diffusion UNet of another configuration than the presets' (3 channels, 8 x 8, cosine
    schedule of 4000 steps, fixed variance) with an ONNX classifier and no --model: the engine's step
    graph against the project's PyTorch step at that configuration."""
    from safetensors.torch import save_file

    from densepure_rt.export.step import DenoiseStep
    from densepure_rt.export.unet import create_model
    from densepure_rt.files.manifest import load_manifest
    from densepure_rt.schedule import cosine_schedule, reverse_schedule

    flags = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
                 num_head_channels=8, learn_sigma=False, use_scale_shift_norm=True)
    torch.manual_seed(4)
    unet = create_model(**flags).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(tmp_path / "unet.safetensors"))
    config = tmp_path / "flags.json"
    config.write_text(json.dumps({"create_model": flags, "noise_schedule": "cosine", "diffusion_steps": 4000, "rescale_timesteps": True}))
    classifier = _save_onnx(_net(3, 5), tmp_path / "c.onnx", (2, 3, 8, 8))
    out = tmp_path / "engine"
    result = CliRunner().invoke(main, ["build", "--unet", str(tmp_path / "unet.safetensors"), "--unet-config", str(config),
                                       "--classifier", str(classifier), "--out", str(out)])
    assert result.exit_code == 0, result.output
    m = load_manifest(out)
    assert (m.preset, m.image_shape, m.num_classes, m.variance_type) == ("custom", (3, 8, 8), 5, "fixed_small")
    assert (m.schedule.kind, m.schedule.num_timesteps, m.schedule.rescale_timesteps) == ("cosine", 4000, True)
    rs = reverse_schedule(cosine_schedule(4000), 0.25, 3)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    scalars = torch.as_tensor(rs.scalars[[0, 1, 2, 1]], dtype=torch.float32)  # rows at different steps
    with torch.no_grad():
        want = DenoiseStep(unet, "fixed_small").eval()(x, noise, scalars).numpy()
    session = ort.InferenceSession(str(out / "step.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy(), "noise": noise.numpy(), "scalars": scalars.numpy()})
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # A checkpoint file without its flags is refused in one line.
    alone = CliRunner().invoke(main, ["build", "--unet", str(tmp_path / "unet.safetensors"), "--classifier", str(classifier),
                                      "--out", str(tmp_path / "e2")])
    assert alone.exit_code == 2 and "give its guided-diffusion flags with --unet-config FILE" in alone.output, alone.output


@pytest.mark.slow
def test_a_hugging_face_folder_takes_its_image_processor_and_label_names(tmp_path):
    transformers = pytest.importorskip("transformers")
    from densepure_rt.export.sources import load_classifier_source

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    image_size=20, patch_size=5, num_labels=3, id2label={0: "cat", 1: "dog", 2: "fox"},
                                    label2id={"cat": 0, "dog": 1, "fox": 2})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = transformers.ViTForImageClassification(config).eval()
        for p in model.parameters():
            p.data.normal_(0.0, 0.3)
    model.save_pretrained(tmp_path / "hf")
    transformers.ViTImageProcessor(size={"height": 20, "width": 20}, image_mean=[0.4, 0.5, 0.6], image_std=[0.3, 0.2, 0.25],
                                   resample=3).save_pretrained(tmp_path / "hf")
    request = classifier_request(str(tmp_path / "hf"))
    assert request.format == "huggingface"
    assert load_classifier_source(request, 3, 16).label_names == ("cat", "dog", "fox")
    session = _engine_graph(request, 3, 16, tmp_path)
    x = _purified(3, 3, 16)
    with torch.no_grad():  # the processor's PIL resize filters: antialiased bicubic to 20 x 20
        want = model(pixel_values=_hand_preprocess(x, (20, 20), "bicubic", True, (0.4, 0.5, 0.6), (0.3, 0.2, 0.25))).logits
    _assert_parity(session, want, x)


@pytest.mark.slow
def test_the_python_function_builds_what_the_command_builds(digits_onnx, cli_engine, tmp_path):
    from densepure_rt.engine.build import build_own_engine
    from densepure_rt.files.manifest import load_manifest

    pre = Preprocessing(input_size=(20, 24), resize="bicubic", mean=(0.5,), std=(0.25,), outputs="probabilities")
    m = build_own_engine(tmp_path / "api", model="digits", classifier=str(digits_onnx), preprocessing=pre,
                         labels=str(Path(cli_engine[1][cli_engine[1].index("--labels") + 1])), log=lambda line: None)
    cli = load_manifest(cli_engine[0])
    assert m.identity == cli.identity
    assert (m.preprocessing, m.labels, m.classifier_source) == (cli.preprocessing, cli.labels, cli.classifier_source)
    with pytest.raises(ConfigError, match="give --model PRESET"):
        build_own_engine(tmp_path / "none", classifier=str(digits_onnx))


class _Mean(nn.Module):
    def forward(self, x):
        return x.mean(dim=(1, 2, 3))


@pytest.mark.parametrize(
    "make, extra, message",
    [
        (lambda d: _save_onnx(_net(1, 10), d / "fixed.onnx", (2, 1, 16, 16)), ["--input-size", "30"],
         "takes 16x16 inputs (fixed in the file), not --input-size 30x30"),
        (lambda d: _save_onnx(_Mean(), d / "flat.onnx", (2, 1, 16, 16)), [],
         "must return one score per class, [N x classes]; it returns [2] for N = 2"),
        (lambda d: _one_batch(d / "one.onnx"), [], "has its batch axis fixed at 1: export it with a dynamic batch axis"),
    ],
)
def test_build_refuses_an_onnx_classifier_of_the_wrong_shape_in_one_line(tmp_path, make, extra, message):
    path = make(tmp_path)
    result = _build(["--classifier", str(path), *extra, "--out", str(tmp_path / "e")], tmp_path)
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def _one_batch(path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_net(1, 10), (torch.zeros(1, 1, 16, 16),), str(path), opset_version=17, dynamo=False)
    return path


def test_an_unknown_timm_name_is_refused_before_its_weights_are_read(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"not read")
    result = _build(["--classifier", "timm:no_such_net", "--classifier-weights", str(weights), "--out", str(tmp_path / "e")], tmp_path)
    assert result.exit_code == 2 and "timm has no model of that name" in result.output, result.output


def test_a_classifier_graph_that_disagrees_with_the_original_model_is_refused(tmp_path):
    """The build's check (validate_graph with the strict classifier spec): a graph exported with one
    mean, checked against the original model behind a mean 0.1% away, is refused in one line."""
    from densepure_rt.engine.build import _classifier_inputs, _export_classifier
    from densepure_rt.export.onnx_export import ExportValidationError, classifier_spec, validate_graph
    from densepure_rt.export.sources import load_classifier_source
    from densepure_rt.presets import get_preset

    path = _save_onnx(_net(1, 10), tmp_path / "m.onnx", (2, 1, 16, 16))
    exported = load_classifier_source(classifier_request(str(path), preprocessing=Preprocessing(mean=(0.5,), std=(0.2,))), 1, 16)
    other = load_classifier_source(classifier_request(str(path), preprocessing=Preprocessing(mean=(0.5005,), std=(0.2,))), 1, 16)
    spec = classifier_spec((1, 16, 16), 10, strict=True)
    _export_classifier(exported, spec, tmp_path, (_purified(2, 1, 16),))
    make = _classifier_inputs(get_preset("digits"), 2)
    assert validate_graph(tmp_path / spec.file, exported, spec, make)["logits"]["rel_l2"] < 1e-5
    with pytest.raises(ExportValidationError, match="classifier graph .* disagrees with PyTorch: logits") as error:
        validate_graph(tmp_path / spec.file, other, spec, make)
    assert "\n" not in str(error.value)
