"""Folders of image files: :class:`ImageFilesDataset` (files decoded on demand), ImageNet-style
class folders (:func:`image_folder`), plain folders or single images (:func:`plain_image_folder`)
and the ``labels.csv`` / ``labels.txt`` files beside them."""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Sequence
from pathlib import Path

import click
import numpy as np
from PIL import Image

from densepure_rt.errors import DataError

from .common import (
    IMAGE_EXTENSIONS,
    Dataset,
    PathLike,
    _check_geometry,
    _label_range,
    _one_line,
    _show,
    _to_float,
)
from .images import _DECODE_ERRORS, _load_image_file
from .paths import (
    _check_folder_link,
    _is_dir,
    _is_file,
    _is_image_file,
    _list_dir,
    _require,
    _require_regular,
    _walk,
)


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
# Folders of image files.


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
    images are taken class by class in sorted path order (nested folders included). Names sort as
    strings, whatever they say: class folders ``0/ 1/ ... 10/`` give folder ``10`` label 2 and
    folder ``2`` label 3. Where every class folder is named by a number and some label differs
    from its folder's number, one warning line goes to stderr (once per folder and process);
    numbers padded to one width (``00/ 01/ ... 10/``) sort as numbers. Each image is
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
    _warn_numbered_classes(root, classes)
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


#: Folders already warned about by :func:`_warn_numbered_classes` in this process.
_WARNED_FOLDERS: set[str] = set()


def _warn_numbered_classes(root: Path, classes: Sequence[str]) -> None:
    """One line on stderr, once per folder and process, where every class folder is named by a
    number (ASCII digits) and some folder's label (its position in sorted name order) is not that
    number: with ``0/ 1/ ... 10/``, folder ``10`` is label 2, since names sort as strings."""
    if not classes or not all(re.fullmatch(r"[0-9]{1,18}", name) for name in classes):
        return
    differs = [(label, name) for label, name in enumerate(classes) if int(name) != label]
    key = os.fsdecode(os.path.realpath(root))
    if not differs or key in _WARNED_FOLDERS:
        return
    _WARNED_FOLDERS.add(key)
    examples = ", ".join(f"folder {name} is label {label}" for label, name in differs[:2])
    width = len(str(len(classes) - 1))
    padded = ", ".join(str(i).zfill(width) for i in range(min(len(classes), 3)))
    click.echo(
        f"warning: the class folders of {_one_line(str(root))} are numbers, but labels are their positions in sorted name "
        f"order, as torchvision's ImageFolder numbers them ({examples}): for labels equal to the folder "
        f"names, name them 0 to {len(classes) - 1}, padded to one width ({padded}, ...)",
        err=True,
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
    ``path``. Labels are -1 unless ``labels.csv`` or ``labels.txt`` (one of them: both is an
    error) beside the images gives them
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
    present = [name for name in ("labels.csv", "labels.txt") if _is_file(folder / name)]
    if len(present) > 1:  # which one holds the labels would be a guess
        raise DataError(f"{folder} holds both labels.csv and labels.txt: keep the one with the labels and remove "
                        "or rename the other")
    if present:
        labels_by_name = _read_labels_file(folder / present[0], [p.name for p in _list_dir(folder)], num_classes)
    labels = [labels_by_name.get(p.name, -1) for p in files]
    return ImageFilesDataset(
        files, labels, image_size=image_size, channels=channels, resize=resize, name=str(path)
    )
