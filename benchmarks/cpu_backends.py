"""CPU benchmark of the inference backends, in one process on the same inputs.

Times ONE reverse denoising step (the engine's "denoise-step" graph: UNet + posterior update) and,
separately, the classifier, through five paths:

  1. torch fp32            the PyTorch modules (export/step.py ``DenoiseStep``, export/models.py)
  2. torch bf16 autocast   the same under ``torch.autocast("cpu", dtype=torch.bfloat16)``
  3. onnxruntime fp32      the engine's ONNX graphs, CPU provider
  4. openvino f32          the same ONNX graphs, INFERENCE_PRECISION_HINT f32 (set explicitly)
  5. openvino bf16         INFERENCE_PRECISION_HINT bf16, only where OPTIMIZATION_CAPABILITIES has BF16

and, for the fp32 paths, their session settings:

  - OpenVINO f32 step under a few thread / stream / infer-request settings (AsyncInferQueue);
  - ONNX Runtime fp32 step and classifier under graph optimisation levels (ORT_ENABLE_BASIC,
    ORT_ENABLE_EXTENDED, ORT_ENABLE_ALL: on the CPU the NCHWc blocked layout for convolutions),
    intra-op threads, the pool threads' spinning (``session.intra_op.allow_spinning``) and parallel
    execution. Each is compared with ORT_ENABLE_ALL at 2 threads, the runtime's session options
    (densepure_rt/executors/onnxrt.py): max abs difference of the output (the classifier's logits:
    "exact" is within 1e-4), process CPU seconds per wall second of its calls, and the graph's nodes
    after optimisation (NCHWc ones apart, where the ``onnx`` package is installed to read the
    optimised graph).

Each number is the median wall-clock time of ``--reps`` calls after ``--warmup`` calls. Numerics are
measured against torch fp32: relative L2 of the step output (float64 norms), and for the classifier
the share of identical argmax labels (and the logits' relative L2). Inputs: x and noise standard
normal float32 [batch x C x H x W], classifier images uniform in [-1, 1], the step's scalars the first
row of ``reverse_schedule(make_schedule(<manifest schedule>), sigma, steps)``.

Engines are built with the CLI into a temporary folder (``densepure-rt build --model digits`` and
``densepure-rt build --model cifar10 --random-weights``) unless ``--engine-digits`` / ``--engine-cifar``
name built ones; the PyTorch modules are loaded with the weights the engine's manifest records.

The measurement (on an otherwise idle machine: torch's OpenMP threads slow down many times when another
process holds a core; roughly 15-20 minutes on 2 cores):

    python benchmarks/cpu_backends.py --out benchmarks/results/cpu_backends

Smoke run: ``python benchmarks/cpu_backends.py --out /tmp/cpu_backends --quick``.
Writes DIR/cpu_backends.json (all numbers) and DIR/cpu_backends.md (tables, also printed).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from harness import Timing, add_out, build_engine, command, machine, markdown_table, parser, rel_l2, timeit, utc_now, write_record

BUILD_ARGS = {"digits": ["--model", "digits"], "cifar10": ["--model", "cifar10", "--random-weights"]}
PATHS = ("torch fp32", "torch bf16 autocast", "onnxruntime fp32", "openvino f32", "openvino bf16")
REF = PATHS[0]
BF16_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # recorded as booleans under "machine"
JOBS_PER_REP = 4  # batches per repetition of an OpenVINO thread/stream setting (AsyncInferQueue)
#: OpenVINO f32 step settings: (label, INFERENCE_NUM_THREADS, NUM_STREAMS or None, PERFORMANCE_HINT, requests or None).
OV_SETTINGS = (
    ("1 thread, 1 stream, 1 request", 1, 1, "LATENCY", 1),
    ("2 threads, 1 stream, 1 request", 2, 1, "LATENCY", 1),
    ("2 threads, 1 stream, 2 async requests", 2, 1, "LATENCY", 2),
    ("2 threads, 2 streams, 2 async requests", 2, 2, "THROUGHPUT", 2),
    ("2 threads, THROUGHPUT hint (OpenVINO's streams and requests)", 2, None, "THROUGHPUT", None),
)
#: ONNX Runtime fp32 settings: (label, GraphOptimizationLevel, intra-op threads, inter-op threads,
#: ExecutionMode, allow_spinning "1"/"0" of the intra-op and inter-op pools).
ORT_SETTINGS = (
    ("ORT_ENABLE_BASIC, 2 threads", "ORT_ENABLE_BASIC", 2, 1, "ORT_SEQUENTIAL", "1"),
    ("ORT_ENABLE_EXTENDED, 2 threads", "ORT_ENABLE_EXTENDED", 2, 1, "ORT_SEQUENTIAL", "1"),
    ("ORT_ENABLE_ALL (NCHWc), 2 threads", "ORT_ENABLE_ALL", 2, 1, "ORT_SEQUENTIAL", "1"),
    ("ORT_ENABLE_ALL, 1 thread", "ORT_ENABLE_ALL", 1, 1, "ORT_SEQUENTIAL", "1"),
    ("ORT_ENABLE_ALL, 2 threads, no spinning", "ORT_ENABLE_ALL", 2, 1, "ORT_SEQUENTIAL", "0"),
    ("ORT_ENABLE_ALL, parallel execution, 2 inter-op x 1 intra-op threads", "ORT_ENABLE_ALL", 1, 2, "ORT_PARALLEL", "1"),
)
#: The runtime's session options (densepure_rt/executors/onnxrt.py at --threads 2): what the others are compared with.
ORT_DEFAULT = ORT_SETTINGS[2][0]
#: Blocks of each ONNX Runtime setting (one session alive at a time), run in turn.
ORT_ROUNDS = 2
EXACT_LOGITS = 1e-4  # max abs logit difference from ONNX Runtime fp32 that counts as exact


def load_torch(manifest: dict):
    """The DenoiseStep and classifier with the weights the engine was built from."""
    from densepure_rt.export.models import load_classifier, load_unet
    from densepure_rt.export.step import DenoiseStep

    build = manifest.get("build", {})
    inputs = build.get("inputs", {})
    random = bool(inputs.get("random_weights", build.get("random_weights", False)))
    seed = int(inputs.get("seed") or 0)

    def ckpt(key):
        return None if random or build.get(key) in (None, "shipped") else build[key]

    unet = load_unet(manifest["preset"], ckpt("diffusion_ckpt"), random_weights=random, seed=seed)
    classifier = load_classifier(manifest["preset"], ckpt("classifier_ckpt"), random_weights=random, seed=seed)
    return DenoiseStep(unet).eval(), classifier.eval()


def torch_runner(module, bf16: bool):
    import torch

    def run(*args):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return module(*(torch.from_numpy(a) for a in args)).float().numpy()

    return run


def ort_runner(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    output = "x_next" if "x_next" in [o.name for o in session.get_outputs()] else "logits"
    return lambda *args: session.run([output], dict(zip(names, args)))[0]


def ort_session(path: Path, level: str, intra: int, inter: int, mode: str, spinning: str, optimized: Path | None = None):
    """An ONNX Runtime CPU session of one :data:`ORT_SETTINGS` setting; ``optimized``: where ONNX
    Runtime writes the graph it optimised."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.intra_op_num_threads, options.inter_op_num_threads = intra, inter
    options.execution_mode = getattr(ort.ExecutionMode, mode)
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def graph_nodes(path: Path) -> dict | None:
    """Nodes of an optimised ONNX graph: ``total`` and ``nchwc`` (domain com.microsoft.nchwc:
    blocked-layout convolutions and the reorders into and out of the layout); None without onnx."""
    try:
        import onnx
    except ImportError:
        return None
    nodes = onnx.load(str(path), load_external_data=False).graph.node
    nchwc = [n.op_type for n in nodes if n.domain == "com.microsoft.nchwc"]
    return {"total": len(nodes), "nchwc": len(nchwc), "nchwc_reorders": sum(op.startswith("Reorder") for op in nchwc)}


