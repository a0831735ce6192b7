"""The ``densepure-rt`` command line: build engines, certify, predict, report, inspect.

Every user error (bad flag, missing or corrupt file, bad image) is printed as one line starting
with ``error:`` and exits with status 2; nothing half-written is left behind.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import click

from . import __version__
from .errors import ConfigError, DataError, DensePureError

__all__ = ["main"]


class _Group(click.Group):
    """A click group that turns DensePureError into a one-line message and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DensePureError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: rows written so far are kept; continue with --resume", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="densepure-rt")
def main():
    """Certify image classifiers with DensePure (Xiao et al., ICLR 2023) at production speed.

    \b
    Quick start (the shipped digits model, CPU, about a minute):
      densepure-rt build --model digits
      densepure-rt certify --engine engines/digits --sigma 0.5 --steps 2 --votes 3 --n0 20 --n 100 --skip 12 --out digits.tsv
      densepure-rt report digits.tsv --plot digits.png
    """


def _parse_steps(value: str) -> int:
    from .schedule import parse_steps

    try:
        return parse_steps(value)
    except ValueError:
        raise ConfigError(f"--steps must be a positive integer, 'one-shot' or 'none' (got {value!r})") from None


def _steps_label(steps: int) -> str:
    from .schedule import NO_PURIFICATION, ONE_SHOT

    return {ONE_SHOT: "one-shot", NO_PURIFICATION: "none"}.get(steps, str(steps))


# ------------------------------------------------------------------------------------------------ #
# build                                                                                              #
# ------------------------------------------------------------------------------------------------ #


@main.command()
@click.option("--model", "preset", required=True, metavar="PRESET", help="Preset: imagenet, cifar10, digits, tiny.")
@click.option("--diffusion-ckpt", type=click.Path(), metavar="PATH", help="Diffusion UNet checkpoint (.pt or .safetensors).")
@click.option("--classifier-ckpt", type=click.Path(), metavar="PATH", help="Classifier checkpoint (file or Hugging Face folder).")
@click.option("--random-weights", is_flag=True, help="Full-size architecture with random weights (benchmarking only).")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True, help="Denoise-step precision.")
@click.option("--backend", type=click.Choice(["onnxruntime"]), default="onnxruntime", show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True, metavar="N", help="Default noisy samples per engine call.")
@click.option("--out", type=click.Path(), metavar="DIR", help="Engine directory  [default: engines/PRESET]")
@click.option("--force", is_flag=True, help="Replace an existing engine directory.")
@click.option("--seed", type=int, default=0, show_default=True, metavar="N", help="Seed of --random-weights.")
@click.option("--no-validate", is_flag=True, help="Skip validating the graphs against PyTorch.")
def build(preset, diffusion_ckpt, classifier_ckpt, random_weights, precision, backend, batch, out, force, seed, no_validate):
    """Export a preset's UNet and classifier to an engine directory (needs the torch extra).

    \b
    Examples:
      densepure-rt build --model digits
      densepure-rt build --model cifar10 --diffusion-ckpt cifar10_uncond_50M_500K.pt \\
          --classifier-ckpt vit-base-patch16-224-in21k-finetuned-cifar10/ --out engines/cifar10
      densepure-rt build --model imagenet --random-weights --precision fp16 --out engines/imagenet-rand
    """
    from .presets import get_preset

    p = get_preset(preset)
    try:
        from .engine.build import BuildOptions, build_engine
        from .export.models import load_classifier, load_unet
    except ImportError as exc:
        raise ConfigError(f"build needs the PyTorch extra ({exc.name} is missing): pip install 'densepure-rt[torch]'") from None
    for flag, path in (("--diffusion-ckpt", diffusion_ckpt), ("--classifier-ckpt", classifier_ckpt)):
        if path is not None and not Path(path).exists():
            raise ConfigError(f"{flag} {path} does not exist")
    out = Path(out or f"engines/{p.name}")
    unet = load_unet(p, diffusion_ckpt, random_weights=random_weights, seed=seed)
    classifier = load_classifier(p, classifier_ckpt, random_weights=random_weights, seed=seed)
    # Announced only once the checkpoints have loaded: a bad checkpoint is one `error:` line.
    click.echo(f"building {p.name} ({precision}, {backend}) into {out}", err=True)
    provenance = {
        "command": "densepure-rt " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "random_weights": bool(random_weights),
        "diffusion_ckpt": str(diffusion_ckpt) if diffusion_ckpt else ("shipped" if p.shipped_unet and not random_weights else None),
        "classifier_ckpt": str(classifier_ckpt) if classifier_ckpt else ("shipped" if p.shipped_classifier and not random_weights else None),
    }
    options = BuildOptions(precision=precision, backend=backend, batch=batch, force=force, validate=not no_validate, provenance=provenance)
    manifest = build_engine(out, p, unet, classifier, options, log=lambda m: click.echo(m, err=True))
    click.echo(f"{out}: {p.name}, step {precision}, {len(manifest['files'])} files, checks passed")


