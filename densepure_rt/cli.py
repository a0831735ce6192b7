"""The ``densepure-rt`` command line: build engines, certify, predict, report, inspect.

Every user error (bad flag, missing or corrupt file, bad image) is printed as one line starting
with ``error:`` and exits with status 2; nothing half-written is left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import click

from densepure_rt import __version__
from densepure_rt.errors import ConfigError, DensePureError, cli_message, install_hint, signals_held
from densepure_rt.executors.registry import BACKENDS
from densepure_rt.own_models import base_preset, classifier_request_from_flags, model_lines, own_model_options, weights_sha256
from densepure_rt.run import random_note, run_mode

__all__ = ["main"]


#: The quick start, the one source for `densepure-rt --help` and the README (a test checks both).
QUICKSTART = (
    "densepure-rt certify --sigma 0.5 --steps 2 --votes 3 --n0 20 --n 100 --skip 12 --out quickstart.tsv",
    "densepure-rt report quickstart.tsv --plot quickstart.png",
)


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a closed terminal), raised where the process is, so that it unwinds as
    Ctrl-C does (rows kept, lock released)."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


#: Signals that end a run the way Ctrl-C does.
_ENDING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def _on_sigterm(signum, frame):  # noqa: ARG001 - a signal handler's signature
    raise _Terminated(signum)


class _Group(click.Group):
    """A click group that turns DensePureError (and OS errors) into one line and exit status 2,
    click's own usage errors too, and handles SIGTERM and SIGHUP as it handles Ctrl-C."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            previous = {sig: signal.signal(sig, _on_sigterm) for sig in _ENDING}
        except ValueError:  # not the main thread (an embedding application): leave signals alone
            previous = None
        given = list(sys.argv[1:] if args is None else args)
        if not given or (len(given) == 1 and given[0] in self.commands):
            given.append("--help")  # a bare command asks what it takes: its help on stdout, exit 0
        try:
            code = super().main(given, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:  # a bad flag or value: click would print usage and three lines
            where = f"{exc.ctx.command_path}: " if getattr(exc, "ctx", None) is not None else ""
            click.echo(f"error: {where}{_one_line(exc.format_message())} (see --help)", err=True)
            _exit_after_error(2)
        except click.exceptions.Abort:
            click.echo("interrupted", err=True)
            _exit_after_error(130)
        finally:
            for sig, handler in (previous or {}).items():
                signal.signal(sig, handler)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DensePureError as exc:
            click.echo(f"error: {_one_line(cli_message(exc))}", err=True)
            _exit_after_error(2)
        except OSError as exc:  # a disk or permission problem not caught closer to its cause
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"error: {where}{exc.strerror or exc}", err=True)
            _exit_after_error(2)
        except KeyboardInterrupt as exc:
            name = signal.Signals(exc.signum).name if isinstance(exc, _Terminated) else ""
            what = f"terminated ({name})" if name else "interrupted"
            after = {
                "certify": "rows written so far are kept; run the same command again to continue",
                "predict": "rows written so far are kept; run the same command again to continue",
                "build": "no engine was written and the --out folder is as it was (the build's work folder was removed)",
            }.get(ctx.invoked_subcommand or "", "nothing was changed")
            click.echo(f"{what}: {after}", err=True)
            _exit_after_error(128 + int(exc.signum) if isinstance(exc, _Terminated) else 130)


def _exit_after_error(code: int) -> None:
    """Exit with ``code`` once the error line is out, so that it stays the last line: what libraries
    print while the interpreter shuts down (Ray's cluster shutdown, torch's warnings) goes nowhere.
    Only where stderr is the process's own (an embedding application or a test harness that
    replaced sys.stderr keeps its stream)."""
    if sys.stderr is sys.__stderr__:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except (OSError, ValueError):
            pass
    sys.exit(code)


class FiniteFloat(click.FloatRange):
    """A float option that refuses NaN and infinities (every float option of every command), with
    FloatRange's optional bounds."""

    name = "float"

    def convert(self, value, param, ctx):
        import math

        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)

    def _describe_range(self) -> str:
        return "a finite number" if self.min is None and self.max is None else super()._describe_range()


def _one_line(text: str) -> str:
    return " ".join(text.split())


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(__version__, prog_name="densepure-rt")
def main():
    """Certify image classifiers with DensePure (Xiao et al., ICLR 2023) at production speed."""


main.help = (
    "Certify image classifiers with DensePure (Xiao et al., ICLR 2023) at production speed.\n\n"
    "\b\nQuick start (the digits engine shipped in the package, on the CPU, no torch needed: about 30 s on\n"
    "2 cores; run again, it continues the results file):\n"
    + "\n".join(f"  {command}" for command in QUICKSTART)
)


#: The default engine folder of a ``--random-weights`` build: engines/PRESET-random.
RANDOM_SUFFIX = "-random"


def _timed_log(started: float, pending: list | None = None, committing: list | None = None):
    """A build log that prefixes each stage with the seconds since the build started. ``pending``:
    signals seen (:func:`_signals_noted`); a stage boundary raises one that a library swallowed,
    until ``committing`` is non-empty (the engine is taking its place)."""

    def log(message: str) -> None:
        if not committing:
            _raise_pending(pending)
        click.echo(f"[{time.time() - started:5.0f} s] {message}", err=True)

    return log


