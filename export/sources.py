"""Classifiers brought by the user, resolved by one registry of sources (``build --classifier``).

Each source loads the user's network as a callable PyTorch module on images at its own input size,
with the preprocessing defaults its format carries (timm's pretrained config, torchvision's weights
transforms, a Hugging Face image processor, an ONNX graph's fixed input size). :func:`load_classifier_source` wraps it in a
:class:`UserClassifier`: the engine's classifier graph, i.e. the purified image (in [-1, 1], the
engine's size) brought to [0, 1], resized with the declared interpolation and antialiasing,
reordered to the network's channel order, normalised, then the network. ONNX, TorchScript and
torch.export networks are not traced together with the preprocessing: the preprocessing is exported
on its own and composed with the network's ONNX graph (the ONNX file itself, or the network exported
alone; :func:`densepure_rt.export.onnx_export.compose_classifier`). The build validates the result
against the original model either way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from densepure_rt.errors import CheckpointError, ConfigError
from densepure_rt.presets import CLASSIFIER_FORMATS, ClassifierRequest, Preprocessing

from .checkpoints import load_state_dict, load_strict
from .classifiers import PurifiedClassifier, with_preprocessing

__all__ = ["UserClassifier", "SOURCES", "load_classifier_source", "OnnxNet", "sha256_bytes"]


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


@dataclass
class _Loaded:
    """What a source gives: the network, its preprocessing defaults, and facts for the manifest."""

    net: nn.Module
    defaults: dict = field(default_factory=dict)  # input_size, resize, antialias, mean, std, channels
    channels: int | None = None  # the channels the network takes, where the format says
    onnx: bytes | None = None  # the network's ONNX graph, for formats composed rather than traced
    parameters: int = 0
    source: dict = field(default_factory=dict)
    countable: bool = True  # PyTorch's FLOP counter sees its arithmetic
    labels: tuple[str, ...] | None = None  # class names the format carries (a Hugging Face config's id2label)


class OnnxNet(nn.Module):
    """An ONNX classifier run by ONNX Runtime's CPU provider, as a module: ``[N x C x H x W]``
    float32 -> its first output as float32. The independent reference the composed graph is
    validated against (it never exports: the composed graph is written from the ONNX file)."""

    def __init__(self, model: bytes, input_name: str, output_name: str):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.input_name, self.output_name = input_name, output_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (out,) = self.session.run([self.output_name], {self.input_name: x.detach().float().cpu().numpy()})
        return torch.from_numpy(np.asarray(out, dtype=np.float32))


def _dims(value) -> list:
    return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]


def _onnx_source(request: ClassifierRequest) -> _Loaded:
    import onnx

    path = Path(request.path)
    data = path.read_bytes()
    try:
        model = onnx.load_from_string(data)
        if not model.graph.node:
            raise ValueError("no nodes")
    except Exception:  # noqa: BLE001 - protobuf raises several types for bytes that are not a model
        raise ConfigError(f"--classifier {path} is not an ONNX model (it does not parse as one)") from None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise ConfigError(f"--classifier {path} keeps its weights in external data files: save it as one .onnx file")
    initializers = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    if len(inputs) != 1 or len(_dims(inputs[0])) != 4 or inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        shown = ", ".join(f"{v.name} {_dims(v)}" for v in inputs)
        raise ConfigError(f"--classifier {path} must take one float32 input [N x C x H x W]; it takes {shown or 'nothing'}")
    batch, channels, height, width = _dims(inputs[0])
    if batch not in (None, 0):
        raise ConfigError(
            f"--classifier {path} has its batch axis fixed at {batch}: export it with a dynamic batch axis "
            "(torch.onnx.export(..., dynamic_axes={'input': {0: 'batch'}, 'output': {0: 'batch'}}))"
        )
    try:
        net = OnnxNet(data, inputs[0].name, model.graph.output[0].name)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own errors
        raise ConfigError(f"ONNX Runtime cannot run --classifier {path} ({_first_line(exc)})") from None
    defaults = {"input_size": (height, width)} if height and width else {}
    params = sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer)
    return _Loaded(net, defaults, channels or None, data, params, {"format": "onnx", "file": str(path.resolve()),
                                                                      "sha256": sha256_bytes(data)}, countable=False)


def _torchscript_source(request: ClassifierRequest) -> _Loaded:
    import warnings

    path = Path(request.path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
            net = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - torch.jit.load raises RuntimeError, ValueError, pickle errors...
        raise ConfigError(
            f"--classifier {path} is not a TorchScript model ({_first_line(exc)}); a state dict goes with "
            "--classifier timm:NAME or torchvision:NAME and --classifier-weights"
        ) from None
    params = sum(p.numel() for p in net.parameters())
    return _Loaded(net.eval(), {}, None, None, params, {"format": "torchscript", "file": str(path.resolve()),
                                                          "sha256": _sha256_file(path)})


def _export_program_source(request: ClassifierRequest) -> _Loaded:
    import logging
    import zipfile

    path = Path(request.path)
    if not zipfile.is_zipfile(path):  # torch.export.save writes a zip archive
        raise ConfigError(f"--classifier {path} is not a torch.export program (not the zip archive torch.export.save writes)")
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.ERROR)  # torch.export.load logs a traceback before it raises
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"--classifier {path} is not a torch.export program ({_first_line(exc)})") from None
    finally:
        logger.setLevel(level)
    net = program.module()
    # An unlifted export program refuses train()/eval(); it is an inference graph already.
    net.train = lambda mode=True: net
    params = sum(p.numel() for p in net.parameters())
    return _Loaded(net, {}, None, None, params, {"format": "torch-export", "file": str(path.resolve()), "sha256": _sha256_file(path)})


def _sha256_file(path: Path) -> str:
    from densepure_rt.files.manifest import sha256_file

    return sha256_file(path)


def _head_classes(state: dict) -> int | None:
    """Outputs of the last 2-D weight of a state dict (the classification head of timm's and
    torchvision's classifiers, which come last)."""
    last = None
    for key, value in state.items():
        if key.endswith("weight") and getattr(value, "dim", lambda: 0)() == 2:
            last = int(value.shape[0])
    return last


def _timm_source(request: ClassifierRequest) -> _Loaded:
    import timm

    if not timm.is_model(request.name.split(".")[0]):
        raise ConfigError(f"--classifier timm:{request.name}: timm has no model of that name (timm.list_models() lists them)")
    weights = Path(request.weights)
    what = f"--classifier-weights {weights}"
    state = load_state_dict(weights, what)
    try:
        net = timm.create_model(request.name, pretrained=False)
        head = net.pretrained_cfg.get("classifier")
        classes = int(state[f"{head}.weight"].shape[0]) if isinstance(head, str) and f"{head}.weight" in state else None
        if classes is not None and classes != net.num_classes:
            net = timm.create_model(request.name, pretrained=False, num_classes=classes)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"--classifier timm:{request.name} cannot be built ({_first_line(exc)})") from None
    load_strict(net, state, what)
    cfg = dict(net.pretrained_cfg)
    size = cfg.get("input_size") or (3, 224, 224)
    defaults = {"input_size": (int(size[1]), int(size[2])), "mean": tuple(cfg.get("mean", ())) or None,
                "std": tuple(cfg.get("std", ())) or None}
    if cfg.get("interpolation") in ("bilinear", "bicubic", "nearest"):
        defaults["resize"] = cfg["interpolation"]
    params = sum(p.numel() for p in net.parameters())
    return _Loaded(net.eval(), defaults, int(size[0]), None, params,
                   {"format": "timm", "name": request.name, "weights": str(weights.resolve()), "sha256": _sha256_file(weights)})


