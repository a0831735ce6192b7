"""The UNet reproduces guided-diffusion and improved-diffusion key for key and output for output."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import UNET_FIXTURES, fixture_dir, load_fixture_unet
from densepure_rt.errors import CheckpointError
from densepure_rt.export.checkpoints import load_state_dict, load_strict
from densepure_rt.export.unet import GroupNorm32, create_model, default_channel_mult
from densepure_rt.presets import PRESETS


@pytest.mark.parametrize("name", UNET_FIXTURES)
def test_fixture_unet_loads_strictly_and_matches_original_output(name):
    model, cfg = load_fixture_unet(name)
    assert sum(p.numel() for p in model.parameters()) == cfg["params"]
    io = load_file(str(fixture_dir(name) / "io.safetensors"))
    with torch.no_grad():
        out = model(io["x"], io["t"])
    assert out.shape == io["out"].shape
    err = (out - io["out"]).abs().max().item()
    print(f"{name}: max abs error {err:.3e}")
    assert err < 1e-4


@pytest.mark.parametrize("name", UNET_FIXTURES)
def test_fp16_mode_stays_close_to_fp32_with_fp32_norm_and_softmax(name):
    model32, _ = load_fixture_unet(name)
    model16, _ = load_fixture_unet(name, fp16=True)
    io = load_file(str(fixture_dir(name) / "io.safetensors"))
    try:
        with torch.no_grad():
            ref = model32(io["x"], io["t"])
            # Record the dtype the attention softmax is computed in.
            seen = {"softmax": set()}
            real_softmax = torch.softmax

            def spy_softmax(x, *a, **k):
                seen["softmax"].add(x.dtype)
                return real_softmax(x, *a, **k)

            torch.softmax = spy_softmax
            try:
                out = model16(io["x"], io["t"])
            finally:
                torch.softmax = real_softmax
    except RuntimeError as exc:  # pragma: no cover - depends on the CPU build
        pytest.skip(f"this CPU build cannot run fp16 convolutions: {exc}")
    assert out.dtype == torch.float32
    rel = ((out - ref).norm() / ref.norm()).item()
    print(f"{name}: fp16 relative L2 {rel:.3e}")
    assert rel < 1e-2
    assert seen["softmax"] == {torch.float32}
    # Block convolutions hold fp16 weights; norms, time embedding and output head stay fp32.
    assert model16.input_blocks[1][0].in_layers[2].weight.dtype == torch.float16
    assert model16.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32
    assert model16.time_embed[0].weight.dtype == torch.float32
    assert model16.out[2].weight.dtype == torch.float32


def test_groupnorm_computes_statistics_in_float32():
    norm = GroupNorm32(32, 64)
    x = (torch.randn(2, 64, 8, 8) * 300 + 1000).half()
    got = norm(x)
    want = torch.nn.functional.group_norm(x.float(), 32, norm.weight, norm.bias, norm.eps).half()
    assert got.dtype == torch.float16
    assert torch.equal(got, want)


@pytest.mark.parametrize("preset, params", [("imagenet", 552_814_086), ("cifar10", 52_546_438)])
def test_full_size_presets_have_published_parameter_counts(preset, params):
    with torch.device("meta"):
        model = create_model(**PRESETS[preset].unet_kwargs)
    assert sum(p.numel() for p in model.parameters()) == params


def test_channel_mult_defaults_of_both_code_bases():
    assert default_channel_mult(256) == (1, 1, 2, 2, 4, 4)
    assert default_channel_mult(512) == (0.5, 1, 1, 2, 2, 4, 4)
    assert default_channel_mult(64) == (1, 2, 3, 4)
    assert default_channel_mult(32) == (1, 2, 2, 2)
    with pytest.raises(ValueError):
        default_channel_mult(48)


def test_new_attention_order_differs_from_legacy_with_same_weights():
    kw = dict(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16", num_head_channels=16,
              learn_sigma=True, channel_mult="1,2")
    legacy = create_model(**kw).eval()
    new = create_model(**kw, use_new_attention_order=True).eval()
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in legacy.state_dict().items()}
    legacy.load_state_dict(state)
    new.load_state_dict(state)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3.0, 500.0])
    with torch.no_grad():
        a, b = legacy(x, t), new(x, t)
        # With one head the two orders read q, k, v from the same channels.
        one = dict(kw, num_head_channels=-1, num_heads=1)
        l1, n1 = create_model(**one).eval(), create_model(**one, use_new_attention_order=True).eval()
        s1 = {k: v + 0.05 * torch.randn_like(v) for k, v in l1.state_dict().items()}
        l1.load_state_dict(s1)
        n1.load_state_dict(s1)
        assert torch.allclose(l1(x, t), n1(x, t), atol=1e-5)
    assert (a - b).abs().max() > 1e-3


def test_checkpoint_of_another_config_lists_the_differences(tmp_path):
    model, _ = load_fixture_unet("guided_diffusion_unet")
    other = create_model(image_size=32, num_channels=64, num_res_blocks=1, learn_sigma=True, channel_mult="1,2")
    with pytest.raises(CheckpointError) as err:
        load_strict(other, model.state_dict(), "--diffusion-ckpt")
    message = str(err.value)
    assert "missing" in message and "unexpected" in message and "shape mismatches" in message
    assert "\n" not in message


def test_checkpoint_files_load_without_pickled_code(tmp_path):
    model, _ = load_fixture_unet("improved_diffusion_unet")
    good = tmp_path / "model.pt"
    torch.save(model.state_dict(), good)
    state = load_state_dict(good)
    assert set(state) == set(model.state_dict())
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": model.state_dict()}, wrapped)
    assert set(load_state_dict(wrapped)) == set(model.state_dict())

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, evil)
    with pytest.raises(CheckpointError, match="pickled code"):
        load_state_dict(evil)
    not_a_state = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_a_state)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_state_dict(not_a_state)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(CheckpointError):
        load_state_dict(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "missing.pt")
