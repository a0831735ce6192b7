"""Results files: Cohen et al.'s TSV, one row per image flushed as soon as it is done, resumable.

Header: ``idx label predict radius correct time`` (readable by Cohen et al.'s ``analyze.py``), then
the extra columns ``n_a p_a_lower c_a top_counts seconds``. The resolved options are saved as JSON
beside the results (``<results>.json``); ``--resume`` refuses to continue a file written with other
settings. A run killed at any moment leaves at most one partial last line, which resume drops.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .certify import Certificate
from .errors import ConfigError, DataError

__all__ = ["HEADER", "ResultsWriter", "read_results", "options_path", "top_counts"]

HEADER = ("idx", "label", "predict", "radius", "correct", "time", "n_a", "p_a_lower", "c_a", "top_counts", "seconds")
PREDICT_HEADER = ("idx", "label", "predict", "correct", "time", "count1", "count2", "p_value", "seconds")

# Settings that must be identical for a resumed run to continue the same experiment.
_RESUME_KEYS = ("engine_sha256", "data", "sigma", "steps", "votes", "n0", "n", "alpha", "seed", "skip", "max", "ids", "mode")


def options_path(results: str | Path) -> Path:
    """Where the resolved options of ``results`` are saved."""
    results = Path(results)
    return results.with_name(results.name + ".json")


def top_counts(counts: np.ndarray, k: int = 3) -> str:
    """The k largest vote counts as ``class:count`` pairs, e.g. ``3:981,5:12,8:7``."""
    order = np.argsort(-counts, kind="stable")[:k]
    return ",".join(f"{int(c)}:{int(counts[c])}" for c in order if counts[c] > 0)


@dataclass
class ResultsWriter:
    """Appends one flushed, fsynced row per image; knows which indices are already done."""

    path: Path
    header: tuple = HEADER

    def __post_init__(self):
        self.path = Path(self.path)
        self._handle = None

    def open(self, options: dict, resume: bool, overwrite: bool = False) -> set[int]:
        """Start (or resume) the file; returns the image indices already written."""
        opts_file = options_path(self.path)
        done: set[int] = set()
        if self.path.exists() and not overwrite:
            if not resume:
                raise ConfigError(
                    f"--out {self.path} already exists: pass --resume to continue it, or choose another --out"
                )
            if not opts_file.is_file():
                raise ConfigError(f"cannot --resume {self.path}: its options file {opts_file} is missing")
            saved = json.loads(opts_file.read_text())
            changed = [k for k in _RESUME_KEYS if saved.get(k) != options.get(k)]
            if changed:
                detail = ", ".join(f"{k} {saved.get(k)!r} -> {options.get(k)!r}" for k in changed)
                raise ConfigError(f"cannot --resume {self.path} with different settings ({detail})")
            done = self._repair_and_read()
            self._handle = open(self.path, "a", encoding="utf-8")
            return done
        tmp = opts_file.with_name(opts_file.name + ".tmp")
        tmp.write_text(json.dumps(options, indent=2, sort_keys=True) + "\n")
        tmp.replace(opts_file)
        self._handle = open(self.path, "w", encoding="utf-8")
        self._write_line("\t".join(self.header))
        return done

    def _repair_and_read(self) -> set[int]:
        """Drop a partial last line (a kill mid-write) and return the indices of complete rows."""
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
            with open(self.path, "r+b") as handle:
                handle.truncate(len(data))
        lines = data.decode("utf-8").splitlines()
        if not lines:
            with open(self.path, "w", encoding="utf-8") as handle:
                handle.write("\t".join(self.header) + "\n")
            return set()
        if tuple(lines[0].split("\t")) != self.header:
            raise DataError(f"{self.path} is not a densepure-rt results file (unexpected header): choose another --out")
        return {int(line.split("\t", 1)[0]) for line in lines[1:] if line}

    def _write_line(self, line: str) -> None:
        self._handle.write(line + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def write_certificate(self, idx: int, label: int, cert: Certificate, counts: np.ndarray, seconds: float) -> None:
        """One CERTIFY row."""
        correct = int(cert.prediction == label)
        elapsed = str(datetime.timedelta(seconds=seconds))
        self._write_line(
            f"{idx}\t{label}\t{cert.prediction}\t{cert.radius:.6g}\t{correct}\t{elapsed}\t"
            f"{cert.n_a}\t{cert.p_a_lower:.6g}\t{cert.c_a}\t{top_counts(counts)}\t{seconds:.3f}"
        )

    def write_prediction(self, idx: int, label: int, prediction, seconds: float) -> None:
        """One PREDICT row."""
        correct = int(prediction.prediction == label)
        elapsed = str(datetime.timedelta(seconds=seconds))
        self._write_line(
            f"{idx}\t{label}\t{prediction.prediction}\t{correct}\t{elapsed}\t"
            f"{prediction.count1}\t{prediction.count2}\t{prediction.p_value:.6g}\t{seconds:.3f}"
        )

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_results(path: str | Path) -> list[dict]:
    """Rows of a certify results file as dicts (idx, label, predict, radius, correct; floats/ints)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"results file {path} not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise DataError(f"results file {path} is empty")
    header = lines[0].split("\t")
    needed = ("idx", "label", "predict", "radius", "correct")
    if any(h not in header for h in needed):
        raise DataError(f"{path} is not a certify results file (needs columns {' '.join(needed)})")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        values = dict(zip(header, line.split("\t")))
        try:
            rows.append(
                {
                    "idx": int(values["idx"]),
                    "label": int(values["label"]),
                    "predict": int(values["predict"]),
                    "radius": float(values["radius"]),
                    "correct": int(values["correct"]),
                }
            )
        except (KeyError, ValueError):
            raise DataError(f"{path} line {number} is malformed: {line[:80]!r}") from None
    return rows


def indices_todo(indices: Iterable[int], done: set[int]) -> list[int]:
    """The selected indices not yet written, in order."""
    return [i for i in indices if i not in done]
