"""Readers for the images to certify (numpy + Pillow only; never imports torch).

Every reader yields :class:`Sample` objects whose image is float32 in [0, 1], laid out
``[channels x H x W]``, with an integer label (-1 where the label is unknown). Readers are lazy:
opening a dataset lists it, ``dataset[i]`` decodes and checks image ``i``, and
``dataset.validate(indices)`` checks the chosen images up front, so bad input stops a run before
anything is written.

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
- ``.npz`` arrays: key ``images`` and optional ``labels`` (layouts in :class:`NpzDataset`).
- The shipped digits test split: :func:`digits_test_split`.
"""

from __future__ import annotations

import abc
import csv
import os
import pickle
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
]

PathLike = Union[str, "os.PathLike[str]"]

#: File extensions read as images, compared case-insensitively. The same list as torchvision's
#: ``IMG_EXTENSIONS``, so that an ``ImageFolder`` and this reader number the same files alike.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

#: How far outside [0, 1] a pixel may lie before it is refused (float round-off, not data).
RANGE_TOLERANCE = 1e-5

#: The digits test split shipped with the package (produced by the digits training script).
DIGITS_TEST_ASSET = Path(__file__).resolve().parent / "assets" / "digits_test.npz"

CIFAR10_CLASSES = 10


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


def _load_image_file(path: Path, size: int, channels: int, resize: bool) -> np.ndarray:
    """Decode one file to uint8 ``[channels x H x W]``: ``convert("RGB")`` first (torchvision's
    loader), then luma for 1-channel engines, then the optional resize + centre crop."""
    with open(path, "rb") as f:
        image = Image.open(f)
        image = image.convert("RGB")
    if channels == 1:
        image = image.convert("L")
    if resize:
        image = resize_center_crop(image, size)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _require(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"data path {path} does not exist: pass an existing file or folder with --data")
    return path


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


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

    def validate(self, indices: Sequence[int] | None = None) -> None:
        """Check the images at ``indices`` (all where None) and raise :class:`DataError` at the
        first bad one. Run this before writing any result."""
        for i in range(len(self)) if indices is None else indices:
            self[i]

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

    def validate(self, indices: Sequence[int] | None = None) -> None:
        chosen = range(len(self)) if indices is None else list(indices)
        if len(chosen) == 0:
            return
        if self.images.shape[2:] != self.image_shape[1:]:
            self[chosen[0]]  # raises the shape message for the first chosen image
        if self.images.dtype == np.uint8:
            return  # right shape, and 8-bit pixels are always finite and in range
        # Float arrays: check in blocks without converting the whole selection at once.
        chosen = np.asarray(chosen, dtype=np.int64)
        for start in range(0, len(chosen), 1024):
            block = chosen[start : start + 1024]
            values = self.images[block]
            bad = ~np.isfinite(values) | (values < -RANGE_TOLERANCE) | (values > 1 + RANGE_TOLERANCE)
            flagged = np.flatnonzero(bad.reshape(len(block), -1).any(axis=1))
            if flagged.size:
                self[int(block[flagged[0]])]  # raises the message for that image


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
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(
                f"cannot read image {index} ({path}): {exc}: replace or remove the file"
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
            batch = _ArraysOnlyUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise DataError(
            f"{path} is not a plain CIFAR-10 batch ({exc}): use the python version of CIFAR-10 "
            "(cifar-10-python.tar.gz, extracted)"
        ) from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise DataError(
            f"cannot read {path} as a CIFAR-10 batch ({type(exc).__name__}: {exc}): "
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
    if labels is None or len(labels) != data.shape[0]:
        raise DataError(f"{path} does not hold one label per image under b'labels': re-extract the file")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{path} holds labels that are not integers: re-extract the file") from None
    return data.reshape(-1, 3, 32, 32), labels


def cifar10_batch(path: PathLike, image_size: int = 32, channels: int = 3) -> ArrayDataset:
    """The CIFAR-10 batch at ``path`` (a batch file, or a folder holding ``test_batch``) as a
    dataset of ``[channels x 32 x 32]`` images with labels 0-9."""
    path = _require(Path(path))
    if path.is_dir():
        path = path / "test_batch"
    images, labels = read_cifar_batch(path)
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


def _walk_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` in torchvision's ``make_dataset`` order: ``os.walk`` entries
    sorted by folder path, files sorted by name within each."""
    found = []
    for root, _, names in sorted(os.walk(folder, followlinks=True)):
        found.extend(Path(root, name) for name in sorted(names) if _is_image_file(name))
    return found


def image_folder(
    root: PathLike, image_size: int = 256, channels: int = 3, resize: bool = True
) -> ImageFilesDataset:
    """An ImageNet-style folder (``root/<class>/<image>``), numbered as torchvision's
    ``ImageFolder``: classes are the sub-folders in sorted name order (class index = position),
    images are taken class by class in sorted path order (nested folders included). Each image is
    preprocessed as the published ImageNet evaluation: RGB, ``Resize(image_size, bicubic)``,
    ``CenterCrop(image_size)``, /255."""
    root = _require(Path(root))
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise DataError(f"{root} has no class sub-folders: put each class's images in its own folder")
    files: list[Path] = []
    labels: list[int] = []
    empty = []
    for class_index, class_name in enumerate(classes):
        found = _walk_images(root / class_name)
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


def _read_labels_file(path: Path, names: Sequence[str]) -> dict[str, int]:
    """``labels.csv`` rows ``file,label`` (a first row that is not ``file,<int>`` is a header) or
    ``labels.txt`` lines ``file label``; blank lines and ``#`` comments are skipped."""
    rows: list[list[str]] = []
    with open(path, newline="") as f:
        if path.suffix == ".csv":
            rows = [row for row in csv.reader(f)]
        else:
            rows = [line.split() for line in f]
    rows = [[c.strip() for c in row] for row in rows if row and not row[0].strip().startswith("#")]
    rows = [row for row in rows if any(row)]
    labels: dict[str, int] = {}
    known = set(names)
    for line_no, row in enumerate(rows):
        if len(row) != 2:
            raise DataError(f"{path}: line {line_no + 1} is {row!r}, expected a file name and a label")
        name, label = row
        try:
            labels[name] = int(label)
        except ValueError:
            if line_no == 0:
                continue  # header
            raise DataError(f"{path}: label {label!r} of {name} is not an integer") from None
        if name not in known:
            raise DataError(f"{path} names {name}, which is not a file in {path.parent}: fix the name")
    return labels


def plain_image_folder(
    path: PathLike, image_size: int, channels: int = 3, resize: bool = True
) -> ImageFilesDataset:
    """The image files directly in folder ``path`` (sorted by name), or the single image file
    ``path``. Labels are -1 unless ``labels.csv`` or ``labels.txt`` beside the images gives them
    (``file,label`` / ``file label`` per line; unlisted files get -1). With ``resize``, images not
    at ``image_size`` get the same resize + centre crop as :func:`image_folder`; without it they
    are refused."""
    path = _require(Path(path))
    if path.is_file():
        files, folder = [path], path.parent
    else:
        folder = path
        files = sorted(p for p in folder.iterdir() if p.is_file() and _is_image_file(p.name))
        if not files:
            raise DataError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    labels_by_name: dict[str, int] = {}
    for candidate in ("labels.csv", "labels.txt"):
        if (folder / candidate).is_file():
            labels_by_name = _read_labels_file(folder / candidate, [p.name for p in folder.iterdir()])
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


def npz_dataset(
    path: PathLike, image_size: int, channels: int = 3, num_classes: int | None = None
) -> ArrayDataset:
    """Images from a ``.npz`` file (loaded without pickle): key ``images``, uint8 (0-255) or float
    (already in [0, 1]) in a layout of :func:`_canonical_layout`; optional key ``labels`` (``[N]``
    integers) and scalar ``num_classes``. Images are not resized: they must already be
    ``image_size`` square."""
    path = _require(Path(path))
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive.files:
                raise DataError(
                    f"{path} has no 'images' array (it has {', '.join(archive.files) or 'nothing'}): "
                    "save the images under the key 'images'"
                )
            images = archive["images"]
            labels = archive["labels"] if "labels" in archive.files else None
            if num_classes is None and "num_classes" in archive.files:
                num_classes = int(archive["num_classes"])
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read {path} as .npz ({exc}): save it with numpy.savez") from None
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise DataError(
            f"{path}: 'images' has dtype {images.dtype}; use uint8 (0-255) or float in [0, 1]"
        )
    if labels is not None:
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{path}: 'labels' has dtype {labels.dtype}; use integers")
        labels = labels.reshape(-1).astype(np.int64)
    return ArrayDataset(
        _canonical_layout(images, path),
        labels,
        image_size=image_size,
        channels=channels,
        num_classes=num_classes,
        name=str(path),
    )


def digits_test_split(image_size: int | None = None, channels: int = 1) -> ArrayDataset:
    """The held-out split of scikit-learn's digits shipped with the package
    (``densepure_rt/assets/digits_test.npz``: ``images`` float32 ``[N x 1 x H x W]`` in [0, 1],
    ``labels`` ``[N]`` in 0-9). ``image_size`` defaults to the stored size."""
    path = DIGITS_TEST_ASSET
    if not path.is_file():
        raise DataError(
            f"the digits test split {path} is missing: reinstall densepure-rt, or rebuild the "
            "digits assets with the project's digits training script"
        )
    if image_size is None:
        with np.load(path, allow_pickle=False) as archive:
            image_size = int(archive["images"].shape[-1])
    dataset = npz_dataset(path, image_size, channels, num_classes=10)
    dataset.name = "digits-test"
    return dataset


# ----------------------------------------------------------------------------------------------
# Dispatch.


def _has_images_below(folder: Path) -> bool:
    for _, _, names in os.walk(folder, followlinks=True):
        if any(_is_image_file(n) for n in names):
            return True
    return False


def open_dataset(
    spec: PathLike, image_size: int, channels: int = 3, resize: bool = True
) -> Dataset:
    """Open the images at ``spec`` for an engine taking ``[channels x image_size x image_size]``.

    - a file named ``test_batch`` / ``data_batch_N``, or a folder holding ``test_batch``: CIFAR-10;
    - a ``.npz`` file: :func:`npz_dataset`;
    - an image file, or a folder with image files directly in it: :func:`plain_image_folder`;
    - a folder of class sub-folders of images: :func:`image_folder` (ImageNet-style).

    ``resize`` applies to image files only (arrays are never resized)."""
    _check_geometry(image_size, channels)
    path = _require(Path(spec).expanduser())
    if path.is_file():
        if path.name == "test_batch" or path.name.startswith("data_batch_"):
            return cifar10_batch(path, image_size, channels)
        if path.suffix.lower() == ".npz":
            return npz_dataset(path, image_size, channels)
        if _is_image_file(path.name):
            return plain_image_folder(path, image_size, channels, resize)
        hint = " (extract it first)" if path.name.endswith((".tar.gz", ".tgz", ".tar", ".zip")) else ""
        raise DataError(
            f"cannot tell what {path} holds{hint}: --data takes a CIFAR-10 test_batch, a .npz, "
            "an image, or a folder of images"
        )
    if (path / "test_batch").is_file():
        return cifar10_batch(path, image_size, channels)
    loose = [p for p in path.iterdir() if p.is_file() and _is_image_file(p.name)]
    class_dirs = [p for p in path.iterdir() if p.is_dir() and _has_images_below(p)]
    if loose and class_dirs:
        raise DataError(
            f"{path} holds both image files and class folders ({class_dirs[0].name}, ...): "
            "move the loose images into a class folder, or point --data at one kind"
        )
    if loose:
        return plain_image_folder(path, image_size, channels, resize)
    if class_dirs:
        return image_folder(path, image_size, channels, resize)
    raise DataError(
        f"{path} holds no images, class folders, .npz or CIFAR-10 test_batch: point --data at "
        "your data"
    )
