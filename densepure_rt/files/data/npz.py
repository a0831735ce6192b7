"""``.npz`` archives of images (loaded without pickle), with optional labels and a stored
number of classes.

An archive is never loaded whole: ``images`` is read one image at a time. A member stored
uncompressed (``numpy.savez``) is memory-mapped at its offset in the zip file, so reading an image
touches only its own bytes. A compressed member (``numpy.savez_compressed``) cannot be mapped: it is
decompressed as a stream, keeping only the images asked for (:class:`_DeflatedRows`; a Fortran-order
compressed member, which holds no image contiguously, is the one exception and is read whole).
Opening an archive reads each member used once in 1 MiB blocks to check its CRC-32 (and, compressed,
its deflate stream), as ``numpy.load`` would, without holding it: a damaged file is refused when it
is opened, not half-way through a run.
"""

from __future__ import annotations

import mmap
import os  # named in the PathLike annotation string
import struct
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from densepure_rt.errors import DataError

from .common import MAX_LABEL, ArrayDataset, PathLike, _check_labels, _one_line, _show
from .paths import _require


# ----------------------------------------------------------------------------------------------
# .npz arrays.

_NPY_MAGIC = b"\x93NUMPY"
#: Bytes read at a time when a member is checked or streamed.
_BLOCK = 1 << 20
#: Decompressed images kept for a compressed member (those :meth:`_DeflatedRows.prefetch` was
#: asked for, in selection order, up to this many bytes); images beyond it are decompressed again
#: when read.
CACHE_BYTES = 1 << 30


def _layout(shape: tuple[int, ...], path: Path) -> str:
    """Which accepted layout ``shape`` is: "nchw" (``[N x C x H x W]``) or "nhwc"
    (``[N x H x W x C]``), C = 1 or 3, channels-first winning when both readings fit; or "nhw"
    (``[N x H x W]``, grayscale)."""
    if len(shape) == 3:
        return "nhw"
    if len(shape) == 4:
        if shape[1] in (1, 3):
            return "nchw"
        if shape[3] in (1, 3):
            return "nhwc"
    raise DataError(
        f"{path}: 'images' has shape {tuple(shape)}; expected [N x 3 x H x W], [N x H x W x 3], "
        "[N x 1 x H x W], [N x H x W x 1] or [N x H x W]"
    )


def _to_layout(images: np.ndarray, layout: str) -> np.ndarray:
    """A view of ``images`` (one layout of :func:`_layout`, with its N axis) as ``[N x C x H x W]``."""
    if layout == "nhw":
        return images[:, None]
    return images.transpose(0, 3, 1, 2) if layout == "nhwc" else images


def _canonical_layout(images: np.ndarray, path: Path) -> np.ndarray:
    """Accepted ``images`` layouts, returned as ``[N x C x H x W]``: ``[N x C x H x W]`` and
    ``[N x H x W x C]`` with C = 1 or 3 (channels-first wins when both readings fit), and
    ``[N x H x W]`` (grayscale)."""
    return _to_layout(images, _layout(images.shape, path))


@dataclass(frozen=True)
class _Member:
    """An ``.npy`` member of a zip archive: its entry, the array's shape, dtype and order, and the
    length of its ``.npy`` header (the array's bytes follow it)."""

    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    header: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=object)) * self.dtype.itemsize


def _not_an_array(key: str, path: Path) -> DataError:
    return DataError(
        f"{path}: '{key}' is not a numpy array (the archive member is not .npy data): "
        "save it with numpy.savez"
    )


def _member(archive: zipfile.ZipFile, names: dict[str, str], key: str, path: Path) -> _Member:
    """The ``.npy`` header of member ``key`` (``names``: key -> member name, as ``numpy.load``
    names them: ``<key>.npy`` or ``<key>``). A member that is not ``.npy`` data is refused as
    ``numpy.load`` would return it: raw bytes, not an array."""
    name = names[key]
    if not name.endswith(".npy"):
        raise _not_an_array(key, path)
    info = archive.getinfo(name)
    with archive.open(info) as handle:
        prefix = handle.read(8)
        if prefix[:6] != _NPY_MAGIC or len(prefix) < 8:
            raise _not_an_array(key, path)
        readers = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
        version = (prefix[6], prefix[7])
        if version not in readers:
            raise ValueError(f"'{key}' is .npy format version {version[0]}.{version[1]}, not 1.0 or 2.0")
        shape, fortran, dtype = readers[version](handle)
        header = handle.tell()
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    member = _Member(info, tuple(int(d) for d in shape), np.dtype(dtype), bool(fortran), int(header))
    if member.header + member.nbytes > info.file_size:
        raise ValueError(
            f"'{key}' holds {info.file_size - member.header} bytes of array data, not the "
            f"{member.nbytes} its header declares for shape {member.shape}"
        )
    return member


