"""Readers for the images to certify (numpy + Pillow only; never imports torch).

Every reader yields :class:`Sample` objects whose image is float32 in [0, 1], laid out
``[channels x H x W]``, with an integer label (-1 where the label is unknown). Readers are lazy:
opening a dataset lists it, ``dataset[i]`` decodes and checks image ``i``, and
``dataset.validate(indices)`` checks the chosen images up front, so bad input stops a run before
anything is written. ``validate`` also returns the identity of what it read (the sha256 of the
selected images' indices, labels, shapes and float32 pixels: :meth:`Dataset.validate`), which a
results file records so that it is only ever continued on the same images.

Given the engine's number of classes (``open_dataset(..., num_classes=N)``), every reader refuses
labels the engine cannot output: a label above N - 1 in a labels file, CIFAR-10 batch or ``.npz``;
an ``.npz`` whose stored ``num_classes`` is larger than N (its labels could exceed the engine's; a
smaller one is accepted, since every label it allows is one of the engine's); an ImageNet-style
folder with more than N class folders.

Supported inputs (:func:`open_dataset` picks the reader from what the path is):

- CIFAR-10 python batches: the file ``test_batch`` (or any ``data_batch_N``), or the
  ``cifar-10-batches-py`` folder that holds it. Read with a restricted unpickler that only
  rebuilds numpy arrays, never arbitrary pickled objects.
- ImageNet-style folders: one sub-folder per class, as torchvision's ``ImageFolder`` (class index =
  position of the folder name in sorted order; files in sorted path order, sub-folders included),
  preprocessed as the published ImageNet evaluation: ``Resize(size, bicubic)`` +
  ``CenterCrop(size)``.
- A plain folder of images (or one image file), unlabelled unless a ``labels.csv`` /
  ``labels.txt`` lies beside them; resized the same way unless already at the engine's size.
- Image files are 8-bit (any Pillow mode, converted as torchvision's loader does), 16-bit
  grayscale (value / 65535), or float TIFFs already in [0, 1]; deeper than 8 bits they stay in
  float through the resize. Labels are -1 (unknown) or class indices; anything else in a labels
  file, CIFAR-10 batch or ``.npz`` is refused with a :class:`DataError`, as are unreadable,
  corrupt or hostile files (decompression bombs, symbolic-link loops, symbolic links to folders
  outside the data folder, and named pipes, sockets, devices or broken links under an image
  extension, all refused when the folder is listed).
- ``.npz`` arrays: key ``images`` and optional ``labels`` (layouts in :class:`NpzDataset`).
- The shipped digits test split: :func:`digits_test_split`.
"""

from __future__ import annotations

import abc
import csv
import hashlib
import io
import os
import pickle
import pickletools
import re
import stat
import struct
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

from densepure_rt.errors import ConfigError, DataError

__all__ = [
    "Sample",
    "Dataset",
    "ArrayDataset",
    "ImageFilesDataset",
    "IMAGE_EXTENSIONS",
    "select",
    "check_image",
    "resize_center_crop",
    "read_cifar_batch",
    "cifar10_batch",
    "image_folder",
    "plain_image_folder",
    "npz_dataset",
    "digits_test_split",
    "DIGITS_TEST_ASSET",
    "open_dataset",
    "legacy_data_sha256",
]

PathLike = Union[str, "os.PathLike[str]"]

#: File extensions read as images, compared case-insensitively. The same list as torchvision's
#: ``IMG_EXTENSIONS``, so that an ``ImageFolder`` and this reader number the same files alike.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

#: How far outside [0, 1] a pixel may lie before it is refused (float round-off, not data).
RANGE_TOLERANCE = 1e-5

#: The digits test split shipped with the package (produced by the digits training script).
DIGITS_TEST_ASSET = Path(__file__).resolve().parents[1] / "assets" / "digits_test.npz"

CIFAR10_CLASSES = 10
DIGITS_CLASSES = 10

#: The largest label accepted where the number of classes is unknown (int32's maximum). Real label
#: sets are far smaller; a bigger value is a corrupt or misread file, and would not fit the int32
#: label tensors of the usual frameworks.
MAX_LABEL = 2**31 - 1

#: Pillow modes with one band deeper than 8 bits: 16-bit grayscale ("I;16*", and "I", which Pillow
#: < 10 gives for 16-bit PNGs and TIFFs hold as 32-bit integers) and 32-bit float ("F").
#: ``convert("RGB")`` clips these to 0-255 (16-bit loads all white, float in [0, 1] all black), so
#: they are read as floats instead (:func:`_high_depth_plane`).
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


@dataclass(frozen=True, eq=False)
class Sample:
    """One image to certify: ``image`` is float32 ``[channels x H x W]`` in [0, 1] (read-only);
    ``label`` is the true class, or -1 where unknown; ``index`` is its position in the dataset (the
    ``idx`` column of the results file)."""

    index: int
    image: np.ndarray
    label: int


