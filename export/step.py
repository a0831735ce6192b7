"""One reverse step as a module: the UNet plus DensePure's posterior update (docs/design.md section 1.4).

This is both the reference's step and the exported *denoise step* graph, so the two cannot drift
apart. All per-step numbers arrive as one float32 row of ``densepure_rt.schedule.STEP_SCALARS``,
which makes one graph serve every sigma and every b. The scheduler arithmetic is float32 even when
the UNet runs in fp16 (its output head is float32 in fp16 mode, as in the original).
"""

from __future__ import annotations

import torch
from torch import nn

from densepure_rt.schedule import STEP_SCALARS

__all__ = ["DenoiseStep", "posterior_update"]

_IDX = {name: i for i, name in enumerate(STEP_SCALARS)}


def posterior_update(x: torch.Tensor, model_out: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x_{t-1} from x_t [N x C x H x W], the UNet output [N x 2C x H x W], z [N x C x H x W] and scalars s [8].

    x0_hat = clip(sqrt(1/a') x - sqrt(1/a' - 1) eps, -1, 1); mean = coef1 x0_hat + coef2 x;
    log var = frac log beta' + (1 - frac) log beta_tilde' with frac = (v + 1) / 2;
    x_{t-1} = mean + mask exp(log var / 2) z (exactly mean where mask = 0).
    """
    channels = x.shape[1]
    eps, v = model_out[:, :channels], model_out[:, channels:]
    x0 = torch.clamp(s[_IDX["sqrt_recip_ab"]] * x - s[_IDX["sqrt_recipm1_ab"]] * eps, -1.0, 1.0)
    mean = s[_IDX["coef1"]] * x0 + s[_IDX["coef2"]] * x
    frac = (v + 1) / 2
    log_var = frac * s[_IDX["max_log"]] + (1 - frac) * s[_IDX["min_log"]]
    # The last step adds no noise. The official code multiplies the noise term by 0 there, which
    # gives NaN when exp(log var / 2) overflows (a variance output v far outside [-1, 1]); selecting
    # instead keeps x_{t-1} = mean exactly, and is identical wherever the product is finite.
    mask = s[_IDX["noise_mask"]]
    return mean + torch.where(mask > 0, mask * torch.exp(0.5 * log_var) * noise, torch.zeros_like(mean))


class DenoiseStep(nn.Module):
    """(x_t [N x C x H x W] f32, noise [N x C x H x W] f32, scalars [8] f32) -> x_{t-1} [N x C x H x W] f32."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, noise: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        t = scalars[_IDX["model_t"]].expand(x.shape[0])
        return posterior_update(x, self.unet(x, t).float(), noise, scalars.float())
