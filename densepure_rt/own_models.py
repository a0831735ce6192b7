"""What ``build`` is given besides a preset: your diffusion model (``--unet``) and classifier
(``--classifier`` with its declared preprocessing), as click options and requests checked without
torch; and ``info``'s description of them (docs/models.md, "Your own classifier" / "Your own
diffusion model")."""

from __future__ import annotations

import os
from pathlib import Path

import click

from densepure_rt.errors import ConfigError

__all__ = ["own_model_options", "base_preset", "classifier_request_from_flags", "model_lines", "weights_sha256"]


def own_model_options(f):
    """``build``'s --unet, --unet-config, --classifier and preprocessing options."""
    for option in reversed(_OPTIONS):
        f = option(f)
    return f


_OPTIONS = [
    click.option("--unet", "unet_path", type=click.Path(), metavar="PATH",
                 help="Your diffusion model in place of the preset's: a diffusers UNet2DModel folder (its scheduler config "
                      "inside; DDPM linear betas; variance_type fixed_small, fixed_large, learned or learned_range; prediction_type "
                      "epsilon, sample or v_prediction), or a guided-diffusion / improved-diffusion checkpoint with --unet-config."),
    click.option("--unet-config", type=click.Path(), metavar="FILE",
                 help="With --unet: a guided-diffusion flags file (JSON: create_model, noise_schedule, diffusion_steps, "
                      "rescale_timesteps), or a diffusers scheduler_config.json kept outside the folder."),
    click.option("--classifier", "classifier_spec", metavar="PATH|timm:NAME|torchvision:NAME",
                 help="Your classifier in place of the preset's: an ONNX file (.onnx), a TorchScript file (.pt, .pth, .ts, "
                      ".jit), a torch.export program (.pt2), a Hugging Face image-classification folder, or timm:NAME / "
                      "torchvision:NAME with --classifier-weights. "
                      "It gets the purified image in [0, 1] at the engine's size, resized, reordered and normalised as "
                      "declared below; the build checks it against the original model."),
    click.option("--classifier-weights", type=click.Path(), metavar="FILE",
                 help="Weights of a timm:NAME or torchvision:NAME classifier (.safetensors, or a state dict read with weights_only=True)."),
    click.option("--input-size", metavar="H[xW]",
                 help="The classifier's input size  [default: the model's (timm, torchvision, a fixed ONNX input), else the engine's image size]"),
    click.option("--resize", type=click.Choice(["bilinear", "bicubic", "nearest"]), default=None,
                 help="Interpolation to the input size  [default: the model's, else bilinear]"),
    click.option("--antialias/--no-antialias", default=None,
                 help="Low-pass filter when shrinking (bilinear, bicubic)  [default: the model's, else off]"),
    click.option("--mean", metavar="A[,B,C]", help="Per-channel mean subtracted from the [0, 1] image  [default: the model's, else 0]"),
    click.option("--std", metavar="A[,B,C]", help="Per-channel std the image is divided by  [default: the model's, else 1]"),
    click.option("--channels", "channel_order", type=click.Choice(["rgb", "bgr"]), default=None,
                 help="Channel order the classifier takes; --mean/--std are in that order  [default: rgb]"),
    click.option("--outputs", type=click.Choice(["logits", "probabilities"]), default=None,
                 help="What the classifier returns (recorded; the label is the argmax either way)  [default: logits]"),
    click.option("--labels", "labels_file", type=click.Path(), metavar="FILE",
                 help="Class names, one per line: their number must equal the classifier's outputs."),
]


_PREPROCESSING_FLAGS = ("--input-size", "--resize", "--antialias", "--mean", "--std", "--channels", "--outputs", "--labels",
                        "--classifier-weights")


def classifier_request_from_flags(spec, weights, classifier_ckpt, input_size, resize, antialias, mean, std, channel_order, outputs, labels):
    """``build --classifier`` and its preprocessing flags as a ClassifierRequest (None without
    --classifier), checked without torch."""
    from densepure_rt.presets import Preprocessing, classifier_request

    given = (input_size, resize, antialias, mean, std, channel_order, outputs, labels, weights)
    if spec is None:
        used = [flag for flag, value in zip(_PREPROCESSING_FLAGS, given) if value is not None]
        if used:
            raise ConfigError(f"{used[0]} goes with --classifier (a preset's classifier has its own preprocessing)")
        return None
    if classifier_ckpt is not None:
        raise ConfigError("--classifier and --classifier-ckpt exclude each other: --classifier-ckpt is the preset's classifier")
    preprocessing = Preprocessing(
        input_size=Preprocessing.parse_size(input_size), resize=resize, antialias=antialias,
        mean=Preprocessing.parse_numbers(mean, "--mean"), std=Preprocessing.parse_numbers(std, "--std", positive=True),
        channels=channel_order, outputs=outputs,
    )
    return classifier_request(spec, weights, preprocessing, labels)


