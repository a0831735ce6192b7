"""The test oracle: the engine's graphs run step by step with ONNX Runtime's plain ``run()``.

Independent of the runtime's sampling path (the scheduler over the loop's buffers), it is the
reference that path is checked against: whole-array noise from
:func:`densepure_rt.sampling.noise.sample_noise` (the layout the PyTorch reference uses), a plain
Python vote loop (ceil(K/2) runs, then one run at a time while the vote is undecided), no
IOBinding, buffers, slots or device. :func:`open_reference` gives a :class:`Reference`: CERTIFY,
PREDICT and the sequential modes of one image computed through it, with the engine's manifest and
schedule, so an engine's rows can be compared end to end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from densepure_rt.certificates import CountsResult, EarlyStopCertificate, RadiiCertificate
from densepure_rt.errors import EngineError
from densepure_rt.files.manifest import check_graph_io, graph_path
from densepure_rt.runtime import open_engine
from densepure_rt.sampling.loop import check_labels
from densepure_rt.sampling.noise import ESTIMATION, PREDICTION, SELECTION, sample_noise
from densepure_rt.schedule import ReverseSchedule
from densepure_rt.stats.cohen import certify, predict
from densepure_rt.stats.vote import majority_vote, undecided, vote_waves


class StepByStep:
    """ONNX Runtime over the engine's ``step.onnx`` and ``classifier.onnx``, one plain ``run()`` per
    step, with whole-array host noise: what the batch loop must equal."""

    name = "onnxruntime"
    unet_evals = 0
    classifier_evals = 0

    def __init__(self, directory: str | Path, manifest: dict, device: str = "cpu", threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:  # pragma: no cover - onnxruntime is a dependency
            raise EngineError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from None
        available = ort.get_available_providers()
        if device == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise EngineError(
                    "--device cuda needs onnxruntime-gpu (the installed onnxruntime only has "
                    f"{', '.join(available)}): pip install onnxruntime-gpu, or use --device cpu"
                )
            providers = [("CUDAExecutionProvider", {}), "CPUExecutionProvider"]
        elif device == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise EngineError(f"--device must be cpu or cuda for the onnxruntime backend (got {device!r})")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
        directory = Path(directory)
        # Only plain file names listed (and, via load_manifest, checksummed) in manifest["files"].
        step_file, cls_file = graph_path(directory, manifest, "step"), graph_path(directory, manifest, "classifier")
        try:
            self._step = ort.InferenceSession(str(step_file), options, providers=providers)
            self._cls = ort.InferenceSession(str(cls_file), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(f"onnxruntime could not load the engine in {directory}: {str(exc).splitlines()[0][:200]}") from None
        for graph, session in (("step", self._step), ("classifier", self._cls)):
            check_graph_io(directory, graph, [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
        self.version = ort.__version__
        self.device = device
        self.image_shape = tuple(manifest["image_shape"])
        self.num_classes = int(manifest["num_classes"])
        self._rs: ReverseSchedule | None = None

    def prepare(self, rs: ReverseSchedule, votes: int, batch: int, early_exit: bool = True) -> None:
        if not np.all(np.isfinite(rs.scalars)):
            raise EngineError(f"the reverse schedule for sigma {rs.sigma}, steps {rs.steps} is not finite: choose fewer steps")
        self._rs = rs
        self._votes = int(votes)
        self._waves = vote_waves(votes) if early_exit else (int(votes),)
        self._scalars = [np.ascontiguousarray(row, dtype=np.float32) for row in rs.scalars]
        self._scale = np.float32(rs.input_scale)

    def purify(self, x_t: np.ndarray, noise: np.ndarray) -> np.ndarray:
        assert self._rs is not None, "call prepare() first"
        x = np.ascontiguousarray(x_t, dtype=np.float32)
        # On the CPU provider host memory is the device. With the CUDA provider each run() copies x
        # to the GPU and back per step; IOBinding with device-resident OrtValues would remove that
        # round trip, but it has not been written because it cannot be tested without a GPU.
        for s, row in enumerate(self._scalars):
            rows = np.ascontiguousarray(np.broadcast_to(row, (len(x), len(row))))  # one row of scalars per image row
            x = self._step.run(["x_next"], {"x": x, "noise": noise[s], "scalars": rows})[0]
        return x

    def classify(self, images: np.ndarray) -> np.ndarray:
        labels = self._cls.run(["labels"], {"image": np.ascontiguousarray(images, dtype=np.float32)})[0]
        return check_labels(labels, len(images), self.num_classes)

    def voted_labels(self, image: np.ndarray, seed: int, image_index: int, phase: int, samples: Sequence[int],
                     runs: bool = False):
        """Voted labels [n] int64 of ``samples``; ``runs=True``: also the runs [n] int64 each took."""
        want_runs = runs
        assert self._rs is not None, "call prepare() first"
        rs, votes, n = self._rs, self._votes, len(samples)
        delta, z = sample_noise(seed, image_index, phase, samples, votes, rs.num_calls, self.image_shape, rs.sigma)
        # x_{t*} = (2 (x + delta) - 1) / sqrt(1 + 4 sigma^2); row b*K + k of z is run k of sample b.
        start = self._scale * (2 * (image[None] + delta) - 1)
        labels = np.empty((n, votes), dtype=np.int64)
        voted = np.empty(n, dtype=np.int64)
        took = np.full(n, votes, dtype=np.int64)
        active, done = np.arange(n), 0
        for wave in self._waves:  # one wave of K runs, or ceil(K/2) runs then one run per wave
            runs = np.arange(done, done + wave)
            rows = (active[:, None] * votes + runs[None, :]).reshape(-1)
            purified = self.purify(np.repeat(start[active], wave, axis=0), z[:, rows])
            check_finite(purified)
            labels[active[:, None], runs[None, :]] = self.classify(purified).reshape(len(active), wave)
            self.unet_evals += len(rows) * rs.num_calls
            self.classifier_evals += len(rows)
            done += wave
            still = undecided(labels[active, :done], votes)
            finished = active[~still]
            voted[finished] = majority_vote(labels[finished, :done])
            took[finished] = done
            active = active[still]
            if active.size == 0:
                break
        return (voted, took) if want_runs else voted

    def classifier_limit(self) -> int:
        """The most rows one classifier call holds: the oracle classifies each wave in one call."""
        return 2**31 - 1

    @property
    def executor(self) -> "StepByStep":
        """The engine closes its loop's executor: here the oracle itself."""
        return self

    def close(self) -> None:
        self._step = self._cls = None  # type: ignore[assignment]