def _shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def check_image(
    image: np.ndarray, expected_shape: Sequence[int], index: int, source: str | None = None
) -> None:
    """Raise :class:`DataError` unless ``image`` has ``expected_shape`` (``[C x H x W]``), is finite
    and lies in [0, 1] (up to ``RANGE_TOLERANCE``). ``index`` (and ``source``, a file name, where
    given) name the image in the message."""
    name = f"image {index}" + (f" ({source})" if source else "")
    expected = tuple(int(d) for d in expected_shape)
    if tuple(image.shape) != expected:
        raise DataError(
            f"{name} has shape {_shape_str(image.shape)} but the engine expects "
            f"{_shape_str(expected)}: resize it or build an engine for that size"
        )
    if not np.issubdtype(image.dtype, np.floating):
        raise DataError(
            f"{name} has dtype {image.dtype} but readers must give float pixels in [0, 1]: "
            "divide 8-bit values by 255"
        )
    if not np.all(np.isfinite(image)):
        raise DataError(f"{name} contains NaN or infinite values: fix or drop that image")
    low, high = float(image.min()), float(image.max())
    if low < -RANGE_TOLERANCE or high > 1.0 + RANGE_TOLERANCE:
        raise DataError(
            f"{name} has values in [{low:.4g}, {high:.4g}] but pixels must lie in [0, 1]: "
            "rescale it (8-bit values: divide by 255)"
        )


def select(
    n_total: int, skip: int = 1, max_images: int = -1, ids: Sequence[int] | None = None
) -> list[int]:
    """Indices of the images to certify, as Cohen et al.'s ``certify.py`` (and DensePure's
    ``eval_certified_densepure.py``) choose them::

        for i in range(len(dataset)):
            if i % skip != 0: continue
            if i == max: break

    So ``skip`` keeps every ``skip``-th index starting at 0, and ``max_images`` (the scripts'
    ``--max``) is an exclusive bound on the dataset INDEX, not a count of selected images; a
    negative value means no bound. Published runs: CIFAR-10 ``skip=20`` (500 images), ImageNet
    ``skip=500`` (100 images), both with ``max=-1``. One deliberate difference: the scripts test
    ``i == max`` only on kept indices, so a ``max`` that is not a multiple of ``skip`` is silently
    ignored there; here any ``max_images >= 0`` stops at the first kept index ``>= max_images``
    (identical wherever the scripts honour ``--max``).

    ``ids`` (the scripts' ``--use_id --sample_id``) lists explicit indices instead, certified in
    the order given; it cannot be combined with ``skip``/``max_images``.
    """
    if ids is not None:
        if skip != 1 or max_images >= 0:
            raise ConfigError("explicit image ids cannot be combined with --skip or --max: drop one")
        chosen = [int(i) for i in ids]
        seen: set[int] = set()
        for i in chosen:
            if not 0 <= i < n_total:
                raise ConfigError(
                    f"image id {i} is out of range: the dataset has {n_total} images "
                    f"(ids 0-{n_total - 1})"
                )
            if i in seen:
                raise ConfigError(f"image id {i} is listed twice: list each image once")
            seen.add(i)
        return chosen
    if skip < 1:
        raise ConfigError(f"--skip must be at least 1, got {skip}")
    stop = n_total if max_images < 0 else min(n_total, max_images)
    return list(range(0, stop, skip))


# ----------------------------------------------------------------------------------------------
# Pixel conversions shared by the readers.


