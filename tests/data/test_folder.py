"""Class-per-folder reader (``ssl_zoo.data.folder``): the same samples as torchvision's ``ImageFolder``, SimCLR's
subset lists (``1percent.txt`` / ``10percent.txt``) and their errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from ssl_zoo.data import (
    ImageFolderDataset,
)
from tests.data.images import IMAGENET_WNIDS, imagenet_tree, pixels, save_solid


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nowhere")
    (tmp_path / "tree" / "empty_class").mkdir(parents=True)
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path / "tree")


def colour_of_index(index: int) -> tuple[int, int, int]:
    return (index * 17 % 256, 255 - index * 29 % 256, 100 + index * 7 % 150)


def test_index_out_of_range(tmp_path):
    files = sorted((save_solid(tmp_path / "tree" / "abc"[i] / f"{i}.png", colour_of_index(i)), i) for i in range(3))
    dataset = ImageFolderDataset(tmp_path / "tree")
    with pytest.raises(IndexError):
        dataset[3]
    assert dataset[-1][1] == files[-1][1]


def test_image_folder_matches_torchvision(tmp_path):
    root = tmp_path / "train"
    files = [
        "b/x2.png",
        "b/x1.JPG",
        "a/nested/deep/z.png",
        "a/y.jpeg",
        "c/w.bmp",
        "c/ignored.txt",
        "b/.hidden.png",
    ]
    for i, name in enumerate(files):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".txt"):
            path.write_text("not an image")
        else:
            Image.new("RGB", (4 + i, 3), colour_of_index(i)).save(path, format="PNG")  # decoded by content
    os.symlink(root / "a" / "y.jpeg", root / "c" / "linked.jpeg")
    ours = ImageFolderDataset(root)
    theirs = ImageFolder(str(root))
    assert ours.classes == theirs.classes == ["a", "b", "c"]
    assert ours.class_to_idx == theirs.class_to_idx
    assert ours.samples == theirs.samples and ours.targets == theirs.targets
    assert len(ours) == len(theirs) == 7
    for index in range(len(theirs)):
        image, label = ours[index]
        reference, reference_label = theirs[index]
        assert label == reference_label
        assert np.array_equal(pixels(image), pixels(reference))


def test_subset_list_keeps_the_listed_images_with_the_full_trees_labels(tmp_path):
    imagenet_tree(tmp_path)
    # SimCLR's format (bare file names), a relative path, blank lines; nothing from the second class
    (tmp_path / "1percent.txt").write_text("n01484850_101.JPEG\n\nn01440764/n01440764_100.JPEG\nn01484850_103.JPEG\n")
    full = ImageFolderDataset(tmp_path / "train")
    subset = ImageFolderDataset(tmp_path / "train", subset=tmp_path / "1percent.txt")
    assert subset.classes == full.classes == IMAGENET_WNIDS  # class indices of the whole tree
    assert [(Path(p).name, label) for p, label in subset.samples] == [
        ("n01440764_100.JPEG", 0), ("n01484850_101.JPEG", 2), ("n01484850_103.JPEG", 2)]  # the tree's order
    for i in range(len(subset)):
        image, label = subset[i]
        assert image.size == (32, 32) and label == subset.targets[i]


def test_subset_list_errors_name_the_file_and_line(tmp_path):
    imagenet_tree(tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_text("n01440764_100.JPEG\nn01440764_999.JPEG\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2: 'n01440764_999\.JPEG' is not an image under"):
        ImageFolderDataset(tmp_path / "train", subset=bad)
    bad.write_text("n01440764_100.JPEG\nn01440764_101.JPEG\nn01440764_100.JPEG\n")
    with pytest.raises(ValueError, match=r"bad\.txt:3: .* listed twice \(first on line 1\)"):
        ImageFolderDataset(tmp_path / "train", subset=bad)
    with pytest.raises(FileNotFoundError, match="subset list"):
        ImageFolderDataset(tmp_path / "train", subset=tmp_path / "10percent.txt")