def base_preset(preset, unet_path, unet_config, diffusion_ckpt, random_weights, classifier_spec):
    """The preset a build starts from: --model's, or (--unet and --classifier alone) the custom base."""
    from densepure_rt.presets import CUSTOM, get_preset

    if unet_path is None:
        if unet_config is not None:
            raise ConfigError("--unet-config goes with --unet")
        if preset is None:
            raise ConfigError("give --model PRESET (docs/models.md), or --unet PATH with --classifier")
        return get_preset(preset)
    for flag, value in (("--diffusion-ckpt", diffusion_ckpt), ("--random-weights", random_weights or None)):
        if value is not None:
            raise ConfigError(f"--unet and {flag} exclude each other: --unet is the diffusion model")
    if not Path(unet_path).expanduser().exists():
        raise ConfigError(f"--unet {unet_path} does not exist")
    if unet_config is not None and not Path(unet_config).expanduser().is_file():
        raise ConfigError(f"--unet-config {unet_config} does not exist or is not a file")
    if preset is None:
        if classifier_spec is None:
            raise ConfigError("--unet without --model needs --classifier (or --model PRESET for its classifier)")
        return CUSTOM
    return get_preset(preset)


def model_lines(manifest) -> list[str]:
    """``info``'s lines on the diffusion model's and the classifier's sources, the classifier's
    preprocessing, the label names and the image space the radius holds in (read defensively:
    descriptive fields of the manifest)."""
    lines = []
    unet = manifest.unet_source
    if isinstance(unet, dict):
        lines.append(f"diffusion   {unet.get('format')} {unet.get('folder') or unet.get('file')} (sha256 {str(unet.get('sha256'))[:16]}...), "
                     f"variance {manifest.variance_type}, prediction {manifest.prediction_type}")
    source = manifest.classifier_source
    if isinstance(source, dict):
        where = source.get("file") or f"{source.get('name')} with weights {source.get('weights')}"
        lines.append(f"source      {source.get('format')} {where} (sha256 {str(source.get('sha256'))[:16]}...)")
    pre = manifest.preprocessing
    if isinstance(pre, dict) and pre:
        resize = pre.get("resize")
        how = ("no resize" if not isinstance(resize, dict) else
               f"resize to {'x'.join(map(str, resize.get('size', [])))} {resize.get('mode')}"
               f"{', antialiased' if resize.get('antialias') else ''}")
        lines.append(f"preprocess  purified image in [0, 1] -> {how}{' (uint8 PIL round trip)' if pre.get('pil_uint8') else ''}, "
                     f"{str(pre.get('channel_order', 'rgb')).upper() if manifest.image_shape[0] == 3 else 'one channel'}, "
                     f"(v - {pre.get('mean')}) / {pre.get('std')}; "
                     f"the classifier returns {pre.get('scores', 'logits')}")
    if manifest.labels:
        shown = ", ".join(manifest.labels[:10]) + (f", ... ({len(manifest.labels)} in all)" if len(manifest.labels) > 10 else "")
        lines.append(f"labels      {shown}")
    space = manifest.image_space
    if isinstance(space, dict):
        lines.append(f"radius      L2 in [0, 1] pixels of the {'x'.join(map(str, space.get('size', [])))} image the engine takes, "
                     "noise added before any classifier resizing or normalisation; image files are resized (bicubic) and "
                     "centre-cropped to that size first, so a certificate is about that image, not the original file")
    return lines


def weights_sha256(path: str | None, shipped: str, random_weights: bool) -> str | None:
    """sha256 of a checkpoint (a file, or every file of a Hugging Face folder), of the shipped
    weights, or None for random weights (their seed identifies them)."""
    import hashlib

    from densepure_rt.files.manifest import sha256_file

    if random_weights:
        return None
    if path is None:
        if not shipped:
            return None
        path = str(Path(__file__).resolve().parent / "assets" / shipped)
    target = Path(path)
    if target.is_file():
        return sha256_file(target)
    digest = hashlib.sha256()
    for file in sorted(p for p in target.rglob("*") if p.is_file()):
        name = os.fsencode(file.relative_to(target).as_posix())  # bytes as on disk, also where not UTF-8
        digest.update(name + f"\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()
