"""Safe access to the data's files and folders: existence and type checks that never raise on
unsearchable paths, folder listing, image-extension test, and the hostile-input guards (symbolic
links to folders outside the data folder or round a loop, named pipes, sockets, devices and
broken links under an image extension)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from densepure_rt.errors import DataError

from .common import IMAGE_EXTENSIONS


def _require(path: Path) -> Path:
    try:
        exists = path.exists()
    except OSError as exc:  # a name too long, or a parent folder that cannot be searched
        raise DataError(
            f"cannot access data path {path} ({exc.strerror or exc}): pass a readable file or "
            "folder with --data"
        ) from None
    if not exists:
        raise DataError(f"data path {path} does not exist: pass an existing file or folder with --data")
    return path


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False (not an exception) where the path cannot be examined at all (a
    folder that cannot be searched): reading it would fail anyway, with its own message."""
    try:
        return path.is_file()
    except OSError:
        return False


def _is_dir(path: Path) -> bool:
    """``path.is_dir()`` (symbolic links followed), False where it cannot be examined (see
    :func:`_is_file`)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _list_dir(folder: Path) -> list[Path]:
    """The entries of ``folder`` (unsorted), or :class:`DataError` if it cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            return [Path(entry.path) for entry in entries]
    except OSError as exc:
        raise DataError(
            f"cannot list folder {folder} ({exc.strerror or exc}): make it readable, or point "
            "--data elsewhere"
        ) from None


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _inside(path: str, real_root: str) -> bool:
    """Whether the resolved path ``path`` is ``real_root`` or lies beneath it."""
    return path == real_root or path.startswith(real_root.rstrip(os.sep) + os.sep)


def _check_folder_link(link: str, real_root: str) -> None:
    """Refuse ``link`` if it is a symbolic link to a folder outside ``real_root`` (the data folder,
    resolved): following it could walk any tree on the machine (a link to ``/sys`` or ``/`` takes
    minutes), and the data would then depend on files that are not part of it. Links to folders
    inside the data folder are followed (as torchvision does); a link that is not a folder is left
    to the caller."""
    if not os.path.islink(link) or not _is_dir(Path(link)):
        return
    target = os.path.realpath(link)
    if not _inside(target, real_root):
        raise DataError(
            f"{link} is a symbolic link to {target}, a folder outside the data folder {real_root}: "
            "links are followed only within the data folder; copy or move that folder into it, "
            "or remove the link"
        )


def _walk(folder: Path, root: Path | None = None) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(folder, followlinks=True)`` (torchvision's walk), with three hostile cases made
    errors instead of silent: a folder that cannot be listed (``os.walk`` skips it, dropping its
    images and renumbering everything after them), a symbolic link to a folder that contains it
    (``os.walk`` follows it round and round until the OS's limit on links in a path, listing every
    image some 40 times), and a symbolic link to a folder outside the data folder ``root``
    (``folder`` where None), refused before anything beneath it is listed."""

    def fail(exc: OSError) -> None:
        raise DataError(
            f"cannot list folder {exc.filename} ({exc.strerror or exc}): make it readable or "
            "remove it"
        )

    real_data_root = os.path.realpath(folder if root is None else root)
    _check_folder_link(str(folder), real_data_root)
    for root_dir, dirs, names in os.walk(folder, onerror=fail, followlinks=True):
        real_root = os.path.realpath(root_dir)
        for name in dirs:
            link = os.path.join(root_dir, name)
            if not os.path.islink(link):
                continue
            target = os.path.realpath(link)
            if real_root == target or real_root.startswith(target.rstrip(os.sep) + os.sep):
                raise DataError(
                    f"{link} is a symbolic link to {target}, a folder that contains the link "
                    "(a loop): remove the link"
                )
            _check_folder_link(link, real_data_root)
        yield root_dir, dirs, names


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def _require_regular(path: Path) -> Path:
    """``path`` (a name with an image extension) if it is a regular file, or a symbolic link to
    one; :class:`DataError` otherwise. Checked when a folder is listed: skipping such a name would
    renumber every later image, and opening a named pipe blocks until something writes to it."""
    try:
        mode = os.stat(path).st_mode  # follows links; never opens, so a pipe cannot block
    except OSError as exc:
        if os.path.islink(path):
            raise DataError(
                f"{path} is a symbolic link whose target cannot be opened ({exc.strerror or exc}): "
                "restore its target or remove the link"
            ) from None
        raise DataError(f"cannot examine {path} ({exc.strerror or exc}): make it readable or remove it") from None
    if not stat.S_ISREG(mode):
        raise DataError(
            f"{path} has an image extension but is {_file_kind(mode)}, not a regular file: "
            "remove it, or rename it without an image extension"
        )
    return path
