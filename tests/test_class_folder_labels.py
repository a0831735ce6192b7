"""Integer-named class folders: labels follow sorted name order (torchvision's ImageFolder), and
where that differs from the folders' numbers one warning line says so. Folders are written in tmp_path."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from densepure_rt.files.data import open_dataset


def _class_folders(root, names):
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        Image.fromarray(np.full((4, 4, 3), 10 * k, np.uint8)).save(root / name / "a.png")
    return root


def test_integer_class_folders_warn_once_that_labels_follow_sorted_names(tmp_path, capsys):
    root = _class_folders(tmp_path / "data", [str(i) for i in range(11)])
    ds = open_dataset(root, image_size=4)
    # Sorted as strings: 0, 1, 10, 2, 3, ... so folder 10 is label 2 and folder 2 is label 3.
    assert [ds.classes[label] for label in ds.labels] == ["0", "1", "10", "2", "3", "4", "5", "6", "7", "8", "9"]
    assert ds.labels == list(range(11))
    assert ds[2].label == 2 and ds.files[2].parent.name == "10"
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: "), lines
    assert "folder 10 is label 2" in lines[0] and "folder 2 is label 3" in lines[0] and "00, 01, 02" in lines[0]
    open_dataset(root, image_size=4)  # once per folder
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("names", [
    [str(i) for i in range(10)],  # 0-9: every label is its folder's number
    [f"{i:02d}" for i in range(11)],  # padded: sorted names are numbers in order
    ["cat", "dog", "10"],  # not all numbers: names are not read as labels
])
def test_class_folders_whose_labels_match_their_names_or_are_not_numbers_do_not_warn(tmp_path, capsys, names):
    open_dataset(_class_folders(tmp_path / "data", names), image_size=4)
    assert capsys.readouterr().err == ""


def test_one_based_integer_class_folders_warn(tmp_path, capsys):
    open_dataset(_class_folders(tmp_path / "data", [str(i) for i in range(1, 6)]), image_size=4)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "folder 1 is label 0" in err
