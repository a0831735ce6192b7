"""The sequential tests' per-vote fast paths against the functions they stand in for.

``tests/sequential_reference.py`` is a frozen copy of densepure_rt/stats/sequential.py as it
computed before the fast paths (every vote: :func:`decide` on the open targets, and
:func:`confidence_sequence` for (n_a, n) and the forecast): the reference. The fast paths read a
scalar log M (Python floats, math.lgamma) where it is farther from log(1/alpha) than its error bound,
bracket L_t and U_t to 1e-8, and call the exact functions elsewhere; so their decisions, bounds and
radii must equal the reference's bit for bit, which these tests check on a grid of (successes,
trials) and on Bernoulli streams, vote by vote. scipy's Clopper-Pearson bound is an independent
check of the bounds' side (the confidence sequence is wider than the fixed-n interval).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy import stats

import sequential_reference as ref
from densepure_rt.stats import sequential as seq

ALPHAS = (0.001, 0.05)


def _grid(seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    pairs = set()
    for t in list(range(1, 120)) + [int(x) for x in rng.integers(120, 200_000, 400)]:
        for s in {0, 1, 2, t // 2, t - 2, t - 1, t, *(int(x) for x in rng.integers(0, t + 1, 4))}:
            if 0 <= s <= t:
                pairs.add((s, t))
    return sorted(pairs)


GRID = _grid()


@pytest.mark.parametrize("alpha", ALPHAS)
def test_filter_decisions_equal_the_exact_log_mixture_on_a_grid(alpha):
    """rejects(p) is True / False only where the exact log M_t(p) >= log(1/alpha) says the same."""
    fast = seq._Filter(seq.DEFAULT_PRIOR, alpha)
    threshold = math.log(1.0 / alpha)
    told = 0
    for s, t in GRID[::3]:
        fast.at(s, t)
        for p in (0.5, 0.6, 0.8413447460685429, 0.9, 0.99, 0.999, s / t if 0 < s < t else 0.7):
            said = fast.rejects(p)
            if said is None:
                continue
            told += 1
            assert said == bool(ref.log_mixture(s, t, p) >= threshold), (s, t, p)
    assert told > 0.99 * 7 * len(GRID[::3])  # it decides nearly everywhere


@pytest.mark.parametrize("alpha", ALPHAS)
def test_brackets_hold_the_computed_bounds_on_a_grid(alpha):
    """lower_bracket / upper_bracket contain the reference's L_t / U_t (lo < L <= hi, lo <= U < hi)
    and are no wider than 1e-4 relative; the no-change tests agree with the reference values."""
    fast = seq._Filter(seq.DEFAULT_PRIOR, alpha)
    s_arr = np.array([s for s, _ in GRID])
    t_arr = np.array([t for _, t in GRID])
    lower, upper = ref.confidence_sequence(s_arr, t_arr, alpha)
    missed = 0
    for (s, t), lo_ref, up_ref in zip(GRID, lower.tolist(), upper.tolist()):
        fast.at(s, t)
        low = fast.lower_bracket()
        if low is None:
            missed += 1
        else:
            assert low[0] < lo_ref <= low[1] or low == (lo_ref, lo_ref) == (0.0, 0.0), (s, t)
            assert low[1] - low[0] <= 2e-4 * low[1]
        up = fast.upper_bracket()
        if up is None:
            missed += 1
        else:
            assert up[0] <= up_ref < up[1] or up == (up_ref, up_ref) == (1.0, 1.0), (s, t)
        for x in (lo_ref, lo_ref * (1 + 1e-7), lo_ref * (1 - 1e-7), 0.5, 0.9):
            if fast.lower_at_most(x):
                assert lo_ref <= x, (s, t, x)
            if fast.lower_above(x):
                assert lo_ref > x, (s, t, x)
        for x in (up_ref, up_ref - (1 - up_ref) * 1e-7, 0.5, 0.99):
            if fast.upper_at_least(x):
                assert up_ref >= x, (s, t, x)
            if fast.upper_below(x):
                assert up_ref < x, (s, t, x)
    assert missed <= 0.01 * len(GRID)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_one_sided_and_scalar_bounds_equal_the_reference_bit_for_bit(alpha):
    """_one_bound (one Newton root) and confidence_sequence of one (S, t) (the mask-free Newton
    loop) give the reference's doubles: the vectorised grid computation of the frozen copy."""
    pairs = GRID[::2]
    lower, upper = ref.confidence_sequence(np.array([s for s, _ in pairs]), np.array([t for _, t in pairs]), alpha)
    for (s, t), lo_ref, up_ref in zip(pairs, lower.tolist(), upper.tolist()):
        assert seq._one_bound(s, t, alpha, seq.DEFAULT_PRIOR, False) == lo_ref, (s, t)
        assert seq._one_bound(s, t, alpha, seq.DEFAULT_PRIOR, True) == up_ref, (s, t)
        assert seq.confidence_sequence(s, t, alpha) == (lo_ref, up_ref), (s, t)


