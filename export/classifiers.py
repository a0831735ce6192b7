"""Classifiers that read a purified image: the preset's own resize and normalisation, the network, argmax.

The classifier graph takes the purified image ``x0_hat`` in [-1, 1] exactly as the reverse run returns
it, so the runtime never does image maths on the host (docs/design.md section 1.6). What each preset does, matched
to the official DensePure code (``eval_certified_densepure.py`` at commit 1ed105d, class
``DensePure_Certify``, the class used by ``--certify_mode purify``):

- ``imagenet``: ``F.interpolate(x0_hat, size=(512, 512), mode='bicubic')`` (lines 93-95; PyTorch's
  defaults: align_corners=False, antialias=False, cubic a = -0.75, no clamping), then the timm
  ``beit_large_patch16_512`` network on that tensor directly (lines 135-138). BEiT's own mean and std
  are 0.5, so [-1, 1] already is its normalised input: the wrapper sees that the affine map is the
  identity and adds no arithmetic.
- ``cifar10``: ``(x0_hat + 1) * 0.5`` to a float NumPy array, then the Hugging Face ``ViTFeatureExtractor``
  of ``aaraki/vit-base-patch16-224-in21k-finetuned-cifar10`` (lines 104-124). In the transformers of
  that time (before the 4.26 image processors) that extractor turns a float array into a PIL image by
  ``(x * 255).astype(uint8)`` (truncation), resizes it with PIL ``BILINEAR`` to 224 x 224, and reads it
  back as ``uint8 / 255`` before ``(v - 0.5) / 0.5``. The wrapper reproduces that uint8 round trip
  exactly (``pil_uint8=True``): floor(255 v), a horizontal then a vertical bilinear pass (half-pixel
  centres, edge-clamped, which is what PIL's triangle filter does when enlarging) each rounded to an
  integer as PIL rounds its 8-bit intermediate and output images, then / 255 and the normalisation.
  For 32 -> 224 no pass ever lands on a rounding tie (every weight is a multiple of 1/7), so this is
  bit-exact against Pillow (pinned by the tests).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from densepure_rt.errors import CheckpointError, ConfigError
from densepure_rt.export.checkpoints import load_state_dict, load_strict

__all__ = [
    "CHANNEL_ORDERS",
    "CLASSIFIER_CKPT_FLAG",
    "SCORES",
    "PRESETS",
    "ClassifierPreset",
    "PurifiedClassifier",
    "build_classifier",
    "with_preprocessing",
    "classifier_config",
    "count_parameters",
    "convert_hf_vit_state_dict",
    "load_hf_vit_folder",
    "timm_vit_from_hf_config",
]

CLASSIFIER_CKPT_FLAG = "--classifier-ckpt"
_RANDOM_FLAG = "--random-weights"


@dataclass(frozen=True)
class ClassifierPreset:
    """The classifier of one preset, as data. ``params`` is the published parameter count."""

    name: str
    arch: str  # timm architecture name
    weights: str  # where the published weights come from (the user supplies the file)
    num_classes: int
    image_size: int  # side of the purified image the graph takes
    input_size: int  # side of the network input
    mode: str  # F.interpolate mode of the resize
    mean: tuple[float, float, float]  # per channel, applied to the image in [0, 1]
    std: tuple[float, float, float]
    pil_uint8: bool  # reproduce the uint8 PIL round trip of the Hugging Face feature extractor
    params: int


PRESETS: dict[str, ClassifierPreset] = {
    # BEiT-L/16-512, ImageNet-22k pre-trained, 22k -> 1k fine-tuned: 305.7M parameters.
    "imagenet": ClassifierPreset(
        name="imagenet",
        arch="beit_large_patch16_512",
        weights=(
            "timm weights beit_large_patch16_512.in22k_ft_in22k_in1k (model.safetensors of "
            "https://huggingface.co/timm/beit_large_patch16_512.in22k_ft_in22k_in1k, or the BEiT release "
            "file beit_large_patch16_512_pt22k_ft22kto1k.pth)"
        ),
        num_classes=1000,
        image_size=256,
        input_size=512,
        mode="bicubic",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        pil_uint8=False,
        params=305_674_728,
    ),
    # ViT-B/16 at 224, ImageNet-21k pre-trained, fine-tuned on CIFAR-10: 85.8M parameters.
    "cifar10": ClassifierPreset(
        name="cifar10",
        arch="vit_base_patch16_224",
        weights=(
            "the Hugging Face checkpoint folder aaraki/vit-base-patch16-224-in21k-finetuned-cifar10 "
            "(config.json + model.safetensors or pytorch_model.bin)"
        ),
        num_classes=10,
        image_size=32,
        input_size=224,
        mode="bilinear",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        pil_uint8=True,
        params=85_806_346,
    ),
}

# The published CIFAR-10 ViT's transformers config (google/vit-base-patch16-224-in21k + a 10-class head).
_CIFAR10_HF_CONFIG: dict = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "num_labels": 10,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "qkv_bias": True,
}

# transformers' ViTConfig defaults, for config.json files that leave a field out.
_HF_VIT_DEFAULTS: dict = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "qkv_bias": True,
}

_RESIZE_MODES = ("nearest", "bilinear", "bicubic")
#: The channel orders a classifier may take: the engine's images are RGB (or one grey channel).
CHANNEL_ORDERS = ("rgb", "bgr")
#: What a classifier's outputs are: unnormalised scores or probabilities (the argmax is the label either way).
SCORES = ("logits", "probabilities")


def _pair(size) -> tuple[int, int]:
    """``size`` (a side, or (height, width)) as (height, width)."""
    if isinstance(size, int):
        return (int(size), int(size))
    h, w = size
    return (int(h), int(w))


class PurifiedClassifier(nn.Module):
    """Purified image -> logits or labels, with the preset's resize and normalisation inside.

    ``net`` maps ``[batch x 3 x size x size]`` float32 to ``[batch x num_classes]`` logits. The input
    ``x`` is ``[batch x 3 x image_size x image_size]`` float32 in ``input_range``. ``mean`` and ``std``
    apply to the image scaled to [0, 1]; when they map ``input_range`` onto itself unchanged (mean =
    std = 0.5 for [-1, 1]) ``x`` is fed as it is. ``size`` is the network's input side or (height,
    width); ``size=None`` skips the resize; ``antialias`` low-pass filters a bilinear or bicubic
    shrink (PyTorch's ``antialias=True``). ``channel_order="bgr"`` reverses the channels after the
    resize, before ``mean`` and ``std`` (given in the network's order). ``pil_uint8`` reproduces the
    uint8 PIL round trip of the Hugging Face feature extractor (see the module docstring; bilinear
    only). ``scores`` says what the network returns (``"logits"`` or ``"probabilities"``: recorded,
    the label is their argmax either way). ``output`` picks what ``forward`` returns: ``"logits"``
    (the network's float32 scores) or ``"labels"`` (int64 argmax, ties to the lowest class).

    Every shape is fixed at construction and ``forward`` has no data-dependent Python branches, so
    the module exports to ONNX as Resize / Floor / Round / elementwise ops around the network.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        *,
        image_size: int,
        size: int | None,
        mode: str = "bicubic",
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
        input_range: tuple[float, float] = (-1.0, 1.0),
        pil_uint8: bool = False,
        output: str = "logits",
        antialias: bool = False,
        channel_order: str = "rgb",
        scores: str = "logits",
    ) -> None:
        super().__init__()
        if mode not in _RESIZE_MODES:
            raise ConfigError(f"resize mode must be one of {', '.join(_RESIZE_MODES)}, got {mode!r}")
        if antialias and mode == "nearest":
            raise ConfigError("antialiasing goes with bilinear or bicubic resizing, not nearest")
        if channel_order not in CHANNEL_ORDERS:
            raise ConfigError(f"channel order must be one of {', '.join(CHANNEL_ORDERS)}, got {channel_order!r}")
        if scores not in SCORES:
            raise ConfigError(f"the classifier's outputs must be one of {', '.join(SCORES)}, got {scores!r}")
        if output not in ("logits", "labels"):
            raise ConfigError(f"classifier output must be 'logits' or 'labels', got {output!r}")
        if pil_uint8 and (mode != "bilinear" or size is None):
            raise ConfigError("pil_uint8 reproduces PIL's bilinear enlargement: it needs mode='bilinear' and a size")
        lo, hi = (float(v) for v in input_range)
        if not hi > lo:
            raise ConfigError(f"input_range must be (low, high) with low < high, got {input_range}")
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ConfigError(f"mean and std need one value per channel and std > 0, got {mean}, {std}")
        self.net = net
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.size = None if size is None else _pair(size)
        self.mode = mode
        self.antialias = bool(antialias)
        self.channel_order = channel_order
        self.scores = scores
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.channels = len(self.mean)  # one mean and std per image channel
        self.input_range = (lo, hi)
        self.pil_uint8 = bool(pil_uint8)
        self.output = output
        self._inv_span = 1.0 / (hi - lo)
        # Net input = x * a + b per channel; a = 1, b = 0 means x is the normalised input already.
        a = [self._inv_span / s for s in self.std]
        b = [(-lo * self._inv_span - m) / s for m, s in zip(self.mean, self.std)]
        self._identity = (
            not self.pil_uint8 and channel_order == "rgb" and all(v == 1.0 for v in a) and all(v == 0.0 for v in b)
        )
        shape = (1, len(self.mean), 1, 1)
        self.register_buffer("_mean", torch.tensor(self.mean).reshape(shape), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).reshape(shape), persistent=False)
        if self.antialias and self.size is not None:  # computed here: inside the export trace they would be traced too
            self.register_buffer("_aa_rows", self._weights(self.image_size, self.size[0]), persistent=False)
            self.register_buffer("_aa_cols", self._weights(self.image_size, self.size[1]), persistent=False)

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        align = None if self.mode == "nearest" else False
        if self.antialias and torch.onnx.is_in_onnx_export():
            # ONNX export has no antialiased Resize before opset 18 and PyTorch's exporter none at all.
            # The antialiased resize is separable and linear: rows' weights A_h [out_h x in_h] and
            # columns' A_w [out_w x in_w] (PyTorch's own, read off by resizing the identity), so
            # out = A_h x A_w^T, two MatMuls. The PyTorch parent keeps F.interpolate, and the build's
            # validation compares the two.
            return torch.matmul(torch.matmul(self._aa_rows, x), self._aa_cols.transpose(0, 1))
        return F.interpolate(x, size=size, mode=self.mode, align_corners=align, antialias=self.antialias)

    def _weights(self, n_in: int, n_out: int) -> torch.Tensor:
        """[n_out x n_in]: PyTorch's 1-D antialiased interpolation weights (``self.mode``)."""
        eye = torch.eye(n_in, dtype=torch.float64).reshape(1, 1, n_in, n_in)  # row i: the i-th unit vector
        cols = F.interpolate(eye, size=(n_in, n_out), mode=self.mode, align_corners=False, antialias=True)
        return cols[0, 0].transpose(0, 1).float()

    def _to_unit(self, x: torch.Tensor) -> torch.Tensor:
        # (x - low) * (1 / span): for [-1, 1] this is (x + 1) * 0.5, bit for bit the official expression.
        return (x - self.input_range[0]) * self._inv_span

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch x 3 x image_size x image_size]`` float32 -> network input ``[batch x 3 x size x size]``."""
        if self._identity:
            return x if self.size is None else self._resize(x, self.size)
        x = self._to_unit(x)
        if self.pil_uint8:
            # ndarray.astype(uint8) truncates; x0_hat is clipped, the clamp only guards the graph.
            x = torch.floor(torch.clamp(x * 255, 0.0, 255.0))
            # PIL enlarges width first and rounds its 8-bit intermediate image, then height, then rounds.
            x = torch.round(self._resize(x, (x.shape[-2], self.size[1])))
            x = torch.round(self._resize(x, self.size))
            x = x / 255.0
        elif self.size is not None:
            x = self._resize(x, self.size)
        if self.channel_order == "bgr":
            x = torch.flip(x, dims=(1,))  # mean and std are in the network's (BGR) channel order
        return (x - self._mean) / self._std

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch x 3 x image_size x image_size]`` float32 -> ``[batch x num_classes]`` float32 logits."""
        return self.net(self.preprocess(x))

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch x 3 x image_size x image_size]`` float32 -> ``[batch]`` int64 labels (ties to the lowest)."""
        return torch.argmax(self.logits(x), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.labels(x) if self.output == "labels" else self.logits(x)

    def describe(self) -> dict:
        """JSON-able description of the preprocessing and output, for manifests."""
        size = self.size if self.size is not None else (self.image_size, self.image_size)
        return {
            "num_classes": self.num_classes,
            "input": {
                "shape": [self.channels, self.image_size, self.image_size],
                "range": list(self.input_range),
                "dtype": "float32",
            },
            "resize": None
            if self.size is None
            else {"size": list(size), "mode": self.mode, "align_corners": False, "antialias": self.antialias},
            "pil_uint8": self.pil_uint8,
            "channel_order": self.channel_order,
            "mean": list(self.mean),
            "std": list(self.std),
            "scores": self.scores,
            "output": self.output,
        }

    @classmethod
    def for_preset(cls, preset: str, net: nn.Module, output: str = "logits") -> "PurifiedClassifier":
        """Wrap ``net`` with the resize and normalisation of ``preset`` (any network, e.g. a test stand-in)."""
        p = _preset(preset)
        return cls(
            net,
            p.num_classes,
            image_size=p.image_size,
            size=p.input_size,
            mode=p.mode,
            mean=p.mean,
            std=p.std,
            pil_uint8=p.pil_uint8,
            output=output,
        )


def _preset(preset: str) -> ClassifierPreset:
    if preset not in PRESETS:
        raise ConfigError(f"unknown classifier preset {preset!r}; known: {', '.join(PRESETS)}")
    return PRESETS[preset]


def classifier_config(preset: str) -> dict:
    """JSON-able description of ``preset``'s classifier (network, weights, classes, input, resize, mean/std)."""
    p = _preset(preset)
    return {
        "preset": p.name,
        "network": f"timm {p.arch}",
        "weights": p.weights,
        "num_classes": p.num_classes,
        "params": p.params,
        "input": {"shape": [3, p.image_size, p.image_size], "range": [-1.0, 1.0], "dtype": "float32"},
        "resize": {"size": [p.input_size, p.input_size], "mode": p.mode, "align_corners": False, "antialias": False},
        "pil_uint8": p.pil_uint8,
        "mean": list(p.mean),
        "std": list(p.std),
    }