def _torchvision_source(request: ClassifierRequest) -> _Loaded:
    try:
        import torchvision
    except ImportError:
        raise ConfigError("--classifier torchvision:NAME needs torchvision: pip install torchvision") from None
    weights = Path(request.weights)
    what = f"--classifier-weights {weights}"
    state = load_state_dict(weights, what)
    if request.name not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(f"--classifier torchvision:{request.name}: torchvision has no classification model of that name "
                          "(torchvision.models.list_models() lists them)")
    classes = _head_classes(state)
    try:
        net = torchvision.models.get_model(request.name, weights=None, **({"num_classes": classes} if classes else {}))
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"--classifier torchvision:{request.name} cannot be built ({_first_line(exc)})") from None
    load_strict(net, state, what)
    defaults: dict = {}
    try:  # the published weights' transforms carry the preprocessing (crop size, mean, std, interpolation)
        transform = next(iter(torchvision.models.get_model_weights(request.name))).transforms()
        size = transform.crop_size
        defaults = {"input_size": (int(size[0]), int(size[-1])), "mean": tuple(transform.mean), "std": tuple(transform.std),
                    "resize": str(transform.interpolation.value), "antialias": bool(transform.antialias)}
    except Exception:  # noqa: BLE001 - a model without published weights: the generic defaults apply
        defaults = {}
    params = sum(p.numel() for p in net.parameters())
    return _Loaded(net.eval(), defaults, 3, None, params,
                   {"format": "torchvision", "name": request.name, "weights": str(weights.resolve()), "sha256": _sha256_file(weights)})


