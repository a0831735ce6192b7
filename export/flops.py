"""Forward FLOPs of one sample, counted by PyTorch's ``FlopCounterMode`` (for the manifests' ``cost_gflop``).

Convention (``FlopCounterMode``'s, and docs/design.md section 6's): 2 FLOPs per multiply-accumulate of the
matrix products, convolutions and attention; bias additions, normalisation, activations, softmax,
resizing and other element-wise work are not counted. On it the full-size UNets come to 16.77
(cifar10) and 2239.67 (imagenet) GFLOP per sample, ViT-B/16 at 224 to 35.13, BEiT-L/16 at 512 to 723.97.

Attention goes through PyTorch's math backend while counting: ``FlopCounterMode`` has no formula for
the fused CPU kernel (``_scaled_dot_product_flash_attention_for_cpu``), so a fused call on the CPU
would otherwise count as zero (ViT-B/16 would read 33.70 instead of 35.13).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_gflop", "count_gflop_meta"]


def _as_tuple(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def _counted_gflop(module: nn.Module, inputs: tuple) -> float:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops() / 1e9


def count_gflop(module: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> float:
    """GFLOP of one forward call of ``module`` on one sample (2 FLOPs per multiply-accumulate).

    ``example_inputs`` is the tensor, or the tuple of positional tensors, that ``module`` takes, each
    with batch size 1: e.g. ``(x [1 x C x H x W] float32, t [1] float32)`` for a UNet, or
    ``x [1 x C x H x W]`` float32 in [-1, 1] for a classifier wrapper. Their values do not matter.
    Runs one real forward under ``torch.no_grad()`` on the module's device, in its current
    train/eval mode. Raises ``ValueError`` if an input's leading (batch) dimension is not 1.
    """
    inputs = _as_tuple(example_inputs)
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] != 1:
            raise ValueError(f"count_gflop counts one sample: input {i} has batch size {x.shape[0]}, not 1")
    return _counted_gflop(module, inputs)


def count_gflop_meta(factory: Callable[[], nn.Module], input_shapes: Sequence[Sequence[int]]) -> float:
    """:func:`count_gflop` on the meta device: no weights, no arithmetic, instant even for 552M parameters.

    ``factory()`` builds the module; it runs under ``torch.device("meta")``, so parameters and
    buffers made by torch factory functions are meta tensors (e.g. ``lambda:
    create_model(**preset.unet_kwargs)``). ``input_shapes`` gives one shape per positional input,
    batch size 1 first (``[(1, 3, 256, 256), (1,)]`` for a UNet); the inputs are float32 meta tensors.
    Gives the same count as :func:`count_gflop` on the real module for shape-static forwards (the
    UNets and classifiers here); a forward that reads tensor values (``.item()``, data-dependent
    branches) fails on the meta device.
    """
    with torch.device("meta"):
        module = factory()
    inputs = tuple(torch.empty(tuple(shape), dtype=torch.float32, device="meta") for shape in input_shapes)
    return count_gflop(module, inputs)