def _raise_pending(pending: list | None) -> None:
    if pending:
        raise _Terminated(pending[0]) if pending[0] in _ENDING else KeyboardInterrupt()


@contextlib.contextmanager
def _signals_noted():
    """SIGINT, SIGTERM and SIGHUP raise as before, and are also noted in the yielded list: a library that
    catches every exception cannot make the build ignore them, since each stage boundary raises a
    noted one. (Seen once in CI: a SIGINT sent once the work folder existed, exit 0 and an engine
    written; whether a library swallowed it or it came after the swap is not known.)"""
    pending: list = []

    def handler(signum, frame):  # noqa: ARG001 - a signal handler's signature
        pending.append(signum)
        raise _Terminated(signum) if signum in _ENDING else KeyboardInterrupt()

    try:
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, *_ENDING)}
    except ValueError:  # not the main thread: leave signals alone
        yield pending
        return
    try:
        yield pending
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _check_checkpoints(p, diffusion_ckpt, classifier_ckpt, random_weights, own_classifier: bool = False,
                       own_unet: bool = False) -> None:
    """The checkpoint flags, checked without torch: given files exist; random weights exclude
    checkpoints; a preset with no shipped weights gets checkpoints or --random-weights (the
    classifier's only without ``own_classifier``, --classifier)."""
    for flag, path in (("--diffusion-ckpt", diffusion_ckpt), ("--classifier-ckpt", classifier_ckpt)):
        if path is not None and random_weights:
            raise ConfigError(f"{flag} and --random-weights exclude each other: give checkpoints or ask for random weights")
        if path is not None and not Path(path).expanduser().exists():
            raise ConfigError(f"{flag} {path} does not exist")
    if random_weights or diffusion_ckpt is not None or classifier_ckpt is not None:
        return  # a checkpoint given: its own loading says what is wrong with it or with the other one
    for what, shipped, hint in (("diffusion", p.shipped_unet, p.diffusion_ckpt_hint), ("classifier", p.shipped_classifier, p.classifier_ckpt_hint)):
        if (what == "classifier" and own_classifier) or (what == "diffusion" and own_unet):
            continue
        if not shipped:
            if not hint:  # a preset without published weights (tiny)
                raise ConfigError(f"the {p.name} preset has no weights to load: build it with --random-weights")
            raise ConfigError(f"the {p.name} preset needs a {what} checkpoint: {hint} (or --random-weights for benchmarking)")


@main.command()
@click.option("--model", "preset", metavar="PRESET",
              help="Preset: imagenet, cifar10 or digits (docs/models.md); optional with --unet and --classifier.")
@click.option("--diffusion-ckpt", type=click.Path(), metavar="PATH", help="Diffusion UNet checkpoint (.pt or .safetensors).")
@click.option("--classifier-ckpt", type=click.Path(), metavar="PATH", help="Classifier checkpoint (file or Hugging Face folder).")
@click.option("--random-weights", is_flag=True, help="Full-size architecture with random weights (benchmarking only).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="onnxruntime: the denoise step in fp32 or fp16 (the GPU's choice); openvino: both graphs in fp32 or "
                   "bf16 (CPUs with AVX-512 BF16 or AMX; bf16 changes the base classifier, so it is never chosen for you); "
                   "tensorrt: fp16 (the step's fp16 graph, strongly typed) or fp32.")
@click.option("--backend", type=click.Choice(list(BACKENDS)), default="onnxruntime", show_default=True,
              help="; ".join(f"{b.name}: {b.summary}" for b in BACKENDS.values()) + ".")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cuda: also write the GPU graphs (onnxruntime backend): the step with GroupNorm + SiLU fused into "
                   "ONNX Runtime's CUDA kernel, checked on the CPU through its expansion; run them with "
                   "`certify --device cuda --kernels fused`. The portable graphs are always written.")
@click.option("--batch", type=click.IntRange(min=1), default=None, metavar="N",
              help="Default noisy samples per engine call  [default: the preset's: 6 for imagenet (60 rows at K = 10), else 32]")
@click.option("--out", type=click.Path(), metavar="DIR", help="Engine directory  [default: engines/PRESET, engines/PRESET-random with --random-weights]")
@click.option("--force", is_flag=True, help="Rebuild, replacing an existing engine directory (never any other folder).")
@click.option("--seed", type=int, default=0, show_default=True, metavar="N", help="Seed of --random-weights.")
@click.option("--no-validate", is_flag=True, help="Skip validating the graphs against PyTorch.")
@own_model_options
# -- TensorRT (--backend tensorrt only); rows = noisy samples x K per engine call ---------------------
@click.option("--min-batch", type=click.IntRange(min=1), default=None, metavar="ROWS",
              help="TensorRT profile: fewest rows per call  [default: 1]")
@click.option("--opt-batch", type=click.IntRange(min=1), default=None, metavar="ROWS",
              help="TensorRT profile: rows the kernels are tuned for  [default: --max-batch]")
@click.option("--max-batch", type=click.IntRange(min=1), default=None, metavar="ROWS",
              help="TensorRT profile: most rows per call  [default: 10 x --batch, i.e. K = 10]")
@click.option("--workspace", type=click.IntRange(min=1), default=None, metavar="MIB",
              help="TensorRT workspace pool limit in MiB  [default: TensorRT's, the GPU's memory]")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="TensorRT timing cache, read and updated, kept across builds  "
                   "[default: ~/.cache/densepure-rt/tensorrt/timing-VERSION-smCC.cache]")
