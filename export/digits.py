"""The ``digits`` preset: a small DensePure model the project trains itself, on scikit-learn's digits.

Everything needed is bundled with scikit-learn (``sklearn.datasets.load_digits``: 1797 images of
8x8 pixels, values 0..16), so a new user with no GPU and no downloads can run the whole pipeline
for real. Two models are trained on the CPU, deterministically, in minutes:

- a guided-diffusion UNet (``DIGITS_UNET_KWARGS``) on the linear 1000-step schedule, epsilon
  prediction with learned-range variance, trained with improved-diffusion's hybrid loss;
- ``DigitsNet``, a small CNN trained on CLEAN images only: plain randomized smoothing of a
  classifier that never saw noise is weak, which is what DensePure's purification fixes.

Write the shipped files with::

    python -m densepure_rt.export.digits --out densepure_rt/assets

Images are [N x 1 x 16 x 16] float32 in [0, 1]; the diffusion model works on 2x - 1 in [-1, 1], and
the classifier sees the purified x0_hat in [-1, 1] directly (``DIGITS_CLASSIFIER``: mean = std = 0.5
applied to (x0_hat + 1) / 2 is the identity on x0_hat).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from densepure_rt.presets import PRESETS
from densepure_rt.schedule import BetaSchedule, linear_schedule, reverse_schedule

from .reference import reverse_run, to_diffusion_input
from .step import DenoiseStep
from .unet import create_model, unet_config

__all__ = [
    "DIGITS_UNET_KWARGS",
    "DIGITS_SCHEDULE",
    "DIGITS_CLASSIFIER",
    "DigitsNet",
    "Trained",
    "load_split",
    "digits_schedule",
    "hybrid_loss",
    "train_unet",
    "train_classifier",
    "classifier_accuracy",
    "purification_check",
    "write_assets",
    "main",
]

IMAGE_SIZE = 16
NUM_CLASSES = 10
UNET_FILE = "digits_unet.safetensors"
CLASSIFIER_FILE = "digits_classifier.safetensors"
TEST_FILE = "digits_test.npz"
TRAINING_FILE = "digits_training.json"

#: ``create_model`` kwargs of the digits UNet: two levels (16x16 at 32 channels, 8x8 at 64), one
#: residual block per level, one 32-channel attention head at 8x8, guided-diffusion's scale-shift
#: norm and residual up/down sampling, learned sigma. 0.83M parameters (3.3 MB in fp32). The CPU
#: sets the size: one training step at batch 32 costs ~0.4 s on one core, a second residual block
#: per level adds 20%, 64 channels at both levels 80%. Channel counts are multiples of 32 because
#: of GroupNorm(32). No dropout: it costs ~10% of a CPU step, and the random one-pixel shifts
#: already keep the model from memorising the 1437 training images.
#: The kwargs live in the preset table (``densepure_rt.presets``), which the runtime reads too.
DIGITS_UNET_KWARGS = dict(PRESETS["digits"].unet_kwargs)

#: guided-diffusion's linear schedule with T = 1000: the network is given the step index itself
#: (rescaling by 1000 / T would be the identity).
DIGITS_SCHEDULE = ("linear", 1000)

#: Classifier input normalisation, applied to (x0_hat + 1) / 2: ((x0_hat + 1) / 2 - 0.5) / 0.5 is
#: x0_hat itself, so ``DigitsNet`` sees images in [-1, 1] (and is trained on 2x - 1).
DIGITS_CLASSIFIER = dict(mean=0.5, std=0.5)

#: The improved-diffusion hybrid loss is L_simple + lambda L_vlb with lambda = 0.001 and L_vlb the
#: SUM of the T terms. Training draws one term L_t per sample (t uniform), an estimate of
#: L_vlb / T, so the weight on that term is lambda * T (= 1 for T = 1000, as in improved-diffusion's
#: ``terms["vb"] *= num_timesteps / 1000``).
VLB_LAMBDA = 0.001

# Training defaults: both models train in about 15-20 minutes on one CPU core. The UNet's
# purification accuracy (``purification_check``) still rose from 1000 to 2000 steps and was flat
# from 2000 to 3000 (sigma 0.5, one-shot: 0.875 / 0.900 / 0.894 on the 360 test images).
DEFAULT_SEED = 0
DEFAULT_UNET_STEPS = 2000
DEFAULT_UNET_BATCH = 32
DEFAULT_UNET_LR = 1e-3
DEFAULT_EMA_DECAY = 0.999
DEFAULT_CLASSIFIER_EPOCHS = 30
DEFAULT_CLASSIFIER_BATCH = 64
DEFAULT_CLASSIFIER_LR = 1e-3
# One thread by default: for these tiny convolutions a second thread gains little, and on a shared
# 2-core machine two OpenMP threads slow down ~15x whenever another process holds a core.
DEFAULT_THREADS = 1


# --------------------------------------------------------------------------------------------- #
# Data                                                                                            #
# --------------------------------------------------------------------------------------------- #


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed split of scikit-learn's digits: (x_train, y_train, x_test, y_test).

    Images are float32 [N x 1 x 16 x 16] in [0, 1] (1437 train, 360 test), labels int64 [N].
    ``train_test_split(test_size=0.2, random_state=0, stratify=y)`` fixes which images are which.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # [1797 x 1 x 8 x 8]
    # Bilinear (align_corners=False) rather than nearest: each 16x16 pixel is a convex mix of its
    # 8x8 neighbours (weights 9/16, 3/16, 3/16, 1/16), so values stay in [0, 1] and the images are
    # smooth strokes instead of 2x2 blocks whose hard edges the small UNet would have to reproduce.
    # (With 0..16 inputs the result lies exactly on the grid k / 256.)
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = images.clamp_(0.0, 1.0).numpy()
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, random_state=0, stratify=labels
    )
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image of x [N x C x H x W] by up to ``max_shift`` pixels each way, filling with 0."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # [N x 1 x H x 1]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # [N x 1 x 1 x W]
    batch = torch.arange(n)[:, None, None, None]
    chans = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, chans, rows, cols]


# --------------------------------------------------------------------------------------------- #
# Models                                                                                          #
# --------------------------------------------------------------------------------------------- #


class DigitsNet(nn.Module):
    """Small CNN: normalised images [N x 1 x 16 x 16] (the purified x0_hat in [-1, 1]) -> logits [N x 10]."""

    def __init__(self, width: int = 32, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8 x 8
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4 x 4
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(2 * width * 16, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def digits_schedule() -> BetaSchedule:
    """The digits UNet's forward schedule (``DIGITS_SCHEDULE``)."""
    kind, steps = DIGITS_SCHEDULE
    assert kind == "linear"
    return linear_schedule(steps)


