"""Data readers: every format is written here in miniature, then read back value for value."""

import hashlib
import io
import json
import math
import os
import pickle
import re
import struct
import subprocess
import sys
import threading
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from densepure_rt.files import data
from densepure_rt.files.data import Sample, check_image, open_dataset, select
from densepure_rt.errors import ConfigError, DataError


def _rng(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- select()


def test_select_keeps_every_skip_th_index_from_zero():
    assert select(10000, skip=20)[:3] == [0, 20, 40]
    assert len(select(10000, skip=20)) == 500  # published CIFAR-10 run
    assert len(select(50000, skip=500)) == 100  # published ImageNet run
    assert select(5) == [0, 1, 2, 3, 4]


def _cohen_loop(n, skip, max_):
    # The loop of Cohen et al.'s certify.py / DensePure's eval_certified_densepure.py.
    out = []
    for i in range(n):
        if i % skip != 0:
            continue
        if i == max_:
            break
        out.append(i)
    return out


@pytest.mark.parametrize("n,skip,max_", [(100, 1, -1), (100, 1, 10), (100, 20, 40), (100, 20, 0),
                                         (100, 7, -1), (30, 5, 500), (100, 3, 99)])
def test_select_matches_the_published_loop_where_max_is_honoured(n, skip, max_):
    assert select(n, skip, max_) == _cohen_loop(n, skip, max_)


def test_select_max_bounds_the_index_not_the_count():
    assert select(100, skip=20, max_images=60) == [0, 20, 40]
    # The published loop ignores a max that is not a multiple of skip; here it still bounds.
    assert select(100, skip=20, max_images=30) == [0, 20]


def test_select_explicit_ids_keep_their_order():
    assert select(10, ids=[7, 2, 9]) == [7, 2, 9]


@pytest.mark.parametrize("kwargs", [dict(skip=0), dict(ids=[10]), dict(ids=[-1]), dict(ids=[1, 1]),
                                    dict(ids=[1], skip=2), dict(ids=[1], max_images=5)])
def test_select_refuses_impossible_requests(kwargs):
    with pytest.raises(ConfigError):
        select(10, **kwargs)


# ----------------------------------------------------------------------------- check_image()


def test_check_image_names_the_image_and_both_shapes():
    with pytest.raises(DataError, match=r"image 3 has shape 3x28x28 but the engine expects 3x32x32: resize"):
        check_image(np.zeros((3, 28, 28), np.float32), (3, 32, 32), 3)


def test_check_image_refuses_nan_and_out_of_range_but_tolerates_round_off():
    good = np.full((1, 2, 2), 0.5, np.float32)
    check_image(good, (1, 2, 2), 0)
    check_image(good * 0 + 1.000001, (1, 2, 2), 0)
    with pytest.raises(DataError, match="NaN"):
        check_image(np.where(np.eye(2, dtype=bool)[None], np.nan, good), (1, 2, 2), 0)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        check_image(good * 255, (1, 2, 2), 0)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        check_image(good - 0.6, (1, 2, 2), 0)


# ----------------------------------------------------------------------------- CIFAR-10


def _write_cifar(path, n=5, seed=0):
    rng = _rng(seed)
    images = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    batch = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": labels,
        b"data": images,
        b"filenames": [b"img_%d.png" % i for i in range(n)],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return images, labels


def test_cifar_batch_round_trips_pixels_and_labels(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images, labels = _write_cifar(folder / "test_batch")
    for spec in (folder, folder / "test_batch"):
        ds = open_dataset(spec, image_size=32)
        assert len(ds) == 5 and ds.num_classes == 10 and ds.image_shape == (3, 32, 32)
        sample = ds[2]
        assert sample.index == 2 and sample.label == labels[2]
        assert sample.image.dtype == np.float32
        # b'data' rows are 1024 red, 1024 green, 1024 blue values, each row-major 32x32.
        expected = images[2].reshape(3, 32, 32).astype(np.float32) / 255
        np.testing.assert_array_equal(sample.image, expected)
        assert sample.image[1, 0, 5] == np.float32(images[2][1024 + 5]) / 255
        assert [s.label for s in ds] == labels


def test_cifar_batch_to_one_channel_uses_pillow_luma(tmp_path):
    images, _ = _write_cifar(tmp_path / "test_batch")
    ds = open_dataset(tmp_path / "test_batch", image_size=32, channels=1)
    rgb = images[0].reshape(3, 32, 32).transpose(1, 2, 0)
    luma = np.asarray(Image.fromarray(rgb, "RGB").convert("L"), np.float32) / 255
    np.testing.assert_array_equal(ds[0].image, luma[None])


class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 byte strings, as the official (Python 2) file holds them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_string(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_string
    dispatch[str] = _save_py2_string


def test_cifar_batch_written_by_python2_and_numpy1_is_read(tmp_path):
    images = _rng(7).integers(0, 256, size=(3, 3072), dtype=np.uint8)
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump({b"data": images, b"labels": [9, 0, 4], b"batch_label": b"x"})
    # numpy 1 names its array rebuilder under numpy.core, numpy 2 under numpy._core.
    raw = buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in raw and b"_codecs" not in raw
    (tmp_path / "test_batch").write_bytes(raw)
    pixels, labels = data.read_cifar_batch(tmp_path / "test_batch")
    np.testing.assert_array_equal(pixels, images.reshape(3, 3, 32, 32))
    assert labels.tolist() == [9, 0, 4]


def test_cifar_reader_allows_only_the_latin1_codec(tmp_path):
    import codecs

    class _Rot13:
        def __reduce__(self):
            return (codecs.encode, ("abc", "rot13"))

    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": _Rot13(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(DataError, match="rot13"):
        open_dataset(tmp_path / "test_batch", image_size=32)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > should_not_exist",))


def test_cifar_reader_refuses_a_pickle_that_calls_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": _Exploit(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(DataError, match="system"):
        open_dataset(tmp_path / "test_batch", image_size=32)
    assert not (tmp_path / "should_not_exist").exists()


def test_cifar_reader_refuses_other_contents(tmp_path):
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(DataError, match="uint8"):
        open_dataset(tmp_path / "test_batch", image_size=32)
    (tmp_path / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError):
        open_dataset(tmp_path / "test_batch", image_size=32)


def test_cifar_images_of_another_size_fail_validation(tmp_path):
    _write_cifar(tmp_path / "test_batch")
    ds = open_dataset(tmp_path / "test_batch", image_size=256)
    with pytest.raises(DataError, match="image 0 has shape 3x32x32 but the engine expects 3x256x256"):
        ds.validate(select(len(ds)))


# ----------------------------------------------------------------------------- ImageNet-style


def _torchvision_reference(path, size):
    import torchvision.transforms as transforms
    pipeline = transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
    ])
    with open(path, "rb") as f:
        return pipeline(Image.open(f).convert("RGB")).numpy()


def _write_image_folder(root):
    rng = _rng(1)
    layout = {  # class -> [(file name, (width, height), mode)]
        "n02": [("b.png", (300, 257), "RGB"), ("A.PNG", (400, 512), "RGB")],
        "n01": [("z.png", (257, 300), "L"), ("x.jpg", (256, 256), "RGB")],
        "n10": [("sub/c.png", (261, 999), "RGBA"), ("a.bmp", (512, 400), "RGB"), ("notes.txt", None, None)],
    }
    for cls, items in layout.items():
        for name, size, mode in items:
            path = root / cls / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if size is None:
                path.write_text("not an image")
                continue
            w, h = size
            pixels = rng.integers(0, 256, size=(h, w, len(mode)), dtype=np.uint8)
            Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode).save(path)


def test_image_folder_numbers_classes_and_files_like_imagefolder(tmp_path):
    _write_image_folder(tmp_path)
    ds = open_dataset(tmp_path, image_size=256)
    names = [p.relative_to(tmp_path).as_posix() for p in ds.files]
    assert names == ["n01/x.jpg", "n01/z.png", "n02/A.PNG", "n02/b.png", "n10/a.bmp", "n10/sub/c.png"]
    assert ds.labels == [0, 0, 1, 1, 2, 2] and ds.num_classes == 3
    import torchvision.datasets as datasets
    reference = datasets.ImageFolder(str(tmp_path))
    assert [s for s, _ in reference.samples] == [str(p) for p in ds.files]
    assert reference.targets == ds.labels


def test_image_folder_matches_torchvision_resize_and_center_crop(tmp_path):
    _write_image_folder(tmp_path)
    ds = open_dataset(tmp_path, image_size=256)
    for i, path in enumerate(ds.files):
        sample = ds[i]
        expected = _torchvision_reference(path, 256)
        assert sample.image.shape == expected.shape == (3, 256, 256)
        np.testing.assert_allclose(sample.image, expected, atol=1 / 255 + 1e-7, rtol=0)
        assert np.abs(sample.image - expected).max() == 0  # same PIL calls: identical in practice


