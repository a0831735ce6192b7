"""One reverse step as a module: the UNet plus DensePure's posterior update (docs/design.md section 1.4).

This is both the reference's step and the exported *denoise step* graph, so the two cannot drift
apart. All per-step numbers arrive as float32 rows of ``densepure_rt.schedule.STEP_SCALARS``, one
row per image row (engine format 3), which makes one graph serve every sigma and every b, and lets
rows at different reverse steps (of different noisy samples, runs and images) share one call: the
runtime's scheduler fills every call that way. A single row [8] (the reference's per-step call)
is broadcast to every image row: the arithmetic is the same float32 operations either way. The scheduler arithmetic is float32 even when
the UNet runs in fp16 (its output head is float32 in fp16 mode, as in the original).
"""

from __future__ import annotations

import torch
from torch import nn

from densepure_rt.schedule import STEP_SCALARS

__all__ = ["DenoiseStep", "per_row", "posterior_update", "VARIANCE_TYPES", "PREDICTION_TYPES"]

_IDX = {name: i for i, name in enumerate(STEP_SCALARS)}


#: The variance heads the step supports (diffusers' names; guided-diffusion's learned sigma is
#: "learned_range") and the prediction types.
VARIANCE_TYPES = ("learned_range", "learned", "fixed_small", "fixed_large")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def posterior_update(x: torch.Tensor, model_out: torch.Tensor, noise: torch.Tensor, s: torch.Tensor,
                     variance: str = "learned_range", prediction: str = "epsilon", clip: bool = True) -> torch.Tensor:
    """x_{t-1} from x_t [N x C x H x W], the UNet output ([N x 2C x H x W] with a learned variance,
    else [N x C x H x W]), z [N x C x H x W] and scalars s [N x 8] (row i's step numbers; see :func:`per_row`).

    x0_hat = sqrt(1/a') x - sqrt(1/a' - 1) eps (``prediction`` "epsilon"; "sample": the output
    itself; "v_prediction": sqrt(a') x - sqrt(1 - a') v), clipped to [-1, 1] where ``clip``;
    mean = coef1 x0_hat + coef2 x; log var by ``variance``: "learned_range" frac log beta' +
    (1 - frac) log beta_tilde' with frac = (v + 1) / 2, "learned" log v (v is the variance, as in
    diffusers), "fixed_small" log beta_tilde', "fixed_large" log beta';
    x_{t-1} = mean + mask exp(log var / 2) z (exactly mean where mask = 0).
    """
    channels = x.shape[1]
    learned = variance in ("learned_range", "learned")
    if learned:
        eps, v = model_out[:, :channels], model_out[:, channels:]
    else:
        eps = model_out
    s = s.reshape(s.shape[0], s.shape[1], *([1] * (x.dim() - 1))).unbind(1)  # 8 columns of [N x 1 x 1 x 1]
    if prediction == "epsilon":
        x0 = s[_IDX["sqrt_recip_ab"]] * x - s[_IDX["sqrt_recipm1_ab"]] * eps
    elif prediction == "sample":
        x0 = eps
    else:  # v_prediction: sqrt(a') = 1 / sqrt_recip_ab, sqrt(1 - a') = sqrt_recipm1_ab / sqrt_recip_ab
        x0 = (x - s[_IDX["sqrt_recipm1_ab"]] * eps) / s[_IDX["sqrt_recip_ab"]]
    if clip:
        x0 = torch.clamp(x0, -1.0, 1.0)
    mean = s[_IDX["coef1"]] * x0 + s[_IDX["coef2"]] * x
    if variance == "learned_range":
        frac = (v + 1) / 2
        log_var = frac * s[_IDX["max_log"]] + (1 - frac) * s[_IDX["min_log"]]
    elif variance == "learned":
        log_var = torch.log(v)
    elif variance == "fixed_small":
        log_var = s[_IDX["min_log"]]
    else:  # fixed_large
        log_var = s[_IDX["max_log"]]
    # The last step adds no noise. The official code multiplies the noise term by 0 there, which
    # gives NaN when exp(log var / 2) overflows (a variance output v far outside [-1, 1]); selecting
    # instead keeps x_{t-1} = mean exactly, and is identical wherever the product is finite.
    mask = s[_IDX["noise_mask"]]
    return mean + torch.where(mask > 0, mask * torch.exp(0.5 * log_var) * noise, torch.zeros_like(mean))


def per_row(scalars: torch.Tensor, rows: int) -> torch.Tensor:
    """Scalars [rows x 8]: a [rows x 8] table as it is, one row [8] repeated for every image row."""
    if scalars.dim() == 1:
        return scalars.unsqueeze(0).expand(rows, scalars.shape[0])
    return scalars


class DenoiseStep(nn.Module):
    """(x_t [N x C x H x W] f32, noise [N x C x H x W] f32, scalars [N x 8] f32) -> x_{t-1} [N x C x H x W] f32.

    ``scalars`` may also be one row [8] shared by every image row (the reference calls it so).
    ``unet(x, t)`` returns the network's output; ``variance``, ``prediction`` and ``clip`` are its
    output head's conventions (:func:`posterior_update`)."""

    def __init__(self, unet: nn.Module, variance: str = "learned_range", prediction: str = "epsilon", clip: bool = True):
        super().__init__()
        if variance not in VARIANCE_TYPES or prediction not in PREDICTION_TYPES:
            raise ValueError(f"variance {variance!r} / prediction {prediction!r}: expected one of {VARIANCE_TYPES} / {PREDICTION_TYPES}")
        self.unet = unet
        self.variance, self.prediction, self.clip = variance, prediction, bool(clip)

    def forward(self, x: torch.Tensor, noise: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        scalars = per_row(scalars, x.shape[0])
        t = scalars[:, _IDX["model_t"]]
        return posterior_update(x, self.unet(x, t).float(), noise, scalars.float(), self.variance, self.prediction, self.clip)
