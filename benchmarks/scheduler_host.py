"""The scheduler's host bookkeeping per engine call, with the graphs taken out.

    python benchmarks/scheduler_host.py --engine engines/digits --slots 96 960 2000 --votes 3 3 10 \
        --json benchmarks/results/scheduler/host_overhead.json

The digits engine's scheduler with its executor's two graphs and the noise replaced by no-ops
(the step leaves x as it is; the classifier says class 0, so every vote is unanimous and each
sample takes ceil(K/2) runs): what is left is the host's work per call (keys put, scalars gathered,
slots refilled, labels read, votes, deliveries), here on numpy. On a GPU the same Python runs
while the kernels it queued run; it matters only where it approaches a call's device time
(e.g. CIFAR-10 fp16 on an H100: about 0.24 ms per row, benchmarks/results/gpu_h100).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from harness import add_engine, add_out, cpu, parser, write_record

from densepure_rt.runtime import open_engine
from densepure_rt.sampling.noise import ESTIMATION
from densepure_rt.sampling.scheduler import Job, Scheduler, SchedulerStats


class _NoGraphs:
    name, cuda_graph, fixed_rows, classifier_rows = "none", False, True, None

    def __init__(self, inner):
        self.inner = inner

    def reserve(self, rows, image_shape) -> None:
        pass

    def step(self, x, noise, scalars, out) -> None:
        pass

    def classify(self, images, labels, logits) -> None:
        labels[:] = 0

    def close(self) -> None:
        self.inner.close()


class _NoNoise:
    def fill(self, *args, **kwargs) -> None:
        pass


def measure(engine_dir: Path, slots: int, votes: int, samples: int, images: int) -> dict:
    with open_engine(engine_dir) as eng:
        eng._prepare(0.5, 4, votes, max(slots // votes, 1))
        eng.loop.executor = _NoGraphs(eng.loop.executor)
        eng.loop.noise = _NoNoise()
        sch = Scheduler(eng.loop, slots)
        staged = np.zeros((images, *eng.image_shape), np.float32)
        jobs = [Job(i, i, ESTIMATION, samples) for i in range(images)]
        stats = SchedulerStats()
        t0 = time.perf_counter()
        sch.counts(staged, jobs, seed=0, stats=stats)
        seconds = time.perf_counter() - t0
    return {"slots": slots, "votes": votes, "calls": stats.calls, "unet_evals": stats.unet_evals,
            "ms_per_call": round(1e3 * seconds / stats.calls, 3), "us_per_row_eval": round(1e6 * seconds / stats.unet_evals, 3)}


def main() -> None:
    ap = parser(__doc__)
    add_engine(ap)
    ap.add_argument("--slots", type=int, nargs="+", default=[96, 960, 2000])
    ap.add_argument("--votes", type=int, nargs="+", default=[3, 3, 10])
    ap.add_argument("--samples", type=int, default=2000, help="noisy samples per image")
    ap.add_argument("--images", type=int, default=4)
    add_out(ap, "the JSON record", flag="--json", metavar="FILE", required=False)
    args = ap.parse_args()
    if len(args.votes) != len(args.slots):
        raise SystemExit("give one --votes per --slots")
    rows = [measure(args.engine, s, k, args.samples, args.images) for s, k in zip(args.slots, args.votes)]
    result = {"machine": cpu()["model"], "engine": str(args.engine), "samples": args.samples,
              "images": args.images, "rows": rows}
    for r in rows:
        print(f"{r['slots']} rows, K {r['votes']}: {r['calls']} calls, {r['ms_per_call']} ms per call, "
              f"{r['us_per_row_eval']} us per row evaluation")
    if args.json:
        write_record(args.json.parent, args.json.stem, result)


if __name__ == "__main__":
    main()