def test_image_folder_size_is_a_parameter(tmp_path):
    _write_image_folder(tmp_path)
    ds = open_dataset(tmp_path, image_size=37)
    np.testing.assert_allclose(ds[3].image, _torchvision_reference(ds.files[3], 37), atol=1 / 255)
    assert ds[3].image.shape == (3, 37, 37)


def test_image_folder_gives_one_channel_for_gray_engines(tmp_path):
    _write_image_folder(tmp_path)
    ds = open_dataset(tmp_path, image_size=64, channels=1)
    rgb = open_dataset(tmp_path, image_size=64, channels=3)[2].image
    assert ds[2].image.shape == (1, 64, 64)
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    np.testing.assert_allclose(ds[2].image[0], luma, atol=2 / 255)


def test_image_folder_refuses_an_empty_class_folder(tmp_path):
    _write_image_folder(tmp_path)
    (tmp_path / "n05").mkdir()
    with pytest.raises(DataError, match="n05"):
        open_dataset(tmp_path, image_size=256)


def test_unreadable_image_names_its_index_and_file(tmp_path):
    _write_image_folder(tmp_path)
    (tmp_path / "n01" / "x.jpg").write_bytes(b"broken")
    ds = open_dataset(tmp_path, image_size=256)
    with pytest.raises(DataError, match=r"cannot read image 0 \(.*x\.jpg\)"):
        ds.validate([0, 1])
    ds.validate([1, 2])


# ----------------------------------------------------------------------------- plain folders


def test_plain_folder_uses_right_sized_images_as_they_are(tmp_path):
    rng = _rng(2)
    pixels = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    for i, name in enumerate(["b.png", "a.png", "c.bmp"]):
        Image.fromarray(pixels[i]).save(tmp_path / name)
    ds = open_dataset(tmp_path, image_size=32)
    assert [p.name for p in ds.files] == ["a.png", "b.png", "c.bmp"]
    assert [s.label for s in ds] == [-1, -1, -1] and ds.num_classes is None
    np.testing.assert_array_equal(ds[0].image, pixels[1].transpose(2, 0, 1) / np.float32(255))


def test_plain_folder_resizes_other_sizes_or_refuses_them(tmp_path):
    Image.fromarray(np.zeros((40, 50, 3), np.uint8) + 200).save(tmp_path / "big.png")
    ds = open_dataset(tmp_path, image_size=32)
    assert ds[0].image.shape == (3, 32, 32)
    np.testing.assert_allclose(ds[0].image, 200 / 255)
    with pytest.raises(DataError, match="shape 3x40x50 but the engine expects 3x32x32"):
        open_dataset(tmp_path, image_size=32, resize=False).validate()


def test_plain_folder_reads_labels_beside_the_images(tmp_path):
    for name in ["a.png", "b.png", "c.png"]:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name)
    (tmp_path / "labels.csv").write_text("file,label\na.png,3\nc.png,7\n")
    ds = open_dataset(tmp_path, image_size=8)
    assert [s.label for s in ds] == [3, -1, 7]
    (tmp_path / "labels.csv").unlink()
    (tmp_path / "labels.txt").write_text("# name label\nb.png 4\n")
    assert [s.label for s in open_dataset(tmp_path, image_size=8)] == [-1, 4, -1]
    (tmp_path / "labels.txt").write_text("d.png 4\n")
    with pytest.raises(DataError, match="d.png"):
        open_dataset(tmp_path, image_size=8)


def test_single_image_file_is_a_dataset_of_one(tmp_path):
    Image.fromarray(np.full((8, 8), 51, np.uint8)).save(tmp_path / "one.png")
    ds = open_dataset(tmp_path / "one.png", image_size=8, channels=3)
    assert len(ds) == 1
    np.testing.assert_allclose(ds[0].image, 0.2)


def test_folder_with_loose_images_and_class_folders_is_ambiguous(tmp_path):
    _write_image_folder(tmp_path)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "stray.png")
    with pytest.raises(DataError, match="both image files and class folders"):
        open_dataset(tmp_path, image_size=8)


# ----------------------------------------------------------------------------- .npz


def test_npz_channels_last_and_channels_first_give_the_same_images(tmp_path):
    rng = _rng(3)
    nchw = rng.integers(0, 256, size=(4, 3, 6, 6), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1])
    np.savez(tmp_path / "first.npz", images=nchw, labels=labels)
    np.savez(tmp_path / "last.npz", images=nchw.transpose(0, 2, 3, 1), labels=labels)
    for name in ("first.npz", "last.npz"):
        ds = open_dataset(tmp_path / name, image_size=6)
        assert [s.label for s in ds] == [3, 1, 4, 1]
        np.testing.assert_array_equal(ds[2].image, nchw[2] / np.float32(255))


