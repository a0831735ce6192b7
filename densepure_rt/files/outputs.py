"""Files a command writes besides its results (``report --json``, ``report --plot``): checked before
any work, written whole or not at all.

The rules, the same for every output:

- an output never replaces an input of the same command (a results file, its options file, the
  data), compared by path and by inode, so a hard link is caught too;
- an output is never written through a symbolic link, and a name that is a link, a folder or a
  device is refused;
- an existing file is replaced only when densepure-rt recognises it as its own kind of output
  (``recognise``), or when the user says ``--force``;
- the folder must take a new file before the work starts (a file is created and removed there);
- the bytes go to a temporary file beside the target, are fsynced, then renamed into place: a full
  disk or a kill leaves the old file or the new one, never a truncated one, and no temporary file.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from densepure_rt.errors import ConfigError, DataError

__all__ = ["MARK", "check_output", "same_file", "write_atomic", "holds_mark"]

#: Written into every report output that can carry it (JSON key, image metadata), so that a later
#: report recognises the file as its own and may replace it.
MARK = "densepure-rt report"

_UMASK = os.umask(0)
os.umask(_UMASK)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: the same resolved path, or the same inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def holds_mark(path: Path, limit: int = 64 << 20) -> bool:
    """Whether the file at ``path`` contains :data:`MARK` (image metadata is stored as plain bytes
    in PNG, PDF, SVG and PostScript files); files over ``limit`` bytes are not read."""
    try:
        if os.lstat(path).st_size > limit:
            return False
        return MARK.encode() in Path(path).read_bytes()
    except OSError:
        return False


def check_output(path: str | os.PathLike, *, flag: str, inputs: Iterable[tuple[str, str | os.PathLike]] = (),
                 recognise: Callable[[Path], bool] | None = None, kind: str = "output", force: bool = False) -> Path:
    """``path`` as an output that may be written, or one :class:`ConfigError` line naming ``flag``,
    the file and the way out. ``inputs``: (what, path) pairs this command reads. ``recognise``:
    whether an existing file is densepure-rt's own ``kind`` (it may then be replaced). ``force``:
    replace any regular file that is not an input. Missing folders are created; the folder is
    checked to take a new file."""
    text = os.fspath(path)
    if text in ("", "-"):
        raise ConfigError(f"{flag} {text or repr(text)}: outputs go to a file, not standard output: give a file name")
    path = Path(text).expanduser()
    if text.endswith(("/", os.sep)) or path.is_dir():
        raise ConfigError(f"{flag} {text} is a folder: give a file name inside it")
    if os.path.islink(path):
        raise ConfigError(f"{flag} {text} is a symbolic link, which densepure-rt never writes through: give another name")
    for what, other in inputs:
        if same_file(path, other):
            raise ConfigError(f"{flag} {text} is {what}, an input of this command: give another name")
    if os.path.lexists(path):
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise ConfigError(f"{flag} {text} exists and is not a regular file: give another name")
        if not force and not (recognise is not None and recognise(path)):
            raise ConfigError(f"{flag} {text} exists and is not a densepure-rt {kind}: give another name, or add --force "
                              "to replace it")
    check_folder_writable(path.parent, flag)
    return path


def check_folder_writable(folder: Path, flag: str) -> None:
    """Create ``folder`` if needed and make sure a file can be created in it, or one line."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".dp-", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        hint = {errno.EROFS: "the file system is read-only", errno.ENOSPC: "the disk is full",
                errno.ENOTDIR: "a part of the path is a file, not a folder"}.get(exc.errno or 0, exc.strerror or "")
        raise ConfigError(f"{flag}: cannot create a file in {folder}: {hint}: choose another place") from None


def write_atomic(path: Path, write: Callable[[object], None] | bytes) -> None:
    """Put a whole new file at ``path``: ``write`` (bytes, or a function given a binary file object)
    fills a temporary file beside it, which is fsynced and renamed into place. On any failure
    (a full disk, an exception in ``write``) the temporary file is removed and ``path`` is as it
    was. The rename replaces a link itself, never the file a link points to."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".dp-", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs are ordinary files
        with os.fdopen(fd, "wb") as handle:
            if isinstance(write, (bytes, bytearray)):
                handle.write(write)
            else:
                write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise DataError(f"cannot write {path}: {exc.strerror or exc}: nothing was written; free some space or "
                            "choose another place") from None
        raise
    _fsync_dir(path.parent)


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
