"""Time the PyTorch paths of DensePure at full published size: published baseline, tuned, whole-loop graph.

One run, per preset, with random weights at the published architecture (nothing is downloaded):

- ``published``: how the official code runs. ImageNet: the UNet in the original fp16 mode at batch
  16 and BEiT-L/16-512 in fp32; CIFAR-10: the UNet in fp32 at batch 100 and ViT-B/16 in fp32;
  timm attention as two matmuls (the old timm the code used); the reverse loop driven step by step
  from Python (:func:`densepure_rt.export.fast.published_loop`).
- ``tuned``: fp16 with the float32 islands of docs/design.md, channels-last (NCHW timed too, the faster
  layout kept), fused attention (SDPA), cudnn.benchmark, batches that fill the GPU, run eagerly.
- ``compiled`` (``--compile``): the tuned reverse step through ``torch.compile`` (no CUDA graphs).
- ``loop_eager`` / ``graph``: :class:`densepure_rt.export.fast.WholeLoop` for B noisy samples x K
  runs, eagerly and as one captured CUDA graph (noise drawn inside from a seeded generator).

Reported per path: ms per UNet evaluation per sample, ms per reverse step per sample (UNet plus
update; for the published loop its host-side coefficient building too), ms per classifier
evaluation per sample, GPU-seconds to certify one image at the published settings ((n0 + n) K (b
UNet + 1 classifier), K = b = 10), the multiple of the FLOP floor at 989 TFLOP/s and the speed-up
over the published baseline of the same run. Numerics: tuned and graph vs strict fp32 eager (no
TF32) on the same inputs and noise: relative L2 per step, label agreement; graph replay vs eager
with the same seed. Timing: CUDA events, warm-up, median of repetitions, fresh random inputs
(rotated sets, never zeros).

    python benchmarks/gpu_bench.py --preset both --out benchmarks/results       # GPU, ~5 min on an H100
    python benchmarks/gpu_bench.py --quick --device cpu --preset tiny --out /tmp/bench   # CPU smoke run

Writes ``pytorch_<preset>_<device>.json`` per preset and ``pytorch_summary_<device>.md`` into
``--out`` and prints the markdown table last.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import math
import re
import shlex
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from harness import (ROOT, Timing, add_out, command, machine, markdown_table, parser, rel_l2, timeit, utc_now,
                     write_atomically, write_record)


def _import_project() -> None:
    """Make ``densepure_rt.export`` importable from a plain source checkout (harness put the checkout
    first on sys.path)."""
    if importlib.util.find_spec("densepure_rt.export") is not None:
        return
    spec = importlib.util.spec_from_file_location(
        "densepure_rt.export", ROOT / "export" / "__init__.py", submodule_search_locations=[str(ROOT / "export")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["densepure_rt.export"] = module
    spec.loader.exec_module(module)


_import_project()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from densepure_rt.export.fast import (  # noqa: E402
    WholeLoop,
    published_loop,
    set_fused_attention,
    tune_for_speed,
)
from densepure_rt.export.models import load_classifier, load_unet  # noqa: E402
from densepure_rt.export.reference import reverse_run, to_diffusion_input  # noqa: E402
from densepure_rt.export.step import DenoiseStep  # noqa: E402
from densepure_rt.presets import get_preset  # noqa: E402
from densepure_rt.schedule import make_schedule, reverse_schedule  # noqa: E402
from densepure_rt.stats.vote import majority_vote  # noqa: E402

PEAK_TFLOPS = 989.0  # H100/H200 dense FP16 tensor-core peak (docs/design.md section 6)
SIGMA = 0.5  # cost does not depend on sigma; t* does, and is recorded
VOTES = STEPS = 10  # the published K and the b of docs/design.md section 6
DEFAULT_SETTINGS = dict(n0=100, n=10000)  # for presets without published settings (tiny)


@dataclass(frozen=True)
class Settings:
    """Batch sizes and repetitions of one preset's run."""

    published_batch: int  # the official code's batch
    tuned_batch: int  # rows per UNet call in the tuned path
    classifier_batch: int  # rows per classifier call in the tuned path
    loop_samples: int  # B noisy samples per WholeLoop call (B * votes rows)
    votes: int  # K of the timed loop
    steps: int  # b of the timed loops
    reps: int  # timed repetitions of one network call
    loop_reps: int  # timed repetitions of one loop (published loop, WholeLoop)
    warmup: int
    numerics_rows: int  # rows of the fp32 vs tuned trajectory check
    numerics_loop_samples: int  # noisy samples of the loop re-run in fp32


