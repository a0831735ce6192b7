"""The Python API: open an engine directory once, then certify or predict numpy images in a loop.

    from densepure_rt.runtime import open_engine

    with open_engine("engines/digits") as engine:
        cert = engine.certify(image, sigma=0.5, steps=4, votes=5, n0=100, n=1000, alpha=0.001)
        print(cert.prediction, cert.radius)

``image`` is float32 [C x H x W] in [0, 1] at the engine's size. Noise is a pure function of
(seed, image_index, phase, sample index), so results do not depend on the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .backends import Backend, open_backend
from .certify import Certificate, Prediction, certify, predict, validate_params
from .data import check_image
from .errors import ConfigError, EngineError
from .manifest import load_manifest
from .noise import ESTIMATION, PREDICTION, SELECTION
from .schedule import ReverseSchedule, make_schedule, parse_steps, reverse_schedule

__all__ = ["Engine", "open_engine", "CountsResult"]

Progress = Optional[Callable[[int], None]]


@dataclass(frozen=True)
class CountsResult:
    """Vote counts of one image: selection (n0) and estimation (n) phases, per class."""

    counts0: np.ndarray
    counts: np.ndarray


class Engine:
    """An opened engine directory: manifest verified, backend sessions loaded. A context manager."""

    def __init__(self, directory: str | Path, backend: str = "auto", device: str = "cpu", threads: int | None = None):
        self.directory = Path(directory)
        self.manifest = load_manifest(self.directory)
        self.image_shape = tuple(self.manifest["image_shape"])
        self.num_classes = int(self.manifest["num_classes"])
        self.preset = self.manifest["preset"]
        sched = self.manifest["schedule"]
        self._schedule = make_schedule(sched["kind"], sched["num_timesteps"], sched["rescale_timesteps"])
        self.backend: Backend = open_backend(backend, self.directory, self.manifest, device=device, threads=threads)
        self._prepared: tuple | None = None

    # -- lifecycle --------------------------------------------------------------------------- #
    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Free the backend (sessions, buffers)."""
        if self.backend is not None:
            self.backend.close()
            self.backend = None  # type: ignore[assignment]

    # -- schedule ---------------------------------------------------------------------------- #
    def reverse_schedule(self, sigma: float, steps: int | str) -> ReverseSchedule:
        """The frozen reverse schedule of this engine's diffusion model for (sigma, b).

        ``steps`` is b >= 1, 'one-shot' or 'none'; a (sigma, b) the schedule cannot honour (more
        steps than t* allows, sigma beyond the schedule) is a :class:`ConfigError`.
        """
        return reverse_schedule(self._schedule, sigma, parse_steps(steps))

    def _prepare(self, sigma: float, steps: int | str, votes: int, batch: int) -> ReverseSchedule:
        for flag, value in (("--votes", votes), ("--batch", batch)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"{flag} must be an integer >= 1 (got {value!r})")
        rs = self.reverse_schedule(sigma, steps)
        if not np.all(np.isfinite(rs.scalars)):
            raise ConfigError(f"the reverse schedule for sigma {sigma}, steps {steps} is not finite: choose fewer steps")
        key = (float(sigma), rs.steps, int(votes), int(batch))
        if self._prepared != key:
            self.backend.prepare(rs, int(votes), int(batch))
            self._prepared = key
        return rs

    # -- sampling ---------------------------------------------------------------------------- #
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
        counts = np.zeros(self.num_classes, dtype=np.int64)
        for start in range(0, num, batch):
            samples = range(start, min(start + batch, num))
            labels = np.asarray(self.backend.voted_labels(image, seed, image_index, phase, samples))
            counts += self._count(labels, len(samples))
            if progress is not None:
                progress(len(samples))
        if int(counts.sum()) != num:  # every drawn sample is counted exactly once
            raise EngineError(f"the engine counted {int(counts.sum())} labels for {num} samples: rebuild the engine")
        return counts

    def _count(self, labels: np.ndarray, expected: int) -> np.ndarray:
        if labels.shape != (expected,) or labels.dtype.kind not in "iu":
            raise EngineError(
                f"the engine returned labels of shape {labels.shape} and dtype {labels.dtype} for {expected} samples "
                "(expected one integer label per sample): rebuild the engine"
            )
        if expected and (labels.min() < 0 or labels.max() >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)]
            raise EngineError(
                f"the classifier returned label {int(bad[0])}, outside the engine's {self.num_classes} classes: "
                "the engine's classifier does not match its manifest; rebuild the engine"
            )
        return np.bincount(labels.astype(np.int64), minlength=self.num_classes)

    def _image(self, image: np.ndarray, image_index: int) -> np.ndarray:
        image = np.asarray(image)
        if image.dtype != np.float32:
            image = image.astype(np.float32)
        check_image(image, self.image_shape, image_index)
        return image

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
        image_index: int = 0,
        batch: int = 32,
        progress: Progress = None,
    ) -> Certificate:
        """Cohen et al.'s CERTIFY of the DensePure smoothed classifier at ``image`` [C x H x W] in [0, 1]."""
        cert, _ = self.certify_counts(
            image, sigma, steps, votes, n0, n, alpha, seed=seed, image_index=image_index, batch=batch, progress=progress
        )
        return cert

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
        image_index: int = 0,
        batch: int = 32,
        progress: Progress = None,
    ) -> tuple[Certificate, CountsResult]:
        """:meth:`certify`, also returning the vote counts of both phases (for results files)."""
        validate_params(sigma, alpha, n0, n)
        image = self._image(image, image_index)
        self._prepare(sigma, steps, votes, batch)
        common = dict(seed=seed, image_index=image_index, batch=batch, progress=progress)
        counts0 = self.sample_counts(image, n0, SELECTION, **common)
        counts = self.sample_counts(image, n, ESTIMATION, **common)
        return certify(counts0, counts, sigma, alpha), CountsResult(counts0, counts)

    def predict(
        self,
        image: np.ndarray,
        sigma: float,
        steps: int | str = 4,
        votes: int = 10,
        n: int = 1000,
        alpha: float = 0.001,
        *,
        seed: int = 0,
        image_index: int = 0,
        batch: int = 32,
        progress: Progress = None,
    ) -> Prediction:
        """Cohen et al.'s PREDICT of the DensePure smoothed classifier at ``image``."""
        validate_params(sigma, alpha, None, n)
        image = self._image(image, image_index)
        self._prepare(sigma, steps, votes, batch)
        counts = self.sample_counts(image, n, PREDICTION, seed=seed, image_index=image_index, batch=batch, progress=progress)
        return predict(counts, alpha)


def open_engine(directory: str | Path, backend: str = "auto", device: str = "cpu", threads: int | None = None) -> Engine:
    """Open and verify an engine directory (see :class:`Engine`)."""
    return Engine(directory, backend=backend, device=device, threads=threads)

