"""OpenVINO bf16 against fp32 on the digits engine, with the same noise: how often the base classifier
changes (voted labels of the same noisy samples) and how often a certificate changes (prediction,
radius of Cohen's CERTIFY on the same samples).

    python benchmarks/bf16_agreement.py --out benchmarks/results/bf16_agreement.json

Builds both engines (``build --model digits --backend openvino --precision fp32|bf16``) into a
temporary folder unless --engine-fp32 / --engine-bf16 name built ones; needs a CPU with BF16.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from harness import add_out, build_engine, parser, write_record

from densepure_rt.files.data import digits_test_split
from densepure_rt.runtime import open_engine
from densepure_rt.sampling.noise import ESTIMATION


def build(folder: Path, precision: str) -> Path:
    return build_engine(folder, "--model", "digits", "--backend", "openvino", "--precision", precision)


def main(argv=None) -> int:
    ap = parser(__doc__)
    add_out(ap, "the JSON record", metavar="FILE")
    ap.add_argument("--engine-fp32", metavar="DIR", help="a built fp32 OpenVINO digits engine to reuse")
    ap.add_argument("--engine-bf16", metavar="DIR", help="a built bf16 OpenVINO digits engine to reuse")
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
    write_record(args.out.parent, args.out.stem, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
