"""The Python API: open an engine directory once, then certify or predict numpy images in a loop.

    from densepure_rt.runtime import open_engine

    with open_engine("engines/digits") as engine:
        cert = engine.certify(image, sigma=0.5, steps=4, votes=5, n0=100, n=1000, alpha=0.001, image_index=0)
        print(cert.prediction, cert.radius)

``image`` is float32 [C x H x W] in [0, 1] at the engine's size. Noise is a pure function of
(seed, image_index, phase, sample index), so results do not depend on the batch size; every
single-image call takes the image's index (two images certified with one index would share their
noise, and their certificates would not be independent).
"""

from __future__ import annotations


import sys

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from densepure_rt.sampling.loop import BatchLoop
from densepure_rt.sampling.scheduler import Job, Scheduler, SchedulerStats
from densepure_rt.certificates import CountsResult, EarlyStopCertificate, RadiiCertificate
from densepure_rt.stats.cohen import Certificate, Prediction, certify, predict, validate_params
from densepure_rt.files.data import check_image
from densepure_rt.arguments import check_kernels, check_staging, sampling as _sampling
from densepure_rt.errors import ConfigError, EngineError, param
from densepure_rt.limits import check_rows, rows_per_call
from densepure_rt.files.manifest import Manifest, as_manifest, load_manifest
from densepure_rt.sampling.noise import ESTIMATION, PREDICTION, SELECTION
from densepure_rt.schedule import ReverseSchedule, make_schedule, parse_steps, reverse_schedule

__all__ = ["Engine", "open_engine", "CountsResult", "RadiiCertificate", "EarlyStopCertificate"]

Progress = Optional[Callable[[int], None]]