# --------------------------------------------------------------------------------------------------
# Hugging Face ViTForImageClassification -> timm VisionTransformer


def _hf_num_labels(config: Mapping) -> int:
    # config.json stores id2label; num_labels is derived from it by transformers.
    if "id2label" in config:
        return len(config["id2label"])
    return int(config.get("num_labels", 2))


def _hf_vit_config(config: Mapping) -> dict:
    cfg = {**_HF_VIT_DEFAULTS, **{k: config[k] for k in _HF_VIT_DEFAULTS if k in config}}
    cfg["num_labels"] = _hf_num_labels(config)
    return cfg


def timm_vit_from_hf_config(config: Mapping) -> nn.Module:
    """A timm ViT (timm's random initialisation) with the architecture of a transformers ``ViTConfig`` dict.

    Matches transformers' numerics: LayerNorm eps from ``layer_norm_eps`` (transformers 1e-12, timm
    1e-6), the GELU variant of ``hidden_act``, class-token pooling after the final norm. Built with
    ``timm.create_model('vit_base_patch16_224', pretrained=False, ...)`` and the config's sizes.
    """
    import timm

    cfg = _hf_vit_config(config)
    act = str(cfg["hidden_act"])
    if act == "gelu":
        act_layer = nn.GELU
    elif act in ("gelu_new", "gelu_pytorch_tanh"):
        act_layer = partial(nn.GELU, approximate="tanh")
    else:
        raise CheckpointError(f"ViT config hidden_act={act!r} is not supported (gelu, gelu_new, gelu_pytorch_tanh)")
    hidden, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    mlp_ratio = inter / hidden
    if int(hidden * mlp_ratio) != inter:
        raise CheckpointError(f"ViT config intermediate_size={inter} is not expressible for hidden_size={hidden}")
    return timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        num_classes=int(cfg["num_labels"]),
        img_size=int(cfg["image_size"]),
        patch_size=int(cfg["patch_size"]),
        in_chans=int(cfg["num_channels"]),
        embed_dim=hidden,
        depth=int(cfg["num_hidden_layers"]),
        num_heads=int(cfg["num_attention_heads"]),
        mlp_ratio=mlp_ratio,
        qkv_bias=bool(cfg["qkv_bias"]),
        norm_layer=partial(nn.LayerNorm, eps=float(cfg["layer_norm_eps"])),
        act_layer=act_layer,
    )