FULL = {
    # ImageNet tuned batch 32, not 64: at 64 the UNet's first-level concat is 64 x 512 x 256 x 256 =
    # 2^31 elements, one past the int32 index limit, which forces slow 64-bit fallback kernels.
    "imagenet": Settings(16, 32, 32, 6, VOTES, STEPS, 10, 3, 2, 4, 1),
    "cifar10": Settings(100, 2000, 1000, 200, VOTES, STEPS, 20, 5, 3, 32, 5),
    "tiny": Settings(8, 64, 64, 4, VOTES, STEPS, 10, 3, 2, 4, 2),
}
QUICK = {
    "imagenet": Settings(4, 8, 8, 1, VOTES, STEPS, 3, 1, 1, 2, 1),
    "cifar10": Settings(8, 64, 64, 4, VOTES, STEPS, 3, 2, 1, 4, 1),
    "tiny": Settings(2, 4, 4, 2, 2, 2, 3, 2, 1, 2, 1),
}


# --------------------------------------------------------------------------------------------------
# Timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable, inputs: Sequence, device: torch.device, warmup: int, reps: int) -> Timing:
    """Time ``fn(*inputs[r % len(inputs)])``: warm-up, then ``reps`` calls, each between two events.

    On CUDA the calls are queued back to back and read after one synchronisation (device time of
    each call, host-side stalls inside a call included); on the CPU a wall clock around each call
    (:func:`harness.timeit`). Rotating over several input sets keeps repeated calls from reading
    one cached buffer.
    """
    if device.type != "cuda":
        sets = itertools.cycle(inputs)
        return timeit(lambda: fn(*next(sets)), warmup=warmup, reps=reps)
    for r in range(warmup):
        fn(*inputs[r % len(inputs)])
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for r, (start, end) in enumerate(events):
        start.record()
        fn(*inputs[r % len(inputs)])
        end.record()
    torch.cuda.synchronize(device)
    return Timing(tuple(start.elapsed_time(end) / 1e3 for start, end in events))


@contextmanager
def strict_fp32():
    """float32 matmuls and convolutions without TF32, for the reference."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def backend_flags() -> dict:
    return {
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


class Budget:
    """Wall-clock budget: optional sections are skipped once too little of it is left."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, need_s: float) -> bool:
        return self.elapsed() + need_s <= self.seconds


# --------------------------------------------------------------------------------------------------
# Inputs


class Inputs:
    """Fresh random inputs (never zeros) for one preset, on ``device``."""

    def __init__(self, preset, rs, device: torch.device, seed: int):
        self.p, self.rs, self.device = preset, rs, device
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.shape = (preset.channels, preset.image_size, preset.image_size)

    def normal(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, device=self.device)

    def image_batch(self, n: int) -> torch.Tensor:
        """Purified-like images in [-1, 1]."""
        return torch.rand(n, *self.shape, generator=self.gen, device=self.device) * 2 - 1

    def model_t(self, n: int) -> torch.Tensor:
        """Random model timesteps (the rescaled value the network receives)."""
        tau = torch.randint(0, self.p.num_timesteps, (n,), generator=self.gen, device=self.device)
        return tau.float() * (1000.0 / self.p.num_timesteps if self.p.rescale_timesteps else 1.0)

    def scalars(self) -> torch.Tensor:
        i = int(torch.randint(0, self.rs.num_calls, (1,), generator=self.gen, device=self.device).item())
        return torch.as_tensor(self.rs.scalars[i], dtype=torch.float32, device=self.device)

    def unet_sets(self, n: int, k: int = 3) -> list:
        return [(self.normal(n, *self.shape), self.model_t(n)) for _ in range(k)]

    def step_sets(self, n: int, k: int = 3) -> list:
        return [(self.normal(n, *self.shape), self.normal(n, *self.shape), self.scalars()) for _ in range(k)]

    def classifier_sets(self, n: int, k: int = 3) -> list:
        return [(self.image_batch(n),) for _ in range(k)]


# --------------------------------------------------------------------------------------------------
# Pieces of the run


