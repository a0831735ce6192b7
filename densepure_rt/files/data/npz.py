"""``.npz`` archives of images (loaded without pickle), with optional labels and a stored
number of classes."""

from __future__ import annotations

import os  # named in the PathLike annotation string
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from densepure_rt.errors import DataError

from .common import MAX_LABEL, ArrayDataset, PathLike, _check_labels, _one_line, _show
from .paths import _require


# ----------------------------------------------------------------------------------------------
# .npz arrays.


def _canonical_layout(images: np.ndarray, path: Path) -> np.ndarray:
    """Accepted ``images`` layouts, returned as ``[N x C x H x W]``: ``[N x C x H x W]`` and
    ``[N x H x W x C]`` with C = 1 or 3 (channels-first wins when both readings fit), and
    ``[N x H x W]`` (grayscale)."""
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4:
        if images.shape[1] in (1, 3):
            return images
        if images.shape[3] in (1, 3):
            return images.transpose(0, 3, 1, 2)
    raise DataError(
        f"{path}: 'images' has shape {images.shape}; expected [N x 3 x H x W], [N x H x W x 3], "
        "[N x 1 x H x W], [N x H x W x 1] or [N x H x W]"
    )


def _npz_array(archive: Any, key: str, path: Path) -> np.ndarray:
    """``archive[key]``, which numpy returns as raw bytes (not an array) when the member is not an
    ``.npy`` file."""
    value = archive[key]
    if not isinstance(value, np.ndarray):
        raise DataError(
            f"{path}: '{key}' is not a numpy array (the archive member is not .npy data): "
            "save it with numpy.savez"
        )
    return value


def _npz_num_classes(value: np.ndarray, path: Path) -> int:
    """An archive's ``num_classes``: one positive integer (a 0-d array, as ``numpy.savez(...,
    num_classes=10)`` writes, or a 1-element array)."""
    fix = "save one positive integer, e.g. numpy.savez(path, images=..., num_classes=10)"
    if value.size != 1 or value.ndim > 1:
        raise DataError(f"{path}: 'num_classes' is an array of shape {value.shape}: {fix}")
    if not np.issubdtype(value.dtype, np.integer):
        raise DataError(
            f"{path}: 'num_classes' is {_show(value.reshape(-1)[0])} of dtype {value.dtype}, "
            f"not an integer: {fix}"
        )
    count = int(value.reshape(-1)[0])
    if not 1 <= count <= MAX_LABEL + 1:
        raise DataError(f"{path}: 'num_classes' is {count}: {fix}")
    return count


def npz_dataset(
    path: PathLike, image_size: int, channels: int = 3, num_classes: int | None = None
) -> ArrayDataset:
    """Images from a ``.npz`` file (loaded without pickle): key ``images``, uint8 (0-255) or float
    (already in [0, 1]) in a layout of :func:`_canonical_layout`; optional key ``labels`` (``[N]``
    integers, each -1 = unknown or a class index) and scalar ``num_classes`` (a positive integer).
    Images are not resized: they must already be ``image_size`` square.

    The argument ``num_classes`` is the engine's number of classes, where known. A stored
    ``num_classes`` larger than it is refused, whatever the labels (the file's labels may then
    name classes the engine does not have); a smaller or equal one is accepted, and the labels are
    checked against it. Without a stored count the labels are checked against the engine's. The
    dataset's ``num_classes`` is the stored count, else the argument."""
    path = _require(Path(path))
    stored_classes = None
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):  # np.load reads .npy data too
            raise DataError(
                f"{path} holds a single .npy array, not an .npz archive: save it with "
                "numpy.savez(path, images=...)"
            )
        with archive:
            if "images" not in archive.files:
                raise DataError(
                    f"{path} has no 'images' array (it has "
                    f"{_one_line(', '.join(archive.files)) or 'nothing'}): save the images under "
                    "the key 'images'"
                )
            images = _npz_array(archive, "images", path)
            labels = _npz_array(archive, "labels", path) if "labels" in archive.files else None
            if "num_classes" in archive.files:
                stored_classes = _npz_array(archive, "num_classes", path)
    except DataError:
        raise
    # zipfile.BadZipFile and zlib.error: a damaged archive; NotImplementedError and RuntimeError:
    # a member compressed by an unsupported method, or encrypted; MemoryError: a header claiming
    # an array larger than memory.
    except (
        OSError,
        ValueError,
        EOFError,
        zipfile.BadZipFile,
        zlib.error,
        NotImplementedError,
        RuntimeError,
        MemoryError,
    ) as exc:
        reason = _one_line(str(exc)) or type(exc).__name__
        raise DataError(f"cannot read {path} as .npz ({reason}): save it with numpy.savez") from None
    whose = "the engine"
    if stored_classes is not None:
        stored = _npz_num_classes(stored_classes, path)
        if num_classes is not None and stored > num_classes:
            raise DataError(
                f"{path} stores num_classes {stored} but the engine has {num_classes} classes "
                f"(0-{num_classes - 1}), so its labels may name classes the engine does not have: "
                f"certify it with an engine for {stored} classes, or, if its labels are all "
                f"-1 to {num_classes - 1}, save it with num_classes={num_classes}"
            )
        num_classes, whose = stored, "the data"
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise DataError(
            f"{path}: 'images' has dtype {images.dtype}; use uint8 (0-255) or float in [0, 1]"
        )
    if labels is not None:
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{path}: 'labels' has dtype {labels.dtype}; use integers")
        labels = _check_labels(labels.reshape(-1), num_classes, str(path), whose=whose)
    return ArrayDataset(
        _canonical_layout(images, path),
        labels,
        image_size=image_size,
        channels=channels,
        num_classes=num_classes,
        name=str(path),
    )