# Per-layer names: (timm suffix, legacy transformers suffix as on the Hub, transformers >= 5 suffix).
_HF_LAYER_KEYS = (
    ("norm1", "layernorm_before", "layernorm_before"),
    ("attn.proj", "attention.output.dense", "attention.o_proj"),
    ("norm2", "layernorm_after", "layernorm_after"),
    ("mlp.fc1", "intermediate.dense", "mlp.fc1"),
    ("mlp.fc2", "output.dense", "mlp.fc2"),
)
_HF_QKV_KEYS = (
    ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
    ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
)
_HF_TOP_KEYS = (
    ("cls_token", "vit.embeddings.cls_token"),
    ("pos_embed", "vit.embeddings.position_embeddings"),
    ("patch_embed.proj.weight", "vit.embeddings.patch_embeddings.projection.weight"),
    ("patch_embed.proj.bias", "vit.embeddings.patch_embeddings.projection.bias"),
    ("norm.weight", "vit.layernorm.weight"),
    ("norm.bias", "vit.layernorm.bias"),
    ("head.weight", "classifier.weight"),
    ("head.bias", "classifier.bias"),
)


def convert_hf_vit_state_dict(hf_state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """Rename a transformers ``ViTForImageClassification`` state dict to timm ``VisionTransformer`` keys.

    Accepts the Hub's names (``vit.encoder.layer.N.attention.attention.query...``) and the names of
    transformers >= 5 (``vit.layers.N.attention.q_proj...``). Query, key and value are concatenated
    into ``blocks.N.attn.qkv``; the unused pooler (``vit.pooler.*``) is dropped. Raises
    :class:`CheckpointError` naming missing or unexpected keys.
    """
    cfg = _hf_vit_config(config)
    legacy = "vit.encoder.layer.0.attention.attention.query.weight" in hf_state
    prefix = "vit.encoder.layer.{}." if legacy else "vit.layers.{}."
    col = 1 if legacy else 2
    qkv_names = _HF_QKV_KEYS[0 if legacy else 1]
    with_bias = bool(cfg["qkv_bias"])

    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []

    def take(name: str) -> torch.Tensor | None:
        if name not in hf_state:
            missing.append(name)
            return None
        used.add(name)
        return hf_state[name]

    for timm_key, hf_key in _HF_TOP_KEYS:
        v = take(hf_key)
        if v is not None:
            out[timm_key] = v
    for i in range(int(cfg["num_hidden_layers"])):
        pre = prefix.format(i)
        for names in _HF_LAYER_KEYS:
            for kind in ("weight", "bias"):
                v = take(f"{pre}{names[col]}.{kind}")
                if v is not None:
                    out[f"blocks.{i}.{names[0]}.{kind}"] = v
        for kind in ("weight", "bias") if with_bias else ("weight",):
            parts = [take(f"{pre}{n}.{kind}") for n in qkv_names]
            if all(p is not None for p in parts):
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    unexpected = sorted(k for k in hf_state if k not in used and not k.startswith("vit.pooler."))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError("not a ViTForImageClassification state dict for this config: " + "; ".join(parts))
    return out


_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{what}: cannot read {path} as JSON ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what}: {path} is not a JSON object")
    return obj