def test_npz_float_images_are_taken_as_they_are(tmp_path):
    images = _rng(4).random((3, 1, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "d.npz", images=images)
    ds = open_dataset(tmp_path / "d.npz", image_size=8, channels=1)
    np.testing.assert_array_equal(ds[1].image, images[1])
    assert ds[1].label == -1
    assert open_dataset(tmp_path / "d.npz", image_size=8, channels=3)[1].image.shape == (3, 8, 8)


def test_npz_with_nan_or_out_of_range_values_fails_validation_at_that_image(tmp_path):
    images = np.full((5, 3, 4, 4), 0.5, np.float32)
    images[3, 1, 2, 2] = np.nan
    np.savez(tmp_path / "nan.npz", images=images)
    ds = open_dataset(tmp_path / "nan.npz", image_size=4)
    ds.validate([0, 1, 2, 4])
    with pytest.raises(DataError, match="image 3 contains NaN"):
        ds.validate()
    images[3] = 0.5
    images[4, 0, 0, 0] = 255.0
    np.savez(tmp_path / "range.npz", images=images)
    with pytest.raises(DataError, match=r"image 4 has values in \[0.5, 255\]"):
        open_dataset(tmp_path / "range.npz", image_size=4).validate()


def test_npz_refuses_bad_contents(tmp_path):
    np.savez(tmp_path / "nokey.npz", pictures=np.zeros((1, 3, 4, 4), np.uint8))
    with pytest.raises(DataError, match="'images'"):
        open_dataset(tmp_path / "nokey.npz", image_size=4)
    np.savez(tmp_path / "labels.npz", images=np.zeros((2, 3, 4, 4), np.uint8), labels=np.array([1, 2, 3]))
    with pytest.raises(DataError, match="one label per image"):
        open_dataset(tmp_path / "labels.npz", image_size=4)
    np.savez(tmp_path / "rgba.npz", images=np.zeros((2, 4, 4, 4), np.uint8))
    with pytest.raises(DataError, match="expected"):
        open_dataset(tmp_path / "rgba.npz", image_size=4)


def test_digits_split_reads_the_shipped_asset_or_says_it_is_missing(tmp_path, monkeypatch):
    asset = tmp_path / "digits_test.npz"
    monkeypatch.setattr(data, "DIGITS_TEST_ASSET", asset)
    with pytest.raises(DataError, match="digits test split .* is missing"):
        data.digits_test_split()
    images = _rng(5).random((7, 1, 8, 8), dtype=np.float32)
    np.savez(asset, images=images, labels=np.arange(7))
    ds = data.digits_test_split()
    assert ds.image_shape == (1, 8, 8) and ds.num_classes == 10 and len(ds) == 7
    np.testing.assert_array_equal(ds[6].image, images[6])
    assert ds[6].label == 6


# ----------------------------------------------------------------------------- dispatch, misc


def test_missing_path_names_the_path_and_the_flag(tmp_path):
    with pytest.raises(DataError, match=r"nowhere.* does not exist.*--data"):
        open_dataset(tmp_path / "nowhere", image_size=32)


def test_unknown_file_kind_is_refused(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"x")
    with pytest.raises(DataError, match="extract it first"):
        open_dataset(tmp_path / "cifar-10-python.tar.gz", image_size=32)
    with pytest.raises(DataError, match="holds no images"):
        open_dataset(tmp_path, image_size=32)


def test_samples_are_frozen_and_read_only(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((1, 3, 2, 2), np.uint8))
    sample = open_dataset(tmp_path / "d.npz", image_size=2)[0]
    assert isinstance(sample, Sample)
    with pytest.raises(AttributeError):
        sample.label = 3
    with pytest.raises(ValueError):
        sample.image[0, 0, 0] = 1.0


def test_importing_the_readers_does_not_import_torch():
    code = (
        "import sys, densepure_rt.files.data; "
        "heavy = [m for m in ('torch', 'torchvision') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- hostile and unusual input
# Every reader must turn bad input into a one-line DataError (never a traceback) and convert
# unusual but valid input correctly. Expected pixels are computed here from the raw values written.


def _png_chunk(kind, payload):
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _write_png(path, rows, width, height, bit_depth, color_type, idat_parts=1):
    """A PNG written byte by byte (Pillow cannot write 16-bit colour): ``rows`` are the raw
    scanlines without filter bytes; the compressed data is split over ``idat_parts`` IDAT chunks."""
    raw = b"".join(b"\x00" + row for row in rows)
    data = zlib.compress(raw)
    step = -(-len(data) // idat_parts)
    chunks = [_png_chunk(b"IDAT", data[i : i + step]) for i in range(0, len(data), step)]
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + b"".join(chunks) + _png_chunk(b"IEND", b"")
    )


def test_16_bit_gray_images_keep_their_values(tmp_path):
    # Pillow's convert("RGB") clips 16-bit values to 255: these loaded all white.
    values = _rng(10).integers(0, 65536, size=(12, 12), dtype=np.uint16)
    values[0, :4] = [0, 1, 257, 65535]
    Image.fromarray(values).save(tmp_path / "little.png")  # PNG: mode "I;16"
    Image.fromarray(values.astype(">u2")).save(tmp_path / "big.tif")  # TIFF: mode "I;16B"
    assert Image.open(tmp_path / "little.png").mode == "I;16"
    assert Image.open(tmp_path / "big.tif").mode == "I;16B"
    expected = values.astype(np.float64) / 65535
    for name in ("little.png", "big.tif"):
        gray = open_dataset(tmp_path / name, image_size=12, channels=1)
        assert gray[0].image.dtype == np.float32 and gray[0].image.shape == (1, 12, 12)
        np.testing.assert_allclose(gray[0].image[0], expected, rtol=0, atol=1e-7)
        assert gray[0].image[0, 0, :4].tolist() == pytest.approx([0, 1 / 65535, 257 / 65535, 1], abs=1e-9)
        rgb = open_dataset(tmp_path / name, image_size=12, channels=3)
        for c in range(3):  # 3-channel engines get the gray plane three times
            np.testing.assert_allclose(rgb[0].image[c], expected, rtol=0, atol=1e-7)
        gray.validate()
        rgb.validate()


def test_32_bit_integer_images_are_16_bit_data_or_refused(tmp_path):
    # Pillow < 10 opens 16-bit PNGs as mode "I" (32-bit); TIFFs can hold it directly.
    values = _rng(11).integers(0, 65536, size=(6, 6)).astype(np.int32)
    Image.fromarray(values).save(tmp_path / "ok.tif")
    assert Image.open(tmp_path / "ok.tif").mode == "I"
    ds = open_dataset(tmp_path / "ok.tif", image_size=6, channels=1)
    np.testing.assert_allclose(ds[0].image[0], values / 65535.0, rtol=0, atol=1e-7)
    for bad_value in (70000, -5):
        values[2, 3] = bad_value
        Image.fromarray(values).save(tmp_path / "bad.tif")
        ds = open_dataset(tmp_path / "bad.tif", image_size=6, channels=1)
        message = r"cannot read image 0 .*bad\.tif.*32-bit integer image .*beyond 16 bits"
        with pytest.raises(DataError, match=message):
            ds[0]
        with pytest.raises(DataError, match="beyond 16 bits"):
            ds.validate()


def test_float_tiffs_in_0_1_are_used_as_they_are(tmp_path):
    # convert("RGB") truncated floats in [0, 1] to 0: these loaded all black.
    values = _rng(12).random((10, 10), dtype=np.float32)
    values[0, 0], values[0, 1] = 0.0, 1.0
    image = Image.fromarray(values)
    assert image.mode == "F"
    image.save(tmp_path / "f.tif")
    gray = open_dataset(tmp_path / "f.tif", image_size=10, channels=1)[0].image
    np.testing.assert_array_equal(gray[0], values)
    rgb = open_dataset(tmp_path / "f.tif", image_size=10, channels=3)[0].image
    np.testing.assert_array_equal(rgb, np.stack([values] * 3))


@pytest.mark.parametrize("bad", [1.5, -0.25, np.nan, np.inf])
def test_float_tiffs_outside_0_1_are_refused(tmp_path, bad):
    values = np.full((8, 8), 0.5, np.float32)
    values[3, 4] = bad
    Image.fromarray(values).save(tmp_path / "f.tif")
    ds = open_dataset(tmp_path / "f.tif", image_size=8)
    message = r"cannot read image 0 .*f\.tif.*float image must hold values in \[0, 1\]"
    for check in (lambda: ds[0], ds.validate):
        with pytest.raises(DataError, match=message) as info:
            check()
        assert "\n" not in str(info.value)


def test_high_depth_images_stay_in_float_through_resize_and_crop(tmp_path):
    # 50 wide x 40 high to 32: the short side 40 -> 32, the long side int(32 * 50 / 40) = 40, then
    # the centre crop keeps columns 4..35 (round((40 - 32) / 2) = 4) of the resized image.
    const = np.full((40, 50), 40000, np.uint16)
    Image.fromarray(const).save(tmp_path / "const.png")
    got = open_dataset(tmp_path / "const.png", image_size=32, channels=1)[0].image
    assert got.shape == (1, 32, 32)
    # Through 8 bits this would be 156 / 255 = 0.61176..., off by 1.4e-3.
    np.testing.assert_allclose(got, 40000 / 65535, rtol=0, atol=1e-6)

    ramp = (np.linspace(0, 65535, 50)[None, :] * np.linspace(0.2, 1, 40)[:, None]).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    as_float = ramp.astype(np.float32) / np.float32(65535)
    resized = np.asarray(Image.fromarray(as_float).resize((40, 32), Image.BICUBIC))
    expected = np.clip(resized[:, 4:36], 0, 1)
    for channels in (1, 3):
        got = open_dataset(tmp_path / "ramp.png", image_size=32, channels=channels)[0].image
        assert got.shape == (channels, 32, 32) and got.dtype == np.float32
        for c in range(channels):
            np.testing.assert_allclose(got[c], expected, rtol=0, atol=1e-6)
    # Not quantised to 8 bits: most values lie well off the 1/255 grid.
    off_grid = np.abs(got * 255 - np.round(got * 255))
    assert (off_grid > 0.05).mean() > 0.5

    # Bicubic overshoot at a hard edge is clipped to [0, 1], as the 8-bit path clips to 0-255.
    edge = np.zeros((40, 50), np.uint16)
    edge[:, 25:] = 65535
    Image.fromarray(edge).save(tmp_path / "edge.png")
    got = open_dataset(tmp_path / "edge.png", image_size=32, channels=1)[0].image
    assert got.min() == 0.0 and got.max() == 1.0


@pytest.mark.parametrize("color_type,bands", [(2, 3), (6, 4), (4, 2)])
def test_16_bit_colour_pngs_are_read_within_one_8_bit_step(tmp_path, color_type, bands):
    # Pillow has no 16-bit RGB mode: it opens 16-bit RGB / RGBA / gray+alpha PNGs as 8-bit "RGB" /
    # "RGBA" holding each sample's high byte (no fix needed; this pins the behaviour down).
    values = _rng(13).integers(0, 65536, size=(9, 9, bands), dtype=np.uint16)
    values[0, 0, 0] = 65535
    rows = [values[y].astype(">u2").tobytes() for y in range(9)]
    _write_png(tmp_path / "c16.png", rows, 9, 9, 16, color_type)
    got = open_dataset(tmp_path / "c16.png", image_size=9, channels=3)[0].image
    color = values[..., :3] if bands >= 3 else np.repeat(values[..., :1], 3, axis=2)
    expected = color.transpose(2, 0, 1).astype(np.float64) / 65535
    np.testing.assert_allclose(got, expected, rtol=0, atol=1 / 255)
    assert got[0, 0, 0] == 1.0


def test_8_bit_images_are_unchanged_by_the_high_depth_path(tmp_path):
    pixels = _rng(14).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    got = open_dataset(tmp_path / "a.png", image_size=32)[0].image
    np.testing.assert_array_equal(got, _torchvision_reference(tmp_path / "a.png", 32))


# --- labels files


@pytest.mark.parametrize("name", ["labels.txt", "labels.csv"])
def test_labels_file_that_is_not_utf8_is_refused(tmp_path, name):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    sep = "," if name.endswith(".csv") else " "
    (tmp_path / name).write_bytes(f"a.png{sep}1\n# caf\xe9{sep}2\n".encode("latin-1"))
    with pytest.raises(DataError, match=rf"{name} is not UTF-8 text .*save it as UTF-8") as info:
        open_dataset(tmp_path, image_size=4)
    assert "\n" not in str(info.value)


def test_labels_file_of_binary_garbage_is_refused(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    garbage = bytes(_rng(15).integers(0, 256, size=300, dtype=np.uint8))
    (tmp_path / "labels.csv").write_bytes(b"\xff\xfe" + garbage)
    with pytest.raises(DataError, match="not UTF-8"):
        open_dataset(tmp_path, image_size=4)
    (tmp_path / "labels.csv").write_bytes(b"a.png,1\n\x00\x01\x02,\x00\x07\n")  # valid UTF-8, binary
    with pytest.raises(DataError, match="NUL bytes"):
        open_dataset(tmp_path, image_size=4)


@pytest.mark.parametrize(
    "label", ["1e30", "99999999999999999999999", "2147483648", "-5", "3.0", "1_000", "\u0663", "9" * 5000]
)
@pytest.mark.parametrize("name", ["labels.txt", "labels.csv"])
def test_labels_that_are_not_class_indices_are_refused(tmp_path, label, name):
    # Before: "1e30" on the first line was taken for a header (label -1), huge values were kept.
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    sep = "," if name.endswith(".csv") else " "
    (tmp_path / name).write_text(f"a.png{sep}{label}\n", encoding="utf-8")
    message = r"line 1: label .* of 'a\.png' is (not an integer|out of range)"
    with pytest.raises(DataError, match=message) as info:
        open_dataset(tmp_path, image_size=4)
    assert len(str(info.value)) < 400


def test_labels_file_edge_cases_that_are_valid(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / name)
    # A byte-order mark (as spreadsheet programs write) before a file with no header row.
    (tmp_path / "labels.csv").write_bytes("a.png,3\nb.png,+4\nc.png,2147483647\n".encode("utf-8-sig"))
    assert [s.label for s in open_dataset(tmp_path, image_size=4)] == [3, 4, 2147483647]
    (tmp_path / "labels.csv").write_bytes("file,label\na.png,-1\n".encode("utf-8-sig"))
    assert [s.label for s in open_dataset(tmp_path, image_size=4)] == [-1, -1, -1]


def test_labels_file_names_the_real_line_and_refuses_duplicates(tmp_path):
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / name)
    (tmp_path / "labels.txt").write_text("# name label\n\na.png 1\nb.png oops\n")
    with pytest.raises(DataError, match=r"line 4: label 'oops' of 'b\.png' is not an integer"):
        open_dataset(tmp_path, image_size=4)
    (tmp_path / "labels.txt").write_text("a.png 1\nb.png 2\na.png 3\n")
    with pytest.raises(DataError, match=r"lists 'a\.png' twice \(lines 1 and 3\)"):
        open_dataset(tmp_path, image_size=4)


# --- CIFAR-10 batches


def _write_cifar_labels(path, labels, n=3):
    """A batch as the real files look (protocol-2 pickled dict), with the given b'labels'."""
    images = _rng(16).integers(0, 256, size=(n, 3072), dtype=np.uint8)
    with open(path, "wb") as f:
        batch = {b"batch_label": b"testing batch 1 of 1", b"labels": labels, b"data": images}
        pickle.dump(batch, f, protocol=2)


@pytest.mark.parametrize(
    "labels,message",
    [
        ([4, 1e30, 2], r"label 1e\+30 of image 1 is not an integer"),
        ([4, 2, 10**30], r"label 1000000000000000000000000000000 of image 2 is not a CIFAR-10 class"),
        ([10**5000, 2, 1], r"label a 16610-bit integer of image 0 is not a CIFAR-10 class"),
        ([3.7, 2, 1], r"label 3.7 of image 0 is not an integer"),
        ([0, 12, 1], r"label 12 of image 1 is not a CIFAR-10 class \(0-9\)"),
        ([0, 1, -1], r"label -1 of image 2 is not a CIFAR-10 class \(0-9\)"),
        ([True, 1, 2], r"label True of image 0 is not an integer"),
        ([0, "7", 1], r"label '7' of image 1 is not an integer"),
        (np.array([1.0, 1e30, 2.0]), r"b'labels' has dtype float64"),
        (np.array([1, 2, 2**63 - 1]), r"label 9223372036854775807 of image 2 is not 0-9"),
        (5, r"does not hold one label per image"),
    ],
)
def test_cifar_labels_that_are_not_classes_0_to_9_are_refused(tmp_path, labels, message):
    _write_cifar_labels(tmp_path / "test_batch", labels)
    with pytest.raises(DataError, match=message) as info:
        open_dataset(tmp_path / "test_batch", image_size=32)
    assert "test_batch" in str(info.value) and len(str(info.value)) < 300


def test_cifar_integer_array_labels_are_accepted(tmp_path):
    _write_cifar_labels(tmp_path / "test_batch", np.array([9, 0, 3], dtype=np.uint8))
    assert open_dataset(tmp_path / "test_batch", image_size=32).labels.tolist() == [9, 0, 3]


def test_cifar_batch_with_an_absurd_memo_index_is_refused_before_unpickling(tmp_path):
    # CPython's unpickler grows its memo table to the index a PUT names: one index of 2**31 costs
    # 16 GB. Here a moderate one (20 million, about 300 MB) that the old reader accepted.
    _write_cifar_labels(tmp_path / "test_batch", [1, 2, 3])
    raw = (tmp_path / "test_batch").read_bytes()
    assert raw[:5] == b"\x80\x02}q\x00"  # PROTO 2, EMPTY_DICT, BINPUT 0 (the dict, never fetched)
    (tmp_path / "test_batch").write_bytes(raw[:3] + b"r" + struct.pack("<I", 20_000_000) + raw[5:])
    with pytest.raises(DataError, match="LONG_BINPUT 20000000 at opcode 2 is not a real memo index"):
        open_dataset(tmp_path / "test_batch", image_size=32)


# --- .npz arrays


@pytest.mark.parametrize(
    "num_classes,message",
    [
        ([10, 3], r"'num_classes' is an array of shape \(2,\)"),
        (np.zeros((2, 2), np.int64), r"'num_classes' is an array of shape \(2, 2\)"),
        (2.5, r"'num_classes' is 2.5 of dtype float64, not an integer"),
        (10.0, r"'num_classes' is 10.0 of dtype float64, not an integer"),
        (-3, r"'num_classes' is -3:"),
        (0, r"'num_classes' is 0:"),
        (True, r"'num_classes' is True of dtype bool, not an integer"),
        ("ten", r"'num_classes' is 'ten' of dtype <U3, not an integer"),
    ],
)
def test_npz_num_classes_must_be_one_positive_integer(tmp_path, num_classes, message):
    images = np.zeros((2, 3, 4, 4), np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([0, 1]), num_classes=num_classes)
    with pytest.raises(DataError, match=message):
        open_dataset(tmp_path / "d.npz", image_size=4)


def test_npz_num_classes_in_a_one_element_array_is_accepted(tmp_path):
    images = np.zeros((2, 3, 4, 4), np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([0, 6]), num_classes=np.array([7]))
    ds = open_dataset(tmp_path / "d.npz", image_size=4)
    assert ds.num_classes == 7 and [s.label for s in ds] == [0, 6]


@pytest.mark.parametrize(
    "labels,extra,message",
    [
        (np.array([0, 7]), dict(num_classes=5), r"label 7 of image 1 is not -1 \(unknown\) or 0-4.*5 cl"),
        (np.array([0, -2]), dict(num_classes=5), r"label -2 of image 1 is not -1 \(unknown\) or 0-4"),
        (np.array([-2, 0]), {}, r"label -2 of image 0 is not -1 \(unknown\) or 0-2147483647"),
        (np.array([0, 2**40]), {}, r"label 1099511627776 of image 1 is not"),
        (np.array([0, 2**64 - 1], np.uint64), {}, r"label 18446744073709551615 of image 1 is not"),
        (np.array([0.0, 1.0]), {}, r"'labels' has dtype float64; use integers"),
        (np.array([0, 1e30]), {}, r"'labels' has dtype float64; use integers"),
    ],
)
def test_npz_labels_must_be_class_indices(tmp_path, labels, extra, message):
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 3, 4, 4), np.uint8), labels=labels, **extra)
    with pytest.raises(DataError, match=message):
        open_dataset(tmp_path / "d.npz", image_size=4)


