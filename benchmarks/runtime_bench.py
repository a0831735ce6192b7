"""Time the lean runtime (the scheduler: CuPy + ONNX Runtime CUDA on a GPU, numpy + ORT CPU on a CPU).

For each engine directory and batch size: noisy samples per second, UNet (denoise-step) evaluations
per second per row, ms per UNet evaluation per row, the multiple of the FLOP floor (the engine's
counted GFLOP at 989 TFLOP/s, docs/design.md section 6) and images per hour at the published settings
((n0 + n) noisy samples of K runs of b steps), with the vote's early exit off (every run, the cost
the PyTorch paths of ``gpu_bench.py`` are timed at) and on.

    python benchmarks/runtime_bench.py --engine engines/cifar10-rand16 --device cuda --batch 64 200 --out DIR
    python benchmarks/runtime_bench.py --engine engines/digits --device cpu --batch 32 --out /tmp/rb  # CPU

Every row reports the scheduler's idle-row fraction and the time spent in the step
graph and in the classifier separately (:class:`TimedExecutor`: host clocks around each call on the
CPU, where calls are synchronous; CUDA events on the device's stream on a GPU, read once at the
end. The GPU path has not been run by this project.) and UNet evaluations per noisy sample.

Writes ``runtime_<device>.json`` and ``runtime_<device>.md`` into ``--out`` after every
configuration and prints the table last. Inputs: the first images of the engine's default data
set where it has one, else uniform random images (never zeros).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from harness import add_engine, add_out, command, machine, markdown_table, parser, read_record, write_record

from densepure_rt.presets import get_preset
from densepure_rt.runtime import open_engine
from densepure_rt.sampling.noise import ESTIMATION

PEAK_TFLOPS = 989.0


class TimedExecutor:
    """An executor whose step and classify calls are timed: ``seconds["step"]``, ``seconds["classify"]``
    after :meth:`totals`. On the CPU (numpy buffers) host clocks around each call; with CuPy buffers
    CUDA events recorded on the current stream around each call (no synchronisation in between; the
    elapsed times are read at :meth:`totals`). Everything else is the wrapped executor's."""

    def __init__(self, inner, xp):
        self._inner, self._xp = inner, xp
        self._gpu = xp.__name__ == "cupy"
        self._events = {"step": [], "classify": []}
        self._host = {"step": 0.0, "classify": 0.0}

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def _timed(self, what, fn, *args):
        if self._gpu:
            start, end = self._xp.cuda.Event(), self._xp.cuda.Event()
            start.record()
            fn(*args)
            end.record()
            self._events[what].append((start, end))
        else:
            t0 = time.perf_counter()
            fn(*args)
            self._host[what] += time.perf_counter() - t0

    def step(self, x, noise, scalars, out):
        self._timed("step", self._inner.step, x, noise, scalars, out)

    def classify(self, images, labels, logits):
        self._timed("classify", self._inner.classify, images, labels, logits)

    def reset(self) -> None:
        self._events = {"step": [], "classify": []}
        self._host = {"step": 0.0, "classify": 0.0}

    def totals(self) -> dict:
        if not self._gpu:
            return dict(self._host)
        out = {}
        for what, pairs in self._events.items():
            if pairs:
                pairs[-1][1].synchronize()
            out[what] = sum(self._xp.cuda.get_elapsed_time(a, b) for a, b in pairs) / 1e3
        return out


def published(preset: str) -> dict:
    p = get_preset(preset).published or {}
    return {"n0": p.get("n0", 100), "n": p.get("n", 10000)}


