"""Reading results files: the header of each mode and every row parsed and checked (column count,
types, ranges); a binary, edited or foreign file is one :class:`DataError` line. Writing (locks,
options, resume) is :mod:`densepure_rt.files.results`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable

from densepure_rt.errors import DataError

__all__ = ["HEADER", "PREDICT_HEADER", "RADII_HEADER", "UNTIL_HEADER", "HEADERS", "read_rows", "read_results"]

HEADER = ("idx", "label", "predict", "radius", "correct", "time", "n_a", "p_a_lower", "c_a", "top_counts", "unet_evals")
PREDICT_HEADER = ("idx", "label", "predict", "correct", "time", "count1", "count2", "p_value", "unet_evals")
#: ``certify --radius``: radius is the largest certified target; decisions lists every target.
RADII_HEADER = ("idx", "label", "predict", "radius", "correct", "time", "c_a", "n_a", "n", "decisions", "unet_evals")
#: ``certify --tol``: radius from the anytime-valid lower bound p_a_lower; stop says why sampling ended.
UNTIL_HEADER = ("idx", "label", "predict", "radius", "correct", "time", "c_a", "n_a", "n", "p_a_lower", "stop", "unet_evals")
HEADERS = {"certify": HEADER, "predict": PREDICT_HEADER, "certify-radii": RADII_HEADER, "certify-until": UNTIL_HEADER}

#: A results or options file larger than this is not one of ours (1e6 images x ~100 bytes is 100 MB).
_MAX_BYTES = 1 << 30


# ------------------------------------------------------------------------------------------------ #
# parsing rows                                                                                       #
# ------------------------------------------------------------------------------------------------ #


def _int(text: str) -> int:
    if not text.lstrip("-").isdigit() or len(text) > 19:
        raise ValueError(f"{text!r} is not an integer")
    return int(text)


def _label(text: str) -> int:
    value = _int(text)
    if value < -1:
        raise ValueError(f"{text!r} is not a class index or -1")
    return value


def _count(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise ValueError(f"{text!r} is negative")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not finite")
    return value


def _radius(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise ValueError(f"radius {text!r} is negative")
    return value


def _probability(text: str) -> float:
    value = _float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{text!r} is not a probability")
    return value


def _flag(text: str) -> int:
    if text not in ("0", "1"):
        raise ValueError(f"{text!r} is not 0 or 1")
    return int(text)


def _text(text: str) -> str:
    if not text:
        raise ValueError("empty value")
    return text


#: How each known column is parsed; a column not listed here is kept as text.
_COLUMNS: dict[str, Callable[[str], object]] = {
    "idx": _count,
    "label": _label,
    "predict": _label,
    "radius": _radius,
    "correct": _flag,
    "time": _text,
    "n_a": _count,
    "p_a_lower": _probability,
    "c_a": _count,
    "top_counts": str,
    "count1": _count,
    "count2": _count,
    "p_value": _probability,
    "n": _count,
    "decisions": _text,
    "stop": _text,
    "unet_evals": _count,
    "seconds": _float,  # files written before the column was dropped
}


def _decode(data: bytes, path: Path) -> list[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a text results file (it is not UTF-8): choose another file") from None
    if "\x00" in text:
        raise DataError(f"{path} is not a text results file (it holds NUL bytes): choose another file")
    return text.split("\n")


def _parse_rows(lines: list[str], header: tuple, path: Path, fix: str) -> list[dict]:
    """Parse and check every data line; raise one :class:`DataError` naming the first bad line."""
    rows, seen = [], {}
    for number, line in enumerate(lines[1:], start=2):
        if not line:
            if number == len(lines):  # the empty string after the final newline
                continue
            raise DataError(f"{path} line {number} is empty: {fix}")
        values = line.split("\t")
        if len(values) != len(header):
            raise DataError(f"{path} line {number} has {len(values)} columns, the header {len(header)}: {fix}")
        row = {}
        for name, value in zip(header, values):
            try:
                row[name] = _COLUMNS.get(name, str)(value)
            except ValueError as exc:
                raise DataError(f"{path} line {number}, column {name}: {exc}: {fix}") from None
        idx = row["idx"]
        if idx in seen:
            raise DataError(f"{path} holds image {idx} twice (lines {seen[idx]} and {number}): {fix}")
        seen[idx] = number
        rows.append(row)
    return rows


def read_rows(path: str | Path, required: Iterable[str] = ("idx",)) -> tuple[tuple, list[dict]]:
    """The header and the checked rows of a results file (certify, predict or later formats)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"results file {path} not found")
    if path.stat().st_size > _MAX_BYTES:
        raise DataError(f"{path} is {path.stat().st_size:,} bytes, too large to be a results file")
    lines = _decode(path.read_bytes(), path)
    if not lines or not lines[0]:
        raise DataError(f"results file {path} is empty")
    header = tuple(lines[0].split("\t"))
    missing = [c for c in required if c not in header]
    if missing or len(set(header)) != len(header):
        raise DataError(f"{path} is not a results file of this kind (it needs the columns {' '.join(required)})")
    fix = "the file was edited or damaged; restore it, or remove that line"
    if lines[-1]:  # no final newline: a partial last line, as a killed run leaves it
        lines = lines[:-1] + [""]
    return header, _parse_rows(lines, header, path, fix)


def read_results(path: str | Path) -> list[dict]:
    """Rows of a certify results file as dicts (idx, label, predict, radius, correct, ...), checked:
    a malformed row or an image index listed twice is a :class:`DataError`."""
    return read_rows(path, required=("idx", "label", "predict", "radius", "correct"))[1]
