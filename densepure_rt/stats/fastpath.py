"""Per-vote fast paths of the sequential tests (:mod:`densepure_rt.stats.sequential`): the same
decisions and bounds as its exact functions, read from scalar arithmetic where it is sure and left to
those functions elsewhere (tests/test_incremental_bounds.py checks them bit for bit against a frozen
copy of the functions that recompute every bound after every vote). Pure numpy/scipy, never torch."""

from __future__ import annotations

import array
import math
from typing import TYPE_CHECKING

import numpy as np
from scipy import special

if TYPE_CHECKING:  # pragma: no cover
    from densepure_rt.stats.sequential import BetaMixture


#: Counts (successes, failures, trials) up to which :class:`_Filter` reads its lgamma terms from
#: tables (math.lgamma's values, computed once per prior and process as counts grow: at most
#: 15 MB for a five-component prior); larger counts call math.lgamma.
_TABLE_LIMIT = 1 << 17
_TABLES: dict = {}


_COMPONENTS: dict = {}
#: Per (prior, alpha): (S, t) -> [log M's scalar value, its magnitude, L_t's bracket or None when not
#: yet computed]: pure functions of (prior, alpha, S, t), shared by the tests of every image (many
#: pass through the same counts, e.g. all successes). At most _STATES entries each (then emptied).
_STATE_CACHES: dict = {}
_STATES = 1 << 17


def _components(prior) -> tuple:
    """([(log w_k - betaln(a_k, b_k), a_k, b_k, a_k + b_k) per component], offset), kept per prior."""
    got = _COMPONENTS.get(prior)
    if got is None:
        w, a, b = (np.asarray(x) for x in (prior.weights, prior.a, prior.b))
        components = [(float(c), float(ak), float(bk), float(ak + bk))
                      for c, ak, bk in zip(np.log(w) - special.betaln(a, b), a, b)]
        # |lgamma(x)| <= lgamma(x) + 0.25 for x > 0 (its minimum is -0.1215), so the sum of the
        # |terms| of a component is at most |c| + its three lgamma values + 0.75.
        offset = max(abs(c) for c, _, _, _ in components) + 0.75
        got = _COMPONENTS[prior] = (components, offset)
    return got


def _lgamma_tables(components: list, size: int) -> list:
    """Per component (c, lgamma(a + i), lgamma(b + i), lgamma(a + b + i)) for i < at least ``size``
    (array.array of math.lgamma's doubles, shared by the filters of one prior), grown by doubling."""
    key = tuple(components)
    tables = _TABLES.get(key)
    have = len(tables[0][1]) if tables else 0
    if have < size:
        new = min(max(size, 2 * have, 1024), _TABLE_LIMIT)
        lgamma = math.lgamma
        tables = [(c, *(array.array("d", [lgamma(x + i) for i in range(new)]) for x in (a, b, ab)))
                  for c, a, b, ab in components]
        _TABLES[key] = tables
    return tables


#: Relative cushion of the bound comparisons: a computed bound (:func:`confidence_sequence`'s outer
#: Newton iterate, rounded one ulp outward) lies within about 1e-13 of the exact one, relative;
#: comparisons against a point this close are left to the exact function.
_CUSHION = 1e-10