def test_npz_labels_are_checked_against_a_given_num_classes(tmp_path, monkeypatch):
    asset = tmp_path / "digits_test.npz"
    monkeypatch.setattr(data, "DIGITS_TEST_ASSET", asset)
    np.savez(asset, images=np.zeros((3, 1, 8, 8), np.float32), labels=np.array([-1, 9, 10]))
    with pytest.raises(DataError, match=r"label 10 of image 2 is not -1 \(unknown\) or 0-9"):
        data.digits_test_split()


def _corrupt_npz_cases(tmp_path):
    arrays = dict(images=np.zeros((2, 3, 4, 4), np.uint8), labels=np.array([0, 1]))
    cases = {}
    with zipfile.ZipFile(tmp_path / "members.npz", "w") as archive:  # members that are not .npy
        archive.writestr("images.npy", b"garbage" * 10)
    cases["members.npz"] = r"'images' is not a numpy array"
    (tmp_path / "notzip.npz").write_bytes(b"PK\x03\x04" + bytes(range(200)))
    cases["notzip.npz"] = r"cannot read .*notzip\.npz as \.npz"
    np.savez(tmp_path / "crc.npz", **arrays)
    blob = bytearray((tmp_path / "crc.npz").read_bytes())
    blob[blob.index(b"\x93NUMPY") + 200] ^= 0xFF  # a byte of the stored image data
    (tmp_path / "crc.npz").write_bytes(bytes(blob))
    cases["crc.npz"] = r"cannot read .*crc\.npz as \.npz \(Bad CRC-32"
    noise = _rng(17).integers(0, 256, (4, 3, 16, 16), dtype=np.uint8)  # does not compress to nothing
    np.savez_compressed(tmp_path / "deflate.npz", images=noise)
    blob = bytearray((tmp_path / "deflate.npz").read_bytes())
    start = blob.index(b"images.npy") + len(b"images.npy")
    blob[start + 20 : start + 60] = bytes(40)  # zero part of the deflate stream
    (tmp_path / "deflate.npz").write_bytes(bytes(blob))
    cases["deflate.npz"] = r"cannot read .*deflate\.npz as \.npz"
    np.save(tmp_path / "single.npy", arrays["images"])
    (tmp_path / "single.npy").rename(tmp_path / "single.npz")
    cases["single.npz"] = r"holds a single \.npy array, not an \.npz archive"
    np.savez(tmp_path / "object.npz", images=np.array([[1], "x"], dtype=object))
    cases["object.npz"] = r"Object arrays cannot be loaded"
    (tmp_path / "empty.npz").write_bytes(b"")
    cases["empty.npz"] = r"cannot read .*empty\.npz as \.npz"
    return cases