# --------------------------------------------------------------------------------------------- #
# Diffusion training: improved-diffusion's hybrid loss                                            #
# --------------------------------------------------------------------------------------------- #


def _diffusion_tables(schedule: BetaSchedule) -> dict[str, torch.Tensor]:
    """Per-timestep coefficients [T] (computed in float64, stored as float32), as GaussianDiffusion."""
    betas = schedule.betas
    ab = np.cumprod(1.0 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    posterior_variance = betas * (1.0 - ab_prev) / (1.0 - ab)
    table = {
        "sqrt_ab": np.sqrt(ab),
        "sqrt_1m_ab": np.sqrt(1.0 - ab),
        "sqrt_recip_ab": np.sqrt(1.0 / ab),
        "sqrt_recipm1_ab": np.sqrt(1.0 / ab - 1.0),
        "coef1": betas * np.sqrt(ab_prev) / (1.0 - ab),
        "coef2": (1.0 - ab_prev) * np.sqrt(1.0 - betas) / (1.0 - ab),
        # beta_tilde_0 = 0: the original uses beta_tilde_1 there.
        "min_log": np.log(np.append(posterior_variance[1], posterior_variance[1:])),
        "max_log": np.log(betas),
    }
    return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in table.items()}


def _normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def hybrid_loss(
    model: nn.Module, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, tables: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (L_simple [N], L_t [N] in bits/dim) for x0 [N x C x H x W] in [-1, 1], t [N] int64.

    L_simple = mean over dims of (eps - eps_hat)^2. L_t = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))
    averaged over dims and divided by log 2, where p's mean comes from the DETACHED eps_hat (the
    VLB term trains only the variance, as in improved-diffusion) and its log variance is
    frac log beta_t + (1 - frac) log beta_tilde_t with frac = (v + 1) / 2.

    At t = 0 the VLB term is set to 0 (improved-diffusion uses a 256-bin discretised decoder NLL
    there). The variance at t = 0 is never used by DensePure (its last step adds no noise and
    returns x0_hat), and the bilinear digits are not 8-bit data, so that decoder would not
    describe them. L_simple still trains eps at t = 0.
    """
    def at(name: str) -> torch.Tensor:
        return tables[name][t][:, None, None, None]

    x_t = at("sqrt_ab") * x0 + at("sqrt_1m_ab") * noise
    out = model(x_t, t.float())
    channels = x0.shape[1]
    eps, v = out[:, :channels], out[:, channels:]
    l_simple = (noise - eps).square().mean(dim=(1, 2, 3))

    true_mean = at("coef1") * x0 + at("coef2") * x_t
    true_logvar = at("min_log")
    x0_hat = at("sqrt_recip_ab") * x_t - at("sqrt_recipm1_ab") * eps.detach()  # no clipping in training
    model_mean = at("coef1") * x0_hat + at("coef2") * x_t
    frac = (v + 1) / 2
    model_logvar = frac * at("max_log") + (1 - frac) * at("min_log")
    kl = _normal_kl(true_mean, true_logvar, model_mean, model_logvar).mean(dim=(1, 2, 3)) / math.log(2.0)
    l_vlb = torch.where(t > 0, kl, torch.zeros_like(kl))
    return l_simple, l_vlb


@dataclass
class Trained:
    """A trained model and its per-step (UNet) or per-epoch (classifier) loss history."""

    model: nn.Module
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0


@contextlib.contextmanager
def _deterministic(seed: int, threads: Optional[int]) -> Iterator[None]:
    """Seed torch's global RNG (model init, dropout), use deterministic kernels and ``threads`` CPU
    threads inside the block; the kernel and thread settings are restored afterwards."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_num_threads(),
    )
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.set_num_threads(saved[2])