def ort_settings(graph: Path, inputs: tuple, batch: int, ref: np.ndarray, args, classifier: bool) -> list[dict]:
    """Each :data:`ORT_SETTINGS` setting on ``graph``, timed in blocks: a block makes the setting's
    session, runs ``--warmup`` calls and times ``--reps`` calls back to back, as the runtime calls
    its sessions, and closes it, so no other session's pool threads spin beside it. The settings'
    blocks run in turn, :data:`ORT_ROUNDS` times (a drift of the machine is spread over all of
    them); the median is over every timed call. Process CPU seconds per wall second of the timed
    calls (spinning pool threads raise it); numerics vs torch fp32 (``ref``) and vs
    :data:`ORT_DEFAULT`'s output."""
    import gc

    nodes = {}  # per level, from a session of its own: the timed sessions write no optimised graph
    with tempfile.TemporaryDirectory(prefix="ort_opt_") as tmp:
        for level in dict.fromkeys(s[1] for s in ORT_SETTINGS):
            optimized = Path(tmp) / f"{level}.onnx"
            ort_session(graph, level, 1, 1, "ORT_SEQUENTIAL", "0", optimized)
            nodes[level] = graph_nodes(optimized) if optimized.is_file() else None
    output = "logits" if classifier else "x_next"
    rows = [{"setting": label, "graph_optimization_level": level, "intra_op_threads": intra, "inter_op_threads": inter,
             "execution_mode": mode, "allow_spinning": spinning, "graph_nodes": nodes[level], "batch_seconds": []}
            for label, level, intra, inter, mode, spinning in ORT_SETTINGS]
    outs, cpu = [None] * len(rows), [0.0] * len(rows)
    for _ in range(ORT_ROUNDS):
        for i, (setting, row) in enumerate(zip(ORT_SETTINGS, rows)):
            session = ort_session(graph, *setting[1:])
            feeds = dict(zip([x.name for x in session.get_inputs()], inputs))
            for _ in range(args.warmup):
                session.run([output], feeds)
            start_cpu = time.process_time()
            for _ in range(args.reps):
                start = time.perf_counter()
                outs[i] = session.run([output], feeds)[0]
                row["batch_seconds"].append(time.perf_counter() - start)
            cpu[i] += time.process_time() - start_cpu
            del session, feeds
            gc.collect()
    default = outs[[r["setting"] for r in rows].index(ORT_DEFAULT)]
    for row, out, cpu_s in zip(rows, outs, cpu):
        median = row["batch_seconds_median"] = Timing(tuple(row["batch_seconds"])).median
        row.update(ms_per_sample=1e3 * median / batch, samples_per_s=batch / median, rel_l2=rel_l2(out, ref),
                   cpu_per_wall=cpu_s / sum(row["batch_seconds"]),
                   max_abs_diff_vs_default=float(np.max(np.abs(out.astype(np.float64) - default))))
        if classifier:
            row["label_agreement"] = float(np.mean(np.argmax(out, axis=1) == np.argmax(ref, axis=1)))
            row["exact"] = row["max_abs_diff_vs_default"] <= EXACT_LOGITS
    return rows


