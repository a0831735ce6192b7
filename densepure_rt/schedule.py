"""Diffusion schedules, the DensePure t* rules and the frozen reverse schedule (numpy float64, no torch).

Everything here is computed once per (schedule, sigma, b) on the host in float64, exactly as the
official code computes it, and handed to the reverse loop as a small table of per-step scalars.
The loop itself never touches these formulas (docs/design.md section 1.3-1.4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Union

import numpy as np

from densepure_rt.errors import ConfigError

__all__ = [
    "ScheduleError",
    "BetaSchedule",
    "ReverseSchedule",
    "ONE_SHOT",
    "NO_PURIFICATION",
    "parse_steps",
    "linear_schedule",
    "cosine_schedule",
    "make_schedule",
    "t_star",
    "reverse_schedule",
    "STEP_SCALARS",
    "max_steps",
    "max_sigma",
]

#: ``steps`` value that selects the one-shot denoiser of Carlini et al. (2022): one network call at
#: round(t*) on the ORIGINAL schedule, returning the clipped x0 prediction.
ONE_SHOT = 0

#: ``steps`` value for plain randomized smoothing of the classifier (no purification): the classifier
#: sees 2 (x + delta) - 1 directly. A baseline, not DensePure.
NO_PURIFICATION = -1

#: Order of the per-step scalars fed to the denoise-step graph (one row per step, float32).
STEP_SCALARS = (
    "model_t",  # timestep value given to the network (original tau, times 1000/T where rescaled)
    "sqrt_recip_ab",  # sqrt(1 / alpha_bar')
    "sqrt_recipm1_ab",  # sqrt(1 / alpha_bar' - 1)
    "coef1",  # posterior mean coefficient of x0_hat
    "coef2",  # posterior mean coefficient of x_t
    "min_log",  # log beta_tilde' (clipped posterior log variance)
    "max_log",  # log beta'
    "noise_mask",  # 1.0, or 0.0 on the last step (no noise added there)
)

COSINE_S = 0.008


class ScheduleError(ConfigError, ValueError):
    """A (sigma, b) the diffusion schedule cannot honour. Also a ValueError, for library callers."""


def _cosine_f(t: float) -> float:
    """The improved-diffusion cosine alpha_bar(t) for t in [0, 1], unnormalised (as DensePure uses it)."""
    return math.cos((t + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2


@dataclass(frozen=True)
class BetaSchedule:
    """A forward-process schedule of ``num_timesteps`` discrete steps.

    ``kind`` is ``"linear"`` (guided-diffusion, ImageNet) or ``"cosine"`` (improved-diffusion,
    CIFAR-10). ``rescale_timesteps`` is True where the network was trained on t * 1000 / T.
    """

    kind: Literal["linear", "cosine"]
    num_timesteps: int
    betas: np.ndarray  # [T] float64
    rescale_timesteps: bool

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """[T] float64 cumulative product of (1 - beta)."""
        return np.cumprod(1.0 - self.betas)

    def continuous_alpha_bar(self, tau: float) -> float:
        """alpha_bar at a (possibly fractional) timestep, as DensePure's respacing reads it.

        Linear: the discrete table at integer tau. Cosine: the closed form f(tau / T) (unnormalised).
        """
        if self.kind == "cosine":
            return _cosine_f(tau / self.num_timesteps)
        return float(self.alphas_cumprod[int(tau)])

    def model_timestep(self, tau: float) -> float:
        """The timestep value the network is given for diffusion step ``tau``."""
        return float(tau) * (1000.0 / self.num_timesteps) if self.rescale_timesteps else float(tau)


def linear_schedule(num_timesteps: int = 1000, rescale_timesteps: bool = True) -> BetaSchedule:
    """guided-diffusion's linear schedule (betas 1e-4 .. 0.02, scaled to 1000 steps)."""
    scale = 1000 / num_timesteps
    betas = np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
    return BetaSchedule("linear", num_timesteps, betas, rescale_timesteps)


def cosine_schedule(num_timesteps: int = 4000, rescale_timesteps: bool = True) -> BetaSchedule:
    """improved-diffusion's cosine schedule (s = 0.008, betas capped at 0.999)."""
    betas = np.array(
        [
            min(1 - _cosine_f((i + 1) / num_timesteps) / _cosine_f(i / num_timesteps), 0.999)
            for i in range(num_timesteps)
        ],
        dtype=np.float64,
    )
    return BetaSchedule("cosine", num_timesteps, betas, rescale_timesteps)