def _luma_uint8(rgb: np.ndarray) -> np.ndarray:
    """``[3 x H x W]`` uint8 -> ``[1 x H x W]`` uint8 with Pillow's ``convert("L")`` arithmetic
    (ITU-R 601-2 luma in 16-bit fixed point), so arrays and image files agree exactly."""
    r, g, b = (rgb[c].astype(np.uint32) for c in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[None]


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Convert ``[C x H x W]`` (C in {1, 3}) to ``channels`` channels: L -> RGB repeats the plane;
    RGB -> L is ITU-R 601-2 luma (Pillow's)."""
    have = image.shape[0]
    if have == channels:
        return image
    if have == 1 and channels == 3:
        return np.repeat(image, 3, axis=0)
    if have == 3 and channels == 1:
        if image.dtype == np.uint8:
            return _luma_uint8(image)
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)[:, None, None]
        return (image.astype(np.float32) * weights).sum(axis=0, keepdims=True)
    raise DataError(f"cannot convert {have}-channel images to {channels} channels")


def _check_geometry(image_size: int, channels: int) -> None:
    if channels not in (1, 3):
        raise ConfigError(f"engines take 1 or 3 channels, not {channels}")
    if image_size < 1:
        raise ConfigError(f"image size must be positive, got {image_size}")


def _to_float(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255)  # as torchvision's ToTensor
    return image.astype(np.float32)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's ``Resize(size, interpolation=BICUBIC)`` then ``CenterCrop(size)`` on a PIL
    image, step for step: the shorter side becomes ``size`` and the longer ``int(size * long /
    short)``; an image already at that size is not resampled; the crop starts at
    ``int(round((h - size) / 2.0))`` (Python's round-half-even, as torchvision)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    if (top, left, new_w, new_h) == (0, 0, size, size):
        return image
    return image.crop((left, top, left + size, top + size))


def _high_depth_plane(image: Image.Image) -> np.ndarray:
    """The one band of a :data:`HIGH_DEPTH_MODES` image as float32 ``[H x W]`` in [0, 1]: 16-bit
    values / 65535; 32-bit integers likewise when all lie in 0-65535 (16-bit data, as Pillow < 10
    reads 16-bit PNGs), refused otherwise; floats as they are when finite and in [0, 1], refused
    otherwise (there is no agreed scale to map other floats from). Raises :class:`DataError` with
    the reason only; the caller names the file."""
    values = np.asarray(image)  # decodes; uint16 (either byte order), int32 or float32
    if image.mode == "F":
        plane = values.astype(np.float32)
        if not np.all(np.isfinite(plane)):
            raise DataError(
                "it is a float image holding NaN or infinite values; a float image must hold "
                "values in [0, 1]: fix those pixels, or save it as 8- or 16-bit"
            )
        low, high = float(plane.min()), float(plane.max())
        if low < -RANGE_TOLERANCE or high > 1.0 + RANGE_TOLERANCE:
            raise DataError(
                f"it is a float image with values in [{low:.4g}, {high:.4g}]; a float image must "
                "hold values in [0, 1]: rescale it, or save it as 8- or 16-bit"
            )
        return plane
    if image.mode == "I":
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise DataError(
                f"it is a 32-bit integer image with values in [{low}, {high}], beyond 16 bits: "
                "save it as 8- or 16-bit, or as a float TIFF in [0, 1]"
            )
    return values.astype(np.float32) / np.float32(65535)


def _resize_center_crop_float(planes: np.ndarray, size: int) -> np.ndarray:
    """:func:`resize_center_crop` for float32 ``[C x H x W]`` in [0, 1], without a trip through
    8 bits: each channel is resized as a Pillow float ("F") image, with the same bicubic filter and
    geometry as the 8-bit path, then clipped to [0, 1] (bicubic overshoots at sharp edges; the
    8-bit path clips there too, to 0-255)."""
    out = [
        np.asarray(resize_center_crop(Image.fromarray(np.ascontiguousarray(p, np.float32)), size))
        for p in planes
    ]
    return np.clip(np.stack(out).astype(np.float32), 0.0, 1.0)


def _open_image(f: io.BufferedReader) -> Image.Image:
    """``Image.open`` with Pillow's decompression-bomb warning (images over ``MAX_IMAGE_PIXELS``,
    about 89 million pixels) raised as an error, as it already is above twice that: such a file
    would take gigabytes to decode, and is never a real input to certify."""
    # catch_warnings is process-wide state; the readers run on the main thread only.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(f)


def _load_image_file(path: Path, size: int, channels: int, resize: bool) -> np.ndarray:
    """Decode one file to ``[channels x H x W]``. 8-bit images (most files) as uint8, as
    torchvision's loader: ``convert("RGB")`` first, then luma for 1-channel engines, then the
    optional resize + centre crop. One-band 16-bit, 32-bit integer and float images
    (:data:`HIGH_DEPTH_MODES`) as float32 in [0, 1], kept in float through the resize; 1-channel
    engines get that plane, 3-channel engines get it repeated. (16-bit RGB(A) PNGs need nothing
    special: Pillow has no 16-bit RGB mode and opens them as 8-bit "RGB"/"RGBA" holding each
    sample's high byte, within 1/257 of value / 65535.) Raises :class:`DataError` (the reason
    only) for files that are not regular or are empty, and for values a float image cannot hold;
    Pillow's own exceptions for undecodable files."""
    info = os.stat(path)
    # Checked before opening: opening a named pipe blocks until something writes to it.
    if not stat.S_ISREG(info.st_mode):
        raise DataError("it is not a regular file (a pipe, device or socket): remove it")
    if info.st_size == 0:
        raise DataError("the file is empty (0 bytes): replace or remove it")
    with open(path, "rb") as f:
        image = _open_image(f)
        if image.mode in HIGH_DEPTH_MODES:
            planes = _high_depth_plane(image)[None]
        else:
            image = image.convert("RGB")
            planes = None
    if planes is not None:
        if resize:
            planes = _resize_center_crop_float(planes, size)
        return np.repeat(planes, channels, axis=0)
    if channels == 1:
        image = image.convert("L")
    if resize:
        image = resize_center_crop(image, size)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


#: What Pillow raises on corrupt or hostile files besides OSError ("image file is truncated",
#: UnidentifiedImageError) and ValueError: its decoders parse headers with struct and index
#: tables read from the file, so a damaged file can fail in any of these ways.
_DECODE_ERRORS = (
    OSError,
    ValueError,
    EOFError,
    SyntaxError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
    MemoryError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


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


def _one_line(text: str, limit: int = 200) -> str:
    """``text`` with its whitespace runs (newlines included) collapsed to single spaces and cut
    to ``limit`` characters: library messages quoted in a :class:`DataError` must keep it to one
    line."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: Any, limit: int = 40) -> str:
    """``value`` for a one-line message: numbers as written, anything else as its repr; cut to
    ``limit`` characters (a hostile file may hold a label thousands of digits long, which Python
    refuses even to print)."""
    if isinstance(value, np.generic):
        value = value.item()  # np.str_('ten') -> 'ten', np.float64(2.5) -> 2.5
    try:
        text = str(value) if isinstance(value, (int, float)) else repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        text = f"a {value.bit_length()}-bit integer"
    return _one_line(text, limit)


def _label_range(num_classes: int | None, allow_unknown: bool) -> tuple[int, int, str]:
    """The lowest and highest accepted label, and both in words for messages."""
    high = MAX_LABEL if num_classes is None else num_classes - 1
    low = -1 if allow_unknown else 0
    words = f"0-{high}" if not allow_unknown else f"-1 (unknown) or 0-{high}"
    return low, high, words


def _check_labels(
    labels: np.ndarray,
    num_classes: int | None,
    where: str,
    allow_unknown: bool = True,
    whose: str = "the data",
) -> np.ndarray:
    """``labels`` (``[N]``) as int64, or :class:`DataError` naming the first bad label and its
    image index. Each must be an integer, and -1 (unknown, where ``allow_unknown``) or a class
    index below ``num_classes`` (at most :data:`MAX_LABEL` where ``num_classes`` is None).
    ``whose`` says in the message where ``num_classes`` comes from ("the data", "the engine")."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels have dtype {labels.dtype}; use integers")
    low, high, words = _label_range(num_classes, allow_unknown)
    # Compared in the stored dtype, before any cast: uint64 values past int64's range would wrap
    # round to negatives (2**64 - 1 to -1, "unknown"). A bound the dtype cannot exceed is skipped.
    info = np.iinfo(labels.dtype)
    bad = np.zeros(labels.shape, dtype=bool)
    if low > info.min:
        bad |= labels < low
    if high < info.max:
        bad |= labels > high
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        classes = "" if num_classes is None else f" ({whose} has {num_classes} classes)"
        fix = "fix the labels"
        if whose == "the engine":
            fix += ", or certify them with an engine for their classes"
        raise DataError(f"{where}: label {int(labels[i])} of image {i} is not {words}{classes}: {fix}")
    return labels.astype(np.int64)


def _hash_sample(digest: Any, index: int, label: int, image: np.ndarray) -> None:
    """Feed one image to a data digest in :meth:`Dataset.validate`'s byte layout."""
    digest.update(struct.pack("<qq", int(index), int(label)))
    digest.update(struct.pack("<3q", *(int(d) for d in image.shape)))
    digest.update(np.ascontiguousarray(image, dtype="<f4").tobytes())


# ----------------------------------------------------------------------------------------------
# Datasets.


class Dataset(abc.ABC):
    """A finite, indexable set of images to certify.

    ``image_shape`` is the ``(C, H, W)`` every image must have (the engine's input);
    ``dataset[i]`` returns a :class:`Sample` or raises :class:`DataError` if image ``i`` is
    unreadable, of another shape, not finite or outside [0, 1]. ``num_classes`` is None where the
    reader cannot know it. ``name`` is a short description for logs and reports.
    """

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int | None

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def _read(self, index: int) -> tuple[np.ndarray, int, str | None]:
        """Image ``index`` (non-negative, in range) as float32 ``[C x H x W]``, its label, and a
        file name for messages (or None)."""

    def __getitem__(self, index: int) -> Sample:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"image index {index} out of range for {n} images")
        index = int(index) % n
        image, label, source = self._read(index)
        check_image(image, self.image_shape, index, source)
        image.setflags(write=False)
        return Sample(index=index, image=image, label=int(label))

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def validate(self, indices: Sequence[int] | None = None) -> str:
        """Check the images at ``indices`` (all where None, in order) and raise :class:`DataError`
        at the first bad one; run this before writing any result. Returns the hex sha256 of what
        was read, the identity of the data a run certifies (recorded in a results file's options
        and compared when it is continued), computed on the images as they are checked, so nothing
        is decoded twice.

        The digest is :func:`hashlib.sha256` over, for each index in ``indices`` in the order
        given (``dataset[i]``, so ``i`` and ``i - len(dataset)`` hash alike), these bytes and
        nothing else, all little-endian:

        - the image's index in the dataset (``Sample.index``): 8 bytes, signed int64;
        - its label (``Sample.label``, -1 where unknown): 8 bytes, signed int64;
        - its shape ``C, H, W``: three signed int64, 24 bytes;
        - its pixels exactly as certified (``Sample.image``): ``C * H * W`` float32 (IEEE 754
          binary32), in C order (channel, then row, then column), ``4 * C * H * W`` bytes.

        So the digest changes with any pixel, label or selection, and with nothing else: not
        with file names, other files beside the data, or the file format the pixels came from. No
        selection (empty ``indices``) is the sha256 of no bytes."""
        digest = hashlib.sha256()
        for i in range(len(self)) if indices is None else indices:
            sample = self[i]
            _hash_sample(digest, sample.index, sample.label, sample.image)
        return digest.hexdigest()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, n={len(self)}, "
            f"image_shape={self.image_shape}, num_classes={self.num_classes})"
        )


