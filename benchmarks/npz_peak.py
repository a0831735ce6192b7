"""Peak resident memory of selecting a few images from a large ``.npz`` (densepure_rt.files.data).

Writes (once) two archives of 10,000 uint8 images of 3 x 224 x 224 (1.5 GB of pixels: 28 x 28 random
blocks upsampled 8x, so they also compress) with ``numpy.savez`` and ``numpy.savez_compressed``, then
in a fresh process per archive opens it, validates every 1000th image (10 images, the data identity
of a run) and reads each, and reports the process's maximum resident set size.

    python benchmarks/npz_peak.py --folder /tmp/npz --out benchmarks/results/memory/npz_select.json
    # another version of the package: PYTHONPATH=<its checkout> python benchmarks/npz_peak.py ... --label before
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from harness import add_out, machine, parser, read_record, utc_now, write_record

CHILD = r"""
import json, resource, sys, time
start = time.time()
import densepure_rt.files.data as data
path = sys.argv[1]
ds = data.open_dataset(path, image_size=224, channels=3, num_classes=10)
chosen = data.select(len(ds), skip=1000)
digest = ds.validate(chosen)
total = sum(float(ds[i].image.sum()) for i in chosen)
print(json.dumps({"package": data.__file__, "images": len(chosen), "data_sha256": digest, "pixel_sum": total,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "seconds": round(time.time() - start, 2)}))
"""


def write_archives(folder: Path) -> dict[str, Path]:
    import numpy as np

    paths = {"savez": folder / "stored.npz", "savez_compressed": folder / "deflated.npz"}
    if all(p.exists() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (10_000, 3, 28, 28), dtype=np.uint8)
    images = np.repeat(np.repeat(blocks, 8, axis=2), 8, axis=3)
    labels = rng.integers(0, 10, 10_000)
    np.savez(paths["savez"], images=images, labels=labels)
    np.savez_compressed(paths["savez_compressed"], images=images, labels=labels)
    return paths


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--folder", type=Path, required=True, metavar="DIR", help="where the archives are written (not committed)")
    add_out(ap, "JSON file; results are appended to its list", metavar="FILE")
    ap.add_argument("--label", default="this checkout")
    args = ap.parse_args()
    import numpy

    record = read_record(args.out, {"measurements": []})
    env = machine()
    record.update({"what": "peak RSS of selecting 10 of 10,000 uint8 3x224x224 images from an .npz (open, validate, read)",
                   "cpu": env["cpu"]["model"], "cpu_flags": env["cpu"]["flags"], "cores": env["cpu"]["logical_cpus"],
                   "python": env["python"], "numpy": numpy.__version__, "platform": env["platform"]})
    for kind, path in write_archives(args.folder).items():
        proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True)
        result = json.loads(proc.stdout)
        result.update({"label": args.label, "archive": kind, "archive_bytes": os.path.getsize(path),
                       "pythonpath": os.environ.get("PYTHONPATH", ""), "date": utc_now()})
        record["measurements"].append(result)
        print(f"{args.label:14s} {kind:17s} peak {result['peak_rss_bytes'] / 2**20:7.1f} MiB  {result['seconds']} s", file=sys.stderr)
    write_record(args.out.parent, args.out.stem, record)


if __name__ == "__main__":
    main()
