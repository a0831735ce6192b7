"""Decoding one image file: torchvision's resize + centre crop, 16-bit / 32-bit integer / float
images kept in float (:data:`HIGH_DEPTH_MODES`), the decompression-bomb guard, and the
exceptions a corrupt file can raise while decoding."""

from __future__ import annotations

import io
import os
import stat
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from densepure_rt.errors import DataError

from .common import RANGE_TOLERANCE


#: Pillow modes with one band deeper than 8 bits: 16-bit grayscale ("I;16*", and "I", which Pillow
#: < 10 gives for 16-bit PNGs and TIFFs hold as 32-bit integers) and 32-bit float ("F").
#: ``convert("RGB")`` clips these to 0-255 (16-bit loads all white, float in [0, 1] all black), so
#: they are read as floats instead (:func:`_high_depth_plane`).
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


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