class ArrayDataset(Dataset):
    """Images held in memory as ``[N x C x H x W]`` (C in {1, 3}; uint8, or float in [0, 1]),
    converted per item to float32 with ``channels`` channels. ``labels`` is ``[N]`` int or None."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None,
        *,
        image_size: int,
        channels: int = 3,
        num_classes: int | None = None,
        name: str = "arrays",
    ) -> None:
        _check_geometry(image_size, channels)
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise DataError(f"{name}: images must be [N x C x H x W] with C = 1 or 3, got {images.shape}")
        if labels is not None and labels.shape != (images.shape[0],):
            raise DataError(
                f"{name}: {labels.shape[0] if labels.ndim else 0} labels for {images.shape[0]} "
                "images: give one label per image"
            )
        self.images = images
        self.labels = labels
        self.channels = channels
        self.image_shape = (channels, image_size, image_size)
        self.num_classes = num_classes
        self.name = name

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def _read(self, index: int) -> tuple[np.ndarray, int, str | None]:
        image = _to_float(_to_channels(self.images[index], self.channels))
        label = -1 if self.labels is None else int(self.labels[index])
        return image, label, None

    def validate(self, indices: Sequence[int] | None = None) -> str:
        """:meth:`Dataset.validate`; a float array is first checked in blocks, so that a bad image
        late in a large selection stops the run before the images before it are hashed."""
        chosen = list(range(len(self))) if indices is None else [int(i) for i in indices]
        if chosen and self.images.shape[2:] != self.image_shape[1:]:
            self[chosen[0]]  # raises the shape message for the first chosen image
        if chosen and self.images.dtype != np.uint8:  # 8-bit pixels are always finite and in range
            # Checked in blocks without converting the whole selection at once.
            positions = np.asarray(chosen, dtype=np.int64)
            for start in range(0, len(positions), 1024):
                block = positions[start : start + 1024]
                values = self.images[block]
                bad = ~np.isfinite(values) | (values < -RANGE_TOLERANCE) | (values > 1 + RANGE_TOLERANCE)
                flagged = np.flatnonzero(bad.reshape(len(block), -1).any(axis=1))
                if flagged.size:
                    self[int(block[flagged[0]])]  # raises the message for that image
        return super().validate(chosen)


class ImageFilesDataset(Dataset):
    """Image files decoded on demand: ``files[i]`` with ``labels[i]`` (-1 = unknown), converted to
    ``channels`` channels and, where ``resize``, brought to ``image_size`` by
    :func:`resize_center_crop` (a no-op on images already at that size)."""

    def __init__(
        self,
        files: Sequence[Path],
        labels: Sequence[int],
        *,
        image_size: int,
        channels: int = 3,
        resize: bool = True,
        num_classes: int | None = None,
        classes: Sequence[str] | None = None,
        name: str = "images",
    ) -> None:
        _check_geometry(image_size, channels)
        self.files = list(files)
        self.labels = [int(label) for label in labels]
        self.image_size = image_size
        self.channels = channels
        self.resize = resize
        self.image_shape = (channels, image_size, image_size)
        self.num_classes = num_classes
        self.classes = list(classes) if classes is not None else None
        self.name = name

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, index: int) -> tuple[np.ndarray, int, str | None]:
        path = self.files[index]
        try:
            pixels = _load_image_file(path, self.image_size, self.channels, self.resize)
        except DataError as exc:
            raise DataError(f"cannot read image {index} ({path}): {exc}") from None
        except Image.UnidentifiedImageError:
            # Pillow's own message names the file object, not the file.
            raise DataError(
                f"cannot read image {index} ({path}): it is not an image Pillow can decode "
                "(corrupt, or another format under an image extension): replace or remove the file"
            ) from None
        except _DECODE_ERRORS as exc:
            reason = _one_line(str(exc)) or type(exc).__name__
            raise DataError(
                f"cannot read image {index} ({path}): {reason}: replace or remove the file"
            ) from None
        return _to_float(pixels), self.labels[index], str(path)


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


# ----------------------------------------------------------------------------------------------
# Folders of image files.


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


def _walk_images(folder: Path, root: Path | None = None) -> list[Path]:
    """Image files under ``folder`` in torchvision's ``make_dataset`` order: ``os.walk`` entries
    sorted by folder path, files sorted by name within each. Each must be a regular file
    (:func:`_require_regular`); ``root`` is the data folder (for :func:`_walk`)."""
    found = []
    for root_dir, _, names in sorted(_walk(folder, root)):
        found.extend(
            _require_regular(Path(root_dir, name)) for name in sorted(names) if _is_image_file(name)
        )
    return found


def image_folder(
    root: PathLike,
    image_size: int = 256,
    channels: int = 3,
    resize: bool = True,
    num_classes: int | None = None,
) -> ImageFilesDataset:
    """An ImageNet-style folder (``root/<class>/<image>``), numbered as torchvision's
    ``ImageFolder``: classes are the sub-folders in sorted name order (class index = position),
    images are taken class by class in sorted path order (nested folders included). Each image is
    preprocessed as the published ImageNet evaluation: RGB, ``Resize(image_size, bicubic)``,
    ``CenterCrop(image_size)``, /255. ``num_classes``: the engine's number of classes, where
    known; more class folders than that are refused before any folder is walked."""
    root = _require(Path(root))
    real_root = os.path.realpath(root)
    entries = _list_dir(root)
    for entry in entries:
        _check_folder_link(str(entry), real_root)
    classes = sorted(entry.name for entry in entries if _is_dir(entry))
    if not classes:
        raise DataError(f"{root} has no class sub-folders: put each class's images in its own folder")
    if num_classes is not None and len(classes) > num_classes:
        raise DataError(
            f"{root / classes[num_classes]}: class folder {_show(classes[num_classes], 80)} would be "
            f"label {num_classes}, but the engine has {num_classes} classes (0-{num_classes - 1}) "
            f"and {root} holds {len(classes)} class folders: remove the extra folders, or certify "
            "them with an engine for that many classes"
        )
    files: list[Path] = []
    labels: list[int] = []
    empty = []
    for class_index, class_name in enumerate(classes):
        found = _walk_images(root / class_name, root)
        if not found:
            empty.append(class_name)
        files.extend(found)
        labels.extend([class_index] * len(found))
    if empty:
        # torchvision refuses these too: dropping them would renumber every later class.
        raise DataError(
            f"class folder(s) {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''} in {root} "
            f"hold no images ({', '.join(IMAGE_EXTENSIONS)}): remove them or add their images"
        )
    return ImageFilesDataset(
        files,
        labels,
        image_size=image_size,
        channels=channels,
        resize=resize,
        num_classes=len(classes),
        classes=classes,
        name=str(root),
    )


#: A label as written in a labels file: optional sign, ASCII digits. (``int()`` alone would also
#: take "1_000", " 7 " and non-ASCII digits such as "\u0663".)
_LABEL_TEXT = re.compile(r"[+-]?[0-9]+")


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_labels_file(
    path: Path, names: Sequence[str], num_classes: int | None = None
) -> dict[str, int]:
    """``labels.csv`` rows ``file,label`` (a first row that is not ``file,<int>`` is a header) or
    ``labels.txt`` lines ``file label``; blank lines and ``#`` comments are skipped. The file must
    be UTF-8 text (a leading byte-order mark, as spreadsheet programs write, is fine); each label
    -1 (unknown) or a class index below ``num_classes`` (the engine's; 0-:data:`MAX_LABEL` where
    None); each file listed once."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror or exc}): make it readable") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text (byte {exc.start} is 0x{raw[exc.start]:02x}): save it as UTF-8"
        ) from None
    if "\x00" in text:
        raise DataError(f"{path} is not a text file (it holds NUL bytes): write it as UTF-8 text")
    numbered: list[tuple[int, list[str]]] = []  # (line number in the file, cells)
    if path.suffix == ".csv":
        try:
            reader = csv.reader(io.StringIO(text, newline=""))
            numbered = [(reader.line_num, row) for row in reader]
        except csv.Error as exc:
            raise DataError(
                f"{path} is not a valid CSV file ({_one_line(str(exc))}): write it as file,label rows"
            ) from None
    else:
        numbered = [(n + 1, line.split()) for n, line in enumerate(text.splitlines())]
    numbered = [
        (n, [c.strip() for c in row])
        for n, row in numbered
        if row and any(c.strip() for c in row) and not row[0].strip().startswith("#")
    ]
    labels: dict[str, int] = {}
    listed_on: dict[str, int] = {}
    known = set(names)
    low, high, words = _label_range(num_classes, allow_unknown=True)
    if num_classes is not None:
        words += f" (the engine has {num_classes} classes)"
    for position, (line_no, row) in enumerate(numbered):
        if len(row) != 2:
            raise DataError(
                f"{path}: line {line_no} is {_show(row, 80)}, expected a file name and a label"
            )
        name, label = row
        if not _LABEL_TEXT.fullmatch(label):
            if position == 0 and not _looks_numeric(label):
                continue  # header, e.g. "file,label"
            raise DataError(
                f"{path}: line {line_no}: label {_show(label)} of {_show(name)} is not an integer: "
                f"labels are {words}"
            )
        # A label of more than 12 digits is out of range anyway; int() of thousands of digits is
        # slow, and refused past Python's digit limit.
        value = int(label) if len(label.lstrip("+-")) <= 12 else None
        if value is None or not low <= value <= high:
            raise DataError(
                f"{path}: line {line_no}: label {_show(label)} of {_show(name)} is out of range: "
                f"labels are {words}"
            )
        if name not in known:
            raise DataError(
                f"{path} names {_show(name, 80)}, which is not a file in {path.parent}: fix the name"
            )
        if name in listed_on:
            raise DataError(
                f"{path} lists {_show(name, 80)} twice (lines {listed_on[name]} and {line_no}): "
                "keep one line per file"
            )
        labels[name] = value
        listed_on[name] = line_no
    return labels


