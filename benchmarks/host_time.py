"""Host time per noisy sample of fixed-n CERTIFY, ``--radius`` and ``--tol``, with no model work.

    python benchmarks/host_time.py --engine engines/digits --images 1500 \
        --json benchmarks/results/host_time/host_time.json

The digits engine streamed through :meth:`densepure_rt.runtime.Engine.stream` (the path of the
command line: one scheduler run for every image, rows delivered in sample order, rounds of one
vote in the sequential modes) with ``steps="none"`` (no reverse step: a run's image is x_{t*}
itself) and its classifier replaced by a threshold on x_{t*} (:class:`Threshold`), so that no
network runs and what is timed is the host's work: admission, keys and noise, the vote, deliveries,
and the statistics after every vote (the sequential tests' updates and look-aheads). On a GPU this
host time is the device idling.

Votes of known probability: image i is the constant ``0.5 + c_i``; the classifier says class 0
when the first pixel row of x_{t*} sums above 0, else class 1. That row is
``scale * 2 * (c_i + delta)`` per pixel with delta ~ N(0, sigma^2), so p_A = Phi(c_i sqrt(W) / sigma)
exactly (W the row's width). The images cycle through the p_A of ``--p-a``. Settings: sigma 0.5,
K = 1, n0 = 100, n = n_max = ``--n``, alpha 0.05, ``--radius 0.25`` (0.5 sigma), ``--tol 0.05``.

Per mode: CPU seconds of this process for the whole stream (``time.process_time``: the host work,
less sensitive than wall time to other processes on a shared machine; wall seconds are recorded
too), noisy samples drawn (selection and estimation, of every image), CPU microseconds per sample,
and the ratio to fixed-n CERTIFY's. The modes run interleaved ``--repeats`` times: the fastest
repeat of each mode is the figure (``us_per_sample``: the least disturbed by other processes on a
shared machine), the median is recorded beside it.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
from scipy import special

from harness import ROOT, add_engine, add_out, command, machine, parser, utc_now, write_record

from densepure_rt.runtime import open_engine

SIGMA, ALPHA, N0, RADIUS, TOL = 0.5, 0.05, 100, 0.25, 0.05
MODES = ("certify", "certify-radii", "certify-until")


class Threshold:
    """A classifier graph with known p_A (see the module doc); no step graph runs (``steps="none"``)."""

    name, cuda_graph, fixed_rows, classifier_rows = "threshold", False, False, None

    def __init__(self, inner):
        self.inner = inner

    def reserve(self, rows, image_shape) -> None:
        pass

    def step(self, x, noise, scalars, out) -> None:  # never called with steps="none"
        raise AssertionError("no step graph runs with steps='none'")

    def classify(self, images, labels, logits) -> None:
        labels[:] = (images[:, 0, 0, :].sum(axis=1) <= 0).astype(np.int64)
        logits[:] = 0

    def close(self) -> None:
        self.inner.close()


def images_for(p_a: list[float], count: int, shape) -> tuple[np.ndarray, np.ndarray]:
    """``count`` constant images cycling through ``p_a``: [count x C x H x W] float32 and their p_A."""
    width = shape[-1]
    p = np.resize(np.asarray(p_a, dtype=np.float64), count)
    c = special.ndtri(p) * SIGMA / np.sqrt(width)
    images = (0.5 + c[:, None, None, None] * np.ones((1, *shape))).astype(np.float32)
    return images, p


def run_mode(eng, mode: str, images: np.ndarray, n: int, batch: int) -> dict:
    """One stream of every image in ``mode``: wall seconds, samples drawn, certified count."""
    outcomes = []
    extra = {"certify-radii": dict(radii=[RADIUS]), "certify-until": dict(tol=TOL)}.get(mode, {})
    t0, c0 = time.perf_counter(), time.process_time()
    eng.stream(mode, enumerate(images), outcomes.append, sigma=SIGMA, steps="none", votes=1, n0=N0, n=n, alpha=ALPHA,
               seed=0, batch=batch, **extra)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    samples = sum(o.samples for o in outcomes)
    if mode == "certify":
        certified = sum(o.result[0].prediction == 0 for o in outcomes)
        samples = len(outcomes) * (N0 + n)  # every sample of both phases is drawn
    else:
        certified = sum(o.result.prediction == 0 for o in outcomes)
    return {"seconds": seconds, "cpu_seconds": cpu, "samples": int(samples), "images": len(outcomes), "certified": int(certified)}


def main() -> None:
    ap = parser(__doc__)
    add_engine(ap)
    ap.add_argument("--images", type=int, default=1500)
    ap.add_argument("--n", type=int, default=1000, help="n of fixed-n CERTIFY and n_max of the sequential modes")
    ap.add_argument("--p-a", type=float, nargs="+", default=[0.7, 0.8, 0.9, 0.99, 0.999])
    ap.add_argument("--batch", type=int, default=None, help="rows per call (default: the engine's default batch)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reference", action="store_true",
                    help="the sequential tests of tests/sequential_reference.py (before their per-vote fast paths)")
    add_out(ap, "the JSON record", flag="--json", metavar="FILE", required=False)
    args = ap.parse_args()
    if args.reference:
        sys.path.insert(0, str(ROOT / "tests"))
        import sequential_reference

        from densepure_rt.stats import sequential

        sequential.TargetRadiiTest = sequential_reference.TargetRadiiTest
        sequential.EarlyStopRadius = sequential_reference.EarlyStopRadius

    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    with open_engine(args.engine) as eng:
        eng.loop.executor = Threshold(eng.loop.executor)
        batch = args.batch or eng.manifest.default_batch
        images, p = images_for(args.p_a, args.images, eng.image_shape)
        for r in range(args.repeats):
            for mode in MODES:
                runs[mode].append(run_mode(eng, mode, images, args.n, batch))
                last = runs[mode][-1]
                print(f"repeat {r} {mode:14s} {last['cpu_seconds']:7.2f} s  {last['samples']:9d} samples  "
                      f"{1e6 * last['cpu_seconds'] / last['samples']:7.1f} us/sample  certified {last['certified']}",
                      file=sys.stderr)
    summary = {}
    for mode in MODES:
        us = [1e6 * r["cpu_seconds"] / r["samples"] for r in runs[mode]]
        summary[mode] = {"us_per_sample": round(min(us), 2), "us_per_sample_median": round(statistics.median(us), 2),
                         "us_per_sample_repeats": [round(u, 2) for u in us],
                         "samples": runs[mode][0]["samples"], "samples_per_image": round(runs[mode][0]["samples"] / args.images, 1),
                         "certified": runs[mode][0]["certified"], "cpu_seconds": [round(r["cpu_seconds"], 2) for r in runs[mode]],
                         "wall_seconds": [round(r["seconds"], 2) for r in runs[mode]]}
    for mode in MODES[1:]:
        summary[mode]["ratio_to_fixed"] = round(summary[mode]["us_per_sample"] / summary["certify"]["us_per_sample"], 2)
        summary[mode]["ratio_to_fixed_median"] = round(summary[mode]["us_per_sample_median"] / summary["certify"]["us_per_sample_median"], 2)
    env = machine()
    record = {
        "command": command(),
        "date": utc_now(),
        "cpu": env["cpu"]["model"], "cpu_count": env["cpu"]["logical_cpus"], "python": env["python"], "numpy": np.__version__,
        "sequential_tests": "tests/sequential_reference.py" if args.reference else "densepure_rt/stats/sequential.py",
        "settings": {"sigma": SIGMA, "alpha": ALPHA, "votes": 1, "steps": "none", "n0": N0, "n": args.n,
                     "radius": RADIUS, "tol": TOL, "images": args.images, "p_a_cycle": args.p_a, "batch": batch,
                     "round": 1},
        "modes": summary,
    }
    print(json.dumps(record["modes"], indent=1))
    if args.json:
        write_record(args.json.parent, args.json.stem, record)


if __name__ == "__main__":
    main()
