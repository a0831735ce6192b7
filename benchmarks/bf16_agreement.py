"""OpenVINO bf16 against fp32 on the digits engine, with the same noise: how often the base classifier
changes (voted labels of the same noisy samples) and how often a certificate changes (prediction,
radius of Cohen's CERTIFY on the same samples).

    python benchmarks/bf16_agreement.py --out benchmarks/results/bf16_agreement.json

Builds both engines (``build --model digits --backend openvino --precision fp32|bf16``) into a
temporary folder unless --engine-fp32 / --engine-bf16 name built ones; needs a CPU with BF16.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from densepure_rt.files.data import digits_test_split  # noqa: E402
from densepure_rt.sampling.noise import ESTIMATION  # noqa: E402
from densepure_rt.runtime import open_engine  # noqa: E402


def build(folder: Path, precision: str) -> Path:
    cli = [sys.executable, "-m", "densepure_rt.cli", "build", "--model", "digits", "--backend", "openvino",
           "--precision", precision, "--out", str(folder)]
    subprocess.run(cli, check=True, capture_output=True)
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--engine-fp32")
    ap.add_argument("--engine-bf16")
    ap.add_argument("--images", type=int, default=40, help="every 9th test image, this many")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--votes", type=int, default=3)
    ap.add_argument("--samples", type=int, default=100, help="noisy samples per image for the voted-label share")
    ap.add_argument("--n0", type=int, default=50)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--alpha", type=float, default=0.001)
    args = ap.parse_args(argv)
    data = digits_test_split()
    indices = list(range(0, 9 * args.images, 9))[: args.images]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        f32_dir = Path(args.engine_fp32) if args.engine_fp32 else build(Path(tmp) / "f32", "fp32")
        b16_dir = Path(args.engine_bf16) if args.engine_bf16 else build(Path(tmp) / "b16", "bf16")
        rows = []
        with open_engine(f32_dir, early_exit=False) as f32, open_engine(b16_dir, early_exit=False) as b16:
            for sigma in args.sigmas:
                for e in (f32, b16):
                    e._prepare(sigma, args.steps, args.votes, args.samples)
                same = total = same_pred = same_radius = 0
                for i in indices:
                    image = data[i].image
                    a = f32.loop.voted_labels(image, 0, i, ESTIMATION, range(args.samples))
                    b = b16.loop.voted_labels(image, 0, i, ESTIMATION, range(args.samples))
                    same += int((a == b).sum())
                    total += a.size
                    ca = f32.certify(image, sigma, args.steps, args.votes, args.n0, args.n, args.alpha, image_index=i, batch=args.samples)
                    cb = b16.certify(image, sigma, args.steps, args.votes, args.n0, args.n, args.alpha, image_index=i, batch=args.samples)
                    same_pred += int(ca.prediction == cb.prediction)
                    same_radius += int(ca.prediction == cb.prediction and abs(ca.radius - cb.radius) < 1e-9)
                rows.append({
                    "sigma": sigma,
                    "voted_labels_identical": same, "voted_labels": total, "voted_share": same / total,
                    "predictions_identical": same_pred, "radii_identical": same_radius, "images": len(indices),
                })
                print(json.dumps(rows[-1]), flush=True)
        result = {
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "effective_precision": {"fp32": "fp32", "bf16": "bf16"},
            "seconds": round(time.time() - t0, 1),
            "rows": rows,
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