@click.option("--hardware-compatibility", type=click.Choice(["none", "ampere_plus", "same_compute_capability"]), default=None,
              help="TensorRT plans for this GPU only (none), any GPU of its compute capability, or any Ampere or newer GPU  "
                   "[default: none]")
def build(preset, unet_path, unet_config, diffusion_ckpt, classifier_ckpt, random_weights, precision, backend, device, batch, out, force, seed, no_validate,
          classifier_spec, classifier_weights, input_size, resize, antialias, mean, std, channel_order, outputs, labels_file,
          min_batch, opt_batch, max_batch, workspace, timing_cache, hardware_compatibility):
    """Export a preset's UNet and classifier (or your own: --unet, --classifier) to an engine directory (needs the torch extra).

    An existing engine built from the same preset, settings and weights is verified and reused
    (nothing is rebuilt); --force rebuilds it. --force never deletes a folder that is not an engine.

    \b
    Examples:
      densepure-rt build --model digits
      densepure-rt build --model cifar10 --diffusion-ckpt cifar10_uncond_50M_500K.pt \\
          --classifier-ckpt vit-base-patch16-224-in21k-finetuned-cifar10/ --out engines/cifar10
      densepure-rt build --model imagenet --random-weights
          (into engines/imagenet-random: 5 min 15 s and 10.7 GB of memory on 2 idle CPU cores, measured;
          --precision fp16 traces the half-precision UNet on the CPU: not finished after 25 min;
          --device cuda adds the fused GPU graphs: 6 min and 20.4 GB, measured)
      densepure-rt build --model cifar10 ... --backend tensorrt --precision fp16 --batch 200 --max-batch 2000
      densepure-rt build --model digits --classifier my.onnx --out engines/mine
      densepure-rt build --unet ddpm-cifar10-32/ --classifier my_cifar10.onnx --out engines/ddpm-mine
      densepure-rt build --model cifar10 --diffusion-ckpt cifar10_uncond_50M_500K.pt --classifier timm:resnet18 \\
          --classifier-weights resnet18-cifar10.safetensors --input-size 32 --out engines/cifar10-resnet
    """
    from densepure_rt.presets import BACKEND_PRECISIONS

    # Everything that can be checked without torch is checked first: importing torch and timm takes
    # seconds to tens of seconds, and a typo should not cost that.
    p = base_preset(preset, unet_path, unet_config, diffusion_ckpt, random_weights, classifier_spec)
    batch = batch if batch is not None else p.default_batch
    if unet_path is not None and precision == "fp16" and backend != "openvino":
        raise ConfigError("--precision fp16 converts guided-diffusion's UNet block by block: build --unet engines in fp32")
    if precision not in BACKEND_PRECISIONS[backend]:  # before anything is loaded or announced
        raise ConfigError(f"--precision {precision} is not one the {backend} backend runs: choose {' or '.join(BACKEND_PRECISIONS[backend])}")
    if device == "cuda" and backend != "onnxruntime":
        raise ConfigError(f"--device cuda writes ONNX Runtime's fused CUDA graphs: it goes with --backend onnxruntime, not {backend}")
    request = classifier_request_from_flags(classifier_spec, classifier_weights, classifier_ckpt, input_size, resize, antialias, mean, std,
                                  channel_order, outputs, labels_file)
    _check_checkpoints(p, diffusion_ckpt, classifier_ckpt, random_weights, own_classifier=request is not None,
                       own_unet=unet_path is not None)
    trt_flags = {"--min-batch": min_batch, "--opt-batch": opt_batch, "--max-batch": max_batch, "--workspace": workspace,
                 "--timing-cache": timing_cache, "--hardware-compatibility": hardware_compatibility}
    if backend != "tensorrt":
        given = [flag for flag, value in trt_flags.items() if value is not None]
        if given:
            raise ConfigError(f"{given[0]} goes with --backend tensorrt")
    try:
        with signals_held():  # torch, onnx and ONNX Runtime load here, all of them: see errors.signals_held
            from .engine.build import BuildOptions, build_engine, check_out_dir, clean_stale_builds, is_engine_dir, load_models, preload_build_modules

            preload_build_modules(tuple(name for name, used in (
                ("diffusers", unet_path is not None and Path(unet_path).expanduser().is_dir()),
                ("transformers", request is not None and request.format == "huggingface"),
                ("torchvision", request is not None and request.format == "torchvision")) if used))
    except ImportError as exc:
        raise ConfigError(f"build needs the PyTorch extra ({exc.name} is missing): {install_hint('torch')}") from None
    trt_options = None
    if backend == "tensorrt":
        from .engine.tensorrt import PlanBuilder, TensorRTOptions

        trt_options = TensorRTOptions(min_rows=min_batch or 1, opt_rows=opt_batch, max_rows=max_batch, workspace_mib=workspace,
                                      timing_cache=timing_cache, hardware_compatibility=hardware_compatibility or "none")
        plan_builder = PlanBuilder(trt_options, batch)  # TensorRT, a GPU and the profile checked before anything is loaded
    # A random-weights engine gets a name that says so: its certificates mean nothing.
    own = f"-{Path(request.path).stem if request.path else request.name}" if request is not None else ""
    out = Path(out).expanduser() if out else Path(f"engines/{p.name}{own}{RANDOM_SUFFIX if random_weights else ''}")
    clean_stale_builds(out, log=lambda line: click.echo(line, err=True))
    inputs = {
        "preset": p.name,
        "precision": precision,
        "backend": backend,
        "batch": batch,
        "validate": not no_validate,
        "random_weights": bool(random_weights),
        "seed": seed if random_weights else None,
        "diffusion_sha256": weights_sha256(diffusion_ckpt, p.shipped_unet, random_weights),
        "classifier_sha256": weights_sha256(classifier_ckpt, p.shipped_classifier, random_weights),
        "toolkit_version": __version__,
    }
    if unet_path is not None:
        inputs["diffusion_sha256"] = weights_sha256(unet_path, "", False)
        inputs["unet_config_sha256"] = weights_sha256(unet_config, "", False) if unet_config else None
    if request is not None:  # every declared choice: an engine built with other preprocessing is not reused
        inputs["classifier_sha256"] = weights_sha256(request.path or request.weights, "", False)
        inputs["classifier"] = {"format": request.format, "name": request.name, "labels": list(request.labels or []),
                                "preprocessing": {k: (list(v) if isinstance(v, tuple) else v)
                                                  for k, v in dataclasses.asdict(request.preprocessing).items()}}
    if device == "cuda":  # recorded only when set, so that engines built before --device existed are reused
        inputs["device"] = device
    if trt_options is not None:  # an engine with other plan settings is not reused
        inputs["tensorrt"] = {"rows": list(plan_builder.rows), "workspace_mib": workspace, "timing_cache": timing_cache,
                              "hardware_compatibility": trt_options.hardware_compatibility, "version": plan_builder.version,
                              "compute_capability": plan_builder.device["compute_capability"]}
    if not force and out.is_dir() and not out.is_symlink() and is_engine_dir(out):
        from densepure_rt.files.manifest import load_manifest

        try:
            existing = load_manifest(out)
        except DensePureError as exc:
            raise ConfigError(f"--out {out} holds an engine that does not verify ({exc}); pass --force to rebuild it") from None
        if existing.get("build", {}).get("inputs") == inputs:
            click.echo(f"{out}: up to date (same preset, settings and weights; manifest and files verified), reused; --force rebuilds it")
            return
    check_out_dir(out, force)  # refuses before anything is loaded or announced
    started = time.time()
    # With checkpoints, a bad file must stay a one-line error: the models are announced once loaded.
    p, unet, classifier = load_models(p, unet_path=unet_path, unet_config=unet_config, diffusion_ckpt=diffusion_ckpt, request=request,
                                      classifier_ckpt=classifier_ckpt, random_weights=random_weights, seed=seed,
                                      log=lambda line: click.echo(line, err=True))
    # Announced only once the folder and the checkpoints have passed their checks.
    click.echo(f"building {p.name} ({precision}, {backend}) into {out} (models ready after {time.time() - started:.0f} s)", err=True)
    provenance = {
        "command": "densepure-rt " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "random_weights": bool(random_weights),
        "diffusion_ckpt": str(diffusion_ckpt) if diffusion_ckpt else ("shipped" if p.shipped_unet and not random_weights else None),
        "classifier_ckpt": str(classifier_ckpt) if classifier_ckpt else (
            request.path or request.weights if request is not None else "shipped" if p.shipped_classifier and not random_weights else None),
        "inputs": inputs,
    }
    options = BuildOptions(precision=precision, backend=backend, device=device, batch=batch, force=force, validate=not no_validate,
                           provenance=provenance,
                           tensorrt=trt_options)
    with _signals_noted() as pending:
        committing: list = []  # once the engine takes --out's place, a noted signal is not raised again

        def before_commit() -> None:
            _raise_pending(pending)
            committing.append(True)

        manifest = build_engine(out, p, unet, classifier, options, before_commit=before_commit,
                                log=_timed_log(started, pending, committing))
    click.echo(f"{out}: {p.name}, step {precision}, {len(manifest.files)} files, checks passed ({time.time() - started:.0f} s)")