def train_unet(
    steps: int,
    seed: int = DEFAULT_SEED,
    *,
    batch_size: int = DEFAULT_UNET_BATCH,
    lr: float = DEFAULT_UNET_LR,
    ema_decay: float = DEFAULT_EMA_DECAY,
    unet_kwargs: Optional[dict] = None,
    x_train: Optional[np.ndarray] = None,
    max_shift: int = 1,
    threads: Optional[int] = None,
    log: Optional[Callable[[str], None]] = None,
) -> Trained:
    """Train the digits UNet for ``steps`` AdamW steps; returns the EMA model (eval mode) and history.

    ``x_train`` is [N x 1 x 16 x 16] float32 in [0, 1] (default: the train split). Each step draws a
    batch with replacement, shifts it by up to ``max_shift`` pixels, maps it to 2x - 1, draws t
    uniformly from 0..T-1 and minimises L_simple + (lambda T) L_t (``hybrid_loss``). The EMA decay
    is min(ema_decay, (1 + k) / (10 + k)) at step k, so the random initialisation does not linger
    in a short run. ``history`` holds per-step ``l_simple`` and ``l_vlb`` (bits/dim) and ``loss``.
    """
    start = time.perf_counter()
    with _deterministic(seed, threads):
        if x_train is None:
            x_train = load_split()[0]
        data = torch.as_tensor(x_train, dtype=torch.float32)
        schedule = digits_schedule()
        tables = _diffusion_tables(schedule)
        vlb_weight = VLB_LAMBDA * schedule.num_timesteps
        model = create_model(**(unet_kwargs or DIGITS_UNET_KWARGS))
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        warmup = max(1, min(200, steps // 10))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warmup))
        gen = torch.Generator().manual_seed(seed)
        history: dict[str, list[float]] = {"loss": [], "l_simple": [], "l_vlb": []}
        for step in range(steps):
            idx = torch.randint(0, len(data), (batch_size,), generator=gen)
            x0 = 2 * _random_shift(data[idx], max_shift, gen) - 1
            t = torch.randint(0, schedule.num_timesteps, (batch_size,), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            l_simple, l_vlb = hybrid_loss(model, x0, t, noise, tables)
            loss = (l_simple + vlb_weight * l_vlb).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            decay = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), model.parameters()):
                    p_ema.lerp_(p, 1.0 - decay)
            history["loss"].append(loss.item())
            history["l_simple"].append(l_simple.mean().item())
            history["l_vlb"].append(l_vlb.mean().item())
            if log is not None and ((step + 1) % 100 == 0 or step + 1 == steps):
                window = slice(max(0, step - 99), step + 1)
                log(
                    f"unet step {step + 1}/{steps}: L_simple {np.mean(history['l_simple'][window]):.4f} "
                    f"L_vlb {np.mean(history['l_vlb'][window]):.4f} bits/dim ({time.perf_counter() - start:.0f} s)"
                )
        return Trained(ema, history, time.perf_counter() - start)


def train_classifier(
    epochs: int,
    seed: int = DEFAULT_SEED,
    *,
    batch_size: int = DEFAULT_CLASSIFIER_BATCH,
    lr: float = DEFAULT_CLASSIFIER_LR,
    x_train: Optional[np.ndarray] = None,
    y_train: Optional[np.ndarray] = None,
    max_shift: int = 1,
    max_batches: Optional[int] = None,
    threads: Optional[int] = None,
    log: Optional[Callable[[str], None]] = None,
) -> Trained:
    """Train ``DigitsNet`` on CLEAN images (2x - 1, random shifts of up to ``max_shift`` pixels).

    AdamW with cosine decay over ``epochs`` shuffled passes; ``max_batches`` caps each epoch (for
    quick tests). Returns the model in eval mode and ``history`` with the per-epoch mean
    cross-entropy ``loss`` and the per-batch ``batch_loss``.
    """
    start = time.perf_counter()
    with _deterministic(seed, threads):
        if x_train is None or y_train is None:
            x_train, y_train = load_split()[:2]
        data = torch.as_tensor(x_train, dtype=torch.float32)
        labels = torch.as_tensor(y_train, dtype=torch.int64)
        model = DigitsNet().train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        batches = math.ceil(len(data) / batch_size)
        if max_batches is not None:
            batches = min(batches, max_batches)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * batches))
        gen = torch.Generator().manual_seed(seed)
        history: dict[str, list[float]] = {"loss": [], "batch_loss": []}
        for epoch in range(epochs):
            order = torch.randperm(len(data), generator=gen)
            losses = []
            for b in range(batches):
                idx = order[b * batch_size : (b + 1) * batch_size]
                x = 2 * _random_shift(data[idx], max_shift, gen) - 1
                loss = F.cross_entropy(model(x), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
            history["batch_loss"].extend(losses)
            history["loss"].append(float(np.mean(losses)))
            if log is not None:
                log(f"classifier epoch {epoch + 1}/{epochs}: cross-entropy {history['loss'][-1]:.4f}")
        return Trained(model.eval(), history, time.perf_counter() - start)


# --------------------------------------------------------------------------------------------- #
# Evaluation                                                                                      #
# --------------------------------------------------------------------------------------------- #


@torch.no_grad()
def classifier_accuracy(classifier: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 512) -> float:
    """Clean accuracy of ``classifier`` on images x [N x 1 x 16 x 16] in [0, 1] (fed as 2x - 1)."""
    classifier.eval()
    xt = torch.as_tensor(x, dtype=torch.float32)
    preds = torch.cat([classifier(2 * xt[i : i + batch] - 1).argmax(1) for i in range(0, len(xt), batch)])
    return float((preds.numpy() == np.asarray(y)).mean())


@torch.no_grad()
def purification_check(
    unet: nn.Module,
    classifier: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    sigmas: tuple[float, ...] = (0.25, 0.5, 1.0),
    steps: tuple[int, ...] = (0, 4, 10),
    seed: int = 0,
) -> dict:
    """Accuracy of single noisy draws, raw vs DensePure-purified (one reverse run each, no voting).

    For each sigma, delta ~ N(0, sigma^2) is added to x [N x 1 x 16 x 16] in [0, 1] without
    clipping; ``noisy`` classifies 2 (x + delta) - 1 directly (plain randomized smoothing's base
    classifier), ``purified_b{b}`` classifies the x0_hat of one reverse run of b steps
    (b = 0: the one-shot denoiser). Returns {"sigma=<s>": {"t_star": ..., "noisy": acc, ...}}.
    """
    step = DenoiseStep(unet.eval())
    classifier.eval()
    schedule = digits_schedule()
    xt = torch.as_tensor(x, dtype=torch.float32)
    labels = np.asarray(y)
    gen = torch.Generator().manual_seed(seed)

    def accuracy(images: torch.Tensor) -> float:
        return float((classifier(images).argmax(1).numpy() == labels).mean())

    results = {}
    for sigma in sigmas:
        x_noisy = xt + sigma * torch.randn(xt.shape, generator=gen)
        row = {"noisy": accuracy(2 * x_noisy - 1)}
        for b in steps:
            rs = reverse_schedule(schedule, sigma, b)
            row["t_star"] = rs.t_star
            noise = [torch.randn(xt.shape, generator=gen) for _ in range(rs.num_calls)]
            row[f"purified_b{b}"] = accuracy(reverse_run(step, to_diffusion_input(x_noisy, rs), rs, noise))
        results[f"sigma={sigma}"] = row
    return results


# --------------------------------------------------------------------------------------------- #
# Entry point                                                                                     #
# --------------------------------------------------------------------------------------------- #


def _versions() -> dict:
    import sklearn

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sklearn": sklearn.__version__,
        "numpy": np.__version__,
    }


