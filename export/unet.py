"""The ADM UNet of guided-diffusion and improved-diffusion, in one export-friendly implementation.

``create_model(**kwargs)`` takes the keyword arguments of either code base's ``create_model`` and
returns a module whose ``state_dict()`` keys equal the original's and whose ``forward(x, t)``
reproduces it. improved-diffusion's UNet is guided-diffusion's with ``num_head_channels=-1``,
``resblock_updown=False`` and the legacy attention head order, so one class serves both.

Export-friendly: no gradient-checkpoint wrappers, attention as two batched matmuls around a softmax
with the original q/k scaling (1/sqrt(sqrt(ch)) on each), static shapes only. ``set_attention(model,
"sdpa")`` opts into fused attention (``scaled_dot_product_attention``) for the PyTorch fast path.

fp16 mode (``use_fp16=True`` or :meth:`UNetModel.convert_to_fp16`) matches the original
``convert_to_fp16``: the convolutions of the input, middle and output blocks hold fp16 weights and
run on fp16 activations; GroupNorm statistics and the attention softmax are computed in float32;
the timestep embedding MLP, the embedding projections of the residual blocks and the output head
stay float32.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "UNetModel",
    "create_model",
    "timestep_embedding",
    "default_channel_mult",
    "unet_config",
    "set_attention",
    "ATTENTION_IMPLS",
]

NUM_CLASSES = 1000

#: Attention implementations of :class:`AttentionBlock` (see :func:`set_attention`).
ATTENTION_IMPLS = ("matmul", "sdpa")


# --------------------------------------------------------------------------------------------- #
# Building blocks                                                                                 #
# --------------------------------------------------------------------------------------------- #


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) whose statistics are always computed in float32 (returns the input dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding [N x dim] (float32) of N (possibly fractional) timesteps: [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to the children that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest 2x upsampling, optionally followed by a 3x3 convolution (key ``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling: a strided 3x3 convolution or 2x2 average pooling (key ``op``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            assert self.channels == self.out_channels
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block with timestep conditioning, optional scale-shift norm and up/down sampling."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, False)
            self.x_upd: nn.Module = Upsample(channels, False)
        elif down:
            self.h_upd = Downsample(channels, False)
            self.x_upd = Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1),
        )
        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention with ``num_heads`` heads (or heads of ``num_head_channels`` channels).

    ``legacy_order`` reads the fused qkv as [heads x (q, k, v) x ch] (improved-diffusion and
    guided-diffusion's default ``QKVAttentionLegacy``); otherwise as [(q, k, v) x heads x ch].

    ``attention_impl`` (a class default, set per block by :func:`set_attention`): ``"matmul"`` is the
    original's two batched matmuls around a float32 softmax (the exported graph); ``"sdpa"`` hands the
    same q, k, v to ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels on the GPU).
    Both compute softmax(q^T k / sqrt(ch)) v: the original scales q and k each by ch^-1/4.
    """

    attention_impl: str = "matmul"

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, legacy_order: bool = True):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            assert channels % num_head_channels == 0, (channels, num_head_channels)
            self.num_heads = channels // num_head_channels
        self.legacy_order = legacy_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        length = height * width
        x = x.reshape(b, c, length)
        qkv = self.qkv(self.norm(x))
        heads, ch = self.num_heads, c // self.num_heads
        if self.attention_impl == "sdpa":
            return (x + self._sdpa(qkv, heads, ch)).reshape(b, c, height, width)
        if self.legacy_order:
            q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
        else:
            q, k, v = (part.reshape(b * heads, ch, length) for part in qkv.chunk(3, dim=1))
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.bmm((q * scale).transpose(1, 2), k * scale)  # [b*heads x t x s]
        weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
        a = torch.bmm(v, weight.transpose(1, 2))  # [b*heads x ch x t]
        h = self.proj_out(a.reshape(b, c, length))
        return (x + h).reshape(b, c, height, width)

    def _sdpa(self, qkv: torch.Tensor, heads: int, ch: int) -> torch.Tensor:
        """qkv [b x 3*heads*ch x T] -> proj_out(attention) [b x heads*ch x T] through fused attention."""
        b, _, length = qkv.shape
        # Same channel reading as the matmul path: legacy [b, heads, (q,k,v), ch, T], new [b, (q,k,v), heads, ch, T].
        # One copy to [..., T, ch]: the fused kernels need the last dimension contiguous (else SDPA
        # falls back to its unfused math path).
        if self.legacy_order:
            q, k, v = qkv.reshape(b, heads, 3, ch, length).transpose(-1, -2).contiguous().unbind(2)
        else:
            q, k, v = qkv.reshape(b, 3, heads, ch, length).transpose(-1, -2).contiguous().unbind(1)
        # [b x heads x T x ch] each. SDPA's default scale 1/sqrt(ch) equals the original ch^-1/4 on q and on k.
        a = F.scaled_dot_product_attention(q, k, v)  # [b x heads x T x ch]
        return self.proj_out(a.transpose(-1, -2).reshape(b, heads * ch, length))


# --------------------------------------------------------------------------------------------- #
# The UNet                                                                                        #
# --------------------------------------------------------------------------------------------- #


