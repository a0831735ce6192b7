"""CERTIFY and PREDICT of Cohen et al. (2019) from vote counts: counts in, certificate out.

Pure statistics (numpy + scipy, never torch). Sampling, purification and voting live elsewhere;
this module only sees per-class counts of the voted labels.

Names follow the paper and locuslab/smoothing ``code/core.py``: ``n0`` selection samples,
``n`` estimation samples, ``alpha`` failure probability, ``c_a`` the selected class, ``n_a`` its
count among the ``n`` estimation samples, ``p_a_lower`` the one-sided (1 - alpha) lower
confidence bound on its probability. Abstention is a value (``ABSTAIN``, radius 0.0), not an error.
"""

from __future__ import annotations

import math
import numbers
import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Optional

import numpy as np
from scipy import stats

from densepure_rt.errors import ConfigError, param

ABSTAIN = -1


@dataclass(frozen=True)
class Certificate:
    """Outcome of CERTIFY.

    prediction: ``c_a`` when certified, ``ABSTAIN`` otherwise.
    radius: certified L2 radius in [0, 1] pixel units; 0.0 when abstaining.
    n_a: count of ``c_a`` among the ``n`` estimation samples.
    p_a_lower: one-sided (1 - alpha) Clopper-Pearson lower bound on P(f(x + delta) = c_a).
    c_a: the class selected from the ``n0`` selection samples (kept even when abstaining).
    """

    prediction: int
    radius: float
    n_a: int
    p_a_lower: float
    c_a: int
    #: The settings it was computed with, where the caller says them (the engine's entry points:
    #: sigma, steps, votes, n0, n, alpha, seed, image_index, engine); not part of equality.
    settings: Optional[Mapping] = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        """Its fields (and settings) as plain JSON-able values."""
        return result_dict(self)


def result_dict(result) -> dict:
    """A result dataclass (certificate, prediction) as a plain dict: numpy scalars become Python
    numbers, tuples lists, and ``settings`` a dict."""
    out = {}
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if isinstance(value, Mapping):
            value = {k: (v.item() if hasattr(v, "item") else list(v) if isinstance(v, tuple) else v) for k, v in value.items()}
        elif isinstance(value, tuple):
            value = [v.item() if hasattr(v, "item") else v for v in value]
        elif hasattr(value, "item"):
            value = value.item()
        out[f.name] = value
    return out


@dataclass(frozen=True)
class Prediction:
    """Outcome of PREDICT.

    prediction: the top class, or ``ABSTAIN`` when the binomial test's p-value exceeds alpha.
    count1, count2: the largest and second-largest class counts.
    p_value: two-sided binomial test of count1 out of count1 + count2 against p = 0.5
        (1.0 when count1 + count2 == 0).
    """

    prediction: int
    count1: int
    count2: int
    p_value: float
    #: The settings it was computed with (as :attr:`Certificate.settings`); not part of equality.
    settings: Optional[Mapping] = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        """Its fields (and settings) as plain JSON-able values."""
        return result_dict(self)