class _HFLogits(nn.Module):
    """A transformers image-classification model as a network: pixel_values -> logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


#: PIL's resampling codes in a Hugging Face preprocessor_config.json.
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _hf_defaults(folder: Path) -> dict:
    """The preprocessing a Hugging Face image processor declares (preprocessor_config.json): the
    input size (the crop size where it centre-crops), the interpolation, mean and std. Its PIL resize
    filters when it shrinks, so antialiasing is on."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return {}
    import json

    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise ConfigError(f"--classifier {path} is not readable JSON") from None
    size = cfg.get("crop_size") if cfg.get("do_center_crop") else cfg.get("size")
    if isinstance(size, dict):
        size = (size.get("height"), size.get("width")) if "height" in size else (size.get("shortest_edge"),) * 2
    elif isinstance(size, int):
        size = (size, size)
    defaults: dict = {"antialias": True}
    if size and all(isinstance(v, int) and v > 0 for v in size):
        defaults["input_size"] = tuple(size)
    if cfg.get("resample") in _PIL_RESAMPLE:
        defaults["resize"] = _PIL_RESAMPLE[cfg["resample"]]
    if cfg.get("do_normalize", True) and cfg.get("image_mean") is not None and cfg.get("image_std") is not None:
        defaults["mean"], defaults["std"] = tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    return defaults


def _huggingface_source(request: ClassifierRequest) -> _Loaded:
    folder = Path(request.path)
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"--classifier {folder} (a Hugging Face folder) needs transformers: pip install transformers") from None
    weights = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"))
    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers' own errors
        raise ConfigError(f"--classifier {folder} is not a Hugging Face image-classification folder ({_first_line(exc)})") from None
    labels = [str(model.config.id2label[i]) for i in range(len(model.config.id2label))] if model.config.id2label else []
    generic = all(name == f"LABEL_{i}" for i, name in enumerate(labels))
    digest = hashlib.sha256()
    for file in weights:
        digest.update(f"{file.name}\0{_sha256_file(file)}\n".encode())
    params = sum(p.numel() for p in model.parameters())
    loaded = _Loaded(_HFLogits(model.eval()), _hf_defaults(folder), int(getattr(model.config, "num_channels", 3)), None, params,
                     {"format": "huggingface", "folder": str(folder.resolve()), "sha256": digest.hexdigest()})
    loaded.labels = None if generic or not labels else tuple(labels)
    return loaded


#: One loader per format of :data:`densepure_rt.presets.CLASSIFIER_FORMATS`.
SOURCES: dict[str, Callable[[ClassifierRequest], _Loaded]] = {
    "onnx": _onnx_source,
    "torchscript": _torchscript_source,
    "torch-export": _export_program_source,
    "timm": _timm_source,
    "torchvision": _torchvision_source,
    "huggingface": _huggingface_source,
}
assert set(SOURCES) == set(CLASSIFIER_FORMATS)


class UserClassifier(PurifiedClassifier):
    """A user's classifier behind the engine's preprocessing (a :class:`PurifiedClassifier`), with
    what the build records: ``source`` (format, file or name, sha256), ``label_names`` (or None),
    ``parameter_count``; ``net_onnx``: the network's own ONNX graph (ONNX, TorchScript, torch.export),
    composed with the exported preprocessing instead of traced with it."""

    net_onnx: bytes | None = None
    source: dict = {}
    label_names: tuple[str, ...] | None = None
    parameter_count: int = 0
    countable: bool = True


