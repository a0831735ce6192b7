"""One image of a certify / predict run: what to compute (:class:`Task`), the computation
(:func:`run_image`) and its results row (:func:`write_outcome`).

Shared by the single-process CLI loop and the Ray actors (:mod:`densepure_rt.scale.ray`), so a row
written from an actor on another machine is the same row one process writes: the noise is a pure
function of (seed, image index, phase, sample), and both call the same engine methods with the same
:class:`Task`. Only the ``time`` column, a wall-clock measurement, differs between runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

__all__ = ["MODES", "Task", "Outcome", "run_image", "run_group", "run_stream", "write_outcome"]

#: The run modes: fixed-n CERTIFY, target radii (--radius), early stopping (--tol), PREDICT.
MODES = ("certify", "certify-radii", "certify-until", "predict")


@dataclass(frozen=True)
class Task:
    """The settings every image of a run is computed with (plain values: it travels to Ray actors)."""

    mode: str
    sigma: float
    steps: str
    votes: int
    alpha: float
    n0: Optional[int]
    n: int
    seed: int
    batch: int
    radii: Optional[tuple] = None
    tol: Optional[float] = None
    #: Samples per round of the sequential modes (None: 1).
    round_size: Optional[int] = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} (got {self.mode!r})")

    @property
    def samples_per_image(self) -> int:
        """Noisy samples an image takes at most (the sequential modes usually stop earlier)."""
        return self.n if self.mode == "predict" else int(self.n0) + self.n


@dataclass(frozen=True)
class Outcome:
    """The result of one image: the engine's certificate or prediction, its per-class estimation
    counts (fixed-n CERTIFY only), the UNet evaluations it took, its wall time, and
    ``dropped_evals``: those of its UNet evaluations spent on noisy samples its tests never read
    (started by the scheduler, then dropped when a sequential test stopped; 0 in fixed-n modes)."""

    idx: int
    mode: str
    result: Any
    counts: Optional[np.ndarray]
    unet_evals: int
    seconds: float
    dropped_evals: int = 0


def run_image(engine, task: Task, image: np.ndarray, idx: int, progress: Optional[Callable[[int], None]] = None) -> Outcome:
    """Certify or predict one image with an opened :class:`densepure_rt.runtime.Engine` (:func:`run_stream`
    of that image alone)."""
    return run_group(engine, task, [image], [idx], progress=progress)[0]


def run_group(engine, task: Task, images, indices, progress: Optional[Callable[[int], None]] = None) -> list[Outcome]:
    """Several images streamed through one scheduler run (:func:`run_stream`; a Ray actor's images
    in flight): their outcomes in the order of ``indices``, the same as :func:`run_image` of each
    image alone (tests), each charged its own UNet evaluations."""
    indices = [int(i) for i in indices]
    outcomes: dict = {}
    run_stream(engine, task, list(zip(indices, images)), lambda o, _: outcomes.__setitem__(o.idx, o), progress=progress)
    return [outcomes[i] for i in indices]


def run_stream(engine, task: Task, items, emit: Callable[[Outcome, int], None], in_flight: Optional[int] = None,
               progress: Optional[Callable[[int], None]] = None, images: Optional[int] = None) -> None:
    """Every image of ``items`` ((index, image) pairs, read lazily) through one scheduler run
    (:meth:`densepure_rt.runtime.Engine.stream`): ``emit(outcome, samples)``
    as each image finishes (in the order they finish), with the noisy samples its tests read. The
    outcomes equal :func:`run_image`'s (tests/test_stream.py); ``seconds`` is the image's share of
    the wall time (the time since the previous image finished). ``images``: how many ``items``
    holds (default: its length, if it has one): the calls need hold no more rows than all their samples."""
    if images is None and hasattr(items, "__len__"):
        images = len(items)
    round_size = task.round_size if task.round_size is not None else 1

    def out(s) -> None:
        if task.mode == "certify":
            cert, counts = s.result
            emit(Outcome(s.idx, task.mode, cert, counts.counts, int(s.unet_evals), s.seconds, int(s.dropped_evals)), s.samples)
        else:
            emit(Outcome(s.idx, task.mode, s.result, None, int(s.unet_evals), s.seconds, int(s.dropped_evals)), s.samples)

    engine.stream(task.mode, items, out, sigma=task.sigma, steps=task.steps, votes=task.votes, n0=task.n0, n=task.n,
                  alpha=task.alpha, radii=task.radii, tol=task.tol, seed=task.seed, batch=task.batch, round_size=round_size,
                  in_flight=in_flight, progress=progress,
                  samples=None if images is None else task.samples_per_image * max(int(images), 1))


def write_outcome(writer, label: int, outcome: Outcome) -> None:
    """The results row of ``outcome`` (a :class:`densepure_rt.files.results.ResultsWriter` of its mode)."""
    idx, result, seconds = outcome.idx, outcome.result, outcome.seconds
    if outcome.mode == "certify":
        writer.write_certificate(idx, label, result, outcome.counts, seconds, outcome.unet_evals)
    elif outcome.mode == "certify-radii":
        writer.write_radii(idx, label, result, seconds)
    elif outcome.mode == "certify-until":
        writer.write_until(idx, label, result, seconds)
    else:
        writer.write_prediction(idx, label, result, seconds, outcome.unet_evals)
