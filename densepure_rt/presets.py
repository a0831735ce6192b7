"""The model presets, as data (docs/design.md section 2). The runtime itself reads only an engine's manifest.

Paper numbers beside each preset are from Xiao et al. (ICLR 2023), Table 1 / Table 2 (certified
accuracy at radius 0 / 0.5 / 1.0, sigma chosen per radius), for orientation only: densepure-rt
reproduces the algorithm, not those runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from densepure_rt.errors import ConfigError
from densepure_rt.executors.registry import backend_precisions

__all__ = ["Preset", "PRESETS", "get_preset", "BACKEND_PRECISIONS"]

#: The precisions each backend runs (``build --backend/--precision``), from the backend registry
#: (:mod:`densepure_rt.executors.registry`): read without torch, so the CLI checks flags first.
BACKEND_PRECISIONS = backend_precisions()


@dataclass(frozen=True)
class Preset:
    """What a preset builds: the UNet kwargs of the original ``create_model``, the schedule, the data."""

    name: str
    unet_kwargs: dict
    schedule: str  # "linear" or "cosine"
    num_timesteps: int
    rescale_timesteps: bool
    image_size: int
    channels: int
    num_classes: int
    classifier: str
    diffusion_ckpt_hint: str
    classifier_ckpt_hint: str
    unet_gflop: float  # per sample, for the cost model (docs/design.md section 6)
    classifier_gflop: float
    published: dict = field(default_factory=dict)
    shipped_unet: str = ""  # file under densepure_rt/assets/ used when no checkpoint is given
    shipped_classifier: str = ""
    default_data: str = ""  # "digits-test": certify without --data uses the shipped test split
    description: str = ""
    #: Noisy samples per engine call by default (``build --batch``): with K = 10 votes, rows = 10 x
    #: this must stay within the engine's row limit (densepure_rt.limits).
    default_batch: int = 32


PRESETS: dict[str, Preset] = {
    # DensePure ImageNet (paper Table 2): 84.0 / 77.8 / 60.4 % at radius 0.0 / 0.5 / 1.0.
    "imagenet": Preset(
        name="imagenet",
        unet_kwargs=dict(
            image_size=256,
            num_channels=256,
            num_res_blocks=2,
            attention_resolutions="32,16,8",
            num_heads=4,
            num_head_channels=64,
            num_heads_upsample=-1,
            channel_mult="",
            learn_sigma=True,
            class_cond=False,
            resblock_updown=True,
            use_scale_shift_norm=True,
            use_new_attention_order=False,
            dropout=0.0,
        ),
        schedule="linear",
        num_timesteps=1000,
        rescale_timesteps=True,
        image_size=256,
        channels=3,
        num_classes=1000,
        classifier="beit_large_patch16_512",
        diffusion_ckpt_hint=(
            "guided-diffusion's 256x256_diffusion_uncond.pt (openai/guided-diffusion README, 'unconditional "
            "ImageNet 256x256'); pass it with --diffusion-ckpt"
        ),
        classifier_ckpt_hint=(
            "timm beit_large_patch16_512.in22k_ft_in22k_in1k weights saved as .safetensors/.pth; "
            "pass it with --classifier-ckpt"
        ),
        unet_gflop=2239.7,
        classifier_gflop=724.0,
        published=dict(n0=100, n=10000, alpha=0.001, skip=500, votes=10),
        # 6 samples x K = 10 = 60 rows: the UNet holds 2^25 elements per row (512 x 256 x 256 in its
        # first decoder concatenation), and no tensor may reach 2^31, so at most 63 rows per call.
        default_batch=6,
    ),
    # DensePure CIFAR-10 (paper Table 1): 87.6 / 76.6 / 64.6 % at radius 0.0 / 0.25 / 0.5.
    "cifar10": Preset(
        name="cifar10",
        unet_kwargs=dict(
            image_size=32,
            num_channels=128,
            num_res_blocks=3,
            num_heads=4,
            num_heads_upsample=-1,
            attention_resolutions="16,8",
            dropout=0.3,
            learn_sigma=True,
            class_cond=False,
            use_scale_shift_norm=True,
        ),
        schedule="cosine",
        num_timesteps=4000,
        rescale_timesteps=True,
        image_size=32,
        channels=3,
        num_classes=10,
        classifier="vit_base_patch16_224",
        diffusion_ckpt_hint=(
            "improved-diffusion's cifar10_uncond_50M_500K.pt (openai/improved-diffusion README, 'CIFAR-10 "
            "unconditional, L_hybrid, cosine'); pass it with --diffusion-ckpt"
        ),
        classifier_ckpt_hint=(
            "the Hugging Face folder aaraki/vit-base-patch16-224-in21k-finetuned-cifar10 (config.json + "
            "weights); pass the folder with --classifier-ckpt"
        ),
        unet_gflop=16.8,
        classifier_gflop=35.1,
        published=dict(n0=100, n=100000, alpha=0.001, skip=20, votes=10),
    ),
    # Trained by the project on scikit-learn's digits (export/digits.py); weights ship in the package.
    "digits": Preset(
        name="digits",
        unet_kwargs=dict(
            image_size=16,
            in_channels=1,
            num_channels=32,
            num_res_blocks=1,
            channel_mult="1,2",
            attention_resolutions="8",
            num_heads=1,
            num_head_channels=32,
            num_heads_upsample=-1,
            learn_sigma=True,
            class_cond=False,
            use_scale_shift_norm=True,
            resblock_updown=True,
            use_new_attention_order=False,
            dropout=0.0,
        ),
        schedule="linear",
        num_timesteps=1000,
        rescale_timesteps=True,
        image_size=16,
        channels=1,
        num_classes=10,
        classifier="digits-cnn",
        diffusion_ckpt_hint="shipped with densepure-rt (densepure_rt/assets/digits_unet.safetensors)",
        classifier_ckpt_hint="shipped with densepure-rt (densepure_rt/assets/digits_classifier.safetensors)",
        unet_gflop=0.0,
        classifier_gflop=0.0,
        shipped_unet="digits_unet.safetensors",
        shipped_classifier="digits_classifier.safetensors",
        default_data="digits-test",
        description="DensePure on scikit-learn's 8x8 digits upsampled to 16x16, trained by this project",
    ),
    # For tests and smoke runs only: a tiny random-weights model of the same architecture family.
    "tiny": Preset(
        name="tiny",
        unet_kwargs=dict(
            image_size=16,
            num_channels=32,
            num_res_blocks=1,
            channel_mult="1,2",
            attention_resolutions="8",
            num_head_channels=16,
            learn_sigma=True,
            resblock_updown=True,
            use_scale_shift_norm=True,
        ),
        schedule="linear",
        num_timesteps=1000,
        rescale_timesteps=True,
        image_size=16,
        channels=3,
        num_classes=10,
        classifier="small-cnn",
        diffusion_ckpt_hint="",  # no published weights: --random-weights only
        classifier_ckpt_hint="",
        unet_gflop=0.0,
        classifier_gflop=0.0,
        description="tiny random-weights model for tests and smoke runs (its certificates mean nothing)",
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a :class:`ConfigError` naming the choices otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} for --model: choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