def _check_crc(archive: zipfile.ZipFile, member: _Member) -> None:
    """Read ``member`` to its end in blocks: zipfile checks the CRC-32 there (and zlib the deflate
    stream on the way); nothing is kept."""
    with archive.open(member.info) as handle:
        while handle.read(_BLOCK):
            pass


def _small_array(archive: zipfile.ZipFile, member: _Member) -> np.ndarray:
    """A member read whole (labels, num_classes: one value per image at most)."""
    with archive.open(member.info) as handle:
        handle.seek(member.header)
        data = handle.read(member.nbytes)
    return np.frombuffer(data, dtype=member.dtype).reshape(member.shape, order="F" if member.fortran else "C")


def _data_offset(file: Any, info: zipfile.ZipInfo) -> int:
    """Where an uncompressed member's bytes start in the zip file: after its local header (30
    bytes, the name and the local extra field, whose length can differ from the central
    directory's)."""
    file.seek(info.header_offset)
    local = file.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header of {info.filename!r}")
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_length + extra_length


def _mapped(file: Any, info: zipfile.ZipInfo, member: _Member) -> np.ndarray:
    """A read-only array over an uncompressed member's bytes, memory-mapped: nothing is read until
    an element is."""
    if member.nbytes == 0:
        return np.empty(member.shape, dtype=member.dtype)
    offset = _data_offset(file, info) + member.header
    if offset + member.nbytes > os.fstat(file.fileno()).st_size:
        raise zipfile.BadZipFile(f"{info.filename!r} runs past the end of the file")
    view = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    return np.ndarray(member.shape, dtype=member.dtype, buffer=view, offset=offset,
                      order="F" if member.fortran else "C")


