"""PyTorch fast paths for DensePure, and the published baseline they are measured against.

Three ways to run the same computation (docs/design.md section 1), from slowest to fastest:

- :func:`published_loop`: the reverse process driven step by step from Python the way the official
  code drives it (guided-diffusion's ``p_sample_loop``): per step, coefficient tensors built on the
  host from numpy float64 tables and copied to the device, ``randn_like`` for the noise.
- :func:`tune_for_speed`: the same modules in fp16 (with the float32 islands of docs/design.md section 3),
  channels-last convolutions and fused attention (SDPA), run eagerly.
- :class:`WholeLoop`: the whole DensePure sampling loop for one batch of noisy samples (smoothing
  noise, b reverse steps of B*K rows, classifier, argmax, vote, histogram) as one fixed-shape
  callable that can be captured once into a single ``torch.cuda.CUDAGraph`` and replayed, with all
  noise drawn inside it from one dedicated, explicitly seeded generator.

This module is torch-side (``densepure_rt.export``). The runtime package ``densepure_rt`` never
imports it; a future torch backend of the runtime can.
"""

from __future__ import annotations

import warnings

from typing import Sequence

import numpy as np
import torch
from torch import nn

from densepure_rt.schedule import STEP_SCALARS, ReverseSchedule

from .step import DenoiseStep
from .unet import set_attention

__all__ = [
    "CastNet",
    "WholeLoop",
    "device_majority_vote",
    "published_loop",
    "set_fused_attention",
    "tune_for_speed",
    "vote_histogram",
]


# --------------------------------------------------------------------------------------------------
# Tuned configuration


class CastNet(nn.Module):
    """Runs ``net`` with ``dtype`` weights and activations; takes and returns float32.

    ``forward(x [batch x 3 x S x S] float32) -> [batch x classes] float32``. In fp16, LayerNorm
    statistics and the attention softmax are still accumulated in float32 inside PyTorch's kernels.
    """

    def __init__(self, net: nn.Module, dtype: torch.dtype = torch.float16, channels_last: bool = False):
        super().__init__()
        self.net = net.to(dtype)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.dtype = dtype
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x).float()


def set_fused_attention(module: nn.Module, enabled: bool) -> nn.Module:
    """Turn timm's fused attention (``fused_attn``: SDPA) on or off in every block of ``module``.

    timm >= 0.9 uses SDPA by default; the official DensePure ran an older timm whose attention was
    two matmuls around a softmax, which ``enabled=False`` restores. Returns ``module``.
    """
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = bool(enabled)
    return module


def tune_for_speed(
    unet: nn.Module,
    classifier: nn.Module,
    dtype: torch.dtype = torch.float16,
    channels_last: bool = True,
    sdpa: bool = True,
) -> tuple[nn.Module, nn.Module]:
    """The tuned PyTorch configuration; changes the modules in place and returns ``(unet, classifier)``.

    UNet: ``dtype=torch.float16`` applies ``convert_to_fp16`` (block convolutions in fp16; GroupNorm
    statistics, the attention softmax, the timestep embedding and the output head stay float32, and
    :class:`DenoiseStep` keeps the scheduler arithmetic float32); ``channels_last`` stores its 2-D
    convolution weights NHWC; ``sdpa`` switches its attention to ``scaled_dot_product_attention``
    (fused kernels; their softmax accumulates in float32).
    Classifier: the network runs in ``dtype`` (:class:`CastNet`) with timm's fused attention where
    ``sdpa``; a :class:`PurifiedClassifier` keeps its resize and normalisation float32 (its ``net``
    is wrapped), any other module is wrapped whole. Use the returned classifier.
    """
    if dtype not in (torch.float16, torch.float32):
        raise ValueError(f"tune_for_speed supports float16 and float32, got {dtype}")
    if dtype == torch.float16:
        unet.convert_to_fp16()
    set_attention(unet, "sdpa" if sdpa else "matmul")
    unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    set_fused_attention(classifier, sdpa)
    if hasattr(classifier, "net") and hasattr(classifier, "preprocess"):
        classifier.net = CastNet(classifier.net, dtype, channels_last)
    else:
        classifier = CastNet(classifier, dtype, channels_last)
    return unet, classifier


# --------------------------------------------------------------------------------------------------
# Vote and histogram on the device (graph-capturable)


