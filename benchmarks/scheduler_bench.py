"""Wave loop against the continuous-batching scheduler on one engine, same run, alternating pairs.

    python benchmarks/scheduler_bench.py --engine engines/digits --images 8 --votes 3 --steps 4 \
        --n0 100 --n 500 --batch 32 --pairs 3 --json benchmarks/results/scheduler/digits_k3.json

Fixed-n CERTIFY of the first ``--images`` digits test images (the digits experiment's settings by
default): for each scheduling, the wall time of ``certify_many_counts`` over all images (median of
``--pairs`` runs, the two schedulings alternating so that machine load hits both alike), the
UNet evaluations, and for the scheduler its calls and idle-row fraction. The counts must be equal
(checked): only the time differs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

from densepure_rt.files.data import DIGITS_TEST_ASSET
from densepure_rt.runtime import open_engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", required=True)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--steps", default="4")
    parser.add_argument("--votes", type=int, default=3)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    data = np.load(DIGITS_TEST_ASSET)
    images = data["images"][:: 9][: args.images].astype(np.float32)
    if images.ndim == 3:
        images = images[:, None]
    if images.max() > 1.5:
        images = images / 255.0
    times: dict[str, list[float]] = {"waves": [], "continuous": []}
    evals, counts = {}, {}
    for _ in range(args.pairs):
        for scheduling in ("waves", "continuous"):
            with open_engine(args.engine, scheduling=scheduling) as engine:
                engine._prepare(args.sigma, args.steps, args.votes, args.batch)  # sessions warm, outside the timing
                t0 = time.perf_counter()
                pairs = engine.certify_many_counts(list(images), args.sigma, args.steps, args.votes, args.n0, args.n, 0.001,
                                                   batch=args.batch)
                times[scheduling].append(time.perf_counter() - t0)
            evals[scheduling] = sum(c.unet_evals for _, c in pairs)
            counts[scheduling] = [c.counts.tolist() for _, c in pairs]
    if counts["waves"] != counts["continuous"] or evals["waves"] != evals["continuous"]:
        raise SystemExit("the schedulings disagree: a bug")
    result = {
        "engine": args.engine, "images": args.images, "sigma": args.sigma, "steps": args.steps, "votes": args.votes,
        "n0": args.n0, "n": args.n, "batch": args.batch, "pairs": args.pairs, "machine": platform.processor() or platform.machine(),
        "seconds": {k: [round(t, 2) for t in v] for k, v in times.items()},
        "median_seconds": {k: round(statistics.median(v), 2) for k, v in times.items()},
        "unet_evals": evals["continuous"],
        "speedup": round(statistics.median(times["waves"]) / statistics.median(times["continuous"]), 3),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
