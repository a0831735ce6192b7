"""Selection rules of the sequential modes, by exact dynamic programming: samples per decision
against the information bound, certified accuracy, and the false-certificate probability.

    python benchmarks/selection_rule.py --json benchmarks/results/selection/selection_rule.json

The rules (:data:`densepure_rt.stats.sequential.SELECTION_RULES`): "clear-leader" (the default:
the samples left cannot change the argmax, or the leader holds 2/3 of the votes and beats the
runner-up in a binomial test at 1e-3) and "first-k" (k = 1, 2, 3: stop as soon as the first t >= k
votes agree, else the clear-leader rule). Selection samples are i.i.d. votes with class
probabilities ``probs`` (class 0 the true class c_A); the estimation test is
:class:`densepure_rt.stats.sequential.TargetRadiiTest` with one target R, fed one vote at a time
(rounds of one, the scheduler's default), i.e. :func:`densepure_rt.stats.sequential.decide` after
every vote until it certifies, finds the target futile, or reaches n_max.

Everything is exact (no simulation): the law of the selection counts is propagated vote by vote
over every count vector (the rule's ``done`` decides which states stop, and with which argmax), and
the law of the estimation successes S_t likewise over S (``decide`` on every live state at every t;
mass below 1e-15 is dropped, and reported). Per (probs, R):

- ``selection_samples``: E[selection samples]; ``estimation_samples``: E[estimation samples]
  (sum over the class c the rule picks of P(c) E[samples of the test run on p_c]);
- ``bound``: log(1/alpha) / KL(p_A || Phi(R / sigma)), the fewest samples any level-alpha test
  that certifies needs on average (Wald), and ``ratio`` = (selection + estimation) / bound;
- ``certified``: P(c_A picked and R certified), the certified accuracy at R;
- ``false_certificate``: P(a class c with p_c <= Phi(R / sigma) is picked and R certified) (for the
  validity runs at p_A = Phi(R / sigma), the boundary).

Settings: sigma 0.5, alpha 0.001, n0 = 100, n_max = 10,000.
"""

from __future__ import annotations

import itertools
import math
import sys
import time

import numpy as np
import scipy
from scipy import stats

from harness import add_out, command, machine, parser, utc_now, write_record

from densepure_rt.stats.sequential import CERTIFIED, FUTILE, SELECTION_RULES, decide

SIGMA, ALPHA, N0, N_MAX = 0.5, 0.001, 100, 10_000
DROP = 1e-15


def selection_law(rule, probs, n0: int = N0) -> tuple[np.ndarray, float]:
    """P(rule picks class c) for each c, and E[selection samples], rounds of one vote."""
    k = len(probs)
    states = {tuple([0] * k): 1.0}
    picked = np.zeros(k)
    expected = 0.0
    for t in range(1, n0 + 1):
        if not states:
            break
        grown: dict = {}
        for counts, mass in states.items():
            for c, p in enumerate(probs):
                if p == 0.0:
                    continue
                nxt = list(counts)
                nxt[c] += 1
                key = tuple(nxt)
                grown[key] = grown.get(key, 0.0) + mass * p
        keys = list(grown)
        arr = np.array(keys, dtype=np.int64)
        done = np.atleast_1d(rule.done(arr, n0 - t))
        states = {}
        for key, stop in zip(keys, done.tolist()):
            mass = grown[key]
            if stop:
                picked[int(np.argmax(key))] += mass
                expected += t * mass
            elif mass > DROP:
                states[key] = mass
    if states:  # n0 reached: done (left == 0) always stops, so nothing is left here
        raise AssertionError("selection did not end at n0")
    return picked, expected


def estimation_law(p: float, p0: float, alpha: float = ALPHA, n_max: int = N_MAX) -> dict:
    """The one-target test on Bernoulli(p) votes, one at a time: P(certified), P(futile), E[samples]."""
    live = np.array([1.0])  # mass of S = lo .. lo + len - 1 among undecided paths at time t
    lo = 0
    certified = futile = expected = dropped = 0.0
    for t in range(1, n_max + 1):
        nxt = np.zeros(live.size + 1)
        nxt[:-1] += live * (1.0 - p)
        nxt[1:] += live * p
        s = np.arange(lo, lo + nxt.size)
        verdict = decide(s, t, p0, alpha)
        certified += nxt[verdict == CERTIFIED].sum()
        futile += nxt[verdict == FUTILE].sum()
        expected += t * nxt[verdict != 0].sum()
        nxt[verdict != 0] = 0.0
        keep = np.flatnonzero(nxt > DROP)
        dropped += nxt.sum() - nxt[keep].sum() if keep.size else nxt.sum()
        if not keep.size:
            live = np.zeros(0)
            break
        live, lo = nxt[keep[0]:keep[-1] + 1].copy(), lo + int(keep[0])
        live[live <= DROP] = 0.0
    undecided = live.sum()
    expected += n_max * undecided
    return {"certified": certified, "futile": futile, "undecided": undecided, "expected": expected, "dropped": dropped}