def _per_channel(values, channels: int, flag: str):
    if values is None:
        return None
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ConfigError(f"{flag} gives {len(values)} values but the images have {channels} channel{'s' * (channels != 1)}")
    return values


def load_classifier_source(request: ClassifierRequest, channels: int, image_size: int) -> UserClassifier:
    """The engine's classifier graph module for ``request``, for images of ``channels`` channels at
    ``image_size`` (the engine's): checked to take those images and to give one score per class
    (as many as ``request.labels`` names, when given). Raises :class:`ConfigError` or
    :class:`CheckpointError` with one line."""
    loaded = SOURCES[request.format](request)
    what = f"--classifier {request.display.split(' ', 1)[1]}"
    if loaded.channels is not None and loaded.channels != channels:
        raise ConfigError(f"{what} takes {loaded.channels}-channel images but the diffusion model's images have {channels}")
    given, model = request.preprocessing, loaded.defaults

    def pick(name, generic):
        value = getattr(given, name)
        if value is not None:
            return value
        value = model.get(name)
        return generic if value is None else value

    size = tuple(pick("input_size", (image_size, image_size)))
    fixed = model.get("input_size") if request.format == "onnx" else None
    if fixed is not None and size != tuple(fixed):
        raise ConfigError(f"{what} takes {fixed[0]}x{fixed[1]} inputs (fixed in the file), not --input-size {size[0]}x{size[1]}")
    resize = pick("resize", "bilinear")
    antialias = bool(pick("antialias", False)) and resize != "nearest"
    mean = _per_channel(pick("mean", (0.0,)), channels, "--mean")
    std = _per_channel(pick("std", (1.0,)), channels, "--std")
    order = pick("channels", "rgb")
    if order == "bgr" and channels != 3:
        raise ConfigError(f"--channels bgr needs 3-channel images; the diffusion model's have {channels}")
    resolved = Preprocessing(input_size=size, resize=resize, antialias=antialias, mean=mean, std=std, channels=order,
                             outputs=pick("outputs", "logits"))
    module = with_preprocessing(loaded.net, 0, image_size, channels, resolved, cls=UserClassifier)
    module.net_onnx = loaded.onnx
    module.source = loaded.source
    module.label_names = request.labels if request.labels is not None else loaded.labels
    module.parameter_count = int(loaded.parameters)
    module.countable = loaded.countable
    probe = torch.zeros(2, channels, image_size, image_size)
    try:
        with torch.no_grad():
            out = module.logits(probe)
    except Exception as exc:  # noqa: BLE001 - whatever the user's network raises
        raise ConfigError(
            f"{what} fails on the engine's images ({channels} channel{'s' * (channels != 1)}, resized to {size[0]}x{size[1]}: "
            f"{_first_line(exc)}); check --input-size, the channel count and a dynamic batch axis"
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{what} must return one score per class, [N x classes]; it returns {shape} for N = 2")
    classes = int(out.shape[1])
    if request.labels is not None and len(request.labels) != classes:
        raise ConfigError(f"{what} gives {classes} scores per image but --labels names {len(request.labels)} classes")
    if module.label_names is not None and len(module.label_names) != classes:
        module.label_names = None  # a config's id2label that does not fit its own head names nothing
    module.num_classes = classes
    if request.format in ("torchscript", "torch-export"):
        module.net_onnx = _network_onnx(loaded.net, (2, channels, *size), request.format)
    return module.eval()


def _network_onnx(net: nn.Module, shape: tuple, fmt: str) -> bytes:
    """A TorchScript network or a torch.export program's module as an ONNX graph of its own, with a
    dynamic batch axis: exported as it is, since tracing it inside the preprocessing module fails
    (a scripted module cannot be traced as a submodule; an export program's shapes go symbolic)."""
    import io
    import warnings

    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(net, (torch.zeros(shape),), buffer, input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=17, dynamo=False)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"the {fmt} classifier cannot be exported to ONNX ({_first_line(exc)})") from None
    return buffer.getvalue()