class _Filter:
    """Scalar log M_t(p) of one (prior, alpha) in Python floats, with an error bound, so that a
    sequential test after one vote costs a few microseconds instead of the vectorised functions'
    hundreds: a comparison of log M with log(1 / alpha) is read from it only where the two differ by
    more than the bound; nearer, the exact functions (:func:`decide`, :func:`confidence_sequence`)
    decide. So every decision and bound equals theirs, bit for bit (tests/test_incremental_bounds.py
    compares them over a grid of (successes, trials) and on streams, against a frozen copy of the
    functions).

    The log-marginal is logsumexp_k [log w_k - betaln(a_k, b_k) + lgamma(a_k + S) + lgamma(b_k + F)
    - lgamma(a_k + b_k + t)] (math.lgamma), within a few ulp of the magnitudes of its lgamma terms
    of the exact function's value (measured: 1.2 ulp over S, t up to 10^6); the bound allows 1e-13
    of those magnitudes and of the S log p, F log(1 - p) terms (450 ulp), plus 1e-12 nats."""

    def __init__(self, prior: BetaMixture, alpha: float):
        self.threshold = math.log(1.0 / alpha)  # decide's threshold, the same float
        self.components, self.offset = _components(prior)
        self.tables = _lgamma_tables(self.components, 1024)
        self.size = len(self.tables[0][1])
        self.states = _STATE_CACHES.setdefault((tuple(self.components), self.threshold), {})
        self.state: list = [0.0, 0.0, None]
        self.s = self.t = -1
        self.value = self.magnitude = 0.0
        self.u_lower = self.u_upper = 0.0  # the last roots (log L, log(1 - U)): the next ones start there

    def at(self, s: int, t: int) -> "_Filter":
        """Evaluate the log-marginal at S = s, t (kept until the next call)."""
        if s != self.s or t != self.t:
            state = self.states.get((s, t))
            if state is not None:
                self.value, self.magnitude, self.s, self.t, self.state = state[0], state[1], s, t, state
                return self
            f = t - s
            exp = math.exp
            terms = []
            magnitude = 0.0
            if t >= self.size and t < _TABLE_LIMIT:
                self.tables = _lgamma_tables(self.components, t + 1)
                self.size = len(self.tables[0][1])
            if t < self.size:  # f, s <= t: every term from the tables
                for c, table_a, table_b, table_ab in self.tables:
                    la, lb, lab = table_a[s], table_b[f], table_ab[t]
                    terms.append(c + la + lb - lab)
                    size = la + lb + lab
                    if size > magnitude:
                        magnitude = size
            else:
                lgamma = math.lgamma
                for c, a, b, ab in self.components:
                    la, lb, lab = lgamma(a + s), lgamma(b + f), lgamma(ab + t)
                    terms.append(c + la + lb - lab)
                    size = la + lb + lab
                    if size > magnitude:
                        magnitude = size
            top = max(terms)
            total = 0.0
            for x in terms:
                total += exp(x - top)
            self.value = top + math.log(total)
            self.magnitude, self.s, self.t = magnitude + self.offset, s, t
            if len(self.states) >= _STATES:
                self.states.clear()
            self.state = self.states[(s, t)] = [self.value, self.magnitude, None]
        return self

    def rejects(self, p: float):
        """Whether log M_t(p) >= log(1 / alpha) at the last :meth:`at`: True, False, or None where
        the scalar value is too near the threshold to tell (or p is 0 or 1)."""
        if not 0.0 < p < 1.0:
            return None
        s, f = self.s, self.t - self.s
        lp, lq = math.log(p), math.log1p(-p)
        value = self.value - s * lp - f * lq
        err = 1e-13 * (10.0 + self.magnitude + abs(s * lp) + abs(f * lq))
        if value >= self.threshold + err:
            return True
        if value < self.threshold - err:
            return False
        return None

    def lower_at_most(self, x: float) -> bool:
        """Surely L_t <= x (the computed lower bound of :func:`confidence_sequence`)? False: unsure."""
        if self.s == 0 or x >= 1.0:
            return True  # L_t = 0
        y = x * (1.0 - _CUSHION)
        if y <= 0.0:
            return False
        # y at or right of S/t, or inside CS_t: the exact L_t is below y
        return self.s <= y * self.t or self.rejects(y) is False

    def lower_above(self, x: float) -> bool:
        """Surely L_t > x? False: unsure."""
        y = x * (1.0 + _CUSHION)
        return 0.0 < y < 1.0 and self.s > y * self.t and self.rejects(y) is True

    def upper_at_least(self, x: float) -> bool:
        """Surely U_t >= x (the computed upper bound)? False: unsure."""
        if self.s == self.t or x <= 0.0:
            return True  # U_t = 1
        y = x + max((1.0 - x) * _CUSHION, 8 * math.ulp(x))  # near 1, at least a few doubles apart
        if y >= 1.0:
            return False
        return self.s >= y * self.t or self.rejects(y) is False

    def upper_below(self, x: float) -> bool:
        """Surely U_t < x? False: unsure."""
        y = x - max((1.0 - x) * _CUSHION, 8 * math.ulp(x))
        return 0.0 < y < 1.0 and self.s < y * self.t and self.rejects(y) is True

    def _root(self, m: int, r: int, start: float = 0.0) -> float:
        """:func:`_outer_root` in Python floats on the scalar log-marginal (an estimate: checked by
        the brackets below). h(u) = k - m u - r log(1 - e^u) is convex and decreasing left of
        log(m / (m + r)), so k / m and one Newton step from any point there (``start``: the last
        vote's root) are both left of the root: the climb starts from the larger."""
        k = self.value - self.threshold

        def h_dh(u: float) -> tuple[float, float]:
            return k - m * u - r * math.log1p(-math.exp(u)), -m + r / math.expm1(-u)

        u = k / m
        try:
            if r and start < 0.0 and start < math.log(m / (m + r)):
                h, dh = h_dh(start)
                u = max(u, start if h >= 0.0 else start - h / dh)
            for _ in range(60):
                if r == 0:
                    break
                h, dh = h_dh(u)
                step = -h / dh
                if not (math.isfinite(step) and step > 0.0):
                    break
                u += step
                if step <= 1e-15 * max(1.0, abs(u)):
                    break
        except (ValueError, ZeroDivisionError, OverflowError):  # left the domain: the brackets fail, exact
            pass
        return u

    def lower_bracket(self):
        """(lo, hi) with lo < L_t <= hi (L_t as :func:`confidence_sequence` computes it), or None."""
        if self.s == 0:
            return 0.0, 0.0
        known = self.state[2]  # (lo, hi, log of the estimate), or () where none was found
        if known is not None:
            if not known:
                return None
            self.u_lower = known[2]
            return known[0], known[1]
        self.u_lower = self._root(self.s, self.t - self.s, self.u_lower)
        estimate = math.exp(self.u_lower)
        self.state[2] = ()
        for width in (1e-8, 1e-6, 1e-4):
            lo, hi = estimate * (1.0 - width), estimate * (1.0 + width)
            if self.lower_above(lo) and self.lower_at_most(hi):
                self.state[2] = (lo, hi, self.u_lower)
                return lo, hi
        return None

    def upper_bracket(self):
        """(lo, hi) with lo <= U_t < hi, or None."""
        if self.s == self.t:
            return 1.0, 1.0
        self.u_upper = self._root(self.t - self.s, self.s, self.u_upper)
        estimate = -math.expm1(self.u_upper)
        for width in (1e-8, 1e-6, 1e-4):
            gap = max((1.0 - estimate) * width, 64 * math.ulp(estimate))
            lo, hi = estimate - gap, estimate + gap
            if self.upper_at_least(lo) and self.upper_below(hi):
                return lo, hi
        return None


