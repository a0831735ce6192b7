"""The reverse process and schedules reproduce the official DensePure code (fixtures in tests/fixtures)."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import REVERSE_FIXTURES, fixture_dir, fixture_schedule, load_fixture_unet, read_json
from densepure_rt.export.reference import reverse_run, to_diffusion_input
from densepure_rt.export.step import DenoiseStep
from densepure_rt.schedule import ONE_SHOT, cosine_schedule, linear_schedule, reverse_schedule, t_star


@pytest.mark.parametrize("name", REVERSE_FIXTURES)
def test_reverse_run_reproduces_official_trajectory(name):
    folder = fixture_dir(name)
    cfg = read_json(folder / "config.json")
    model, _ = load_fixture_unet(cfg["unet_fixture"])
    rs = reverse_schedule(fixture_schedule(cfg), cfg["sigma"], cfg["steps"])
    assert rs.t_star == pytest.approx(cfg["t_star"], abs=1e-9)
    assert rs.input_scale == pytest.approx(cfg["scale"], abs=1e-12)
    assert rs.num_calls == cfg["noise_draws"]
    tr = load_file(str(folder / "trajectory.safetensors"))
    x_t = to_diffusion_input(tr["x_clean"] + tr["delta"], rs)
    out = reverse_run(DenoiseStep(model), x_t, rs, [tr[f"noise_{i}"] for i in range(cfg["noise_draws"])])
    err = (out - tr["out"]).abs().max().item()
    print(f"{name}: max abs error {err:.3e}")
    assert err < 1e-4
    assert out.min() >= -1 and out.max() <= 1


@pytest.mark.parametrize("sigma, expected", [(0.25, 144), (0.5, 258), (1.0, 396)])
def test_t_star_linear_is_nearest_discrete_index(sigma, expected):
    assert t_star(linear_schedule(1000), sigma) == expected


@pytest.mark.parametrize("sigma, expected", [(0.25, 1158.51), (0.5, 1984.20), (1.0, 2809.99)])
def test_t_star_cosine_closed_form(sigma, expected):
    assert t_star(cosine_schedule(4000), sigma) == pytest.approx(expected, abs=0.005)


def test_t_star_alpha_bar_matches_smoothing_noise_level():
    # alpha_bar(t*) = 1 / (1 + 4 sigma^2): checked against the tables themselves.
    lin = linear_schedule(1000)
    for sigma in (0.12, 0.25, 0.5, 1.0):
        t = int(t_star(lin, sigma))
        ratio = (1 / lin.alphas_cumprod - 1) ** 0.5
        assert abs(ratio[t] - 2 * sigma) <= min(abs(ratio[t - 1] - 2 * sigma), abs(ratio[t + 1] - 2 * sigma))
    cos = cosine_schedule(4000)
    for sigma in (0.25, 0.5, 1.0):
        t = t_star(cos, sigma)
        # Respaced alpha_bar'(t*) = f(t*/T) / f(0) is exactly 1 / (1 + 4 sigma^2) for the closed form.
        assert cos.continuous_alpha_bar(t) / cos.continuous_alpha_bar(0.0) == pytest.approx(1 / (1 + 4 * sigma**2), rel=1e-12)


def test_fast_sampling_timesteps_use_python_rounding():
    rs = reverse_schedule(linear_schedule(1000), 0.5, 4)
    assert rs.taus == (258, 194, 129, 64)  # 193.5 -> 194 and 64.5 -> 64: round half to even
    assert rs.column("noise_mask").tolist() == [1.0, 1.0, 1.0, 0.0]
    # Last step: posterior mean is x0_hat itself.
    assert rs.column("coef1")[-1] == pytest.approx(1.0, abs=1e-12)
    assert rs.column("coef2")[-1] == pytest.approx(0.0, abs=1e-12)
    cifar = reverse_schedule(cosine_schedule(4000), 0.25, 3)
    assert cifar.taus == (1159, 772, 386)
    assert cifar.column("model_t").tolist() == [1159 / 4, 772 / 4, 386 / 4]


def test_one_shot_uses_original_schedule_at_round_t_star():
    lin = linear_schedule(1000)
    rs = reverse_schedule(lin, 0.25, ONE_SHOT)
    assert rs.taus == (144,)
    assert rs.column("sqrt_recip_ab")[0] == pytest.approx((1 / lin.alphas_cumprod[144]) ** 0.5, rel=1e-15)
    assert rs.column("noise_mask")[0] == 0.0
    assert reverse_schedule(lin, 0.25, "one-shot").taus == (144,)


def test_respaced_alpha_bar_is_ratio_to_alpha_bar_zero():
    lin = linear_schedule(1000)
    rs = reverse_schedule(lin, 1.0, 10)
    ab = 1 / rs.column("sqrt_recip_ab") ** 2
    expected = [lin.alphas_cumprod[t] / lin.alphas_cumprod[0] for t in rs.taus]
    assert ab == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_nonpositive_sigma_is_refused(bad):
    with pytest.raises(ValueError):
        reverse_schedule(linear_schedule(1000), bad, 4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["densepure_guided_sigma0.5_b4", "densepure_improved_sigma0.25_b3"])
def test_reverse_run_in_fp16_mode_stays_close_to_official(name):
    folder = fixture_dir(name)
    cfg = read_json(folder / "config.json")
    model, _ = load_fixture_unet(cfg["unet_fixture"], fp16=True)
    rs = reverse_schedule(fixture_schedule(cfg), cfg["sigma"], cfg["steps"])
    tr = load_file(str(folder / "trajectory.safetensors"))
    x_t = to_diffusion_input(tr["x_clean"] + tr["delta"], rs)
    out = reverse_run(DenoiseStep(model), x_t, rs, [tr[f"noise_{i}"] for i in range(cfg["noise_draws"])])
    assert out.dtype == torch.float32
    rel = ((out - tr["out"]).norm() / tr["out"].norm()).item()
    print(f"{name}: fp16 reference vs official relative L2 {rel:.2e}")
    assert rel < 1e-2