# ------------------------------------------------------------------------------------------------ #
# certify / predict                                                                                  #
# ------------------------------------------------------------------------------------------------ #


def _open_data(engine, data, skip, max_images):
    from .data import digits_test_split, open_dataset, select

    shape = engine.image_shape
    if data is None:
        if engine.manifest.get("default_data") == "digits-test":
            dataset = digits_test_split(image_size=shape[1], channels=shape[0])
            spec = "digits-test"
        else:
            raise ConfigError(f"--data is required for a {engine.preset} engine (a CIFAR-10 test_batch, an image folder or an .npz)")
    else:
        dataset = open_dataset(data, image_size=shape[1], channels=shape[0])
        spec = str(Path(data).resolve())
    if tuple(dataset.image_shape) != tuple(shape):
        raise DataError(f"--data gives {dataset.image_shape} images but the engine expects {tuple(shape)}")
    indices = select(len(dataset), skip=skip, max_images=max_images)
    if not indices:
        raise ConfigError("no images selected: check --skip and --max")
    dataset.validate(indices)  # bad input stops the run before anything is written
    return dataset, indices, spec


def _common_options(f):
    options = [
        click.option("--engine", "engine_dir", required=True, type=click.Path(), metavar="DIR", help="Engine directory from `build`."),
        click.option("--data", type=click.Path(), metavar="PATH", help="CIFAR-10 test_batch, image folder, or .npz  [default: the engine's test split, if it ships one]"),
        click.option("--sigma", type=float, required=True, metavar="S", help="Smoothing noise level in [0,1] pixel units."),
        click.option("--steps", default="4", show_default=True, metavar="b", help="Reverse steps b, 'one-shot' (Carlini et al.), or 'none' (plain smoothing)."),
        click.option("--votes", type=int, default=10, show_default=True, metavar="K", help="Reverse runs voted per noisy sample."),
        click.option("--alpha", type=float, default=0.001, show_default=True, metavar="A", help="Failure probability."),
        click.option("--skip", type=int, default=1, show_default=True, metavar="N", help="Take every N-th image."),
        click.option("--max", "max_images", type=int, default=-1, show_default=True, metavar="N", help="Stop at dataset index N (-1: no limit)."),
        click.option("--batch", type=int, default=None, metavar="N", help="Noisy samples per engine call  [default: the engine's]"),
        click.option("--seed", type=int, default=0, show_default=True, metavar="N", help="Noise seed (noise is a pure function of seed, image, sample)."),
        click.option("--resume", is_flag=True, help="Continue a killed run in --out (same settings required)."),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True),
        click.option("--threads", type=int, default=None, metavar="N", help="CPU threads for the backend."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _run(mode, engine_dir, data, sigma, steps, votes, alpha, skip, max_images, batch, seed, resume, device, threads, quiet, out, n0, n):
    from tqdm import tqdm

    from .certify import validate_params
    from .results import PREDICT_HEADER, ResultsWriter, indices_todo
    from .runtime import open_engine

    validate_params(sigma, alpha, n0 if mode == "certify" else None, n)
    steps_value = _parse_steps(steps)
    if votes < 1:
        raise ConfigError(f"--votes must be >= 1 (got {votes})")
    if skip < 1:
        raise ConfigError(f"--skip must be >= 1 (got {skip})")
    with open_engine(engine_dir, device=device, threads=threads) as engine:
        batch = batch or int(engine.manifest.get("default_batch", 32))
        if batch < 1:
            raise ConfigError(f"--batch must be >= 1 (got {batch})")
        dataset, indices, spec = _open_data(engine, data, skip, max_images)
        options = {
            "mode": mode,
            "engine": str(Path(engine_dir).resolve()),
            "engine_sha256": engine.manifest["manifest_sha256"],
            "preset": engine.preset,
            "data": spec,
            "sigma": sigma,
            "steps": _steps_label(steps_value),
            "votes": votes,
            "n0": n0,
            "n": n,
            "alpha": alpha,
            "seed": seed,
            "skip": skip,
            "max": max_images,
            "ids": None,
            "batch": batch,
            "backend": engine.backend.name,
            "device": device,
            "version": __version__,
            "command": "densepure-rt " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        writer = ResultsWriter(Path(out)) if mode == "certify" else ResultsWriter(Path(out), header=PREDICT_HEADER)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        done = writer.open(options, resume=resume)
        todo = indices_todo(indices, done)
        per_image = (n0 + n) if mode == "certify" else n
        if done:
            click.echo(f"resuming {out}: {len(done)} images done, {len(todo)} to go", err=True)
        bar = tqdm(total=len(todo) * per_image, unit="sample", disable=quiet or None, dynamic_ncols=True, smoothing=0.05)
        images_done = 0
        start = time.time()
        with writer:
            for idx in todo:
                sample = dataset[idx]
                t0 = time.time()
                if mode == "certify":
                    cert, counts = engine.certify_counts(
                        sample.image, sigma, steps_value, votes, n0, n, alpha,
                        seed=seed, image_index=idx, batch=batch, progress=bar.update,
                    )
                    writer.write_certificate(idx, sample.label, cert, counts.counts, time.time() - t0)
                else:
                    pred = engine.predict(
                        sample.image, sigma, steps_value, votes, n, alpha,
                        seed=seed, image_index=idx, batch=batch, progress=bar.update,
                    )
                    writer.write_prediction(idx, sample.label, pred, time.time() - t0)
                images_done += 1
                elapsed = max(time.time() - start, 1e-9)
                bar.set_postfix(images=f"{images_done}/{len(todo)}", img_per_h=f"{3600 * images_done / elapsed:.0f}")
        bar.close()
    return len(done) + images_done


@main.command()
@_common_options
@click.option("--n0", type=int, default=100, show_default=True, metavar="N", help="Selection samples.")
@click.option("--n", type=int, default=1000, show_default=True, metavar="N", help="Estimation samples (published: 100,000 CIFAR-10, 10,000 ImageNet).")
@click.option("--out", type=click.Path(), default="results.tsv", show_default=True, metavar="FILE", help="Results TSV (options saved as FILE.json).")
def certify(engine_dir, data, sigma, steps, votes, alpha, skip, max_images, batch, seed, resume, device, threads, quiet, n0, n, out):
    """Certify images: Cohen et al.'s CERTIFY on DensePure's voted labels, one TSV row per image.

    \b
    Examples:
      densepure-rt certify --engine engines/digits --sigma 0.5 --steps 4 --votes 3 --n 500 --skip 9 --out d.tsv
      densepure-rt certify --engine engines/cifar10 --data cifar-10-batches-py --sigma 0.25 \\
          --steps 10 --votes 10 --n0 100 --n 100000 --skip 20 --batch 100 --out cifar_025.tsv
    """
    rows = _run("certify", engine_dir, data, sigma, steps, votes, alpha, skip, max_images, batch, seed, resume, device, threads, quiet, out, n0, n)
    from .report import format_table, report_table

    click.echo(f"{rows} images certified -> {out}")
    click.echo(format_table(report_table([out])))


@main.command()
@_common_options
@click.option("--n", type=int, default=100, show_default=True, metavar="N", help="Noisy samples for the hypothesis test.")
@click.option("--out", type=click.Path(), default="predictions.tsv", show_default=True, metavar="FILE")
def predict(engine_dir, data, sigma, steps, votes, alpha, skip, max_images, batch, seed, resume, device, threads, quiet, n, out):
    """Predict with the smoothed classifier (Cohen et al.'s PREDICT; -1 means abstain).

    \b
    Example:
      densepure-rt predict --engine engines/digits --sigma 0.25 --steps 4 --votes 5 --n 100 --max 40
    """
    rows = _run("predict", engine_dir, data, sigma, steps, votes, alpha, skip, max_images, batch, seed, resume, device, threads, quiet, out, None, n)
    import csv

    with open(out, newline="") as handle:
        reader = list(csv.DictReader(handle, delimiter="\t"))
    correct = sum(int(r["correct"]) for r in reader)
    abstain = sum(int(r["predict"]) == -1 for r in reader)
    click.echo(f"{rows} images -> {out}: accuracy {correct / max(len(reader), 1):.1%}, abstained {abstain}")


# ------------------------------------------------------------------------------------------------ #
# report / info                                                                                      #
# ------------------------------------------------------------------------------------------------ #


@main.command()
@click.argument("results", nargs=-1, required=True, type=click.Path())
@click.option("--radii", default="0,0.25,0.5,0.75,1.0", show_default=True, metavar="R,R,...", help="Radii of the table.")
@click.option("--plot", type=click.Path(), metavar="PNG", help="Write the certified-accuracy-vs-radius curve.")
@click.option("--json", "json_out", type=click.Path(), metavar="FILE", help="Also write the table as JSON.")
def report(results, radii, plot, json_out):
    """Certified accuracy at standard radii (best sigma per radius across files) and the curve.

    \b
    Example:
      densepure-rt report sigma025.tsv sigma050.tsv --plot curve.png
    """
    from .report import format_table, plot_curves, report_table

    try:
        radii_values = [float(r) for r in radii.split(",") if r.strip()]
    except ValueError:
        raise ConfigError(f"--radii must be comma-separated numbers (got {radii!r})") from None
    if not radii_values or any(r < 0 for r in radii_values):
        raise ConfigError(f"--radii must be non-negative numbers (got {radii!r})")
    table = report_table(results, radii_values)
    click.echo(format_table(table))
    if json_out:
        Path(json_out).write_text(json.dumps(table, indent=2) + "\n")
    if plot:
        click.echo(f"plot written to {plot_curves(results, plot)}")


@main.command()
@click.option("--engine", "engine_dir", required=True, type=click.Path(), metavar="DIR")
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def info(engine_dir, as_json):
    """Verify an engine directory and describe it."""
    from .manifest import load_manifest

    manifest = load_manifest(engine_dir)
    if as_json:
        click.echo(json.dumps(manifest, indent=2, sort_keys=True))
        return
    build = manifest.get("build", {})
    lines = [
        f"engine      {engine_dir} (verified: manifest and {len(manifest['files'])} file checksums)",
        f"preset      {manifest['preset']}  image {'x'.join(map(str, manifest['image_shape']))}  classes {manifest['num_classes']}",
        f"schedule    {manifest['schedule']['kind']}, {manifest['schedule']['num_timesteps']} steps",
        f"unet        {manifest['unet']['parameters']:,} parameters, step graph {manifest['precision']['step']}",
        f"classifier  {manifest['classifier']['name']}, {manifest['classifier']['parameters']:,} parameters, fp32",
        f"backend     {manifest['backend']['name']} (opset {manifest['backend']['opset']})",
        f"built       {build.get('date', '?')} with densepure-rt {manifest.get('toolkit_version')}, torch {build.get('torch', '?')}"
        + ("  [random weights]" if build.get("random_weights") else ""),
    ]
    click.echo("\n".join(lines))


if __name__ == "__main__":  # pragma: no cover
    main()
