"""Time the lean runtime (the batch loop: CuPy + ONNX Runtime CUDA on a GPU, numpy + ORT CPU on a CPU).

For each engine directory and batch size: noisy samples per second, UNet (denoise-step) evaluations
per second per row, ms per UNet evaluation per row, the multiple of the FLOP floor (the engine's
counted GFLOP at 989 TFLOP/s, docs/design.md section 6) and images per hour at the published settings
((n0 + n) noisy samples of K runs of b steps), with the vote's early exit off (every run, the cost
the PyTorch paths of ``gpu_bench.py`` are timed at) and on.

    python benchmarks/runtime_bench.py --engine engines/cifar10-rand16 --device cuda --batch 64 200 --out DIR
    python benchmarks/runtime_bench.py --engine engines/digits --device cpu --batch 32 --out /tmp/rb  # CPU

Writes ``runtime_<device>.json`` and ``runtime_<device>.md`` into ``--out`` after every
configuration and prints the table last. Inputs: the first images of the engine's default data
set where it has one, else uniform random images (never zeros).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from densepure_rt.sampling.noise import ESTIMATION  # noqa: E402
from densepure_rt.presets import get_preset  # noqa: E402
from densepure_rt.runtime import open_engine  # noqa: E402

PEAK_TFLOPS = 989.0


def published(preset: str) -> dict:
    p = get_preset(preset).published or {}
    return {"n0": p.get("n0", 100), "n": p.get("n", 10000)}


def time_config(engine_dir: Path, device: str, batch: int, sigma: float, steps: int, votes: int, early_exit: bool,
                seconds: float, seed: int, cuda_graph: bool = True) -> dict:
    with open_engine(engine_dir, device=device, early_exit=early_exit, cuda_graph=cuda_graph) as engine:
        shape = engine.image_shape
        image = np.random.default_rng(seed).uniform(0.05, 0.95, size=shape).astype(np.float32)
        engine._prepare(sigma, steps, votes, batch)
        # Warm-up: sessions, cuDNN autotuning, the kernel's compilation, the arena.
        engine.sample_counts(image, batch, ESTIMATION, seed=seed, image_index=0, batch=batch)
        evals0, samples, batches = engine.loop.unet_evals, 0, 0
        t0 = time.perf_counter()
        while True:
            engine.sample_counts(image, batch, ESTIMATION, seed=seed + 1 + batches, image_index=1, batch=batch)
            samples += batch
            batches += 1
            elapsed = time.perf_counter() - t0  # sample_counts reads the labels back: the GPU is done
            if elapsed >= seconds and batches >= 3:
                break
        evals = engine.loop.unet_evals - evals0
        manifest = engine.manifest
        executor = engine.executor
        info = {
            "providers": getattr(executor, "providers", None),
            "ort_cuda_graph": bool(getattr(executor, "cuda_graph", False)),
            "ort_cuda_graph_off": getattr(executor, "cuda_graph_off", None),
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


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| engine | precision | batch (rows) | early exit | ORT graph | samples/s | UNet evals/s | ms/UNet eval/row "
             "| x floor | GPU-s/image (published) | images/hour |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['engine']} | - | {r['batch']} | {r['early_exit']} | - | FAILED: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {Path(r['engine']).name} | {r['precision']} | {r['batch']} ({r['rows']}) | {r['early_exit']} | "
            f"{'on' if r.get('ort_cuda_graph') else 'off'} | "
            f"{r['noisy_samples_per_s']:.1f} | {r['unet_evals_per_s']:.0f} | {r['ms_per_unet_eval_row']:.4f} | "
            f"{r['floor_multiple']:.2f} | {r['gpu_s_per_image_published']:.0f} | {r['images_per_hour_published']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", nargs="+", required=True, help="engine directories")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--batch", type=int, nargs="+", default=[32], help="noisy samples per batch (rows = batch x K)")
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=10, help="b (default: %(default)s)")
    ap.add_argument("--votes", type=int, default=10, help="K (default: %(default)s)")
    ap.add_argument("--seconds", type=float, default=5.0, help="timed seconds per configuration")
    ap.add_argument("--early-exit", choices=["off", "on", "both"], default="both")
    ap.add_argument("--cuda-graph", choices=["off", "on", "both"], default="on",
                    help="ONNX Runtime's CUDA graph for full batches (GPU only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", default=None, help="file stem: runtime_NAME.json / .md (default: the device)")
    ap.add_argument("--append", action="store_true", help="add to the rows already in runtime_NAME.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.early_exit]
    graphs = {"off": [False], "on": [True], "both": [True, False]}[args.cuda_graph] if args.device == "cuda" else [False]
    header = (f"### densepure-rt runtime, {args.device}, {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}"
              f"\n\nsigma {args.sigma}, b = {args.steps}, K = {args.votes}; `{' '.join([Path(sys.executable).name, *sys.argv])}`; "
              f"commit {os.environ.get('DENSEPURE_COMMIT', '?')}, python {platform.python_version()}")
    rows, status = [], 0
    stem = f"runtime_{args.name or args.device}"
    if args.append and (out / f"{stem}.json").is_file():
        rows = json.loads((out / f"{stem}.json").read_text())
    for engine_dir in args.engine:
        for batch in args.batch:
            for early_exit, cuda_graph in [(e, g) for e in modes for g in graphs]:
                if early_exit and not cuda_graph and len(graphs) > 1:
                    continue  # with early exit the waves are not full batches: the graph plays no part
                try:
                    r = time_config(Path(engine_dir), args.device, batch, args.sigma, args.steps, args.votes,
                                    early_exit, args.seconds, args.seed, cuda_graph)
                except Exception as exc:  # noqa: BLE001 - one unattended run: keep the others
                    traceback.print_exc()
                    r = {"engine": engine_dir, "batch": batch, "early_exit": early_exit,
                         "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
                    status = 1
                rows.append(r)
                print(json.dumps(r), flush=True)
                (out / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
                (out / f"{stem}.md").write_text(markdown(rows, header))
    print(markdown(rows, header))
    return status


if __name__ == "__main__":
    sys.exit(main())
