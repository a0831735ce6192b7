"""The model presets, as data (docs/design.md section 2), and the models ``build`` takes from the
user (``--classifier`` with its declared :class:`Preprocessing`; a preset declares its classifier's
the same way). The runtime itself reads only an engine's manifest.

Paper numbers beside each preset are from Xiao et al. (ICLR 2023), Table 1 / Table 2 (certified
accuracy at radius 0 / 0.5 / 1.0, sigma chosen per radius), for orientation only: densepure-rt
reproduces the algorithm, not those runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from densepure_rt.errors import ConfigError
from densepure_rt.executors.registry import backend_precisions

__all__ = [
    "Preset", "PRESETS", "get_preset", "BACKEND_PRECISIONS", "CLASSIFIER_FORMATS", "RESIZE_MODES", "Preprocessing",
    "ClassifierRequest", "classifier_request", "read_labels", "IMAGE_SPACE", "CUSTOM",
]

#: The precisions each backend runs (``build --backend/--precision``), from the backend registry
#: (:mod:`densepure_rt.executors.registry`): read without torch, so the CLI checks flags first.
BACKEND_PRECISIONS = backend_precisions()


@dataclass(frozen=True)
class Preprocessing:
    """How the purified image (in [0, 1], the engine's size) becomes the classifier's input, as
    declared on the command line; None leaves a choice to the model's own defaults (timm's
    pretrained config, torchvision's weights, an ONNX graph's fixed input size) or to the documented
    default (the engine's size, so no resize; bilinear without antialiasing; mean 0 and std 1, so
    the classifier takes [0, 1] pixels; RGB; logits)."""

    input_size: tuple[int, int] | None = None
    resize: str | None = None
    antialias: bool | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    channels: str | None = None
    outputs: str | None = None
    #: The uint8 PIL round trip of the Hugging Face ViT feature extractor (the cifar10 preset's; not a flag).
    pil_uint8: bool = False

    @staticmethod
    def parse_size(text: str | None) -> tuple[int, int] | None:
        """``"224"`` or ``"224x192"`` (height x width) -> (224, 224) / (224, 192); a one-line error otherwise."""
        if text is None:
            return None
        parts = str(text).lower().replace(" ", "").split("x")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) not in (1, 2) or any(not 1 <= v <= 4096 for v in values):
            raise ConfigError(f"--input-size takes H or HxW with sides in 1..4096 (got {text!r})")
        return (values[0], values[-1])

    @staticmethod
    def parse_numbers(text: str | None, flag: str, positive: bool = False) -> tuple[float, ...] | None:
        """``"0.485,0.456,0.406"`` -> a tuple of finite floats (one per channel); a one-line error otherwise."""
        if text is None:
            return None
        try:
            values = tuple(float(v) for v in str(text).split(","))
        except ValueError:
            values = ()
        if not values or not all(math.isfinite(v) for v in values) or (positive and any(v <= 0 for v in values)):
            raise ConfigError(f"{flag} takes one {'positive ' if positive else ''}number per channel, comma-separated (got {text!r})")
        return values


@dataclass(frozen=True)
class Preset:
    """What a preset builds, as data: the UNet kwargs of the original ``create_model``, the schedule,
    the classifier network (``classifier``: a key of :data:`densepure_rt.export.models.NETWORKS`)
    with its preprocessing (``classifier_preprocessing``, the same declaration ``build --classifier``
    takes), and the data."""

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
    #: How the purified image becomes the classifier's input (input_size None: the engine's size).
    classifier_preprocessing: Preprocessing = Preprocessing(mean=(0.5,), std=(0.5,))
    #: The UNet's output head (densepure_rt.export.step): guided-diffusion's learned sigma is "learned_range".
    variance_type: str = "learned_range"
    prediction_type: str = "epsilon"
    #: x0_hat clipped to [-1, 1] at every step (DensePure; a diffusers scheduler's clip_sample).
    clip_x0: bool = True
    #: ``build --unet``: the diffusion model's source (format, file or folder, sha256), for the manifest.
    unet_source: dict | None = None


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
        # F.interpolate(x0_hat, 512, bicubic) fed to BEiT directly: its mean = std = 0.5 make [-1, 1] its input.
        classifier_preprocessing=Preprocessing(input_size=(512, 512), resize="bicubic", antialias=False, mean=(0.5,) * 3,
                                               std=(0.5,) * 3, channels="rgb", outputs="logits"),
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
        # The Hugging Face ViT feature extractor: uint8 PIL bilinear to 224, then (v - 0.5) / 0.5.
        classifier_preprocessing=Preprocessing(input_size=(224, 224), resize="bilinear", antialias=False, mean=(0.5,) * 3,
                                               std=(0.5,) * 3, channels="rgb", outputs="logits", pil_uint8=True),
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
        # Trained on (x + 1) / 2 normalised by mean = std = 0.5: x0_hat in [-1, 1] as it is (export/digits.py).
        classifier_preprocessing=Preprocessing(mean=(0.5,), std=(0.5,), channels="rgb", outputs="logits"),
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
        classifier_preprocessing=Preprocessing(mean=(0.5,) * 3, std=(0.5,) * 3, channels="rgb", outputs="logits"),
    ),
}


#: The base of an engine built from ``build --unet`` and ``--classifier`` alone (no --model): every
#: model fact comes from the two models themselves.
CUSTOM = Preset(
    name="custom", unet_kwargs={}, schedule="linear", num_timesteps=1000, rescale_timesteps=False, image_size=0, channels=0,
    num_classes=0, classifier="", diffusion_ckpt_hint="", classifier_ckpt_hint="", unet_gflop=0.0, classifier_gflop=0.0,
    description="your diffusion model and classifier (build --unet --classifier)",
)


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a :class:`ConfigError` naming the choices otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} for --model: choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


# ------------------------------------------------------------------------------------------------ #
# classifiers brought by the user                                                                    #
# ------------------------------------------------------------------------------------------------ #

#: The classifier sources ``build --classifier`` takes, and how each is named.
CLASSIFIER_FORMATS = {
    "onnx": "an ONNX file (.onnx): one float input [N x C x H x W], one output [N x classes]",
    "torchscript": "a TorchScript file (.pt, .pth, .ts, .jit: torch.jit.save)",
    "torch-export": "a torch.export program (.pt2: torch.export.save)",
    "timm": "timm:NAME with --classifier-weights FILE (.safetensors, or a state dict read with weights_only=True)",
    "torchvision": "torchvision:NAME with --classifier-weights FILE (.safetensors, or a state dict read with weights_only=True)",
    "huggingface": "a Hugging Face image-classification folder (config.json, weights, preprocessor_config.json; needs transformers)",
}
_SUFFIXES = {".onnx": "onnx", ".pt2": "torch-export", ".pt": "torchscript", ".pth": "torchscript", ".ts": "torchscript",
             ".jit": "torchscript", ".torchscript": "torchscript"}
RESIZE_MODES = ("bilinear", "bicubic", "nearest")

#: Where a certificate's radius holds: the image the engine takes, in [0, 1] pixels, before any
#: classifier normalisation (recorded in every manifest as ``image_space``; the size is the engine's).
IMAGE_SPACE = {
    "range": [0.0, 1.0],
    "noise": "Gaussian noise of standard deviation sigma is added to the image in [0, 1] pixels at the engine's size, "
             "before the diffusion model and before any classifier resizing or normalisation; radii are L2 norms in "
             "those units",
    "data": "image files are resized (bicubic, shorter side) and centre-cropped to the engine's size; arrays (.npz, "
            "CIFAR-10 batches) must already have it and are never resized",
}


def _accepted() -> str:
    return "; ".join(f"{name}: {what}" for name, what in CLASSIFIER_FORMATS.items())


@dataclass(frozen=True)
class ClassifierRequest:
    """A classifier named on the command line (``build --classifier``), checked without torch:
    its format (one of :data:`CLASSIFIER_FORMATS`), the file or model name, the weights file
    (timm and torchvision), the declared preprocessing and the label names."""

    format: str
    path: str | None
    name: str | None
    weights: str | None
    preprocessing: Preprocessing
    labels: tuple[str, ...] | None = None

    @property
    def display(self) -> str:
        """How the manifest and the logs name it: ``onnx my.onnx``, ``timm resnet18``."""
        return f"{self.format} {self.name or Path(self.path or '').name}"


def read_labels(path: str | Path) -> tuple[str, ...]:
    """Label names, one per line (blank lines and surrounding spaces ignored), from a UTF-8 text file."""
    path = Path(path).expanduser()
    try:
        if path.stat().st_size > 16 << 20:
            raise ConfigError(f"--labels {path} is larger than 16 MiB: give one class name per line")
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--labels {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"--labels {path} is a folder: give a text file with one class name per line") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--labels {path} is not UTF-8 text: give one class name per line") from None
    except OSError as exc:
        raise ConfigError(f"--labels {path} cannot be read ({exc.strerror})") from None
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not names:
        raise ConfigError(f"--labels {path} names no classes: give one class name per line")
    if len(set(names)) != len(names):
        raise ConfigError(f"--labels {path} names a class twice: give each class name once, one per line")
    return names


def classifier_request(spec: str, weights: str | None = None, preprocessing: Preprocessing = Preprocessing(),
                       labels: str | None = None) -> ClassifierRequest:
    """``build --classifier SPEC`` as a :class:`ClassifierRequest`: ``timm:NAME`` or
    ``torchvision:NAME`` (with ``weights``), a Hugging Face folder (``config.json`` inside), or a
    file whose suffix names its format. Refuses, in one
    line, an unknown format (listing the accepted ones), a missing file, and weights where the format
    carries its own."""
    if preprocessing.resize is not None and preprocessing.resize not in RESIZE_MODES:
        raise ConfigError(f"--resize must be one of {', '.join(RESIZE_MODES)} (got {preprocessing.resize!r})")
    if preprocessing.antialias and preprocessing.resize == "nearest":
        raise ConfigError("--antialias goes with --resize bilinear or bicubic, not nearest")
    names = read_labels(labels) if labels is not None else None
    for prefix in ("timm", "torchvision"):
        if spec.startswith(prefix + ":"):
            name = spec[len(prefix) + 1:]
            if not name:
                raise ConfigError(f"--classifier {spec}: name the {prefix} model after '{prefix}:'")
            if weights is None:
                raise ConfigError(f"--classifier {spec} needs --classifier-weights FILE (nothing is downloaded)")
            if not Path(weights).expanduser().is_file():
                raise ConfigError(f"--classifier-weights {weights} does not exist or is not a file")
            return ClassifierRequest(prefix, None, name, str(Path(weights).expanduser()), preprocessing, names)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        if weights is not None:
            raise ConfigError("--classifier-weights goes with timm:NAME or torchvision:NAME: a Hugging Face folder holds its weights")
        return ClassifierRequest("huggingface", str(path), None, None, preprocessing, names)
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"--classifier {spec}: not a format build reads; accepted: {_accepted()}")
    if not path.exists():
        raise ConfigError(f"--classifier {spec} does not exist")
    if not path.is_file():
        raise ConfigError(f"--classifier {spec} is not a file; accepted: {_accepted()}")
    if weights is not None:
        raise ConfigError(f"--classifier-weights goes with timm:NAME or torchvision:NAME: a {fmt} file carries its own weights")
    return ClassifierRequest(fmt, str(path), None, None, preprocessing, names)
