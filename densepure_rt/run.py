"""One certification or prediction run as the command line starts it: the engine and the data
opened and checked, the results file and its options (resume, identities, locks), progress on the
terminal, and the work in this process or on Ray actors. The commands themselves (flags, help,
summaries) are in :mod:`densepure_rt.cli`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path

import click

from densepure_rt import __version__
from densepure_rt.errors import ConfigError, DataError, EngineError


# ------------------------------------------------------------------------------------------------ #
# build                                                                                              #
# ------------------------------------------------------------------------------------------------ #


def _open_data(engine, data, skip, max_images):
    """The dataset, the selected indices, the data as given (for the options file) and the data's
    identity: the sha256 of the selected images' indices, labels, shapes and float32 pixels
    (:meth:`densepure_rt.files.data.Dataset.validate`, computed while every selected image is checked).
    Labels the engine cannot give are refused here, before anything is written. Results files
    written before this identity carry :func:`densepure_rt.files.data.legacy_data_sha256` instead."""
    from densepure_rt.files.data import digits_test_split, open_dataset, select

    shape = engine.image_shape
    if data is None:
        if engine.manifest.default_data == "digits-test":
            dataset = digits_test_split(image_size=shape[1], channels=shape[0], num_classes=engine.num_classes)
            spec = "digits-test"
        else:
            raise ConfigError(f"--data is required for a {engine.preset} engine (a CIFAR-10 test_batch, an image folder or an .npz)")
    else:
        dataset = open_dataset(data, image_size=shape[1], channels=shape[0], num_classes=engine.num_classes)
        spec = str(data)
    if tuple(dataset.image_shape) != tuple(shape):
        raise DataError(f"--data gives {dataset.image_shape} images but the engine expects {tuple(shape)}")
    indices = select(len(dataset), skip=skip, max_images=max_images)
    if not indices:
        raise ConfigError("no images selected: check --skip and --max")
    digest = dataset.validate(indices)  # bad input stops the run before anything is written
    return dataset, indices, spec, digest


@dataclasses.dataclass
class RunTotals:
    """What one invocation did: images in its results file, images it wrote, the UNet evaluations
    of those, and how many of them went to noisy samples that no test read (started ahead of a
    decision, then dropped)."""

    images: int = 0
    written: int = 0
    unet_evals: int = 0
    dropped_evals: int = 0

    def write(self, writer, label: int, outcome) -> None:
        """Write ``outcome``'s row and count it."""
        from densepure_rt.scale.work import write_outcome

        write_outcome(writer, label, outcome)
        self.written += 1
        self.unet_evals += int(outcome.unet_evals)
        self.dropped_evals += int(getattr(outcome, "dropped_evals", 0))

    def line(self) -> str:
        """The summary's clause on the work, or '' when nothing was computed."""
        if not self.written:
            return ""
        share = f" ({100 * self.dropped_evals / self.unet_evals:.1f}%)" if self.unet_evals else ""
        return (f"; {self.unet_evals:,} UNet evaluations for {self.written} images, {self.dropped_evals:,}{share} on samples "
                "no test read")