def test_corrupt_npz_files_are_refused(tmp_path):
    for name, message in _corrupt_npz_cases(tmp_path).items():
        with pytest.raises(DataError, match=message) as info:
            open_dataset(tmp_path / name, image_size=4)
        assert "\n" not in str(info.value), name


# --- image files


def _check_both_ways(ds, index, message):
    """Reading image ``index`` and validating the dataset both give DataError matching ``message``."""
    with pytest.raises(DataError, match=message) as info:
        ds[index]
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match=message):
        ds.validate()


def test_truncated_empty_and_garbage_image_files_are_refused(tmp_path):
    pixels = _rng(18).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "full.png")
    raw = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(raw[: len(raw) // 2])
    ds = open_dataset(tmp_path / "truncated.png", image_size=64)
    _check_both_ways(ds, 0, r"cannot read image 0 .*truncated\.png.*truncated")
    (tmp_path / "empty.png").write_bytes(b"")
    ds = open_dataset(tmp_path / "empty.png", image_size=64)
    _check_both_ways(ds, 0, r"empty\.png\): the file is empty \(0 bytes\)")
    (tmp_path / "text.png").write_text("this is not an image\n")
    ds = open_dataset(tmp_path / "text.png", image_size=64)
    _check_both_ways(ds, 0, r"text\.png\): it is not an image Pillow can decode")


def test_png_with_a_broken_chunk_is_refused(tmp_path):
    # Pillow raises SyntaxError ("broken PNG file") when the next chunk's type is not letters.
    pixels = _rng(19).integers(0, 256, size=(32, 32), dtype=np.uint8)
    _write_png(tmp_path / "broken.png", [pixels[y].tobytes() for y in range(32)], 32, 32, 8, 0, idat_parts=2)
    blob = bytearray((tmp_path / "broken.png").read_bytes())
    second = blob.index(b"IDAT", blob.index(b"IDAT") + 4)
    blob[second : second + 4] = b"\x1d\xa2\xfe\x82"
    (tmp_path / "broken.png").write_bytes(bytes(blob))
    ds = open_dataset(tmp_path / "broken.png", image_size=32)
    _check_both_ways(ds, 0, r"cannot read image 0 .*broken\.png.*broken PNG file")


def _write_blank_bilevel_png(path, width, height):
    """A 1-bit all-black PNG, compressed row by row so that a huge one costs little to write."""
    packer = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    chunks = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


def test_decompression_bombs_are_refused(tmp_path):
    limit = Image.MAX_IMAGE_PIXELS  # Pillow's default, about 89 million pixels
    # Between the limit and twice it Pillow only warns, and the old reader decoded the whole image.
    side = math.isqrt(int(limit * 1.2)) + 1
    assert limit < side * side < 2 * limit
    _write_blank_bilevel_png(tmp_path / "bomb.png", side, side)
    assert (tmp_path / "bomb.png").stat().st_size < 1_000_000
    ds = open_dataset(tmp_path / "bomb.png", image_size=32)
    _check_both_ways(ds, 0, r"cannot read image 0 .*bomb\.png.*exceeds limit of \d+ pixels")
    # Above twice the limit Pillow refuses the file itself (only the header is needed).
    big = tmp_path / "big"
    big.mkdir()
    header = struct.pack(">IIBBBBB", 30000, 30000, 1, 0, 0, 0, 0)
    chunks = _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b"")  # no pixel data needed
    (big / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)
    _check_both_ways(open_dataset(big, image_size=32), 0, r"huge\.png.*exceeds limit")


def test_a_named_pipe_among_the_images_is_refused_not_waited_on(tmp_path):
    # Listing refuses a pipe (test_non_regular_files_with_image_names_are_refused_when_listed);
    # here one that appears after listing (a file replaced by a pipe) is refused when read.
    (tmp_path / "n01").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "n01" / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "n01" / "b.png")
    ds = open_dataset(tmp_path, image_size=8)
    assert [p.name for p in ds.files] == ["a.png", "b.png"]
    os.unlink(tmp_path / "n01" / "b.png")
    os.mkfifo(tmp_path / "n01" / "b.png")
    outcome = []

    def read():
        try:
            ds[1]
            outcome.append("read")
        except DataError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(timeout=20)
    if worker.is_alive():  # blocked opening the pipe: release it, then fail
        os.close(os.open(tmp_path / "n01" / "b.png", os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=20)
        pytest.fail("reading the named pipe blocked")
    assert isinstance(outcome[0], DataError), outcome
    assert re.search(r"cannot read image 1 .*b\.png.*not a regular file", str(outcome[0]))


# --- folders


def test_symlink_loop_in_an_image_folder_is_refused(tmp_path):
    (tmp_path / "n01" / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "n01" / "a.png")
    os.symlink("..", tmp_path / "n01" / "sub" / "up")  # n01/sub/up -> n01: a loop
    # Before: os.walk followed the loop some 40 times, listing a.png 41 times.
    message = r"n01/sub/up is a symbolic link to .*n01, a folder that contains the link \(a loop\)"
    with pytest.raises(DataError, match=message):
        open_dataset(tmp_path, image_size=8)
    with pytest.raises(DataError, match="a loop"):
        data.image_folder(tmp_path, image_size=8)
    os.symlink(tmp_path, tmp_path / "n01" / "root")  # a link to the dataset root: a loop too
    os.unlink(tmp_path / "n01" / "sub" / "up")
    with pytest.raises(DataError, match=r"n01/root is a symbolic link .*\(a loop\)"):
        data.image_folder(tmp_path, image_size=8)


def test_symlinks_that_are_not_loops_are_followed_like_imagefolder(tmp_path):
    for cls in ("n01", "n02"):
        (tmp_path / cls).mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / cls / "a.png")
    os.symlink("../n02", tmp_path / "n01" / "shared")  # a sibling, not an ancestor
    ds = open_dataset(tmp_path, image_size=8)
    import torchvision.datasets as datasets

    reference = datasets.ImageFolder(str(tmp_path))
    assert [str(p) for p in ds.files] == [s for s, _ in reference.samples]
    names = [p.relative_to(tmp_path).as_posix() for p in ds.files]
    assert names == ["n01/a.png", "n01/shared/a.png", "n02/a.png"]
    assert ds.labels == reference.targets == [0, 0, 1]


def _make_unreadable(folder):
    """chmod 000 ``folder``; skip the calling test if that does not stop listing it (root)."""
    folder.chmod(0)
    try:
        os.listdir(folder)
    except PermissionError:
        return
    folder.chmod(0o755)
    pytest.skip(
        "running as root (or with CAP_DAC_OVERRIDE): chmod 000 does not stop this process from "
        "reading a folder, so 'permission denied' cannot be produced here"
    )


