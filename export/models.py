"""Build a preset's UNet and classifier (from checkpoints, shipped weights, or random weights)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

import densepure_rt
from densepure_rt.errors import CheckpointError, ConfigError
from densepure_rt.presets import Preset, get_preset

from .checkpoints import load_state_dict, load_strict
from .unet import UNetModel, create_model

__all__ = ["load_unet", "load_classifier", "SmallCNN", "ASSETS"]

ASSETS = Path(densepure_rt.__file__).resolve().parent / "assets"


@contextmanager
def _seeded(seed: int):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def _perturb(module: nn.Module, seed: int, std: float = 0.02) -> None:
    """Random weights that make every layer matter (like the fixtures): init, then Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)


class SmallCNN(nn.Module):
    """A small classifier for the ``tiny`` test preset: [N x C x S x S] -> [N x classes]."""

    def __init__(self, channels: int = 3, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def load_unet(
    preset: str | Preset, checkpoint: str | Path | None = None, random_weights: bool = False, seed: int = 0
) -> UNetModel:
    """The preset's UNet in eval mode, fp32: from ``checkpoint``, the shipped weights, or random weights."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    if checkpoint is not None and random_weights:
        raise ConfigError("--diffusion-ckpt and --random-weights exclude each other")
    with _seeded(seed):
        model = create_model(**p.unet_kwargs)
    if random_weights:
        _perturb(model, seed)
        return model.eval()
    if checkpoint is None and p.shipped_unet:
        checkpoint = ASSETS / p.shipped_unet
    if checkpoint is None:
        raise CheckpointError(
            f"the {p.name} preset needs a diffusion checkpoint: {p.diffusion_ckpt_hint} "
            "(or --random-weights for benchmarking)"
        )
    load_strict(model, load_state_dict(checkpoint, "diffusion checkpoint"), f"diffusion checkpoint {checkpoint}")
    return model.eval()


def load_classifier(
    preset: str | Preset, checkpoint: str | Path | None = None, random_weights: bool = False, seed: int = 0
) -> nn.Module:
    """The preset's classifier, wrapped to take the purified image in [-1, 1] and return logits."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    if p.name in ("imagenet", "cifar10"):
        from .classifiers import build_classifier

        return build_classifier(p.name, checkpoint, random_weights=random_weights, seed=seed)
    from .classifiers import PurifiedClassifier

    if random_weights and checkpoint is not None:
        raise ConfigError("--classifier-ckpt and --random-weights exclude each other")
    with _seeded(seed):
        if p.name == "digits":
            from .digits import DIGITS_CLASSIFIER, DigitsNet

            net: nn.Module = DigitsNet()
            mean, std = DIGITS_CLASSIFIER["mean"], DIGITS_CLASSIFIER["std"]
        else:
            net = SmallCNN(p.channels, p.num_classes)
            mean, std = 0.5, 0.5
    if not random_weights:
        if checkpoint is None and p.shipped_classifier:
            checkpoint = ASSETS / p.shipped_classifier
        if checkpoint is None:
            raise CheckpointError(f"the {p.name} preset needs a classifier checkpoint: {p.classifier_ckpt_hint}")
        load_strict(net, load_state_dict(checkpoint, "classifier checkpoint"), f"classifier checkpoint {checkpoint}")
    return PurifiedClassifier(
        net.eval(),
        p.num_classes,
        image_size=p.image_size,
        size=None,
        mean=(mean,) * p.channels,
        std=(std,) * p.channels,
    ).eval()
