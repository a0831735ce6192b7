"""Diffusion models brought by the user (``build --unet``): a diffusers ``UNet2DModel`` folder with
its DDPM scheduler config, or a guided-diffusion / improved-diffusion checkpoint with its model
flags in a small JSON file.

Each gives the network as a module ``(x [N x C x H x W], t [N]) -> output`` plus what the engine
needs to know about it, as a :class:`DiffusionModel`: image size and channels, the noise schedule
the runtime's reverse schedules are computed from (``linear`` or ``cosine``, T, whether timesteps
are rescaled to 1000), the variance head and the prediction type (:mod:`densepure_rt.export.step`),
and the source (file sha256s) for the manifest. Weights are read without executing pickled code
(safetensors, or ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from densepure_rt.errors import CheckpointError, ConfigError

from .checkpoints import load_state_dict, load_strict
from .step import PREDICTION_TYPES, VARIANCE_TYPES

__all__ = ["DiffusionModel", "DiffusersUNet", "load_diffusion_model", "with_diffusion_model", "GUIDED_CONFIG_KEYS"]

#: The keys of a guided-diffusion flags file (``--unet-config``): ``create_model`` holds the
#: keyword arguments of guided-diffusion's ``create_model`` (image_size, num_channels,
#: num_res_blocks, learn_sigma, attention_resolutions, ...), the others the noise schedule.
GUIDED_CONFIG_KEYS = ("create_model", "noise_schedule", "diffusion_steps", "rescale_timesteps")


@dataclass
class DiffusionModel:
    """A loaded diffusion model and its conventions."""

    unet: nn.Module
    image_size: int
    channels: int
    schedule: str  # "linear" or "cosine" (densepure_rt.schedule)
    num_timesteps: int
    rescale_timesteps: bool
    variance_type: str
    prediction_type: str
    clip_x0: bool
    source: dict = field(default_factory=dict)
    create_model_kwargs: dict = field(default_factory=dict)  # guided-diffusion flags (FLOP count on the meta device)


class DiffusersUNet(nn.Module):
    """A diffusers ``UNet2DModel`` as the step's network: (x, t [N] float) -> its ``sample`` output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x, t).sample


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{what} {path} cannot be read as JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} is not a JSON object")
    return data


def _digest(files: list[Path]) -> str:
    from densepure_rt.files.manifest import sha256_file

    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def _close(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=0.0)


def _scheduler_facts(config: dict, where: Path) -> tuple[int, str, str, bool]:
    """(T, variance_type, prediction_type, clip) of a DDPMScheduler config, refusing in one line what
    the runtime's schedules cannot represent."""
    name = config.get("_class_name", "DDPMScheduler")
    if name not in ("DDPMScheduler", "DDIMScheduler"):
        raise ConfigError(f"scheduler config {where} is a {name}; build reads DDPM-style schedulers (DDPMScheduler)")
    steps = int(config.get("num_train_timesteps", 1000))
    scale = 1000 / steps
    kind = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None or kind != "linear" or not (
        _close(config.get("beta_start", 0.0001), scale * 0.0001) and _close(config.get("beta_end", 0.02), scale * 0.02)
    ):
        raise ConfigError(
            f"scheduler config {where}: beta_schedule {kind!r}, beta_start {config.get('beta_start', 0.0001)}, beta_end "
            f"{config.get('beta_end', 0.02)} over {steps} steps; the runtime's schedules are the linear one (beta "
            f"{scale * 0.0001:g} .. {scale * 0.02:g} over {steps} steps) and improved-diffusion's cosine (--unet-config)"
        )
    for flag in ("rescale_betas_zero_snr", "thresholding"):
        if config.get(flag):
            raise ConfigError(f"scheduler config {where} sets {flag}, which the reverse step does not do")
    variance = config.get("variance_type", "fixed_small")
    if variance not in VARIANCE_TYPES:
        raise ConfigError(f"scheduler config {where}: variance_type {variance!r}; the reverse step has {', '.join(VARIANCE_TYPES)}")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ConfigError(f"scheduler config {where}: prediction_type {prediction!r}; the reverse step has {', '.join(PREDICTION_TYPES)}")
    clip = bool(config.get("clip_sample", True))
    if clip and not _close(config.get("clip_sample_range", 1.0), 1.0):
        raise ConfigError(f"scheduler config {where}: clip_sample_range {config.get('clip_sample_range')}; the reverse step clips to [-1, 1]")
    return steps, variance, prediction, clip