class Progress:
    """Progress of a run on a terminal (a bar) or a log (stderr not a terminal: one line every
    ``every`` seconds).

    Fixed-n modes count samples against the known total. The sequential modes (``sequential``)
    cannot know their total, as each image stops when its test decides: they count images decided
    and the samples used so far. The time left comes from the throughput measured since the first
    samples were voted (the time the engine calls take to fill their pipeline at the start is not
    a rate), projected over the samples left (fixed n) or the images left (sequential)."""

    def __init__(self, mode: str, images: int, samples_per_image: int, quiet: bool, every: float, sequential: bool = False):
        self.mode, self.images, self.per_image, self.every, self.sequential = mode, images, samples_per_image, every, sequential
        self.samples = self.images_done = 0
        self.start = self.last = time.time()
        #: (time, samples, images) when the first samples were voted: rates are measured from there.
        self.first: tuple[float, int, int] | None = None
        self.bar = None
        self.lines = False
        if quiet:
            return
        if sys.stderr.isatty():
            from tqdm import tqdm

            if sequential:
                self.bar = tqdm(total=images, unit="image", dynamic_ncols=True, smoothing=0.05)
            else:
                self.bar = tqdm(total=images * samples_per_image, unit="sample", dynamic_ncols=True, smoothing=0.05)
        else:
            self.lines = True

    def update(self, n: int) -> None:
        """``n`` more samples voted."""
        self.samples += n
        if self.first is None and n > 0:  # the pipeline has filled: rates count from here
            self.first = (time.time(), self.samples, self.images_done)
        if self.bar is not None and not self.sequential:
            self.bar.update(n)
        elif self.lines and time.time() - self.last >= self.every:
            self._line()

    def image_done(self, skipped: int = 0) -> None:
        """One more image written; ``skipped``: samples of its budget a sequential test did not need."""
        self.images_done += 1
        if not self.sequential and skipped:
            self.update(skipped)
        if self.bar is not None:
            if self.sequential:
                self.bar.update(1)
                self.bar.set_postfix(samples=f"{self.samples:,}")
            else:
                elapsed = max(time.time() - self.start, 1e-9)
                self.bar.set_postfix(images=f"{self.images_done}/{self.images}", img_per_h=f"{3600 * self.images_done / elapsed:.0f}")

    def seconds_left(self, now: float | None = None) -> float | None:
        """The time left, from the throughput since the first samples were voted (None until it
        can be measured)."""
        now = time.time() if now is None else now
        if self.first is None or now <= self.first[0]:
            return None
        since, samples, images = self.first
        if self.sequential:
            decided = self.images_done - images
            return (self.images - self.images_done) * (now - since) / decided if decided > 0 else None
        done = self.samples - samples
        return (self.images * self.per_image - self.samples) * (now - since) / done if done > 0 else None

    def _line(self) -> None:
        self.last = now = time.time()
        elapsed = now - self.start
        rate = self.samples / elapsed if elapsed > 0 else 0.0
        left = self.seconds_left(now)
        left = f", about {datetime.timedelta(seconds=round(left))} left" if left is not None else ""
        if self.sequential:
            per = f" ({self.samples / self.images_done:,.0f} per decided image)" if self.images_done else ""
            click.echo(f"{self.mode}: {self.images_done}/{self.images} images decided, {self.samples:,} samples used{per}, "
                       f"{rate:.1f} samples/s{left}", err=True)
            return
        total = self.images * self.per_image
        click.echo(
            f"{self.mode}: {self.images_done}/{self.images} images, {self.samples}/{total} samples "
            f"({100 * self.samples / max(total, 1):.0f}%), {rate:.1f} samples/s{left}",
            err=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.lines and self.samples:
            self._line()


def run_mode(spec, engine_dir, data, skip, max_images, resume, device, threads, quiet, every, out, ray=None, actors=None,
             ray_timeout=30.0, kernels="portable", adopt_round=False):
    """One certify / predict run of ``spec`` (:class:`densepure_rt.spec.RunSpec`, validated) over
    the selected images. ``ray``: a Ray address ("auto", "local", host:port) to spread the images
    over Ray actors. ``adopt_round``: --round was not given, so a resumed file keeps its own."""
    from densepure_rt.sampling.noise import NOISE_VERSION
    from densepure_rt.modes import mode_of
    from densepure_rt.files.results import HEADERS, ResultsWriter, indices_todo
    from densepure_rt.runtime import open_engine

    mode = spec.mode
    if ray is None and actors is not None:
        raise ConfigError("--actors goes with --ray")
    out = _out_file(out, data)
    if engine_dir is None:
        from densepure_rt.files.manifest import BUNDLED_ENGINE

        engine_dir = BUNDLED_ENGINE
        if not quiet:
            click.echo(f"using the digits engine shipped with densepure-rt ({engine_dir}); --engine DIR for another", err=True)
    engine_dir = Path(engine_dir).expanduser().resolve()  # once, absolute: recorded, and what Ray actors open
    if threads is not None and ray is None:
        threads = _cap_threads(threads)
    # With --ray the driver reads the manifest only: the actors open the engine where the GPUs are.
    with open_engine(engine_dir, device=device, threads=threads, early_exit=spec.early_exit, metadata_only=ray is not None,
                     kernels=kernels) as engine:
        engine.reverse_schedule(spec.sigma, spec.steps)  # refuses a (sigma, b) the schedule cannot honour
        random_weights = engine.manifest.random_weights
        if spec.batch is None:
            spec = spec.replace(batch=engine.manifest.default_batch)
        # A resumed file keeps the round it was started with when --round is not given (another
        # round is another experiment); a new one reads one vote at a time.
        adopt = {"round": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1} if spec.sequential and adopt_round else {}
        dataset, indices, data_spec, data_digest = _open_data(engine, data, skip, max_images)
        if spec.images_per_call > len(indices):  # a bound on the images in flight: more than the run has is all of them
            spec = spec.replace(images_per_call=max(len(indices), 1))
        if spec.images_per_call > 1:
            from densepure_rt.arguments import check_staging

            check_staging(spec.images_per_call, engine.image_shape, device, name="--images-per-call ")
        # The most noisy samples one call of this run can hold (its calls hold samples of every image
        # of the run): buffers are sized by it, and the row limit and the memory are checked against
        # it before anything is written.
        per_call = spec.samples_per_image * max(len(indices), 1)
        engine.check_rows(min(spec.batch, per_call), spec.votes)
        executor = engine.executor  # None for a Ray driver (metadata only)
        options = {
            # The run's settings (densepure_rt.spec.RunSpec.to_dict: mode, sigma, steps, votes, n0, n,
            # radii, tol, alpha, seed, batch, round, early_exit, images_per_call). The sequential modes
            # decide after rounds of --round samples: another round gives other (equally valid) rows,
            # so it is part of the experiment there.
            **spec.to_dict(),
            # When --tol stops (densepure_rt.stats.sequential.STOP_RULE): another rule is another experiment.
            **mode_of(mode).options(spec),
            "early_exit": engine.early_exit_for() if spec.early_exit is None else spec.early_exit,
            "engine": str(engine_dir),
            # What the engine computes (graphs and output-changing settings): a rebuild from the same
            # weights continues the file; the manifest's own checksum (build date...) is kept for reference.
            "engine_id": engine.manifest.identity,
            "engine_manifest_sha256": engine.manifest.manifest_sha256,
            # Where the radii hold: [0, 1] pixels at the engine's size, noise before any classifier
            # preprocessing, and how the data was brought to that size (the engine's manifest).
            "image_space": engine.manifest.to_dict().get("image_space"),
            "random_weights": random_weights,
            "preset": engine.preset,
            "data": data_spec,
            # The selected images' indices, labels and decoded pixels (densepure_rt.files.data.Dataset.validate).
            "data_content_sha256": data_digest,
            "noise": NOISE_VERSION,
            "skip": skip,
            "max": max_images,
            "ids": None,
            # Which graphs ran: the portable ones or `build --device cuda`'s fused GPU graphs (other
            # kernels, other rounding): part of the experiment, a file continues with the same.
            "kernels": engine.kernels,
            # The engine format (manifest schema) the rows were computed with: a file of another
            # format is refused by its engine_id; this says why.
            "engine_format": engine.manifest.schema_version,
            "backend": executor.name if executor is not None else engine.manifest.backend,
            # What the graphs ran in, read back from the executor (OpenVINO: its compiled precision);
            # with --ray every actor's is checked against it.
            "precision": executor.effective_precision if executor is not None else engine.manifest.step_precision,
            "device": device,
            "ray": ray,
            "version": __version__,
            "command": "densepure-rt " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        totals = RunTotals()
        with ResultsWriter(Path(out), header=HEADERS[mode]) as writer:
            _refuse_other_loop(Path(out))
            done = writer.open(options, resume=resume, allowed=indices, legacy=_legacy_identities(engine, data), adopt=adopt)
            if "round" in writer.adopted:
                spec = spec.replace(round_size=int(writer.adopted["round"]))
                click.echo(f"resuming with --round {spec.round_size}, the round {out} was started with", err=True)
            todo = indices_todo(indices, done)
            if random_weights and not quiet:  # once the run starts; the summary line says it too
                click.echo(f"warning: {engine_dir} was built with --random-weights (for benchmarking): its predictions and "
                           "certificates mean nothing", err=True)
            # Sequential modes usually stop long before n: the bar then jumps at the end of an image.
            per_image = spec.samples_per_image
            if done:
                click.echo(f"resuming {out}: {len(done)} images done, {len(todo)} to go", err=True)
            if ray is not None:
                if todo:
                    _run_on_ray(engine, spec, dataset, todo, writer, totals, options, ray, actors, device, threads, quiet, every,
                                ray_timeout)
                totals.images = len(done) + len(todo)
                return totals
            progress = Progress(mode.split("-")[0], len(todo), per_image, quiet, every, sequential=spec.sequential)
            try:
                _stream(engine, dataset, todo, writer, totals, progress, spec)
            finally:
                progress.close()
    totals.images = len(done) + len(todo)
    return totals


def _refuse_other_loop(out: Path) -> None:
    """Refuse, in one line, to continue a results file whose options say its rows came from the wave
    loop of densepure-rt 0.2.0 (``"scheduling": "waves"``): this version samples with the scheduler
    only. Files of the scheduler (``"continuous"``) continue unchanged (the same rows)."""
    from densepure_rt.files.results import options_path

    path = options_path(out.expanduser())
    try:
        if not out.expanduser().is_file() or not path.is_file() or path.stat().st_size > (1 << 20):
            return
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return  # the results writer reports an unreadable options file
    if isinstance(saved, dict) and saved.get("scheduling") == "waves":
        raise ConfigError(f"--out {out} was started with --scheduling waves (densepure-rt 0.2.0's wave loop); this version "
                          "samples with the scheduler only and has no --scheduling: finish it with densepure-rt 0.2.0, or "
                          "choose another --out")


def _legacy_identities(engine, data) -> dict:
    """How results files of older versions identified the engine and the data (computed only when
    such a file is continued): the manifest's own sha256, and the sha256 of the data file or of a
    folder's listing (:func:`densepure_rt.files.data.legacy_data_sha256`)."""
    from densepure_rt.files.data import DIGITS_TEST_ASSET, legacy_data_sha256
    from densepure_rt.files.manifest import sha256_file

    def data_sha256() -> str:
        return sha256_file(DIGITS_TEST_ASSET) if data is None else legacy_data_sha256(Path(data).expanduser())

    return {"engine_sha256": lambda: engine.manifest.manifest_sha256, "data_sha256": data_sha256}


def random_note(out) -> str:
    """The summary's warning when ``out`` was computed by a random-weights engine (its options say so)."""
    from densepure_rt.files.results import options_path

    try:
        options = json.loads(options_path(Path(out).expanduser()).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    if isinstance(options, dict) and options.get("random_weights"):
        return " [random-weights engine: these numbers mean nothing]"
    return ""


#: Names of what a run reads (data, models, engines): a results file is never named like one.
DATA_LIKE_SUFFIXES = (".npz", ".npy", ".onnx", ".safetensors", ".pt", ".pth", ".ckpt", ".plan", ".engine", ".json", ".lock")


def _out_file(out: str, data: str | None = None) -> Path:
    """``--out`` as a results file path (``~`` expanded, as for --data), refused in one line when it
    is standard output, a folder (or a name ending in a path separator), named like a data, model
    or sidecar file, the data itself, or inside the data folder (which the readers list)."""
    from densepure_rt.files.data import IMAGE_EXTENSIONS
    from densepure_rt.files.outputs import same_file

    if out in ("", "-"):
        raise ConfigError(f"--out {out or repr(out)}: results go to a file (it is resumed and locked), not standard output: "
                          "give a file name such as results.tsv")
    if out.endswith(("/", os.sep)) or Path(out).expanduser().is_dir():
        raise ConfigError(f"--out {out} is a folder: give a results file such as {out.rstrip('/' + os.sep) or '.'}/results.tsv")
    path = Path(out).expanduser()
    name = path.name.lower()
    if name.endswith(DATA_LIKE_SUFFIXES + IMAGE_EXTENSIONS) or name in ("test_batch", "batches.meta") or name.startswith("data_batch_"):
        raise ConfigError(f"--out {out} is named like a data, model or options file: give the results a name ending in "
                          ".tsv, such as results.tsv")
    if data is not None and data != "digits-test":
        source = Path(data).expanduser()
        if same_file(path, source):
            raise ConfigError(f"--out {out} is the --data file: give the results another name")
        if source.is_dir() and os.path.realpath(path).startswith(os.path.join(os.path.realpath(source), "")):
            raise ConfigError(f"--out {out} is inside the --data folder {data}, whose files are read as images: "
                              "write the results elsewhere")
    return path


def _cap_threads(threads: int) -> int:
    """``--threads`` capped at the CPUs this process may run on (more threads than CPUs only queue)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    if threads > cpus:
        click.echo(f"--threads {threads} is more than the {cpus} CPUs available here: using {cpus}", err=True)
        return cpus
    return threads


def _run_on_ray(engine, spec, dataset, todo, writer, totals, options, address, actors, device, threads, quiet, every,
                ray_timeout=30.0) -> None:
    """Certify ``todo`` on Ray actors (:class:`densepure_rt.scale.ray.RayPool`); this process alone
    writes the rows, in completion order, each flushed as it arrives. ``spec.images_per_call``:
    images an actor streams at a time."""
    from densepure_rt.scale.ray import RayPool

    labels = {}

    def load(idx):
        sample = dataset[idx]
        labels[idx] = sample.label
        return sample.image

    def log(line: str) -> None:
        click.echo(line, err=True)

    pool = RayPool(str(engine.directory), engine.manifest.manifest_sha256, address=address, actors=actors, device=device,
                   kernels=engine.kernels,
                   threads=threads, early_exit=spec.early_exit, connect_timeout=ray_timeout, log=log)
    progress = None
    try:
        pool.start(images=-(-len(todo) // spec.images_per_call))
        if pool.precision != options["precision"]:
            raise EngineError(
                f"the Ray actors run the engine in {pool.precision}, the run records {options['precision']}: "
                "every node must compute the same"
            )
        log(f"{len(pool.actors)} Ray actor{'s' if len(pool.actors) > 1 else ''}: " + ", ".join(f"{i['host']} (pid {i['pid']})" for i in pool.info))
        progress = Progress(spec.mode.split("-")[0], len(todo), spec.samples_per_image, quiet, every, sequential=spec.sequential)
        for outcome in pool.map(spec, todo, load, group=spec.images_per_call, progress=None if quiet else progress.update):
            totals.write(writer, labels.pop(outcome.idx), outcome)
            progress.image_done()
    finally:
        if progress is not None:
            progress.close()
        pool.close()


def _stream(engine, dataset, todo, writer, totals, progress, spec) -> None:
    """Every image of ``todo`` through one scheduler run (:func:`densepure_rt.scale.work.run_stream`):
    rows written as images finish (flushed one by one, so a killed run resumes with the images not
    written); ``--images-per-call`` above 1 bounds the images in flight."""
    from densepure_rt.scale.work import run_stream

    labels = {}

    def items():
        for idx in todo:
            sample = dataset[idx]
            labels[idx] = sample.label
            yield idx, sample.image

    def emit(outcome, samples: int) -> None:
        totals.write(writer, labels.pop(outcome.idx), outcome)
        progress.image_done(skipped=spec.samples_per_image - samples)  # what a sequential test did not need

    run_stream(engine, spec, items(), emit, progress=progress.update, images=len(todo))
