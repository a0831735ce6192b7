"""Turn a UNet and a classifier into an engine directory: ONNX graphs + ``manifest.json``.

The directory is staged beside its destination and renamed into place only once every graph has
been exported and validated, so a failed or interrupted build never leaves a half-written engine.

Backends: ``onnxruntime`` (CPU, and CUDA where onnxruntime-gpu is installed) runs the ONNX graphs
directly; ``openvino`` runs the fp32 graphs at an explicit precision. ``tensorrt``: the ONNX graphs are
exported as for ONNX Runtime, then :mod:`densepure_rt.engine.tensorrt` builds a plan from each (written
against the documented API; what has run where: docs/backends.md); the engine holds both the ONNX
graphs and the plans.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from densepure_rt.errors import ConfigError, signals_held
from densepure_rt.files.manifest import MANIFEST, peek_manifest, write_manifest
from densepure_rt.presets import BACKEND_PRECISIONS, IMAGE_SPACE, Preset
from densepure_rt.schedule import make_schedule, reverse_schedule

from densepure_rt.export.onnx_export import (
    OPSET, classifier_spec, export_composed, export_graph, max_elements_per_row, step_spec, validate_graph,
)
from densepure_rt.limits import row_limit
from densepure_rt.export.step import DenoiseStep

__all__ = ["BuildOptions", "build_engine", "build_own_engine", "load_models", "check_out_dir", "clean_stale_builds", "foreign_entry", "is_engine_dir", "PRECISIONS", "BACKENDS"]

PRECISIONS = ("fp32", "fp16", "bf16")
BACKENDS = tuple(BACKEND_PRECISIONS)


@dataclass
class BuildOptions:
    """What to build: precision, backend, the batch the runtime should default to, provenance."""

    precision: str = "fp32"
    backend: str = "onnxruntime"
    #: "cuda": also write the fused GPU graphs (:func:`_fused_graphs`); "cpu": the portable graphs only.
    device: str = "cpu"
    batch: int = 32
    force: bool = False
    validate: bool = True
    provenance: dict = field(default_factory=dict)
    #: ``--backend tensorrt`` only: the profile, workspace, timing cache and hardware compatibility
    #: (:class:`densepure_rt.engine.tensorrt.TensorRTOptions`; None: its defaults).
    tensorrt: object = None


def _check(options: BuildOptions) -> None:
    if options.device not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda (got {options.device!r})")
    if options.device == "cuda" and options.backend != "onnxruntime":
        raise ConfigError(f"--device cuda writes ONNX Runtime's fused CUDA graphs: it goes with --backend onnxruntime, not {options.backend}")
    if options.precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)} (got {options.precision!r})")
    if options.backend not in BACKENDS:
        raise ConfigError(
            f"--backend {options.backend!r} is not available here: choose one of {', '.join(BACKENDS)}"
        )
    allowed = BACKEND_PRECISIONS[options.backend]
    if options.precision not in allowed:
        raise ConfigError(
            f"--precision {options.precision} is not one the {options.backend} backend runs: choose {' or '.join(allowed)}"
        )
    if isinstance(options.batch, bool) or not isinstance(options.batch, int) or options.batch < 1:
        raise ConfigError(f"--batch must be an integer >= 1 (got {options.batch!r})")


def is_engine_dir(path: str | Path) -> bool:
    """True if ``path`` is a directory holding a densepure-rt ``manifest.json`` (a JSON object with
    our self-checksum key), whether or not its files still verify."""
    return peek_manifest(path) is not None


#: What an engine directory may hold besides the files its manifest lists: the manifest, and the
#: temporary file :func:`densepure_rt.files.manifest.write_manifest` renames into place.
_ENGINE_OWN = (MANIFEST, MANIFEST + ".tmp")


def foreign_entry(path: str | Path) -> str | None:
    """The first entry of the engine directory ``path`` that is not one of its own files (a file
    its manifest lists, the manifest, or the manifest's temporary file): a sub-folder, a symbolic
    link, or a file the manifest does not list. None when every entry is the engine's own, so
    replacing the directory deletes nothing else."""
    body = peek_manifest(path) or {}
    files = body.get("files")
    listed = set(files) if isinstance(files, dict) else set()
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        own = entry.name in listed or entry.name in _ENGINE_OWN
        if not own or entry.is_symlink() or not entry.is_file(follow_symlinks=False):
            return entry.name
    return None


def _protected(path: Path) -> str | None:
    """Why ``path`` must never be deleted, or None: the root, the home folder, the working folder
    or one of its ancestors."""
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == Path(resolved.anchor):
        return "it is the root of the file system"
    home = Path.home().resolve()
    if resolved == home:
        return "it is your home folder"
    if resolved == cwd or resolved in cwd.parents:
        return "it is the working folder or one of its parents"
    return None


def check_out_dir(out_dir: str | Path, force: bool) -> str:
    """Decide what building into ``out_dir`` would do, before anything is exported.

    Returns ``"new"`` (absent or an empty directory) or ``"replace"`` (an existing engine, with
    ``force``). Refuses, with one :class:`ConfigError` and without touching anything: a file; a
    non-empty directory that is not a densepure-rt engine (``--force`` never deletes such a
    directory); an engine directory that also holds anything but its own files (:func:`foreign_entry`:
    a copied manifest next to a user's files, or notes and results kept in an engine folder); an
    engine without ``force``; the root, the home folder, the working folder or any of its
    ancestors; a symbolic link.
    """
    out_dir = Path(out_dir)
    if not os.path.lexists(out_dir):
        if _protected(out_dir):  # e.g. a path that resolves through a symlink to a protected place
            raise ConfigError(f"--out {out_dir} cannot be an engine directory: {_protected(out_dir)}")
        return "new"
    if out_dir.is_symlink():
        raise ConfigError(f"--out {out_dir} is a symbolic link: give the real directory")
    if not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} exists and is a file: choose another folder")
    reason = _protected(out_dir)
    if reason:
        raise ConfigError(f"--out {out_dir} cannot be replaced by an engine: {reason}; choose another folder")
    if not any(out_dir.iterdir()):
        return "new"
    if not is_engine_dir(out_dir):
        raise ConfigError(
            f"--out {out_dir} exists and is not a densepure-rt engine (no manifest.json of ours): --force only "
            "replaces engine directories; choose another folder"
        )
    foreign = foreign_entry(out_dir)
    if foreign is not None:
        raise ConfigError(
            f"--out {out_dir} holds {foreign!r}, which is not a file of the engine (its manifest does not list it), "
            "so the folder is not replaced, with or without --force: move it away, or choose another folder"
        )
    if not force:
        raise ConfigError(f"--out {out_dir} already holds an engine: choose another folder, or pass --force to replace it")
    return "replace"


#: The owner file of a build's work folders (``.NAME.XXXX.partial`` staging, ``.NAME.XXXX.old`` the
#: replaced engine moved aside): which process of which host made it, for which engine directory.
_OWNER = ".owner"
_OWNER_TOOL = "densepure-rt build"


def _work_folder(out_dir: Path, suffix: str) -> Path:
    """A new, uniquely named folder beside ``out_dir`` holding an owner file (see :func:`clean_stale_builds`)."""
    folder = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=suffix))
    owner = {"tool": _OWNER_TOOL, "pid": os.getpid(), "host": socket.gethostname(), "out": str(out_dir.resolve())}
    (folder / _OWNER).write_text(json.dumps(owner) + "\n")
    return folder


def _owner(folder: str) -> dict | None:
    """The owner record of a build work folder, or None if it has none of ours."""
    path = Path(folder) / _OWNER
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 4096:
            return None
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(owner, dict) or owner.get("tool") != _OWNER_TOOL or type(owner.get("pid")) is not int:
        return None
    return owner


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # another user's process (or a PID this system cannot have: treated as alive)
    return True


def clean_stale_builds(out_dir: str | Path, log=print) -> None:
    """Tidy up after builds into ``out_dir`` that were killed (``kill -9``, a power cut).

    Their work folders beside ``out_dir`` (``.NAME.XXXX.partial``, ``.NAME.XXXX.old``) are removed
    when their owner file names ``out_dir``, this host, and a process that has ended; a
    folder of a live build, of another host or without our owner file is left alone. A build killed
    between moving the old engine aside and moving the new one in leaves no ``out_dir``: the old
    engine is then put back, not deleted."""
    out_dir = Path(out_dir)
    parent, here, host = out_dir.parent, str(out_dir.resolve()), socket.gethostname()
    try:
        entries = sorted(os.scandir(parent), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if not (entry.name.startswith(f".{out_dir.name}.") and entry.name.endswith((".partial", ".old"))):
            continue
        if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
            continue
        owner = _owner(entry.path)
        if owner is None or owner.get("out") != here or owner.get("host") != host or _alive(owner["pid"]):
            continue
        kept = Path(entry.path) / "engine"
        if entry.name.endswith(".old") and not os.path.lexists(out_dir) and kept.is_dir() and not kept.is_symlink():
            kept.rename(out_dir)
            log(f"{out_dir}: put back the engine a killed build (pid {owner['pid']}) had moved aside")
        shutil.rmtree(entry.path, ignore_errors=True)
        log(f"removed {entry.path}, left by a killed build (pid {owner['pid']})")


def _step_inputs(preset: Preset, batch: int):
    schedule = make_schedule(preset.schedule, preset.num_timesteps, preset.rescale_timesteps)
    rows = [reverse_schedule(schedule, s, b).scalars for s, b in ((0.25, 0), (0.5, 4), (1.0, 10))]
    table = torch.as_tensor(np.concatenate(rows), dtype=torch.float32)
    shape = (batch, preset.channels, preset.image_size, preset.image_size)

    def make(gen: torch.Generator):
        # Each row at its own step (engine format 3): the checks cover rows of different steps in one call.
        rows = table[torch.randint(len(table), (batch,), generator=gen)]
        return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), rows

    return make


def preload_build_modules(optional: tuple[str, ...] = ()) -> None:
    """Import every extension module a build loads later (onnx, ONNX Runtime's shape inference, the
    exporter, the FLOP counter), so that none initialises while the work folder exists: a Ctrl-C that
    lands inside an extension's initialisation aborts the interpreter instead of unwinding, and the
    work folder would stay behind. The CLI calls this with the signals held. ``optional``: modules
    the user's models need (``diffusers``, ``transformers``, ``torchvision``), imported where installed."""
    import onnx  # noqa: F401
    import onnx.shape_inference  # noqa: F401
    import onnx.version_converter  # noqa: F401 - --backend tensorrt's GroupNormalization-21
    import onnxruntime  # noqa: F401
    import onnxruntime.tools.symbolic_shape_infer  # noqa: F401
    import torch._dynamo  # noqa: F401 - the FLOP counter and the exporter import it lazily
    import torch.onnx  # noqa: F401
    import torch.utils.flop_counter  # noqa: F401

    import densepure_rt.export.flops  # noqa: F401
    import densepure_rt.export.unet  # noqa: F401

    import importlib

    for name in optional:  # what the user's models need (diffusers, transformers, torchvision); missing: said when loaded
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def _classifier_inputs(preset: Preset, batch: int):
    shape = (batch, preset.channels, preset.image_size, preset.image_size)

    def make(gen: torch.Generator):
        return (torch.rand(shape, generator=gen) * 2 - 1,)

    return make


class _Preprocess(nn.Module):
    """A classifier's preprocessing alone: image -> the network's input."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier.preprocess(image)


def _export_classifier(classifier: nn.Module, cspec, stage: Path, example) -> list[str]:
    """The classifier graph: traced from PyTorch, or (a network that is an ONNX graph already) its
    preprocessing traced and composed with the network's graph."""
    opset = getattr(classifier, "opset", OPSET)
    net_onnx = getattr(classifier, "net_onnx", None)
    if net_onnx is None:
        return export_graph(classifier, cspec, stage, example, opset=opset)
    return export_composed(_Preprocess(classifier), net_onnx, classifier.num_classes, cspec, stage, example, opset=opset)


def _cost_gflop(preset: Preset, unet: nn.Module, classifier: nn.Module) -> dict:
    """GFLOP of one UNet and one classifier evaluation of one sample, counted on the models
    themselves (2 FLOPs per multiply-accumulate; docs/design.md section 6's convention). The UNet is counted
    on the meta device (instant even at 552M parameters), the classifier with one real forward."""
    from densepure_rt.export.flops import count_gflop, count_gflop_meta
    from densepure_rt.export.unet import create_model

    c, s = preset.channels, preset.image_size
    if preset.unet_kwargs:
        unet_gflop = count_gflop_meta(lambda: create_model(**preset.unet_kwargs), [(1, c, s, s), (1,)])
    else:  # a diffusers UNet: counted with one real forward
        unet_gflop = count_gflop(unet, (torch.zeros(1, c, s, s), torch.zeros(1)))
    first = next(classifier.parameters(), None)  # a classifier may have no parameters at all
    device = first.device if first is not None else torch.device("cpu")
    # An ONNX classifier runs in ONNX Runtime, which PyTorch's FLOP counter cannot see: 0 (unknown).
    classifier_gflop = count_gflop(classifier, torch.zeros(1, c, s, s, device=device)) if getattr(classifier, "countable", True) else 0.0
    return {"unet": float(f"{unet_gflop:.6g}"), "classifier": float(f"{classifier_gflop:.6g}")}


def _fused_graphs(stage: Path, sspec, cspec, step_parent: nn.Module, classifier: nn.Module, make_step, make_cls,
                  options: BuildOptions, log) -> tuple[dict, list[str]]:
    """``--device cuda``: the GPU graphs beside the portable ones. The step graph with
    every GroupNorm32 (+ SiLU) the CUDA kernel takes fused (:mod:`densepure_rt.engine.fusion`).
    ``com.microsoft.GroupNorm`` has no CPU kernel, so with validation the fused graph is checked
    here through its inverse: every fused node expanded back into standard ops, run on the CPU
    against the PyTorch parent with the portable graph's tolerances."""
    import onnx

    from densepure_rt.export.onnx_export import save_graph

    from .fusion import expand_fused, fuse_group_norms

    log("fusing GroupNorm + SiLU into ONNX Runtime's CUDA GroupNorm for the GPU step graph...")
    fused, report = fuse_group_norms(onnx.load(str(stage / sspec.file), load_external_data=True))
    if report["fused"] == 0:
        raise ConfigError(f"--device cuda found no GroupNorm the CUDA kernel takes in this network ({report['norms']} norms): build without it")
    step_file = "step.cuda.onnx"
    files = save_graph(fused, stage, step_file)
    step = {"file": step_file, "fusion": report}
    if options.validate:
        log(f"validating the fused step graph ({report['fused']} of {report['norms']} norms fused) through its expansion on the CPU...")
        with tempfile.TemporaryDirectory(dir=stage.parent) as tmp:
            save_graph(expand_fused(fused), tmp, "expanded.onnx")
            step["validation"] = validate_graph(Path(tmp) / "expanded.onnx", step_parent, sspec, make_step)
    classifier_entry, classifier_files = _gpu_classifier(stage, cspec, classifier, make_cls, options, log)
    return {"step": step, "classifier": classifier_entry}, files + classifier_files


def _as_group_normalization(stage: Path, sspec, log) -> dict:
    """``--backend tensorrt``: rewrite the exported step graph in place at opset 21 with each
    GroupNorm32 as one standard GroupNormalization (fp32 statistics), which TensorRT's parser maps
    to its own normalisation layer (:func:`densepure_rt.engine.fusion.as_group_normalization`). It
    stays standard ONNX: the validation below runs it on ONNX Runtime's CPU provider against PyTorch.
    """
    import onnx

    from densepure_rt.export.onnx_export import save_graph

    from .fusion import as_group_normalization

    log("writing the step graph's norms as GroupNormalization (opset 21) for TensorRT...")
    rewritten, report = as_group_normalization(onnx.load(str(stage / sspec.file), load_external_data=True))
    for stale in (stage / sspec.file, stage / (sspec.file + ".data")):
        stale.unlink(missing_ok=True)
    save_graph(rewritten, stage, sspec.file)
    return report


#: The fused set's fp16 classifier is used only if its labels agree with the fp32 graph's on at least
#: this share of the build's check images; otherwise the fused set keeps the fp32 classifier.
CLASSIFIER_AGREEMENT = 0.995


def _gpu_classifier(stage: Path, cspec, classifier: nn.Module, make_cls, options: BuildOptions, log) -> tuple[dict, list[str]]:
    """The classifier of the fused set: the fp32 graph in fp16 with timm's attention fused
    (:mod:`densepure_rt.engine.classifier_fp16`), gated by label agreement with the fp32 graph on
    fresh random images, run on ONNX Runtime's CPU provider (which computes the ops it has no fp16
    kernel for in fp32 between casts of the fp16 tensors). Below :data:`CLASSIFIER_AGREEMENT` the
    fused set keeps the portable fp32 classifier. The gate is part of making the fp16 graph, not of
    ``--no-validate``'s validation against PyTorch: it runs either way."""
    import onnx

    from densepure_rt.export.onnx_export import save_graph

    from .classifier_fp16 import fp16_classifier

    portable = {"file": cspec.file, "precision": "fp32"}
    log("converting the classifier to fp16 with fused attention for the GPU...")
    graph16, report = fp16_classifier(onnx.load(str(stage / cspec.file)))
    file16 = "classifier.cuda.onnx"
    with tempfile.TemporaryDirectory(dir=stage.parent) as tmp:
        save_graph(graph16, tmp, file16)
        agreement, max_abs = _classifier_agreement(stage / cspec.file, Path(tmp) / file16, make_cls)
        report.update(labels_agree=agreement, logits_max_abs=max_abs)
        if agreement < CLASSIFIER_AGREEMENT:
            log(f"the fp16 classifier's labels agree with fp32 on {agreement:.1%} of the check images (need "
                f"{CLASSIFIER_AGREEMENT:.1%}): the fused set keeps the fp32 classifier")
            return {**portable, "fp16": report}, []
        files = save_graph(graph16, stage, file16)
    log(f"fp16 classifier: {report['attention_fused']} of {report['attention_blocks']} attention blocks fused, "
        f"labels agree with fp32 on {agreement:.1%} of the check images")
    return {"file": file16, "precision": "fp16", "fp16": report}, files


def _classifier_agreement(fp32_file: Path, fp16_file: Path, make_cls, images: int = 64) -> tuple[float, float]:
    """(share of equal labels, largest logit difference) of two classifier graphs on ``images``
    fresh random images (16 for images over 64 x 64: ImageNet's BEiT-L is slow on a CPU), on ONNX
    Runtime's CPU provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = [ort.InferenceSession(str(f), options, providers=["CPUExecutionProvider"]) for f in (fp32_file, fp16_file)]
    gen = torch.Generator().manual_seed(4321)
    agree = total = 0
    max_abs = 0.0
    while total < images:
        (x,) = make_cls(gen)
        if x[0].numel() > 3 * 64 * 64:
            images = min(images, 16)
        feeds = {"image": x.numpy()}
        (l32, g32), (l16, g16) = (s.run(["labels", "logits"], feeds) for s in sessions)
        agree += int((l32 == l16).sum())
        total += len(l32)
        max_abs = max(max_abs, float(np.abs(g32 - g16).max()))
    return agree / total, max_abs


def build_engine(
    out_dir: str | Path,
    preset: Preset,
    unet: nn.Module,
    classifier: nn.Module,
    options: BuildOptions,
    log=print,
    before_commit=None,
) -> dict:
    """Export, validate and seal an engine directory at ``out_dir``; returns the manifest.

    ``unet`` is the fp32 UNet (converted to fp16 here when asked); ``classifier`` maps purified
    images [N x C x H x W] in [-1, 1] to logits. ``before_commit()``: called just before the new
    engine takes ``out_dir``'s place (the CLI raises there a Ctrl-C that a library swallowed).
    """
    _check(options)
    out_dir = Path(out_dir)
    check_out_dir(out_dir, options.force)
    plan_builder = None
    if options.backend == "tensorrt":  # before the export: no TensorRT, no GPU or bad options fail at once
        from .tensorrt import PlanBuilder, TensorRTOptions

        plan_builder = PlanBuilder(options.tensorrt or TensorRTOptions(), options.batch)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_builds(out_dir, log)
    work = None
    try:
        # A fresh, uniquely named staging folder: never a folder that might belong to someone else.
        # Made with Ctrl-C / SIGTERM held, so that one raised here always finds it in ``work`` (and
        # the clean-up below removes it): a signal between mkdtemp and the try could leave it behind.
        with signals_held():
            work = _work_folder(out_dir, ".partial")
            stage = work / "engine"
            stage.mkdir()
        image_shape = (preset.channels, preset.image_size, preset.image_size)
        val_batch = 2
        unet = unet.eval()
        head = (preset.variance_type, preset.prediction_type, preset.clip_x0)
        step32 = DenoiseStep(unet, *head).eval()
        step_parent = step32
        # OpenVINO reads the fp32 graphs and runs them at the engine's precision (set at load time).
        graph_precision = "fp32" if options.backend == "openvino" else options.precision
        if graph_precision == "fp16":
            import copy

            step_parent = DenoiseStep(copy.deepcopy(unet).convert_to_fp16(), *head).eval()
        sspec = step_spec(image_shape, graph_precision)
        user = getattr(classifier, "source", None) or None  # a classifier from build --classifier
        cspec = classifier_spec(image_shape, preset.num_classes, strict=user is not None)
        make_step, make_cls = _step_inputs(preset, val_batch), _classifier_inputs(preset, val_batch)
        gen = torch.Generator().manual_seed(0)
        t0 = time.time()
        runs_in = f"; OpenVINO runs it in {options.precision}" if options.backend == "openvino" else ""
        log(f"exporting the denoise-step graph ({graph_precision}{runs_in})...")
        files = export_graph(step_parent, sspec, stage, make_step(gen))
        group_normalization = None
        if options.backend == "tensorrt":
            group_normalization = _as_group_normalization(stage, sspec, log)
        log(f"exporting the classifier graph (fp32{runs_in})...")
        files += _export_classifier(classifier, cspec, stage, make_cls(gen))
        validation = {}
        if options.validate:
            log("validating both graphs against PyTorch on fresh random inputs...")
            validation["step"] = validate_graph(stage / sspec.file, step_parent, sspec, make_step)
            validation["classifier"] = validate_graph(stage / cspec.file, classifier, cspec, make_cls)
        log("inferring every tensor's shape for the row limit...")
        per_row = {g: max_elements_per_row(stage / spec.file) for g, spec in (("step", sspec), ("classifier", cspec))}
        limits = {g: row_limit(n) for g, n in per_row.items()}
        if plan_builder is not None and plan_builder.rows[2] > limits["step"]:
            raise ConfigError(
                f"--max-batch {plan_builder.rows[2]} rows is above this network's limit of {limits['step']} rows per call "
                f"({per_row['step']:,} elements per row in its largest tensor; TensorRT refuses tensors of 2^31 "
                f"elements or more): give --max-batch {limits['step']} or less"
            )
        fused = None
        if options.device == "cuda":
            fused, fused_files = _fused_graphs(stage, sspec, cspec, step_parent, classifier, make_step, make_cls, options, log)
            files += fused_files
        plans = None
        if plan_builder is not None:
            plans, plan_files = plan_builder.build(stage, {"step": sspec.file, "classifier": cspec.file}, options.precision, log)
            files += plan_files
        log("counting FLOPs per sample...")
        cost_gflop = _cost_gflop(preset, unet, classifier)
        unet_params = sum(p.numel() for p in unet.parameters())
        manifest = {
            "preset": preset.name,
            "description": preset.description,
            "image_shape": list(image_shape),
            "num_classes": preset.num_classes,
            "schedule": {
                "kind": preset.schedule,
                "num_timesteps": preset.num_timesteps,
                "rescale_timesteps": preset.rescale_timesteps,
            },
            "unet": {
                "create_model_kwargs": preset.unet_kwargs,
                "parameters": unet_params,
                "variance_type": preset.variance_type,
                "prediction_type": preset.prediction_type,
                "clip_x0": preset.clip_x0,
                **({"source": preset.unet_source} if preset.unet_source else {}),
            },
            "classifier": {
                "name": preset.classifier,
                "parameters": int(getattr(classifier, "parameter_count", 0) or sum(p.numel() for p in classifier.parameters())),
                "preprocessing": classifier.describe() if hasattr(classifier, "describe") else {},
                **({"source": user} if user else {}),
            },
            "labels": list(getattr(classifier, "label_names", None) or []) or None,
            "image_space": {"size": list(image_shape), **IMAGE_SPACE},
            # OpenVINO runs both graphs at the engine's precision; ONNX Runtime's classifier is fp32.
            "precision": {"step": options.precision, "classifier": options.precision if options.backend == "openvino" else "fp32"},
            "backend": {"name": options.backend, "opset": 17},
            # max_elements_per_row: the largest tensor of each graph per row of a call (shape inference
            # over the exported graph); the runtime derives its row limit from it (densepure_rt.limits).
            "graphs": {g: {**spec.as_dict(), "max_elements_per_row": per_row[g]} for g, spec in (("step", sspec), ("classifier", cspec))},
            # --backend tensorrt: the step graph's norms as GroupNormalization-21 (_as_group_normalization).
            **({"group_normalization": group_normalization} if group_normalization else {}),
            "validation": validation,
            "default_batch": options.batch,
            "default_data": preset.default_data,
            "cost_gflop": cost_gflop,
            "build": {
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seconds": round(time.time() - t0, 1),
                "python": sys.version.split()[0],
                "torch": torch.__version__,
                "platform": platform.platform(),
                **options.provenance,
            },
            "gpu": plans["gpu"] if plans else None,
            "files": files,
        }
        if plans:
            manifest["tensorrt"] = plans
        if fused:
            manifest["fused"] = fused
        write_manifest(stage, manifest)
        os.chmod(stage, 0o755)
        if before_commit is not None:
            before_commit()
        # Checked again just before the swap (the folder may have changed during a long export).
        if check_out_dir(out_dir, options.force) == "replace":
            old = _work_folder(out_dir, ".old")
            out_dir.rename(old / "engine")  # moved aside, deleted only once the new engine is in place
            stage.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if out_dir.is_dir():
                out_dir.rmdir()  # empty
            stage.rename(out_dir)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    log(f"engine written to {out_dir}")
    from densepure_rt.files.manifest import load_manifest

    return load_manifest(out_dir)


def load_models(preset: Preset, *, unet_path=None, unet_config=None, diffusion_ckpt=None, request=None, classifier_ckpt=None,
                random_weights: bool = False, seed: int = 0, log=None) -> tuple[Preset, nn.Module, nn.Module]:
    """The models of a build and the preset carrying their facts: (preset, fp32 UNet, classifier).

    The diffusion model is ``unet_path`` (+ ``unet_config``; :func:`densepure_rt.export.diffusion.load_diffusion_model`)
    or the preset's (``diffusion_ckpt``, its shipped weights, or random weights under ``seed``); the
    classifier is ``request`` (a :class:`densepure_rt.presets.ClassifierRequest`, checked against the
    diffusion model's images) or the preset's. ``log(line)`` announces random-weight models."""
    import dataclasses

    from densepure_rt.export.models import load_classifier, load_unet

    say = log or (lambda line: None)
    if unet_path is not None:
        from densepure_rt.export.diffusion import load_diffusion_model, with_diffusion_model

        diffusion = load_diffusion_model(unet_path, unet_config)
        own = with_diffusion_model(preset, diffusion)
        if request is None and (own.image_size, own.channels) != (preset.image_size, preset.channels):
            raise ConfigError(f"the {preset.name} classifier takes {preset.channels}x{preset.image_size}x{preset.image_size} images "
                              f"but --unet makes {own.channels}x{own.image_size}x{own.image_size}: give --classifier")
        unet, preset = diffusion.unet, own
    else:
        if random_weights:
            say(f"creating the {preset.name} UNet (random weights)...")
        unet = load_unet(preset, diffusion_ckpt, random_weights=random_weights, seed=seed)
    if request is not None:
        from densepure_rt.export.sources import load_classifier_source

        classifier = load_classifier_source(request, preset.channels, preset.image_size)
        preset = dataclasses.replace(preset, num_classes=classifier.num_classes, classifier=request.display)
    else:
        if random_weights:
            say(f"creating the {preset.name} classifier (random weights)...")
        classifier = load_classifier(preset, classifier_ckpt, random_weights=random_weights, seed=seed)
    return preset, unet, classifier


def build_own_engine(out_dir: str | Path, *, model: str | None = None, unet: str | Path | None = None,
                     unet_config: str | Path | None = None, classifier: str | None = None,
                     classifier_weights: str | Path | None = None, preprocessing=None, labels: str | Path | None = None,
                     options: BuildOptions | None = None, log=print):
    """``densepure-rt build --model/--unet/--classifier`` as a function, for pipelines: the preset
    ``model`` (or none, with ``unet`` and ``classifier``), your diffusion model ``unet`` (+
    ``unet_config``), your classifier ``classifier`` (a file, a Hugging Face folder, ``timm:NAME`` or
    ``torchvision:NAME`` with ``classifier_weights``) with its ``preprocessing``
    (:class:`densepure_rt.presets.Preprocessing`) and ``labels`` file. Returns the verified
    :class:`densepure_rt.files.manifest.Manifest`; errors are :class:`densepure_rt.errors.DensePureError`
    with one line, raised before anything is written."""
    from densepure_rt.own_models import base_preset
    from densepure_rt.presets import Preprocessing, classifier_request

    preset = base_preset(model, None if unet is None else str(unet), unet_config, None, False, classifier)
    request = None
    if classifier is not None:
        request = classifier_request(str(classifier), None if classifier_weights is None else str(classifier_weights),
                                     preprocessing or Preprocessing(), None if labels is None else str(labels))
    options = options or BuildOptions(batch=preset.default_batch)
    check_out_dir(out_dir, options.force)
    preset, unet_module, classifier_module = load_models(preset, unet_path=unet, unet_config=unet_config, request=request, log=log)
    return build_engine(out_dir, preset, unet_module, classifier_module, options, log=log)
