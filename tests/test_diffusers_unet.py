"""Diffusion models from the user (build --unet): the reverse step of a diffusers UNet2DModel against
diffusers' own DDPMScheduler stepping on the same noise (one step and a whole b-step trajectory),
for every variance type and prediction type the step supports; the folder's refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

diffusers = pytest.importorskip("diffusers", reason="the dev extra installs diffusers")

from densepure_rt.cli import main  # noqa: E402
from densepure_rt.export.diffusion import DiffusersUNet, load_diffusion_model  # noqa: E402
from densepure_rt.export.step import DenoiseStep  # noqa: E402
from densepure_rt.schedule import linear_schedule, reverse_schedule  # noqa: E402

ATOL = 1e-4
SIGMA, STEPS = 0.5, 4  # t* = 258, taus 258, 194, 129, 64: every respaced beta' far below the 0.999 clamp


def _unet(variance: str, channels: int = 1, size: int = 16, seed: int = 0):
    """A small random UNet2DModel. A "learned" head outputs the variance itself (diffusers takes its
    square root), so its variance channels are made small and positive."""
    torch.manual_seed(seed)
    out = 2 * channels if variance.startswith("learned") else channels
    model = diffusers.UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=out, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        if variance == "learned":
            model.conv_out.weight[channels:] *= 1e-3
            model.conv_out.bias[channels:] = 0.05
    return model


def _reference(variance: str, prediction: str, taus) -> "diffusers.DDPMScheduler":
    """diffusers' DDPMScheduler at the respaced timesteps, with DensePure's respacing of the table:
    alpha_bar'(tau) = alpha_bar(tau) / alpha_bar(0) (docs/design.md 1.4; the reverse run starts the
    respaced grid at step 0), applied to diffusers' own table."""
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type=variance, prediction_type=prediction,
                                        clip_sample=True)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod / scheduler.alphas_cumprod[0]
    scheduler.set_timesteps(timesteps=list(taus))
    return scheduler


CASES = [(v, "epsilon") for v in ("fixed_small", "fixed_large", "learned", "learned_range")] + [
    ("fixed_large", "v_prediction"), ("learned_range", "v_prediction"), ("fixed_small", "sample")]


@pytest.mark.slow
@pytest.mark.parametrize("variance, prediction", CASES)
def test_one_step_and_a_whole_trajectory_match_diffusers_ddpm_scheduler(variance, prediction):
    model = _unet(variance)
    rs = reverse_schedule(linear_schedule(1000, rescale_timesteps=False), SIGMA, STEPS)
    assert rs.taus == (258, 194, 129, 64)
    step = DenoiseStep(DiffusersUNet(model), variance, prediction, clip=True).eval()
    scheduler = _reference(variance, prediction, rs.taus)
    scalars = torch.as_tensor(rs.scalars, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 16, 16, generator=g) * rs.input_scale
    ours, theirs = x.clone(), x.clone()
    with torch.no_grad():
        for i, tau in enumerate(rs.taus):
            # diffusers draws its noise with randn_tensor(shape, generator): the same draws as here.
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + i))
            out = model(theirs, torch.tensor(tau)).sample
            ref = scheduler.step(out, tau, theirs, generator=torch.Generator().manual_seed(100 + i))
            got = step(theirs, noise, scalars[i])  # one step from the reference's own x_t
            last = i == len(rs.taus) - 1
            # DensePure's last step returns the clipped x0 prediction (its posterior mean at a' = 1).
            want = ref.pred_original_sample if last else ref.prev_sample
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=ATOL, rtol=0)
            ours = step(ours, noise, scalars[i])
            theirs = ref.prev_sample
    np.testing.assert_allclose(ours.numpy(), ref.pred_original_sample.numpy(), atol=ATOL, rtol=0)
    assert float(ours.abs().max()) <= 1.0


def _save(folder: Path, variance: str, size: int = 16, **scheduler) -> Path:
    _unet(variance, size=size).save_pretrained(folder / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type=variance, **scheduler).save_pretrained(folder / "scheduler")
    return folder


def test_a_folder_records_its_conventions_and_refuses_what_the_runtime_cannot_do(tmp_path):
    model = load_diffusion_model(_save(tmp_path / "ok", "learned_range"))
    assert (model.image_size, model.channels, model.schedule, model.num_timesteps, model.rescale_timesteps) == (16, 1, "linear", 1000, False)
    assert (model.variance_type, model.prediction_type, model.clip_x0) == ("learned_range", "epsilon", True)
    with pytest.raises(Exception, match="the runtime's schedules are the linear one"):
        load_diffusion_model(_save(tmp_path / "cos", "fixed_small", beta_schedule="squaredcos_cap_v2"))
    # 14 x 14 is not halved evenly by the UNet's two levels and attention: the UNet cannot take it.
    odd = _save(tmp_path / "odd", "fixed_small")
    config = json.loads((odd / "unet" / "config.json").read_text())
    (odd / "unet" / "config.json").write_text(json.dumps({**config, "sample_size": 15}))
    with pytest.raises(Exception, match="cannot take its 1x15x15 images"):
        load_diffusion_model(odd)


@pytest.mark.slow
def test_build_unet_writes_an_engine_whose_step_graph_matches_diffusers(tmp_path):
    import onnxruntime as ort

    folder = _save(tmp_path / "ddpm", "fixed_large")
    out = tmp_path / "engine"
    result = CliRunner().invoke(main, ["build", "--unet", str(folder), "--model", "digits", "--out", str(out)])
    assert result.exit_code == 0, result.output
    from densepure_rt.files.manifest import load_manifest

    m = load_manifest(out)
    assert m.unet_source["format"] == "diffusers" and (m.variance_type, m.prediction_type) == ("fixed_large", "epsilon")
    assert (m.schedule.kind, m.schedule.rescale_timesteps, m.image_shape) == ("linear", False, (1, 16, 16))
    session = ort.InferenceSession(str(out / "step.onnx"), providers=["CPUExecutionProvider"])
    rs = reverse_schedule(linear_schedule(1000, rescale_timesteps=False), SIGMA, STEPS)
    scheduler = _reference("fixed_large", "epsilon", rs.taus)
    model = _unet("fixed_large")
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = scheduler.step(model(x, torch.tensor(rs.taus[1])).sample, rs.taus[1], x, generator=torch.Generator().manual_seed(7))
    (got,) = session.run(None, {"x": x.numpy(), "noise": noise.numpy(), "scalars": np.repeat(rs.scalars[1:2], 2, 0).astype(np.float32)})
    np.testing.assert_allclose(got, want.prev_sample.numpy(), atol=ATOL, rtol=0)
    # A UNet for 32 x 32 images with the digits classifier (16 x 16): refused, in one line, before any export.
    bigger = _save(tmp_path / "big", "fixed_large", size=32)
    bad = CliRunner().invoke(main, ["build", "--unet", str(bigger), "--model", "digits", "--out", str(tmp_path / "e2")])
    assert bad.exit_code == 2, bad.output
    assert "the digits classifier takes 1x16x16 images but --unet makes 1x32x32: give --classifier" in bad.output
    assert not (tmp_path / "e2").exists()