def device_majority_vote(labels: torch.Tensor, votes: int) -> torch.Tensor:
    """[B*votes] int64 labels (runs of one sample adjacent) -> [B] int64 voted labels, on the device.

    The official tie rule (``densepure_rt.stats.vote.majority_vote``): the most frequent label; ties go
    to the class whose first vote has the lowest run index. Fixed shapes, no host synchronisation,
    no data-dependent Python control flow, so it can be captured in a CUDA graph.
    """
    runs = labels.reshape(-1, votes)
    count = (runs.unsqueeze(2) == runs.unsqueeze(1)).sum(dim=2)  # [B x K]: votes for run j's label
    # A unique maximum per row: more votes first, then the earlier run. The earliest run holding a
    # maximal count is the first vote of the earliest-voted tied class.
    score = count * votes + torch.arange(votes - 1, -1, -1, device=labels.device)
    winner = score.argmax(dim=1, keepdim=True)
    return runs.gather(1, winner).squeeze(1)


def vote_histogram(voted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[B] int64 labels in [0, num_classes) -> [num_classes] int64 counts, on the device.

    ``scatter_add_`` into a fixed-size buffer: graph-capturable (``torch.bincount`` on CUDA reads
    the maximum label back to the host to size its output, a synchronisation capture forbids).
    """
    hist = torch.zeros(num_classes, dtype=torch.int64, device=voted.device)
    return hist.scatter_add_(0, voted, torch.ones_like(voted))


# --------------------------------------------------------------------------------------------------
# The whole sampling loop as one capturable callable

_SIGMA, _INPUT_SCALE = 0, 1


class WholeLoop:
    """B noisy samples x K reverse runs of one clean image, voted and counted, as one fixed-shape call.

    One call (:meth:`eager`, or :meth:`replay` of the captured graph) does, on ``device``:

    1. ``delta`` [B x C x H x W] ~ N(0, 1) from ``generator``; x + sigma * delta (smoothing noise);
    2. x_t = input_scale * (2 (x + sigma delta) - 1), each row repeated K times -> [B*K x C x H x W]
       (row b*K + k is run k of sample b, as in the reference);
    3. for step i = 0..b-1: ``noise[i]`` [B*K x C x H x W] ~ N(0, 1) from ``generator``, then
       x = step(x, noise[i], scalars[i]) (a :class:`DenoiseStep`);
    4. classifier(x) -> argmax -> :func:`device_majority_vote` -> :func:`vote_histogram`, added
       into ``counts``.

    Draw order (the reproducibility contract): ``delta`` first, then ``noise[0]`` .. ``noise[b-1]``,
    each one ``normal_`` call filling the whole buffer. The draws, the purified images, the run
    labels and the voted labels of the latest call stay readable in the static buffers ``delta``,
    ``noise``, ``purified``, ``run_labels`` and ``voted``; ``counts`` accumulates over calls until
    :meth:`reset_counts`.

    Static inputs, copied in before a call: the clean image (:meth:`load_image`, [C x H x W] in
    [0, 1]) and the schedule (:meth:`set_schedule`: the per-step scalars [b x 8] and (sigma,
    input_scale), prepared once per (sigma, b) from ``densepure_rt.schedule.reverse_schedule``).
    Any sigma with the same b reuses a captured graph.

    Reproducibility. Seeding the generator (:meth:`seed`) and then making r calls gives the same
    draws whether the calls are eager or replays, in any mix: both consume the one Philox offset
    counter of the generator in the same order and amounts (on CUDA the graph reads the counter's
    value when each replay starts and advances it by the graph's total). Guaranteed: bit-identical
    draws for the same seed, device model, shapes and call index. Not guaranteed: bit-identical
    purified images between eager and graph, since the two may run different convolution or
    matmul algorithms; they agree to rounding, and labels and counts agree unless a classifier
    logit tie falls within that rounding. CPU and CUDA generators give different numbers for the
    same seed, and neither equals the runtime's counter-based noise (``densepure_rt.sampling.noise``).

    Arguments: ``step`` a :class:`DenoiseStep` (or a UNet, wrapped in one); ``classifier`` maps
    purified images [B*K x C x H x W] float32 in [-1, 1] to logits [B*K x num_classes]; ``rs`` the
    reverse schedule (its b fixes the loop's length); ``batch`` B; ``votes`` K; ``generator`` a
    generator on ``device`` (default: a new one seeded with ``seed``).
    """

    def __init__(
        self,
        step: nn.Module,
        classifier: nn.Module,
        rs: ReverseSchedule,
        batch: int,
        votes: int,
        image_shape: Sequence[int],
        num_classes: int,
        *,
        device: str | torch.device = "cpu",
        generator: torch.Generator | None = None,
        seed: int = 0,
    ):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.step = step if isinstance(step, DenoiseStep) else DenoiseStep(step)
        self.classifier = classifier
        self.batch, self.votes, self.num_calls = int(batch), int(votes), rs.num_calls
        self.num_classes = int(num_classes)
        self.image_shape = tuple(int(d) for d in image_shape)
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
        self.generator = generator
        rows = self.batch * self.votes
        f32 = dict(dtype=torch.float32, device=self.device)
        # Static buffers: allocated once; a captured graph reads and writes these addresses only.
        self.image = torch.full(self.image_shape, 0.5, **f32)
        self.scalars = torch.empty(self.num_calls, len(STEP_SCALARS), **f32)
        self.noise_scale = torch.empty(2, **f32)  # (sigma, input_scale)
        self.delta = torch.empty(self.batch, *self.image_shape, **f32)
        self.noise = torch.empty(self.num_calls, rows, *self.image_shape, **f32)
        self.purified = torch.empty(rows, *self.image_shape, **f32)
        self.run_labels = torch.zeros(rows, dtype=torch.int64, device=self.device)
        self.voted = torch.zeros(self.batch, dtype=torch.int64, device=self.device)
        self.counts = torch.zeros(self.num_classes, dtype=torch.int64, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.set_schedule(rs)

    # -- static inputs ------------------------------------------------------------------------------

    def set_schedule(self, rs: ReverseSchedule) -> None:
        """Copy (sigma, b)'s per-step scalars and (sigma, input_scale) into the static buffers."""
        if rs.num_calls != self.num_calls:
            raise ValueError(f"this loop runs {self.num_calls} steps; the schedule has {rs.num_calls}")
        self.rs = rs
        self.scalars.copy_(torch.as_tensor(rs.scalars, dtype=torch.float32))
        self.noise_scale.copy_(torch.tensor([rs.sigma, rs.input_scale], dtype=torch.float32))

    def load_image(self, image: torch.Tensor | np.ndarray) -> None:
        """Copy the clean image [C x H x W] in [0, 1] into the static input buffer."""
        self.image.copy_(torch.as_tensor(image, dtype=torch.float32))

    def seed(self, seed: int) -> None:
        """Restart the dedicated generator at ``seed`` (offset 0)."""
        self.generator.manual_seed(int(seed))

    def reset_counts(self) -> None:
        """Zero the accumulated histogram."""
        self.counts.zero_()

    def read_counts(self) -> np.ndarray:
        """The accumulated counts [num_classes] int64, read after one synchronisation."""
        # Capture rule: read outputs only after synchronising with the stream that replayed.
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return self.counts.cpu().numpy()

    # -- the loop body --------------------------------------------------------------------------------

    def _run(self) -> None:
        # Fixed shapes, no host synchronisation, no data-dependent Python branches: capturable.
        g = self.generator
        self.delta.normal_(generator=g)
        x_noisy = self.image + self.noise_scale[_SIGMA] * self.delta
        x = self.noise_scale[_INPUT_SCALE] * (2 * x_noisy - 1)
        # Each sample's K runs in adjacent rows (expand + copy: no host synchronisation).
        x = x.unsqueeze(1).expand(self.batch, self.votes, *self.image_shape).reshape(-1, *self.image_shape)
        for i in range(self.num_calls):
            self.noise[i].normal_(generator=g)
            x = self.step(x, self.noise[i], self.scalars[i])
        self.purified.copy_(x)
        self.run_labels.copy_(self.classifier(x).argmax(dim=1))
        self.voted.copy_(device_majority_vote(self.run_labels, self.votes))
        self.counts.add_(vote_histogram(self.voted, self.num_classes))

    @torch.no_grad()
    def eager(self) -> None:
        """One call without a graph (any device)."""
        self._run()

    @torch.no_grad()
    def capture(self, warmup: int = 2, pool=None) -> torch.cuda.CUDAGraph:
        """Capture one call into a CUDA graph (CUDA only); afterwards :meth:`replay` runs it.

        The ``warmup`` eager calls consume draws from the generator and the counts are zeroed at the
        end: call :meth:`seed` after capturing to restart the stream.
        """
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graph capture needs a CUDA device; use eager() elsewhere")
        # Capture rule: warm up before capture, on a side stream, so that lazy initialisation, cuDNN /
        # cuBLAS handles and autotuning (cudnn.benchmark), and the caching allocator all settle
        # outside the graph; capture may not synchronise or allocate pinned host memory.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        # The dedicated generator must be registered before capture begins (only the default CUDA
        # generator is registered automatically). Capture then records each draw at an offset
        # relative to a device-side base; each replay writes the generator's current (seed, offset)
        # into that base and advances the offset by the graph's total, so every replay draws fresh
        # numbers, exactly those an eager call at the same point of the stream would draw.
        # torch 2.11 (the device image) requires the call; newer torch made it a deprecated no-op
        # (registration is automatic there): keep it where it exists, quietly.
        register = getattr(graph, "register_generator_state", None)
        if register is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=(DeprecationWarning, FutureWarning, UserWarning))
                register(self.generator)
        with torch.cuda.graph(graph, pool=pool):
            self._run()
        self.graph = graph
        self.reset_counts()
        return graph

    def replay(self) -> None:
        """Replay the captured graph once (asynchronously; read results after :meth:`read_counts`)."""
        if self.graph is None:
            raise RuntimeError("capture() first")
        # Capture rule: inputs live in static buffers; copy new ones in (load_image, set_schedule)
        # before replaying, never rebind the attributes.
        self.graph.replay()

    def __call__(self) -> None:
        """Replay if captured, else run eagerly."""
        if self.graph is not None:
            self.replay()
        else:
            self.eager()

    def sample_counts(self, image: torch.Tensor | np.ndarray, num_batches: int, seed: int) -> np.ndarray:
        """Counts [num_classes] of ``num_batches * batch`` voted labels of ``image``, from ``seed``."""
        self.load_image(image)
        self.seed(seed)
        self.reset_counts()
        for _ in range(num_batches):
            self()
        return self.read_counts()


# --------------------------------------------------------------------------------------------------
# The published baseline: the official code's step-by-step loop

_PUBLISHED_TABLES = ("model_t", "sqrt_recip_ab", "sqrt_recipm1_ab", "coef1", "coef2", "min_log", "max_log")


def _extract_into_tensor(arr: np.ndarray, timesteps: torch.Tensor, broadcast_shape: Sequence[int]) -> torch.Tensor:
    """guided-diffusion's ``_extract_into_tensor``: the whole float64 table to the device, then indexed."""
    res = torch.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    while len(res.shape) < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)


@torch.no_grad()
def published_loop(
    unet: nn.Module,
    x_t: torch.Tensor,
    rs: ReverseSchedule,
    noise: Sequence[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One reverse run driven as the official code drives it; returns x0_hat [N x C x H x W] float32.

    ``x_t`` [N x C x H x W] float32 is x_{t*}. Per step, like guided-diffusion's ``p_sample``
    under DensePure's respacing: the respaced index tensor is built from a host list, every
    coefficient is ``torch.from_numpy(float64 table).to(device)[t].float()`` broadcast to the image,
    the network gets the mapped (and rescaled) timestep the same way, the noise is
    ``noise[i]`` if given, else drawn with ``generator`` if given, else ``torch.randn_like(x)``
    (global RNG, as the original), and the last step's noise is masked by ``t != 0``. ``unet`` runs
    as it is configured (the original: fp16 mode for ImageNet, fp32 for CIFAR-10). Same arithmetic
    as :func:`densepure_rt.export.reference.reverse_run`.
    """
    if noise is not None and len(noise) < rs.num_calls:
        raise ValueError(f"need {rs.num_calls} noise draws, got {len(noise)}")
    device, n, channels = x_t.device, x_t.shape[0], x_t.shape[1]
    # The respaced tables as the original holds them: numpy float64, indexed by the respaced step j
    # (execution step i runs at j = b - 1 - i).
    tables = {name: np.ascontiguousarray(rs.column(name)[::-1]) for name in _PUBLISHED_TABLES}
    x = x_t
    for i in range(rs.num_calls):
        t = torch.tensor([rs.num_calls - 1 - i] * n, device=device)
        model_out = unet(x, _extract_into_tensor(tables["model_t"], t, (n,))).float()
        eps, v = model_out[:, :channels], model_out[:, channels:]
        min_log = _extract_into_tensor(tables["min_log"], t, x.shape)
        max_log = _extract_into_tensor(tables["max_log"], t, x.shape)
        frac = (v + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        x0 = torch.clamp(
            _extract_into_tensor(tables["sqrt_recip_ab"], t, x.shape) * x
            - _extract_into_tensor(tables["sqrt_recipm1_ab"], t, x.shape) * eps,
            -1.0,
            1.0,
        )
        mean = _extract_into_tensor(tables["coef1"], t, x.shape) * x0 + _extract_into_tensor(
            tables["coef2"], t, x.shape
        ) * x
        if noise is not None:
            z = noise[i].to(device=device, dtype=x.dtype)
        elif generator is not None:
            z = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
        else:
            z = torch.randn_like(x)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
        x = mean + nonzero_mask * torch.exp(0.5 * log_var) * z
    return x
