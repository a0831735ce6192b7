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

Layout of this package (the way down is one-directional: ``common`` <- ``paths`` / ``images`` <-
``cifar`` / ``folders`` / ``npz`` <- this ``__init__``): :mod:`.common` (:class:`Sample`,
:func:`check_image`, :func:`select`, label checks, the digest, :class:`Dataset`,
:class:`ArrayDataset`), :mod:`.paths` (file, link and FIFO safety), :mod:`.images` (decoding one
image file), :mod:`.folders` (image folders and labels files), :mod:`.cifar` (CIFAR-10 batches),
:mod:`.npz` (``.npz`` archives); this file holds the dispatch (:func:`open_dataset`), the shipped
digits split (:func:`digits_test_split`, reading :data:`DIGITS_TEST_ASSET` from this module, so
patching ``densepure_rt.files.data.DIGITS_TEST_ASSET`` redirects it) and
:func:`legacy_data_sha256`, and re-exports every name the single module ``densepure_rt.files.data``
defined.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from densepure_rt.errors import ConfigError, DataError

# Every name the former single module ``densepure_rt.files.data`` defined is imported here (private
# ones included), so that ``from densepure_rt.files.data import X`` works for each of them. Code
# that replaces one of them must patch the submodule that defines it (a function looks names up
# in its own module), except DIGITS_TEST_ASSET, which this module defines and reads.
from .cifar import (
    CIFAR10_CLASSES,
    _SAFE_GLOBALS,
    _MEMO_OPS,
    _ArraysOnlyUnpickler,
    _check_memo_indices,
    _cifar_labels,
    _empty_bytes,
    _get,
    _latin1_encode,
    _reconstruct,
    _scalar,
    cifar10_batch,
    read_cifar_batch,
)
from .common import (
    IMAGE_EXTENSIONS,
    MAX_LABEL,
    RANGE_TOLERANCE,
    ArrayDataset,
    Dataset,
    PathLike,
    Sample,
    _check_geometry,
    _check_labels,
    _hash_sample,
    _label_range,
    _luma_uint8,
    _one_line,
    _shape_str,
    _show,
    _to_channels,
    _to_float,
    check_image,
    select,
)
from .folders import (
    _LABEL_TEXT,
    ImageFilesDataset,
    _looks_numeric,
    _read_labels_file,
    _walk_images,
    image_folder,
    plain_image_folder,
)
from .images import (
    _DECODE_ERRORS,
    HIGH_DEPTH_MODES,
    _high_depth_plane,
    _load_image_file,
    _open_image,
    _resize_center_crop_float,
    resize_center_crop,
)
from .npz import _canonical_layout, _npz_array, _npz_num_classes, npz_dataset
from .paths import (
    _check_folder_link,
    _file_kind,
    _inside,
    _is_dir,
    _is_file,
    _is_image_file,
    _list_dir,
    _require,
    _require_regular,
    _walk,
)

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

#: The digits test split shipped with the package (produced by the digits training script).
DIGITS_TEST_ASSET = Path(__file__).resolve().parents[2] / "assets" / "digits_test.npz"

DIGITS_CLASSES = 10


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
