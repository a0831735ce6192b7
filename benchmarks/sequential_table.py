"""Exact expected samples of the sequential target-radius mode against fixed n and the information bound.

Prints the table of docs/statistics.md "Fewer samples per certificate" (and with ``--write`` saves it as
``benchmarks/results/sample_efficiency/sequential_table.md`` and ``.json``). Nothing is simulated:
every number is a sum over exact binomial laws.

Setting: one target R, alpha = 0.001, n0 = 100 selection samples and estimation samples in rounds
of one vote (the command line's default ``--round``), n_max = 10,000. The top class has probability p_A and the rest,
1 - p_A, sits on a single runner-up (the slowest case for the selection).

Columns:

- lower bound: log(1 / alpha) / KL(p_A || p0), p0 = Phi(R / sigma). Any test of H0: p <= p0 at
  level alpha that certifies with probability 1 - beta at p_A needs E_{p_A}[n] >= ((1 - beta)
  log((1 - beta) / alpha) + beta log(beta / (1 - alpha))) / KL(p_A || p0) samples (data-processing
  inequality; Wald); this is its limit beta -> 0, for a test that always certifies.
- fixed n, same power: the smallest fixed n whose Clopper-Pearson CERTIFY certifies R with
  probability >= 1 - alpha = 0.999 at p_A (P(beta.ppf(alpha, N_A, n - N_A + 1) >= p0), N_A ~
  Binomial(n, p_A)); its probability in brackets. The sequential test certifies by n_max with
  probability 1 - 4e-7 or more in every row (column "P(certify)"; 1 - 2e-9 or more at p_A >= 0.99),
  so a fixed n with exactly its power would need more samples still: this column is a lower
  estimate of fixed n's cost at equal power. (Clopper-Pearson's power is not monotone in n: it
  jumps where one more failure becomes affordable, then slowly falls.)
  Estimation samples only (fixed-n CERTIFY adds its n0 = 100 selection samples).
- estimation: the sequential test's estimation samples, mean and 99th percentile, by dynamic
  programming over the law of S_t (a decision after every vote), given c_A = the top class.
- selection: expected selection samples, before (the exact rule alone: stop once the samples left
  cannot change the argmax) and after (also the clear-leader rule, ``selection_done``'s defaults).
- total: selection + estimation, averaged over the selected class (a wrong c_A is futile at once).

Usage: ``python benchmarks/sequential_table.py [--write]``. Takes about half a minute.
"""

from __future__ import annotations

import argparse
import functools
import math
from pathlib import Path

import numpy as np
from scipy import stats

from densepure_rt.stats.sequential import CERTIFIED, FUTILE, decide, selection_done

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "sample_efficiency"
ALPHA, N0, ROUND, N_MAX, POWER = 0.001, 100, 1, 10_000, 0.999
ROWS = [(0.99, 0.5), (0.999, 0.5), (1.0, 0.5), (0.99, 1.0), (0.999, 1.0), (0.999, 2.0), (1.0, 1.5), (0.9, 0.5), (0.7, 0.25)]
RULES = {
    "exact": functools.partial(selection_done, level=0.0),  # before: the exact rule alone
    "clear": selection_done,  # after: the runtime's rule (exact or clear leader)
}


def kl_bound(p_a: float, p0: float, alpha: float = ALPHA) -> float:
    """log(1 / alpha) / KL(Bernoulli(p_a) || Bernoulli(p0))."""
    kl = p_a * math.log(p_a / p0) + (math.log((1 - p_a) / (1 - p0)) * (1 - p_a) if p_a < 1 else 0.0)
    return math.log(1 / alpha) / kl


def fixed_n_power(n: int, p_a: float, p0: float, alpha: float = ALPHA) -> float:
    """P(Clopper-Pearson lower bound >= p0) with N_A ~ Binomial(n, p_a)."""
    k = np.arange(n + 1)
    lower = np.where(k > 0, stats.beta.ppf(alpha, np.maximum(k, 1), n - k + 1), 0.0)
    return float(stats.binom.pmf(k, n, p_a)[lower >= p0].sum())


def fixed_n_same_power(p_a: float, p0: float, alpha: float = ALPHA, power: float = POWER) -> tuple[int, float]:
    """The smallest n with :func:`fixed_n_power` >= power, and that power."""
    n = 1
    while (got := fixed_n_power(n, p_a, p0, alpha)) < power:
        n += 1
    return n, got