def test_folders_that_cannot_be_read_are_refused(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(plain / "a.png")
    classes = tmp_path / "classes"
    (classes / "n01" / "deep").mkdir(parents=True)
    (classes / "n02").mkdir()
    for name in ("n01/a.png", "n01/deep/b.png", "n02/c.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(classes / name)
    assert len(open_dataset(classes, image_size=8)) == 3
    try:
        _make_unreadable(plain)
        _make_unreadable(classes / "n01" / "deep")
        with pytest.raises(DataError, match=r"cannot list folder .*plain \(Permission denied\)"):
            open_dataset(plain, image_size=8)
        with pytest.raises(DataError, match=r"cannot list folder .*plain \(Permission denied\)"):
            data.plain_image_folder(plain, image_size=8)
        # Before: os.walk skipped the unreadable sub-folder silently, dropping b.png.
        with pytest.raises(DataError, match=r"cannot list folder .*n01/deep \(Permission denied\)"):
            open_dataset(classes, image_size=8)
        with pytest.raises(DataError, match=r"cannot list folder .*n01/deep \(Permission denied\)"):
            data.image_folder(classes, image_size=8)
    finally:
        plain.chmod(0o755)
        (classes / "n01" / "deep").chmod(0o755)


def test_paths_that_cannot_be_examined_are_refused(tmp_path):
    with pytest.raises(DataError, match=r"cannot access data path .*\(File name too long\)"):
        open_dataset(tmp_path / ("x" * 5000), image_size=8)
    with pytest.raises(DataError, match=r"cannot expand ~no-such-user-here/x: no such user"):
        open_dataset("~no-such-user-here/x", image_size=8)


# ----------------------------------------------------------------------------- issue 19
# Labels beyond the engine's classes, the data identity of results files, symbolic links out of
# the data folder, non-regular files under image names, and file names that are not UTF-8. The
# end-to-end tests certify on the shipped digits engine (1 x 16 x 16, 10 classes), built once.

DIGITS_SMALL = ["--sigma", "0.5", "--steps", "1", "--votes", "1", "--n0", "4", "--n", "8", "--batch", "8", "--quiet"]


def _cli(*args):
    from click.testing import CliRunner

    from densepure_rt.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def _one_error_line(result) -> str:
    """The CLI's own one-line error: exit status 2, a single ``error:`` line, no traceback."""
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def digits_engine(tmp_path_factory):
    from conftest import build_digits_engine

    return build_digits_engine(tmp_path_factory, "data")


def _digits_pixels(n, start=0):
    """The first ``n`` digits of the shipped test split as 16 x 16 uint8 images, and their labels."""
    with np.load(data.DIGITS_TEST_ASSET) as archive:
        images = archive["images"][start : start + n, 0]
        labels = archive["labels"][start : start + n]
    return np.round(images * 255).astype(np.uint8), labels.astype(int)


def _write_digits_folder(folder, n=4, ext="bmp"):
    """``n`` digits as 8-bit grayscale files ``d0.<ext>`` ... with a labels.csv; returns the names."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels, labels = _digits_pixels(n)
    names = [f"d{i}.{ext}" for i in range(n)]
    for name, image in zip(names, pixels):
        Image.fromarray(image, "L").save(folder / name)
    (folder / "labels.csv").write_text("file,label\n" + "".join(f"{m},{y}\n" for m, y in zip(names, labels)))
    return names


def _independent_digest(items):
    """sha256 over (index, label, shape, float32 pixels), little-endian, for (index, label, image)."""
    digest = hashlib.sha256()
    for index, label, image in items:
        image = np.asarray(image, dtype=np.float32)
        digest.update(int(index).to_bytes(8, "little", signed=True))
        digest.update(int(label).to_bytes(8, "little", signed=True))
        for d in image.shape:
            digest.update(int(d).to_bytes(8, "little", signed=True))
        digest.update(image.astype("<f4").tobytes(order="C"))
    return digest.hexdigest()


def _pillow_gray(path):
    """An 8-bit grayscale file read with Pillow alone, as [1 x H x W] float32 in [0, 1]."""
    with Image.open(path) as image:
        return (np.asarray(image.convert("L"), dtype=np.float32) / np.float32(255))[None]


def _recorded_digest(options_file):
    """The data identity a results file's options record: ``data_content_sha256`` where results.py
    names it so, ``data_sha256`` (the key older versions used for their listing hash) otherwise."""
    options = json.loads(options_file.read_text(encoding="utf-8"))
    return options.get("data_content_sha256", options.get("data_sha256"))


def _rows(path):
    """Result rows without the wall-time column."""
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    return [{k: v for k, v in zip(header, line.split("\t")) if k != "time"} for line in lines[1:]]


def _keep_first_rows(path, count):
    """A killed run: the header and the first ``count`` rows."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[: 1 + count]), encoding="utf-8")


# --- A: labels outside the engine's classes


def test_labels_file_labels_beyond_the_engines_classes_are_refused(tmp_path):
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / name)
    (tmp_path / "labels.csv").write_text("file,label\na.png,3\nb.png,57\n")
    assert [s.label for s in open_dataset(tmp_path, image_size=4)] == [3, 57]  # no engine: any class
    message = (r"labels\.csv: line 3: label '57' of 'b\.png' is out of range: labels are -1 \(unknown\) "
               r"or 0-9 \(the engine has 10 classes\)")
    with pytest.raises(DataError, match=message):
        open_dataset(tmp_path, image_size=4, num_classes=10)
    (tmp_path / "labels.csv").write_text("file,label\na.png,9\nb.png,-1\n")
    assert [s.label for s in open_dataset(tmp_path, image_size=4, num_classes=10)] == [9, -1]


def test_npz_labels_beyond_the_engines_classes_are_refused(tmp_path):
    images = np.zeros((3, 1, 4, 4), np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([3, 57, 1]))  # no num_classes stored
    assert open_dataset(tmp_path / "d.npz", image_size=4, channels=1).labels.tolist() == [3, 57, 1]
    message = r"d\.npz: label 57 of image 1 is not -1 \(unknown\) or 0-9 \(the engine has 10 classes\)"
    with pytest.raises(DataError, match=message) as info:
        open_dataset(tmp_path / "d.npz", image_size=4, channels=1, num_classes=10)
    assert "\n" not in str(info.value)


def test_npz_that_stores_more_classes_than_the_engine_is_refused_fewer_accepted(tmp_path):
    images = np.zeros((2, 1, 4, 4), np.uint8)
    # Labels 0 and 1 fit a 10-class engine, but they are classes of a 12-class label set.
    np.savez(tmp_path / "more.npz", images=images, labels=np.array([0, 1]), num_classes=12)
    with pytest.raises(DataError, match=r"more\.npz stores num_classes 12 but the engine has 10 classes \(0-9\)"):
        open_dataset(tmp_path / "more.npz", image_size=4, channels=1, num_classes=10)
    np.savez(tmp_path / "fewer.npz", images=images, labels=np.array([0, 6]), num_classes=7)
    ds = open_dataset(tmp_path / "fewer.npz", image_size=4, channels=1, num_classes=10)
    assert ds.num_classes == 7 and ds.labels.tolist() == [0, 6]
    np.savez(tmp_path / "fewer.npz", images=images, labels=np.array([0, 8]), num_classes=7)
    with pytest.raises(DataError, match=r"label 8 of image 1 is not -1 \(unknown\) or 0-6 \(the data has 7 classes\)"):
        open_dataset(tmp_path / "fewer.npz", image_size=4, channels=1, num_classes=10)
    # A malformed stored count is refused even where the engine's count is known.
    np.savez(tmp_path / "bad.npz", images=images, labels=np.array([0, 1]), num_classes=2.5)
    with pytest.raises(DataError, match=r"'num_classes' is 2.5 of dtype float64"):
        open_dataset(tmp_path / "bad.npz", image_size=4, channels=1, num_classes=10)


def test_cifar_labels_beyond_the_engines_classes_are_refused(tmp_path):
    _write_cifar_labels(tmp_path / "test_batch", [2, 7, 1])
    assert open_dataset(tmp_path / "test_batch", image_size=32, num_classes=10).labels.tolist() == [2, 7, 1]
    with pytest.raises(DataError, match=r"test_batch: label 7 of image 1 is not 0-4 \(the engine has 5 classes\)"):
        open_dataset(tmp_path / "test_batch", image_size=32, num_classes=5)


def test_image_folder_with_more_class_folders_than_the_engine_is_refused_before_walking(tmp_path):
    for k in range(11):
        (tmp_path / f"c{k:02d}").mkdir()
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / f"c{k:02d}" / "a.png")
    os.symlink("..", tmp_path / "c03" / "loop")  # walking any class folder would stop at this loop
    message = (r"c10: class folder 'c10' would be label 10, but the engine has 10 classes \(0-9\) "
               r"and .* holds 11 class folders")
    for reader in (open_dataset, data.image_folder):
        with pytest.raises(DataError, match=message) as info:
            reader(tmp_path, image_size=4, num_classes=10)
        assert "\n" not in str(info.value)
    os.unlink(tmp_path / "c03" / "loop")
    assert len(open_dataset(tmp_path, image_size=4, num_classes=11)) == 11
    assert len(open_dataset(tmp_path, image_size=4, num_classes=1000)) == 11