def time_config(engine_dir: Path, device: str, batch: int, sigma: float, steps: int, votes: int, early_exit: bool,
                seconds: float, seed: int, cuda_graph: bool = True, kernels: str = "portable",
                cudnn_search: str | None = None) -> dict:
    from densepure_rt.sampling.scheduler import SchedulerStats

    # The provider reads the cuDNN search mode when the sessions are made (densepure_rt/executors/onnxrt.py).
    os.environ.pop("DENSEPURE_ORT_CUDNN_SEARCH", None)
    if cudnn_search:
        os.environ["DENSEPURE_ORT_CUDNN_SEARCH"] = cudnn_search
    with open_engine(engine_dir, device=device, early_exit=early_exit, cuda_graph=cuda_graph, kernels=kernels) as engine:
        shape = engine.image_shape
        image = np.random.default_rng(seed).uniform(0.05, 0.95, size=shape).astype(np.float32)
        timed = engine.loop.executor = TimedExecutor(engine.loop.executor, engine.loop.xp)
        engine._prepare(sigma, steps, votes, batch)
        idle = {"busy": 0, "idle": 0}

        def one(seed_, index):
            st = SchedulerStats()
            staged = engine.loop.device.stage(image[None])
            from densepure_rt.sampling.scheduler import Job

            engine.scheduler().counts(staged, [Job(0, index, ESTIMATION, batch)], seed_, stats=st)
            idle["busy"] += st.busy_rows
            idle["idle"] += st.idle_rows

        # Warm-up: sessions, cuDNN autotuning, the kernel's compilation, the arena, every shape.
        w0 = time.perf_counter()
        one(seed, 0)
        warmup = time.perf_counter() - w0  # the first batch: where cuDNN's algorithm search is paid
        one(seed + 10_000, 0)
        timed.reset()
        idle.update(busy=0, idle=0)
        evals0, samples, batches = engine.loop.unet_evals, 0, 0
        t0 = time.perf_counter()
        while True:
            one(seed + 1 + batches, 1)
            samples += batch
            batches += 1
            elapsed = time.perf_counter() - t0  # the counts read the labels back: the GPU is done
            if elapsed >= seconds and batches >= 3:
                break
        evals = engine.loop.unet_evals - evals0
        split = timed.totals()
        manifest = engine.manifest
        executor = timed._inner
        info = {
            "providers": getattr(executor, "providers", None),
            "ort_cuda_graph": bool(getattr(executor, "cuda_graph", False)),
            "ort_cuda_graph_off": getattr(executor, "cuda_graph_off", None),
            "scheduling": "continuous",
            "kernels": kernels,
            "cudnn_search": cudnn_search or "onnxruntime default (EXHAUSTIVE)",
            "warmup_seconds": round(warmup, 2),
            "step_seconds": round(split["step"], 4),
            "classifier_seconds": round(split["classify"], 4),
            "ms_per_unet_eval_row_step_only": 1e3 * split["step"] / max(1, evals),
            "idle_row_fraction": idle["idle"] / max(1, idle["busy"] + idle["idle"]),
        }
    calls = evals / max(1, samples)  # UNet evaluations per noisy sample (K * b without early exit)
    unet_gflop = float(manifest["cost_gflop"]["unet"])
    cls_gflop = float(manifest["cost_gflop"]["classifier"])
    pub = published(manifest["preset"])
    s_per_sample = elapsed / samples
    floor_per_sample = (votes * steps * unet_gflop + votes * cls_gflop) / (PEAK_TFLOPS * 1e3)
    return {
        "engine": str(engine_dir),
        "preset": manifest["preset"],
        "precision": manifest["precision"]["step"],
        "device": device,
        "batch": batch,
        "rows": batch * votes,
        "early_exit": early_exit,
        "sigma": sigma,
        "steps": steps,
        "votes": votes,
        "batches": batches,
        "seconds": round(elapsed, 3),
        "noisy_samples_per_s": samples / elapsed,
        "unet_evals_per_s": evals / elapsed,
        "unet_evals_per_sample": calls,
        "ms_per_unet_eval_row": 1e3 * elapsed / max(1, evals),
        "floor_multiple": s_per_sample / floor_per_sample,
        "gpu_s_per_image_published": s_per_sample * (pub["n0"] + pub["n"]),
        "images_per_hour_published": 3600.0 / (s_per_sample * (pub["n0"] + pub["n"])),
        "published": pub,
        **info,
    }


HEAD = ["engine", "precision", "kernels", "cuDNN search", "scheduling", "batch (rows)", "early exit", "ORT graph", "samples/s",
        "UNet evals/s", "UNet evals/sample", "ms/UNet eval/row", "step s", "classifier s", "idle rows", "x floor",
        "GPU-s/image (published)", "images/hour", "first batch s"]