def estimation_law(p: float, p0: float, alpha: float = ALPHA, n_max: int = N_MAX, size: int = ROUND) -> dict:
    """The sequential test's stopping law at success probability p, by dynamic programming over
    the law of S_t: mean and 99th percentile of the estimation samples, P(certified), and
    P(not certified) = P(futile) + P(undecided at n_max), summed directly (not 1 - P(certified))."""
    dist, lo, t = np.array([1.0]), 0, 0
    ends, stop_mass = [], []
    certified = not_certified = 0.0
    while t < n_max and dist.size:
        m = min(size, n_max - t)
        dist = np.convolve(dist, stats.binom.pmf(np.arange(m + 1), m, p))
        t += m
        d = decide(lo + np.arange(dist.size), t, p0, alpha)
        certified += dist[d == CERTIFIED].sum()
        not_certified += dist[d == FUTILE].sum() + (dist[d == 0].sum() if t >= n_max else 0.0)
        ends.append(t)
        stop_mass.append(dist[d != 0].sum() if t < n_max else dist.sum())
        dist[d != 0] = 0.0
        keep = np.flatnonzero(dist > 1e-300)
        dist, lo = (dist[keep[0] : keep[-1] + 1], lo + keep[0]) if keep.size else (dist[:0], lo)
    ends, stop_mass = np.array(ends), np.array(stop_mass)
    cdf = np.cumsum(stop_mass)
    return {
        "mean": float((ends * stop_mass).sum() / stop_mass.sum()),
        "p99": int(ends[np.searchsorted(cdf, 0.99 * cdf[-1])]),
        "p_certified": float(certified),
        "p_not_certified": float(not_certified),
    }


def selection_law(p_a: float, rule, n0: int = N0, size: int = ROUND) -> dict:
    """Expected selection samples and P(c_A = top class) for two classes (p_a, 1 - p_a), selection
    in rounds of ``size`` up to n0, stopped by ``rule(counts, left)`` (ties to the top class)."""
    dist, t = np.array([1.0]), 0  # dist[k]: P(not stopped, top class has k of t votes)
    mean = p_top = 0.0
    while t < n0:
        m = min(size, n0 - t)
        dist = np.convolve(dist, stats.binom.pmf(np.arange(m + 1), m, p_a))
        t += m
        k = np.arange(t + 1)
        stop = rule(np.stack([k, t - k], axis=-1), n0 - t)
        mean += t * dist[stop].sum()
        p_top += dist[stop & (k >= t - k)].sum()
        dist = np.where(stop, 0.0, dist)
    return {"mean": float(mean), "p_top": float(p_top)}


def table() -> list[dict]:
    rows = []
    for p_a, r in ROWS:
        p0 = float(stats.norm.cdf(r))
        top = estimation_law(p_a, p0)
        wrong = estimation_law(1 - p_a, p0) if p_a < 1 else None
        fixed_n, fixed_power = fixed_n_same_power(p_a, p0)
        row = {
            "p_a": p_a,
            "r_over_sigma": r,
            "lower_bound": kl_bound(p_a, p0),
            "fixed_n_same_power": fixed_n,
            "fixed_n_power": fixed_power,
            "estimation_mean": top["mean"],
            "estimation_p99": top["p99"],
            "p_not_certified": top["p_not_certified"],
        }
        for name, rule in RULES.items():
            sel = selection_law(p_a, rule)
            est = sel["p_top"] * top["mean"] + (1 - sel["p_top"]) * (wrong["mean"] if wrong else 0.0)
            row[f"selection_{name}"] = sel["mean"]
            row[f"p_top_{name}"] = sel["p_top"]
            row[f"total_{name}"] = sel["mean"] + est
        rows.append(row)
    return rows


def _one_minus(q: float) -> str:
    """1 - q, written so that q stays readable (q = 0: "1")."""
    return f"1 - {q:.1e}" if q > 0 else "1"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| p_A | R | lower bound log(1/alpha)/KL | fixed n, power >= 0.999 (its power) | sequential estimation: mean (99th pct) "
        "| P(certify) | selection: exact rule -> clear leader | total mean: before -> after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for x in rows:
        lines.append(
            f"| {x['p_a']:g} | {x['r_over_sigma']:g} sigma | {x['lower_bound']:.1f} | {x['fixed_n_same_power']} "
            f"({_one_minus(1 - x['fixed_n_power'])}) | {x['estimation_mean']:.1f} ({x['estimation_p99']}) | "
            f"{_one_minus(x['p_not_certified'])} | "
            f"{x['selection_exact']:.1f} -> {x['selection_clear']:.1f} | {x['total_exact']:.1f} -> {x['total_clear']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"also save the table to {OUT.relative_to(ROOT)}/sequential_table.md / .json")
    args = parser.parse_args()
    rows = table()
    text = markdown(rows)
    print(text, end="")
    if args.write:
        from harness import write_record  # here, not at the top: tests load this file by its path, outside benchmarks/

        settings = {"alpha": ALPHA, "n0": N0, "round": ROUND, "n_max": N_MAX, "fixed_n_power": POWER,
                    "classes": "p_A and a single runner-up with 1 - p_A"}
        write_record(OUT, "sequential_table", {"settings": settings, "rows": rows}, markdown=text)


if __name__ == "__main__":
    main()
