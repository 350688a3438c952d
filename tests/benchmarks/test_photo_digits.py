"""The quality benchmark's second dataset (``benchmarks/photo_digits.py``): real digits in front of real
photographs, disjoint between the splits, deterministic, in the layouts the benchmark reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import photo_digits
from benchmarks.recipes import find_views

LUMA = np.asarray([0.299, 0.587, 0.114])


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return photo_digits.make_photo_digits(tmp_path_factory.mktemp("pd") / "photo_digits", seed=0, per_class=4)


def test_every_source_is_on_disk_and_the_splits_use_disjoint_photographs():
    """No photograph (nor another view of its scene) lies behind images of both splits; all load offline."""
    assert not set(photo_digits.TRAIN_PHOTOS) & set(photo_digits.VAL_PHOTOS)
    arrays = {name: photo_digits.photograph(name) for name in (*photo_digits.TRAIN_PHOTOS, *photo_digits.VAL_PHOTOS)}
    for name, array in arrays.items():
        assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3 and min(array.shape[:2]) >= 150, name
    # The same picture under two names (scikit-image's cat is chelsea) would put one scene on both sides.
    def thumb(array: np.ndarray) -> np.ndarray:  # standardised 64 x 64 grey levels
        grey = np.asarray(Image.fromarray(array).convert("L").resize((64, 64)), dtype=np.float64)
        return (grey - grey.mean()) / grey.std()

    thumbs = {name: thumb(array) for name, array in arrays.items()}
    for train in photo_digits.TRAIN_PHOTOS:
        for val in photo_digits.VAL_PHOTOS:
            assert (thumbs[train] * thumbs[val]).mean() < 0.8, (train, val)  # correlation


def test_digit_splits_are_disjoint_stratified_and_seeded():
    from sklearn.datasets import load_digits

    targets = load_digits().target
    splits = photo_digits.split_digits(targets, seed=0)
    assert not set(splits["train"]) & set(splits["val"])
    assert len(splits["train"]) + len(splits["val"]) == len(targets) == 1797
    for digit in range(10):
        n = int((targets == digit).sum())
        assert int((targets[splits["val"]] == digit).sum()) == round(0.25 * n)
    again, other = photo_digits.split_digits(targets, seed=0), photo_digits.split_digits(targets, seed=1)
    assert np.array_equal(again["val"], splits["val"]) and not np.array_equal(other["val"], splits["val"])


def test_layout_counts_and_labels(small_set):
    """Folder view and COCO view hold the same images; every training digit twice, every validation digit once."""
    meta = json.loads((small_set / ".complete").read_text())
    assert meta["counts"] == {"train": {"images": 60, "digits": 30}, "val": {"images": 10, "digits": 10}}
    views = find_views(small_set)
    shown = {}
    assert views.folder == str(small_set / "folder") and views.coco == str(small_set)
    for split, per_class in (("train", 6), ("val", 1)):
        folders = sorted(p.name for p in (small_set / "folder" / split).iterdir())
        assert folders == [str(d) for d in range(10)]
        coco = json.loads((small_set / "annotations" / f"instances_{split}2017.json").read_text())
        category = {a["image_id"]: a["category_id"] - 1 for a in coco["annotations"]}
        photos = photo_digits.TRAIN_PHOTOS if split == "train" else photo_digits.VAL_PHOTOS
        assert {image["photo"] for image in coco["images"]} <= set(photos)
        digit_images = [image["digit_index"] for image in coco["images"]]
        assert len(digit_images) == len(set(digit_images)) * (2 if split == "train" else 1)
        shown[split] = set(digit_images)
        for image in coco["images"]:
            linked = small_set / "folder" / split / str(category[image["id"]]) / image["file_name"]
            assert linked.samefile(small_set / f"{split}2017" / image["file_name"])
        assert all(len(list((small_set / "folder" / split / d).iterdir())) == per_class for d in folders)
        with Image.open(next((small_set / f"{split}2017").iterdir())) as image:
            assert image.size == (32, 32) and image.mode == "RGB"
    assert not shown["train"] & shown["val"]  # no digit in both splits


def test_the_build_is_a_function_of_the_seed(small_set, tmp_path):
    again = photo_digits.make_photo_digits(tmp_path / "again", seed=0, per_class=4)
    for path in sorted((small_set / "train2017").iterdir()):
        assert path.read_bytes() == (again / "train2017" / path.name).read_bytes()
    other = photo_digits.make_photo_digits(tmp_path / "other", seed=1, per_class=4)
    assert (other / "val2017" / "000060.png").read_bytes() != (small_set / "val2017" / "000060.png").read_bytes()
    with pytest.raises(FileExistsError, match="not a photo_digits dataset"):
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("x")
        photo_digits.make_photo_digits(tmp_path / "mine", per_class=1)


def test_the_digit_is_large_central_and_in_contrasting_ink():
    """Box of about half to three quarters of the side, near the centre; the ink differs from the background
    under it by more than 100 grey levels whatever the background."""
    from sklearn.datasets import load_digits

    cells = load_digits().images
    sides, centres = [], []
    for index in range(200):
        _, (x, y, w, h), photo = photo_digits.render_image(0, "train", index, cells[index])
        assert photo in photo_digits.TRAIN_PHOTOS
        sides.append(max(w, h))
        centres.append((x + w / 2 - 16, y + h / 2 - 16))
    assert 12 <= min(sides) and max(sides) <= 30 and 17 <= float(np.median(sides)) <= 24
    assert np.abs(np.asarray(centres)).max() <= 5.0
    rng = np.random.default_rng(0)
    for background in (0.0, 60.0, 127.0, 128.0, 200.0, 255.0):
        ink = float(photo_digits.ink_colour(rng, background) @ LUMA)
        assert abs(ink - background) > 100 or (background in (127.0, 128.0) and abs(ink - background) > 70)


# ============================================================================ evidence for the misses
def test_crop_statistics_of_an_object_filling_the_image_are_the_crop_areas():
    """An object box covering the whole image keeps exactly the crop's area share, never below min_scale."""
    from benchmarks.quality_misses import crop_statistics

    stats = crop_statistics([[0.0, 0.0, 32.0, 32.0, 32]], min_scale=0.5)
    assert stats["kept_half_or_more"] == 100.0 and 50.0 <= stats["mean_kept"] < 100.0
    # A 1-px object in a corner is mostly cut off by small crops.
    corner = crop_statistics([[0.0, 0.0, 1.0, 1.0, 32]], min_scale=0.2)
    assert corner["mean_kept"] < 50.0
    # The object's side in the 32 px view: a 16 px object seen in a crop of 16-32 px grows to 16-32 px.
    centre = crop_statistics([[8.0, 8.0, 16.0, 16.0, 32]], min_scale=0.25)
    assert 16.0 <= centre["object_side_px"] <= 32.0


def test_neighbour_shares_against_hand_made_clusters():
    """Two tight clusters of 5: each point's 4 nearest others are its cluster; chance = sum n(n-1) / N(N-1)."""
    from benchmarks.quality_misses import neighbour_shares

    torch.manual_seed(0)
    features = torch.cat([torch.tensor([[1.0, 0.0]]) + 0.01 * torch.randn(5, 2),
                          torch.tensor([[0.0, 1.0]]) + 0.01 * torch.randn(5, 2)])
    assert neighbour_shares(features, ["a"] * 5 + ["b"] * 5, k=4) == (100.0, round(100 * 40 / 90, 1))
    # Labels across the clusters (a b a b a | b a b a b): an "a" of the first cluster finds 2 of its 4 neighbours
    # alike, a "b" 1; (3 x 2 + 2 x 1) / 20 = 40 % in each cluster, below chance.
    assert neighbour_shares(features, ["a", "b"] * 5, k=4) == (40.0, round(100 * 40 / 90, 1))
