"""Samples per decision of ``certify --radius`` by round size: rounds of 32 votes against rounds of
one vote, on the digits engine, through the CLI.

    python benchmarks/round_bench.py --engine engines/digits --out benchmarks/results/scheduler/round_digits

Every 9th digits test image (40), sigma 0.5, b = 4, K = 3, n0 = 100, alpha = 0.001, seed 0,
``--radius 0.25`` (0.5 sigma), ``--n-max 2000`` (the sample-efficiency settings of docs/statistics.md):

- ``continuous_round32``: every image streamed through the scheduler, --round 32;
- ``continuous_round1``: the same, --round 1 (the default).

(The committed ``waves_round32`` files are the record of densepure-rt 0.2.0's wave loop, whose
rounds were its batches of 32: the same decisions as ``continuous_round32``.)

Per run: wall time, certified accuracy, estimation samples per image (mean; and for the images whose
target was certified, against the lower bound log(1/alpha) / KL(p_hat || p0) with p_hat = n_a / n
and p0 = Phi(R / sigma): the fewest samples any test that certifies at level alpha needs on average
at that vote frequency), UNet evaluations per image. Writes the TSVs, their options and
``summary.json`` under ``--out``.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

from scipy import stats

from harness import add_engine, add_out, cli, machine, parser, write_record

SIGMA, RADIUS, ALPHA = 0.5, 0.25, 0.001
RUNS = {
    "continuous_round32": ["--batch", "32", "--round", "32"],
    "continuous_round1": ["--batch", "32", "--round", "1"],
}


def _kl(p: float, q: float) -> float:
    terms = [p * math.log(p / q) if p > 0 else 0.0, (1 - p) * math.log((1 - p) / (1 - q)) if p < 1 else 0.0]
    return sum(terms)


def _rows(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    return sorted((dict(zip(header, line.split("\t"))) for line in lines[1:]), key=lambda r: int(r["idx"]))


def main() -> None:
    ap = parser(__doc__)
    add_engine(ap, default=Path("engines/digits"))
    add_out(ap, "folder of the TSVs, their options and summary.json", default=Path("benchmarks/results/scheduler/round_digits"))
    ap.add_argument("--easy-only", action="store_true", help="only (re)compute the easy-image comparison from --out's files")
    args = ap.parse_args()
    out = args.out
    if args.easy_only:
        summary = json.loads((out / "summary.json").read_text())
        summary["easy_images"] = _easy(out)
        write_record(out, "summary", summary)
        print(json.dumps(summary["easy_images"], indent=2))
        return
    out.mkdir(parents=True, exist_ok=True)
    p0 = float(stats.norm.cdf(RADIUS / SIGMA))
    env = machine()
    summary = {"settings": {"sigma": SIGMA, "radius": RADIUS, "alpha": ALPHA, "steps": 4, "votes": 3, "n0": 100,
                            "n_max": 2000, "images": "every 9th digits test image (40)", "p0": p0},
               "machine": f"{env['cpu']['arch']}, {env['cpu']['model']}, python {env['python']}",
               "runs": {}}
    for name, extra in RUNS.items():
        tsv = out / f"{name}.tsv"
        for stale in (tsv, Path(f"{tsv}.json")):
            stale.unlink(missing_ok=True)
        cmd = [*cli(), "certify", "--engine", str(args.engine), "--sigma", str(SIGMA), "--steps", "4",
               "--votes", "3", "--n0", "100", "--alpha", str(ALPHA), "--skip", "9", "--seed", "0", "--radius", str(RADIUS),
               "--n-max", "2000", "--quiet", "--out", str(tsv), *extra]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        seconds = time.perf_counter() - t0
        rows = _rows(tsv)
        n = [int(r["n"]) for r in rows]
        evals = [int(r["unet_evals"]) for r in rows]
        certified = [r for r in rows if r["predict"] != "-1" and r["correct"] == "1"]
        ratios = []
        for r in rows:
            if r["predict"] == "-1":
                continue
            p_hat = int(r["n_a"]) / int(r["n"])
            if p_hat > p0:
                ratios.append(int(r["n"]) / (math.log(1 / ALPHA) / _kl(p_hat, p0)))
        summary["runs"][name] = {
            "command": " ".join(cmd[2:]),
            "seconds": round(seconds, 1),
            "certified_accuracy": len(certified) / len(rows),
            "estimation_samples_mean": sum(n) / len(n),
            "estimation_samples_median": sorted(n)[len(n) // 2],
            "certified_images": sum(r["predict"] != "-1" for r in rows),
            "samples_over_lower_bound_mean": sum(ratios) / len(ratios) if ratios else None,
            "unet_evals_per_image_mean": sum(evals) / len(evals),
        }
        print(name, json.dumps(summary["runs"][name]), flush=True)
    summary["easy_images"] = _easy(out)
    write_record(out, "summary", summary)


def _easy(out: Path) -> dict:
    """The images certified with rounds of 32 within the first two rounds (n <= 64): their estimation
    samples and UNet evaluations, rounds of 32 against rounds of 1."""
    a = {r["idx"]: r for r in _rows(out / "continuous_round32.tsv")}
    b = {r["idx"]: r for r in _rows(out / "continuous_round1.tsv")}
    easy = [i for i in a if a[i]["predict"] != "-1" and int(a[i]["n"]) <= 64]

    def mean(rows, key):
        return sum(int(rows[i][key]) for i in easy) / len(easy)

    return {"images": len(easy), "rule": "certified by continuous_round32 with n <= 64",
            "estimation_samples_mean": {"round32": mean(a, "n"), "round1": mean(b, "n")},
            "unet_evals_mean": {"round32": mean(a, "unet_evals"), "round1": mean(b, "unet_evals")},
            "same_predictions_all_images": sum(a[i]["predict"] == b[i]["predict"] for i in a)}


if __name__ == "__main__":
    main()
