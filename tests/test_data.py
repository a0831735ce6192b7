"""Data readers: every format is written here in miniature, then read back value for value."""

import io
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from densepure_rt import data
from densepure_rt.data import Sample, check_image, open_dataset, select
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
        "import sys, densepure_rt.data; "
        "heavy = [m for m in ('torch', 'torchvision') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
