"""What the engine's single-image entry points return besides CERTIFY's and PREDICT's own results
(:class:`densepure_rt.stats.cohen.Certificate`, :class:`~densepure_rt.stats.cohen.Prediction`):
the vote counts, and the outcomes of the sequential modes. Each carries the settings it was
computed with and has ``to_dict()``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from densepure_rt.stats.cohen import result_dict

__all__ = ["CountsResult", "RadiiCertificate", "EarlyStopCertificate"]


@dataclass(frozen=True)
class CountsResult:
    """Vote counts of one image: selection (n0) and estimation (n) phases, per class, and the work
    they took (UNet evaluations: one per row per reverse step)."""

    counts0: np.ndarray
    counts: np.ndarray
    unet_evals: int = 0


@dataclass(frozen=True)
class RadiiCertificate:
    """Outcome of :meth:`Engine.certify_radii` for one image.

    prediction: ``c_a`` when some target radius is certified, else -1 (abstain).
    radius: the largest certified target radius (0.0 when none).
    c_a: the class selected from the n0 selection samples. n_a, n: its votes among the n
    estimation samples used. radii / decisions: each target and its decision (+1 certified,
    -1 futile, 0 undecided when n_max ran out; undecided counts as not certified).
    unet_evals: UNet evaluations spent on the image (both phases).
    """

    prediction: int
    radius: float
    c_a: int
    n_a: int
    n: int
    radii: tuple[float, ...]
    decisions: tuple[int, ...]
    unet_evals: int
    #: The settings it was computed with (:attr:`densepure_rt.stats.cohen.Certificate.settings`).
    settings: Optional[dict] = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        """Its fields (and settings) as plain JSON-able values."""
        return result_dict(self)


@dataclass(frozen=True)
class EarlyStopCertificate:
    """Outcome of :meth:`Engine.certify_until` for one image: Cohen's output (prediction ``c_a`` or
    -1, radius sigma * Phi^-1(p_a_lower)) from an anytime-valid lower confidence bound, the
    samples used, why sampling stopped, and the UNet evaluations spent."""

    prediction: int
    radius: float
    c_a: int
    n_a: int
    n: int
    p_a_lower: float
    reason: str
    unet_evals: int
    #: The settings it was computed with (:attr:`densepure_rt.stats.cohen.Certificate.settings`).
    settings: Optional[dict] = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        """Its fields (and settings) as plain JSON-able values."""
        return result_dict(self)