def _read_hf_weights(folder: Path, what: str) -> dict[str, torch.Tensor]:
    for name in _HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return load_state_dict(folder / name, what)
    for name in _HF_INDEX_FILES:
        if (folder / name).is_file():
            index = _read_json(folder / name, what)
            shards = sorted(set(index.get("weight_map", {}).values()))
            if not shards:
                raise CheckpointError(f"{what}: {folder / name} lists no weight files")
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_state_dict(folder / shard, what))
            return state
    raise CheckpointError(f"{what}: {folder} holds none of {', '.join(_HF_WEIGHT_FILES + _HF_INDEX_FILES)}")


def load_hf_vit_folder(folder: str | Path, what: str = "ViT checkpoint") -> tuple[nn.Module, dict]:
    """A transformers ``ViTForImageClassification`` folder -> (timm ViT with its weights, config dict).

    Reads ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin`` (or their sharded
    ``.index.json`` forms) without executing pickled code. The model is returned in eval mode.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{what}: {folder} has no config.json (expected a Hugging Face checkpoint folder)")
    config = _read_json(folder / "config.json", what)
    if config.get("model_type", "vit") != "vit":
        raise CheckpointError(f"{what}: {folder}/config.json is for model_type {config['model_type']!r}, not 'vit'")
    state = convert_hf_vit_state_dict(_read_hf_weights(folder, what), config)
    net = timm_vit_from_hf_config(config)
    load_strict(net, state, what)
    return net.eval(), _hf_vit_config(config)


# --------------------------------------------------------------------------------------------------
# Builders


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # Random weights are reproducible without touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _where_to_get(p: ClassifierPreset) -> str:
    return (
        f"pass {CLASSIFIER_CKPT_FLAG} PATH to {p.weights}; nothing is downloaded at run time "
        f"({_RANDOM_FLAG} builds the architecture with random weights)"
    )


def _read_timm_checkpoint(path: Path, what: str) -> dict[str, torch.Tensor]:
    if path.is_dir():
        return _read_hf_weights(path, what)
    return load_state_dict(path, what)


def _build_imagenet(p: ClassifierPreset, path: Path | None) -> nn.Module:
    import timm

    if path is None:
        return timm.create_model(p.arch, pretrained=False, num_classes=p.num_classes)
    what = f"{p.name} classifier checkpoint {path}"
    # Read the file before building the network: a bad file fails in milliseconds, not after BEiT-L's init.
    state = _read_timm_checkpoint(path, what)
    # relative_position_index is a non-persistent buffer in timm >= 0.9, saved by older releases.
    state = {k: v for k, v in state.items() if not k.endswith("relative_position_index")}
    net = timm.create_model(p.arch, pretrained=False, num_classes=p.num_classes)
    load_strict(net, state, what)
    return net


def _build_cifar10(p: ClassifierPreset, path: Path | None) -> nn.Module:
    if path is None:
        return timm_vit_from_hf_config(_CIFAR10_HF_CONFIG)
    what = f"{p.name} classifier checkpoint {path}"
    folder = path if path.is_dir() else path.parent
    config = _read_json(folder / "config.json", what) if (folder / "config.json").is_file() else None
    if path.is_dir():
        if config is None:
            raise CheckpointError(f"{what} has no config.json (expected a Hugging Face checkpoint folder)")
        state = _read_hf_weights(path, what)
    else:
        # A single weights file: transformers keys (with the config.json beside it, else the
        # published config) or timm keys of the published architecture.
        state = load_state_dict(path, what)
        if config is None or not any(k.startswith("vit.") for k in state):
            config = dict(_CIFAR10_HF_CONFIG)
    cfg = _hf_vit_config(config)
    if cfg["num_labels"] != p.num_classes or cfg["image_size"] != p.input_size:
        raise CheckpointError(
            f"{what} is a {cfg['num_labels']}-class ViT at {cfg['image_size']} px; "
            f"the {p.name} preset needs {p.num_classes} classes at {p.input_size} px"
        )
    if any(k.startswith("vit.") for k in state):
        state = convert_hf_vit_state_dict(state, cfg)
    net = timm_vit_from_hf_config(cfg)
    load_strict(net, state, what)
    return net


#: How each published classifier's network is read, by its timm architecture.
_BUILDERS = {"beit_large_patch16_512": _build_imagenet, "vit_base_patch16_224": _build_cifar10}


def with_preprocessing(net: nn.Module, num_classes: int, image_size: int, channels: int, pre, cls=None, output: str = "logits"):
    """``net`` behind the declared preprocessing ``pre`` (a :class:`densepure_rt.presets.Preprocessing`
    whose choices are all made, or None for the defaults: no resize when ``input_size`` is None or
    the engine's size, bilinear, no antialiasing, RGB, logits), for ``[batch x channels x
    image_size x image_size]`` purified images in [-1, 1]: a :class:`PurifiedClassifier` (or ``cls``)."""
    size = None if pre.input_size is None or tuple(pre.input_size) == (image_size, image_size) else tuple(pre.input_size)
    mean = tuple(pre.mean) if pre.mean is not None else (0.0,)
    std = tuple(pre.std) if pre.std is not None else (1.0,)
    if len(mean) == 1:
        mean = mean * channels
    if len(std) == 1:
        std = std * channels
    return (cls or PurifiedClassifier)(
        net, num_classes, image_size=image_size, size=size, mode=pre.resize or ("bilinear" if size else "bicubic"),
        mean=mean, std=std, antialias=bool(pre.antialias), channel_order=pre.channels or "rgb",
        scores=pre.outputs or "logits", pil_uint8=pre.pil_uint8, output=output,
    )


def build_classifier(
    preset: str,
    checkpoint: str | Path | None = None,
    random_weights: bool = False,
    meta: bool = False,
    *,
    seed: int = 0,
    output: str = "logits",
) -> PurifiedClassifier:
    """The classifier of ``preset`` wrapped with its preprocessing, in eval mode.

    ``imagenet``: timm ``beit_large_patch16_512`` (1000 classes); ``checkpoint`` is a timm weights file
    (``.safetensors``, ``.pth``, ``.bin``) or a folder holding ``model.safetensors``.
    ``cifar10``: a timm ViT-B/16 at 224 (10 classes); ``checkpoint`` is the Hugging Face folder of
    ``aaraki/vit-base-patch16-224-in21k-finetuned-cifar10`` (its keys are converted) or a single file.
    ``random_weights`` builds the full-size network with timm's initialisation under ``seed``;
    ``meta`` builds it on the meta device, with no weights (parameter counting, shapes). The result
    maps ``[batch x 3 x H x W]`` float32 in [-1, 1] to ``[batch x num_classes]`` logits, or
    ``[batch]`` int64 labels with ``output="labels"``.

    Raises :class:`ConfigError` for an unknown preset or contradictory arguments, and
    :class:`CheckpointError` for a missing or unusable checkpoint.
    """
    p = _preset(preset)
    if checkpoint is not None and (random_weights or meta):
        raise ConfigError(f"{CLASSIFIER_CKPT_FLAG} and {_RANDOM_FLAG} (or meta) exclude each other")
    path = None if checkpoint is None else Path(checkpoint)
    if path is None and not (random_weights or meta):
        raise CheckpointError(f"{p.name} classifier checkpoint not given: {_where_to_get(p)}")
    if path is not None and not path.exists():
        raise CheckpointError(f"{p.name} classifier checkpoint {path} not found: {_where_to_get(p)}")
    build = _BUILDERS[p.arch]
    if meta:
        with torch.device("meta"):
            net = build(p, None)
    else:
        with _seeded(seed) if path is None else nullcontext():
            net = build(p, path)
    net.eval()
    model = PurifiedClassifier.for_preset(p.name, net, output=output)
    return model.eval()


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(math.prod(t.shape) for t in module.parameters())
