"""What every reader shares: the shared constants, :class:`Sample`, :func:`check_image`,
:func:`select`, the pixel conversions, label checks and message helpers, the data digest, and
the :class:`Dataset` base with the in-memory :class:`ArrayDataset`."""

from __future__ import annotations

import abc
import hashlib
import os  # named in the PathLike annotation string
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from densepure_rt.errors import ConfigError, DataError


PathLike = Union[str, "os.PathLike[str]"]

#: File extensions read as images, compared case-insensitively. The same list as torchvision's
#: ``IMG_EXTENSIONS``, so that an ``ImageFolder`` and this reader number the same files alike.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

#: How far outside [0, 1] a pixel may lie before it is refused (float round-off, not data).
RANGE_TOLERANCE = 1e-5

#: The largest label accepted where the number of classes is unknown (int32's maximum). Real label
#: sets are far smaller; a bigger value is a corrupt or misread file, and would not fit the int32
#: label tensors of the usual frameworks.
MAX_LABEL = 2**31 - 1


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
    """Images as ``[N x C x H x W]`` (C in {1, 3}; uint8, or float in [0, 1]), converted per item
    to float32 with ``channels`` channels. ``labels`` is ``[N]`` int or None. ``images`` is an
    array (in memory, or memory-mapped: only the images read are touched) or an array-like with
    ``shape``, ``dtype``, ``ndim`` and indexing by an index or a 1-D index array, optionally with
    ``prefetch(indices)``, which :meth:`validate` calls first with the selection (a compressed
    ``.npz`` member: :class:`densepure_rt.files.data.npz._DeflatedRows`)."""

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
        prefetch = getattr(self.images, "prefetch", None)
        if prefetch is not None and chosen:  # a stream (a compressed .npz member): one pass for the selection
            prefetch(chosen)
        if chosen and tuple(self.images.shape[2:]) != tuple(self.image_shape[1:]):
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