def count_gflop(module: torch.nn.Module, *args) -> float:
    """GFLOP of one call (matmuls, convolutions, attention), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args)
    return counter.get_total_flops() / 1e9


def per_sample(timing: Timing, rows: int, evals: int = 1) -> float:
    """Milliseconds per row (and per evaluation, for a call of ``evals`` evaluations) of a timed call."""
    return 1e3 * timing.median / rows / evals


def image_seconds(cfg: dict, unet_ms: float, classifier_ms: float) -> float:
    """GPU-seconds to certify one image: (n0 + n) K (b UNet + 1 classifier) evaluations."""
    return (cfg["n0"] + cfg["n"]) * cfg["votes"] * (cfg["steps"] * unet_ms + classifier_ms) / 1e3


def loop_image_seconds(cfg: dict, loop_ms_per_sample: float, s: Settings, classifier_ms: float) -> tuple[float, bool]:
    """GPU-seconds per image from a loop's time per noisy sample; exact when the loop ran at the
    published K and b, else rescaled through the tuned classifier time (flagged as an estimate)."""
    if s.votes == cfg["votes"] and s.steps == cfg["steps"]:
        return (cfg["n0"] + cfg["n"]) * loop_ms_per_sample / 1e3, False
    unet_ms = max(loop_ms_per_sample / s.votes - classifier_ms, 0.0) / s.steps
    return image_seconds(cfg, unet_ms, classifier_ms), True


def trajectory_numerics(ref_step, test_step, x_t, noise, scalars) -> dict:
    """Relative L2 per step of ``test_step`` vs ``ref_step`` on the same x_{t*} and noise.

    ``trajectory``: both run their own trajectories (errors compound); ``one_step``: the test step
    applied to the reference trajectory's input of that step (the error of one step alone).
    """
    x_ref = x_test = x_t
    traj, one = [], []
    for i in range(scalars.shape[0]):
        with strict_fp32():
            y_ref = ref_step(x_ref, noise[i], scalars[i])
        one.append(rel_l2(test_step(x_ref, noise[i], scalars[i]), y_ref))
        x_test = test_step(x_test, noise[i], scalars[i])
        traj.append(rel_l2(x_test, y_ref))
        x_ref = y_ref
    return {"trajectory_rel_l2": traj, "one_step_rel_l2": one, "final": (x_ref, x_test)}


def device_info(device: torch.device) -> dict:
    """The device of the run: torch's view of it, with versions, driver and commit from :func:`harness.machine`."""
    env = machine()
    info = {
        "type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": env["python"],
        "host": env["cpu"]["arch"],
        "timm": env["packages"].get("timm"),
        "numpy": np.__version__,
        "git_commit": env["git_commit"],
    }
    if device.type == "cuda":
        info["driver"] = (env["gpu"] or {}).get("driver")
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
        )
    else:
        info.update(name=f"CPU ({env['cpu']['model']})", threads=torch.get_num_threads())
    return info


def device_slug(info: dict) -> str:
    if info["type"] != "cuda":
        return "cpu"
    name = info["name"].lower().replace("nvidia", "")
    match = re.search(r"[a-z]\d{2,4}", name)
    return match.group(0) if match else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


# --------------------------------------------------------------------------------------------------
# One preset