# ------------------------------------------------------------------------------------------------ #
# certify / predict                                                                                  #
# ------------------------------------------------------------------------------------------------ #


SIGMA_HELP = (
    "Smoothing noise: the standard deviation of the Gaussian noise added to each pixel, with pixel values "
    "scaled to [0, 1] (published: 0.25, 0.5, 1.0; any value > 0 the diffusion schedule covers). "
    "Radii are L2 norms in the same units."
)


def _common_options(f):
    options = [
        click.option("--engine", "engine_dir", type=click.Path(), metavar="DIR",
                     help="Engine directory from `build`  [default: the digits engine shipped with densepure-rt]"),
        click.option("--data", type=click.Path(), metavar="PATH", help="CIFAR-10 test_batch, image folder, or .npz  [default: the engine's test split, if it ships one]"),
        click.option("--sigma", type=FiniteFloat(min=0, min_open=True), required=True, metavar="S", help=SIGMA_HELP),
        click.option("--steps", default="4", show_default=True, metavar="b", help="Reverse steps b >= 1 (at most t*), 'one-shot' (Carlini et al.), or 'none' (plain smoothing)."),
        click.option("--votes", type=click.IntRange(min=1), default=10, show_default=True, metavar="K", help="Reverse runs voted per noisy sample."),
        click.option("--alpha", type=FiniteFloat(min=0, max=1, min_open=True, max_open=True), default=0.001, show_default=True, metavar="A", help="Failure probability."),
        click.option("--skip", type=click.IntRange(min=1), default=1, show_default=True, metavar="N", help="Take every N-th image."),
        click.option("--max", "max_images", type=click.IntRange(min=-1), default=-1, show_default=True, metavar="N", help="Stop at dataset index N (-1: no limit)."),
        click.option("--batch", type=click.IntRange(min=1), default=None, metavar="N", help="Noisy samples per engine call  [default: the engine's]"),
        click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True, metavar="N",
                     help="Noise seed, 0 to 2^32 - 1 (noise is a pure function of seed, image, sample)."),
        click.option("--resume", is_flag=True, help="Continue --out. Also what happens without it when --out holds results of the same settings."),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                     help="Where the engine runs: the CPU, or the GPU (CuPy and a GPU runtime: onnxruntime-gpu or TensorRT)."),
        click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N", help="CPU threads for the runtime (ONNX Runtime or OpenVINO)  [default: $DENSEPURE_RT_THREADS where set, else every core]"),
        click.option("--quiet", is_flag=True, help="No progress output."),
        click.option("--progress-every", type=FiniteFloat(min=0), default=30.0, show_default=True, metavar="S",
                     help="Seconds between progress lines when stderr is not a terminal (a log file)."),
        click.option("--ray", "ray", is_flag=False, flag_value="auto", default=None, metavar="[auto|local|ADDRESS]",
                     help="Spread the images over Ray actors: 'auto' (bare --ray) joins the cluster of `ray start --head`, "
                          "'local' starts one on this machine, or a cluster's address. Needs densepure-rt[ray]."),
        click.option("--actors", type=click.IntRange(min=1), default=None, metavar="N",
                     help="With --ray: actors to start  [default: one per GPU with --device cuda, one per --threads CPUs (1) otherwise]"),
        click.option("--ray-timeout", type=FiniteFloat(min=1), default=30.0, show_default=True, metavar="S",
                     help="With --ray: seconds to wait for the cluster to answer before giving up with an error."),
        click.option("--kernels", type=click.Choice(["portable", "fused"]), default="portable", show_default=True,
                     help="Which graphs run: 'portable' (standard ONNX, any device) or 'fused' (--device cuda only, an engine "
                          "built with `build --device cuda`: GroupNorm + SiLU as one ONNX Runtime CUDA kernel)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


_summary_option = click.option(
    "--json-summary", type=click.Path(), metavar="FILE",
    help="Also write the run in numbers as JSON, for pipelines: images, (certified) accuracy with 95% intervals, "
         "UNet evaluations, wall time, settings.")


def _check_summary(json_summary, out, data):
    """``--json-summary`` checked before any work (never an input, never through a link, never a
    file densepure-rt did not write)."""
    if not json_summary:
        return None
    from densepure_rt.files.outputs import check_output
    from densepure_rt.files.report import is_summary_json
    from densepure_rt.files.results import options_path

    inputs = [("the --out results file", Path(out).expanduser()), ("the options file of --out", options_path(Path(out).expanduser()))]
    if data:
        inputs.append(("the --data file", Path(data).expanduser()))
    return check_output(json_summary, flag="--json-summary", inputs=inputs, recognise=is_summary_json, kind="summary")


def _write_summary(summary, out, radii, started: float, totals) -> None:
    if summary is None:
        return
    from densepure_rt.files.outputs import write_atomic
    from densepure_rt.files.report import run_summary

    data = run_summary(Path(out).expanduser(), radii, time.time() - started)
    # This invocation's work (a resumed run computes only the images it wrote).
    data["this_run"] = {"images_written": totals.written, "unet_evals": totals.unet_evals,
                        "dropped_unet_evals": totals.dropped_evals}
    write_atomic(summary, (json.dumps(data, indent=2) + "\n").encode())


def _radius_list(values) -> list[float]:
    import math

    radii = sorted(set(float(r) for r in values))
    bad = [r for r in radii if not (math.isfinite(r) and r >= 0)]
    if bad:
        raise ConfigError(f"--radius must be a finite number >= 0 (got {bad[0]})")
    return radii


@main.command()
@_common_options
@click.option("--n0", type=int, default=100, show_default=True, metavar="N", help="Selection samples.")
@click.option("--n", type=int, default=1000, show_default=True, metavar="N", help="Estimation samples (published: 100,000 CIFAR-10, 10,000 ImageNet).")
@click.option("--radius", "radii", type=FiniteFloat(min=0), multiple=True, metavar="R",
              help="Certify at target radius R (repeatable): stop sampling as soon as every target is decided. Anytime-valid.")
@click.option("--tol", type=FiniteFloat(min=0), default=None, metavar="T",
              help="Cohen's largest radius, but stop once more samples would add less than T to it per doubling. Anytime-valid.")
@click.option("--n-max", type=click.IntRange(min=1), default=10000, show_default=True, metavar="N",
              help="With --radius or --tol: the most estimation samples an image may use.")
@click.option("--round", "round_size", type=click.IntRange(min=1), default=None, metavar="N",
              help="With --radius or --tol: samples per round of the sequential test (its decisions come after each "
                   "round, in sample order). Independent of the engine's call size: the calls stay full of later "
                   "samples. Smaller rounds stop sooner on easy images.  [default: 1; a resumed run keeps its file's]")
@click.option("--selection", type=click.Choice(["clear-leader", "first-1", "first-2", "first-3"]), default=None,
              help="With --radius or --tol: when to stop choosing the class to certify. 'clear-leader': once the "
                   "leader of the selection votes is clear (a binomial test); 'first-k': also once the first k votes "
                   "agree (fewer samples on clear images, more abstentions where p_A is moderate; docs/statistics.md). "
                   "Both keep the guarantee.  [default: clear-leader]")
@click.option("--early-exit/--no-early-exit", default=None,
              help="Stop a noisy sample's K runs once its vote is decided (identical votes, less work). "
                   "Default: on (the calls stay full of other runs).")
@click.option("--images-per-call", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="The most images in flight at once (memory); 1 leaves it to the scheduler (enough images to fill "
                   "a call). Same rows.")
@click.option("--out", type=click.Path(), default="certify.tsv", show_default=True, metavar="FILE", help="Results TSV (options saved as FILE.json).")
@_summary_option
@click.pass_context
def certify(ctx, engine_dir, data, sigma, steps, votes, alpha, skip, max_images, batch, seed, resume, device, threads, quiet, progress_every,
            ray, actors, ray_timeout, kernels, n0, n, radii, tol, n_max, round_size, selection, early_exit, images_per_call, out,
            json_summary):
    """Certify images: Cohen et al.'s CERTIFY on DensePure's voted labels, one TSV row per image.

    \b
    Three modes, each with Cohen et al.'s guarantee (a false certificate with probability <= alpha):
      (default)     fixed n: CERTIFY with n0 selection and n estimation samples.
      --radius R    is the image certifiably robust at R (and R2, ...)? Samples in rounds of --round
                    and stops when every target is certified or futile, or at --n-max.
      --tol T       the largest certified radius, stopping when more samples stop paying off.
    A noisy sample's K runs stop as soon as its vote is decided (the same votes, fewer UNet calls),
    and every engine call stays full of runs of other samples and images (continuous batching).

    Running the same command again continues an interrupted run (rows already written are kept);
    an --out written with other settings is refused.

    \b
    Examples:
      densepure-rt certify --sigma 0.5 --steps 4 --votes 3 --n 500 --skip 9 --out d.tsv
      densepure-rt certify --sigma 0.5 --steps 4 --votes 3 --radius 0.25 --radius 0.5 --out r.tsv
      densepure-rt certify --engine engines/cifar10 --data cifar-10-batches-py --sigma 0.25 \\
          --steps 10 --votes 10 --n0 100 --n 100000 --skip 20 --batch 100 --out cifar_025.tsv
    """
    from click.core import ParameterSource

    mode = "certify"
    if radii and tol is not None:
        raise ConfigError("--radius and --tol select different modes: give one of them")
    if radii or tol is not None:
        if ctx.get_parameter_source("n") == ParameterSource.COMMANDLINE:
            raise ConfigError("--n is the fixed-n budget; with --radius or --tol give the most samples with --n-max")
        mode, n = ("certify-radii" if radii else "certify-until"), n_max
    elif ctx.get_parameter_source("n_max") == ParameterSource.COMMANDLINE:
        raise ConfigError("--n-max goes with --radius or --tol; fixed-n CERTIFY takes --n")
    if round_size is not None and mode == "certify":
        raise ConfigError("--round goes with --radius or --tol (fixed-n CERTIFY has no rounds)")
    if selection is not None and mode == "certify":
        raise ConfigError("--selection goes with --radius or --tol (fixed-n CERTIFY selects from all --n0 samples)")
    radii = _radius_list(radii) if radii else None
    from densepure_rt.spec import RunSpec

    spec = RunSpec(mode, sigma, steps, votes, n0, n, alpha, radii=tuple(radii) if radii else None, tol=tol, round_size=round_size,
                   seed=seed, batch=batch, early_exit=early_exit, images_per_call=images_per_call, selection=selection)
    started = time.time()
    summary = _check_summary(json_summary, out, data)
    totals = run_mode(spec, engine_dir, data, skip, max_images, resume, device, threads, quiet, progress_every, out, ray=ray,
                      actors=actors, ray_timeout=ray_timeout, kernels=kernels, adopt_round=round_size is None)
    from densepure_rt.files.report import certified_accuracy, labelled
    from densepure_rt.files.results import read_results

    results = read_results(Path(out).expanduser())
    shown = radii or [sigma]
    _write_summary(summary, out, [0.0, *shown], started, totals)
    with_labels = len(labelled(results))
    if not with_labels:
        click.echo(f"{totals.images} images certified -> {out}: no image has a label, so there is no accuracy; the predictions "
                   f"and radii are in the file (densepure-rt report {out}){totals.line()}{random_note(out)}")
        return
    acc = certified_accuracy(results, [0.0, *shown])
    at = ", ".join(f"{100 * a:.1f}% at radius {r:g}" for a, r in zip(acc[1:], shown))
    over = "" if with_labels == len(results) else f" of the {with_labels} labelled images"
    click.echo(f"{totals.images} images certified -> {out}: certified accuracy{over} {100 * acc[0]:.1f}% at radius 0, {at} "
               f"(densepure-rt report {out} for the table){totals.line()}{random_note(out)}")


@main.command()
@_common_options
@click.option("--n", type=int, default=100, show_default=True, metavar="N", help="Noisy samples for the hypothesis test.")
@click.option("--out", type=click.Path(), default="predict.tsv", show_default=True, metavar="FILE", help="Results TSV (options saved as FILE.json).")
@_summary_option
def predict(engine_dir, data, sigma, steps, votes, alpha, skip, max_images, batch, seed, resume, device, threads, quiet, progress_every,
            ray, actors, ray_timeout, kernels, n, out, json_summary):
    """Predict with the smoothed classifier (Cohen et al.'s PREDICT; -1 means abstain).

    \b
    Example:
      densepure-rt predict --sigma 0.25 --steps 4 --votes 5 --n 100 --max 40
    """
    from densepure_rt.spec import RunSpec

    spec = RunSpec("predict", sigma, steps, votes, None, n, alpha, seed=seed, batch=batch)
    started = time.time()
    summary = _check_summary(json_summary, out, data)
    totals = run_mode(spec, engine_dir, data, skip, max_images, resume, device, threads, quiet, progress_every, out, ray=ray,
                      actors=actors, ray_timeout=ray_timeout, kernels=kernels)
    from densepure_rt.files.results import read_rows

    from densepure_rt.files.report import is_correct

    _write_summary(summary, out, [], started, totals)
    _, reader = read_rows(Path(out).expanduser(), required=("idx", "predict", "label", "correct"))
    abstain = sum(r["predict"] == -1 for r in reader)
    known = [r for r in reader if r["label"] >= 0]
    if not known:
        click.echo(f"{totals.images} images -> {out}: no image has a label, so there is no accuracy; abstained {abstain}"
                   f"{totals.line()}{random_note(out)}")
        return
    over = "" if len(known) == len(reader) else f" of the {len(known)} labelled images"
    click.echo(f"{totals.images} images -> {out}: accuracy{over} {sum(is_correct(r) for r in known) / len(known):.1%}, "
               f"abstained {abstain}{totals.line()}{random_note(out)}")


#: The order of certify's and predict's options in --help: the workflow (what to certify, how, the
#: statistics, where the rows go, then how fast, progress, and scale-out).
_WORKFLOW = ("engine_dir", "data", "skip", "max_images", "sigma", "steps", "votes", "n0", "n", "radii", "tol", "n_max",
             "round_size", "alpha", "seed", "out", "json_summary", "resume", "batch", "images_per_call", "early_exit", "device", "threads",
             "kernels", "quiet", "progress_every", "ray", "actors", "ray_timeout")

for _command in (certify, predict):
    _command.params.sort(key=lambda p: _WORKFLOW.index(p.name) if p.name in _WORKFLOW else len(_WORKFLOW))


# ------------------------------------------------------------------------------------------------ #
# report / info                                                                                      #
# ------------------------------------------------------------------------------------------------ #


@main.command()
@click.argument("results", nargs=-1, required=True, type=click.Path())
@click.option("--radii", default="0,0.25,0.5,0.75,1.0", show_default=True, metavar="R,R,...", help="Radii of the table.")
@click.option("--plot", type=click.Path(), metavar="PNG", help="Write the certified-accuracy-vs-radius curve.")
@click.option("--json", "json_out", type=click.Path(), metavar="FILE", help="Also write the table as JSON.")
@click.option("--force", is_flag=True,
              help="Replace a --plot or --json file that densepure-rt did not write (never an input, never through a link).")
def report(results, radii, plot, json_out, force):
    """Certified accuracy at standard radii (best sigma per radius across files) and the curve;
    for files of `predict`: accuracy and abstentions.

    Whether a prediction is correct is recomputed from the label and predict columns. --plot and
    --json replace only files a report wrote (or any file with --force), never an input.

    \b
    Example:
      densepure-rt report sigma025.tsv sigma050.tsv --plot curve.png
    """
    from densepure_rt.files.outputs import check_output, same_file, write_atomic
    from densepure_rt.files.report import (check_plot_path, format_predictions, format_table, is_prediction_file, is_report_json,
                                           is_report_plot, plot_curves, prediction_summary, printable, report_table)
    from densepure_rt.files.results import options_path

    radii_values = _radii_csv(radii)
    results = [Path(r).expanduser() for r in results]
    # Outputs are checked before any work: never an input, never through a link, never a foreign file.
    inputs = [(f"the results file {r}", r) for r in results] + [(f"the options file of {r}", options_path(r)) for r in results]
    if plot and json_out and same_file(Path(plot).expanduser(), Path(json_out).expanduser()):
        raise ConfigError(f"--plot and --json name the same file ({plot}): give two names")
    if plot:
        check_plot_path(plot)  # a typo in the name does not cost the table
        plot = check_output(plot, flag="--plot", inputs=inputs, recognise=is_report_plot, kind="report plot", force=force)
    if json_out:
        json_out = check_output(json_out, flag="--json", inputs=inputs, recognise=is_report_json, kind="report JSON", force=force)
    predictions = [r for r in results if is_prediction_file(r)]
    if predictions:  # predict files have no radius: accuracy and abstentions, as predict's summary
        if len(predictions) < len(results) or plot:
            raise ConfigError("report takes certify files or predict files, not both, and plots certify files only: "
                              "run it once for each kind")
        summaries = {str(r): prediction_summary(r) for r in predictions}
        click.echo(format_predictions(summaries))
        if json_out:
            from densepure_rt.files.outputs import MARK

            write_atomic(json_out, (json.dumps({"generator": MARK, "predictions": summaries}, indent=2) + "\n").encode())
        return
    table = report_table(results, radii_values)
    click.echo(format_table(table))
    if json_out:
        write_atomic(json_out, (json.dumps(table, indent=2) + "\n").encode())
    if plot:
        click.echo(f"plot written to {printable(str(plot_curves(results, plot, radii=radii_values)))}")


def _radii_csv(text: str) -> list[float]:
    """``--radii R,R,...``: finite numbers >= 0, no empty entries."""
    import math

    parts = [part.strip() for part in text.split(",")]
    if not parts or any(not part for part in parts):
        raise ConfigError(f"--radii must be comma-separated numbers with none left empty (got {text!r})")
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise ConfigError(f"--radii must be comma-separated numbers (got {text!r})") from None
    if any(not math.isfinite(r) or r < 0 for r in values):
        raise ConfigError(f"--radii must be finite numbers >= 0 (got {text!r})")
    return values


def _plan_lines(manifest) -> list[str]:
    """The TensorRT plans of an engine (the manifest's validated ``tensorrt`` section), for ``info``."""
    trt = manifest.tensorrt
    if manifest.backend != "tensorrt" or not isinstance(trt, dict):
        return []
    rows = trt["profile"]
    return [
        f"tensorrt    {trt['version']} plans for {trt['gpu']} (compute capability {trt['compute_capability']}, CUDA "
        f"{trt['cuda_version']}, hardware compatibility {trt['hardware_compatibility']}); rows {rows['min']}/{rows['opt']}/{rows['max']}",
        f"plans       {', '.join(trt['plans'][g]['file'] for g in ('step', 'classifier'))}; timing cache {trt['timing_cache']['path']}",
    ]


def _fused_lines(manifest) -> list[str]:
    """``info``'s line for `build --device cuda`'s fused GPU graphs (read defensively: the report
    fields are descriptive and not part of the manifest's validated schema)."""
    fused = manifest.fused
    if not isinstance(fused, dict):
        return []
    step, cls = fused.get("step", {}), fused.get("classifier", {})
    report = step.get("fusion") if isinstance(step.get("fusion"), dict) else {}
    counts = (report.get("fused"), report.get("norms"), report.get("fused_with_silu"))
    norms = f" ({counts[0]} of {counts[1]} GroupNorms fused, {counts[2]} with their SiLU)" if all(type(c) is int for c in counts) else ""
    fp16 = cls.get("fp16") if isinstance(cls.get("fp16"), dict) else {}
    blocks = (fp16.get("attention_fused"), fp16.get("attention_blocks"))
    attention = f", {blocks[0]} of {blocks[1]} attention blocks fused" if all(type(b) is int for b in blocks) else ""
    return [f"fused       GPU graphs for --kernels fused (--device cuda): step {step.get('file')}{norms}; "
            f"classifier {cls.get('file')} {cls.get('precision')}{attention}"]


@main.command()
@click.option("--engine", "engine_dir", type=click.Path(), metavar="DIR",
              help="Engine directory from `build`  [default: the digits engine shipped with densepure-rt]")
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def info(engine_dir, as_json):
    """Verify an engine directory (manifest and every file's sha256) and describe it.

    \b
    Example:
      densepure-rt info --engine engines/cifar10
    """
    from densepure_rt.limits import rows_per_call
    from densepure_rt.files.manifest import BUNDLED_ENGINE, load_manifest

    engine_dir = Path(engine_dir).expanduser() if engine_dir else BUNDLED_ENGINE
    manifest = load_manifest(engine_dir)
    if as_json:
        click.echo(json.dumps(manifest.to_dict(), indent=2, sort_keys=True))
        return
    build, cost = manifest.build, manifest.cost_gflop
    step, classifier = manifest.graphs["step"], manifest.graphs["classifier"]
    lines = [
        f"engine      {engine_dir} (verified: manifest and {len(manifest.files)} file checksums)",
        f"preset      {manifest.preset}  image {'x'.join(map(str, manifest.image_shape))}  classes {manifest.num_classes}",
        f"schedule    {manifest.schedule.kind}, {manifest.schedule.num_timesteps} steps",
        f"unet        {manifest.unet_parameters:,} parameters, step graph {manifest.step_precision}"
        + (f", {cost['unet']:g} GFLOP/sample" if isinstance(cost.get("unet"), (int, float)) and cost.get("unet") else ""),
        f"classifier  {manifest.classifier_name}, {manifest.classifier_parameters:,} parameters, {manifest.classifier_precision}"
        + (f", {cost['classifier']:g} GFLOP/sample" if isinstance(cost.get("classifier"), (int, float)) and cost.get("classifier") else ""),
        *model_lines(manifest),
        f"backend     {manifest.backend} (opset {manifest.opset})",
        "rows        at most {} per step call, {} per classifier call (largest tensors {:,} and {:,} elements per row; "
        "rows = noisy samples x K)".format(*rows_per_call(manifest), step.max_elements_per_row, classifier.max_elements_per_row),
        *_plan_lines(manifest),
        *_fused_lines(manifest),
        f"built       {build.get('date', '?')} with densepure-rt {manifest.toolkit_version}, torch {build.get('torch', '?')}"
        + ("  [random weights]" if manifest.random_weights else ""),
    ]
    click.echo("\n".join(lines))


if __name__ == "__main__":  # pragma: no cover
    main()