def test_digits_split_labels_are_checked_against_the_engines_classes():
    assert data.digits_test_split(num_classes=10).labels.max() == 9
    with pytest.raises(DataError, match=r"digits_test\.npz: label \d of image \d+ is not -1 \(unknown\) or 0-4 \(the engine has 5"):
        data.digits_test_split(num_classes=5)


def test_cli_refuses_labels_beyond_the_engines_classes_before_writing(digits_engine, tmp_path):
    folder = tmp_path / "csv"
    names = _write_digits_folder(folder)
    (folder / "labels.csv").write_text(f"file,label\n{names[0]},3\n{names[2]},57\n")
    pixels, _ = _digits_pixels(3)
    np.savez(tmp_path / "d.npz", images=pixels[:, None], labels=np.array([1, 57, 2]))
    classes = tmp_path / "classes"
    for k in range(11):
        (classes / f"{k:02d}").mkdir(parents=True)
        Image.fromarray(pixels[0], "L").save(classes / f"{k:02d}" / "a.png")
    cases = {
        folder: r"labels\.csv: line 3: label '57' of 'd2\.bmp' .*the engine has 10 classes",
        tmp_path / "d.npz": r"d\.npz: label 57 of image 1 .*the engine has 10 classes",
        classes: r"classes/10: class folder '10' would be label 10, but the engine has 10 classes",
    }
    for i, (data_path, message) in enumerate(cases.items()):
        out = tmp_path / f"out{i}.tsv"
        line = _one_error_line(_cli("certify", "--engine", digits_engine, "--data", data_path, *DIGITS_SMALL, "--out", out))
        assert re.search(message, line), line
        assert not out.exists() and not (tmp_path / f"out{i}.tsv.json").exists()


# --- B: the data identity of a run


def test_validate_returns_the_sha256_of_indices_labels_shapes_and_pixels(tmp_path):
    names = _write_digits_folder(tmp_path / "plain", n=5, ext="png")
    _, labels = _digits_pixels(5)
    ds = open_dataset(tmp_path / "plain", image_size=16, channels=1, num_classes=10)
    for chosen in ([0, 1, 2, 3, 4], [0, 2, 4], [3, 1]):
        expected = _independent_digest(
            (i, labels[i], _pillow_gray(tmp_path / "plain" / names[i])) for i in chosen
        )
        assert ds.validate(chosen) == expected
    assert ds.validate() == ds.validate(range(5))
    assert ds.validate([]) == hashlib.sha256().hexdigest()
    # The same pixels from another format and another reader give the same identity.
    pixels, _ = _digits_pixels(5)
    np.savez(tmp_path / "d.npz", images=pixels[:, None], labels=labels)
    assert open_dataset(tmp_path / "d.npz", image_size=16, channels=1).validate([0, 2, 4]) == ds.validate([0, 2, 4])
    # Labels are part of it; 3-channel engines hash the 3-channel images they certify.
    np.savez(tmp_path / "relabelled.npz", images=pixels[:, None], labels=labels[::-1])
    assert open_dataset(tmp_path / "relabelled.npz", image_size=16, channels=1).validate() != ds.validate()
    rgb = open_dataset(tmp_path / "plain", image_size=16, channels=3)
    expected = _independent_digest(
        (i, labels[i], np.repeat(_pillow_gray(tmp_path / "plain" / names[i]), 3, axis=0))
        for i in (1, 3)
    )
    assert rgb.validate([1, 3]) == expected


def test_validate_digest_of_float_and_cifar_arrays_matches_an_independent_one(tmp_path):
    floats = _rng(30).random((4, 1, 6, 6), dtype=np.float32)
    np.savez(tmp_path / "f.npz", images=floats.astype(np.float64), labels=np.array([1, -1, 0, 2]))
    ds = open_dataset(tmp_path / "f.npz", image_size=6, channels=1)
    expected = _independent_digest((i, [1, -1, 0, 2][i], floats[i].astype(np.float64).astype(np.float32)) for i in (0, 1, 3))
    assert ds.validate([0, 1, 3]) == expected
    images, labels = _write_cifar(tmp_path / "test_batch", n=4)
    ds = open_dataset(tmp_path / "test_batch", image_size=32)
    expected = _independent_digest((i, labels[i], images[i].reshape(3, 32, 32) / np.float32(255)) for i in range(4))
    assert ds.validate() == expected


def test_out_inside_the_data_folder_is_refused_and_beside_it_resumes(digits_engine, tmp_path):
    folder = tmp_path / "data"
    names = _write_digits_folder(folder, n=4)
    inside = ["certify", "--engine", digits_engine, "--data", folder, *DIGITS_SMALL, "--out", folder / "res.tsv"]
    listing = sorted(p.name for p in folder.iterdir())
    refused = _cli(*inside)  # results written among the images would be read as data by the next run
    assert refused.exit_code == 2 and "inside the --data folder" in refused.stderr
    assert sorted(p.name for p in folder.iterdir()) == listing
    out = tmp_path / "res.tsv"
    args = ["certify", "--engine", digits_engine, "--data", folder, *DIGITS_SMALL, "--out", out]
    first = _cli(*args)
    assert first.exit_code == 0, first.output
    complete = _rows(out)
    assert [r["idx"] for r in complete] == ["0", "1", "2", "3"]
    _keep_first_rows(out, 1)  # killed after one image: the same command continues it
    again = _cli(*args)
    assert again.exit_code == 0, again.output
    assert f"resuming {out}: 1 images done, 3 to go" in again.stderr
    assert _rows(out) == complete
    _, labels = _digits_pixels(4)
    assert _recorded_digest(tmp_path / "res.tsv.json") == _independent_digest(
        (i, labels[i], _pillow_gray(folder / names[i])) for i in range(4)
    )


def test_resume_after_an_unrelated_file_is_added_to_the_data_folder(digits_engine, tmp_path):
    folder = tmp_path / "data"
    _write_digits_folder(folder, n=3)
    out = tmp_path / "res.tsv"
    args = ["certify", "--engine", digits_engine, "--data", folder, *DIGITS_SMALL, "--out", out]
    assert _cli(*args).exit_code == 0
    complete = _rows(out)
    _keep_first_rows(out, 1)
    # A file and a folder beside the images do not change what is certified (before: refused).
    (folder / "notes.txt").write_text("run on the digits engine\n")
    (folder / "plots").mkdir()
    (folder / "plots" / "curve.csv").write_text("0,1\n")
    again = _cli(*args)
    assert again.exit_code == 0, again.output
    assert f"resuming {out}: 1 images done, 2 to go" in again.stderr
    assert _rows(out) == complete


def test_resume_refuses_an_image_replaced_by_other_pixels_of_the_same_size(digits_engine, tmp_path):
    folder = tmp_path / "data"
    names = _write_digits_folder(folder, n=4)
    out = tmp_path / "res.tsv"
    args = ["certify", "--engine", digits_engine, "--data", folder, *DIGITS_SMALL, "--out", out]
    assert _cli(*args).exit_code == 0
    _keep_first_rows(out, 1)
    before = (folder / names[2]).read_bytes()
    other, _ = _digits_pixels(1, start=40)
    Image.fromarray(other[0], "L").save(folder / names[2])  # an 8-bit BMP: same size, other pixels
    after = (folder / names[2]).read_bytes()
    assert len(after) == len(before) and after != before
    saved = (out.read_text(), (tmp_path / "res.tsv.json").read_text())
    line = _one_error_line(_cli(*args))
    assert re.search(r"holds results of other settings \(data_(content_)?sha256", line), line
    assert (out.read_text(), (tmp_path / "res.tsv.json").read_text()) == saved  # nothing appended
    # Outside the selection the same change is not part of the run: --max 2 certifies 0 and 1 only.
    out2 = tmp_path / "max2.tsv"
    (folder / names[2]).write_bytes(before)
    args2 = ["certify", "--engine", digits_engine, "--data", folder, *DIGITS_SMALL, "--max", "2", "--out", out2]
    assert _cli(*args2).exit_code == 0
    _keep_first_rows(out2, 1)
    Image.fromarray(other[0], "L").save(folder / names[2])
    resumed = _cli(*args2)
    assert resumed.exit_code == 0, resumed.output
    assert "1 images done, 1 to go" in resumed.stderr