def plain_image_folder(
    path: PathLike,
    image_size: int,
    channels: int = 3,
    resize: bool = True,
    num_classes: int | None = None,
) -> ImageFilesDataset:
    """The image files directly in folder ``path`` (sorted by name), or the single image file
    ``path``. Labels are -1 unless ``labels.csv`` or ``labels.txt`` beside the images gives them
    (``file,label`` / ``file label`` per line; unlisted files get -1; each below ``num_classes``,
    the engine's number of classes, where given). With ``resize``, images not at ``image_size``
    get the same resize + centre crop as :func:`image_folder`; without it they are refused. Every
    name with an image extension that is not a folder must be a regular file
    (:func:`_require_regular`): skipping it would renumber the images after it."""
    path = _require(Path(path))
    if _is_file(path):
        files, folder = [path], path.parent
    else:
        folder = path
        names = sorted(p for p in _list_dir(folder) if _is_image_file(p.name) and not _is_dir(p))
        files = [_require_regular(p) for p in names]
        if not files:
            raise DataError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    labels_by_name: dict[str, int] = {}
    for candidate in ("labels.csv", "labels.txt"):
        if _is_file(folder / candidate):
            labels_by_name = _read_labels_file(
                folder / candidate, [p.name for p in _list_dir(folder)], num_classes
            )
            break
    labels = [labels_by_name.get(p.name, -1) for p in files]
    return ImageFilesDataset(
        files, labels, image_size=image_size, channels=channels, resize=resize, name=str(path)
    )


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


