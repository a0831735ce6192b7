"""The PyTorch reference of DensePure: the parity baseline for every engine and the benchmark baseline.

It reproduces the official code (Jayfeather1024/DensePure) step for step, but takes all of its
randomness as arguments: the smoothing noise ``delta`` and the reverse-process draws ``noise_i``.
That is what lets it be checked against the official fixtures (tests/fixtures) and against the runtime.

Layout of a batch (as in the official code's clustering path): B noisy samples x K runs are
flattened to B*K rows, the runs of one sample adjacent (row b*K + k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from densepure_rt.stats.cohen import Certificate, certify, predict, Prediction
from densepure_rt.sampling.noise import ESTIMATION, PREDICTION, SELECTION, sample_noise
from densepure_rt.schedule import BetaSchedule, ReverseSchedule, reverse_schedule
from densepure_rt.stats.vote import majority_vote

from .step import DenoiseStep

__all__ = ["reverse_run", "to_diffusion_input", "vote_torch", "DensePureReference"]


def to_diffusion_input(x_noisy: torch.Tensor, rs: ReverseSchedule) -> torch.Tensor:
    """x + delta in [0,1] pixel space -> x_{t*} = (2 (x + delta) - 1) / sqrt(1 + 4 sigma^2)."""
    return rs.input_scale * (2 * x_noisy - 1)


@torch.no_grad()
def reverse_run(
    step: DenoiseStep, x_t: torch.Tensor, rs: ReverseSchedule, noise: Sequence[torch.Tensor]
) -> torch.Tensor:
    """One reverse run of ``rs.num_calls`` steps from x_{t*} [N x C x H x W]; returns x0_hat in [-1, 1].

    ``noise[i]`` [N x C x H x W] is the standard-normal draw of step i (noise[0] at t*); the last
    step's draw is multiplied by zero, as in the original.
    """
    if len(noise) < rs.num_calls:
        raise ValueError(f"need {rs.num_calls} noise draws, got {len(noise)}")
    scalars = torch.as_tensor(rs.scalars, dtype=torch.float32, device=x_t.device)
    x = x_t
    for i in range(rs.num_calls):
        x = step(x, noise[i].to(x.dtype), scalars[i])
    return x


def vote_torch(labels: torch.Tensor, votes: int) -> torch.Tensor:
    """[B*K] labels (runs of a sample adjacent) -> [B] voted labels, the official tie rule."""
    return torch.from_numpy(majority_vote(labels.reshape(-1, votes).cpu().numpy()))


@dataclass
class DensePureReference:
    """The DensePure smoothed classifier in eager PyTorch (fp32 or fp16 UNet, CPU or CUDA).

    ``classifier`` maps purified images [N x C x H x W] in [-1, 1] to logits [N x num_classes].
    """

    unet: nn.Module
    classifier: nn.Module
    schedule: BetaSchedule
    num_classes: int
    device: str | torch.device = "cpu"

    def __post_init__(self):
        self.step = DenoiseStep(self.unet).eval().to(self.device)
        self.classifier = self.classifier.eval().to(self.device)

    @torch.no_grad()
    def labels(
        self, x_clean: torch.Tensor, delta: torch.Tensor, noise: Sequence[torch.Tensor], rs: ReverseSchedule, votes: int
    ) -> torch.Tensor:
        """Voted labels [B] for B noisy copies x_clean + delta[b] ([C x H x W] + [B x C x H x W]).

        ``noise[i]`` is [B*votes x C x H x W] (row b*votes + k is run k of sample b).
        """
        dev = self.device
        x_noisy = x_clean.to(dev) + delta.to(dev)
        x_t = to_diffusion_input(x_noisy, rs).repeat_interleave(votes, dim=0)
        purified = reverse_run(self.step, x_t, rs, [z.to(dev) for z in noise])
        run_labels = self.classifier(purified).argmax(dim=1)
        return vote_torch(run_labels, votes)

    def sample_counts(
        self,
        x_clean: np.ndarray,
        num: int,
        rs: ReverseSchedule,
        votes: int,
        seed: int,
        image_index: int,
        phase: int,
        batch: int,
    ) -> np.ndarray:
        """Per-class counts [num_classes] of ``num`` voted labels, noise from ``densepure_rt.sampling.noise``."""
        counts = np.zeros(self.num_classes, dtype=np.int64)
        x = torch.from_numpy(np.asarray(x_clean, dtype=np.float32))
        for start in range(0, num, batch):
            samples = range(start, min(start + batch, num))
            delta, z = sample_noise(seed, image_index, phase, samples, votes, rs.num_calls, x.shape, rs.sigma)
            voted = self.labels(x, torch.from_numpy(delta), [torch.from_numpy(zi) for zi in z], rs, votes)
            counts += np.bincount(voted.numpy(), minlength=self.num_classes)
        return counts

    def certify(
        self,
        x_clean: np.ndarray,
        sigma: float,
        steps: int,
        votes: int,
        n0: int,
        n: int,
        alpha: float,
        seed: int = 0,
        image_index: int = 0,
        batch: int = 32,
    ) -> Certificate:
        """Cohen et al.'s CERTIFY of the DensePure smoothed classifier at one image [C x H x W] in [0, 1]."""
        rs = reverse_schedule(self.schedule, sigma, steps)
        counts0 = self.sample_counts(x_clean, n0, rs, votes, seed, image_index, SELECTION, batch)
        counts = self.sample_counts(x_clean, n, rs, votes, seed, image_index, ESTIMATION, batch)
        return certify(counts0, counts, sigma, alpha)

    def predict(
        self,
        x_clean: np.ndarray,
        sigma: float,
        steps: int,
        votes: int,
        n: int,
        alpha: float,
        seed: int = 0,
        image_index: int = 0,
        batch: int = 32,
    ) -> Prediction:
        """Cohen et al.'s PREDICT of the DensePure smoothed classifier at one image [C x H x W] in [0, 1]."""
        rs = reverse_schedule(self.schedule, sigma, steps)
        counts = self.sample_counts(x_clean, n, rs, votes, seed, image_index, PREDICTION, batch)
        return predict(counts, alpha)