def make_schedule(kind: str, num_timesteps: int, rescale_timesteps: bool = True) -> BetaSchedule:
    """Build a schedule by name: ``"linear"`` or ``"cosine"``."""
    if kind == "linear":
        return linear_schedule(num_timesteps, rescale_timesteps)
    if kind == "cosine":
        return cosine_schedule(num_timesteps, rescale_timesteps)
    raise ValueError(f"unknown beta schedule {kind!r}: expected 'linear' or 'cosine'")


def t_star(schedule: BetaSchedule, sigma: float) -> float:
    """The timestep whose alpha_bar equals 1 / (1 + (2 sigma)^2) (docs/design.md section 1.3).

    Linear: the discrete index whose sqrt(1/alpha_bar - 1) is nearest to 2 sigma, ties to the lower
    index (144 / 258 / 396 for sigma 0.25 / 0.5 / 1.0). Cosine: the continuous closed form
    (1158.51 / 1984.20 / 2809.99 for T = 4000).
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    two_sigma = 2.0 * sigma
    if schedule.kind == "cosine":
        big_t = schedule.num_timesteps
        c = 1 + COSINE_S
        return big_t * (1 - (2 * c * math.asin(math.sin(math.pi / (2 * c)) / math.sqrt(1 + two_sigma**2))) / math.pi)
    noise_ratio = np.sqrt(1.0 / schedule.alphas_cumprod - 1.0)
    # Nearest index; ties go to the lower index, as in the official loop.
    upper = int(np.searchsorted(noise_ratio, two_sigma, side="left"))
    if upper == 0:
        return 0.0
    if upper >= len(noise_ratio):
        return float(len(noise_ratio) - 1)
    lower = upper - 1
    return float(upper if two_sigma - noise_ratio[lower] > noise_ratio[upper] - two_sigma else lower)


@dataclass(frozen=True)
class ReverseSchedule:
    """Everything one reverse run needs, frozen: step k of ``steps`` runs at diffusion step ``taus[k]``.

    ``scalars`` is [steps x len(STEP_SCALARS)] float64, one row per step in execution order; the
    denoise-step graph receives one row (as float32) per call. ``input_scale`` = 1/sqrt(1 + 4 sigma^2)
    multiplies 2 (x + delta) - 1 before the first step.
    """

    sigma: float
    steps: int  # b, or ONE_SHOT
    t_star: float
    input_scale: float
    taus: tuple[int, ...]  # original diffusion steps, in execution order
    scalars: np.ndarray  # [num_calls x 8] float64

    @property
    def num_calls(self) -> int:
        """Number of network evaluations in one reverse run."""
        return int(self.scalars.shape[0])

    def column(self, name: str) -> np.ndarray:
        """One named column of ``scalars`` ([num_calls] float64)."""
        return self.scalars[:, STEP_SCALARS.index(name)]

    def as_dict(self) -> dict:
        """JSON-friendly summary (for manifests and results)."""
        return {
            "sigma": self.sigma,
            "steps": self.steps,
            "t_star": self.t_star,
            "input_scale": self.input_scale,
            "taus": list(self.taus),
        }


def _posterior_table(alphas_cumprod: np.ndarray, betas: np.ndarray) -> dict[str, np.ndarray]:
    """Posterior coefficients of a (respaced) schedule, as in the original GaussianDiffusion."""
    alphas = 1.0 - betas
    ab_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - ab_prev) / (1.0 - alphas_cumprod)
    # beta_tilde at index 0 is 0; the original uses the index-1 value there.
    if len(betas) > 1:
        min_log = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
    else:
        # A single step: the original takes posterior_variance[1] of a 1-long table, which does
        # not exist. The value is never used because the last step adds no noise; log beta' keeps
        # the log variance of any variance output moderate (log(0) = -inf, or log(tiny) = -708,
        # would make exp(log var / 2) overflow for v > 1).
        min_log = np.log(betas)
    return {
        "sqrt_recip_ab": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_ab": np.sqrt(1.0 / alphas_cumprod - 1.0),
        "coef1": betas * np.sqrt(ab_prev) / (1.0 - alphas_cumprod),
        "coef2": (1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        "min_log": min_log,
        "max_log": np.log(betas),
    }


def parse_steps(steps: Union[int, str]) -> int:
    """A user's ``steps`` (a flag or an API argument) as an int: b >= 1, or the words 'one-shot'
    (-> ONE_SHOT) and 'none' (-> NO_PURIFICATION).

    Only the words select those paths: 0, -1 or any other integer below 1 is refused, so that a
    typo never silently turns DensePure into the one-shot denoiser or into plain smoothing.
    """
    if isinstance(steps, str):
        text = steps.strip().lower().replace("_", "-")
        if text in ("one-shot", "oneshot"):
            return ONE_SHOT
        if text == "none":
            return NO_PURIFICATION
        try:
            value = int(text)
        except ValueError:
            raise ScheduleError(f"steps must be a positive integer, 'one-shot' or 'none' (got {steps!r})") from None
    elif isinstance(steps, (int, np.integer)) and not isinstance(steps, bool):
        value = int(steps)
    else:
        raise ScheduleError(f"steps must be a positive integer, 'one-shot' or 'none' (got {steps!r})")
    if value < 1:
        raise ScheduleError(
            f"steps must be a positive integer (got {value}): write 'one-shot' for the one-shot denoiser "
            "or 'none' for plain randomized smoothing"
        )
    return value


def max_steps(schedule: BetaSchedule, sigma: float) -> int:
    """The largest b whose reverse run is well defined at ``sigma``: floor(t*).

    With b <= t* every step moves at least one diffusion step, so the respaced timesteps
    tau_0 > tau_1 > ... > tau_{b-1} >= 1 are distinct and every respaced beta' is positive. With more
    steps than t* allows, rounding repeats a timestep, beta' becomes 0 and the posterior
    coefficients become 0/0 (NaN): every purified image would be NaN.
    """
    return int(math.floor(t_star(schedule, sigma) + 1e-9))


def max_sigma(schedule: BetaSchedule) -> float:
    """The largest sigma whose t* the schedule can represent (alpha_bar(t*) = 1 / (1 + 4 sigma^2)).

    The discrete linear table ends at alpha_bar[T-1]; a larger sigma would silently clamp t* to
    T - 1 and purify at the wrong noise level. The cosine closed form is capped where t* reaches
    T - 1 (about sigma 1283 for T = 4000), so that round(t*) stays a valid index.
    """
    if schedule.kind == "cosine":
        c, big_t = 1 + COSINE_S, schedule.num_timesteps
        ratio = math.sin(math.pi / (2 * c)) / math.sin(math.pi / (2 * c * big_t))
        return 0.5 * math.sqrt(ratio**2 - 1.0)
    return float(np.sqrt(1.0 / schedule.alphas_cumprod[-1] - 1.0)) / 2.0


#: The largest magnitude of a noise draw: Box-Muller's sqrt(-2 ln u) at the smallest uniform the
#: Philox draws give, u = 2^-32 (densepure_rt/sampling/philox.py).
MAX_NORMAL = math.sqrt(-2.0 * math.log(2.0**-32))

#: The largest sigma accepted: the noisy classifier input, 2 (x + sigma z) - 1 with |z| <= MAX_NORMAL
#: and x in [0, 1], then stays finite in float32 (the precision of the noise and of every graph
#: input) with a factor 2 to spare.
MAX_FINITE_SIGMA = float(np.finfo(np.float32).max) / (2.0 * MAX_NORMAL) / 2.0


def _check_sigma(schedule: BetaSchedule, sigma: float, covered: bool = True) -> None:
    """A finite sigma > 0, and (``covered``) one the diffusion schedule reaches."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.floating, np.integer)) or not math.isfinite(sigma):
        raise ScheduleError(f"sigma must be a finite number (got {sigma!r})")
    if not sigma > 0:
        raise ScheduleError(f"sigma must be > 0 (got {sigma})")
    if sigma > MAX_FINITE_SIGMA:
        raise ScheduleError(
            f"sigma {sigma:g} makes noisy pixels up to {2 * MAX_NORMAL:.3g} x sigma, beyond the largest float32 number "
            f"({float(np.finfo(np.float32).max):.3g}) the engine computes in: use a sigma of at most {MAX_FINITE_SIGMA:.3g}"
        )
    if not covered:
        return
    top = max_sigma(schedule)
    if sigma > top:
        raise ScheduleError(
            f"sigma {sigma} is beyond this model's {schedule.kind} noise schedule, which reaches sigma = {top:.4g} "
            "(alpha_bar(t*) = 1/(1 + 4 sigma^2) would need a timestep past the last one): use a smaller sigma"
        )


