"""Classifier wrappers: preprocessing numbers, Hugging Face ViT conversion, parameter counts, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densepure_rt.errors import CheckpointError, ConfigError
from densepure_rt.export.classifiers import (
    CLASSIFIER_CKPT_FLAG,
    PRESETS,
    PurifiedClassifier,
    build_classifier,
    classifier_config,
    convert_hf_vit_state_dict,
    count_parameters,
    load_hf_vit_folder,
    timm_vit_from_hf_config,
)


def _purified(batch: int, side: int, seed: int = 0) -> torch.Tensor:
    """Random purified images [batch x 3 x side x side] in [-1, 1], with the exact ends present."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, side, side, generator=g) * 2 - 1
    x[0, 0, 0, :4] = torch.tensor([-1.0, 1.0, 0.0, 0.5])
    return x


def _stand_in(num_classes: int, patch: int, seed: int = 0) -> nn.Module:
    """A small deterministic network standing in for the real classifier."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(3, 8, kernel_size=patch, stride=patch),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, num_classes),
        ).eval()


def _tiny_hf_vit(image_size: int = 32, patch_size: int = 8, seed: int = 0):
    import transformers
    config = transformers.ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=image_size,
        patch_size=patch_size,
        num_labels=10,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.ViTForImageClassification(config)
        # Larger weights than the default init (std 0.02, near-uniform attention) and non-trivial
        # norms and biases, so that a wrong mapping (say query and key swapped) moves the logits.
        for name, p in model.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                p.data.normal_(1.0, 0.2)
            else:
                p.data.normal_(0.0, 0.2)
    return model.eval()


def _save_hf_folder(model, folder, fmt: str) -> None:
    from safetensors.torch import load_file

    model.save_pretrained(folder)
    if fmt == "bin":
        # transformers >= 5 writes safetensors only; the published checkpoint's pytorch_model.bin is
        # the same state dict under torch.save.
        state = load_file(str(folder / "model.safetensors"))
        torch.save(state, folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()


def _pil_feature_extractor(x: torch.Tensor) -> torch.Tensor:
    """What DensePure's CIFAR-10 path does with numpy and Pillow: ((x + 1) * 0.5) as float arrays, the
    pre-4.26 ViTFeatureExtractor: (v * 255).astype(uint8), PIL BILINEAR to 224, / 255, (v - 0.5) / 0.5."""
    from PIL import Image

    out = []
    for img in ((x + 1) * 0.5).numpy():
        q = (img.transpose(1, 2, 0) * 255).astype(np.uint8)
        r = np.array(Image.fromarray(q).resize((224, 224), resample=Image.BILINEAR))
        v = r.astype(np.float32) / 255.0
        v = v.transpose(2, 0, 1)
        out.append((v - np.float32(0.5)) / np.float32(0.5))
    return torch.from_numpy(np.stack(out))


# ---------------------------------------------------------------------------- HF ViT -> timm ViT


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hf_vit_folder_loads_into_timm_with_the_same_logits(tmp_path, fmt):
    hf = _tiny_hf_vit()
    _save_hf_folder(hf, tmp_path, fmt)
    net, cfg = load_hf_vit_folder(tmp_path)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(pixel_values=x).logits
        got = net(x)
    diff = (got - want).abs().max().item()
    print(f"HF ViT -> timm ({fmt}): max |logit diff| = {diff:.3e}")
    assert cfg["layer_norm_eps"] == 1e-12 and net.norm.eps == 1e-12
    assert got.shape == (4, 10)
    assert diff < 1e-4


def test_hf_vit_conversion_accepts_transformers_5_in_memory_names():
    hf = _tiny_hf_vit(seed=3)
    state = hf.state_dict()
    assert any(k.startswith("vit.layers.0.") for k in state)  # the renamed scheme, not the Hub's
    config = {**hf.config.to_dict(), "num_labels": 10}
    net = timm_vit_from_hf_config(config)
    net.load_state_dict(convert_hf_vit_state_dict(state, config), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (net.eval()(x) - hf(pixel_values=x).logits).abs().max().item() < 1e-4


def test_hf_vit_conversion_names_missing_and_unexpected_keys():
    hf = _tiny_hf_vit()
    state = dict(hf.state_dict())
    config = hf.config.to_dict()
    state.pop("classifier.bias")
    state["vit.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing \(e\.g\. classifier\.bias\).*unexpected \(e\.g\. vit\.extra"):
        convert_hf_vit_state_dict(state, config)


def test_cifar10_preset_runs_the_hf_checkpoint_on_the_feature_extractor_input(tmp_path):
    hf = _tiny_hf_vit(image_size=224, patch_size=16, seed=5)
    _save_hf_folder(hf, tmp_path, "safetensors")
    model = build_classifier("cifar10", str(tmp_path))
    x = _purified(3, 32, seed=6)
    with torch.no_grad():
        want = hf(pixel_values=_pil_feature_extractor(x)).logits
        got = model(x)
        labels = model.labels(x)
    assert (got - want).abs().max().item() < 1e-4
    assert labels.dtype == torch.int64 and torch.equal(labels, want.argmax(dim=1))


# ---------------------------------------------------------------------------- preprocessing numbers


def test_cifar10_preprocessing_is_bit_exact_with_the_pil_feature_extractor():
    model = PurifiedClassifier.for_preset("cifar10", _stand_in(10, 16))
    x = _purified(4, 32, seed=7)
    assert torch.equal(model.preprocess(x), _pil_feature_extractor(x))


def test_cifar10_preprocessing_is_unit_range_uint8_bilinear_224_then_half_mean_std():
    net = _stand_in(10, 16)
    model = PurifiedClassifier.for_preset("cifar10", net)
    x = _purified(2, 32, seed=8)
    u = torch.floor((x + 1) / 2 * 255)
    w = torch.round(F.interpolate(u, size=(32, 224), mode="bilinear", align_corners=False, antialias=False))
    h = torch.round(F.interpolate(w, size=(224, 224), mode="bilinear", align_corners=False, antialias=False))
    want = (h / 255 - 0.5) / 0.5
    assert torch.equal(model.preprocess(x), want)
    with torch.no_grad():
        assert torch.equal(model(x), net(want))


def test_float_path_without_uint8_round_trip_is_plain_bilinear():
    p = PRESETS["cifar10"]
    model = PurifiedClassifier(
        _stand_in(10, 16), 10, image_size=32, size=224, mode="bilinear", mean=p.mean, std=p.std, pil_uint8=False
    )
    x = _purified(2, 32, seed=9)
    want = (F.interpolate((x + 1) / 2, size=(224, 224), mode="bilinear", align_corners=False) - 0.5) / 0.5
    assert torch.allclose(model.preprocess(x), want, atol=1e-6, rtol=0)


def test_imagenet_preprocessing_is_bicubic_512_without_antialias_on_the_raw_image():
    net = _stand_in(1000, 64)
    model = PurifiedClassifier.for_preset("imagenet", net)
    x = _purified(2, 256, seed=10)
    want = F.interpolate(x, size=(512, 512), mode="bicubic", align_corners=False, antialias=False)
    got = model.preprocess(x)
    assert torch.equal(got, want)
    assert not torch.allclose(got, F.interpolate(x, size=(512, 512), mode="bicubic", antialias=True))
    assert got.abs().max() > 1.0  # bicubic overshoot is fed as it is, as in the official code
    with torch.no_grad():
        assert torch.equal(model(x), net(want))


def test_labels_output_is_int64_argmax_of_the_logits():
    model = PurifiedClassifier.for_preset("cifar10", _stand_in(10, 16), output="labels")
    x = _purified(5, 32, seed=11)
    with torch.no_grad():
        labels = model(x)
        logits = model.logits(x)
    assert labels.dtype == torch.int64 and labels.shape == (5,)
    assert torch.equal(labels, logits.argmax(dim=1))


# ---------------------------------------------------------------------------- architectures


def test_imagenet_classifier_is_beit_large_512_with_305_7m_parameters():
    model = build_classifier("imagenet", meta=True)
    n = count_parameters(model)
    print(f"beit_large_patch16_512 (1000 classes): {n:,} parameters")
    assert n == PRESETS["imagenet"].params == 305_674_728
    assert abs(n - 305.7e6) < 0.1e6
    # mean = std = 0.5 is what makes [-1, 1] the network's normalised input.
    assert tuple(model.net.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)
    assert tuple(model.net.pretrained_cfg["std"]) == (0.5, 0.5, 0.5)
    assert model.net.patch_embed.img_size == (512, 512)


def test_cifar10_classifier_is_vit_b16_224_with_85_8m_parameters():
    model = build_classifier("cifar10", meta=True)
    n = count_parameters(model)
    print(f"ViT-B/16 224 (10 classes): {n:,} parameters")
    assert n == PRESETS["cifar10"].params == 85_806_346
    assert model.net.patch_embed.img_size == (224, 224)
    assert model.net.norm.eps == 1e-12  # the published transformers checkpoint's layer_norm_eps


def test_classifier_config_is_json_and_agrees_with_the_wrapper():
    for preset in PRESETS:
        cfg = classifier_config(preset)
        assert json.loads(json.dumps(cfg)) == cfg
        described = PurifiedClassifier.for_preset(preset, _stand_in(cfg["num_classes"], 16)).describe()
        for key in ("num_classes", "input", "resize", "pil_uint8", "mean", "std"):
            assert described[key] == cfg[key], (preset, key)
    assert classifier_config("imagenet")["resize"]["mode"] == "bicubic"


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("preset", "source"),
    [("imagenet", "beit_large_patch16_512.in22k_ft_in22k_in1k"), ("cifar10", "aaraki/vit-base-patch16-224-in21k")],
)
def test_missing_checkpoint_says_where_to_get_it_and_which_flag(tmp_path, preset, source):
    for checkpoint in (None, tmp_path / "absent.safetensors"):
        with pytest.raises(CheckpointError) as err:
            build_classifier(preset, checkpoint)
        assert CLASSIFIER_CKPT_FLAG in str(err.value) and source in str(err.value)


@pytest.mark.parametrize("preset", ["imagenet", "cifar10"])
def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path, preset):
    ints = tmp_path / "ints.pth"
    torch.save([1, 2, 3], ints)
    noise = tmp_path / "noise.bin"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"not a safetensors file")
    for path in (ints, noise, fake):
        with pytest.raises(CheckpointError):
            build_classifier(preset, str(path))


def test_hf_folder_without_config_or_weights_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        build_classifier("cifar10", str(tmp_path))
    config = {"model_type": "vit", "id2label": {str(i): str(i) for i in range(10)}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        build_classifier("cifar10", str(tmp_path))


def test_hf_checkpoint_with_the_wrong_number_of_classes_is_refused(tmp_path):
    hf = _tiny_hf_vit(image_size=224, patch_size=16)
    hf.config.id2label = {i: str(i) for i in range(7)}
    hf.config.label2id = {str(i): i for i in range(7)}
    hf.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="7-class"):
        build_classifier("cifar10", str(tmp_path))


def test_unknown_preset_and_contradictory_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown classifier preset"):
        build_classifier("mnist", random_weights=True)
    with pytest.raises(ConfigError, match="unknown classifier preset"):
        classifier_config("mnist")
    with pytest.raises(ConfigError):
        build_classifier("cifar10", str(tmp_path), random_weights=True)
    with pytest.raises(ConfigError):
        PurifiedClassifier(_stand_in(10, 16), 10, image_size=32, size=224, mode="bicubic", pil_uint8=True)


def test_imagenet_loads_a_beit_release_style_file(tmp_path, monkeypatch):
    # The real beit_large_patch16_512 code path with a narrow, shallow BEiT (timm.create_model gets
    # smaller widths), saved as the BEiT release files are: {"model": state} still carrying the
    # relative_position_index buffers that timm no longer saves.
    import timm

    create = timm.create_model
    narrow = dict(embed_dim=32, depth=2, num_heads=2)
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: create(name, **{**kw, **narrow}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12)
        ref = timm.create_model("beit_large_patch16_512", pretrained=False, num_classes=1000).eval()
    state = dict(ref.state_dict())
    tokens = ref.patch_embed.num_patches + 1
    for i in range(2):
        state[f"blocks.{i}.attn.relative_position_index"] = torch.zeros(tokens, tokens, dtype=torch.long)
    torch.save({"model": state}, tmp_path / "beit_large_patch16_512_pt22k_ft22kto1k.pth")
    model = build_classifier("imagenet", str(tmp_path / "beit_large_patch16_512_pt22k_ft22kto1k.pth"), output="labels")
    x = _purified(1, 256, seed=13)
    with torch.no_grad():
        want = ref(F.interpolate(x, size=(512, 512), mode="bicubic", align_corners=False))
        assert torch.equal(model.logits(x), want)
        assert torch.equal(model(x), want.argmax(dim=1))


@pytest.mark.parametrize(("preset", "side", "patch"), [("cifar10", 32, 16), ("imagenet", 256, 64)])
def test_wrapper_exports_to_onnx_and_runs_in_onnxruntime(tmp_path, preset, side, patch):
    import onnxruntime as ort

    model = PurifiedClassifier.for_preset(preset, _stand_in(PRESETS[preset].num_classes, patch)).eval()

    class Both(nn.Module):
        def __init__(self, inner: PurifiedClassifier) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner.preprocess(x), self.inner.labels(x)

    path = tmp_path / f"{preset}.onnx"
    # The exporter the engine builder uses (TorchScript-based, opset 17, dynamic batch).
    torch.onnx.export(
        Both(model).eval(),
        (_purified(2, side),),
        str(path),
        input_names=["x0_hat"],
        output_names=["net_input", "labels"],
        dynamic_axes={"x0_hat": {0: "batch"}, "net_input": {0: "batch"}, "labels": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    x = _purified(3, side, seed=14)
    net_input, labels = ort.InferenceSession(str(path)).run(None, {"x0_hat": x.numpy()})
    with torch.no_grad():
        want = model.preprocess(x).numpy()
        want_labels = model.labels(x).numpy()
    assert labels.dtype == np.int64 and np.array_equal(labels, want_labels)
    # CIFAR's uint8 round trip is integer arithmetic: exact. Bicubic differs only by float rounding.
    assert np.abs(net_input - want).max() <= (0.0 if preset == "cifar10" else 1e-5)


@pytest.mark.parametrize("name", ["imagenet", "cifar10"])
def test_a_preset_declares_the_preprocessing_of_its_published_classifier(name):
    from densepure_rt.export.classifiers import with_preprocessing
    from densepure_rt.presets import get_preset

    p = get_preset(name)
    declared = with_preprocessing(nn.Identity(), p.num_classes, p.image_size, p.channels, p.classifier_preprocessing)
    assert declared.describe() == PurifiedClassifier.for_preset(name, nn.Identity()).describe()


def test_every_preset_is_a_network_of_the_registry_and_export_has_no_per_preset_branches():
    import re
    from pathlib import Path

    import densepure_rt.export as export
    from densepure_rt.export.models import NETWORKS
    from densepure_rt.presets import PRESETS

    assert {p.classifier for p in PRESETS.values()} <= set(NETWORKS)
    branches = re.compile(r"\b(p|preset)\.name\s*(==|!=|in\b|not in\b)")
    for source in Path(export.__file__).parent.glob("*.py"):
        for number, line in enumerate(source.read_text().splitlines(), 1):
            assert not branches.search(line), f"{source.name}:{number}: {line.strip()}"