def digits_test_split(
    image_size: int | None = None, channels: int = 1, num_classes: int = DIGITS_CLASSES
) -> ArrayDataset:
    """The held-out split of scikit-learn's digits shipped with the package
    (``densepure_rt/assets/digits_test.npz``: ``images`` float32 ``[N x 1 x H x W]`` in [0, 1],
    ``labels`` ``[N]`` in 0-9). ``image_size`` defaults to the stored size; ``num_classes`` is the
    engine's number of classes (labels must lie below it)."""
    path = DIGITS_TEST_ASSET
    if not path.is_file():
        raise DataError(
            f"the digits test split {path} is missing: reinstall densepure-rt, or rebuild the "
            "digits assets with the project's digits training script"
        )
    if image_size is None:
        with np.load(path, allow_pickle=False) as archive:
            image_size = int(archive["images"].shape[-1])
    dataset = npz_dataset(path, image_size, channels, num_classes=num_classes)
    dataset.name = "digits-test"
    return dataset


# ----------------------------------------------------------------------------------------------
# Dispatch.


def _has_images_below(folder: Path, root: Path) -> bool:
    for _, _, names in _walk(folder, root):
        if any(_is_image_file(n) for n in names):
            return True
    return False


def open_dataset(
    spec: PathLike,
    image_size: int,
    channels: int = 3,
    resize: bool = True,
    num_classes: int | None = None,
) -> Dataset:
    """Open the images at ``spec`` for an engine taking ``[channels x image_size x image_size]``
    and giving ``num_classes`` classes (where known: every reader then refuses labels the engine
    cannot give, see the module docstring).

    - a file named ``test_batch`` / ``data_batch_N``, or a folder holding ``test_batch``: CIFAR-10;
    - a ``.npz`` file: :func:`npz_dataset`;
    - an image file, or a folder with image files directly in it: :func:`plain_image_folder`;
    - a folder of class sub-folders of images: :func:`image_folder` (ImageNet-style).

    ``resize`` applies to image files only (arrays are never resized)."""
    _check_geometry(image_size, channels)
    if num_classes is not None and num_classes < 1:
        raise ConfigError(f"the number of classes must be positive, got {num_classes}")
    try:
        path = Path(spec).expanduser()
    except RuntimeError:  # "~user" for a user that does not exist
        raise DataError(f"cannot expand {spec}: no such user; pass the full path with --data") from None
    path = _require(path)
    if _is_file(path):
        if path.name == "test_batch" or path.name.startswith("data_batch_"):
            return cifar10_batch(path, image_size, channels, num_classes)
        if path.suffix.lower() == ".npz":
            return npz_dataset(path, image_size, channels, num_classes)
        if _is_image_file(path.name):
            return plain_image_folder(path, image_size, channels, resize, num_classes)
        hint = " (extract it first)" if path.name.endswith((".tar.gz", ".tgz", ".tar", ".zip")) else ""
        raise DataError(
            f"cannot tell what {path} holds{hint}: --data takes a CIFAR-10 test_batch, a .npz, "
            "an image, or a folder of images"
        )
    if not _is_dir(path):
        try:
            kind = _file_kind(os.stat(path).st_mode)
        except OSError as exc:
            kind = f"a path that cannot be examined ({exc.strerror or exc})"
        raise DataError(f"--data {path} is {kind}: pass a regular file or a folder")
    if _is_file(path / "test_batch"):
        return cifar10_batch(path, image_size, channels, num_classes)
    entries = _list_dir(path)
    real_root = os.path.realpath(path)
    for entry in sorted(entries):
        _check_folder_link(str(entry), real_root)  # before walking anything beneath it
    loose = [p for p in entries if _is_image_file(p.name) and not _is_dir(p)]
    folders = sorted(p for p in entries if _is_dir(p))
    if not loose and num_classes is not None and len(folders) > num_classes:
        # More class folders than the engine has classes: refused before walking any of them.
        return image_folder(path, image_size, channels, resize, num_classes)
    class_dirs = [p for p in folders if _has_images_below(p, path)]
    if loose and class_dirs:
        raise DataError(
            f"{path} holds both image files and class folders ({class_dirs[0].name}, ...): "
            "move the loose images into a class folder, or point --data at one kind"
        )
    if loose:
        return plain_image_folder(path, image_size, channels, resize, num_classes)
    if class_dirs:
        return image_folder(path, image_size, channels, resize, num_classes)
    raise DataError(
        f"{path} holds no images, class folders, .npz or CIFAR-10 test_batch: point --data at "
        "your data"
    )