class Engine:
    """An opened engine directory: manifest verified, its executor loaded under the batch loop. A context manager."""

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

    def _prepare(self, sigma: float, steps: int | str, votes: int, batch: int, samples: int | None = None) -> ReverseSchedule:
        """Prepare the loop for (sigma, b, K) and batches of ``batch`` noisy samples, or of
        ``samples`` where that is fewer (the most any call of the work ahead can hold: buffers are
        sized by what a call can use, not by the request)."""
        for name, value in (("votes", votes), ("batch", batch)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"{param(name)} must be an integer >= 1 (got {value!r})")
        if samples is not None:
            batch = max(min(int(batch), int(samples)), 1)
        rs = self.reverse_schedule(sigma, steps)  # refuses non-finite schedules; the loop checks again
        early_exit = self.early_exit_for()
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

    def _scheduled_counts(self, jobs, *, seed: int, progress: Progress, evals: list | None) -> list[np.ndarray]:
        """Per-class counts of (image, image_index, phase, num) jobs through the scheduler (after
        :meth:`_prepare`): batch x K rows per call."""
        jobs = list(jobs)
        images = np.stack([img for img, _, _, _ in jobs]) if jobs else np.zeros((0, *self.image_shape), dtype=np.float32)
        staged = self.loop.device.stage(images)
        stats = SchedulerStats()
        counts = self.scheduler().counts(staged, [Job(k, int(idx), int(phase), int(num)) for k, (_, idx, phase, num) in enumerate(jobs)],
                                        seed, progress=progress, stats=stats)
        if evals is not None:
            evals[:] = [int(e) for e in stats.per_job_unet_evals]
        return counts

    # -- sampling ---------------------------------------------------------------------------- #
    @_sampling
    def sample_counts(
        self,
        image: np.ndarray,
        num: int,
        phase: int,
        *,
        seed: int,
        image_index: int,
        batch: int,
        progress: Progress = None,
    ) -> np.ndarray:
        """Per-class counts [num_classes] int64 of ``num`` voted labels (after :meth:`_prepare`).

        A label outside [0, num_classes), or a batch that returns the wrong number of labels, is an
        :class:`EngineError`: dropping such labels would shrink n and inflate the bound.
        """
        return self._scheduled_counts([(image, image_index, phase, num)], seed=seed, progress=progress, evals=None)[0]

    @_sampling
    def sample_counts_many(self, jobs, *, seed: int, batch: int, progress: Progress = None, evals: list | None = None) -> list[np.ndarray]:
        """Per-class counts of several (image, image_index, phase, num) jobs, with batches that mix
        images (after :meth:`_prepare`): the samples of all jobs are taken in order, ``batch`` at a
        time, so a job of fewer samples than a batch (the n0 phase) shares its batch with the next.

        Each job's counts equal :meth:`sample_counts` of that job alone: noise is a pure function of
        (seed, image index, phase, sample), not of the batch (test). ``evals``: a list that receives each job's UNet
        evaluations (its samples' runs times the schedule's calls: exact, also when batches mix jobs).
        """
        jobs = [(self._image(img, idx), int(idx), int(phase), int(num)) for img, idx, phase, num in jobs]
        return self._scheduled_counts(jobs, seed=seed, progress=progress, evals=evals)

    @_sampling
    def certify_many(self, images, sigma: float, steps: int | str = 4, votes: int = 10, n0: int = 100, n: int = 1000,
                     alpha: float = 0.001, *, seed: int = 0, image_indices=None, batch: int | None = None,
                     progress: Progress = None) -> list[Certificate]:
        """:meth:`certify` of several images (each float32 [C x H x W] in [0, 1]) at once, in batches
        that mix their noisy samples: one :class:`Certificate` per image, the same as certifying each
        alone with its image index (``image_indices``, default 0, 1, 2, ...) as the key of its noise.
        :meth:`certify_many_counts` also returns each image's vote counts."""
        pairs = self.certify_many_counts(images, sigma, steps, votes, n0, n, alpha, seed=seed, image_indices=image_indices,
                                         batch=batch, progress=progress)
        return [cert for cert, _ in pairs]

    @_sampling
    def certify_many_counts(
        self,
        images,
        sigma: float,
        steps: int | str = 4,
        votes: int = 10,
        n0: int = 100,
        n: int = 1000,
        alpha: float = 0.001,
        *,
        seed: int = 0,
        image_indices=None,
        batch: int | None = None,
        progress: Progress = None,
    ) -> list[tuple[Certificate, CountsResult]]:
        """:meth:`certify_counts` of several images at once, in batches that mix images (both phases
        of every image share the batches): one (Certificate, CountsResult) pair per image, the same
        as one image at a time, with fewer partly filled batches. ``image_indices`` default to 0,
        1, 2, ... (they key the noise)."""
        validate_params(sigma, alpha, n0, n)
        images = list(images)
        indices = list(range(len(images))) if image_indices is None else [int(i) for i in image_indices]
        if len(indices) != len(images):
            raise ConfigError(f"{len(images)} images but {len(indices)} image indices")
        self._prepare(sigma, steps, votes, batch, samples=len(images) * (int(n0) + int(n)))
        jobs = []
        for img, idx in zip(images, indices):
            jobs += [(img, idx, SELECTION, n0), (img, idx, ESTIMATION, n)]
        evals: list[int] = []
        counts = self.sample_counts_many(jobs, seed=seed, batch=batch, progress=progress, evals=evals)
        out = []
        for k in range(len(images)):
            c0, c = counts[2 * k], counts[2 * k + 1]
            # Each image is charged the runs its own samples took: the same as certifying it alone.
            out.append((certify(c0, c, sigma, alpha), CountsResult(c0, c, evals[2 * k] + evals[2 * k + 1])))
        return out

    def _image(self, image: np.ndarray, image_index: int) -> np.ndarray:
        image = np.asarray(image)
        if image.dtype.kind not in "fiu":  # a complex, boolean, object or text array is not an image
            raise ConfigError(f"image {image_index} holds {image.dtype} values: give real pixel values in [0, 1] "
                              "(float32 [C x H x W])")
        if image.dtype != np.float32:
            image = image.astype(np.float32)
        check_image(image, self.image_shape, image_index)
        return image

    @_sampling
    def certify(
        self,
        image: np.ndarray,
        sigma: float,
        steps: int | str = 4,
        votes: int = 10,
        n0: int = 100,
        n: int = 1000,
        alpha: float = 0.001,
        *,
        seed: int = 0,
        image_index: int,
        batch: int | None = None,
        progress: Progress = None,
    ) -> Certificate:
        """Cohen et al.'s CERTIFY of the DensePure smoothed classifier at ``image`` [C x H x W] in [0, 1]."""
        cert, _ = self.certify_counts(
            image, sigma, steps, votes, n0, n, alpha, seed=seed, image_index=image_index, batch=batch, progress=progress
        )
        return cert

    @_sampling
    def certify_counts(
        self,
        image: np.ndarray,
        sigma: float,
        steps: int | str,
        votes: int,
        n0: int,
        n: int,
        alpha: float,
        *,
        seed: int = 0,
        image_index: int,
        batch: int | None = None,
        progress: Progress = None,
    ) -> tuple[Certificate, CountsResult]:
        """:meth:`certify`, also returning the vote counts of both phases (for results files)."""
        validate_params(sigma, alpha, n0, n)
        image = self._image(image, image_index)
        self._prepare(sigma, steps, votes, batch, samples=max(int(n0), int(n)))
        common = dict(seed=seed, image_index=image_index, batch=batch, progress=progress)
        evals = self.loop.unet_evals
        counts0 = self.sample_counts(image, n0, SELECTION, **common)
        counts = self.sample_counts(image, n, ESTIMATION, **common)
        cert = dataclasses.replace(certify(counts0, counts, sigma, alpha),
                                   settings=self._settings(sigma=sigma, steps=steps, votes=votes, n0=n0, n=n, alpha=alpha, seed=seed,
                                                           image_index=image_index))
        return cert, CountsResult(counts0, counts, self.loop.unet_evals - evals)

    def _settings(self, **settings) -> dict:
        """What a single-image result was computed with: the call's settings and the engine's identity."""
        settings["steps"] = str(settings["steps"])
        engine_id = self.manifest.identity if self.manifest is not None else None
        return {**settings, "engine": None if self.directory is None else str(self.directory), "engine_id": engine_id}

    def _sequential(self, image, test, sigma, steps, votes, n0, *, seed, image_index, batch, progress,
                    round_size: int | None = None) -> tuple[int, int]:
        """Select c_a from at most n0 selection samples, then feed ``test`` estimation rounds of
        ``round_size`` samples (default 1) until it is done (:meth:`_sequential_continuous`). Returns
        c_a and the UNet evaluations spent on the image."""
        if round_size is None:
            round_size = 1
        if isinstance(round_size, bool) or not isinstance(round_size, (int, np.integer)) or round_size < 1:
            raise ConfigError(f"{param('round_size')} must be an integer >= 1 (got {round_size!r})")
        image = self._image(image, image_index)
        self._prepare(sigma, steps, votes, batch, samples=max(int(n0), int(test.remaining)))
        return self._sequential_continuous(image, test, int(n0), seed=seed, image_index=image_index,
                                           round_size=int(round_size), progress=progress)

    def _sequential_continuous(self, image, test, n0: int, *, seed, image_index, round_size, progress) -> tuple[int, int]:
        """:meth:`_sequential` through the scheduler: the selection samples (stopped once
        :func:`densepure_rt.stats.sequential.selection_done` says the leader is clear: c_a is the
        argmax of the counts so far, ties to the lowest class), then the estimation samples,
        delivered in sample order in rounds of ``round_size``, while the engine calls stay full of
        the samples after them. The selection rule reads selection samples only, so the estimation
        samples stay fresh and independent of c_a. Samples started past the point where a test
        stopped are dropped (their work is counted)."""
        from densepure_rt.stats.sequential import selection_done

        counts = np.zeros(self.num_classes, dtype=np.int64)
        chosen: list[int] = []
        jobs = [Job(0, int(image_index), SELECTION, n0, round_size)]

        def deliver(job: int, labels: np.ndarray) -> bool:
            if job == 0:  # selection: stop once the leader is clear, then start the estimation job
                counts[:] += np.bincount(labels, minlength=self.num_classes)
                left = n0 - int(counts.sum())
                done = left == 0 or selection_done(counts, left)
                if done:
                    if left and progress is not None:
                        progress(left)
                    chosen.append(int(np.argmax(counts)))
                    if not test.done:
                        jobs.append(Job(0, int(image_index), ESTIMATION, int(test.remaining), round_size))
                return not done
            test.update(int(np.count_nonzero(labels == chosen[0])), len(labels))
            return not test.done

        stats = self.scheduler().run(self.loop.device.stage(image[None]), jobs, seed, deliver, progress=progress)
        if not chosen:  # n0 = 0 cannot happen (validated); a stopped run never gets here
            raise EngineError("the selection phase ended without a class: rebuild the engine")
        return chosen[0], int(sum(stats.per_job_unet_evals))  # one per row per step, dropped rows too

    @_sampling
    def certify_radii(
        self,
        image: np.ndarray,
        sigma: float,
        radii,
        steps: int | str = 4,
        votes: int = 10,
        n0: int = 100,
        n_max: int = 10000,
        alpha: float = 0.001,
        *,
        seed: int = 0,
        image_index: int,
        batch: int | None = None,
        progress: Progress = None,
        round_size: int | None = None,
    ) -> RadiiCertificate:
        """Is the smoothed classifier certifiably robust at each target radius? Anytime-valid.

        Selects ``c_a`` from at most ``n0`` selection samples (CERTIFY's argmax, stopped early once
        the leader is clear: :meth:`_select`), then draws estimation samples in rounds of
        ``round_size`` (default: 1) and, after each round, tests H0: p_a <= Phi(R / sigma) for every target R with one
        confidence sequence on p_a (:class:`densepure_rt.stats.sequential.TargetRadiiTest`).
        Stops when every target is certified or futile, or at ``n_max`` samples. Guarantee: the
        probability that any target with p_a <= Phi(R / sigma) is certified is at most alpha,
        whatever the number of rounds and whichever class the selection picked. The estimation
        samples are those of fixed-n CERTIFY with the same seed: keeping the larger radius of both
        runs on one image doubles the error to 2 alpha (use another seed for the second run).
        """
        validate_params(sigma, alpha, n0, n_max, n_name="n_max")
        test = _radii_test(sigma, radii, alpha, n_max)
        c_a, evals = self._sequential(image, test, sigma, steps, votes, n0, seed=seed, image_index=image_index, batch=batch,
                                      progress=progress, round_size=round_size)
        return dataclasses.replace(_radii_result(test, c_a, evals), settings=self._settings(
            sigma=sigma, steps=steps, votes=votes, n0=n0, n_max=n_max, radii=list(test.radii), alpha=alpha, seed=seed,
            image_index=image_index, round_size=round_size))

    @_sampling
    def certify_until(
        self,
        image: np.ndarray,
        sigma: float,
        tol: float,
        steps: int | str = 4,
        votes: int = 10,
        n0: int = 100,
        n_max: int = 10000,
        alpha: float = 0.001,
        *,
        seed: int = 0,
        image_index: int,
        batch: int | None = None,
        progress: Progress = None,
        round_size: int | None = None,
    ) -> EarlyStopCertificate:
        """Cohen's CERTIFY output (the largest certified radius) with early stopping. Anytime-valid.

        As :meth:`certify_radii` for the selection; then estimation rounds until more samples stop
        paying off: the whole remaining budget would gain the radius less than ``tol`` (the stop rule
        :data:`densepure_rt.stats.sequential.STOP_RULE`), or it cannot gain ``tol`` at all any more, or no radius is reachable, or ``n_max`` samples were used
        (:class:`densepure_rt.stats.sequential.EarlyStopRadius`). The radius comes from a lower confidence
        sequence on p_a, valid at any stopping time: P(radius > sigma * Phi^-1(p_a)) <= alpha. An
        empty running interval (reason "inconsistent", a detected coverage failure) abstains:
        prediction -1, radius 0. Same estimation samples as fixed-n CERTIFY with the same seed (see
        :meth:`certify_radii`).
        """
        validate_params(sigma, alpha, n0, n_max, n_name="n_max")
        test = _until_test(sigma, alpha, n_max, tol)
        c_a, evals = self._sequential(image, test, sigma, steps, votes, n0, seed=seed, image_index=image_index, batch=batch,
                                      progress=progress, round_size=round_size)
        from densepure_rt.stats.sequential import STOP_RULE

        return dataclasses.replace(_until_result(test, c_a, evals), settings=self._settings(
            sigma=sigma, steps=steps, votes=votes, n0=n0, n_max=n_max, tol=tol, alpha=alpha, seed=seed, image_index=image_index,
            round_size=round_size, stop_rule=STOP_RULE))

    @_sampling
    def predict(
        self,
        image: np.ndarray,
        sigma: float,
        steps: int | str = 4,
        votes: int = 10,
        n: int = 100,
        alpha: float = 0.001,
        *,
        seed: int = 0,
        image_index: int,
        batch: int | None = None,
        progress: Progress = None,
    ) -> Prediction:
        """Cohen et al.'s PREDICT of the DensePure smoothed classifier at ``image``."""
        validate_params(sigma, alpha, None, n)
        image = self._image(image, image_index)
        self._prepare(sigma, steps, votes, batch, samples=int(n))
        counts = self.sample_counts(image, n, PREDICTION, seed=seed, image_index=image_index, batch=batch, progress=progress)
        return dataclasses.replace(predict(counts, alpha), settings=self._settings(
            sigma=sigma, steps=steps, votes=votes, n=n, alpha=alpha, seed=seed, image_index=image_index))

    @_sampling
    def stream(self, mode: str, items, emit, *, sigma: float, steps: int | str = 4, votes: int = 10, n0: int = 100,
               n: int = 1000, alpha: float = 0.001, radii=None, tol: float | None = None, seed: int = 0, batch: int | None = None,
               round_size: int = 1, in_flight: int | None = None, progress: Progress = None,
               samples: int | None = None) -> SchedulerStats:
        """Many images through one scheduler run (:mod:`densepure_rt.sampling.stream`): ``items``
        yields (image index, image [C x H x W] in [0, 1]), read as images finish; ``emit(Streamed)``
        gets each image's outcome as it finishes (``Streamed.result``: what ``certify_counts`` (a
        (Certificate, CountsResult) pair), ``predict``, ``certify_radii`` or ``certify_until`` give
        for the image alone, by ``mode``: "certify", "predict", "certify-radii", "certify-until").
        Calls hold batch x votes rows, or fewer where ``samples`` (the most noisy samples the run
        draws, all images together) is below ``batch``; ``in_flight`` images at most are staged
        (default: enough for the sequential tests' bounded samples to fill a call)."""
        from densepure_rt.sampling.stream import FixedWork, SequentialWork, run_stream

        sequential = mode in ("certify-radii", "certify-until")
        validate_params(sigma, alpha, n0 if mode != "predict" else None, n)
        if isinstance(round_size, bool) or not isinstance(round_size, (int, np.integer)) or round_size < 1:
            raise ConfigError(f"{param('round_size')} must be an integer >= 1 (got {round_size!r})")
        if mode == "certify-radii":
            _radii_test(sigma, radii, alpha, n)  # refuses bad radii before anything runs
        elif mode == "certify-until":
            _until_test(sigma, alpha, n, tol)
        elif mode not in ("certify", "predict"):
            raise ConfigError(f"unknown mode {mode!r}")
        self._prepare(sigma, steps, votes, batch, samples=samples)
        sch = self.scheduler()
        if in_flight is None:
            in_flight = -(-sch.slots // (sch.first * int(round_size))) + 1 if sequential else 2
        if isinstance(in_flight, bool) or not isinstance(in_flight, (int, np.integer)) or in_flight < 1:
            raise ConfigError(f"{param('in_flight')} (images in flight) must be an integer >= 1 (got {in_flight!r})")
        check_staging(int(in_flight), self.image_shape, self.device)
        classes = self.num_classes

        def make(idx: int):
            if mode == "certify":
                return FixedWork(idx, classes, [(SELECTION, n0), (ESTIMATION, n)],
                                 lambda c, ev: (certify(c[0], c[1], sigma, alpha), CountsResult(c[0], c[1], ev)))
            if mode == "predict":
                return FixedWork(idx, classes, [(PREDICTION, n)], lambda c, ev: predict(c[0], alpha))
            if mode == "certify-radii":
                return SequentialWork(idx, classes, n0, _radii_test(sigma, radii, alpha, n), _radii_result, round_size, round_size)
            return SequentialWork(idx, classes, n0, _until_test(sigma, alpha, n, tol), _until_result, round_size, round_size)

        def checked():
            for idx, image in items:
                yield int(idx), self._image(image, int(idx)), make

        return run_stream(sch, self.loop.device.stage, self.image_shape, checked(), seed=seed, in_flight=int(in_flight),
                          emit=emit, progress=progress)


def _radii_test(sigma, radii, alpha, n_max):
    from densepure_rt.stats.sequential import TargetRadiiTest

    try:
        return TargetRadiiTest(sigma, list(radii), alpha, int(n_max))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{param('radii')}: {exc}") from None


def _radii_result(test, c_a: int, evals: int) -> RadiiCertificate:
    result = test.result()
    return RadiiCertificate(
        prediction=c_a if result.certified else -1,
        radius=result.radius,
        c_a=c_a,
        n_a=result.n_a,
        n=result.n,
        radii=tuple(float(r) for r in test.radii),
        decisions=result.decisions,
        unet_evals=int(evals),
    )


def _until_test(sigma, alpha, n_max, tol):
    from densepure_rt.stats.sequential import EarlyStopRadius

    try:
        return EarlyStopRadius(sigma, alpha, int(n_max), float(tol))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{param('tol')}: {exc}") from None


def _until_result(test, c_a: int, evals: int) -> EarlyStopCertificate:
    result = test.result()
    return EarlyStopCertificate(
        prediction=c_a if result.certified else -1,
        radius=result.radius,
        c_a=c_a,
        n_a=result.n_a,
        n=result.n,
        p_a_lower=result.p_a_lower,
        reason=result.reason,
        unet_evals=int(evals),
    )


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
    (:meth:`Engine.early_exit_for`). ``cuda_graph``: on a GPU, replay the full batch's step through ONNX Runtime's CUDA graph where
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