def reverse_schedule(schedule: BetaSchedule, sigma: float, steps: Union[int, str]) -> ReverseSchedule:
    """The frozen reverse schedule for (schedule, sigma, b) (docs/design.md section 1.4).

    ``steps`` = b >= 1 runs DensePure's fast sampling: tau_i = round(t* - i t*/b), respaced betas
    beta'_k = min(1 - alpha_bar(tau_{k}) / alpha_bar(tau_{k+1}), 0.999) over [0, tau_{b-1}, ..., tau_0].
    ``steps`` = ONE_SHOT (0 or "one-shot") is the Carlini et al. one-shot denoiser: one call at
    round(t*) on the original schedule whose output is the clipped x0 prediction.
    ``steps`` = NO_PURIFICATION (-1 or "none") is the plain randomized-smoothing baseline: no call.
    """
    if isinstance(steps, (int, np.integer)) and not isinstance(steps, bool) and int(steps) in (ONE_SHOT, NO_PURIFICATION):
        steps = int(steps)  # the module's own sentinels (internal callers, fixtures' configs)
    else:
        steps = parse_steps(steps)
    if steps == NO_PURIFICATION:
        # No reverse run: the classifier gets 2 (x + delta) - 1 unscaled, and the diffusion schedule is
        # not used, so any finite sigma > 0 is allowed (t* is NaN where the schedule does not reach it).
        _check_sigma(schedule, sigma, covered=False)
        ts = t_star(schedule, sigma) if sigma <= max_sigma(schedule) else math.nan
        return ReverseSchedule(float(sigma), steps, float(ts), 1.0, (), np.zeros((0, len(STEP_SCALARS))))
    _check_sigma(schedule, sigma)
    ts = t_star(schedule, sigma)
    if steps >= 1 and steps > max_steps(schedule, sigma):
        top = max_steps(schedule, sigma)
        allowed = f"b must be between 1 and {top}" if top >= 1 else "no multi-step run fits"
        raise ScheduleError(
            f"{steps} reverse steps do not fit sigma {sigma}: t* = {ts:.6g} on this model's schedule, so "
            f"{allowed} (or use 'one-shot' / 'none'); more steps than t* repeat a timestep and make the "
            "purified images NaN"
        )
    input_scale = (1.0 / (1.0 + (2.0 * sigma) ** 2)) ** 0.5
    rows: list[list[float]] = []

    if steps == ONE_SHOT:
        tau = round(ts)
        full = _posterior_table(schedule.alphas_cumprod, schedule.betas)
        row = {name: full[name][tau] for name in full}
        # The output of the one-shot path is the x0 prediction itself: mean = 1 * x0_hat + 0 * x_t.
        row.update(coef1=1.0, coef2=0.0, model_t=schedule.model_timestep(tau), noise_mask=0.0)
        rows.append([row[name] for name in STEP_SCALARS])
        taus: tuple[int, ...] = (tau,)
    else:
        interval = ts / steps
        taus = tuple(round(ts - i * interval) for i in range(steps))  # Python round: half to even
        grid = [0, *taus[::-1]]  # ascending: 0, tau_{b-1}, ..., tau_0
        betas = np.array(
            [
                min(1 - schedule.continuous_alpha_bar(grid[j + 1]) / schedule.continuous_alpha_bar(grid[j]), 0.999)
                for j in range(steps)
            ],
            dtype=np.float64,
        )
        table = _posterior_table(np.cumprod(1.0 - betas), betas)
        for i, tau in enumerate(taus):
            j = steps - 1 - i  # respaced index of execution step i
            row = {name: table[name][j] for name in table}
            row.update(model_t=schedule.model_timestep(tau), noise_mask=0.0 if j == 0 else 1.0)
            rows.append([row[name] for name in STEP_SCALARS])

    table = np.asarray(rows, dtype=np.float64)
    if not np.all(np.isfinite(table)):  # defence in depth: the checks above should make this unreachable
        raise ScheduleError(f"the reverse schedule for sigma {sigma}, steps {steps} is not finite: choose fewer steps or a larger sigma")
    return ReverseSchedule(
        sigma=float(sigma),
        steps=steps,
        t_star=float(ts),
        input_scale=float(input_scale),
        taus=tuple(int(t) for t in taus),
        scalars=table,
    )