def test_the_shipped_digits_split_is_identified_by_its_content(digits_engine, tmp_path):
    out = tmp_path / "digits.tsv"
    result = _cli("certify", "--engine", digits_engine, *DIGITS_SMALL, "--skip", "7", "--max", "20", "--out", out)
    assert result.exit_code == 0, result.output
    with np.load(data.DIGITS_TEST_ASSET) as archive:
        images, labels = archive["images"], archive["labels"]
    assert json.loads((tmp_path / "digits.tsv.json").read_text())["data"] == "digits-test"
    expected = _independent_digest((i, labels[i], images[i]) for i in (0, 7, 14))
    assert _recorded_digest(tmp_path / "digits.tsv.json") == expected
    assert [r["idx"] for r in _rows(out)] == ["0", "7", "14"]


def test_legacy_data_sha256_is_the_old_listing_and_file_identity(tmp_path):
    # The identity results files written before the content digest carry, computed independently.
    (tmp_path / "b").mkdir()
    (tmp_path / "a.png").write_bytes(b"12345")
    (tmp_path / "b" / "c.txt").write_bytes(b"xy")
    (tmp_path / "z.csv").write_bytes(b"")
    listing = b"a.png\x005\nz.csv\x000\nb/c.txt\x002\n"  # top folder's files first, then b/
    assert data.legacy_data_sha256(tmp_path) == hashlib.sha256(listing).hexdigest()
    assert data.legacy_data_sha256(tmp_path / "a.png") == hashlib.sha256(b"12345").hexdigest()
    assert data.legacy_data_sha256(data.DIGITS_TEST_ASSET) == hashlib.sha256(data.DIGITS_TEST_ASSET.read_bytes()).hexdigest()
    odd = os.path.join(os.fsencode(tmp_path / "b"), b"\xff.png")
    with open(odd, "wb") as f:
        f.write(b"1")
    listing = b"a.png\x005\nz.csv\x000\nb/c.txt\x002\nb/\xff.png\x001\n"
    assert data.legacy_data_sha256(tmp_path) == hashlib.sha256(listing).hexdigest()


# --- C: symbolic links out of the data folder


def test_symlinks_to_folders_outside_the_data_folder_are_refused_without_walking_them(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(outside / "x.png")
    os.symlink(outside, outside / "loop")  # listing beneath the link would stop at this loop instead
    root = tmp_path / "data"
    for cls in ("n01", "n02"):
        (root / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / cls / "a.png")
    os.symlink(outside, root / "n01" / "ext")
    message = r"data/n01/ext is a symbolic link to .*/outside, a folder outside the data folder .*/data"
    for reader in (open_dataset, data.image_folder):
        with pytest.raises(DataError, match=message) as info:
            reader(root, image_size=4)
        assert "\n" not in str(info.value) and "a loop" not in str(info.value)
    os.unlink(root / "n01" / "ext")
    os.symlink(outside, root / "n03")  # a class folder that is itself a link out
    with pytest.raises(DataError, match=r"data/n03 is a symbolic link to .*/outside, a folder outside"):
        open_dataset(root, image_size=4)
    with pytest.raises(DataError, match=r"data/n03 is a symbolic link to .*/outside, a folder outside"):
        data.image_folder(root, image_size=4)
    os.unlink(root / "n03")
    # A plain folder: its sub-folders are looked into to tell the layout, so a link out is refused.
    plain = tmp_path / "plain"
    plain.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(plain / "a.png")
    os.symlink(outside, plain / "more")
    with pytest.raises(DataError, match=r"plain/more is a symbolic link to .*/outside, a folder outside"):
        open_dataset(plain, image_size=4)


def test_symlinks_within_the_data_folder_are_still_followed(tmp_path):
    root = tmp_path / "real"
    for cls in ("n01", "n02"):
        (root / cls).mkdir(parents=True)
        Image.fromarray(np.full((4, 4), 10 * len(cls), np.uint8)).save(root / cls / "a.png")
    (root / "n02" / "deep").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "n02" / "deep" / "b.png")
    os.symlink("../n02/deep", root / "n01" / "shared")
    # --data itself may be a link: "inside" means inside the folder it resolves to.
    os.symlink(root, tmp_path / "link")
    for spec in (root, tmp_path / "link"):
        ds = open_dataset(spec, image_size=4)
        assert [p.relative_to(spec).as_posix() for p in ds.files] == [
            "n01/a.png", "n01/shared/b.png", "n02/a.png", "n02/deep/b.png",
        ]
        assert ds.labels == [0, 0, 1, 1]


# --- D: non-regular files under image names


def test_non_regular_files_with_image_names_are_refused_when_listed(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("a.png", "c.png"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(plain / name)
    os.mkfifo(plain / "b.png")
    # Before: the plain reader skipped b.png silently, so c.png became image 1.
    message = r"plain/b\.png has an image extension but is a named pipe \(FIFO\), not a regular file"
    for reader in (open_dataset, data.plain_image_folder):
        with pytest.raises(DataError, match=message) as info:
            reader(plain, image_size=4)
        assert "\n" not in str(info.value)
    os.unlink(plain / "b.png")
    os.symlink(tmp_path / "missing.png", plain / "b.png")  # a broken link, skipped before too
    with pytest.raises(DataError, match=r"plain/b\.png is a symbolic link whose target cannot be opened"):
        open_dataset(plain, image_size=4)
    os.unlink(plain / "b.png")
    os.symlink(plain / "a.png", plain / "b.png")  # a link to a regular file is an image
    assert [p.name for p in open_dataset(plain, image_size=4).files] == ["a.png", "b.png", "c.png"]
    # A folder holding nothing but a pipe named like an image.
    lone = tmp_path / "lone"
    lone.mkdir()
    os.mkfifo(lone / "only.jpg")
    with pytest.raises(DataError, match=r"lone/only\.jpg has an image extension but is a named pipe"):
        open_dataset(lone, image_size=4)
    # Class folders: refused when listed, whatever the selection (before: only when read).
    classes = tmp_path / "classes"
    (classes / "n01" / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(classes / "n01" / "a.png")
    os.mkfifo(classes / "n01" / "sub" / "p.webp")
    message = r"n01/sub/p\.webp has an image extension but is a named pipe \(FIFO\)"
    for reader in (open_dataset, data.image_folder):
        with pytest.raises(DataError, match=message):
            reader(classes, image_size=4)
    # A pipe given as --data itself.
    with pytest.raises(DataError, match=r"only\.jpg is a named pipe \(FIFO\): pass a regular file or a folder"):
        open_dataset(lone / "only.jpg", image_size=4)


# --- E: file names that are not UTF-8


def test_cli_certifies_a_folder_with_file_names_that_are_not_utf8(digits_engine, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    pixels, _ = _digits_pixels(2)
    raw = os.fsencode(folder)
    for name, image in zip((b"\xff.png", b"a.png"), pixels):  # \xff is not UTF-8: Python sees '\udcff'
        Image.fromarray(image, "L").save(os.path.join(raw, name).decode("utf-8", "surrogateescape"), format="PNG")
    assert sorted(os.listdir(raw)) == [b"a.png", b"\xff.png"]
    out = tmp_path / "odd.tsv"
    # Before: UnicodeEncodeError from the folder's listing hash, a traceback.
    result = _cli("certify", "--engine", digits_engine, "--data", folder, *DIGITS_SMALL, "--out", out)
    assert result.exception is None, repr(result.exception)
    assert result.exit_code == 0, result.output
    assert [r["idx"] for r in _rows(out)] == ["0", "1"]
    ds = open_dataset(folder, image_size=16, channels=1)
    assert [os.fsencode(p.name) for p in ds.files] == [b"a.png", b"\xff.png"]
    expected = _independent_digest((i, -1, _pillow_gray(p)) for i, p in enumerate(ds.files))
    assert _recorded_digest(tmp_path / "odd.tsv.json") == expected
    again = _cli("certify", "--engine", digits_engine, "--data", folder, *DIGITS_SMALL, "--out", out)
    assert again.exit_code == 0, again.output
    # A damaged file under such a name is one error line naming it (escaped), not a traceback.
    with open(os.path.join(raw, b"\xfe.png"), "wb") as f:
        f.write(b"not a png")
    line = _one_error_line(_cli("certify", "--engine", digits_engine, "--data", folder, *DIGITS_SMALL, "--out", tmp_path / "bad.tsv"))
    assert "cannot read image 1" in line and "\\udcfe.png" in line, line