def ov_compile(core, path: Path, precision: str, threads: int, streams=1, hint: str = "LATENCY"):
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": getattr(ov.Type, precision), "INFERENCE_NUM_THREADS": str(threads),
              "PERFORMANCE_HINT": hint}
    if streams is not None:
        config["NUM_STREAMS"] = str(streams)
    compiled = core.compile_model(str(path), "CPU", config)
    readback = {key: compiled.get_property(key) for key in
                ("INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS", "OPTIMAL_NUMBER_OF_INFER_REQUESTS")}
    readback = {k: v.get_type_name() if hasattr(v, "get_type_name") else str(v) for k, v in readback.items()}
    return compiled, readback


def ov_runner(compiled):
    request = compiled.create_infer_request()
    names = [i.get_any_name() for i in compiled.inputs]
    output = compiled.output("x_next" if "x_next" in {o.get_any_name() for o in compiled.outputs} else "logits")
    return lambda *args: request.infer(dict(zip(names, args)), share_inputs=True)[output]


def measure(fn, args, batch: int, warmup: int, reps: int, ref=None, labels: bool = False) -> tuple[dict, np.ndarray]:
    """Median wall clock of ``reps`` calls ``fn(*args)`` after ``warmup`` calls; numerics of the last output vs ``ref``."""
    last = {}
    timing = timeit(lambda: last.update(out=fn(*args)), warmup=warmup, reps=reps)
    median, out = timing.median, last["out"]
    row = {"batch_seconds_median": median, "batch_seconds": list(timing.seconds), "ms_per_sample": 1e3 * median / batch,
           "samples_per_s": batch / median}
    if ref is not None:
        row["rel_l2"] = rel_l2(out, ref)
        if labels:
            row["label_agreement"] = float(np.mean(np.argmax(out, axis=1) == np.argmax(ref, axis=1)))
    return row, out


