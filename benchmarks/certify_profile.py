"""Where the time of a CPU certify run goes: engine calls (the step and classifier graphs) against
host work (scheduler, noise, votes, statistics).

One certify run on the shipped digits engine (``densepure_rt/assets/engines/digits``, fp32, ONNX
Runtime) through ``Engine.stream``, the path of ``densepure-rt certify``, with cpu_bench.py's digits
settings: sigma 0.5, b = 4 steps, K = 3 votes, n0 20, n 100, alpha 0.001, seed 0, batch 40, digits
test images 0 .. --images - 1. The engine's executor methods ``step`` and ``classify`` and the noise
source's ``fill`` are wrapped with timers: wall seconds (perf_counter) and process CPU seconds
(process_time, all threads) inside each, their calls and rows. Host work is the run's wall time
less the time inside the two graphs; the noise fill is a part of it. Process CPU seconds count
ONNX Runtime's pool threads too, so a host part with more CPU than wall seconds holds pool threads
spinning after a graph call returned (``session.intra_op.allow_spinning``).

A warm-up certify (one image, n0 = n = batch, seed 99) runs first and is not counted: ONNX Runtime's
first-run allocations are no part of a run's steady cost. Early exit is on, as in the CLI;
``--all-runs`` runs all K runs of every noisy sample (cpu_bench.py's setting). ``--engine`` takes
another built digits engine, e.g. one for OpenVINO (``densepure-rt build --model digits --backend
openvino --out DIR``): the per-image vote counts of two records then say whether the two backends
vote alike.

The measurement (on an otherwise idle machine; about 1 minute on 2 cores):

    python benchmarks/certify_profile.py --out benchmarks/results/certify_profile

Writes DIR/certify_profile.json (all numbers, per-image certificates and vote counts) and
DIR/certify_profile.md (the table, also printed).
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

from harness import ROOT, add_out, command, markdown_table, parser, utc_now, write_record

ENGINE = ROOT / "densepure_rt" / "assets" / "engines" / "digits"
#: cpu_bench.py's digits benchmark (benchmarks/results/cpu_digits.json).
SETTINGS = {"sigma": 0.5, "steps": "4", "votes": 3, "n0": 20, "n": 100, "alpha": 0.001, "seed": 0, "batch": 40}


class Timed:
    """Wall and process CPU seconds, calls and rows of the calls of one method."""

    def __init__(self):
        self.wall = self.cpu = 0.0
        self.calls = self.rows = 0

    def wrap(self, method):
        @functools.wraps(method)
        def timed(first, *args):
            w, c = time.perf_counter(), time.process_time()
            try:
                return method(first, *args)
            finally:
                self.wall += time.perf_counter() - w
                self.cpu += time.process_time() - c
                self.calls += 1
                self.rows += int(first.shape[0])

        return timed

    def as_dict(self) -> dict:
        return {"wall_s": self.wall, "cpu_s": self.cpu, "calls": self.calls, "rows": self.rows,
                "rows_per_call": self.rows / self.calls if self.calls else 0.0}


def profile(engine_dir: Path, images: int, threads: int | None, early_exit: bool) -> dict:
    from densepure_rt.files.data import digits_test_split
    from densepure_rt.runtime import open_engine
    from densepure_rt.spec import RunSpec

    data = digits_test_split()
    spec = RunSpec("certify", early_exit=early_exit, **SETTINGS)
    warm = RunSpec("certify", early_exit=early_exit, **{**SETTINGS, "n0": SETTINGS["batch"], "n": SETTINGS["batch"], "seed": 99})
    outcomes = []
    with open_engine(engine_dir, threads=threads, early_exit=early_exit) as eng:
        eng.stream(warm, [(0, data[0].image)], lambda s: None, images=1)
        executor, noise = eng.loop.executor, eng.loop.noise
        parts = {"step": Timed(), "classify": Timed(), "noise fill": Timed()}
        executor.step = parts["step"].wrap(executor.step)  # instance attributes: the scheduler looks them up per call
        executor.classify = parts["classify"].wrap(executor.classify)
        noise.fill = parts["noise fill"].wrap(noise.fill)
        w, c = time.perf_counter(), time.process_time()
        stats = eng.stream(spec, ((i, data[i].image) for i in range(images)), outcomes.append, images=images)
        wall, cpu = time.perf_counter() - w, time.process_time() - c
        backend = {"name": executor.name, "version": getattr(executor, "version", None),
                   "providers": getattr(executor, "providers", None),
                   "precision": getattr(executor, "effective_precision", None)}
    parts = {k: p.as_dict() for k, p in parts.items()}
    engine_wall = parts["step"]["wall_s"] + parts["classify"]["wall_s"]
    engine_cpu = parts["step"]["cpu_s"] + parts["classify"]["cpu_s"]
    parts["host (the rest)"] = {"wall_s": wall - engine_wall, "cpu_s": cpu - engine_cpu}
    parts["total"] = {"wall_s": wall, "cpu_s": cpu}
    for p in parts.values():
        p["share_of_wall"] = p["wall_s"] / wall
    labels = {i: data[i].label for i in range(images)}
    per_image = []
    for s in sorted(outcomes, key=lambda s: s.idx):
        cert, counts = s.result
        per_image.append({"index": s.idx, "label": labels[s.idx], "prediction": cert.prediction, "radius": cert.radius,
                          "c_a": cert.c_a, "n_a": cert.n_a, "counts0": counts.counts0.tolist(), "counts": counts.counts.tolist(),
                          "unet_evals": s.unet_evals})
    return {"parts": parts, "unet_evals": stats.unet_evals, "classifier_evals": stats.classifier_evals,
            "scheduler": {"slots": stats.slots, "step_calls": stats.calls, "busy_rows": stats.busy_rows,
                          "idle_rows": stats.idle_rows, "classifier_calls": stats.classifier_calls},
            "noisy_samples_per_s": images * (SETTINGS["n0"] + SETTINGS["n"]) / wall, "backend": backend,
            "images": per_image}


def markdown(record: dict) -> str:
    cfg, b = record["config"], record["backend"]
    lines = [f"# Certify profile: digits engine, {cfg['images']} images, {cfg['threads'] or 'default'} threads", "",
             f"sigma {cfg['sigma']}, b = {cfg['steps']}, K = {cfg['votes']}, n0 {cfg['n0']}, n {cfg['n']}, alpha {cfg['alpha']}, "
             f"batch {cfg['batch']}, early exit {'on' if cfg['early_exit'] else 'off'}; {b['name']} {b['version']} {b['precision']}; "
             f"{record['noisy_samples_per_s']:.1f} noisy samples/s; 1-minute load average before / after "
             f"{record['load_average_1min']['before']:.2f} / {record['load_average_1min']['after']:.2f} (should be near 0).", ""]
    rows = []
    for name, p in record["parts"].items():
        calls = [p["calls"], f"{p['rows_per_call']:.1f}"] if "calls" in p else ["", ""]
        rows.append([name, *calls, f"{p['wall_s']:.3f}", f"{100 * p['share_of_wall']:.1f}%", f"{p['cpu_s']:.3f}"])
    lines += markdown_table(["part", "calls", "rows / call", "wall s", "share of wall", "process CPU s"], rows, align="lrrrrr")
    lines += ["", "host (the rest) = total - step - classify; noise fill is a part of it."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = parser(__doc__)
    add_out(ap, "writes DIR/certify_profile.json and .md")
    ap.add_argument("--engine", type=Path, default=ENGINE, metavar="DIR", help=f"engine folder (default: {ENGINE})")
    ap.add_argument("--images", type=int, default=4, help="digits test images 0 .. IMAGES-1 (default 4)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (0: the backend's choice)")
    ap.add_argument("--all-runs", action="store_true", help="early exit off: all K runs of every noisy sample")
    args = ap.parse_args(argv)
    threads = args.threads or None
    load = os.getloadavg()[0]
    result = profile(args.engine, args.images, threads, early_exit=not args.all_runs)
    record = {"benchmark": "certify_profile", "command": command(argv), "date": utc_now(), "engine": str(args.engine),
              "config": {**SETTINGS, "images": args.images, "threads": threads, "early_exit": not args.all_runs},
              **result, "load_average_1min": {"before": load, "after": os.getloadavg()[0]}}
    text = markdown(record)
    write_record(args.out, "certify_profile", record, markdown=text)
    print(text)
    return record


if __name__ == "__main__":
    main()