class _DeflatedRows:
    """The images of a compressed C-order member, read as a stream: an array-like
    ``[N x C x H x W]`` (``shape``, ``dtype``, ``ndim``; indexing by one index or a 1-D array of
    them, as :class:`ArrayDataset` reads it). Image ``i`` is decompressed by seeking the member's
    stream to it (forward: decompressing and dropping what lies between; backward: from the
    start). :meth:`prefetch` decompresses a selection in one pass and keeps it (up to
    :data:`CACHE_BYTES`), so a run that validates its images and then reads them decompresses the
    member once."""

    def __init__(self, path: Path, file: Any, archive: zipfile.ZipFile, member: _Member, layout: str) -> None:
        self.path, self.member, self.layout = path, member, layout
        self._file = file
        raw = member.shape
        self.row_shape = raw[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=object)) * member.dtype.itemsize
        canonical = _to_layout(np.empty((0, *raw[1:]), dtype=np.uint8), layout).shape[1:]
        self.shape = (raw[0], *canonical)
        self.dtype = member.dtype
        self.ndim = len(self.shape)
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        #: The archive over the file as it was when the dataset was opened (held open, so a file
        #: replaced meanwhile is not read); the member's stream is opened at the first read.
        self._archive = archive
        self._stream: Any = None

    def __len__(self) -> int:
        return self.shape[0]

    def _row(self, index: int) -> np.ndarray:
        """Image ``index`` in the stored layout (a new array)."""
        target = self.member.header + index * self.row_bytes
        if self._stream is not None and self._stream.tell() > target:
            self._stream.close()  # behind: decompress again from the start
            self._stream = None
        if self._stream is None:
            self._stream = self._archive.open(self.member.info)
        # Forward in blocks of _BLOCK bytes (ZipExtFile.seek reads 16 MiB at a time).
        while (gap := target - self._stream.tell()) > 0:
            if not self._stream.read(min(gap, _BLOCK)):
                break
        data = self._stream.read(self.row_bytes)
        if len(data) != self.row_bytes:
            raise DataError(f"cannot read image {index} of {self.path}: the archive ended early")
        return np.frombuffer(data, dtype=self.dtype).reshape(self.row_shape)

    def prefetch(self, indices) -> None:
        """Decompress the images at ``indices`` in one pass over the member (ascending), keeping
        them for the reads that follow, as many as :data:`CACHE_BYTES` allows (the first asked for)."""
        wanted = list(dict.fromkeys(int(i) % self.shape[0] for i in indices))[: max(CACHE_BYTES // max(self.row_bytes, 1), 1)]
        with self._lock:
            self._cache = {}
            for i in sorted(wanted):
                self._cache[i] = self._row(i)

    def _image(self, index: int) -> np.ndarray:
        index = int(index)
        if not -self.shape[0] <= index < self.shape[0]:
            raise IndexError(f"image index {index} out of range for {self.shape[0]} images")
        index %= self.shape[0]
        with self._lock:
            row = self._cache.get(index)
            if row is None:
                row = self._row(index)
        return _to_layout(row[None], self.layout)[0]

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self._image(key)
        keys = np.asarray(key)
        if keys.ndim != 1 or not np.issubdtype(keys.dtype, np.integer):
            raise TypeError("a compressed .npz member is indexed by one image index or a 1-D array of them")
        return np.stack([self._image(k) for k in keys]) if len(keys) else np.empty((0, *self.shape[1:]), self.dtype)

    def close(self) -> None:
        """Close the member's stream and the archive's file."""
        with self._lock:
            if self._stream is not None:
                self._stream.close()
                self._stream = None
            self._archive.close()
            self._file.close()


def _npz_array(archive: zipfile.ZipFile, key: str, path: Path) -> np.ndarray:
    """Member ``key`` of ``archive`` read whole (a small one: labels, num_classes); a member that
    is not ``.npy`` data is refused, as ``numpy.load`` would give its raw bytes, not an array."""
    names = {n[:-4] if n.endswith(".npy") else n: n for n in archive.namelist()}
    member = _member(archive, names, key, path)
    _check_crc(archive, member)
    return _small_array(archive, member)


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
    stored_classes = labels = None
    file = archive = None
    keep_open = False
    try:
        file = open(path, "rb")
        if file.read(len(_NPY_MAGIC)) == _NPY_MAGIC:  # numpy.load reads .npy data too
            raise DataError(
                f"{path} holds a single .npy array, not an .npz archive: save it with "
                "numpy.savez(path, images=...)"
            )
        file.seek(0)
        archive = zipfile.ZipFile(file)
        # The keys numpy.load gives the members: their names, less a final ".npy".
        names = {n[:-4] if n.endswith(".npy") else n: n for n in archive.namelist()}
        if "images" not in names:
            raise DataError(
                f"{path} has no 'images' array (it has "
                f"{_one_line(', '.join(names)) or 'nothing'}): save the images under "
                "the key 'images'"
            )
        member = _member(archive, names, "images", path)
        _check_crc(archive, member)
        labels = _npz_array(archive, "labels", path) if "labels" in names else None
        if "num_classes" in names:
            stored_classes = _npz_array(archive, "num_classes", path)
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
        if member.dtype != np.uint8 and not np.issubdtype(member.dtype, np.floating):
            raise DataError(
                f"{path}: 'images' has dtype {member.dtype}; use uint8 (0-255) or float in [0, 1]"
            )
        if labels is not None:
            if not np.issubdtype(labels.dtype, np.integer):
                raise DataError(f"{path}: 'labels' has dtype {labels.dtype}; use integers")
            labels = _check_labels(labels.reshape(-1), num_classes, str(path), whose=whose)
        layout = _layout(member.shape, path)
        if member.info.compress_type == zipfile.ZIP_STORED:
            images = _to_layout(_mapped(file, member.info, member), layout)
        elif member.fortran:  # no image is contiguous in the stream: read whole, as numpy.load does
            images = _to_layout(_small_array(archive, member), layout)
        else:
            images = _DeflatedRows(path, file, archive, member, layout)
            keep_open = True
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
    finally:
        if not keep_open:  # a memory map keeps its own reference to the file
            if archive is not None:
                archive.close()
            if file is not None:
                file.close()
    return ArrayDataset(
        images,
        labels,
        image_size=image_size,
        channels=channels,
        num_classes=num_classes,
        name=str(path),
    )
