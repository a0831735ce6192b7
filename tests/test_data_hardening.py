"""An ``.npz`` is read image by image (memory-mapped, or streamed when compressed), never whole, and
gives the same pixels and data identity as ``numpy.load``. Files are written in tmp_path."""

from __future__ import annotations

import hashlib
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest

from densepure_rt.errors import DataError
from densepure_rt.files.data import open_dataset

# --------------------------------------------------------------------------- .npz read image by image


def _digest(indices, labels, images):
    """Dataset.validate's documented identity, computed here from numpy.load's arrays."""
    digest = hashlib.sha256()
    for i in indices:
        image = images[i]
        digest.update(struct.pack("<qq", i, int(labels[i])) + struct.pack("<3q", *image.shape))
        digest.update(np.ascontiguousarray(image, dtype="<f4").tobytes())
    return digest.hexdigest()


LAYOUTS = {
    "nchw uint8": lambda rng: rng.integers(0, 256, (23, 3, 8, 8), dtype=np.uint8),
    "nhwc uint8": lambda rng: rng.integers(0, 256, (23, 8, 8, 3), dtype=np.uint8),
    "nhw uint8": lambda rng: rng.integers(0, 256, (23, 8, 8), dtype=np.uint8),
    "nchw float32": lambda rng: rng.random((23, 3, 8, 8), dtype=np.float32),
    "nchw float64 big-endian": lambda rng: rng.random((23, 3, 8, 8)).astype(">f8"),
    "nchw uint8 fortran order": lambda rng: np.asfortranarray(rng.integers(0, 256, (23, 3, 8, 8), dtype=np.uint8)),
}


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["savez", "savez_compressed"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_npz_selected_images_equal_numpy_load(tmp_path, save, layout):
    rng = np.random.default_rng(5)
    images, labels = LAYOUTS[layout](rng), rng.integers(0, 10, 23)
    path = tmp_path / "d.npz"
    save(path, images=images, labels=labels)
    with np.load(path) as archive:  # the reference: the whole archive, as numpy reads it
        whole, stored_labels = archive["images"], archive["labels"]
    if whole.ndim == 3:
        whole = whole[:, None]
    elif whole.shape[-1] == 3:
        whole = whole.transpose(0, 3, 1, 2)
    expected = whole.astype(np.float32) / np.float32(255) if whole.dtype == np.uint8 else whole.astype(np.float32)
    channels = expected.shape[1]
    ds = open_dataset(path, image_size=8, channels=channels)
    chosen = [21, 3, 17, 0, 3 + 5]  # out of order: a stream must go back
    assert ds.validate(chosen) == _digest(chosen, stored_labels, expected)
    for i in chosen + [22, 1]:
        sample = ds[i]
        assert np.array_equal(sample.image, expected[i]) and sample.label == stored_labels[i]


def test_npz_unselected_bad_images_are_not_read_but_selected_ones_are_refused(tmp_path):
    images = np.random.default_rng(1).random((6, 3, 4, 4), dtype=np.float32)
    images[4, 0, 0, 0] = np.nan
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / "d.npz", images=images)
        ds = open_dataset(tmp_path / "d.npz", image_size=4)
        ds.validate([0, 2, 5])
        with pytest.raises(DataError, match="image 4 contains NaN"):
            ds.validate([0, 4])


def test_npz_member_data_shorter_than_its_header_says_is_refused(tmp_path):
    path = tmp_path / "short.npz"
    np.savez(path, images=np.zeros((4, 3, 4, 4), np.uint8))
    with zipfile.ZipFile(path) as archive:
        data = archive.read("images.npy")
    with zipfile.ZipFile(tmp_path / "cut.npz", "w") as archive:
        archive.writestr("images.npy", data[:-10])  # CRC of the cut bytes: only the size is wrong
    with pytest.raises(DataError, match=r"cannot read .*cut\.npz as \.npz \('images' holds 182 bytes of array data"):
        open_dataset(tmp_path / "cut.npz", image_size=4)


def _peak_traced(path, selected) -> int:
    tracemalloc.start()
    try:
        ds = open_dataset(path, image_size=64, channels=3)
        ds.validate(selected)
        for i in selected:
            ds[i]
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_npz_reader_never_holds_a_whole_member(tmp_path):
    """~100 MB of uint8 images (8,200 x 3 x 64 x 64): selecting ten allocates a few MB at most,
    where numpy.load allocates the whole member."""
    rng = np.random.default_rng(2)
    blocks = rng.integers(0, 256, (8200, 3, 8, 8), dtype=np.uint8)
    images = np.repeat(np.repeat(blocks, 8, axis=2), 8, axis=3)  # compressible, so savez_compressed is quick
    size = images.nbytes
    assert size > 100_000_000
    selected = list(range(0, 8200, 820))
    np.savez(tmp_path / "stored.npz", images=images)
    np.savez_compressed(tmp_path / "deflated.npz", images=images)
    del images, blocks
    tracemalloc.start()
    try:
        with np.load(tmp_path / "stored.npz") as archive:
            archive["images"][0]
        whole = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert whole >= size  # tracemalloc sees numpy's buffers: the reference holds the member
    for name in ("stored.npz", "deflated.npz"):
        peak = _peak_traced(tmp_path / name, selected)
        assert peak < size / 20, (name, peak, size)
