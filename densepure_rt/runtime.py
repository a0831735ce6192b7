"""The Python API: open an engine directory once, then stream images through a run description.

    from densepure_rt.runtime import open_engine
    from densepure_rt.spec import RunSpec

    with open_engine("engines/digits") as engine:
        spec = RunSpec("certify", sigma=0.5, steps=4, votes=5, n0=100, n=1000, alpha=0.001)
        engine.stream(spec, enumerate(images), lambda s: print(s.idx, s.result[0].radius))
        cert = engine.certify(image, sigma=0.5, steps=4, votes=5, n0=100, n=1000, image_index=0)

:meth:`Engine.stream` is the one way to run: a :class:`~densepure_rt.spec.RunSpec` (the mode and
its statistics settings, :mod:`densepure_rt.modes`) over (image index, image) pairs, every image
through one run of the scheduler. ``certify``, ``certify_counts``, ``predict``, ``certify_radii``
and ``certify_until`` are thin calls of it for one image. ``image`` is float32 [C x H x W] in
[0, 1] at the engine's size. Noise is a pure function of (seed, image index, phase, sample index),
so results do not depend on the batch size or on the other images in flight; every image takes its
index (two images with one index would share their noise, and their certificates would not be
independent).
"""

from __future__ import annotations


import os
import sys

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from densepure_rt.sampling.loop import BatchLoop
from densepure_rt.sampling.scheduler import Scheduler, SchedulerStats
from densepure_rt.sampling.stream import Streamed, run_stream
from densepure_rt.certificates import CountsResult, EarlyStopCertificate, RadiiCertificate
from densepure_rt.modes import mode_of
from densepure_rt.spec import RunSpec
from densepure_rt.stats.cohen import Certificate, Prediction
from densepure_rt.files.data import check_image
from densepure_rt.arguments import check_kernels, check_staging, sampling as _sampling
from densepure_rt.errors import ConfigError, EngineError, param
from densepure_rt.limits import check_rows, rows_per_call
from densepure_rt.files.manifest import Manifest, as_manifest, load_manifest
from densepure_rt.schedule import ReverseSchedule, make_schedule, parse_steps, reverse_schedule

__all__ = ["Engine", "open_engine", "RunSpec", "Streamed", "CountsResult", "RadiiCertificate", "EarlyStopCertificate"]

Progress = Optional[Callable[[int], None]]