# ----------------------------------------------------------------------------------------------
# The data identity of results files written before densepure-rt recorded the content digest.


def legacy_data_sha256(path: PathLike) -> str:
    """The ``data_sha256`` that results files written before the content digest
    (:meth:`Dataset.validate`) carry, for continuing them: the hex sha256 of the file's bytes
    where ``path`` is a file; for a folder, the sha256 of its listing, one line
    ``<name relative to path, '/'-separated>\\0<size in bytes, or -1 if it cannot be examined>\\n``
    per file beneath it (``os.walk`` following every symbolic link, folders and files in sorted
    name order). Unchanged from the old ``cli._data_sha256``, except that a file name that is not
    UTF-8 is hashed as its raw bytes where the old code raised ``UnicodeEncodeError`` (so no old
    results file can carry such a value). It does not read the images, and changes with any file
    added, removed or resized beside them: use it only to recognise an old results file, never to
    identify new data. It walks whatever the links point to: open the data first (the readers
    refuse links to folders outside the data folder). ``~`` is expanded, as ``--data`` was.
    Runs on the shipped digits split (no ``--data``) carry ``legacy_data_sha256(DIGITS_TEST_ASSET)``
    (the asset's file sha256)."""
    path = Path(path).expanduser()
    if path.is_file():
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        return digest.hexdigest()
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            file = Path(root, name)
            try:
                size = file.stat().st_size
            except OSError:
                size = -1
            digest.update(f"{file.relative_to(path).as_posix()}\0{size}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()