def test_the_confidence_sequence_is_wider_than_clopper_pearson():
    """The scipy check of the side: L_t is below the fixed-n one-sided Clopper-Pearson bound at the
    same alpha (an anytime bound pays for looking at every t), U_t above the upper one."""
    for s, t in GRID[::7]:
        lower, upper = seq.confidence_sequence(s, t, 0.05)
        if 0 < s:
            assert lower <= stats.beta.ppf(0.05, s, t - s + 1)
        if s < t:
            assert upper >= stats.beta.ppf(0.95, s + 1, t - s)


def _stream(p: float, n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(np.int64)


CASES = [
    ("radii", dict(sigma=0.5, radii=[0.0, 0.25, 0.5, 1.0], alpha=0.001, n_max=2000)),
    ("radii", dict(sigma=0.25, radii=[0.3], alpha=0.05, n_max=2000)),
    ("until", dict(sigma=0.5, alpha=0.05, n_max=2000, tol=0.05)),
    ("until", dict(sigma=0.25, alpha=0.001, n_max=2000, tol=0.0)),
    ("until", dict(sigma=1.0, alpha=0.01, n_max=2000, tol=0.2)),
]


def _pair(kind: str, kwargs: dict):
    if kind == "radii":
        args = (kwargs["sigma"], kwargs["radii"], kwargs["alpha"], kwargs["n_max"])
        return ref.TargetRadiiTest(*args), seq.TargetRadiiTest(*args)
    args = (kwargs["sigma"], kwargs["alpha"], kwargs["n_max"], kwargs["tol"])
    return ref.EarlyStopRadius(*args), seq.EarlyStopRadius(*args)


@pytest.mark.slow
@pytest.mark.parametrize("kind, kwargs", CASES)
def test_streams_decide_exactly_as_the_reference_vote_by_vote(kind, kwargs):
    """Rounds of one vote, p_A from 0.3 to 1: after every vote the same result (decisions, decided_at,
    bounds, radius, reason) and the same look-ahead as the reference."""
    for p in (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 0.999, 1.0):
        for seed in range(3):
            votes = _stream(p, kwargs["n_max"], seed)
            old, new = _pair(kind, kwargs)
            i = 0
            while not old.done:
                old.update(int(votes[i]), 1)
                new.update(int(votes[i]), 1)
                i += 1
                assert dataclasses.astuple(new.result()) == dataclasses.astuple(old.result()), (p, seed, i)
                assert new.done == old.done
                assert new.certain_more() == old.certain_more()


@pytest.mark.parametrize("kind, kwargs", CASES)
def test_streams_end_as_the_reference_whatever_the_rounds(kind, kwargs):
    """Lazily resolved bounds (read only at the end) and rounds of 1, 7 and 32 votes: the same
    results as the reference fed the same rounds."""
    for p in (0.55, 0.75, 0.9, 0.995):
        votes = _stream(p, kwargs["n_max"], 11)
        for size in (1, 7, 32):
            old, new = _pair(kind, kwargs)
            start = 0
            while not old.done:
                take = min(size, old.remaining)
                old.update(int(votes[start:start + take].sum()), take)
                new.update(int(votes[start:start + take].sum()), take)
                start += take
            assert new.done
            assert dataclasses.astuple(new.result()) == dataclasses.astuple(old.result()), (p, size)
