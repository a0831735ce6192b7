"""Results files: Cohen et al.'s TSV, one row per image flushed as soon as it is done, resumable.

Header: ``idx label predict radius correct time`` (readable by Cohen et al.'s ``analyze.py``), then
the extra columns ``n_a p_a_lower c_a top_counts unet_evals`` (the sequential modes have their own
extra columns: :data:`RADII_HEADER`, :data:`UNTIL_HEADER`). ``time`` is the image's wall time as Cohen et
al. write it (``str(timedelta)``, e.g. ``0:00:01.532881``); there is no second time column.

Safety, in the order a run meets it:

- **One writer per file.** :meth:`ResultsWriter.open` takes an exclusive ``flock`` on
  ``<results>.lock`` for the whole run; a second run on the same file stops with one line naming
  the holder's PID. The lock file is opened without following symbolic links, and a file there that
  is not a regular, single-link file holding at most a PID is refused and left as it is (a planted
  link must not make a run truncate someone's file); a lock file this run created and could not
  fill is removed. The kernel drops the lock when the holder dies, so a killed run never blocks the
  next one. The run also holds ``flock`` on the options file and on the results file itself, so a
  second run is refused even when ``<results>.lock`` was deleted under the first.
- **Same settings or nothing.** The resolved options are saved as JSON beside the results
  (``<results>.json``). Running again on an existing file continues it when the settings that
  define the experiment are identical (noise is a pure function of seed, image and sample, so
  continuing gives exactly the rows a fresh run would); other settings are refused. The engine and
  the data are identified by what they compute and hold (``engine_id``, ``data_content_sha256``);
  files of older versions by their old keys, computed the old way.
- **Nothing half-written.** A fresh file appears only with its first complete row: the options are
  put in place (and locked) first, then header and row are written to a temporary file, fsynced and
  hard-linked into place, which fails instead of replacing a file another run created meanwhile.
  Later rows are appended with one write + fsync each, to the locked descriptor, after checking
  that the file was not deleted or replaced; a kill can leave at most one partial last line, which
  the next run drops (in place, on the same inode).
- **Hostile files are refused.** Every existing row is parsed and checked (column count, types,
  index among the selected images, no duplicate index) before anything is appended; a binary,
  edited or foreign file is one error line, never a traceback.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from densepure_rt.stats.cohen import Certificate
from densepure_rt.errors import ConfigError, DataError
from densepure_rt.files.rows import (HEADER, HEADERS, PREDICT_HEADER, RADII_HEADER, UNTIL_HEADER, _MAX_BYTES, _decode,  # noqa: F401
                                     _parse_rows, read_results, read_rows)

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
    "is_options_file",
    "lock_path",
    "top_counts",
    "indices_todo",
]


# Settings that must be identical for a run to continue an existing file.
_RESUME_IF_RECORDED = ("precision", "round")
_RESUME_KEYS = (
    "mode", "sigma", "steps", "votes", "n0", "n", "radii", "tol", "alpha", "seed", "skip", "max", "ids", "noise",
)
#: Identities of the engine and the data: (key of this version, key older versions wrote). A file
#: written by an older version is compared on its old key, through the ``legacy`` values the caller
#: computes the old way (:meth:`ResultsWriter.open`).
_IDENTITY_KEYS = (("engine_id", "engine_sha256"), ("data_content_sha256", "data_sha256"))


def _shown_key(key: str, options: dict) -> str:
    """A setting as the user names it: with --radius / --tol, ``n`` is --n-max."""
    if key == "n" and str(options.get("mode", "")).startswith("certify-"):
        return "n-max"
    return key


def _changed_settings(saved: dict, options: dict, legacy: dict) -> list[str]:
    """``key old -> new`` for each experiment-defining setting in which ``saved`` (a results file's
    options) differs from ``options`` (this run's)."""
    changed = [k for k in _RESUME_KEYS if saved.get(k) != options.get(k)]
    # The arithmetic the engine actually ran in (OpenVINO fp32 / bf16) and the sequential modes'
    # round size: files written before they were recorded carry no such key and continue as before.
    changed += [k for k in _RESUME_IF_RECORDED if k in saved and saved.get(k) != options.get(k)]
    # The graphs that ran: files written before --kernels existed ran the portable ones.
    if "kernels" in options and saved.get("kernels", "portable") != options["kernels"]:
        changed.append("kernels")
    # --tol's stop rule (densepure_rt.stats.sequential.STOP_RULE): --tol files written before it was
    # recorded stopped by the one-doubling forecast. Another rule stops elsewhere: never mixed.
    if options.get("mode") == "certify-until" and saved.get("stop_rule", ONE_DOUBLING) != options.get("stop_rule"):
        changed.append("stop_rule")
    # The selection rule of the sequential modes: files written before it was recorded used the
    # clear-leader rule. Another rule picks c_a elsewhere: never mixed.
    if options.get("mode") in ("certify-radii", "certify-until") and \
            saved.get("selection_rule", CLEAR_LEADER) != options.get("selection_rule", CLEAR_LEADER):
        changed.append("selection_rule")
    defaults = {"kernels": "portable", "stop_rule": ONE_DOUBLING, "selection_rule": CLEAR_LEADER}
    shown = [f"{_shown_key(k, options)} {saved.get(k, defaults.get(k))!r} -> {options.get(k)!r}" for k in changed]
    if "engine_format" in options and saved.get("engine_format", 2) != options["engine_format"]:
        # Files written before the format was recorded came from format-2 engines (one row of step
        # scalars per call); their engine_id differs too, so this only says why.
        shown.append(f"engine format {saved.get('engine_format', 2)!r} -> {options['engine_format']!r} (rebuilt graphs)")
    for key, old_key in _IDENTITY_KEYS:
        if key in saved or old_key not in saved or old_key not in legacy:
            if saved.get(key) != options.get(key):
                shown.append(f"{key} {str(saved.get(key))[:12]}... -> {str(options.get(key))[:12]}...")
        elif saved[old_key] != legacy[old_key]():
            shown.append(f"{old_key} {str(saved[old_key])[:12]}... -> {str(legacy[old_key]())[:12]}...")
    return shown

#: The name of --tol's stop rule in files written before the rule was recorded.
ONE_DOUBLING = "tol-one-doubling"
#: The selection rule of sequential files written before the rule was recorded.
CLEAR_LEADER = "clear-leader"

#: Longest suffix added to a results file's name (``.json``, ``.lock``); temporary files use short names.
_SIDECAR_SUFFIX = 5
_UMASK = os.umask(0)
os.umask(_UMASK)



def options_path(results: str | Path) -> Path:
    """Where the resolved options of ``results`` are saved."""
    results = Path(results)
    return results.with_name(results.name + ".json")


def is_options_file(path: str | Path) -> bool:
    """Whether ``path`` is a regular file (not a link) holding a densepure-rt run's options: a JSON
    object naming a mode of this tool with its sigma and seed."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > (1 << 20):
            return False
        saved = json.loads(os.pread(fd, 1 << 20, 0).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return False
    finally:
        os.close(fd)
    return isinstance(saved, dict) and saved.get("mode") in HEADERS and {"sigma", "seed"} <= set(saved)


def lock_path(results: str | Path) -> Path:
    """The lock file held while a run writes ``results``."""
    results = Path(results)
    return results.with_name(results.name + ".lock")


def top_counts(counts: np.ndarray, k: int = 3) -> str:
    """The k largest vote counts as ``class:count`` pairs, e.g. ``3:981,5:12,8:7``."""
    order = np.argsort(-counts, kind="stable")[:k]
    return ",".join(f"{int(c)}:{int(counts[c])}" for c in order if counts[c] > 0)


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


class _RaceLost(Exception):
    """Another run put a file where this one was about to link its own."""


def _same_file(path: Path, fd: int) -> bool:
    """Whether ``path`` (not followed if it is a link) is the file open as ``fd``."""
    try:
        here = os.lstat(path)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


def _unlink_if_same(path: Path, fd: int) -> None:
    """Remove ``path`` if it still is the file open as ``fd`` (another run's file is left alone)."""
    if _same_file(path, fd):
        try:
            os.unlink(path)
        except OSError:
            pass


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
    #: The options file, locked for the run (a run creating the same file concurrently stops on it).
    _options_fd: int | None = field(default=None, init=False, repr=False)
    _pending_options: dict | None = field(default=None, init=False, repr=False)
    #: Settings a continued file's options supplied in place of this run's defaults (``open(adopt=)``).
    adopted: dict = field(default_factory=dict, init=False)

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
        """Take the run's lock: an exclusive ``flock`` on ``FILE.lock``, which holds the holder's PID.

        The lock file is opened without following symbolic links and must be a regular file with
        one link and at most a PID in it, so a planted link or a user's file is refused, never
        truncated; a lock file this run created and could not fill (a full disk) is removed again.
        A lock file swapped between its opening and the ``flock`` (a run that ended meanwhile
        removes its lock file) is opened again, so two runs never hold locks on different inodes.
        """
        lock = lock_path(self.path)
        for _ in range(10):
            fd, created = self._open_lock(lock)
            try:
                self._flock_or_refuse(fd, lock)
                if _same_file(lock, fd):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the lock file was removed or replaced meanwhile: take the one there now
        else:  # pragma: no cover - ten swaps in a row
            raise ConfigError(f"the lock file {lock} keeps being replaced: stop the other process that touches it")
        try:
            if not created:
                os.ftruncate(fd, 0)  # a lock file of ours (checked in _open_lock) left by a run that died
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:
            if created:
                _unlink_if_same(lock, fd)
            os.close(fd)
            raise _os_error(exc, lock) from None
        self._lock_fd = fd

    @staticmethod
    def _open_lock(lock: Path) -> tuple[int, bool]:
        """A descriptor of the lock file and whether this call created it (see :meth:`_lock`)."""
        flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            return os.open(lock, flags | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            pass
        except OSError as exc:
            raise _os_error(exc, lock, "create") from None
        try:
            fd = os.open(lock, flags | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            if exc.errno == errno.ELOOP or os.path.islink(lock):
                raise ConfigError(
                    f"the lock file {lock} is a symbolic link, which densepure-rt never writes: remove the link "
                    "(it may have been planted to overwrite another file), then run again"
                ) from None
            raise _os_error(exc, lock, "open") from None
        info = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(info.st_mode):
            problem = "is not a regular file"
        elif info.st_nlink != 1:
            problem = f"has {info.st_nlink} hard links (a lock file has one)"
        elif info.st_size > 32 or (info.st_size and not os.pread(fd, 33, 0).strip().isdigit()):
            problem = "does not hold a PID, as a densepure-rt lock file does"
        if problem:
            os.close(fd)
            raise ConfigError(
                f"{lock} {problem}, so it is not a densepure-rt lock file and is left as it is: move it away, "
                "or choose another --out"
            )
        return fd, False

    def _flock_or_refuse(self, fd: int, lock: Path) -> None:
        if fcntl is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise ConfigError(
                f"--out {self.path} is being written by another densepure-rt run (PID {holder}): "
                "wait for it to finish, or choose another --out"
            ) from None

    def _lock_results(self, fd: int) -> None:
        """Also lock the results file itself: a run whose ``FILE.lock`` was deleted under it still
        holds this one, so a second run is refused instead of appending the same images again."""
        if fcntl is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(
                f"--out {self.path} is being written by another densepure-rt run (its lock file {lock_path(self.path).name} "
                "was removed while it ran): wait for it to finish, or choose another --out"
            ) from None

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        _unlink_if_same(lock_path(self.path), self._lock_fd)  # never another run's lock file
        os.close(self._lock_fd)  # closing releases the flock
        self._lock_fd = None

    def open(self, options: dict, resume: bool = True, allowed: Iterable[int] | None = None,
             legacy: dict[str, Callable[[], object]] | None = None,
             adopt: dict[str, Callable[[object], bool]] | None = None) -> set[int]:
        """Lock the file and return the image indices it already holds (empty for a new file).

        An existing file is continued only if its saved options match ``options`` on every
        experiment-defining key (see module docstring); ``resume`` is accepted for compatibility:
        continuing an identical experiment is always safe, so it is the default. ``legacy`` maps
        an identity key of files written by older versions (``engine_sha256``, ``data_sha256``) to
        a function computing that old value for this run, so such files can still be continued.
        ``adopt``: settings this run left at their defaults, each with a check of a value; a file
        that recorded such a setting is continued with its value (written into ``options``, and
        listed in :attr:`adopted`), so a default that changed between versions does not refuse it.
        A recorded value that fails the check is a one-line :class:`DataError`.
        """
        self.adopted = {}
        self._check_name()
        if self.path.parent and not self.path.parent.is_dir():
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise _os_error(exc, self.path.parent, "create the folder") from None
        self._lock()
        try:
            if os.path.lexists(self.path):
                return self._continue(options, allowed, legacy or {}, adopt or {})
            self._check_foreign_options()
            self._pending_options = dict(options)
            return set()
        except BaseException:
            self.close()
            raise

    def _check_foreign_options(self) -> None:
        """A new results file's options file name must be free, or hold the options of a run killed
        before its first row (which the first row replaces): anything else there is the user's and
        is never replaced, so the run stops before any work."""
        target = options_path(self.path)
        if os.path.lexists(target) and not is_options_file(target):
            raise ConfigError(
                f"--out {self.path} would save its options as {target}, which exists and is not a densepure-rt options "
                "file: move that file away, or choose another --out"
            )

    def _open_existing(self) -> int:
        """A read-write descriptor of the existing results file, locked (:meth:`_lock_results`)."""
        flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(self.path, flags)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR) or os.path.islink(self.path):
                raise ConfigError(f"--out {self.path} exists and is not a regular file: choose another --out") from None
            raise _os_error(exc, self.path, "open") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(f"--out {self.path} exists and is not a regular file: choose another --out")
            self._lock_results(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _continue(self, options: dict, allowed: Iterable[int] | None, legacy: dict, adopt: dict) -> set[int]:
        fd = self._open_existing()
        self._handle = os.fdopen(fd, "r+b", buffering=0)
        opts_file = options_path(self.path)
        if not opts_file.is_file():
            raise ConfigError(
                f"--out {self.path} exists but its options file {opts_file.name} is missing, so it cannot be "
                "continued safely: choose another --out"
            )
        try:
            self._options_fd = os.open(opts_file, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
            if fcntl is not None:
                fcntl.flock(self._options_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(
                f"--out {self.path}: its options file {opts_file.name} is held by another densepure-rt run or is not a "
                "regular file: wait for that run, or choose another --out"
            ) from None
        try:
            if os.fstat(self._options_fd).st_size > (1 << 20):
                raise ValueError("too large")
            saved = json.loads(os.pread(self._options_fd, 1 << 20, 0).decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise DataError(f"the options file {opts_file} is corrupt ({type(exc).__name__}): choose another --out") from None
        if not isinstance(saved, dict):
            raise DataError(f"the options file {opts_file} is not a JSON object: choose another --out")
        for key, valid in adopt.items():
            if key in saved and saved[key] != options.get(key):
                if not valid(saved[key]):
                    raise DataError(f"the options file {opts_file} records an impossible {key} ({str(saved[key])[:40]!r}): "
                                    "choose another --out")
                options[key] = self.adopted[key] = saved[key]
        changed = _changed_settings(saved, options, legacy)
        if changed:
            raise ConfigError(
                f"--out {self.path} holds results of other settings ({', '.join(changed)}): use the same settings to "
                "continue it, or choose another --out"
            )
        return self._repair_and_read(allowed)

    def _repair_and_read(self, allowed: Iterable[int] | None) -> set[int]:
        """Drop a partial last line (a kill mid-write), check every row, return their indices.
        Works on the locked descriptor: the file is repaired in place, never replaced."""
        fix = "the file was edited or damaged: restore it, or choose another --out"
        handle = self._handle
        if os.fstat(handle.fileno()).st_size > _MAX_BYTES:
            raise DataError(f"{self.path} is too large to be a results file: choose another --out")
        data = os.pread(handle.fileno(), _MAX_BYTES, 0)
        lines = _decode(data, self.path)
        try:
            if not data:
                lines = ["\t".join(self.header), ""]
                self._append(("\t".join(self.header) + "\n").encode())
            elif lines[-1]:  # the last line has no newline: a kill mid-write
                keep = data[: data.rfind(b"\n") + 1]
                lines = lines[:-1] + [""]
                if not keep:
                    raise DataError(f"{self.path} has no complete header line: {fix}")
                os.ftruncate(handle.fileno(), len(keep))
                os.fsync(handle.fileno())
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

    # -- writing ------------------------------------------------------------------------------ #
    def _append(self, data: bytes) -> None:
        """Append ``data`` at the end of the locked file, flushed and fsynced. A failed write (a
        full disk) cuts the file back to its complete rows, so no partial line is left behind."""
        fd = self._handle.fileno()
        end = os.lseek(fd, 0, os.SEEK_END)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, end)
            except OSError:
                pass
            raise

    def _link_new(self, tmp: str, target: Path) -> None:
        """Put the complete temporary file ``tmp`` at ``target`` only if nothing is there: a hard
        link fails where a rename would replace a file another run created meanwhile."""
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise _RaceLost() from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                raise
            if os.path.lexists(target):  # a file system without hard links: rename, checked first
                raise _RaceLost() from None
            os.rename(tmp, target)

    def _write_options(self) -> None:
        """The options of a new file, put in place before its first row and locked for the run.

        An options file already there without a results file is either left by a run killed between
        the two (nobody holds it: it is replaced) or belongs to a run that is creating the same
        results file right now after its lock file was deleted (it holds a lock on it: this run
        stops). A kill after this leaves options without results, which the next run replaces."""
        target = options_path(self.path)
        data = (json.dumps(self._pending_options, indent=2, sort_keys=True) + "\n").encode()
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".dp-", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)
            os.write(fd, data)
            os.fsync(fd)
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the inode that becomes the options file
            try:
                self._link_new(tmp, target)
            except _RaceLost:
                self._replace_stale_options(tmp, target)
            self._options_fd, fd = fd, -1
        finally:
            if fd != -1:
                os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def _replace_stale_options(self, tmp: str, target: Path) -> None:
        try:
            holder = os.open(target, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            holder = None
        if holder is not None:
            try:
                if fcntl is not None:
                    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise ConfigError(
                    f"--out {self.path} is being created by another densepure-rt run (its lock file was removed): "
                    "choose another --out"
                ) from None
            finally:
                os.close(holder)
        if os.path.lexists(target) and not is_options_file(target):  # put there since this run started: never replaced
            raise ConfigError(
                f"--out {self.path} would save its options as {target}, which appeared while this run worked and is not a "
                "densepure-rt options file: move that file away, then run again"
            )
        if os.path.lexists(self.path):  # its results file exists: those options are its own, not stale
            raise ConfigError(
                f"--out {self.path} was created by another densepure-rt run while this one worked (its lock file was "
                "removed): choose another --out"
            )
        os.replace(tmp, target)

    def _create(self, first: bytes) -> None:
        """The first row of a new file: its options are put in place and locked
        (:meth:`_write_options`), then header and row go to a temporary file, which is locked,
        fsynced and linked into place only if no file of that name appeared meanwhile. A kill leaves
        no results file, or the results file with its first row and its options."""
        try:
            self._write_options()
            _fsync_dir(self.path.parent)
        except OSError as exc:
            raise _os_error(exc, options_path(self.path)) from None
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".dp-", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; results are ordinary files
            self._lock_results(fd)
            self._handle = os.fdopen(fd, "r+b", buffering=0)
            fd = -1
            self._append(first)
            try:
                self._link_new(tmp, self.path)
            except _RaceLost:
                raise ConfigError(
                    f"--out {self.path} was created by another densepure-rt run while this one worked (its lock "
                    "file was removed): choose another --out"
                ) from None
        except OSError as exc:
            raise _os_error(exc, self.path) from None
        finally:
            if fd != -1:
                os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
        _fsync_dir(self.path.parent)
        self._pending_options = None

    def _check_still_ours(self) -> None:
        """Refuse to append to a results file that was deleted or replaced during the run."""
        info = os.fstat(self._handle.fileno())
        if info.st_nlink == 0 or not _same_file(self.path, self._handle.fileno()):
            raise DataError(
                f"{self.path} was deleted or replaced while this run wrote it: the rows of this run are not in it; "
                "run again (to a new --out) to recompute them"
            )

    def _write_row(self, values: list) -> None:
        line = "\t".join(str(v) for v in values)
        if len(values) != len(self.header) or "\n" in line:
            raise ValueError(f"a results row must have {len(self.header)} single-line values")
        row = (line + "\n").encode("utf-8")
        if self._pending_options is not None:
            self._create(("\t".join(self.header) + "\n").encode() + row)
            return
        if self._handle is None:
            raise RuntimeError("ResultsWriter.open() was not called")
        self._check_still_ours()
        try:
            self._append(row)
        except OSError as exc:
            raise _os_error(exc, self.path) from None

    def write_certificate(self, idx: int, label: int, cert: Certificate, counts: np.ndarray, seconds: float, unet_evals: int = 0) -> None:
        """One CERTIFY row."""
        self._write_row([
            idx, label, cert.prediction, f"{cert.radius:.6g}", _correct(cert.prediction, label),
            datetime.timedelta(seconds=seconds), cert.n_a, f"{cert.p_a_lower:.6g}", cert.c_a, top_counts(counts), unet_evals,
        ])

    def write_radii(self, idx: int, label: int, cert, seconds: float) -> None:
        """One ``certify --radius`` row (a :class:`densepure_rt.certificates.RadiiCertificate`)."""
        names = {1: "certified", -1: "futile", 0: "undecided"}
        decisions = ",".join(f"{r:g}:{names[d]}" for r, d in zip(cert.radii, cert.decisions))
        self._write_row([
            idx, label, cert.prediction, f"{cert.radius:.6g}", _correct(cert.prediction, label),
            datetime.timedelta(seconds=seconds), cert.c_a, cert.n_a, cert.n, decisions, cert.unet_evals,
        ])

    def write_until(self, idx: int, label: int, cert, seconds: float) -> None:
        """One ``certify --tol`` row (a :class:`densepure_rt.certificates.EarlyStopCertificate`)."""
        self._write_row([
            idx, label, cert.prediction, f"{cert.radius:.6g}", _correct(cert.prediction, label),
            datetime.timedelta(seconds=seconds), cert.c_a, cert.n_a, cert.n, f"{cert.p_a_lower:.6g}", cert.reason, cert.unet_evals,
        ])

    def write_prediction(self, idx: int, label: int, prediction, seconds: float, unet_evals: int = 0) -> None:
        """One PREDICT row."""
        self._write_row([
            idx, label, prediction.prediction, _correct(prediction.prediction, label), datetime.timedelta(seconds=seconds),
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
        if self._options_fd is not None:
            os.close(self._options_fd)
            self._options_fd = None
        self._pending_options = None
        self._unlock()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _correct(prediction: int, label: int) -> int:
    """1 when a labelled image's prediction is its label. An unlabelled image (label -1) is never
    correct: an abstention (-1) would otherwise match it."""
    return int(label >= 0 and prediction == label)


def indices_todo(indices: Iterable[int], done: set[int]) -> list[int]:
    """The selected indices not yet written, in order."""
    return [i for i in indices if i not in done]