def bench_model(model: str, engine: Path, batch: int, args) -> dict:
    import openvino as ov

    from densepure_rt.schedule import make_schedule, reverse_schedule

    manifest = json.loads((engine / "manifest.json").read_text())
    graphs = {g: engine / manifest["graphs"][g]["file"] for g in ("step", "classifier")}
    if any(t["dtype"] != "float32" for t in manifest["graphs"]["step"]["inputs"]):
        raise SystemExit(f"{engine}: the step graph is not fp32; build the engine with --precision fp32")
    sched = manifest["schedule"]
    rs = reverse_schedule(make_schedule(sched["kind"], sched["num_timesteps"], sched["rescale_timesteps"]), args.sigma, args.steps)
    shape = (batch, *manifest["image_shape"])
    scalars = np.ascontiguousarray(np.broadcast_to(rs.scalars[0].astype(np.float32), (batch, rs.scalars.shape[1])))  # [rows x S]
    rng = np.random.default_rng(args.seed)
    x, noise = rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32)
    images = rng.uniform(-1.0, 1.0, shape).astype(np.float32)
    step_args, cls_args = (x, noise, scalars), (images,)

    step_module, cls_module = load_torch(manifest)
    core = ov.Core()
    caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    result = {"engine": str(engine), "preset": manifest["preset"], "batch": batch, "image_shape": manifest["image_shape"],
              "random_weights": bool(manifest.get("build", {}).get("random_weights", False)),
              "sigma": args.sigma, "steps": args.steps, "step_scalars": scalars[0].tolist(), "openvino_config": {},
              "step": {}, "classifier": {}}
    refs = {}
    for part, module, inputs in (("step", step_module, step_args), ("classifier", cls_module, cls_args)):
        ref = None
        for path in PATHS:
            print(f"  {model} {part}: {path}", file=sys.stderr, flush=True)
            if path == "openvino bf16" and "BF16" not in caps:
                result[part][path] = {"skipped": f"no BF16 in OPTIMIZATION_CAPABILITIES {list(caps)}"}
                continue
            if path.startswith("torch"):
                fn = torch_runner(module, bf16="bf16" in path)
            elif path.startswith("onnxruntime"):
                fn = ort_runner(graphs[part], args.threads)
            else:
                compiled, readback = ov_compile(core, graphs[part], path.split()[-1], args.threads)
                result["openvino_config"][f"{part} {path}"] = readback
                fn = ov_runner(compiled)
            row, out = measure(fn, inputs, batch, args.warmup, args.reps, ref, labels=part == "classifier")
            if ref is None:
                ref = out
            result[part][path] = row
            del fn
        base = result[part][REF]["samples_per_s"]
        for row in result[part].values():
            if "samples_per_s" in row:
                row["speedup_vs_torch_fp32"] = row["samples_per_s"] / base
        refs[part] = ref

    # All settings compiled up front and timed in turn, repetition by repetition, so that a change in
    # the machine's load hits every setting alike.
    names = [i.get_any_name() for i in core.read_model(str(graphs["step"])).inputs]
    feeds = dict(zip(names, step_args))
    settings, queues = [], []
    for label, threads, streams, hint, requests in OV_SETTINGS:
        compiled, readback = ov_compile(core, graphs["step"], "f32", threads, streams, hint)
        n = requests or int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        queues.append(ov.AsyncInferQueue(compiled, n))
        settings.append({"setting": label, "requests": n, "batches_per_rep": max(JOBS_PER_REP, n), "config": readback,
                         "rep_seconds": []})
    print(f"  {model} step: openvino f32 thread/stream settings", file=sys.stderr, flush=True)
    for rep in range(args.warmup + args.reps):
        for s, queue in zip(settings, queues):
            start = time.perf_counter()
            for _ in range(s["batches_per_rep"]):
                queue.start_async(feeds, share_inputs=True)
            queue.wait_all()
            if rep >= args.warmup:
                s["rep_seconds"].append(time.perf_counter() - start)
    for s, queue in zip(settings, queues):
        median = s["rep_seconds_median"] = Timing(tuple(s["rep_seconds"])).median
        s.update(samples_per_s=s["batches_per_rep"] * batch / median, ms_per_sample=1e3 * median / (s["batches_per_rep"] * batch),
                 rel_l2=rel_l2(queue[0].get_output_tensor(0).data, refs["step"]))
    del queues
    result["openvino_settings"] = settings
    result["openvino_best_setting"] = max(settings, key=lambda s: s["samples_per_s"])["setting"]

    result["onnxruntime_settings"], result["onnxruntime_best_setting"] = {}, {}
    for part, inputs in (("step", step_args), ("classifier", cls_args)):
        print(f"  {model} {part}: onnxruntime fp32 optimisation levels and threads", file=sys.stderr, flush=True)
        rows = ort_settings(graphs[part], inputs, batch, refs[part], args, classifier=part == "classifier")
        result["onnxruntime_settings"][part] = rows
        result["onnxruntime_best_setting"][part] = max(rows, key=lambda r: r["samples_per_s"])["setting"]
    return result


