"""Peak resident memory of whole certify processes against the memory model of densepure_rt.limits.

Each measurement runs ``densepure-rt certify --steps 1 --votes 1 --n0 1 --n <calls x R> --batch R
--max 1`` under GNU time (``/usr/bin/time -v``, maximum resident set size): one image of
1 + calls x R samples, so the scheduler's step calls hold R rows (``calls`` full calls, then one of a
single row) and the classifier's chunks min(R, 512) rows. Two full calls reach ONNX Runtime's
steady state (the first call at a row count allocates tensor by tensor, the second adds the memory
pattern's block; later calls add nothing: measured with three to five calls).

    python benchmarks/memory_peak.py --engine engines/digits --rows 500 2000 5000 \\
        --out benchmarks/results/memory/certify_peak_rss.json
    python benchmarks/memory_peak.py --engine engines/cifar --data images.npz --rows 16 48 128 \\
        --out benchmarks/results/memory/certify_peak_rss.json    # appends to the same file

Linux only (GNU time).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import add_engine, add_out, machine, parser, read_record, utc_now, write_record

from densepure_rt.files.manifest import load_manifest
from densepure_rt.limits import memory_estimate


def measure(engine: Path, rows: int, calls: int, data: str | None, votes: int, steps: int) -> dict:
    """Peak RSS of one certify process whose step calls hold ``rows`` rows (``rows / votes`` samples x ``votes``)."""
    batch = rows // votes
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["densepure-rt", "certify", "--engine", str(engine), "--sigma", "0.25", "--steps", str(steps), "--votes", str(votes),
               "--n0", "1", "--n", str(calls * batch), "--batch", str(batch), "--max", "1", "--quiet", "--out", os.path.join(tmp, "r.tsv")]
        if data:
            cmd += ["--data", data]
        start = time.time()
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
        return {"rows": rows, "batch": batch, "votes": votes, "steps": steps, "full_calls": calls, "peak_rss_bytes": kb * 1024,
                "seconds": round(time.time() - start, 1), "command": " ".join(cmd).replace(tmp, "$TMP")}


def main() -> None:
    ap = parser(__doc__)
    add_engine(ap)
    ap.add_argument("--data", default=None, help="--data for engines without a default data set")
    ap.add_argument("--rows", type=int, nargs="+", required=True, help="rows per step call (batch x votes)")
    ap.add_argument("--votes", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--calls", type=int, default=2, help="full calls of R rows per process")
    add_out(ap, "JSON file; measurements are appended to its list", metavar="FILE")
    args = ap.parse_args()

    import numpy
    import onnxruntime

    manifest = load_manifest(args.engine)
    weights = sum((args.engine / name).stat().st_size for name in manifest["files"])
    record = read_record(args.out, {"measurements": []})
    env = machine()
    record.update({
        "what": "peak RSS of whole `densepure-rt certify` processes vs densepure_rt.limits.memory_estimate",
        "cpu": env["cpu"]["model"], "cpu_flags": env["cpu"]["flags"], "cores": env["cpu"]["logical_cpus"], "python": env["python"],
        "numpy": numpy.__version__, "onnxruntime": onnxruntime.__version__, "platform": env["platform"],
    })
    for rows in args.rows:
        m = measure(args.engine, rows, args.calls, args.data, args.votes, args.steps)
        estimate = memory_estimate(manifest, rows, weights)
        m.update({"engine": manifest["preset"] + (" --random-weights" if manifest["build"].get("random_weights") else ""),
                  "image_shape": manifest["image_shape"], "weights_bytes": weights,
                  "step_max_elements_per_row": manifest["graphs"]["step"]["max_elements_per_row"],
                  "classifier_max_elements_per_row": manifest["graphs"]["classifier"]["max_elements_per_row"],
                  "predicted_bytes": estimate.total, "error": round(estimate.total / m["peak_rss_bytes"] - 1, 4),
                  "date": utc_now()})
        record["measurements"].append(m)
        print(f"{m['engine']:24s} rows {rows:>6}  predicted {estimate.total / 1e6:8.0f} MB  measured "
              f"{m['peak_rss_bytes'] / 1e6:8.0f} MB  error {m['error']:+.1%}", file=sys.stderr, flush=True)
        write_record(args.out.parent, args.out.stem, record)


if __name__ == "__main__":
    main()
