"""CIFAR-10 python batches, read with a restricted unpickler that only rebuilds numpy arrays
(never arbitrary pickled objects) after refusing forged memo indices."""

from __future__ import annotations

import io
import os  # named in the PathLike annotation string
import pickle
import pickletools
from pathlib import Path
from typing import Any

import numpy as np

from densepure_rt.errors import DataError

from .common import ArrayDataset, PathLike, _check_labels, _one_line, _show
from .paths import _is_dir, _require


CIFAR10_CLASSES = 10


# ----------------------------------------------------------------------------------------------
# CIFAR-10 python batches.


def _latin1_encode(text: str, encoding: str) -> bytes:
    # Python 3 writes bytes at pickle protocol < 3 as _codecs.encode(text, "latin1").
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _empty_bytes() -> bytes:
    # ... and the empty bytes object as bytes().
    return b""


_reconstruct = np.ndarray(0).__reduce__()[0]  # numpy's array rebuilder, whatever its module
_scalar = np.uint8(0).__reduce__()[0]  # numpy's scalar rebuilder

#: The only globals a CIFAR batch may name: numpy's array/dtype/scalar rebuilders (under numpy 1
#: and numpy 2 module names) and the two helpers Python 3 uses for bytes at protocol 2.
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; any other global (a function, a class) is
    refused, so a crafted file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None


#: Pickle opcodes that name a slot of the unpickler's memo table.
_MEMO_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})


def _check_memo_indices(raw: bytes) -> None:
    """Refuse a pickle whose memo indices exceed its number of opcodes (``pickle.UnpicklingError``;
    ``ValueError`` where the opcodes themselves do not parse). A pickler numbers memo slots 0, 1,
    2, ..., one PUT each, so a real file never does; but CPython's unpickler grows its memo table
    to whatever index a PUT names, so a 100-byte file with ``LONG_BINPUT 1258375976`` costs
    gigabytes and a minute before failing. ``pickletools.genops`` only parses, never builds."""
    for count, (op, arg, _) in enumerate(pickletools.genops(raw)):
        if op.name in _MEMO_OPS and int(arg) > count:
            raise pickle.UnpicklingError(f"{op.name} {arg} at opcode {count} is not a real memo index")


def _get(batch: dict, key: str) -> Any:
    if key.encode() in batch:
        return batch[key.encode()]
    return batch.get(key)


def read_cifar_batch(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch (``test_batch``, ``data_batch_N``) safely: returns uint8
    images ``[N x 3 x 32 x 32]`` and int64 labels ``[N]``. The file is a pickled dict (written by
    Python 2) with ``b'data'`` ``[N x 3072]`` uint8 (1024 red, then green, then blue, row-major)
    and ``b'labels'``; only numpy array rebuilding is allowed while unpickling."""
    path = _require(Path(path))
    try:
        with open(path, "rb") as f:
            raw = f.read()
        _check_memo_indices(raw)
        # Unpickled from memory: a length field larger than the data then fails as truncated,
        # where reading a file would first allocate a buffer of that length.
        batch = _ArraysOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise DataError(
            f"{path} is not a plain CIFAR-10 batch ({_one_line(str(exc))}): use the python "
            "version of CIFAR-10 (cifar-10-python.tar.gz, extracted)"
        ) from None
    except (
        OSError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        OverflowError,
        MemoryError,
        RecursionError,
        SystemError,  # numpy's dtype.__setstate__ given malformed arguments by a crafted file
    ) as exc:
        raise DataError(
            f"cannot read {path} as a CIFAR-10 batch ({type(exc).__name__}: {_one_line(str(exc))}): "
            "re-extract cifar-10-python.tar.gz"
        ) from None
    data = _get(batch, "data") if isinstance(batch, dict) else None
    labels = _get(batch, "labels") if isinstance(batch, dict) else None
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * 32 * 32
    ):
        raise DataError(
            f"{path} does not hold CIFAR-10 images (b'data' must be uint8 [N x 3072]): "
            "use the python version of CIFAR-10 (cifar-10-python.tar.gz, extracted)"
        )
    return data.reshape(-1, 3, 32, 32), _cifar_labels(labels, data.shape[0], path)


def _cifar_labels(labels: Any, n: int, path: Path) -> np.ndarray:
    """A batch's ``b'labels'`` (a list of ints in the real files; an integer array is accepted) as
    int64 ``[n]``, each a CIFAR-10 class 0-9, or :class:`DataError` naming the first bad label.
    Checked element by element before any conversion: a float label would be truncated silently
    (3.7 to 3), and 1e30 or a huge int would overflow int64."""
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and len(labels) == n:
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"{path}: b'labels' has dtype {labels.dtype}; CIFAR-10 labels are integers 0-9: "
                "re-extract the file"
            )
        return _check_labels(labels, CIFAR10_CLASSES, str(path), allow_unknown=False)
    if not isinstance(labels, (list, tuple)) or len(labels) != n:
        raise DataError(f"{path} does not hold one label per image under b'labels': re-extract the file")
    for i, value in enumerate(labels):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise DataError(
                f"{path}: label {_show(value)} of image {i} is not an integer; CIFAR-10 labels are "
                "0-9: re-extract the file"
            )
        if not 0 <= value < CIFAR10_CLASSES:
            raise DataError(
                f"{path}: label {_show(value)} of image {i} is not a CIFAR-10 class (0-9): "
                "re-extract the file"
            )
    return np.array([int(v) for v in labels], dtype=np.int64).reshape(n)


def cifar10_batch(
    path: PathLike, image_size: int = 32, channels: int = 3, num_classes: int | None = None
) -> ArrayDataset:
    """The CIFAR-10 batch at ``path`` (a batch file, or a folder holding ``test_batch``) as a
    dataset of ``[channels x 32 x 32]`` images with labels 0-9. ``num_classes``: the engine's
    number of classes, where known; a label at or above it is refused."""
    path = _require(Path(path))
    if _is_dir(path):
        path = path / "test_batch"
    images, labels = read_cifar_batch(path)
    if num_classes is not None and num_classes < CIFAR10_CLASSES:
        _check_labels(labels, num_classes, str(path), allow_unknown=False, whose="the engine")
    return ArrayDataset(
        images,
        labels,
        image_size=image_size,
        channels=channels,
        num_classes=CIFAR10_CLASSES,
        name=f"cifar10 {path}",
    )
