"""Results files: Cohen et al.'s TSV, one row per image flushed as soon as it is done, resumable.

Header: ``idx label predict radius correct time`` (readable by Cohen et al.'s ``analyze.py``), then
the extra columns ``n_a p_a_lower c_a top_counts unet_evals`` (the sequential modes have their own
extra columns: :data:`RADII_HEADER`, :data:`UNTIL_HEADER`). ``time`` is the image's wall time as Cohen et
al. write it (``str(timedelta)``, e.g. ``0:00:01.532881``); there is no second time column.

Safety, in the order a run meets it:

- **One writer per file.** :meth:`ResultsWriter.open` takes an exclusive ``flock`` on
  ``<results>.lock`` for the whole run; a second run on the same file stops with one line naming
  the holder's PID. The kernel drops the lock when the holder dies, so a killed run never blocks
  the next one.
- **Same settings or nothing.** The resolved options are saved as JSON beside the results
  (``<results>.json``). Running again on an existing file continues it when the settings that
  define the experiment are identical (noise is a pure function of seed, image and sample, so
  continuing gives exactly the rows a fresh run would); other settings are refused.
- **Nothing half-written.** A fresh file appears only with its first complete row: header and row
  are written to a temporary file, fsynced and renamed into place, so a run that fails before its
  first image leaves no file that would block a re-run. Later rows are appended with one write +
  flush + fsync each; a kill can leave at most one partial last line, which the next run drops.
- **Hostile files are refused.** Every existing row is parsed and checked (column count, types,
  index among the selected images, no duplicate index) before anything is appended; a binary,
  edited or foreign file is one error line, never a traceback.
"""

from __future__ import annotations

import datetime
import errno
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .certify import Certificate
from .errors import ConfigError, DataError

try:  # POSIX advisory locks; on other systems runs are not protected against each other.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "HEADER",
    "PREDICT_HEADER",
    "RADII_HEADER",
    "UNTIL_HEADER",
    "HEADERS",
    "ResultsWriter",
    "read_results",
    "read_rows",
    "options_path",
    "lock_path",
    "top_counts",
    "indices_todo",
]

HEADER = ("idx", "label", "predict", "radius", "correct", "time", "n_a", "p_a_lower", "c_a", "top_counts", "unet_evals")
PREDICT_HEADER = ("idx", "label", "predict", "correct", "time", "count1", "count2", "p_value", "unet_evals")
#: ``certify --radius``: radius is the largest certified target; decisions lists every target.
RADII_HEADER = ("idx", "label", "predict", "radius", "correct", "time", "c_a", "n_a", "n", "decisions", "unet_evals")
#: ``certify --tol``: radius from the anytime-valid lower bound p_a_lower; stop says why sampling ended.
UNTIL_HEADER = ("idx", "label", "predict", "radius", "correct", "time", "c_a", "n_a", "n", "p_a_lower", "stop", "unet_evals")
HEADERS = {"certify": HEADER, "predict": PREDICT_HEADER, "certify-radii": RADII_HEADER, "certify-until": UNTIL_HEADER}

# Settings that must be identical for a run to continue an existing file.
_RESUME_IF_RECORDED = ("precision",)
_RESUME_KEYS = (
    "mode", "engine_sha256", "data_sha256", "sigma", "steps", "votes", "n0", "n", "radii", "tol", "alpha", "seed", "skip", "max",
    "ids", "noise",
)

#: Longest suffix added to a results file's name (``.json``, ``.lock``); temporary files use short names.
_SIDECAR_SUFFIX = 5
_UMASK = os.umask(0)
os.umask(_UMASK)

#: A results or options file larger than this is not one of ours (1e6 images x ~100 bytes is 100 MB).
_MAX_BYTES = 1 << 30


def options_path(results: str | Path) -> Path:
    """Where the resolved options of ``results`` are saved."""
    results = Path(results)
    return results.with_name(results.name + ".json")


def lock_path(results: str | Path) -> Path:
    """The lock file held while a run writes ``results``."""
    results = Path(results)
    return results.with_name(results.name + ".lock")


def top_counts(counts: np.ndarray, k: int = 3) -> str:
    """The k largest vote counts as ``class:count`` pairs, e.g. ``3:981,5:12,8:7``."""
    order = np.argsort(-counts, kind="stable")[:k]
    return ",".join(f"{int(c)}:{int(counts[c])}" for c in order if counts[c] > 0)


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


# ------------------------------------------------------------------------------------------------ #
# writing                                                                                            #
# ------------------------------------------------------------------------------------------------ #


