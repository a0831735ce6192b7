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

__all__ = ["load_unet", "load_classifier", "SmallCNN", "ASSETS", "NETWORKS"]

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


def _preset_network(published: str):
    """A published classifier's network (timm BEiT-L, the CIFAR-10 ViT-B): export/classifiers.py."""

    def build(p: Preset, checkpoint, random_weights: bool, seed: int) -> nn.Module:
        from .classifiers import build_classifier

        return build_classifier(published, checkpoint, random_weights=random_weights, seed=seed).net

    return build


def _shipped_network(factory):
    """A network of this project (shipped weights, a checkpoint, or random weights under ``seed``)."""

    def build(p: Preset, checkpoint, random_weights: bool, seed: int) -> nn.Module:
        if random_weights and checkpoint is not None:
            raise ConfigError("--classifier-ckpt and --random-weights exclude each other")
        with _seeded(seed):
            net = factory(p)
        if not random_weights:
            if checkpoint is None and p.shipped_classifier:
                checkpoint = ASSETS / p.shipped_classifier
            if checkpoint is None:
                raise CheckpointError(f"the {p.name} preset needs a classifier checkpoint: {p.classifier_ckpt_hint}")
            load_strict(net, load_state_dict(checkpoint, "classifier checkpoint"), f"classifier checkpoint {checkpoint}")
        return net

    return build


def _digits_net(p: Preset) -> nn.Module:
    from .digits import DigitsNet

    return DigitsNet()


#: The preset classifiers' networks, by :attr:`Preset.classifier`: (preset, checkpoint, random
#: weights, seed) -> the network on its own input. A preset names one of these and declares its
#: preprocessing (:attr:`Preset.classifier_preprocessing`); ``build --classifier`` brings the
#: network from a file instead (:mod:`densepure_rt.export.sources`), with the same preprocessing.
NETWORKS = {
    "beit_large_patch16_512": _preset_network("imagenet"),
    "vit_base_patch16_224": _preset_network("cifar10"),
    "digits-cnn": _shipped_network(_digits_net),
    "small-cnn": _shipped_network(lambda p: SmallCNN(p.channels, p.num_classes)),
}


def load_classifier(
    preset: str | Preset, checkpoint: str | Path | None = None, random_weights: bool = False, seed: int = 0
) -> nn.Module:
    """The preset's classifier, wrapped to take the purified image in [-1, 1] and return logits:
    its network (:data:`NETWORKS`) behind its declared preprocessing."""
    from .classifiers import with_preprocessing

    p = get_preset(preset) if isinstance(preset, str) else preset
    if p.classifier not in NETWORKS:
        raise ConfigError(f"the {p.name} preset names the classifier {p.classifier!r}, which is none of {', '.join(NETWORKS)}")
    net = NETWORKS[p.classifier](p, checkpoint, random_weights, seed)
    return with_preprocessing(net.eval(), p.num_classes, p.image_size, p.channels, p.classifier_preprocessing).eval()
