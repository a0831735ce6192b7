"""The outer roots of the beta-mixture confidence sequence (:func:`densepure_rt.stats.sequential.confidence_sequence`):
the vectorised Newton iteration and one bound of one (S, t), the same doubles. Pure numpy/scipy, never
torch."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from scipy import special

if TYPE_CHECKING:  # pragma: no cover
    from densepure_rt.stats.sequential import BetaMixture


def _outer_root(k: np.ndarray, m: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Solve h(u) = k - m u - r log(1 - e^u) = 0 for u < log(m / (m + r)), elementwise (m > 0, r >= 0).

    h is convex and decreasing there (h'' = r e^u / (1 - e^u)^2 >= 0), and h(k / m) >= 0 because
    the log term is <= 0. Newton's method started at u = k / m therefore climbs monotonically to the
    root from the outside (every iterate keeps h >= 0, up to rounding): the root is bracketed by the
    iterate and log(m / (m + r)), and the result errs on the conservative side.
    """
    u = k / m
    tiny = 4 * np.finfo(np.float64).eps
    if u.size == 1:  # one root (the sequential tests' bounds): the same arithmetic without the masks
        for _ in range(200):
            h = k - m * u - special.xlog1py(r, -np.exp(u))
            dh = -m + r / np.expm1(-u)
            step = -h / dh
            step = np.where(np.isfinite(step) & (step > 0), step, 0.0)
            going = step > tiny * np.maximum(1.0, np.abs(u))
            u = u + step
            if not going.all():
                break
        return u
    active = np.ones(u.shape, dtype=bool)
    for _ in range(200):
        if not active.any():
            break
        ua, ka, ma, ra = u[active], k[active], m[active], r[active]
        h = ka - ma * ua - special.xlog1py(ra, -np.exp(ua))
        dh = -ma + ra / np.expm1(-ua)  # h'(u) = -m + r e^u / (1 - e^u) < 0 left of the minimum
        step = -h / dh
        step = np.where(np.isfinite(step) & (step > 0), step, 0.0)
        u[active] = ua + step
        active[active] = step > tiny * np.maximum(1.0, np.abs(ua))
    return u


def _one_bound(successes: int, trials: int, alpha: float, prior: BetaMixture, upper: bool) -> float:
    """``confidence_sequence(successes, trials, alpha, prior)[1 if upper else 0]`` for integers
    0 <= successes <= trials (checked by the caller): the same double, one root computed."""
    if (successes == trials) if upper else (successes == 0):
        return 1.0 if upper else 0.0
    s, t = np.asarray(successes, dtype=np.int64), np.asarray(trials, dtype=np.int64)
    k = (prior.log_marginal(s, t) - math.log(1.0 / alpha)).reshape(1)
    s, t = s.astype(np.float64).reshape(1), t.astype(np.float64).reshape(1)
    if upper:
        return float(np.nextafter(-np.expm1(_outer_root(k, t - s, s)), 1.0)[0])
    return float(np.nextafter(np.exp(_outer_root(k, s, t - s)), 0.0)[0])
