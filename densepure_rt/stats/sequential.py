"""Anytime-valid sequential certification: Cohen et al.'s guarantee from a data-dependent n.

Pure statistics (numpy + scipy, never torch), like :mod:`densepure_rt.stats.cohen`. The selection of
``c_a`` from at most ``n0`` samples happens elsewhere (CERTIFY's argmax; :func:`selection_done`
says when it may stop early); the procedures here see only the estimation counts of ``c_a``, which
arrive in rounds (one engine call each), and say after every round whether the evidence already
suffices.

The maths (Robbins 1970; Waudby-Smith & Ramdas, arXiv 2010.09686; Voracek, arXiv 2406.17830).
Let X_1, X_2, ... be i.i.d. Bernoulli(p) (X_i = 1 when the i-th noisy copy votes ``c_a``), S_t =
X_1 + ... + X_t the successes after t trials, and pi a prior on [0, 1] (here a finite mixture of
Beta distributions, ``pi = sum_k w_k Beta(a_k, b_k)``). For every fixed p in (0, 1),

    M_t(p) = integral q^S_t (1 - q)^(t - S_t) dpi(q) / (p^S_t (1 - p)^(t - S_t))
           = sum_k w_k B(a_k + S_t, b_k + t - S_t) / B(a_k, b_k) / (p^S_t (1 - p)^(t - S_t))

is the likelihood ratio of "q drawn from pi" against p, a nonnegative martingale with M_0 = 1 under
p. Ville's inequality, P_p(exists t: M_t(p) >= 1/alpha) <= alpha, makes

    CS_t = {p : M_t(p) < 1/alpha}

a (1 - alpha) *confidence sequence*: P(p in CS_t for every t = 1, 2, ...) >= 1 - alpha, whatever the
(data-dependent) time at which one looks or stops. p -> log M_t(p) is convex with its minimum, at
most 0, at p_hat = S_t / t, so CS_t is an interval [L_t, U_t] around p_hat (L_t = 0 exactly when
S_t = 0, U_t = 1 exactly when S_t = t).

A target radius R is certified at round t when p0 = Phi(R / sigma) <= L_t, i.e. (no root finding)
S_t / t > p0 and log M_t(p0) >= log(1 / alpha); it is futile when U_t <= p0, i.e. S_t / t < p0 and
the same inequality. A false certificate (certifying R although p_a <= Phi(R / sigma)) at any round
needs p_a outside some CS_t: one event of probability <= alpha covers every round, every target and
every stopping rule at once. Names follow :mod:`densepure_rt.stats.cohen`: ``n_a`` successes of
``c_a``, ``n`` estimation trials, ``alpha`` failure probability, ``p_a_lower`` / ``p_a_upper`` the
confidence sequence's bounds.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

from densepure_rt.stats.cohen import fixed_n_samples_to_certify  # noqa: F401  (re-exported: the fixed-n comparison)
from densepure_rt.stats.fastpath import _Filter, _RunningMax, _soonest, radius_bracket
from densepure_rt.stats.roots import _one_bound, _outer_root
from densepure_rt.stats.selection import (  # noqa: F401  (the selection's names, re-exported)
    DEFAULT_SELECTION,
    LOOKAHEAD,
    SELECTION_LEVEL,
    SELECTION_MIN_SHARE,
    SELECTION_RULES,
    SelectionRule,
    selection_certain,
    selection_done,
)

CERTIFIED = 1
FUTILE = -1
UNDECIDED = 0

#: The version of :class:`EarlyStopRadius`'s stopping rule (its "stalled" forecast): results written
#: under one rule are not continued under another (the rows would mix two stopping times).
STOP_RULE = "tol-budget-1"


# --------------------------------------------------------------------------------------------
# The prior
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BetaMixture:
    """A finite mixture of Beta priors, ``pi = sum_k weights[k] * Beta(a[k], b[k])``.

    weights: positive, summing to 1 (within 1e-9; stored renormalised). a, b: positive, finite.
    Any such pi gives a valid confidence sequence (the mixture of martingales is a martingale); the
    prior only moves where the sequence is tight, i.e. how many samples a decision takes.
    """

    weights: tuple[float, ...]
    a: tuple[float, ...]
    b: tuple[float, ...]

    def __post_init__(self) -> None:
        w = tuple(float(x) for x in self.weights)
        a = tuple(float(x) for x in self.a)
        b = tuple(float(x) for x in self.b)
        if not (len(w) == len(a) == len(b) >= 1):
            raise ValueError(f"weights, a and b must be non-empty and of one length (got {len(w)}, {len(a)}, {len(b)})")
        if not all(math.isfinite(x) and x > 0 for x in w + a + b):
            raise ValueError(f"weights and Beta parameters must be finite and > 0 (got {w}, {a}, {b})")
        total = sum(w)
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"mixture weights must sum to 1 (got {total})")
        object.__setattr__(self, "weights", tuple(x / total for x in w))
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)

    @classmethod
    def single(cls, a: float, b: float) -> "BetaMixture":
        """The plain Beta(a, b) prior (Beta(1, 1) uniform; Beta(1/2, 1/2) Krichevsky-Trofimov)."""
        return cls(weights=(1.0,), a=(a,), b=(b,))

    def log_marginal(self, successes, trials) -> np.ndarray:
        """log integral q^S (1 - q)^(t - S) dpi(q) = logsumexp_k [log w_k + betaln(a_k + S, b_k + t - S)
        - betaln(a_k, b_k)], elementwise over the broadcast integer arrays S = successes, t = trials
        (no argument checks: callers check)."""
        s = np.asarray(successes, dtype=np.float64)[..., None]
        f = np.asarray(trials, dtype=np.float64)[..., None] - s
        w = np.asarray(self.weights)
        a = np.asarray(self.a)
        b = np.asarray(self.b)
        terms = np.log(w) + special.betaln(a + s, b + f) - special.betaln(a, b)
        if terms.shape[-1] == 1:
            return terms[..., 0]
        top = terms.max(axis=-1)  # finite: betaln of positive arguments is finite
        return top + np.log(np.exp(terms - top[..., None]).sum(axis=-1))


#: Default prior: equal-weight mixture of Beta(16^k, 1), k = 0..4, i.e. a = 1, 16, 256, 4096, 65536.
#: Beta(a, 1) has density a q^(a - 1) and puts its mass at 1 - q ~ 1/a, so the five components cover
#: p_a from anywhere in [0, 1] (a = 1, uniform: futility and low p_a) through 1 - p_a ~ 1/16, 1/256,
#: 1/4096 and 1/65536, i.e. target radii up to about 4 sigma, the range of n <= 10^5. Against the
#: best single component it loses at most log 5 nats (its weight 1/5). Exact expected sample sizes
#: (dynamic programming over the law of S_t; rounds of 32, n_max = 10^5, radii 0.25-3 sigma at
#: p_a = 0.9-1, futility at p_a = 0.3-0.7; alpha = 0.001, 0.01, 0.05): at most 1.23-1.31 times
#: (geometric mean 1.07) the samples of the best of ten candidate priors in each case, where
#: Beta(1, 1) needs up to 2.0-2.9 times and Krichevsky-Trofimov Beta(1/2, 1/2) up to 1.5-2.0 times.
DEFAULT_PRIOR = BetaMixture(weights=(0.2,) * 5, a=(1.0, 16.0, 256.0, 4096.0, 65536.0), b=(1.0,) * 5)


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be a number in (0, 1) (got {alpha!r})")


def _check_sigma(sigma: float) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be finite and > 0 (got {sigma!r})")
    return float(sigma)


def _check_prior(prior: BetaMixture) -> None:
    if not isinstance(prior, BetaMixture):
        raise ValueError(f"prior must be a BetaMixture (got {type(prior).__name__})")


def _check_n_max(n_max: int) -> int:
    if isinstance(n_max, bool) or not isinstance(n_max, numbers.Integral) or n_max < 1:
        raise ValueError(f"n_max must be an integer >= 1 (got {n_max!r})")
    return int(n_max)


def _as_counts(successes, trials) -> tuple[np.ndarray, np.ndarray]:
    """Broadcast S and t to int64 arrays; ValueError unless integers with 0 <= S <= t."""
    s = np.asarray(successes)
    t = np.asarray(trials)
    for name, arr in (("successes", s), ("trials", t)):
        if arr.dtype.kind not in "iu":
            raise ValueError(f"{name} must hold integers (got dtype {arr.dtype})")
    s, t = np.broadcast_arrays(s.astype(np.int64, copy=False), t.astype(np.int64, copy=False))
    if s.size and ((s < 0).any() or (s > t).any()):
        raise ValueError("need 0 <= successes <= trials elementwise")
    return s, t


def _as_probabilities(p, name: str) -> np.ndarray:
    arr = np.asarray(p, dtype=np.float64)
    if arr.size and not ((arr >= 0.0) & (arr <= 1.0)).all():  # also false for NaN
        raise ValueError(f"{name} must lie in [0, 1]")
    return arr


def _scalar_or_array(x: np.ndarray, scalar: bool):
    return float(x) if scalar else x


# --------------------------------------------------------------------------------------------
# The mixture martingale, the decision test and the confidence sequence
# --------------------------------------------------------------------------------------------


def log_mixture(successes, trials, p, prior: BetaMixture = DEFAULT_PRIOR) -> np.ndarray:
    """log M_t(p) = log integral q^S (1 - q)^(t - S) dpi(q) - S log p - (t - S) log(1 - p), vectorised.

    successes, trials: integer arrays (broadcast), 0 <= S <= t (t = 0 gives 0, up to rounding: M_0 = 1).
    p: array of probabilities in [0, 1] (broadcast with S and t). prior: a ``BetaMixture``
    (default ``DEFAULT_PRIOR``). Returns +inf where p = 0 < S or p = 1 > S / t (0 log 0 = 0 is
    handled exactly). For every fixed p, t -> M_t(p) is a nonnegative martingale with mean 1 when
    the trials are i.i.d. Bernoulli(p).
    """
    _check_prior(prior)
    s, t = _as_counts(successes, trials)
    p = _as_probabilities(p, "p")
    s, t, p = np.broadcast_arrays(s, t, p)
    with np.errstate(divide="ignore"):
        return prior.log_marginal(s, t) - special.xlogy(s, p) - special.xlog1py(t - s, -p)


def decide(successes, trials, thresholds, alpha: float, prior: BetaMixture = DEFAULT_PRIOR) -> np.ndarray:
    """Decision of the confidence sequence on targets p0: +1 certified, -1 futile, 0 undecided.

    successes, trials: integer arrays (broadcast), 0 <= S <= t. thresholds: p0 in [0, 1], e.g.
    ``Phi(R / sigma)`` for a target radius R, broadcast with S and t. alpha: in (0, 1).

    +1 (``CERTIFIED``) iff S > p0 t and log M_t(p0) >= log(1 / alpha), i.e. p0 <= L_t;
    -1 (``FUTILE``) iff S < p0 t and log M_t(p0) >= log(1 / alpha), i.e. p0 >= U_t; else 0.
    Either decision is wrong only if p_a is outside CS_t, so over all rounds and targets together
    P(any wrong decision) <= alpha. Returns an int8 array of the broadcast shape.
    """
    _check_alpha(alpha)
    s, t = _as_counts(successes, trials)
    p0 = _as_probabilities(thresholds, "thresholds")
    s, t, p0 = np.broadcast_arrays(s, t, p0)
    rejected = log_mixture(s, t, p0, prior) >= math.log(1.0 / alpha)
    out = np.zeros(s.shape, dtype=np.int8)
    out[rejected & (s > p0 * t)] = CERTIFIED
    out[rejected & (s < p0 * t)] = FUTILE
    return out


def confidence_sequence(successes, trials, alpha: float, prior: BetaMixture = DEFAULT_PRIOR):
    """(L_t, U_t): the (1 - alpha) beta-mixture confidence sequence's interval after S in t trials.

    CS_t = {p : log M_t(p) < log(1 / alpha)} = (L_t, U_t), with M_t from :func:`log_mixture`.
    P(p_a in CS_t for all t simultaneously) >= 1 - alpha (Ville's inequality), so L_t is a lower
    confidence bound valid at any data-dependent stopping time (and so is max_{s <= t} L_s).

    successes, trials: integers (scalars or broadcast arrays), 0 <= S <= t; t = 0 gives (0, 1).
    alpha: in (0, 1). prior: a ``BetaMixture`` (default ``DEFAULT_PRIOR``).

    L_t = 0 exactly when S = 0, U_t = 1 exactly when S = t. Otherwise L_t = e^u solves
    log B_pi(S, t) - log(1/alpha) - S u - (t - S) log(1 - e^u) = 0 for u < log(S / t) (B_pi the
    prior's marginal likelihood), and U_t = 1 - e^v likewise with S and t - S swapped; both are found
    in log space by a monotone (bracketed) Newton iteration to about 1e-15 relative accuracy, on the
    outer side of the exact bound, and rounded one ulp outward. (log M itself is evaluated to about
    1e-11 nats, i.e. alpha to within a factor 1 +- 1e-10.) Returns floats for scalar input, else arrays.
    """
    _check_alpha(alpha)
    _check_prior(prior)
    scalar = np.ndim(successes) == 0 and np.ndim(trials) == 0
    s, t = _as_counts(successes, trials)
    s = s.astype(np.float64)
    t = t.astype(np.float64)
    k = prior.log_marginal(s.astype(np.int64), t.astype(np.int64)) - math.log(1.0 / alpha)
    lower = np.zeros(s.shape)
    upper = np.ones(s.shape)
    # Each root is found on its outer side in log space; the conversion to p then rounds to the
    # nearest double, so step one ulp outward (this matters only where the double grid is coarse,
    # e.g. U within 1e-11 of 1).
    has_s = s > 0
    if has_s.any():
        root = np.exp(_outer_root(k[has_s], s[has_s], t[has_s] - s[has_s]))
        lower[has_s] = np.nextafter(root, 0.0)
    has_f = t - s > 0
    if has_f.any():
        root = -np.expm1(_outer_root(k[has_f], t[has_f] - s[has_f], s[has_f]))
        upper[has_f] = np.nextafter(root, 1.0)
    return _scalar_or_array(lower, scalar), _scalar_or_array(upper, scalar)


# --------------------------------------------------------------------------------------------
# Sequential procedures with resumable state
# --------------------------------------------------------------------------------------------


def _decided_soonest(n_a: int, n: int, m: np.ndarray, up, down, alpha: float, prior: BetaMixture) -> np.ndarray:
    """Whether :func:`decide` certifies ``up`` after m more successes, or finds ``down`` futile after
    m more failures (elementwise over m broadcast with up / down): the soonest each can happen.
    :func:`decide`'s arithmetic without its argument checks (the look-aheads run after every round)."""
    m, up, down = np.broadcast_arrays(m, up, down)
    s = np.stack([n_a + m, np.full(m.shape, n_a)])  # [2 x ...]: all successes, all failures
    t = np.stack([n + m, n + m])
    p0 = np.stack([up, down]).astype(np.float64)
    with np.errstate(divide="ignore"):
        log_m = prior.log_marginal(s, t) - special.xlogy(s, p0) - special.xlog1py(t - s, -p0)
    rejected = log_m >= math.log(1.0 / alpha)
    return (rejected[0] & (s[0] > p0[0] * t[0])) | (rejected[1] & (s[1] < p0[1] * t[1]))


def _check_round(successes, trials, n: int, n_max: int) -> tuple[int, int]:
    if type(successes) is int and type(trials) is int and 0 <= successes <= trials and 1 <= trials <= n_max - n:
        return successes, trials  # the common case, without the checks' isinstance of abstract classes
    for name, value in (("successes", successes), ("trials", trials)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an integer (got {value!r})")
    successes, trials = int(successes), int(trials)
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1 (got {successes}, {trials})")
    if n + trials > n_max:
        raise ValueError(f"{trials} more trials would exceed n_max = {n_max} ({n} used; feed at most {n_max - n})")
    return successes, trials


@dataclass(frozen=True)
class TargetRadiiResult:
    """Outcome of :class:`TargetRadiiTest`.

    radius: the largest certified target radius; 0.0 when none is certified.
    certified: True when some target (possibly R = 0) is certified; False means abstain.
    decisions: per target (in the order given) +1 certified, -1 futile, 0 undecided at the end
        (counts as not certified).
    decided_at: per target, the number of estimation trials after which it was decided (0: never).
    n_a, n: successes of ``c_a`` and estimation trials used.
    """

    radius: float
    certified: bool
    decisions: tuple[int, ...]
    decided_at: tuple[int, ...]
    n_a: int
    n: int


class TargetRadiiTest:
    """Sequential CERTIFY against a list of target radii, fed the counts of ``c_a`` round by round.

    sigma: noise level (> 0). radii: target L2 radii (>= 0, finite; any order; R = 0 asks only for
    a certified prediction). alpha: failure probability in (0, 1). n_max: budget of estimation
    trials (>= 1). prior: ``BetaMixture`` (default ``DEFAULT_PRIOR``).

    Feed it the estimation counts of ``c_a`` only, with ``c_a`` chosen from separate selection
    samples (the argmax of :func:`densepure_rt.stats.cohen.certify`, possibly after fewer than n0 of
    them: :func:`selection_done`). The estimation samples are independent of the selection, so the
    guarantee below holds given any ``c_a``, including a wrong one (p_a <= 1/2, where any
    certificate, even of R = 0, is false).

    Target j has threshold p0_j = Phi(R_j / sigma). After every :meth:`update` each undecided target
    gets :func:`decide` on the cumulative counts; a decision is final. The test is ``done`` when every
    target is decided or n_max trials were used; undecided targets then count as not certified.
    Guarantee: P(some target with p_a <= p0_j is ever certified) <= alpha, over all rounds and
    targets, whenever the caller stops (and likewise for wrong futility decisions).
    """

    def __init__(self, sigma: float, radii, alpha: float, n_max: int, prior: BetaMixture = DEFAULT_PRIOR):
        self.sigma = _check_sigma(sigma)
        _check_alpha(alpha)
        self.alpha = float(alpha)
        self.n_max = _check_n_max(n_max)
        _check_prior(prior)
        self.prior = prior
        radii = np.asarray(radii, dtype=np.float64)
        if radii.ndim != 1 or radii.size == 0 or not (np.isfinite(radii) & (radii >= 0)).all():
            raise ValueError(f"radii must be a non-empty 1-D list of finite radii >= 0 (got {radii})")
        self.radii = radii
        self.thresholds = stats.norm.cdf(radii / self.sigma)
        self._p0 = [float(x) for x in self.thresholds]
        self._filter = _Filter(prior, self.alpha)
        self.n_a = 0
        self.n = 0
        self.decisions = np.zeros(radii.size, dtype=np.int8)
        self.decided_at = np.zeros(radii.size, dtype=np.int64)
        self._open = list(range(radii.size))  # the undecided targets

    @property
    def done(self) -> bool:
        return not self._open or self.n >= self.n_max

    @property
    def remaining(self) -> int:
        """Trials that may still be fed (n_max - n)."""
        return self.n_max - self.n

    def update(self, successes: int, trials: int) -> np.ndarray:
        """Add one round: ``successes`` votes for ``c_a`` among ``trials`` new estimation samples.

        Returns a copy of the per-target decisions. ValueError if the test is done or the round
        would exceed n_max.
        """
        if self.done:
            raise ValueError("the test is done; no more rounds can be fed")
        successes, trials = _check_round(successes, trials, self.n, self.n_max)
        self.n_a += successes
        self.n += trials
        s, t = self.n_a, self.n
        fast = self._filter.at(s, t)
        for j in list(self._open):
            p0 = self._p0[j]
            side = CERTIFIED if s > p0 * t else FUTILE if s < p0 * t else UNDECIDED
            if side == UNDECIDED:
                continue
            rejected = fast.rejects(p0)
            if rejected is None:  # too near the threshold for the scalar value: the exact test
                rejected = bool(decide(s, t, p0, self.alpha, self.prior) != UNDECIDED)
            if rejected:
                self.decisions[j] = side
                self.decided_at[j] = t
                self._open.remove(j)
        return self.decisions.copy()

    def certain_more(self, window: int = LOOKAHEAD) -> int:
        """The fewest further estimation samples after which the test could be done, whatever their
        votes (0 when done; at most ``window`` or the budget left): that many more are read.

        The test is done when every target is decided; a target is certified soonest if every
        further vote is a success and found futile soonest if every one is a failure (:func:`decide`
        is monotone in the successes), so no target is decided before the first of those two
        times, and the test not before the latest target's."""
        if self.done:
            return 0
        p0s = [self._p0[j] for j in self._open]
        first = _soonest(self._filter, self.n_a, self.n, min(int(window), self.remaining), p0s, p0s)
        if first is not None:
            return max(first)
        m = np.arange(1, min(int(window), self.remaining) + 1)[:, None]
        p0 = self.thresholds[self.decisions == UNDECIDED][None, :]
        can = _decided_soonest(self.n_a, self.n, m, p0, p0, self.alpha, self.prior)
        first = np.where(can.any(axis=0), np.argmax(can, axis=0) + 1, m.size)
        return int(first.max())

    def result(self) -> TargetRadiiResult:
        certified = self.decisions == CERTIFIED
        return TargetRadiiResult(
            radius=float(self.radii[certified].max()) if certified.any() else 0.0,
            certified=bool(certified.any()),
            decisions=tuple(int(d) for d in self.decisions),
            decided_at=tuple(int(d) for d in self.decided_at),
            n_a=self.n_a,
            n=self.n,
        )


@dataclass(frozen=True)
class EarlyStopResult:
    """Outcome of :class:`EarlyStopRadius`.

    radius: sigma * Phi^-1(p_a_lower), or 0.0 when p_a_lower <= 1/2 or the reason is
        "inconsistent" (abstain).
    certified: p_a_lower > 1/2 and the reason is not "inconsistent".
    p_a_lower, p_a_upper: running intersection of the confidence sequence, max_s L_s and min_s U_s
        (kept as computed also when they cross).
    n_a, n: successes of ``c_a`` and estimation trials used.
    reason: why it stopped: "inconsistent", "futile", "precise", "stalled", "budget"; "" while running.
    """

    radius: float
    certified: bool
    p_a_lower: float
    p_a_upper: float
    n_a: int
    n: int
    reason: str


#: r(L(F, n_max)) of :class:`EarlyStopRadius`'s forecast by (alpha, prior, n_max, sigma) and F: each
#: forecast's bound is computed once per process, whichever image's test asks.
_FORECAST_RADII: dict = {}
#: Brackets of those radii (and the points they put on L_t) by (alpha, prior, n_max, sigma, tol) and F.
_FORECAST_BRACKETS: dict = {}


class EarlyStopRadius:
    """Sequential CERTIFY without a target: sample until more samples stop paying off in radius.

    sigma: noise level (> 0). alpha: failure probability in (0, 1). n_max: budget (>= 1).
    tol: radius gain (same units as sigma, >= 0) that the rest of the budget must promise for
    sampling to go on. prior: ``BetaMixture`` (default ``DEFAULT_PRIOR``).

    After the round ending at n trials with n_a successes: p_a_lower = max over rounds of L_s,
    p_a_upper = min over rounds of U_s (the running intersection of the confidence sequence), and
    radius(n) = sigma * Phi^-1(p_a_lower), or 0.0 (abstain) when p_a_lower <= 1/2. It stops at the
    first round end where (checked in this order)
      "inconsistent": p_a_upper <= p_a_lower: the running intersection is empty (the sequence's
                 intervals (L_s, U_s) are open, and the computed bounds lie outside the exact ones),
                 so p_a is outside some interval: a detected failure of the confidence sequence's
                 coverage (probability <= alpha), not precision. It abstains: radius 0.0, not
                 certified;
      "futile":  p_a_upper <= 1/2: no radius is reachable (on the confidence sequence's event);
      "precise": sigma * Phi^-1(p_a_upper) - radius(n) <= tol: the radius can never gain more than
                 tol, since p_a <= p_a_upper (on the same event);
      "stalled": radius(n) > 0 and max(r(floor(f n_max), n_max) - r(n_a, n), 0) < tol (never
                 with tol = 0), with r(S, t) = sigma * Phi^-1(L_t(S)) (0 when <= 1/2) and f = p -
                 sqrt(p (1 - p) / n), p = n_a / n, one standard error below the frequency:
                 spending the whole budget at a success frequency the counts cannot tell from the
                 observed one would raise the radius of the current counts by less than tol
                 (:data:`STOP_RULE`);
      "budget":  n = n_max.
    While abstaining only "inconsistent", "futile", "precise" and "budget" apply (a certificate
    may need several doublings to appear).

    Why a forecast over the whole budget: at small n the confidence sequence's log(1/alpha) term
    dominates, so one doubling adds little even where many would add a lot; a forecast of one
    doubling, checked after every sample, stops streams at p_a = 0.9 after a dozen samples. Why one
    standard error below the frequency: near p_a = 1, sigma Phi^-1 is steep, and the gain forecast
    at the observed frequency stays large up to the budget (0.04-0.06 per doubling at p_a = 0.99,
    sigma = 0.5, n = 10^3-10^4), so a plain forecast would spend most of the budget there; the
    discount is as large as those gains there, small where p_a is moderate, and 0 while every vote
    is a success (at p_a = 1 it stops within tol of the budget's radius). Measured with rounds of
    one sample, sigma 0.5, alpha 0.001, n_max 10,000, tol 0.05, 200 Bernoulli streams each
    (tests/test_sequential.py): median radius 0.160 / 0.318 / 0.529 at p_a = 0.7 / 0.8 / 0.9
    after 910 / 979 / 1,127 samples (fixed-n Clopper-Pearson at n = 1,000: 0.197 / 0.351 /
    0.557; the one-doubling forecast: about 0.08 / 0.25 / 0.46 after 300-400); at p_a = 0.99
    2,093 samples (one-doubling: 1,489), radius 1.006; at p_a = 1 7,054 samples, radius 1.522 of
    the budget's 1.572.

    The stopping rule does not affect validity: P(sigma * Phi^-1(p_a) < radius(n) for some n) <= alpha,
    so the radius at any stopping time, this rule's included, is false with probability <= alpha.
    """

    def __init__(self, sigma: float, alpha: float, n_max: int, tol: float, prior: BetaMixture = DEFAULT_PRIOR):
        self.sigma = _check_sigma(sigma)
        _check_alpha(alpha)
        self.alpha = float(alpha)
        self.n_max = _check_n_max(n_max)
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (math.isfinite(tol) and tol >= 0):
            raise ValueError(f"tol must be finite and >= 0 (got {tol!r})")
        self.tol = float(tol)
        _check_prior(prior)
        self.prior = prior
        self._filter = _Filter(prior, self.alpha)
        self._forecast = _Filter(prior, self.alpha)  # L(F, n_max) of the "stalled" forecast
        # This test's tables of forecast radii and brackets (shared by every test of the same settings)
        self._forecast_radii = _FORECAST_RADII.setdefault((self.alpha, prior, self.n_max, self.sigma), {})
        self._forecast_brackets = _FORECAST_BRACKETS.setdefault((self.alpha, prior, self.n_max, self.sigma, self.tol), {})
        self.n_a = 0
        self.n = 0
        self._lower = _RunningMax(0.0)  # max_s L_s
        self._record = False  # whether the last round's L_t may be the running maximum
        self._upper = _RunningMax(-1.0)  # max_s -U_s = -min_s U_s (negation is exact)
        self.reason = ""

    def _radius_of(self, p: float) -> float:
        return float(self.sigma * special.ndtri(p)) if p > 0.5 else 0.0  # ndtri is scipy.stats.norm.ppf

    @property
    def p_a_lower(self) -> float:
        """max_s L_s over the rounds so far (0.0 before the first)."""
        return self._lower.exact()

    @property
    def p_a_upper(self) -> float:
        """min_s U_s over the rounds so far (1.0 before the first)."""
        return -self._upper.exact()

    @property
    def radius(self) -> float:
        """sigma * Phi^-1(p_a_lower), 0.0 while p_a_lower <= 1/2 and after "inconsistent"."""
        return 0.0 if self.reason == "inconsistent" else self._radius_of(self.p_a_lower)

    @property
    def certified(self) -> bool:
        """p_a_lower > 1/2, unless the running interval came out empty ("inconsistent")."""
        return self.p_a_lower > 0.5 and self.reason != "inconsistent"

    @property
    def done(self) -> bool:
        return bool(self.reason)

    @property
    def remaining(self) -> int:
        """Trials that may still be fed (n_max - n)."""
        return self.n_max - self.n

    def update(self, successes: int, trials: int) -> None:
        """Add one round (``successes`` votes for ``c_a`` among ``trials``); read ``radius``,
        ``done`` and :meth:`result` after it.

        The bounds of the round are computed (:func:`confidence_sequence`) only where a stop test or
        a running bound needs them; elsewhere the scalar filter brackets them to within 1e-8
        (verified on the exact function's log M), which settles every test whose outcome the
        bracket does not straddle. The running bounds keep the brackets of their latest candidates
        until they are read (``p_a_lower``, ``p_a_upper``, ``radius``, :meth:`result`). So every
        stop, bound and radius equals that of computing both bounds after every round.

        ValueError if already stopped or the round would exceed n_max.
        """
        if self.reason:
            raise ValueError("already stopped; no more rounds can be fed")
        if not (type(successes) is int and type(trials) is int and 0 <= successes <= trials
                and 1 <= trials <= self.n_max - self.n):  # the common case passes without a call
            successes, trials = _check_round(successes, trials, self.n, self.n_max)
        self.n_a += successes
        self.n += trials
        s, t = self.n_a, self.n
        fast = self._filter.at(s, t)
        bounds = [None, None]

        def exact(side: int) -> float:
            """L_t (side 0) or U_t (side 1) as :func:`confidence_sequence` computes it."""
            if bounds[side] is None:
                bounds[side] = _one_bound(s, t, self.alpha, self.prior, side == 1)
            return bounds[side]

        # L_t: at most the running lower bound (no record), else bracketed (or computed). After a
        # record, a round of successes makes another almost always: bracketed without asking.
        lower_lo, lower_hi = self._lower.bounds()
        if not (self._record and successes == trials) and fast.lower_at_most(lower_lo):
            now = (0.0, lower_lo)
            self._record = False
        else:
            bracket = fast.lower_bracket()
            now = bracket if bracket is not None else (exact(0),) * 2
            self._lower.offer(now[0], now[1], lambda: exact(0))
            lower_lo, lower_hi = self._lower.bounds()
            self._record = True
        neg_lo, neg_hi = self._upper.bounds()
        if not fast.upper_at_least(-neg_lo):
            bracket = fast.upper_bracket()
            lo, hi = bracket if bracket is not None else (exact(1),) * 2
            self._upper.offer(-hi, -lo, lambda: -exact(1))
            neg_lo, neg_hi = self._upper.bounds()
        # Brackets of p_a_lower and p_a_upper (they stay valid when a test below resolves one). The
        # first comparisons of _inconsistent, _upper_at_most, _precise and _lower_above are made
        # here (they settle almost every vote); the methods decide where the brackets cannot.
        lower = (lower_lo, lower_hi)
        up_lo, up_hi = upper = (-neg_hi, -neg_lo)
        gap = up_lo - (lower_hi if lower_hi > 0.5 else 0.5)  # _precise's slope bound
        if up_hi <= lower_lo or (up_lo <= lower_hi and self._inconsistent(lower, upper)):
            self.reason = "inconsistent"
        elif up_hi <= 0.5 or (up_lo <= 0.5 and self._upper_at_most(upper, 0.5)):
            self.reason = "futile"
        elif (up_lo < 1.0 and not (gap > 0.0 and self.sigma * 2.5066 * gap > self.tol + 1e-9)
              and self._precise(lower, upper)):
            self.reason = "precise"
        elif (lower_lo > 0.5 or (lower_hi > 0.5 and self._lower_above(lower, 0.5))) and self._stalled(fast, now, exact):
            self.reason = "stalled"
        elif self.n >= self.n_max:
            self.reason = "budget"

    def _lower_above(self, lower: tuple, x: float) -> bool:
        """p_a_lower > x, from its bracket ``lower`` where it can tell."""
        if lower[0] > x:
            return True
        if lower[1] <= x:
            return False
        return self.p_a_lower > x

    def _upper_at_most(self, upper: tuple, x: float) -> bool:
        """p_a_upper <= x, from its bracket ``upper`` where it can tell."""
        if upper[1] <= x:
            return True
        if upper[0] > x:
            return False
        return self.p_a_upper <= x

    def _inconsistent(self, lower: tuple, upper: tuple) -> bool:
        """p_a_upper <= p_a_lower."""
        if upper[1] <= lower[0]:
            return True
        if upper[0] > lower[1]:
            return False
        return self.p_a_upper <= self.p_a_lower

    def _precise(self, lower: tuple, upper: tuple) -> bool:
        """p_a_upper < 1 and r(p_a_upper) - radius <= tol, from the brackets of both running bounds
        where the radii of their ends settle it (r is monotone; 1e-9 covers its rounding)."""
        if upper[0] >= 1.0:
            return False  # p_a_upper = 1
        # Phi^-1 has slope >= sqrt(2 pi) (2.5066 below it): r(U) - r(L) >= sigma 2.5066 (U - max(L, 1/2))
        gap = upper[0] - (lower[1] if lower[1] > 0.5 else 0.5)
        if gap > 0.0 and self.sigma * 2.5066 * gap > self.tol + 1e-9:
            return False
        if upper[1] < 1.0:
            most = self._radius_of(upper[1]) - self._radius_of(lower[0])
            if most <= self.tol - 1e-9:
                return True
            least = self._radius_of(upper[0]) - self._radius_of(lower[1])
            if least > self.tol + 1e-9:
                return False
        p_a_upper = self.p_a_upper
        return p_a_upper < 1.0 and self._radius_of(p_a_upper) - self.radius <= self.tol

    def _stalled(self, fast: _Filter, now: tuple, exact) -> bool:
        """max(r(L(F, n_max)) - r(L_t), 0) < tol, F the forecast successes (below),
        r(p) = sigma Phi^-1(p) (0 when p <= 1/2): from ``now`` (lo <= L_t <= hi) or the filter where
        L_t is surely on one side of the point where the two radii differ by tol, else from the
        computed L_t."""
        if self.tol == 0.0:
            return False  # max(., 0) < 0 never holds
        # F = floor(f n_max), f = p - sqrt(p (1 - p) / n) with p = n_a / n (one standard error below
        # the frequency), clipped to [0, n_max]: the successes of the forecast
        p = self.n_a / self.n
        forecast = min(max(int(math.floor((p - math.sqrt(p * (1.0 - p) / self.n)) * self.n_max)), 0), self.n_max)
        entry = self._forecast_brackets.get(forecast)
        g_lo, g_hi, x_lo, x_hi = entry if entry is not None else self._forecast_bracket(forecast)
        if g_hi < self.tol:
            return True  # r(L_t) >= 0
        if x_hi is not None:
            # L_t above x stalls, below does not, r(x) = gain - tol (x >= 1/2), for every gain in [g_lo, g_hi]
            above, below = x_hi * (1.0 + 1e-9), x_lo * (1.0 - 1e-9)
            if now[1] < below or (now[0] <= above and fast.lower_at_most(below)):
                return False
            if now[0] > above or fast.lower_above(above):
                return True
        return max(self._forecast_radius(forecast) - self._radius_of(exact(0)), 0.0) < self.tol

    def _forecast_bracket(self, forecast: int) -> tuple:
        """(g_lo, g_hi, x_lo, x_hi) of F = ``forecast``: g_lo <= r(L(F, n_max)) <= g_hi, and where
        g_lo >= tol and the points are below 1 - 1e-6, x_lo <= x_hi with r(x) = g - tol at g = g_lo,
        g_hi (else None, None). A pure function of (F, n_max, alpha, prior, sigma, tol), kept once per
        process (:data:`_FORECAST_BRACKETS`), whichever image's test asks; exact (g_lo = g_hi) where
        :meth:`_forecast_radius` computed it."""
        table = self._forecast_brackets
        entry = table.get(forecast)
        if entry is None:
            gain = self._forecast_radii.get(forecast)
            bracket = (gain, gain) if gain is not None else radius_bracket(self._forecast, forecast, self.n_max,
                                                                         self._radius_of)
            entry = self._bracket_entry(bracket if bracket is not None else (self._forecast_radius(forecast),) * 2)
            if len(table) >= 1 << 20:
                table.clear()
            table[forecast] = entry
        return entry

    def _bracket_entry(self, bracket: tuple) -> tuple:
        g_lo, g_hi = bracket
        if g_lo >= self.tol:
            x_lo, x_hi = (0.5 * math.erfc(-(g - self.tol) / self.sigma / math.sqrt(2.0)) for g in (g_lo, g_hi))
            if x_hi < 1.0 - 1e-6:
                return g_lo, g_hi, x_lo, x_hi
        return g_lo, g_hi, None, None

    def _forecast_radius(self, forecast: int) -> float:
        """r(L(forecast, n_max)), the reference's ``_radius_of(float(lower[1]))``, computed once per
        (forecast, n_max, alpha, prior, sigma) in a process."""
        table = self._forecast_radii
        gain = table.get(forecast)
        if gain is None:
            if len(table) >= 1 << 20:
                table.clear()
            lower = _one_bound(forecast, self.n_max, self.alpha, self.prior, False)
            gain = table[forecast] = self._radius_of(lower)
            brackets = self._forecast_brackets
            if len(brackets) >= 1 << 20:
                brackets.clear()
            brackets[forecast] = self._bracket_entry((gain, gain))
        return gain

    def certain_more(self, window: int = LOOKAHEAD) -> int:
        """The fewest further estimation samples after which it could stop, whatever their votes
        (0 when stopped; at most ``window`` or the budget left): that many more are read.

        While p_a_lower <= 1/2 (no radius yet) it stops only once some later L_s > 1/2 ("stalled",
        "precise" or "inconsistent" with a radius) or some later U_s <= Phi(tol / sigma) ("futile",
        "precise" at radius 0, "inconsistent" without one), or at the budget; the first comes
        soonest if every further vote is a success, the second if every one is a failure (read from
        :func:`decide`, which is monotone in the successes). Once there is a radius, "stalled" may
        come after any sample: 1."""
        if self.reason:
            return 0
        lower = self._lower
        if lower.value > 0.5 or self._lower_above(lower.bounds(), 0.5):
            return 1
        m = np.arange(1, min(int(window), self.remaining) + 1)
        p_tol = float(special.ndtr(self.tol / self.sigma))
        first = _soonest(self._filter, self.n_a, self.n, m.size, [0.5], [p_tol])
        if first is not None:
            return first[0]
        can = _decided_soonest(self.n_a, self.n, m, 0.5, p_tol, self.alpha, self.prior)
        return int(m[np.argmax(can)]) if can.any() else int(m.size)

    def result(self) -> EarlyStopResult:
        return EarlyStopResult(
            radius=self.radius,
            certified=self.certified,
            p_a_lower=self.p_a_lower,
            p_a_upper=self.p_a_upper,
            n_a=self.n_a,
            n=self.n,
            reason=self.reason,
        )