def radius_bracket(fast: _Filter, s: int, t: int, radius_of):
    """(lo, hi) with lo <= radius_of(L_t) <= hi at (s, t), from the filter's bracket of L_t (1e-9
    added on each side for the rounding of the monotone ``radius_of``), or None where it cannot
    bracket L_t."""
    bracket = fast.at(s, t).lower_bracket()
    if bracket is None:
        return None
    return radius_of(bracket[0]) - 1e-9, radius_of(bracket[1]) + 1e-9


class _RunningMax:
    """max of a sequence of numbers, each offered with a bracket [lo, hi] and a function that
    computes it exactly: exact values are computed only where the brackets cannot tell which is the
    largest, or when :meth:`exact` is asked. Invariant: the maximum is max(value, pending's exact)."""

    def __init__(self, value: float):
        self.value = value
        self.pending = None  # (lo, hi, compute) of an element above ``value``

    def bounds(self) -> tuple[float, float]:
        """lo <= the maximum <= hi."""
        pending = self.pending
        if pending is None:
            return self.value, self.value
        value = self.value
        return (pending[0] if pending[0] > value else value), (pending[1] if pending[1] > value else value)

    def offer(self, lo: float, hi: float, compute) -> None:
        cur_lo, cur_hi = self.bounds()
        if hi <= cur_lo:
            return
        if lo > cur_hi:  # the new one is the largest, whatever the pending one is
            self.pending = (lo, hi, compute)
            return
        self.exact()
        if hi <= self.value:
            return
        if lo > self.value:
            self.pending = (lo, hi, compute)
            return
        self.value = max(self.value, compute())

    def exact(self) -> float:
        if self.pending is not None:
            self.value = max(self.value, self.pending[2]())
            self.pending = None
        return self.value


def _soonest(fast: "_Filter", n_a: int, n: int, window: int, ups: list, downs: list):
    """:func:`_decided_soonest` through the filter's arithmetic: per target k, the first m in
    1..window at which m more successes certify ``ups[k]`` or m more failures find ``downs[k]``
    futile (``window`` where neither happens), or None where a value before the first such m is too
    near the threshold to tell (the caller then asks the exact function)."""
    if window < 1:
        return [window] * len(ups)
    # Along the all-success path the mixture's predictive probability of a success never falls
    # (each Beta's mean grows and the weights move to the larger means: E[X^2] / E[X] >= E[X]), so
    # m -> log M_{t+m}(p0) has non-decreasing increments log(predictive / p0): it is convex, and so
    # along the all-failure path. Below log(1/alpha) at m = 1 and m = window, it is below it on the
    # whole window: nothing is decided on that path.
    out = [window] * len(ups)
    for certify, targets in ((True, ups), (False, downs)):
        quiet = True
        for m in (1, window):
            fast.at(n_a + m, n + m) if certify else fast.at(n_a, n + m)
            if any(fast.rejects(p0) is not False for p0 in targets):
                quiet = False
                break
        if quiet:
            continue
        # m more successes (certify) or failures, scanned up to the soonest decision so far
        for m in range(1, window):
            if m >= max(out):
                break
            s, t = (n_a + m, n + m) if certify else (n_a, n + m)
            evaluated = False
            for i, p0 in enumerate(targets):
                if m >= out[i] or not (s > p0 * t if certify else s < p0 * t):
                    continue
                if not 0.0 < p0 < 1.0:
                    return None
                if not evaluated:
                    fast.at(s, t)
                    evaluated = True
                rejected = fast.rejects(p0)
                if rejected is None:
                    return None
                if rejected:
                    out[i] = m
    return out