def write_assets(
    out: str | Path,
    seed: int = DEFAULT_SEED,
    unet_steps: int = DEFAULT_UNET_STEPS,
    classifier_epochs: int = DEFAULT_CLASSIFIER_EPOCHS,
    threads: int = DEFAULT_THREADS,
    check: bool = True,
    command: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train both models and write the four ``digits_*`` files into ``out``; returns the JSON record."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_split()

    clf = train_classifier(classifier_epochs, seed, x_train=x_train, y_train=y_train, threads=threads, log=log)
    clean_acc = classifier_accuracy(clf.model, x_test, y_test)
    log(f"classifier clean test accuracy {clean_acc:.4f} ({clf.seconds:.0f} s)")
    unet = train_unet(unet_steps, seed, x_train=x_train, threads=threads, log=log)

    save_file({k: v.contiguous() for k, v in unet.model.state_dict().items()}, str(out / UNET_FILE))
    save_file({k: v.contiguous() for k, v in clf.model.state_dict().items()}, str(out / CLASSIFIER_FILE))
    np.savez_compressed(out / TEST_FILE, images=x_test.astype(np.float32), labels=y_test.astype(np.int64))

    window = max(1, unet_steps // 10)
    record = {
        "command": command or f"python -m densepure_rt.export.digits --out {out} --seed {seed} "
        f"--unet-steps {unet_steps} --classifier-epochs {classifier_epochs} --threads {threads}",
        "seed": seed,
        "threads": threads,
        "versions": _versions(),
        "data": {
            "source": "sklearn.datasets.load_digits, /16, bilinear 8x8 -> 16x16 (align_corners=False)",
            "split": "train_test_split(test_size=0.2, random_state=0, stratify=y)",
            "train": len(y_train),
            "test": len(y_test),
        },
        "unet": {
            "create_model_kwargs": DIGITS_UNET_KWARGS,
            "config": unet_config(unet.model),
            "schedule": list(DIGITS_SCHEDULE),
            "steps": unet_steps,
            "batch_size": DEFAULT_UNET_BATCH,
            "lr": DEFAULT_UNET_LR,
            "optimizer": "AdamW (weight_decay 0), linear warm-up",
            "ema_decay": DEFAULT_EMA_DECAY,
            "loss": "L_simple + 0.001 * T * L_t (improved-diffusion hybrid; L_t = 0 at t = 0)",
            "augmentation": "random shifts of up to 1 pixel",
            "seconds": round(unet.seconds, 1),
        },
        "classifier": {
            "architecture": "DigitsNet(width=32)",
            "normalisation": DIGITS_CLASSIFIER,
            "epochs": classifier_epochs,
            "batch_size": DEFAULT_CLASSIFIER_BATCH,
            "lr": DEFAULT_CLASSIFIER_LR,
            "optimizer": "AdamW (weight_decay 1e-4), cosine decay",
            "augmentation": "random shifts of up to 1 pixel; clean images only",
            "parameters": sum(p.numel() for p in clf.model.parameters()),
            "seconds": round(clf.seconds, 1),
            "clean_test_accuracy": clean_acc,
        },
        "final_losses": {
            "unet_window_steps": window,
            "l_simple": float(np.mean(unet.history["l_simple"][-window:])),
            "l_vlb_bits_per_dim": float(np.mean(unet.history["l_vlb"][-window:])),
            "classifier_cross_entropy_last_epoch": clf.history["loss"][-1],
        },
    }
    if check:
        record["purification_check"] = {
            "what": "accuracy of one noisy draw per test image: raw classifier vs one reverse run (no voting)",
            "seed": seed,
            "results": purification_check(unet.model, clf.model, x_test, y_test, seed=seed),
        }
        log(json.dumps(record["purification_check"]["results"], indent=1))
    record["wall_seconds"] = round(time.perf_counter() - start, 1)
    (out / TRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n")
    log(f"wrote {out} in {record['wall_seconds']:.0f} s")
    return record


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m densepure_rt.export.digits --out DIR``: train the digits models and write them to DIR.

    Example::

        python -m densepure_rt.export.digits --out densepure_rt/assets --seed 0 --threads 2
    """
    import click

    @click.command(context_settings={"show_default": True})
    @click.option("--out", "out", metavar="DIR", required=True, type=click.Path(file_okay=False), help="Output folder.")
    @click.option("--seed", metavar="INT", type=int, default=DEFAULT_SEED, help="Random seed.")
    @click.option("--unet-steps", metavar="INT", type=click.IntRange(min=1), default=DEFAULT_UNET_STEPS, help="UNet steps.")
    @click.option(
        "--classifier-epochs", metavar="INT", type=click.IntRange(min=1), default=DEFAULT_CLASSIFIER_EPOCHS,
        help="Classifier epochs.",
    )
    @click.option("--threads", metavar="INT", type=click.IntRange(min=1), default=DEFAULT_THREADS, help="torch CPU threads.")
    @click.option("--check/--no-check", default=True, help="Measure noisy vs purified accuracy after training.")
    def cli(out, seed, unet_steps, classifier_epochs, threads, check):
        command = "python -m densepure_rt.export.digits " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
        )
        write_assets(out, seed, unet_steps, classifier_epochs, threads, check, command)

    cli.main(args=argv, prog_name="python -m densepure_rt.export.digits", standalone_mode=True)


if __name__ == "__main__":
    main()