def _fmt(row: dict, *keys) -> list[str]:
    spec = {"ms_per_sample": "{:.3f}", "samples_per_s": "{:.1f}", "speedup_vs_torch_fp32": "{:.2f}x",
            "rel_l2": "{:.2e}", "label_agreement": "{:.3f}", "cpu_per_wall": "{:.2f}"}
    return [spec[k].format(row[k]) if k in row else "" for k in keys]


def markdown(record: dict) -> str:
    m, v = record["machine"], record["versions"]
    lines = [f"# CPU backends on {m['model']} ({m['logical_cpus']} logical CPUs, {record['threads']} threads)", "",
             f"avx512_bf16: {m['avx512_bf16']}, amx_bf16: {m['amx_bf16']}, amx_tile: {m['amx_tile']}; "
             f"OpenVINO capabilities: {', '.join(v['openvino_cpu_capabilities'])}", "",
             f"torch {v['torch']}, onnxruntime {v['onnxruntime']}, openvino {v['openvino']}; median of {record['reps']} "
             f"calls after {record['warmup']} warm-up calls; numerics vs torch fp32.", "",
             "1-minute load average before / after each model (should be near 0): " + ", ".join(
                 f"{k} {r['load_average_1min']['before']:.2f} / {r['load_average_1min']['after']:.2f}" for k, r in record["results"].items()), ""]
    tables = (("Denoise step (UNet + posterior update)", "step", ["rel_l2"], ["rel L2 vs torch fp32"]),
              ("Classifier", "classifier", ["label_agreement", "rel_l2"], ["same argmax as torch fp32", "logits rel L2"]))
    for title, part, extra, heads in tables:
        rows = []
        for model, res in record["results"].items():
            for path, row in res[part].items():
                cells = [f"skipped: {row['skipped']}", "", ""] + [""] * len(heads) if "skipped" in row else \
                    _fmt(row, "ms_per_sample", "samples_per_s", "speedup_vs_torch_fp32", *extra)
                rows.append([model, path, res["batch"], *cells])
        head = ["model", "path", "batch", "ms / sample", "samples/s", "vs torch fp32", *heads]
        lines += [f"## {title}", "", *markdown_table(head, rows, align="ll" + "r" * (len(head) - 2)), ""]
    rows = []
    for model, res in record["results"].items():
        for s in res["openvino_settings"]:
            best = " **(best)**" if s["setting"] == res["openvino_best_setting"] else ""
            rows.append([model, s["setting"] + best, s["requests"], *_fmt(s, "ms_per_sample", "samples_per_s", "rel_l2")])
    lines += ["## OpenVINO f32 step: threads, streams, infer requests", "",
              f"{JOBS_PER_REP} or more batches per repetition through an AsyncInferQueue; settings timed in turn.", "",
              *markdown_table(["model", "setting", "requests", "ms / sample", "noisy samples/s", "rel L2 vs torch fp32"], rows,
                              align="llrrrr"), ""]
    for title, part, extra, heads in (
            ("step", "step", ["rel_l2"], ["rel L2 vs torch fp32", "max abs diff vs default"]),
            ("classifier", "classifier", ["label_agreement", "rel_l2"],
             ["same argmax as torch fp32", "logits rel L2 vs torch fp32", f"logits max abs diff vs default (<= {EXACT_LOGITS:g})"])):
        rows = []
        for model, res in record["results"].items():
            for r in res.get("onnxruntime_settings", {}).get(part, []):
                best = " **(best)**" if r["setting"] == res["onnxruntime_best_setting"][part] else ""
                nodes = r["graph_nodes"]
                diff = f"{r['max_abs_diff_vs_default']:.2e}" + ("" if r.get("exact", True) else " (not exact)")
                rows.append([model, r["setting"] + best, *_fmt(r, "ms_per_sample", "samples_per_s", "cpu_per_wall", *extra), diff,
                             f"{nodes['total']} ({nodes['nchwc']} NCHWc, {nodes['nchwc_reorders']} reorders)" if nodes else ""])
        head = ["model", "setting", "ms / sample", "samples/s", "CPU s / wall s", *heads, "nodes after optimisation"]
        lines += [f"## ONNX Runtime fp32 {title}: optimisation level and threads", "",
                  f"Default: {ORT_DEFAULT} (the runtime's sessions); each setting timed in {ORT_ROUNDS} blocks of back-to-back "
                  "calls with only its session open, the settings' blocks in turn. CPU s / wall s: process CPU time of the timed calls per second (spinning "
                  "pool threads raise it).", "",
                  *markdown_table(head, rows, align="ll" + "r" * (len(head) - 2)), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv=None) -> dict:
    ap = parser(__doc__)
    add_out(ap, "writes DIR/cpu_backends.json and .md")
    ap.add_argument("--models", nargs="+", choices=sorted(BUILD_ARGS), help="default: digits cifar10 (--quick: digits)")
    ap.add_argument("--reps", type=int, help="timed calls per measurement (default 10; --quick: 3)")
    ap.add_argument("--warmup", type=int, help="untimed calls first (default 2; --quick: 1)")
    ap.add_argument("--quick", action="store_true", help="smoke run: few repetitions, digits only")
    ap.add_argument("--batch-digits", type=int, default=32)
    ap.add_argument("--batch-cifar", type=int, default=8)
    ap.add_argument("--engine-digits", type=Path, metavar="DIR", help="a built digits engine (fp32) to reuse")
    ap.add_argument("--engine-cifar", type=Path, metavar="DIR", help="a built cifar10 engine (fp32) to reuse")
    ap.add_argument("--threads", type=int, default=2, help="torch, onnxruntime intra-op and OpenVINO threads")
    ap.add_argument("--sigma", type=float, default=0.5, help="sigma of the step's scalars (first step of --steps)")
    ap.add_argument("--steps", default="2")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    args = ap.parse_args(argv)
    models = args.models or (["digits"] if args.quick else ["digits", "cifar10"])
    args.reps = args.reps or (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)

    import onnxruntime
    import openvino as ov
    import torch

    torch.set_num_threads(args.threads)
    try:
        mkldnn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - a private op; absent in some builds
        mkldnn_bf16 = None
    env = machine()
    record = {
        "benchmark": "cpu_backends",
        "command": command(argv),
        "date": utc_now(),
        "machine": {"model": env["cpu"]["model"], "logical_cpus": env["cpu"]["logical_cpus"],
                    **{flag: flag in env["cpu"]["flags"] for flag in BF16_FLAGS}, "platform": env["platform"]},
        "versions": {"python": env["python"], "numpy": np.__version__, "torch": torch.__version__,
                     "onnxruntime": onnxruntime.__version__, "openvino": ov.__version__,
                     "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_mkldnn_bf16": mkldnn_bf16,
                     "openvino_cpu_capabilities": list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))},
        "threads": args.threads, "torch_threads": torch.get_num_threads(), "reps": args.reps, "warmup": args.warmup,
        "results": {},
    }
    given = {"digits": args.engine_digits, "cifar10": args.engine_cifar}
    batches = {"digits": args.batch_digits, "cifar10": args.batch_cifar}
    with tempfile.TemporaryDirectory(prefix="cpu_backends_") as tmp:
        for model in models:
            engine = given[model] or build_engine(Path(tmp) / model, *BUILD_ARGS[model])
            load = os.getloadavg()[0]
            if load > 0.5:  # torch's OpenMP threads slow down many times when another process holds a core
                print(f"warning: load average {load:.2f} before {model}: the machine is not idle", file=sys.stderr)
            record["results"][model] = {**bench_model(model, engine, batches[model], args),
                                        "load_average_1min": {"before": load, "after": os.getloadavg()[0]}}
    text = markdown(record)
    write_record(args.out, "cpu_backends", record, markdown=text)
    print(text)
    return record


if __name__ == "__main__":
    main()