def _check_counts(counts: np.ndarray, name: str) -> np.ndarray:
    """Return ``counts`` as a 1-D int64 array, or raise ValueError (non-integer, negative, not 1-D)."""
    arr = np.asarray(counts)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of per-class counts (got shape {arr.shape})")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers (got dtype {arr.dtype})")
    if (arr < 0).any():
        raise ValueError(f"{name} must be non-negative (got min {arr.min()})")
    return arr.astype(np.int64, copy=False)


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:  # also false for NaN
        raise ValueError(f"alpha must be in (0, 1) (got {alpha})")


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion.

    ``beta.ppf(alpha, n_a, n - n_a + 1)``, and exactly 0.0 when ``n_a == 0`` (where that Beta is
    undefined). Equal to ``statsmodels.stats.proportion.proportion_confint(n_a, n,
    alpha=2 * alpha, method="beta")[0]``, the call of Cohen et al.'s ``core.py``.

    n_a: successes, 0 <= n_a <= n. n: trials, n >= 1. alpha: in (0, 1).
    """
    n_a, n = int(n_a), int(n)
    if n < 1 or not 0 <= n_a <= n:
        raise ValueError(f"need 0 <= n_a <= n and n >= 1 (got n_a={n_a}, n={n})")
    _check_alpha(alpha)
    if n_a == 0:
        return 0.0
    return float(stats.beta.ppf(alpha, n_a, n - n_a + 1))


def fixed_n_samples_to_certify(p0: float, alpha: float, p_a: float = 1.0) -> int:
    """Smallest n at which fixed-n CERTIFY (Clopper-Pearson) certifies p0 if it knew the outcome.

    The "oracle n": the smallest n with ``beta.ppf(alpha, p_a n, n - p_a n + 1) >= p0``, i.e. the
    Clopper-Pearson lower bound of a sample whose success frequency is exactly p_a reaches p0
    (for p_a = 1: n >= log(alpha) / log(p0)). A fixed-n design needs this n before seeing any data
    and, at p_a < 1, certifies with it only about half of the time; real deployments use n = 10^4
    or 10^5. p0: in (0, 1). alpha: in (0, 1). p_a: in (p0, 1].
    """
    _check_alpha(alpha)
    if not 0.0 < p0 < 1.0:
        raise ValueError(f"p0 must be in (0, 1) (got {p0})")
    if not p0 < p_a <= 1.0:
        raise ValueError(f"p_a must be in (p0, 1] = ({p0}, 1] (got {p_a})")

    def reaches(n: int) -> bool:
        return stats.beta.ppf(alpha, p_a * n, n - p_a * n + 1.0) >= p0

    hi = 1
    while not reaches(hi):
        hi *= 2
        if hi > 2**62:
            raise ValueError(f"p0 = {p0} is out of reach at p_a = {p_a}")
    lo = hi // 2  # reaches(lo) is False (or lo == 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if reaches(mid):
            hi = mid
        else:
            lo = mid
    return hi


def certify(counts0: np.ndarray, counts: np.ndarray, sigma: float, alpha: float) -> Certificate:
    """Cohen et al.'s CERTIFY from vote counts.

    counts0: [num_classes] int, per-class counts of the n0 selection samples.
    counts: [num_classes] int, per-class counts of the n estimation samples.
    sigma: smoothing noise level (> 0). alpha: failure probability in (0, 1).

    c_a = argmax(counts0) (ties to the lowest class index); n_a = counts[c_a]; n = counts.sum();
    p_a_lower = lower_confidence_bound(n_a, n, alpha). Abstains (``ABSTAIN``, radius 0.0) if
    p_a_lower < 0.5, else certifies c_a with radius sigma * Phi^-1(p_a_lower).
    """
    counts0 = _check_counts(counts0, "counts0")
    counts = _check_counts(counts, "counts")
    if counts0.shape != counts.shape:
        raise ValueError(f"counts0 and counts differ in length ({counts0.size} vs {counts.size})")
    if counts0.sum() == 0:
        raise ValueError("counts0 is all zeros (n0 must be >= 1)")
    if counts.sum() == 0:
        raise ValueError("counts is all zeros (n must be >= 1)")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be finite and > 0 (got {sigma})")
    _check_alpha(alpha)

    c_a = int(np.argmax(counts0))
    n_a = int(counts[c_a])
    n = int(counts.sum())
    p_a_lower = lower_confidence_bound(n_a, n, alpha)
    if p_a_lower < 0.5:
        return Certificate(prediction=ABSTAIN, radius=0.0, n_a=n_a, p_a_lower=p_a_lower, c_a=c_a)
    radius = float(sigma * stats.norm.ppf(p_a_lower))
    return Certificate(prediction=c_a, radius=radius, n_a=n_a, p_a_lower=p_a_lower, c_a=c_a)


def predict(counts: np.ndarray, alpha: float) -> Prediction:
    """Cohen et al.'s PREDICT from vote counts.

    counts: [num_classes] int, per-class counts of the n samples. alpha: in (0, 1).

    Takes the two largest counts; among equal counts the lower class index ranks first (Cohen et
    al.'s ``argsort()[::-1]`` ranks the higher index first; the two orders differ only between equal
    counts, which never changes the outcome: a tie at the top has p-value 1 and abstains).
    Returns the top class if the two-sided ``scipy.stats.binomtest(count1, count1 + count2,
    p=0.5)`` p-value is <= alpha, else ``ABSTAIN``. With a single class, count2 is 0; with no
    votes at all it abstains with p-value 1.0.
    """
    counts = _check_counts(counts, "counts")
    _check_alpha(alpha)

    order = np.argsort(-counts, kind="stable")  # stable: equal counts keep ascending class order
    top = int(order[0])
    count1 = int(counts[top])
    count2 = int(counts[order[1]]) if counts.size > 1 else 0
    if count1 + count2 == 0:
        return Prediction(prediction=ABSTAIN, count1=0, count2=0, p_value=1.0)
    p_value = float(stats.binomtest(count1, count1 + count2, p=0.5).pvalue)
    prediction = ABSTAIN if p_value > alpha else top
    return Prediction(prediction=prediction, count1=count1, count2=count2, p_value=p_value)


#: The most noisy samples a phase may draw: the Philox counter keys a sample with 32 bits.
MAX_SAMPLES = 2**32 - 1


def validate_params(sigma: float, alpha: float, n0: int | None = None, n: int | None = None, n_name: str = "n") -> None:
    """Check user-facing certification parameters; raise ConfigError naming the parameter.

    sigma: finite, > 0. alpha: in (0, 1). n0, n (when given): integers >= 1. ``n_name``: what the
    caller calls n ("n", or "n_max" in the sequential modes).
    """
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise ConfigError(f"{param('sigma')} must be a number (got {sigma!r})")
    if not math.isfinite(sigma):
        raise ConfigError(f"{param('sigma')} must be finite (got {sigma})")
    if sigma <= 0:
        raise ConfigError(f"{param('sigma')} must be > 0 (got {sigma})")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise ConfigError(f"{param('alpha')} must be a number (got {alpha!r})")
    if not 0 < alpha < 1:  # also false for NaN
        raise ConfigError(f"{param('alpha')} must be in (0, 1) (got {alpha})")
    for name, value in (("n0", n0), (n_name, n)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{param(name)} must be an integer (got {value!r})")
        if value < 1:
            raise ConfigError(f"{param(name)} must be >= 1 (got {value})")
        if value > MAX_SAMPLES:
            raise ConfigError(f"{param(name)} must be at most {MAX_SAMPLES:,} (the noise's sample counter is 32 bits; got {value})")
