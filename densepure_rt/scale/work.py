"""One image of a certify / predict run: the computation (:func:`run_image`, :func:`run_group`,
:func:`run_stream`, all through :meth:`densepure_rt.runtime.Engine.stream`) and its results row
(:func:`write_outcome`), for a :class:`densepure_rt.spec.RunSpec`.

Shared by the single-process CLI loop and the Ray actors (:mod:`densepure_rt.scale.ray`), so a row
written from an actor on another machine is the same row one process writes: the noise is a pure
function of (seed, image index, phase, sample), and both stream the same spec through the same
engine method. Only the ``time`` column, a wall-clock measurement, differs between runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from densepure_rt.modes import mode_of
from densepure_rt.spec import MODES, RunSpec

__all__ = ["MODES", "RunSpec", "Outcome", "run_image", "run_group", "run_stream", "write_outcome"]


@dataclass(frozen=True)
class Outcome:
    """The result of one image: the mode's result (:mod:`densepure_rt.modes`; for "certify" the
    Certificate), its per-class estimation counts (fixed-n CERTIFY only), the UNet evaluations it took, its share of the wall time, and ``dropped_evals``: those of its UNet
    evaluations spent on noisy samples its tests never read (started by the scheduler, then dropped
    when a sequential test stopped; 0 in fixed-n modes)."""

    idx: int
    mode: str
    result: Any
    counts: Optional[np.ndarray]
    unet_evals: int
    seconds: float
    dropped_evals: int = 0


def run_image(engine, spec: RunSpec, image: np.ndarray, idx: int, progress: Optional[Callable[[int], None]] = None) -> Outcome:
    """``spec`` on one image with an opened :class:`densepure_rt.runtime.Engine` (:func:`run_stream`
    of that image alone)."""
    return run_group(engine, spec, [image], [idx], progress=progress)[0]


def run_group(engine, spec: RunSpec, images, indices, progress: Optional[Callable[[int], None]] = None) -> list[Outcome]:
    """Several images streamed through one scheduler run (:func:`run_stream`; a Ray actor's images
    in flight): their outcomes in the order of ``indices``, the same as :func:`run_image` of each
    image alone (tests), each charged its own UNet evaluations."""
    indices = [int(i) for i in indices]
    outcomes: dict = {}
    run_stream(engine, spec, list(zip(indices, images)), lambda o, _: outcomes.__setitem__(o.idx, o), progress=progress)
    return [outcomes[i] for i in indices]


def run_stream(engine, spec: RunSpec, items, emit: Callable[[Outcome, int], None], in_flight: Optional[int] = None,
               progress: Optional[Callable[[int], None]] = None, images: Optional[int] = None) -> None:
    """Every image of ``items`` ((index, image) pairs, read lazily) through one scheduler run
    (:meth:`densepure_rt.runtime.Engine.stream`): ``emit(outcome, samples)`` as each image finishes
    (in the order they finish), with the noisy samples its tests read. The outcomes equal
    :func:`run_image`'s (tests/test_stream.py); ``seconds`` is the image's share of the wall time
    (the time since the previous image finished). ``images``: how many ``items`` holds (default: its
    length, if it has one): the calls need hold no more rows than all their samples."""
    if images is None and hasattr(items, "__len__"):
        images = len(items)

    def out(s) -> None:
        result, counts = s.result, None
        if spec.mode == "certify":
            result, counts = s.result[0], s.result[1].counts
        emit(Outcome(s.idx, spec.mode, result, counts, int(s.unet_evals), s.seconds, int(s.dropped_evals)), s.samples)

    engine.stream(spec, items, out, in_flight=in_flight, progress=progress, images=images)


def write_outcome(writer, label: int, outcome: Outcome) -> None:
    """The results row of ``outcome`` (a :class:`densepure_rt.files.results.ResultsWriter` of its mode)."""
    mode_of(outcome.mode).write(writer, label, outcome)