class UNetModel(nn.Module):
    """The ADM UNet (key-for-key the original's). ``forward(x [N x C x H x W], t [N]) -> [N x out x H x W]``."""

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        num_classes: int | None = None,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        attention_resolutions = tuple(attention_resolutions)
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.use_fp16 = False

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        def attention(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, heads, num_head_channels, legacy_order=not use_new_attention_order)

        def resblock(ch: int, out: int, **kw) -> ResBlock:
            return ResBlock(ch, time_embed_dim, dropout, out, use_scale_shift_norm=use_scale_shift_norm, **kw)

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        input_block_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = resblock(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(resblock(ch, ch), attention(ch, num_heads), resblock(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                skip_ch = input_block_chans.pop()
                layers = [resblock(ch + skip_ch, int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(resblock(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(input_ch, out_channels, 3, padding=1))
        if use_fp16:
            self.convert_to_fp16()

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the activations inside the blocks (float16 in fp16 mode)."""
        return torch.float16 if self.use_fp16 else torch.float32

    def _block_convs(self):
        for blocks in (self.input_blocks, self.middle_block, self.output_blocks):
            for module in blocks.modules():
                if isinstance(module, (nn.Conv1d, nn.Conv2d)):
                    yield module

    def convert_to_fp16(self) -> "UNetModel":
        """The original ``convert_to_fp16``: block convolutions to fp16, everything else stays fp32."""
        for conv in self._block_convs():
            conv.half()
        self.use_fp16 = True
        return self

    def convert_to_fp32(self) -> "UNetModel":
        """Undo :meth:`convert_to_fp16`."""
        for conv in self._block_convs():
            conv.float()
        self.use_fp16 = False
        return self

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x [N x C x H x W] float32, timesteps [N] (float or int) -> [N x out_channels x H x W] float32."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            assert y is not None, "class-conditional model needs labels y"
            emb = emb + self.label_emb(y)
        h = x.to(self.dtype)
        skips = []
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.to(x.dtype))


# --------------------------------------------------------------------------------------------- #
# create_model: the original keyword arguments                                                    #
# --------------------------------------------------------------------------------------------- #


def default_channel_mult(image_size: int) -> tuple[float, ...]:
    """channel_mult defaults of guided-diffusion (512/256/128/64) and improved-diffusion (32)."""
    table = {
        512: (0.5, 1, 1, 2, 2, 4, 4),
        256: (1, 1, 2, 2, 4, 4),
        128: (1, 1, 2, 3, 4),
        64: (1, 2, 3, 4),
        32: (1, 2, 2, 2),
    }
    if image_size not in table:
        raise ValueError(f"no default channel_mult for image size {image_size}: pass channel_mult explicitly")
    return table[image_size]


def _parse_mult(channel_mult) -> tuple[float, ...]:
    if isinstance(channel_mult, str):
        return tuple(float(m) if "." in m else int(m) for m in channel_mult.split(",") if m.strip())
    return tuple(channel_mult)


def create_model(
    image_size: int,
    num_channels: int,
    num_res_blocks: int,
    channel_mult="",
    learn_sigma: bool = False,
    class_cond: bool = False,
    use_checkpoint: bool = False,
    attention_resolutions="16",
    num_heads: int = 1,
    num_head_channels: int = -1,
    num_heads_upsample: int = -1,
    use_scale_shift_norm: bool = False,
    dropout: float = 0.0,
    resblock_updown: bool = False,
    use_fp16: bool = False,
    use_new_attention_order: bool = False,
    in_channels: int = 3,
) -> UNetModel:
    """Build the UNet from the keyword arguments of guided-/improved-diffusion's ``create_model``.

    ``use_checkpoint`` (gradient checkpointing) is accepted and ignored: it changes no weights or
    outputs. ``in_channels`` is an extension for the project's own small models (default 3).
    """
    del use_checkpoint
    mult = _parse_mult(channel_mult) if channel_mult not in ("", None, ()) else default_channel_mult(image_size)
    if isinstance(attention_resolutions, str):
        resolutions = [int(r) for r in attention_resolutions.split(",") if r.strip()]
    else:
        resolutions = [int(r) for r in attention_resolutions]
    return UNetModel(
        image_size=image_size,
        in_channels=in_channels,
        model_channels=num_channels,
        out_channels=(2 * in_channels if learn_sigma else in_channels),
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(image_size // r for r in resolutions),
        dropout=dropout,
        channel_mult=mult,
        num_classes=(NUM_CLASSES if class_cond else None),
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
    )


def set_attention(model: nn.Module, impl: str) -> nn.Module:
    """Switch every :class:`AttentionBlock` in ``model`` to ``impl`` ("matmul" or "sdpa"); returns ``model``.

    No weights change, so state dicts and checkpoints are unaffected. ``"matmul"`` (the default) is
    what ONNX export and the parity tests use; ``"sdpa"`` is the fused-attention fast path.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation must be one of {', '.join(ATTENTION_IMPLS)}, got {impl!r}")
    for module in model.modules():
        if isinstance(module, AttentionBlock):
            module.attention_impl = impl
    return model


def unet_config(model: UNetModel) -> dict:
    """A few JSON-able facts about a built UNet (for manifests and logs)."""
    return {
        "image_size": model.image_size,
        "in_channels": model.in_channels,
        "out_channels": model.out_channels,
        "model_channels": model.model_channels,
        "parameters": sum(p.numel() for p in model.parameters()),
        "fp16": model.use_fp16,
    }