def _os_error(exc: OSError, path: Path, action: str = "write") -> DataError:
    reason = exc.strerror or type(exc).__name__
    hint = {
        errno.ENOSPC: "free some disk space, then run the same command again to continue",
        errno.EDQUOT: "free some disk space, then run the same command again to continue",
        errno.EFBIG: "the file system refused a larger file; continue on another disk",
        errno.EACCES: "choose a writable --out",
        errno.EPERM: "choose a writable --out",
        errno.EROFS: "the file system is read-only; choose another --out",
        errno.ENAMETOOLONG: "choose a shorter --out",
        errno.ENOTDIR: "a part of the --out path is a file, not a folder",
        errno.ENOENT: "the folder does not exist",
    }.get(exc.errno or 0, "check --out")
    return DataError(f"cannot {action} {path}: {reason}: {hint}")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a short-named temporary file beside ``path``, fsync it, rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".dp-", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; results are ordinary files
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


@dataclass
class ResultsWriter:
    """Appends one flushed, fsynced row per image to a results file it holds locked.

    ``with ResultsWriter(path) as writer: done = writer.open(options, allowed=indices)`` then one
    ``write_*`` call per image. ``allowed`` (the selected image indices) makes rows of other images
    in an existing file an error, so a file of another experiment is never mixed in.
    """

    path: Path
    header: tuple = HEADER
    _handle: object = field(default=None, init=False, repr=False)
    _lock_fd: int | None = field(default=None, init=False, repr=False)
    _pending_options: dict | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.path = Path(self.path)

    # -- opening ------------------------------------------------------------------------------ #
    def _check_name(self) -> None:
        name = os.fsencode(self.path.name)
        if not name or self.path.name in (".", ".."):
            raise ConfigError(f"--out {self.path} is not a file name: give a file such as results.tsv")
        try:
            limit = os.pathconf(self.path.parent if str(self.path.parent) else ".", "PC_NAME_MAX")
        except (OSError, ValueError):
            limit = 255
        if len(name) + _SIDECAR_SUFFIX > limit:
            raise ConfigError(
                f"--out file name is {len(name)} bytes; with the '.json' and '.lock' files beside it, it must be "
                f"at most {limit - _SIDECAR_SUFFIX} bytes: choose a shorter name"
            )

    def _lock(self) -> None:
        lock = lock_path(self.path)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _os_error(exc, lock, "create") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                try:
                    holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
                finally:
                    os.close(fd)
                raise ConfigError(
                    f"--out {self.path} is being written by another densepure-rt run (PID {holder}): "
                    "wait for it to finish, or choose another --out"
                ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:
            os.close(fd)
            raise _os_error(exc, lock) from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        try:
            os.unlink(lock_path(self.path))
        except OSError:
            pass
        os.close(self._lock_fd)  # closing releases the flock
        self._lock_fd = None

    def open(self, options: dict, resume: bool = True, allowed: Iterable[int] | None = None) -> set[int]:
        """Lock the file and return the image indices it already holds (empty for a new file).

        An existing file is continued only if its saved options match ``options`` on every
        experiment-defining key (see module docstring); ``resume`` is accepted for compatibility:
        continuing an identical experiment is always safe, so it is the default.
        """
        self._check_name()
        if self.path.parent and not self.path.parent.is_dir():
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise _os_error(exc, self.path.parent, "create the folder") from None
        self._lock()
        try:
            if os.path.lexists(self.path):
                return self._continue(options, allowed)
            self._pending_options = dict(options)
            return set()
        except BaseException:
            self._unlock()
            raise

    def _continue(self, options: dict, allowed: Iterable[int] | None) -> set[int]:
        if self.path.is_symlink() or not self.path.is_file():
            raise ConfigError(f"--out {self.path} exists and is not a regular file: choose another --out")
        opts_file = options_path(self.path)
        if not opts_file.is_file():
            raise ConfigError(
                f"--out {self.path} exists but its options file {opts_file.name} is missing, so it cannot be "
                "continued safely: choose another --out"
            )
        try:
            if opts_file.stat().st_size > (1 << 20):
                raise ValueError("too large")
            saved = json.loads(opts_file.read_bytes().decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise DataError(f"the options file {opts_file} is corrupt ({type(exc).__name__}): choose another --out") from None
        if not isinstance(saved, dict):
            raise DataError(f"the options file {opts_file} is not a JSON object: choose another --out")
        changed = [k for k in _RESUME_KEYS if saved.get(k) != options.get(k)]
        # The arithmetic the engine actually ran in (OpenVINO fp32 / bf16): files written before it
        # was recorded carry no such key and are continued as before.
        changed += [k for k in _RESUME_IF_RECORDED if k in saved and saved.get(k) != options.get(k)]
        if changed:
            detail = ", ".join(f"{k} {saved.get(k)!r} -> {options.get(k)!r}" for k in changed)
            raise ConfigError(
                f"--out {self.path} holds results of other settings ({detail}): use the same settings to "
                "continue it, or choose another --out"
            )
        done = self._repair_and_read(allowed)
        try:
            self._handle = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            raise _os_error(exc, self.path, "open") from None
        return done

    def _repair_and_read(self, allowed: Iterable[int] | None) -> set[int]:
        """Drop a partial last line (a kill mid-write), check every row, return their indices."""
        fix = "the file was edited or damaged: restore it, or choose another --out"
        if self.path.stat().st_size > _MAX_BYTES:
            raise DataError(f"{self.path} is too large to be a results file: choose another --out")
        data = self.path.read_bytes()
        lines = _decode(data, self.path)
        if not data:
            lines = ["\t".join(self.header), ""]
            self._replace_contents(("\t".join(self.header) + "\n").encode())
        elif lines[-1]:  # the last line has no newline: a kill mid-write
            keep = data[: data.rfind(b"\n") + 1]
            lines = lines[:-1] + [""]
            if not keep:
                raise DataError(f"{self.path} has no complete header line: {fix}")
            try:
                with open(self.path, "r+b") as handle:
                    handle.truncate(len(keep))
            except OSError as exc:
                raise _os_error(exc, self.path, "repair") from None
        if tuple(lines[0].split("\t")) != self.header:
            raise DataError(
                f"{self.path} does not have the header of a densepure-rt {self._kind()} results file of this version: "
                "choose another --out"
            )
        rows = _parse_rows(lines, self.header, self.path, fix)
        done = {row["idx"] for row in rows}
        if allowed is not None:
            stray = sorted(done - set(allowed))
            if stray:
                raise DataError(
                    f"{self.path} holds image {stray[0]}, which these settings do not select: it belongs to "
                    "another experiment; choose another --out"
                )
        return done

    def _kind(self) -> str:
        return next((mode for mode, header in HEADERS.items() if header == self.header), "")

    def _replace_contents(self, data: bytes) -> None:
        try:
            _atomic_write(self.path, data)
        except OSError as exc:
            raise _os_error(exc, self.path) from None

    # -- writing ------------------------------------------------------------------------------ #
    def _write_row(self, values: list) -> None:
        line = "\t".join(str(v) for v in values)
        if len(values) != len(self.header) or "\n" in line:
            raise ValueError(f"a results row must have {len(self.header)} single-line values")
        if self._pending_options is not None:
            # The first row of a new file: options, then header + row, each renamed into place.
            options = json.dumps(self._pending_options, indent=2, sort_keys=True) + "\n"
            try:
                _atomic_write(options_path(self.path), options.encode())
            except OSError as exc:
                raise _os_error(exc, options_path(self.path)) from None
            self._replace_contents(("\t".join(self.header) + "\n" + line + "\n").encode("utf-8"))
            self._pending_options = None
            try:
                self._handle = open(self.path, "a", encoding="utf-8")
            except OSError as exc:
                raise _os_error(exc, self.path, "open") from None
            return
        if self._handle is None:
            raise RuntimeError("ResultsWriter.open() was not called")
        try:
            self._handle.write(line + "\n")
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as exc:
            raise _os_error(exc, self.path) from None

    def write_certificate(self, idx: int, label: int, cert: Certificate, counts: np.ndarray, seconds: float, unet_evals: int = 0) -> None:
        """One CERTIFY row."""
        self._write_row([
            idx, label, cert.prediction, f"{cert.radius:.6g}", int(cert.prediction == label),
            datetime.timedelta(seconds=seconds), cert.n_a, f"{cert.p_a_lower:.6g}", cert.c_a, top_counts(counts), unet_evals,
        ])

    def write_radii(self, idx: int, label: int, cert, seconds: float) -> None:
        """One ``certify --radius`` row (a :class:`densepure_rt.runtime.RadiiCertificate`)."""
        names = {1: "certified", -1: "futile", 0: "undecided"}
        decisions = ",".join(f"{r:g}:{names[d]}" for r, d in zip(cert.radii, cert.decisions))
        self._write_row([
            idx, label, cert.prediction, f"{cert.radius:.6g}", int(cert.prediction == label),
            datetime.timedelta(seconds=seconds), cert.c_a, cert.n_a, cert.n, decisions, cert.unet_evals,
        ])

    def write_until(self, idx: int, label: int, cert, seconds: float) -> None:
        """One ``certify --tol`` row (a :class:`densepure_rt.runtime.EarlyStopCertificate`)."""
        self._write_row([
            idx, label, cert.prediction, f"{cert.radius:.6g}", int(cert.prediction == label),
            datetime.timedelta(seconds=seconds), cert.c_a, cert.n_a, cert.n, f"{cert.p_a_lower:.6g}", cert.reason, cert.unet_evals,
        ])

    def write_prediction(self, idx: int, label: int, prediction, seconds: float, unet_evals: int = 0) -> None:
        """One PREDICT row."""
        self._write_row([
            idx, label, prediction.prediction, int(prediction.prediction == label), datetime.timedelta(seconds=seconds),
            prediction.count1, prediction.count2, f"{prediction.p_value:.6g}", unet_evals,
        ])

    def close(self) -> None:
        """Close the file and release the lock (a new file with no row is never created)."""
        if self._handle is not None:
            try:
                self._handle.close()
            except OSError:
                pass
            self._handle = None
        self._pending_options = None
        self._unlock()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def indices_todo(indices: Iterable[int], done: set[int]) -> list[int]:
    """The selected indices not yet written, in order."""
    return [i for i in indices if i not in done]