def _diffusers_model(folder: Path, scheduler_config: Path | None) -> DiffusionModel:
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise ConfigError("--unet FOLDER (a diffusers UNet2DModel) needs diffusers: pip install diffusers") from None
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    config = _read_json(unet_dir / "config.json", "--unet config")
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ConfigError(f"--unet {unet_dir}/config.json is a {config.get('_class_name')}; build reads diffusers UNet2DModel folders")
    if scheduler_config is None:
        for candidate in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"):
            if candidate.is_file():
                scheduler_config = candidate
                break
        else:
            raise ConfigError(f"--unet {folder} has no scheduler/scheduler_config.json: give it with --unet-config FILE")
    steps, variance, prediction, clip = _scheduler_facts(_read_json(Path(scheduler_config), "scheduler config"), Path(scheduler_config))
    weights = [unet_dir / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin") if (unet_dir / n).is_file()]
    if not weights:
        raise CheckpointError(f"--unet {unet_dir} holds no diffusion_pytorch_model.safetensors (or .bin)")
    state = load_state_dict(weights[0], f"--unet weights {weights[0]}")
    try:
        model = UNet2DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    except Exception as exc:  # noqa: BLE001 - diffusers' own errors for a config it cannot build
        raise ConfigError(f"--unet {unet_dir}/config.json does not build a UNet2DModel ({type(exc).__name__}: {str(exc)[:200]})") from None
    load_strict(model, state, f"--unet weights {weights[0]}")
    channels, out_channels = int(model.config.in_channels), int(model.config.out_channels)
    want = 2 * channels if variance in ("learned", "learned_range") else channels
    if out_channels != want:
        raise ConfigError(
            f"--unet {unet_dir}: the UNet gives {out_channels} channels for {channels}-channel images, but variance_type "
            f"{variance!r} needs {want}"
        )
    size = model.config.sample_size
    size = size if isinstance(size, int) else int(size[0]) if size[0] == size[-1] else None
    if size is None:
        raise ConfigError(f"--unet {unet_dir}: sample_size {model.config.sample_size} is not square; the engine's images are square")
    files = [unet_dir / "config.json", weights[0], Path(scheduler_config)]
    source = {"format": "diffusers", "folder": str(folder.resolve()), "sha256": _digest(files),
              "config": {k: v for k, v in config.items() if not k.startswith("_") and isinstance(v, (int, float, str, bool, list, type(None)))}}
    return DiffusionModel(DiffusersUNet(model.eval()), size, channels, "linear", steps, False, variance, prediction, clip, source)


def _guided_model(checkpoint: Path, config_file: Path) -> DiffusionModel:
    from .unet import create_model

    config = _read_json(config_file, "--unet-config")
    unknown = sorted(set(config) - set(GUIDED_CONFIG_KEYS))
    if unknown or not isinstance(config.get("create_model"), dict):
        raise ConfigError(f"--unet-config {config_file}: a guided-diffusion flags file holds {', '.join(GUIDED_CONFIG_KEYS)} "
                          f"(create_model an object){'; unknown: ' + ', '.join(unknown) if unknown else ''}")
    kwargs = dict(config["create_model"])
    schedule = config.get("noise_schedule", "linear")
    if schedule not in ("linear", "cosine"):
        raise ConfigError(f"--unet-config {config_file}: noise_schedule {schedule!r}; guided-diffusion's are linear and cosine")
    steps = int(config.get("diffusion_steps", 1000))
    try:
        model = create_model(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"--unet-config {config_file}: create_model does not take these flags ({exc})") from None
    load_strict(model, load_state_dict(checkpoint, f"--unet {checkpoint}"), f"--unet {checkpoint}")
    channels = int(kwargs.get("in_channels", 3))
    source = {"format": "guided-diffusion", "file": str(checkpoint.resolve()), "sha256": _digest([checkpoint, config_file])}
    return DiffusionModel(model.eval(), int(kwargs["image_size"]), channels, schedule, steps, bool(config.get("rescale_timesteps", True)),
                          "learned_range" if kwargs.get("learn_sigma") else "fixed_small", "epsilon", True, source, kwargs)


def load_diffusion_model(path: str | Path, config: str | Path | None = None) -> DiffusionModel:
    """``build --unet PATH [--unet-config FILE]``: a diffusers ``UNet2DModel`` folder (its scheduler
    config inside, or ``config``), or a guided-diffusion / improved-diffusion checkpoint file with
    its flags file ``config`` (:data:`GUIDED_CONFIG_KEYS`). The UNet is checked to run at its image
    size. Raises :class:`ConfigError` / :class:`CheckpointError` with one line."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"--unet {path} does not exist")
    if path.is_dir():
        model = _diffusers_model(path, None if config is None else Path(config).expanduser())
    else:
        if config is None:
            raise ConfigError(f"--unet {path} is a checkpoint file: give its guided-diffusion flags with --unet-config FILE "
                              "(a diffusers model is a folder)")
        model = _guided_model(path, Path(config).expanduser())
    c, s = model.channels, model.image_size
    try:
        with torch.no_grad():
            out = model.unet(torch.zeros(1, c, s, s), torch.zeros(1))
    except Exception as exc:  # noqa: BLE001 - whatever the network raises
        raise ConfigError(f"--unet {path} cannot take its {c}x{s}x{s} images ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    want = 2 * c if model.variance_type in ("learned", "learned_range") else c
    if tuple(out.shape) != (1, want, s, s):
        raise ConfigError(f"--unet {path} returns {list(out.shape)} for [1, {c}, {s}, {s}] images; the reverse step needs [1, {want}, {s}, {s}]")
    return model


def with_diffusion_model(base, model: DiffusionModel):
    """The preset ``base`` (a :class:`densepure_rt.presets.Preset`, e.g. ``CUSTOM``) with ``model``'s
    facts in place of its diffusion model's: image size and channels, schedule, output head, source.
    ``base``'s default data stays only where its images have the model's shape."""
    import dataclasses

    same_images = (base.image_size, base.channels) == (model.image_size, model.channels)
    return dataclasses.replace(
        base, unet_kwargs=dict(model.create_model_kwargs), schedule=model.schedule, num_timesteps=model.num_timesteps,
        rescale_timesteps=model.rescale_timesteps, image_size=model.image_size, channels=model.channels,
        variance_type=model.variance_type, prediction_type=model.prediction_type, clip_x0=model.clip_x0,
        unet_source=model.source, shipped_unet="", default_data=base.default_data if same_images else "",
    )
