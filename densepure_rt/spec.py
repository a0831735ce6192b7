"""What a run computes: :class:`RunSpec`, one frozen, validated description built the same way by
the command line (:mod:`densepure_rt.run`), the Python API (:mod:`densepure_rt.runtime`) and Ray
actors (:mod:`densepure_rt.scale.work`), and stored in a results file's options JSON.

    from densepure_rt.spec import RunSpec

    spec = RunSpec("certify-radii", sigma=0.5, steps=4, votes=3, n0=100, n=2000, radii=(0.25, 0.5))
    spec.to_dict()["round"]        # 1: the sequential modes read one vote at a time by default

Every setting is checked once, here, when the spec is made (a bad value is a one-line
:class:`~densepure_rt.errors.ConfigError` naming the parameter); what a mode needs beyond the
shared settings (target radii, ``tol``) is checked by the mode's class
(:mod:`densepure_rt.modes`). ``n`` is the estimation budget: fixed n for "certify" and "predict",
the most samples (``--n-max``) for the sequential modes.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Optional

import numpy as np

from densepure_rt.errors import ConfigError, param
from densepure_rt.modes import MODE_TABLE, mode_of

__all__ = ["RunSpec", "MODES"]

#: The run modes: fixed-n CERTIFY, PREDICT, target radii (--radius), early stopping (--tol); their
#: classes are :data:`densepure_rt.modes.MODE_TABLE`'s.
MODES = tuple(MODE_TABLE)

#: The keys of :meth:`RunSpec.to_dict` (the options file's names) and the fields they hold.
_KEYS = {"mode": "mode", "sigma": "sigma", "steps": "steps", "votes": "votes", "n0": "n0", "n": "n", "radii": "radii",
         "tol": "tol", "alpha": "alpha", "seed": "seed", "batch": "batch", "round": "round_size", "early_exit": "early_exit",
         "images_per_call": "images_per_call", "selection_rule": "selection"}


def _integer(name: str, value, low: int = 1, high: int | None = None, none: bool = False):
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise ConfigError(f"{param(name)} must be an integer (got {value!r})")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"from {low} to {high}"
        raise ConfigError(f"{param(name)} must be an integer {bound} (got {value})")
    return value


@dataclass(frozen=True)
class RunSpec:
    """What every image of a run is computed with (plain values: it travels to Ray actors and into
    the options JSON).

    mode: "certify" (fixed n), "certify-radii" (target ``radii``), "certify-until" (early stopping
    at ``tol``) or "predict". sigma: the smoothing noise (> 0, [0, 1] pixel units). steps: b >= 1,
    "one-shot" or "none" (kept as its canonical word, "4"). votes: K >= 1. n0: selection samples
    (None for "predict"). n: estimation samples (the sequential modes' ``n_max``). alpha: the
    error level, in (0, 1). radii / tol: the sequential modes' targets. round_size: samples per
    round of the sequential tests (None: 1; no rounds in the fixed-n modes). seed: the noise seed,
    0 to 2^32 - 1. batch: noisy samples per engine call (rows: batch x votes; None: the engine's
    default). early_exit: stop a sample's runs once its vote is decided (None: on). images_per_call:
    the most images in flight (1: as many as fill a call). selection: when the sequential modes stop
    choosing c_a, a key of :data:`densepure_rt.stats.selection.SELECTION_RULES` (None: "clear-leader";
    none in the fixed-n modes, which select from all n0 samples).
    """

    mode: str
    sigma: float
    steps: str = "4"
    votes: int = 10
    n0: Optional[int] = 100
    n: int = 1000
    alpha: float = 0.001
    radii: Optional[tuple] = None
    tol: Optional[float] = None
    round_size: Optional[int] = None
    seed: int = 0
    batch: Optional[int] = None
    early_exit: Optional[bool] = None
    images_per_call: int = 1
    selection: Optional[str] = None

    def __post_init__(self):
        from densepure_rt.arguments import check_seed
        from densepure_rt.schedule import NO_PURIFICATION, ONE_SHOT, parse_steps
        from densepure_rt.stats.cohen import validate_params

        mode = mode_of(self.mode)
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen: set once, here
        if self.mode == "predict" and self.n0 is not None:
            set_("n0", None)  # PREDICT has no selection phase
        validate_params(self.sigma, self.alpha, self.n0, self.n, n_name="n_max" if mode.sequential else "n")
        set_("sigma", float(self.sigma))
        set_("alpha", float(self.alpha))
        set_("n", int(self.n))
        if self.n0 is not None:
            set_("n0", int(self.n0))
        try:
            steps = parse_steps(self.steps)
        except ConfigError as exc:  # "steps must be ...": named as the API's keyword / the CLI's flag
            text = str(exc)
            raise ConfigError(param("steps") + text[len("steps"):] if text.startswith("steps") else text) from None
        set_("steps", {ONE_SHOT: "one-shot", NO_PURIFICATION: "none"}.get(steps, str(steps)))
        set_("votes", _integer("votes", self.votes))
        check_seed(self.seed)
        set_("seed", int(self.seed))
        set_("batch", _integer("batch", self.batch, none=True))
        set_("images_per_call", _integer("in_flight", self.images_per_call))
        if self.early_exit is not None:
            set_("early_exit", bool(self.early_exit))
        if mode.sequential:
            set_("round_size", 1 if self.round_size is None else _integer("round_size", self.round_size))
        elif self.round_size is not None:
            raise ConfigError(f"{param('round_size')} goes with the sequential modes (radii or tol); "
                              "fixed-n CERTIFY and PREDICT have no rounds")
        from densepure_rt.stats.selection import DEFAULT_SELECTION, SELECTION_RULES

        if mode.sequential:
            selection = DEFAULT_SELECTION.key if self.selection is None else self.selection
            if selection not in SELECTION_RULES:
                raise ConfigError(f"{param('selection')} must be one of {', '.join(SELECTION_RULES)} (got {selection!r})")
            set_("selection", selection)
        elif self.selection is not None:
            raise ConfigError(f"{param('selection')} goes with the sequential modes (radii or tol); fixed-n CERTIFY "
                              "selects from all n0 samples and PREDICT has no selection")
        mode.check(self)  # the mode's own settings: radii, tol

    @property
    def sequential(self) -> bool:
        """Whether the mode stops each image when its test decides (--radius, --tol)."""
        return mode_of(self.mode).sequential

    @property
    def samples_per_image(self) -> int:
        """Noisy samples an image takes at most (the sequential modes usually stop earlier)."""
        return self.n if self.n0 is None else self.n0 + self.n

    def replace(self, **changes) -> "RunSpec":
        """A copy with ``changes``, validated again."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The spec as the options file's keys (``round`` for ``round_size``; ``radii`` a list)."""
        out = {key: getattr(self, field) for key, field in _KEYS.items()}
        out["radii"] = None if self.radii is None else list(self.radii)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RunSpec":
        """The spec of an options file (or :meth:`to_dict`'s output); other keys are ignored, and a
        setting missing from it takes its default."""
        kwargs = {field: data[key] for key, field in _KEYS.items() if key in data}
        if kwargs.get("radii") is not None:
            kwargs["radii"] = tuple(kwargs["radii"])
        return cls(**kwargs)
