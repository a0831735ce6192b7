"""Fixed-n CERTIFY against the anytime-valid modes on the digits engine: accuracy and UNet evaluations.

Runs the CLI (so the numbers are what a user gets) on every 9th digits test image (40 images) at
sigma 0.5, b = 4 steps, K = 3 votes, n0 = 100, alpha = 0.001, seed 0:

- fixed n = 2000 (Cohen et al.'s CERTIFY);
- ``--radius R`` for each target R in (0.25, 0.5, 1, 1.5) x sigma alone, and all four at once;
- ``--tol 0.05`` (stop when the radius would grow by less than 0.05 = 0.1 sigma per doubling);
the sequential modes with ``--n-max 2000``, the fixed run's n, so every mode has the same budget.
All modes use the exact early exit of the K-run vote (identical votes), and the sequential modes
the exact early exit of the selection phase (identical c_a); the fixed run's UNet evaluations
without them, i.e. the published method's cost, are (n0 + n) K b per image exactly.

Writes ``benchmarks/results/sample_efficiency/`` (the TSVs with their options, ``summary.json``,
``summary.md``). Usage: ``python benchmarks/sample_efficiency.py [--engine engines/digits]``.
Takes about 40 minutes on a 2-core CPU (the fixed-n run is most of it).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "sample_efficiency"
SIGMA, STEPS, VOTES, N0, N, ALPHA = 0.5, 4, 3, 100, 2000, 0.001
MULTIPLES = (0.25, 0.5, 1.0, 1.5)
COMMON = ["--sigma", SIGMA, "--steps", STEPS, "--votes", VOTES, "--n0", N0, "--alpha", ALPHA, "--skip", 9, "--seed", 0, "--quiet"]


def cli() -> list[str]:
    script = Path(sys.executable).with_name("densepure-rt")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "densepure_rt.cli"]


def _cpu() -> dict:
    """The CPU model and the flags that matter for CPU inference speed (DESIGN section 5)."""
    info = {"machine": platform.machine(), "model": None, "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and info["model"] is None:
            info["model"] = value.strip()
        if key.strip() == "flags":
            wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
            info["flags"] = [f for f in value.split() if f in wanted]
            break
    return info


def _seconds(text: str) -> float:
    """Cohen's time column (str(timedelta), e.g. 0:01:02.5) in seconds."""
    h, m, sec = text.split(":")
    return 3600 * int(h) + 60 * int(m) + float(sec)


def run(name: str, engine: str, extra: list) -> dict:
    out = OUT / f"{name}.tsv"
    args = cli() + ["certify", "--engine", engine, *map(str, COMMON), *map(str, extra), "--out", str(out.relative_to(ROOT))]
    print("$ densepure-rt", " ".join(shlex.quote(a) for a in args[len(cli()) :]), flush=True)
    subprocess.run(args, check=True, cwd=ROOT)  # an existing complete file of the same settings is reused
    lines = out.read_text().splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"))) for line in lines[1:]]
    correct = np.array([r["correct"] == "1" for r in rows])
    radius = np.array([float(r["radius"]) for r in rows])
    evals = np.array([int(r["unet_evals"]) for r in rows])
    samples = np.array([N0 + int(r["n"]) if "n" in r else N0 + N for r in rows])
    return {
        "name": name,
        "args": [str(a) for a in extra],
        "images": len(rows),
        "certified_accuracy": {f"{m:g}sigma": float(np.mean(correct & (radius >= m * SIGMA))) for m in MULTIPLES},
        "unet_evals_per_image": float(evals.mean()),
        "unet_evals_median": float(np.median(evals)),
        "images_at_budget": int(sum(int(r.get("n", 0)) == N for r in rows)) if "n" in header else None,
        "samples_per_image": float(samples.mean()),
        "image_seconds": round(sum(_seconds(r["time"]) for r in rows), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="engines/digits")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    results = [run("fixed_n2000", args.engine, ["--n", N])]
    for m in MULTIPLES:
        results.append(run(f"radius_{m:g}sigma", args.engine, ["--radius", m * SIGMA, "--n-max", N]))
    all_targets = [x for m in MULTIPLES for x in ("--radius", m * SIGMA)]
    results.append(run("radius_all", args.engine, [*all_targets, "--n-max", N]))
    results.append(run("tol_0.05", args.engine, ["--tol", 0.05, "--n-max", N]))
    full_vote = (N0 + N) * VOTES * STEPS
    summary = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": _cpu(),
        "settings": {"sigma": SIGMA, "steps": STEPS, "votes": VOTES, "n0": N0, "n": N, "alpha": ALPHA, "images": "every 9th digits test image"},
        "fixed_n_unet_evals_without_early_exit": full_vote,
        "runs": results,
    }
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    head = (
        "| mode | " + " | ".join(f"r = {m:g} sigma" for m in MULTIPLES)
        + " | n0 + n per image | UNet evals / image: mean (median) | fewer than fixed n = 2000, full vote: mean (median) |"
    )
    lines = [head, "|" + " --- |" * (len(MULTIPLES) + 4)]
    for r in results:
        # A single-target run answers only for its own radius: other columns are not its question.
        only = r["name"][len("radius_"):] if r["name"].startswith("radius_") and r["name"] != "radius_all" else None
        acc = " | ".join(f"{100 * v:.1f}%" if only in (None, key) else "-" for key, v in r["certified_accuracy"].items())
        lines.append(
            f"| {r['name']} | {acc} | {r['samples_per_image']:.0f} | {r['unet_evals_per_image']:.0f} ({r['unet_evals_median']:.0f}) | "
            f"{full_vote / r['unet_evals_per_image']:.1f}x ({full_vote / r['unet_evals_median']:.1f}x) |"
        )
    (OUT / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