class PresetRun:
    """Builds the models of one preset and fills ``self.result`` section by section."""

    def __init__(self, name: str, settings: Settings, device: torch.device, args, budget: Budget, log):
        self.name, self.s, self.device, self.args, self.budget, self.log = name, settings, device, args, budget, log
        self.p = get_preset(name)
        published = self.p.published or DEFAULT_SETTINGS
        self.cfg = {"n0": published["n0"], "n": published["n"], "votes": VOTES, "steps": STEPS, "sigma": SIGMA}
        self.schedule = make_schedule(self.p.schedule, self.p.num_timesteps, self.p.rescale_timesteps)
        self.rs = reverse_schedule(self.schedule, SIGMA, settings.steps)
        self.inputs = Inputs(self.p, self.rs, device, args.seed)
        self.tuned_dtype = torch.float16 if (device.type == "cuda" or args.cpu_fp16) else torch.float32
        self.result: dict = {
            "preset": name,
            "settings": {**self.cfg, "published_from": "presets.py" if self.p.published else "imagenet defaults"},
            "run": asdict(settings),
            "schedule": self.rs.as_dict(),
            "paths": {},
            "numerics": {},
            "notes": [],
        }

    # -- build ----------------------------------------------------------------------------------------

    def build(self) -> None:
        t0 = time.perf_counter()
        self.ref_unet = load_unet(self.name, random_weights=True, seed=self.args.seed).to(self.device).eval()
        cls = load_classifier(self.name, random_weights=True, seed=self.args.seed)
        # The published code ran a timm without fused attention: two matmuls around a softmax.
        self.ref_cls = set_fused_attention(cls, False).to(self.device).eval()
        self.result["build_s"] = round(time.perf_counter() - t0, 1)
        shape = self.inputs.shape
        x1, t1 = self.inputs.normal(1, *shape), self.inputs.model_t(1)
        counted_unet = count_gflop(self.ref_unet, x1, t1)
        counted_cls = count_gflop(self.ref_cls, self.inputs.image_batch(1))
        unet_gflop = self.p.unet_gflop or counted_unet
        cls_gflop = self.p.classifier_gflop or counted_cls
        self.floor = {
            "peak_tflops": PEAK_TFLOPS,
            "unet_gflop": unet_gflop,
            "classifier_gflop": cls_gflop,
            "gflop_source": "presets.py" if self.p.unet_gflop else "FlopCounterMode",
            "counted_unet_gflop": round(counted_unet, 4),
            "counted_classifier_gflop": round(counted_cls, 4),
            "unet_ms_per_sample": unet_gflop / PEAK_TFLOPS,
            "classifier_ms_per_sample": cls_gflop / PEAK_TFLOPS,
        }
        self.floor["gpu_s_per_image"] = image_seconds(
            self.cfg, self.floor["unet_ms_per_sample"], self.floor["classifier_ms_per_sample"]
        )
        self.result["flop_floor"] = self.floor
        self.result["params"] = {
            "unet": sum(p.numel() for p in self.ref_unet.parameters()),
            "classifier": sum(p.numel() for p in self.ref_cls.parameters()),
        }
        self.log(f"[{self.name}] built in {self.result['build_s']} s; floor {self.floor['gpu_s_per_image']:.1f} GPU-s/image")

    def _path(self, name: str, entry: dict) -> None:
        entry["flags"] = backend_flags()
        if self.device.type == "cuda":
            entry["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.result["paths"][name] = entry

    # -- published baseline ---------------------------------------------------------------------------

    def published(self) -> None:
        s, inp, dev = self.s, self.inputs, self.device
        torch.backends.cudnn.benchmark = False  # the official code leaves PyTorch's default
        fp16 = self.name == "imagenet"  # guided-diffusion ran use_fp16=True; improved-diffusion fp32
        self.pub_unet = copy.deepcopy(self.ref_unet).convert_to_fp16() if fp16 else self.ref_unet
        n = s.published_batch
        with torch.no_grad():
            unet = measure(self.pub_unet, inp.unet_sets(n), dev, s.warmup, s.reps)
            loop_inputs = [(inp.normal(n, *inp.shape),) for _ in range(2)]
            loop = measure(lambda x: published_loop(self.pub_unet, x, self.rs), loop_inputs, dev, 1, s.loop_reps)
            cls = measure(self.ref_cls, inp.classifier_sets(n), dev, s.warmup, s.reps)
        entry = {
            "description": (
                "official-code mode: UNet "
                + ("fp16 mode (convert_to_fp16)" if fp16 else "fp32")
                + ", matmul attention, NCHW; classifier fp32 with timm matmul attention; "
                "reverse loop step by step from Python (host-built coefficients, randn_like)"
            ),
            "batch": n,
            "unet_ms_per_sample": per_sample(unet, n),
            "step_ms_per_sample": per_sample(loop, n, self.rs.num_calls),
            "classifier_ms_per_sample": per_sample(cls, n),
            "timings": {"unet": unet.as_ms(), "loop": loop.as_ms(), "classifier": cls.as_ms()},
        }
        entry["gpu_s_per_image"] = image_seconds(self.cfg, entry["step_ms_per_sample"], entry["classifier_ms_per_sample"])
        self._path("published", entry)
        self.log(f"[{self.name}] published: step {entry['step_ms_per_sample']:.3f} ms/sample, "
                 f"classifier {entry['classifier_ms_per_sample']:.3f} ms/sample")

    # -- tuned eager ----------------------------------------------------------------------------------

    def tuned(self) -> None:
        s, inp, dev = self.s, self.inputs, self.device
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.tuned_unet, self.tuned_cls = tune_for_speed(
            copy.deepcopy(self.ref_unet), copy.deepcopy(self.ref_cls), dtype=self.tuned_dtype, channels_last=True
        )
        self.tuned_step = DenoiseStep(self.tuned_unet).eval()
        n = s.tuned_batch
        layouts = {}
        with torch.no_grad():
            step_sets = inp.step_sets(n)
            for layout in ("nchw", "channels_last"):
                if layout == "nchw" and not self.budget.allows(150):
                    continue
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                self.tuned_unet.to(memory_format=fmt)
                layouts[layout] = measure(self.tuned_step, step_sets, dev, s.warmup, s.reps)
            best = min(layouts, key=lambda k: layouts[k].median)
            self.tuned_unet.to(memory_format=torch.channels_last if best == "channels_last" else torch.contiguous_format)
            unet = measure(self.tuned_unet, inp.unet_sets(n), dev, s.warmup, s.reps)
            cls = measure(self.tuned_cls, inp.classifier_sets(s.classifier_batch), dev, s.warmup, s.reps)
        step = layouts[best]
        entry = {
            "description": (
                f"{str(self.tuned_dtype).replace('torch.', '')} (GroupNorm, softmax, time embedding, output head, "
                f"scheduler float32), SDPA attention, {best} UNet; classifier "
                f"{str(self.tuned_dtype).replace('torch.', '')} with fused attention; eager"
            ),
            "batch": n,
            "classifier_batch": s.classifier_batch,
            "layout": best,
            "unet_ms_per_sample": per_sample(unet, n),
            "step_ms_per_sample": per_sample(step, n),
            "classifier_ms_per_sample": per_sample(cls, s.classifier_batch),
            "step_ms_per_sample_by_layout": {k: per_sample(v, n) for k, v in layouts.items()},
            "timings": {
                "unet": unet.as_ms(),
                "classifier": cls.as_ms(),
                **{f"step_{k}": v.as_ms() for k, v in layouts.items()},
            },
        }
        entry["gpu_s_per_image"] = image_seconds(self.cfg, entry["step_ms_per_sample"], entry["classifier_ms_per_sample"])
        self._path("tuned", entry)
        self.log(f"[{self.name}] tuned ({best}): step {entry['step_ms_per_sample']:.3f} ms/sample, "
                 f"classifier {entry['classifier_ms_per_sample']:.3f} ms/sample")

    def compiled(self) -> None:
        s, inp, dev = self.s, self.inputs, self.device
        step = torch.compile(DenoiseStep(self.tuned_unet).eval())  # default mode: no CUDA graphs of its own
        n = s.tuned_batch
        t0 = time.perf_counter()
        with torch.no_grad():
            sets = inp.step_sets(n)
            step(*sets[0])
            sync(dev)
            compile_s = time.perf_counter() - t0
            stats = measure(step, sets, dev, s.warmup, s.reps)
        entry = {
            "description": "tuned step through torch.compile (inductor, default mode, no CUDA graphs); tuned classifier",
            "batch": n,
            "compile_s": round(compile_s, 1),
            "step_ms_per_sample": per_sample(stats, n),
            "classifier_ms_per_sample": self.result["paths"]["tuned"]["classifier_ms_per_sample"],
            "timings": {"step": stats.as_ms()},
        }
        entry["gpu_s_per_image"] = image_seconds(self.cfg, entry["step_ms_per_sample"], entry["classifier_ms_per_sample"])
        self._path("compiled", entry)

    # -- numerics of the tuned path -------------------------------------------------------------------

    def tuned_numerics(self) -> None:
        inp, rows = self.inputs, self.s.numerics_rows
        scalars = torch.as_tensor(self.rs.scalars, dtype=torch.float32, device=self.device)
        image = torch.rand(rows, *inp.shape, generator=inp.gen, device=self.device)
        x_t = to_diffusion_input(image + SIGMA * inp.normal(rows, *inp.shape), self.rs)
        noise = [inp.normal(rows, *inp.shape) for _ in range(self.rs.num_calls)]
        with torch.no_grad():
            out = trajectory_numerics(DenoiseStep(self.ref_unet), self.tuned_step, x_t, noise, scalars)
            ref_img, tuned_img = out.pop("final")
            with strict_fp32():
                ref_logits = self.ref_cls(ref_img)
            same_in_logits = self.tuned_cls(ref_img)
            tuned_logits = self.tuned_cls(tuned_img)
        out.update(
            rows=rows,
            final_rel_l2=rel_l2(tuned_img, ref_img),
            classifier_logits_rel_l2=rel_l2(same_in_logits, ref_logits),
            classifier_label_agreement=float((same_in_logits.argmax(1) == ref_logits.argmax(1)).float().mean()),
            end_to_end_label_agreement=float((tuned_logits.argmax(1) == ref_logits.argmax(1)).float().mean()),
        )
        self.result["numerics"]["tuned_vs_fp32"] = out
        self.log(f"[{self.name}] tuned vs fp32: final rel L2 {out['final_rel_l2']:.2e}, "
                 f"labels {out['end_to_end_label_agreement']:.2f}")

    # -- the whole loop: eager, graph, parity -------------------------------------------------------

    def whole_loop(self) -> None:
        s, dev = self.s, self.device
        loop = WholeLoop(
            self.tuned_step, self.tuned_cls, self.rs, s.loop_samples, s.votes, self.inputs.shape,
            self.p.num_classes, device=dev, seed=self.args.seed,
        )
        loop.load_image(torch.rand(*self.inputs.shape, generator=self.inputs.gen, device=dev))
        per_call_evals = f"{s.votes * s.steps} UNet + {s.votes} classifier evaluations per noisy sample"
        eager = measure(loop.eager, [()], dev, 1, s.loop_reps)
        classifier_ms = self.result["paths"]["tuned"]["classifier_ms_per_sample"]
        ms = 1e3 * eager.median / s.loop_samples
        secs, est = loop_image_seconds(self.cfg, ms, s, classifier_ms)
        self._path("loop_eager", {
            "description": (
                f"WholeLoop eager (tuned modules), B = {s.loop_samples} x K = {s.votes}, b = {s.steps}: {per_call_evals}"
            ),
            "batch": s.loop_samples * s.votes,
            "ms_per_noisy_sample": ms,
            "step_ms_per_sample_est": self._step_estimate(ms, classifier_ms),
            "gpu_s_per_image": secs,
            "gpu_s_is_estimate": est,
            "timings": {"call": eager.as_ms()},
        })
        # Reproducibility: one eager call from the seed, kept for the parity check.
        seed = self.args.seed + 1
        loop.seed(seed)
        loop.reset_counts()
        loop.eager()
        kept = {k: getattr(loop, k).clone() for k in ("delta", "noise", "purified", "run_labels", "voted", "counts")}
        if dev.type != "cuda":
            self.result["notes"].append("CUDA graph path skipped: no CUDA device (the loop ran eagerly only)")
            self.loop_numerics(loop)
            return
        t0 = time.perf_counter()
        loop.capture(warmup=1)
        capture_s = time.perf_counter() - t0
        loop.seed(seed)
        loop.reset_counts()
        loop.replay()
        sync(dev)
        first_delta = loop.delta.clone()
        parity = {
            "seed": seed,
            "draws_bitwise_equal": bool(torch.equal(loop.delta, kept["delta"]) and torch.equal(loop.noise, kept["noise"])),
            "purified_max_abs_diff": float((loop.purified - kept["purified"]).abs().max()),
            "purified_rel_l2": rel_l2(loop.purified, kept["purified"]),
            "run_label_agreement": float((loop.run_labels == kept["run_labels"]).float().mean()),
            "voted_equal": bool(torch.equal(loop.voted, kept["voted"])),
            "counts_equal": bool(torch.equal(loop.counts, kept["counts"])),
        }
        self.loop_numerics(loop)  # on the first replay's draws, before they are overwritten
        loop.replay()
        sync(dev)
        parity["fresh_noise_each_replay"] = not torch.equal(loop.delta, first_delta)
        self.result["numerics"]["graph_replay_vs_eager"] = parity
        replay = measure(loop.replay, [()], dev, 1, s.loop_reps)
        ms = 1e3 * replay.median / s.loop_samples
        secs, est = loop_image_seconds(self.cfg, ms, s, classifier_ms)
        self._path("graph", {
            "description": (
                f"WholeLoop captured in one CUDA graph (tuned modules), B = {s.loop_samples} x K = {s.votes}, "
                f"b = {s.steps}: {per_call_evals}; noise, vote and histogram inside the graph"
            ),
            "batch": s.loop_samples * s.votes,
            "capture_s": round(capture_s, 1),
            "ms_per_noisy_sample": ms,
            "step_ms_per_sample_est": self._step_estimate(ms, classifier_ms),
            "gpu_s_per_image": secs,
            "gpu_s_is_estimate": est,
            "timings": {"replay": replay.as_ms()},
        })
        self.log(f"[{self.name}] graph: {ms:.3f} ms per noisy sample; parity {parity}")

    def _step_estimate(self, ms_per_noisy_sample: float, classifier_ms: float) -> float:
        """ms per reverse step per row inside a loop, taking the tuned classifier's eager time as its share."""
        return max(ms_per_noisy_sample / self.s.votes - classifier_ms, 0.0) / self.s.steps

    def loop_numerics(self, loop: WholeLoop) -> None:
        """The loop's latest call re-run in strict fp32 from its own draws (first few samples)."""
        m = min(self.s.numerics_loop_samples, loop.batch)
        rows = m * loop.votes
        with torch.no_grad(), strict_fp32():
            x_t = to_diffusion_input(loop.image + SIGMA * loop.delta[:m], self.rs).repeat_interleave(loop.votes, 0)
            ref = reverse_run(DenoiseStep(self.ref_unet), x_t, self.rs, [z[:rows] for z in loop.noise])
            labels = self.ref_cls(ref).argmax(1)
        voted = majority_vote(labels.reshape(m, loop.votes).cpu().numpy())
        self.result["numerics"]["loop_vs_fp32"] = {
            "samples": m,
            "rows": rows,
            "source": "graph replay" if loop.graph is not None else "eager",
            "purified_rel_l2": rel_l2(loop.purified[:rows], ref),
            "run_label_agreement": float((loop.run_labels[:rows] == labels).float().mean()),
            "voted_label_agreement": float(np.mean(loop.voted[:m].cpu().numpy() == voted)),
        }

    # -- summary --------------------------------------------------------------------------------------

    def derive(self) -> None:
        paths, floor = self.result["paths"], self.floor
        base = paths.get("published", {}).get("gpu_s_per_image")
        for entry in paths.values():
            secs = entry.get("gpu_s_per_image")
            if secs is None:
                continue
            entry["floor_multiple"] = secs / floor["gpu_s_per_image"] if floor["gpu_s_per_image"] > 0 else None
            entry["speedup_vs_published"] = base / secs if base and secs > 0 else None
            if "step_ms_per_sample" in entry and floor["unet_ms_per_sample"] > 0:
                entry["step_floor_multiple"] = entry["step_ms_per_sample"] / floor["unet_ms_per_sample"]
            if "classifier_ms_per_sample" in entry and floor["classifier_ms_per_sample"] > 0:
                entry["classifier_floor_multiple"] = entry["classifier_ms_per_sample"] / floor["classifier_ms_per_sample"]


def run_preset(name: str, settings: Settings, device: torch.device, args, budget: Budget, info: dict, log) -> dict:
    """All sections of one preset; the JSON is rewritten after each, so a cut-off run keeps what it did."""
    run = PresetRun(name, settings, device, args, budget, log)
    run.result.update(device=info, command=command(), date=utc_now())
    stem = f"pytorch_{name}_{device_slug(info)}"

    def save() -> Path:
        if hasattr(run, "floor"):
            run.derive()
        run.result["elapsed_s"] = round(budget.elapsed(), 1)
        return write_record(args.out, stem, run.result, markdown=markdown([run.result]))

    big = name == "imagenet"
    # (section, function, seconds it needs from the budget, sections it needs to have succeeded)
    sections: list[tuple[str, Callable, float, tuple[str, ...]]] = [
        ("build", run.build, 0, ()),
        ("published", run.published, 0, ("build",)),
        ("tuned", run.tuned, 0, ("build",)),
        ("tuned_numerics", run.tuned_numerics, 60, ("tuned",)),
        ("compiled", run.compiled, 180, ("tuned",)),
        ("whole_loop", run.whole_loop, 120 if big else 45, ("tuned",)),
    ]
    failed: set[str] = set()
    for section, fn, need_s, needs in sections:
        if section == "compiled" and not args.compile:
            run.result["notes"].append("torch.compile path not run (pass --compile)")
            continue
        if failed & set(needs):
            run.result["notes"].append(f"{section} not run: {', '.join(sorted(failed & set(needs)))} failed")
            failed.add(section)
            continue
        if need_s and not budget.allows(need_s):
            run.result["notes"].append(f"{section} skipped: time budget ({budget.seconds:.0f} s) nearly spent")
            continue
        if device.type == "cuda":  # each section's peak is its own, not the build's or the FLOP count's
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        try:
            fn()
        except Exception as exc:  # one unattended run: record the failure, keep what the others measure
            traceback.print_exc()
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            run.result["notes"].append(f"{section} FAILED: {type(exc).__name__}: {first_line}")
            run.result["failed"] = True
            failed.add(section)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        save()
    log(f"[{name}] wrote {save()}")
    return run.result


# --------------------------------------------------------------------------------------------------
# Report


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0 or not math.isfinite(v):
            return f"{v:g}"
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def markdown(results: list[dict]) -> str:
    """One table per run: a row per path, the FLOP floor last."""
    lines = []
    for r in results:
        dev = r["device"]
        lines += [
            f"### {r['preset']} on {dev['name']} (torch {dev['torch']}, CUDA {dev['cuda']}), {r['date']}",
            "",
            f"n0 = {r['settings']['n0']}, n = {r['settings']['n']}, K = {r['settings']['votes']}, "
            f"b = {r['settings']['steps']}, sigma = {r['settings']['sigma']}; `{r['command']}`",
            "",
        ]
        rows = []
        for name, e in r["paths"].items():
            step = _fmt(e["step_ms_per_sample"]) if "step_ms_per_sample" in e else "~" + _fmt(e.get("step_ms_per_sample_est"))
            rows.append([name, e.get("batch", "-"), _fmt(e.get("unet_ms_per_sample")), step,
                         _fmt(e.get("classifier_ms_per_sample")), _fmt(e.get("ms_per_noisy_sample")),
                         _fmt(e.get("gpu_s_per_image")) + (" (est.)" if e.get("gpu_s_is_estimate") else ""),
                         _fmt(e.get("floor_multiple")), _fmt(e.get("speedup_vs_published"))])
        f = r.get("flop_floor")
        if f:
            rows.append([f"FLOP floor ({f['peak_tflops']:g} TFLOP/s)", "-", _fmt(f["unet_ms_per_sample"]), "-",
                         _fmt(f["classifier_ms_per_sample"]), "-", _fmt(f["gpu_s_per_image"]), 1, "-"])
        lines += markdown_table(["path", "batch", "UNet ms/sample", "step ms/sample", "classifier ms/sample",
                                 "ms/noisy sample", "GPU-s/image", "x floor", "speed-up"], rows)
        num = r["numerics"]
        if "tuned_vs_fp32" in num:
            t = num["tuned_vs_fp32"]
            lines.append("")
            lines.append(
                f"Tuned vs strict fp32 ({t['rows']} rows): rel L2 per step "
                f"{', '.join(f'{v:.1e}' for v in t['trajectory_rel_l2'])}; one-step max "
                f"{max(t['one_step_rel_l2']):.1e}; classifier logits rel L2 {t['classifier_logits_rel_l2']:.1e}; "
                f"label agreement {t['end_to_end_label_agreement']:.2f} (classifier alone "
                f"{t['classifier_label_agreement']:.2f})."
            )
        if "loop_vs_fp32" in num:
            t = num["loop_vs_fp32"]
            lines.append(
                f"Loop ({t['source']}) vs strict fp32 on its own draws ({t['rows']} rows): purified rel L2 "
                f"{t['purified_rel_l2']:.1e}, run labels {t['run_label_agreement']:.2f}, voted labels "
                f"{t['voted_label_agreement']:.2f}."
            )
        if "graph_replay_vs_eager" in num:
            t = num["graph_replay_vs_eager"]
            lines.append(
                f"Graph replay vs eager, same seed: draws bitwise equal {t['draws_bitwise_equal']}, purified max abs "
                f"diff {t['purified_max_abs_diff']:.1e}, counts equal {t['counts_equal']}, fresh noise each replay "
                f"{t['fresh_noise_each_replay']}."
            )
        for note in r["notes"]:
            lines.append(f"- {note}")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--preset", default="both", choices=["imagenet", "cifar10", "tiny", "both"],
                    help="preset to time; 'both' = imagenet, then cifar10, each in its own process "
                    "(default: %(default)s)")
    add_out(ap, "folder for the JSON results and the markdown summary")
    ap.add_argument("--device", default=None, metavar="DEV", help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--quick", action="store_true", help="small batches and few repetitions (smoke run)")
    ap.add_argument("--compile", action="store_true", help="also time the tuned step through torch.compile")
    ap.add_argument("--cpu-fp16", action="store_true", help="run the tuned path in fp16 on the CPU too")
    ap.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads of torch (default: torch's own)")
    ap.add_argument("--seed", type=int, default=0, metavar="N", help="seed of weights, inputs and loop noise")
    ap.add_argument("--budget-s", type=float, default=480.0, metavar="S",
                    help="wall-clock budget; optional sections are skipped when it runs short (default: %(default)s)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    budget = Budget(args.budget_s)
    info = device_info(device)
    slug = device_slug(info)

    def log(msg: str) -> None:
        print(f"{budget.elapsed():7.1f}s {msg}", flush=True)

    if args.preset == "both":
        return run_both(argv if argv is not None else sys.argv[1:], args, budget, slug, log)
    torch.manual_seed(args.seed)
    log(f"device {info['name']}, torch {info['torch']}, CUDA {info['cuda']}, driver {info.get('driver')}")
    table = QUICK if args.quick else FULL
    result = run_preset(args.preset, table[args.preset], device, args, budget, info, log)
    summary = markdown([result])
    write_atomically(args.out / f"pytorch_summary_{slug}.md", summary)  # rewritten by --preset both
    print(summary)
    return 1 if result.get("failed") else 0


def run_both(argv: Sequence[str], args, budget: Budget, slug: str, log) -> int:
    """ImageNet, then CIFAR-10, each in a process of its own.

    A failed graph capture leaves the default CUDA generator marked as capturing, so every later
    eager draw in that process raises: a fresh process per preset keeps one preset's failure from
    spoiling the other. ImageNet goes first with 60% of the budget (the larger model, the figure
    that matters); CIFAR-10 gets what is left.
    """
    rest = [a for a in _strip_options(argv, ("--preset", "--budget-s"))]
    status, done = 0, []
    for name, share in (("imagenet", 0.6), ("cifar10", 1.0)):
        left = args.budget_s - budget.elapsed()
        if left < (120 if name == "imagenet" else 60):
            log(f"[{name}] skipped: time budget nearly spent ({left:.0f} s left)")
            status = 1
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), *rest, "--preset", name, "--budget-s", f"{left * share:.0f}"]
        log(f"[{name}] {shlex.join(cmd)}")
        code = subprocess.run(cmd).returncode
        status = status or code
        path = args.out / f"pytorch_{name}_{slug}.json"
        if path.is_file():
            done.append(json.loads(path.read_text()))
        else:
            log(f"[{name}] wrote no results (exit status {code})")
            status = status or 1
    summary = markdown(done)
    write_atomically(args.out / f"pytorch_summary_{slug}.md", summary)
    print(summary)
    return status


def _strip_options(argv: Sequence[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` without the options ``names`` (as ``--name value`` or ``--name=value``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in names:
            skip = True
            continue
        if any(a.startswith(n + "=") for n in names):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