def _cells(r: dict) -> list:
    """One row of the table (rows of earlier runs may lack the later columns)."""
    if "error" in r:
        return [r["engine"], "-", "-", "-", "-", r["batch"], r["early_exit"], "-", f"FAILED: {r['error']}"] + [""] * 10
    nan = float("nan")
    return [Path(r["engine"]).name, r["precision"], r.get("kernels", "portable"), r.get("cudnn_search", "-"),
            r.get("scheduling", "waves"), f"{r['batch']} ({r['rows']})", r["early_exit"], "on" if r.get("ort_cuda_graph") else "off",
            f"{r['noisy_samples_per_s']:.1f}", f"{r['unet_evals_per_s']:.0f}", f"{r['unet_evals_per_sample']:.2f}",
            f"{r['ms_per_unet_eval_row']:.4f}", f"{r.get('step_seconds', nan):.2f}", f"{r.get('classifier_seconds', nan):.2f}",
            "-" if r.get("idle_row_fraction") is None else f"{r['idle_row_fraction']:.3f}", f"{r['floor_multiple']:.2f}",
            f"{r['gpu_s_per_image_published']:.0f}", f"{r['images_per_hour_published']:.2f}", f"{r.get('warmup_seconds', nan):.1f}"]


def markdown(rows: list[dict], header: str) -> str:
    return "\n".join([header, "", *markdown_table(HEAD, map(_cells, rows))]) + "\n"


def main(argv=None) -> int:
    ap = parser(__doc__)
    add_engine(ap, many=True)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--batch", type=int, nargs="+", default=[32], help="noisy samples per batch (rows = batch x K)")
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=10, help="b (default: %(default)s)")
    ap.add_argument("--votes", type=int, default=10, help="K (default: %(default)s)")
    ap.add_argument("--seconds", type=float, default=5.0, help="timed seconds per configuration")
    ap.add_argument("--early-exit", choices=["off", "on", "both"], default="both")
    ap.add_argument("--cuda-graph", choices=["off", "on", "both"], default="on",
                    help="ONNX Runtime's CUDA graph for full batches (GPU only)")
    ap.add_argument("--kernels", choices=["portable", "fused", "both"], default="portable",
                    help="the engine's portable graphs, the fused GPU graphs of `build --device cuda`, or both")
    ap.add_argument("--cudnn-search", choices=["default", "EXHAUSTIVE", "HEURISTIC", "both"], default="default",
                    help="cuDNN convolution algorithm search (ONNX Runtime's cudnn_conv_algo_search); default: ONNX Runtime's")
    ap.add_argument("--seed", type=int, default=0)
    add_out(ap, "folder of runtime_NAME.json and .md")
    ap.add_argument("--name", default=None, help="file stem: runtime_NAME.json / .md (default: the device)")
    ap.add_argument("--append", action="store_true", help="add to the rows already in runtime_NAME.json")
    args = ap.parse_args(argv)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.early_exit]
    kernel_sets = ["portable", "fused"] if args.kernels == "both" else [args.kernels]
    searches = {"default": [None], "both": ["EXHAUSTIVE", "HEURISTIC"]}.get(args.cudnn_search, [args.cudnn_search])
    graphs = {"off": [False], "on": [True], "both": [True, False]}[args.cuda_graph] if args.device == "cuda" else [False]
    env = machine()
    on = f"{env['gpu']['name']}, driver {env['gpu']['driver']}" if args.device == "cuda" and env["gpu"] else env["cpu"]["model"]
    header = (f"### densepure-rt runtime, {args.device} ({on}), {env['date']}"
              f"\n\nsigma {args.sigma}, b = {args.steps}, K = {args.votes}; `{command()}`; "
              f"commit {env['git_commit'] or '?'}, python {env['python']}")
    status = 0
    stem = f"runtime_{args.name or args.device}"
    rows = read_record(args.out / f"{stem}.json", []) if args.append else []
    for engine_dir in args.engine:
        for batch in args.batch:
            for early_exit, cuda_graph, kernels, search in [
                    (e, g, k, s) for e in modes for g in graphs for k in kernel_sets for s in searches]:
                try:
                    r = time_config(Path(engine_dir), args.device, batch, args.sigma, args.steps, args.votes,
                                    early_exit, args.seconds, args.seed, cuda_graph, kernels, search)
                except Exception as exc:  # noqa: BLE001 - one unattended run: keep the others
                    traceback.print_exc()
                    r = {"engine": str(engine_dir), "batch": batch, "early_exit": early_exit,
                         "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
                    status = 1
                rows.append(r)
                print(json.dumps(r), flush=True)
                write_record(args.out, stem, rows, markdown=markdown(rows, header))
    print(markdown(rows, header))
    return status


if __name__ == "__main__":
    sys.exit(main())