def check_finite(purified: np.ndarray) -> None:
    """Refuse to classify a non-finite purified image: the classifier would answer some class
    (argmax of NaN logits) and CERTIFY would certify it. Such an image comes from a broken engine."""
    if not np.all(np.isfinite(purified)):
        raise EngineError(
            "the denoise step produced non-finite values (NaN or inf) in the purified images: the engine is "
            "broken or was built for other inputs; rebuild it (densepure-rt build --force)"
        )


#: Samples per oracle call in the sequential modes (labels are drawn ahead of the rounds that read them).
BLOCK = 64


class Reference:
    """One image's CERTIFY, PREDICT and sequential tests computed through :class:`StepByStep` (the
    engine at ``directory`` opened for its manifest and schedule only). A context manager."""

    def __init__(self, directory, device: str = "cpu", threads: int | None = None, early_exit: bool | None = None):
        self.engine = open_engine(directory, early_exit=early_exit, metadata_only=True)
        self.manifest = self.engine.manifest
        self.num_classes = self.engine.num_classes
        self.loop = StepByStep(directory, self.manifest, device=device, threads=threads)
        self.early_exit = True if early_exit is None else bool(early_exit)
        self._blocks: dict = {}

    def __enter__(self) -> "Reference":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.loop.close()
        self.engine.close()

    def _prepare(self, sigma, steps, votes, batch, samples=None) -> ReverseSchedule:
        rs = self.engine.reverse_schedule(sigma, steps)
        self.loop.prepare(rs, votes, batch, early_exit=self.early_exit)
        return rs

    def sample_counts(self, image, num: int, phase: int, *, seed: int, image_index: int, batch: int = 32, progress=None) -> np.ndarray:
        """Per-class counts of samples 0 .. num-1 of ``phase``, ``batch`` samples per oracle call."""
        counts = np.zeros(self.num_classes, dtype=np.int64)
        for start in range(0, num, batch):
            labels = self.loop.voted_labels(image, seed, image_index, phase, range(start, min(start + batch, num)))
            counts += np.bincount(labels, minlength=self.num_classes)
        return counts

    def certify_counts(self, image, sigma, steps, votes, n0, n, alpha, *, seed=0, image_index, batch=32):
        self._prepare(sigma, steps, votes, batch)
        before = self.loop.unet_evals
        c0 = self.sample_counts(image, n0, SELECTION, seed=seed, image_index=image_index, batch=batch)
        c = self.sample_counts(image, n, ESTIMATION, seed=seed, image_index=image_index, batch=batch)
        return certify(c0, c, sigma, alpha), CountsResult(c0, c, self.loop.unet_evals - before)

    def certify(self, image, sigma, steps=4, votes=10, n0=100, n=1000, alpha=0.001, *, seed=0, image_index, batch=32):
        return self.certify_counts(image, sigma, steps, votes, n0, n, alpha, seed=seed, image_index=image_index, batch=batch)[0]

    def predict(self, image, sigma, steps=4, votes=10, n=100, alpha=0.001, *, seed=0, image_index, batch=32):
        self._prepare(sigma, steps, votes, batch)
        return predict(self.sample_counts(image, n, PREDICTION, seed=seed, image_index=image_index, batch=batch), alpha)

    def _sequential(self, image, test, sigma, steps, votes, n0, *, seed, image_index, round_size) -> tuple[int, int]:
        """Selection in rounds of ``round_size`` until :func:`selection_done`, then estimation rounds
        fed to ``test`` until it is done: the samples, rounds and decisions of the engine's
        sequential modes. The labels are drawn in blocks of :data:`BLOCK` samples (a sample's label
        does not depend on its block); returns c_a and the UNet evaluations of the samples read."""
        from densepure_rt.stats.sequential import selection_done

        rs = self._prepare(sigma, steps, votes, BLOCK)
        # Blocks already drawn for this image and settings (another mode or round reads the same samples).
        drawn = self._blocks.setdefault((image.tobytes(), seed, image_index, float(sigma), rs.steps, int(votes)), {})

        def labels(phase: int, start: int, size: int):
            for block in range(start // BLOCK, (start + size - 1) // BLOCK + 1):
                if (phase, block) not in drawn:
                    drawn[phase, block] = self.loop.voted_labels(image, seed, image_index, phase,
                                                                 range(block * BLOCK, (block + 1) * BLOCK), runs=True)
            got = [drawn[phase, k // BLOCK] for k in range(start, start + size)]
            return (np.array([g[0][k % BLOCK] for g, k in zip(got, range(start, start + size))]),
                    int(sum(g[1][k % BLOCK] for g, k in zip(got, range(start, start + size)))))

        evals = 0
        counts = np.zeros(self.num_classes, dtype=np.int64)
        for start in range(0, n0, round_size):
            size = min(round_size, n0 - start)
            got, runs = labels(SELECTION, start, size)
            counts += np.bincount(got, minlength=self.num_classes)
            evals += runs * rs.num_calls
            if selection_done(counts, n0 - start - size):
                break
        c_a = int(np.argmax(counts))
        start = 0
        while not test.done:
            size = min(round_size, test.remaining)
            got, runs = labels(ESTIMATION, start, size)
            test.update(int(np.count_nonzero(got == c_a)), size)
            evals += runs * rs.num_calls
            start += size
        return c_a, evals

    def certify_radii(self, image, sigma, radii, steps=4, votes=10, n0=100, n_max=10000, alpha=0.001, *, seed=0, image_index,
                      round_size=1) -> RadiiCertificate:
        from densepure_rt.stats.sequential import TargetRadiiTest

        test = TargetRadiiTest(sigma, list(radii), alpha, int(n_max))
        c_a, evals = self._sequential(image, test, sigma, steps, votes, n0, seed=seed, image_index=image_index, round_size=round_size)
        r = test.result()
        return RadiiCertificate(c_a if r.certified else -1, r.radius, c_a, r.n_a, r.n, tuple(float(x) for x in test.radii),
                                r.decisions, int(evals))

    def certify_until(self, image, sigma, tol, steps=4, votes=10, n0=100, n_max=10000, alpha=0.001, *, seed=0, image_index,
                      round_size=1) -> EarlyStopCertificate:
        from densepure_rt.stats.sequential import EarlyStopRadius

        test = EarlyStopRadius(sigma, alpha, int(n_max), float(tol))
        c_a, evals = self._sequential(image, test, sigma, steps, votes, n0, seed=seed, image_index=image_index, round_size=round_size)
        r = test.result()
        return EarlyStopCertificate(c_a if r.certified else -1, r.radius, c_a, r.n_a, r.n, r.p_a_lower, r.reason, int(evals))


def open_reference(directory, device: str = "cpu", threads: int | None = None, early_exit: bool | None = None) -> Reference:
    """The engine at ``directory`` computed through the oracle (:class:`Reference`)."""
    return Reference(directory, device=device, threads=threads, early_exit=early_exit)