class Engine:
    """An opened engine directory: manifest verified, its executor loaded under the scheduler. A context manager.

    Opening (:func:`open_engine`), :meth:`stream` (the one way to run: a RunSpec over images), the
    single-image calls built on it, and :meth:`close`."""

    #: Whether :meth:`close` ran (the sampling entry points then refuse, :mod:`densepure_rt.arguments`).
    _closed = False
    #: The engine directory and its manifest (set when opened; None on an engine made for a test).
    directory = None
    manifest = None

    def __init__(
        self,
        directory: str | Path,
        backend: str = "auto",
        device: str = "cpu",
        threads: int | None = None,
        early_exit: bool | None = None,
        cuda_graph: bool = True,
        metadata_only: bool = False,
        kernels: str = "portable",
    ):
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1):
            raise ConfigError(f"{param('threads')} must be an integer >= 1, or None for the backend's choice (got {threads!r})")
        if threads is None:
            threads = default_threads()
        self._scheduler: Scheduler | None = None
        #: The engine directory, resolved once (absolute): what results record and Ray actors open.
        self.directory = Path(directory).expanduser().resolve()
        self.device = device
        #: Stop a noisy sample's K runs once its vote is decided (identical votes, less work);
        #: None: on (:meth:`early_exit_for`).
        self.early_exit = None if early_exit is None else bool(early_exit)
        #: The verified, typed manifest (:class:`~densepure_rt.files.manifest.Manifest`), parsed once here.
        self.manifest = load_manifest(self.directory)
        self.image_shape = self.manifest.image_shape
        self.num_classes = self.manifest.num_classes
        self.preset = self.manifest.preset
        #: The most rows (noisy samples x K) one call of the step / classifier graph may hold
        #: (:mod:`densepure_rt.limits`).
        self.step_rows, self.classifier_rows = rows_per_call(self.manifest)
        sched = self.manifest.schedule
        self._schedule = make_schedule(sched.kind, sched.num_timesteps, sched.rescale_timesteps)
        #: Which graphs run: "portable" (standard ONNX, every provider) or "fused" (``build --device
        #: cuda``: GroupNorm + SiLU fused for ONNX Runtime's CUDA provider; checked when opened even
        #: with ``metadata_only``, so a Ray driver refuses what its actors would).
        self.kernels = check_kernels(kernels, self.manifest, device, self.directory)
        #: The batch loop over the engine's executor (:attr:`executor`) on ``device``. None with
        #: ``metadata_only``: the manifest and schedule without sessions (a Ray driver, whose actors
        #: open the engine where the GPUs are).
        self.loop: BatchLoop | None = None if metadata_only else open_loop(
            backend, self.directory, self.manifest, device=device, threads=threads, cuda_graph=cuda_graph, kernels=kernels
        )
        self._prepared: tuple | None = None
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------- #
    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def executor(self):
        """The runtime's executor of the engine's graphs (:mod:`densepure_rt.executors`); None with ``metadata_only``."""
        return self.loop.executor if self.loop is not None else None

    def close(self) -> None:
        """Free the executor's sessions and the loop's buffers; the engine cannot run afterwards."""
        self._closed = True
        if self.loop is not None:
            self.loop.executor.close()
            self.loop = None

    # -- schedule ---------------------------------------------------------------------------- #
    def reverse_schedule(self, sigma: float, steps: int | str) -> ReverseSchedule:
        """The frozen reverse schedule of this engine's diffusion model for (sigma, b).

        ``steps`` is b >= 1, 'one-shot' or 'none'; a (sigma, b) the schedule cannot honour (more
        steps than t* allows, sigma beyond the schedule) is a :class:`ConfigError`.
        """
        return reverse_schedule(self._schedule, sigma, parse_steps(steps))

    def early_exit_for(self) -> bool:
        """Whether a noisy sample's runs stop once its vote is decided: as asked when opened, else on
        (the scheduler's calls stay full of other rows while samples exit early, on every device).
        The labels are the same either way."""
        return True if self.early_exit is None else self.early_exit

    def check_rows(self, batch: int, votes: int) -> None:
        """Refuse ``batch`` noisy samples x ``votes`` runs per call above the engine's row limit or
        the memory available (:func:`densepure_rt.limits.check_rows`: the modelled peak of a run
        with this engine's weights and classifier chunk), before anything is allocated."""
        from densepure_rt.files.manifest import graph_path

        if self.loop is None:  # metadata only (a Ray driver): the actors check their own memory
            check_rows(self.manifest, batch, votes, None)
            return
        weights = 0
        for graph in ("step", "classifier"):
            path = graph_path(self.directory, self.manifest, graph, self.kernels)
            for name in (path.name, path.name + ".data"):  # the graph and its external weights, if any
                if name in self.manifest.files:
                    try:
                        weights += (path.parent / name).stat().st_size
                    except OSError:
                        pass
        check_rows(self.manifest, batch, votes, self.device, weights_bytes=weights,
                   classifier_rows=self.loop.classifier_limit())

    def _prepare(self, sigma: float, steps: int | str, votes: int, batch: int, samples: int | None = None,
                 early_exit: bool | None = None) -> ReverseSchedule:
        """Prepare the loop for (sigma, b, K) and calls of ``batch`` noisy samples x K rows, or of
        ``samples`` where that is fewer (the most any call of the work ahead can hold: buffers are
        sized by what a call can use, not by the request). ``early_exit``: None for the engine's own
        (:meth:`early_exit_for`)."""
        for name, value in (("votes", votes), ("batch", batch)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"{param(name)} must be an integer >= 1 (got {value!r})")
        if samples is not None:
            batch = max(min(int(batch), int(samples)), 1)
        rs = self.reverse_schedule(sigma, steps)  # refuses non-finite schedules; the loop checks again
        early_exit = self.early_exit_for() if early_exit is None else bool(early_exit)
        key = (float(sigma), rs.steps, int(votes), int(batch), early_exit)
        if self._prepared != key:
            self.check_rows(int(batch), int(votes))
            self.loop.prepare(rs, int(votes), int(batch), early_exit=early_exit)
            self._prepared = key
            self._scheduler = None
        return rs

    def scheduler(self) -> Scheduler:
        """The scheduler over the prepared loop (after :meth:`_prepare`): batch x K rows per call;
        made again when the preparation changes."""
        if self._scheduler is None:
            self._scheduler = Scheduler(self.loop, self.loop.batch * self.loop.votes, early_exit=self.loop.early_exit)
        return self._scheduler

    def _image(self, image: np.ndarray, image_index: int) -> np.ndarray:
        image = np.asarray(image)
        if image.dtype.kind not in "fiu":  # a complex, boolean, object or text array is not an image
            raise ConfigError(f"image {image_index} holds {image.dtype} values: give real pixel values in [0, 1] "
                              "(float32 [C x H x W])")
        if image.dtype != np.float32:
            image = image.astype(np.float32)
        check_image(image, self.image_shape, image_index)
        return image

    # -- the one way to run -------------------------------------------------------------------- #
    @_sampling
    def stream(self, spec: RunSpec | str, items, emit: Callable[[Streamed], None], *, in_flight: int | None = None,
               progress: Progress = None, images: int | None = None, **settings) -> SchedulerStats:
        """Run ``spec`` over the images of ``items`` through one scheduler run; returns what the
        scheduler did (:class:`~densepure_rt.sampling.scheduler.SchedulerStats`).

        spec: a :class:`~densepure_rt.spec.RunSpec`, or a mode name ("certify", "predict",
        "certify-radii", "certify-until") with the spec's settings as keywords (``sigma=0.5, n=1000``).
        items: (image index, image float32 [C x H x W] in [0, 1]) pairs, read as images finish (an
        iterator may be endless); the index keys the image's noise. emit(:class:`Streamed`): called
        with each image's outcome as it finishes (in the order images finish); ``Streamed.result``
        is the mode's result (:mod:`densepure_rt.modes`): (Certificate, CountsResult) for "certify",
        Prediction, RadiiCertificate or EarlyStopCertificate. in_flight: the most images staged at
        once (default: ``spec.images_per_call`` when above 1, else enough for the sequential tests'
        bounded samples to fill a call). progress(k): k more noisy samples voted. images: how many
        ``items`` holds, if known (calls then hold no more rows than all their samples).
        """
        if isinstance(spec, str):
            spec = RunSpec(spec, **settings)
        elif settings:
            raise ConfigError(f"settings {', '.join(sorted(settings))} go into the RunSpec when one is given")
        mode = mode_of(spec.mode)
        batch = spec.batch if spec.batch is not None else self.manifest.default_batch
        samples = None if images is None else spec.samples_per_image * max(int(images), 1)
        self._prepare(spec.sigma, spec.steps, spec.votes, batch, samples=samples, early_exit=spec.early_exit)
        sch = self.scheduler()
        if in_flight is None:
            if spec.images_per_call > 1:
                in_flight = spec.images_per_call
            else:
                in_flight = -(-sch.slots // (sch.first * int(spec.round_size))) + 1 if mode.sequential else 2
        if isinstance(in_flight, bool) or not isinstance(in_flight, (int, np.integer)) or in_flight < 1:
            raise ConfigError(f"{param('in_flight')} (images in flight) must be an integer >= 1 (got {in_flight!r})")
        check_staging(int(in_flight), self.image_shape, self.device)
        classes = self.num_classes

        def checked():
            for idx, image in items:
                yield int(idx), self._image(image, int(idx)), lambda i: mode.work(spec, i, classes)

        return run_stream(sch, self.loop.device.stage, self.image_shape, checked(), seed=spec.seed, in_flight=int(in_flight),
                          emit=emit, progress=progress)

    # -- one image: thin calls of stream ------------------------------------------------------- #
    def _one(self, spec: RunSpec, image: np.ndarray, image_index: int, progress: Progress):
        """``spec`` on one image (:meth:`stream` of it alone): its result, with the settings it was
        computed with and the engine's identity (``result.settings``)."""
        got: list[Streamed] = []
        self.stream(spec, [(image_index, image)], got.append, progress=progress, images=1)
        (streamed,) = got
        settings = {**mode_of(spec.mode).settings(spec), "image_index": int(image_index),
                    "engine": None if self.directory is None else str(self.directory),
                    "engine_id": self.manifest.identity if self.manifest is not None else None}
        if spec.mode == "certify":
            cert, counts = streamed.result
            return dataclasses.replace(cert, settings=settings), counts
        return dataclasses.replace(streamed.result, settings=settings)

    @_sampling
    def certify(self, image: np.ndarray, sigma: float, steps: int | str = 4, votes: int = 10, n0: int = 100, n: int = 1000,
                alpha: float = 0.001, *, seed: int = 0, image_index: int, batch: int | None = None,
                progress: Progress = None) -> Certificate:
        """Cohen et al.'s CERTIFY of the DensePure smoothed classifier at ``image`` float32 [C x H x W]
        in [0, 1]: c_A from ``n0`` selection samples, the radius from ``n`` estimation samples
        (:meth:`certify_counts` also gives the vote counts)."""
        return self.certify_counts(image, sigma, steps, votes, n0, n, alpha, seed=seed, image_index=image_index, batch=batch,
                                   progress=progress)[0]

    @_sampling
    def certify_counts(self, image: np.ndarray, sigma: float, steps: int | str = 4, votes: int = 10, n0: int = 100,
                       n: int = 1000, alpha: float = 0.001, *, seed: int = 0, image_index: int, batch: int | None = None,
                       progress: Progress = None) -> tuple[Certificate, CountsResult]:
        """:meth:`certify`, also returning the vote counts of both phases ([num_classes] int64 each)
        and the UNet evaluations they took (:class:`CountsResult`)."""
        spec = RunSpec("certify", sigma, steps, votes, n0, n, alpha, seed=seed, batch=batch)
        return self._one(spec, image, image_index, progress)

    @_sampling
    def predict(self, image: np.ndarray, sigma: float, steps: int | str = 4, votes: int = 10, n: int = 100,
                alpha: float = 0.001, *, seed: int = 0, image_index: int, batch: int | None = None,
                progress: Progress = None) -> Prediction:
        """Cohen et al.'s PREDICT of the DensePure smoothed classifier at ``image`` float32 [C x H x W]
        in [0, 1] from ``n`` noisy samples (-1: abstain)."""
        spec = RunSpec("predict", sigma, steps, votes, None, n, alpha, seed=seed, batch=batch)
        return self._one(spec, image, image_index, progress)

    @_sampling
    def certify_radii(self, image: np.ndarray, sigma: float, radii, steps: int | str = 4, votes: int = 10, n0: int = 100,
                      n_max: int = 10000, alpha: float = 0.001, *, seed: int = 0, image_index: int, batch: int | None = None,
                      progress: Progress = None, round_size: int | None = None, selection: str | None = None) -> RadiiCertificate:
        """Is the smoothed classifier certifiably robust at each target radius? Anytime-valid.

        Selects ``c_a`` from at most ``n0`` selection samples (CERTIFY's argmax, stopped early once
        the leader is clear: :func:`densepure_rt.stats.sequential.selection_done`), then draws
        estimation samples in rounds of ``round_size`` (default: 1) and, after each round, tests H0:
        p_a <= Phi(R / sigma) for every target R with one confidence sequence on p_a
        (:class:`densepure_rt.stats.sequential.TargetRadiiTest`). Stops when every target is
        certified or futile, or at ``n_max`` samples. Guarantee: the probability that any target
        with p_a <= Phi(R / sigma) is certified is at most alpha, whatever the number of rounds and
        whichever class the selection picked (``selection``: the rule, a key of
        :data:`densepure_rt.stats.selection.SELECTION_RULES`; default "clear-leader"). The estimation samples are those of fixed-n CERTIFY
        with the same seed: keeping the larger radius of both runs on one image doubles the error to
        2 alpha (use another seed for the second run).
        """
        spec = RunSpec("certify-radii", sigma, steps, votes, n0, n_max, alpha, radii=tuple(radii) if radii is not None else None,
                       round_size=round_size, seed=seed, batch=batch, selection=selection)
        return self._one(spec, image, image_index, progress)

    @_sampling
    def certify_until(self, image: np.ndarray, sigma: float, tol: float, steps: int | str = 4, votes: int = 10,
                      n0: int = 100, n_max: int = 10000, alpha: float = 0.001, *, seed: int = 0, image_index: int,
                      batch: int | None = None, progress: Progress = None, round_size: int | None = None,
                      selection: str | None = None) -> EarlyStopCertificate:
        """Cohen's CERTIFY output (the largest certified radius) with early stopping. Anytime-valid.

        As :meth:`certify_radii` for the selection; then estimation rounds until more samples stop
        paying off: the whole remaining budget would gain the radius less than ``tol`` (the stop
        rule :data:`densepure_rt.stats.sequential.STOP_RULE`), or it cannot gain ``tol`` at all any
        more, or no radius is reachable, or ``n_max`` samples were used
        (:class:`densepure_rt.stats.sequential.EarlyStopRadius`). The radius comes from a lower
        confidence sequence on p_a, valid at any stopping time: P(radius > sigma * Phi^-1(p_a)) <=
        alpha. An empty running interval (reason "inconsistent", a detected coverage failure)
        abstains: prediction -1, radius 0. Same estimation samples as fixed-n CERTIFY with the same
        seed (see :meth:`certify_radii`).
        """
        spec = RunSpec("certify-until", sigma, steps, votes, n0, n_max, alpha, tol=tol, round_size=round_size, seed=seed,
                       batch=batch, selection=selection)
        return self._one(spec, image, image_index, progress)


#: The environment variable that gives the CPU threads of an engine opened with ``threads=None``
#: (``--threads`` not given): several processes on one machine then take one core or a few each
#: instead of every core each. Unset or empty: the backend's choice (every core).
THREADS_VARIABLE = "DENSEPURE_RT_THREADS"


def default_threads() -> int | None:
    """The CPU threads :data:`THREADS_VARIABLE` asks for, or None where it is unset or empty."""
    value = os.environ.get(THREADS_VARIABLE, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{THREADS_VARIABLE}={value!r} is not a thread count: set it to an integer >= 1, "
                          "or unset it for the backend's choice")
    return int(value)


def open_engine(
    directory: str | Path,
    backend: str = "auto",
    device: str = "cpu",
    threads: int | None = None,
    early_exit: bool | None = None,
    cuda_graph: bool = True,
    metadata_only: bool = False,
    kernels: str = "portable",
) -> Engine:
    """Open and verify an engine directory (see :class:`Engine`). ``early_exit=False`` runs all K
    runs of every noisy sample (same votes, more work); None (default) is on
    (:meth:`Engine.early_exit_for`). ``threads``: CPU threads of the backend's sessions; None takes
    :data:`THREADS_VARIABLE` from the environment where it is set, else the backend's choice. ``cuda_graph``: on a GPU, replay the full batch's step through ONNX Runtime's CUDA graph where
    ONNX Runtime accepts it (every node on the CUDA provider); ignored on the CPU. ``metadata_only``:
    verify the directory and read its manifest and schedule, but open no sessions (``engine.loop``
    is None; what a Ray driver needs).
    ``kernels``: "portable" (default) or "fused", the GPU graphs of an engine built with ``--device
    cuda`` (ONNX Runtime's CUDA provider only; see :func:`check_kernels`)."""
    return Engine(
        directory, backend=backend, device=device, threads=threads, early_exit=early_exit, cuda_graph=cuda_graph,
        metadata_only=metadata_only, kernels=kernels,
    )


def open_loop(runtime: str, directory: str | Path, manifest: Manifest, device: str = "cpu", threads: int | None = None,
              cuda_graph: bool = True, kernels: str = "portable") -> BatchLoop:
    """The batch loop over the executor of ``runtime`` (``"auto"``: the one the engine was built for)
    on ``device``; refuses a runtime the manifest was not built for, or a device it cannot run on.

    The one path from the engine to its graphs: device (:mod:`densepure_rt.sampling.device`) ->
    executor (:mod:`densepure_rt.executors`) -> :class:`~densepure_rt.sampling.loop.BatchLoop`.
    What has run on which hardware: docs/backends.md."""
    from densepure_rt.executors.registry import get_backend
    from densepure_rt.sampling.device import open_device

    manifest = as_manifest(manifest)
    built = manifest.backend
    if runtime not in ("auto", built):
        raise EngineError(f"this engine was built for the {built} backend, not {runtime}: rebuild it with --backend {runtime}")
    backend = get_backend(built)
    backend.check_device(device)
    if backend.require is not None:
        backend.require()  # its one-line install hint before any device work
    dev = open_device(device)
    executor = backend.open_executor(directory, manifest, dev, device=device, threads=threads, cuda_graph=cuda_graph,
                                     kernels=kernels, log=_warn)
    return BatchLoop(executor, dev, manifest.image_shape, manifest.num_classes, classifier_rows=rows_per_call(manifest)[1])


def _warn(message: str) -> None:
    print(f"densepure-rt: {message}", file=sys.stderr)