def kl(p: float, q: float) -> float:
    return sum(a * math.log(a / b) for a, b in ((p, q), (1 - p, 1 - q)) if a > 0)


def evaluate(rule, probs, r_over_sigma: float, cache: dict) -> dict:
    p0 = float(stats.norm.cdf(r_over_sigma))
    picked, sel = selection_law(rule, probs)
    est = certified = false = 0.0
    for c, (pc, share) in enumerate(zip(probs, picked)):
        if share == 0.0:
            continue
        key = (round(pc, 12), p0)
        if key not in cache:
            cache[key] = estimation_law(pc, p0)
        law = cache[key]
        est += share * law["expected"]
        if c == 0:
            certified += share * law["certified"]
        if pc <= p0:
            false += share * law["certified"]
    out = {"rule": rule.key, "probs": list(probs), "r_over_sigma": r_over_sigma, "p0": p0,
           "p_pick_true": float(picked[0]), "selection_samples": sel, "estimation_samples": est,
           "samples": sel + est, "certified": certified, "false_certificate": false}
    if probs[0] > p0:
        out["bound"] = math.log(1 / ALPHA) / kl(probs[0], p0)
        out["ratio"] = out["samples"] / out["bound"]
    return out


def main() -> None:
    ap = parser(__doc__)
    add_out(ap, "the JSON record", flag="--json", metavar="FILE", required=False)
    args = ap.parse_args()
    rules = list(SELECTION_RULES.values())
    cache: dict = {}
    t0 = time.time()
    efficiency = [evaluate(rule, (p, 1 - p), r, cache) for p, r, rule in itertools.product((0.9, 0.99, 0.999), (0.25, 0.5, 1.0), rules)]
    accuracy = [evaluate(rule, probs, r, cache)
                for probs, r, rule in itertools.product(
                    [(p, 1 - p) for p in (0.55, 0.6, 0.65, 0.7, 0.75, 0.8)]
                    + [(0.55, 0.40, 0.05), (0.6, 0.35, 0.05), (0.7, 0.25, 0.05), (0.55, 0.25, 0.20)],
                    (0.0, 0.25), rules)]
    # Validity at the boundary: p_A = Phi(R / sigma), two classes and a near-tie of three.
    validity = []
    for r in (0.0, 0.25, 0.5, 1.0):
        p0 = float(stats.norm.cdf(r))
        for probs in ((p0, 1 - p0), (p0, (1 - p0) * 0.6, (1 - p0) * 0.4)):
            validity += [evaluate(rule, probs, r, cache) for rule in rules]
    for row in efficiency:
        print(f"{row['rule']:13s} p_A {row['probs'][0]:<6} R {row['r_over_sigma']:<4} sigma: selection {row['selection_samples']:6.2f} "
              f"estimation {row['estimation_samples']:7.2f} total {row['samples']:7.2f} bound {row['bound']:7.2f} ratio {row['ratio']:.2f}",
              file=sys.stderr)
    for row in accuracy:
        print(f"{row['rule']:13s} probs {str(row['probs']):18s} R {row['r_over_sigma']:<4}: pick {row['p_pick_true']:.4f} "
              f"certified {row['certified']:.4f} samples {row['samples']:8.1f}", file=sys.stderr)
    worst = max(row["false_certificate"] for row in validity)
    print(f"largest false-certificate probability at the boundary: {worst:.3e} (alpha {ALPHA})", file=sys.stderr)
    record = {
        "command": command(),
        "date": utc_now(),
        "seconds": round(time.time() - t0, 1),
        "python": machine()["python"], "numpy": np.__version__, "scipy": scipy.__version__,
        "settings": {"sigma": SIGMA, "alpha": ALPHA, "n0": N0, "n_max": N_MAX, "round": 1, "mass_dropped_below": DROP},
        "efficiency": efficiency, "accuracy": accuracy, "validity": validity,
        "largest_false_certificate": worst,
    }
    if args.json:
        write_record(args.json.parent, args.json.stem, record)


if __name__ == "__main__":
    main()
