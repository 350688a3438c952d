"""Dataset readers and the demo generator (broken images and annotations: ``test_robustness.py``).

Fixtures are written into ``tmp_path`` by each test; expected values come from independent
computations (plain loops, numpy, torchvision's ImageFolder), never from the code under test.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from ssl_zoo.data import (
    CocoMultiLabel,
    ImageFolderDataset,
    TencentClass,
    TencentML,
    image_list,
    parse_tencent_line,
    read_tencent_dictionary,
)
from ssl_zoo.data.demo import main, make_demo_dataset
from ssl_zoo.data.demo_images import DEMO_CLASSES, SUPERCLASSES, _draw_object


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


def save_solid(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (6, 4)) -> Path:
    """A lossless solid-colour image: its colour identifies it after loading."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="PNG")  # lossless whatever the suffix
    return path


def colour_of(index: int) -> tuple[int, int, int]:
    return (index * 17 % 256, 255 - index * 29 % 256, 100 + index * 7 % 150)


def test_index_out_of_range(tmp_path):
    files = sorted((save_solid(tmp_path / "tree" / "abc"[i] / f"{i}.png", colour_of(i)), i) for i in range(3))
    dataset = ImageFolderDataset(tmp_path / "tree")
    with pytest.raises(IndexError):
        dataset[3]
    assert dataset[-1][1] == files[-1][1]


# ============================================================================ COCO
CATEGORIES = [  # listed out of id order on purpose
    {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
]


def _coco_fixture(tmp_path: Path) -> tuple[Path, Path, dict]:
    images = [
        {"id": 42, "file_name": "a.png", "width": 6, "height": 4},
        {"id": 7, "file_name": "b.png", "width": 6, "height": 4},
        {"id": 100, "file_name": "empty.png", "width": 6, "height": 4},  # no annotations
    ]
    annotations = [
        {"id": 1, "image_id": 42, "category_id": 18, "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 0},
        {"id": 2, "image_id": 42, "category_id": 1, "bbox": [0, 0, 3, 3], "area": 9, "iscrowd": 1},
        {"id": 3, "image_id": 7, "category_id": 90, "bbox": [1, 1, 2, 2], "area": 4, "iscrowd": 0},
        {"id": 4, "image_id": 7, "category_id": 90, "bbox": [2, 1, 2, 2], "area": 4, "iscrowd": 0},
    ]
    data = {"info": {}, "images": images, "annotations": annotations, "categories": copy.deepcopy(CATEGORIES)}
    root = tmp_path / "images"
    for image in images:
        save_solid(root / image["file_name"], colour_of(image["id"]))
    ann = tmp_path / "instances_test.json"
    ann.write_text(json.dumps(data))
    return root, ann, data


def _coco_reference(data: dict) -> tuple[list[int], list[str], dict[int, list[float]]]:
    ids = sorted(c["id"] for c in data["categories"])
    names = [next(c["name"] for c in data["categories"] if c["id"] == i) for i in ids]
    targets = {}
    for image in data["images"]:
        row = [0.0] * len(ids)
        for a in data["annotations"]:
            if a["image_id"] == image["id"]:
                row[ids.index(a["category_id"])] = 1.0
        targets[image["id"]] = row
    return ids, names, targets


def test_coco_targets_follow_ascending_category_ids(tmp_path):
    root, ann, data = _coco_fixture(tmp_path)
    dataset = CocoMultiLabel(root, ann)
    ids, names, targets = _coco_reference(data)
    assert dataset.categories == names == ["person", "dog", "toothbrush"]
    assert dataset.category_ids == ids and dataset.num_classes == 3
    assert len(dataset) == 3
    assert dataset.targets.shape == (3, 3) and dataset.targets.dtype == torch.float32
    for index, image_id in enumerate(dataset.image_ids):
        image, target = dataset[index]
        assert target.dtype == torch.float32 and target.tolist() == targets[image_id]
        assert dataset.targets[index].tolist() == targets[image_id]
        assert pixels(image)[0, 0].tolist() == list(colour_of(image_id))
    by_id = dict(zip(dataset.image_ids, dataset.targets.tolist(), strict=True))
    assert by_id[42] == [1.0, 1.0, 0.0]  # iscrowd person counts
    assert by_id[100] == [0.0, 0.0, 0.0]  # kept, all zero
    target = dataset[0][1]
    target += 5
    assert dataset[0][1].max() <= 1  # items are copies of the table


def test_coco_annotated_only_drops_background_only_images(tmp_path):
    root, ann, data = _coco_fixture(tmp_path)
    _, _, targets = _coco_reference(data)
    dataset = CocoMultiLabel(root, ann, annotated_only=True)
    annotated = sorted({a["image_id"] for a in data["annotations"]})
    assert dataset.image_ids == annotated == [7, 42]
    for index, image_id in enumerate(dataset.image_ids):  # targets and pixels stay with their image
        image, target = dataset[index]
        assert target.tolist() == targets[image_id]
        assert pixels(image)[0, 0].tolist() == list(colour_of(image_id))


# ============================================================================ Tencent ML-Images
def test_parse_tencent_line_forms():
    assert parse_tencent_line("17382017900_f7152f6e1c_o.jpg\t940:0.8\t860:0.8\t17:1\t1:1\n") == (
        "17382017900_f7152f6e1c_o.jpg",
        [(940, 0.8), (860, 0.8), (17, 1.0), (1, 1.0)],
    )
    assert parse_tencent_line(
        "https://c4.staticflickr.com/8/7239/6997334729_e5fb3938b1_o.jpg  3:1  5193:0.9   5851:0.9 9413:1\r\n"
    ) == ("6997334729_e5fb3938b1_o.jpg", [(3, 1.0), (5193, 0.9), (5851, 0.9), (9413, 1.0)])
    assert parse_tencent_line("n04310904/n04310904_8388.JPEG 1053 1193:0.8 7") == (
        "n04310904/n04310904_8388.JPEG",
        [(1053, 1.0), (1193, 0.8), (7, 1.0)],
    )
    assert parse_tencent_line("my photo.jpg\t5:1.0 6:0.9") == ("my photo.jpg", [(5, 1.0), (6, 0.9)])
    assert parse_tencent_line("only_path.jpg") == ("only_path.jpg", [])
    assert parse_tencent_line("http://example.com/a/my%20pic.jpg?size=2#top 4") == ("my pic.jpg", [(4, 1.0)])


TENCENT_LIST = (
    "n04310904/n04310904_8388.JPEG\t3:1\t1:0.9\n"
    "https://c2.staticflickr.com/4/3035/3033882900_a9a4263c55_o.jpg  5:0.8  2:0.8   7\n"
    "\n"
    "plain.jpg\t0:1\t6:1.0\t4:0.95\t4:0.7\n"
    "nolabels.jpg\n"
)


def _tencent_fixture(tmp_path: Path, text: str = TENCENT_LIST) -> tuple[Path, Path]:
    root = tmp_path / "root"
    names = ["n04310904/n04310904_8388.JPEG", "3033882900_a9a4263c55_o.jpg", "plain.jpg", "nolabels.jpg"]
    for i, name in enumerate(names):
        save_solid(root / name, colour_of(i), size=(5, 5))
        # .JPEG suffix with PNG content: Pillow detects the format from the bytes, not the name
    listing = tmp_path / "list.txt"
    listing.write_text(text)
    return root, listing


def _tencent_reference(text: str, num_classes: int, min_confidence=None, soft=False) -> list[list[float]]:
    rows = []
    for line in text.splitlines():
        fields = line.replace("\t", " ").split()
        if not fields:
            continue
        row = [0.0] * num_classes
        for token in fields[1:]:
            label, _, conf = token.partition(":")
            c = float(conf) if conf else 1.0
            if min_confidence is None or c >= min_confidence:
                row[int(label)] = max(row[int(label)], c if soft else 1.0)
        rows.append(row)
    return rows


@pytest.mark.parametrize("min_confidence, soft", [(None, False), (None, True), (0.9, False), (0.85, True)])
def test_tencent_targets(tmp_path, min_confidence, soft):
    root, listing = _tencent_fixture(tmp_path)
    dataset = TencentML(root, listing, num_classes=8, min_confidence=min_confidence, soft_targets=soft)
    reference = _tencent_reference(TENCENT_LIST, 8, min_confidence, soft)
    assert len(dataset) == 4
    for index in range(4):
        image, target = dataset[index]
        assert target.shape == (8,) and target.dtype == torch.float32
        assert torch.allclose(target, torch.tensor(reference[index])), (index, target, reference[index])
        assert pixels(image)[0, 0].tolist() == list(colour_of(index))
    assert torch.allclose(dataset.targets, torch.tensor(reference))
    assert dataset.paths[1] == os.path.join(str(root), "3033882900_a9a4263c55_o.jpg")


def test_tencent_empty_list_and_path_array(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    dataset = TencentML(tmp_path, tmp_path / "empty.txt", num_classes=4)
    assert len(dataset) == 0 and dataset.targets.shape == (0, 4)
    paths = image_list.PathArray(iter(["a", "dossier/é.jpg", "", "z"]))
    assert list(paths) == ["a", "dossier/é.jpg", "", "z"] and paths[-3] == "dossier/é.jpg"
    with pytest.raises(IndexError):
        paths[4]


def test_parse_tencent_url_file_names():
    """A URL stands for its basename, or for <last directory>_<basename> as the release's
    download_urls_multithreading.py names the file (url.split('/')[-2] + '_' + url.split('/')[-1])."""
    url = "https://c4.staticflickr.com/8/7239/6997334729_e5fb3938b1_o.jpg  3:1  5193:0.9"
    assert parse_tencent_line(url)[0] == "6997334729_e5fb3938b1_o.jpg"
    parts = url.split()[0].split("/")
    assert parse_tencent_line(url, url_file_name="parent_basename") == (
        f"{parts[-2]}_{parts[-1]}", [(3, 1.0), (5193, 0.9)])
    assert parse_tencent_line("n04310904/n04310904_8388.JPEG 1", url_file_name="parent_basename")[0] == (
        "n04310904/n04310904_8388.JPEG")  # not a URL: kept as it is


# The two parts of the release, each listed relative to its own image folder.
IMAGENET_PART = "n01/n01_1.JPEG\t3:1\t1:1\n\nn02/n02_7.JPEG 2:1 1:0.9\n"
OPENIMAGES_PART = ("https://c1.staticflickr.com/4/3593/5715926508_bb4fe6d4bc_o.jpg  5:0.9  4:1\n"
                   "https://c2.staticflickr.com/4/3035/3033882900_a9a4263c55_o.jpg\t0:1\n")


def _two_part_fixture(tmp_path: Path) -> tuple[list[Path], list[Path], list[Path]]:
    roots = [tmp_path / "imagenet", tmp_path / "openimages"]
    files = [roots[0] / "n01/n01_1.JPEG", roots[0] / "n02/n02_7.JPEG",
             roots[1] / "3593_5715926508_bb4fe6d4bc_o.jpg", roots[1] / "3035_3033882900_a9a4263c55_o.jpg"]
    for i, path in enumerate(files):
        save_solid(path, colour_of(i), size=(5, 5))
    lists = [tmp_path / "train_image_id_from_imagenet.txt", tmp_path / "train_urls_from_openimages.txt"]
    lists[0].write_text(IMAGENET_PART)
    lists[1].write_text(OPENIMAGES_PART)
    return roots, lists, files


def test_tencent_several_lists_each_with_its_image_root(tmp_path):
    roots, lists, files = _two_part_fixture(tmp_path)
    dataset = TencentML(roots, lists, num_classes=6, url_file_name="parent_basename", soft_targets=True)
    reference = _tencent_reference(IMAGENET_PART + OPENIMAGES_PART, 6, soft=True)
    assert len(dataset) == 4 and list(dataset.list_offsets) == [0, 2, 4]
    assert [dataset.paths[i] for i in range(4)] == [str(f) for f in files]
    for index in range(4):
        image, target = dataset[index]
        assert pixels(image)[0, 0].tolist() == list(colour_of(index))
        assert torch.allclose(target, torch.tensor(reference[index])), index
    # One folder for every list is also accepted; a count of folders that fits neither form is not.
    assert len(TencentML(tmp_path, lists[:1], num_classes=6)) == 2
    with pytest.raises(ValueError, match="one folder for all lists or one per list"):
        TencentML([tmp_path, tmp_path, tmp_path], lists, num_classes=6)
    with pytest.raises(ValueError, match="url_file_name"):
        TencentML(roots, lists, num_classes=6, url_file_name="stem")


def test_tencent_several_lists_name_the_list_and_line_at_fault(tmp_path):
    roots, lists, files = _two_part_fixture(tmp_path)
    files[1].unlink()  # the ImageNet list's line 3 (line 2 is blank)
    files[3].unlink()  # the Open Images list's line 2
    with pytest.raises(FileNotFoundError) as info:
        TencentML(roots, lists, num_classes=6, url_file_name="parent_basename", validate_files=True)
    message = str(info.value)
    assert "2 of 4 images" in message
    assert f"{lists[0]}:3: '{files[1]}'" in message and f"{lists[1]}:2: '{files[3]}'" in message
    # With the basename reading the Open Images files are not found under their download names.
    with pytest.raises(FileNotFoundError, match=f"{lists[1]}:1: "):
        TencentML(roots, lists, num_classes=6, validate_files=True)
    lists[1].write_text(OPENIMAGES_PART + "a.jpg\t9:1\n")
    with pytest.raises(ValueError, match=rf"{lists[1]}:3: label index 9 is outside \[0, 6\)"):
        TencentML(roots, lists, num_classes=6)


DICTIONARY_CLASSES = [
    TencentClass(0, "n00002452", -1, "thing"),
    TencentClass(1, "n00020827", 0, "matter"),
    TencentClass(2, "n07697537", 1, "hotdog, hot dog, red hot"),
    TencentClass(3, "n04310904", 0, "stethoscope"),
]


def test_read_tencent_dictionary_three_columns(tmp_path):
    path = tmp_path / "dictionary_and_semantic_hierarchy.txt"
    path.write_text("".join(f"{c.wnid}\t{c.parent}\t{c.name}\n" for c in DICTIONARY_CLASSES))
    assert read_tencent_dictionary(path) == DICTIONARY_CLASSES


@pytest.mark.parametrize("separator, header", [("\t", True), (" ", True), ("  ", True), ("\t", False)])
def test_read_tencent_dictionary_four_columns(tmp_path, separator, header):
    path = tmp_path / "dictionary_and_semantic_hierarchy.txt"
    lines = ["category_index category_id index_of_parent_category category name\n"] if header else []
    for c in reversed(DICTIONARY_CLASSES):  # order in the file does not matter: the index column does
        lines.append(separator.join([str(c.index), c.wnid, str(c.parent), c.name]) + "\n")
    path.write_text("".join(lines))
    classes = read_tencent_dictionary(path)
    assert classes == DICTIONARY_CLASSES
    assert [c.index for c in classes] == list(range(4))


@pytest.mark.parametrize(
    "text, message",
    [
        ("0\tn1\t-1\tthing\n2\tn2\t0\tother\n", "index 1 is missing"),
        ("n1\t-1\tthing\nn2\t5\tother\n", r"parent 5, outside \[-1, 2\)"),
        ("n1\t-1\tthing\nn2\tx\tother\n", ":2: class and parent indices must be integers"),
        ("n1\t-1\tthing\nn2\n", ":2: expected 3 columns"),
    ],
)
def test_read_tencent_dictionary_errors(tmp_path, text, message):
    path = tmp_path / "dictionary.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        read_tencent_dictionary(path)
    assert "dictionary.txt" in str(info.value)


# ============================================================================ class-per-folder
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
            Image.new("RGB", (4 + i, 3), colour_of(i)).save(path, format="PNG")  # decoded by content
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


# ============================================================================ demo dataset
NUM_TRAIN, NUM_VAL, SIZE = 14, 12, 48


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_dataset(
        tmp_path_factory.mktemp("demo") / "demo", NUM_TRAIN, NUM_VAL, SIZE, seed=0, workers=1
    )


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_is_deterministic_and_depends_on_seed(demo, tmp_path):
    again = make_demo_dataset(tmp_path / "again", NUM_TRAIN, NUM_VAL, SIZE, seed=0, workers=1)
    first, second = _tree(demo), _tree(again)
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first)
    other = make_demo_dataset(tmp_path / "other", NUM_TRAIN, NUM_VAL, SIZE, seed=1, workers=1)
    changed = _tree(other)
    assert changed["annotations/instances_train2017.json"] != first["annotations/instances_train2017.json"]
    assert changed["train2017/000000000001.jpg"] != first["train2017/000000000001.jpg"]


def test_demo_layout_and_coco_json(demo):
    assert (demo / ".complete").is_file() and (demo / "README.txt").read_text().startswith("ssl_zoo demo")
    assert not (demo.parent / ".demo.partial").exists()
    for split, count, first_id in (("train", NUM_TRAIN, 1), ("val", NUM_VAL, NUM_TRAIN + 1)):
        data = json.loads((demo / "annotations" / f"instances_{split}2017.json").read_text())
        assert set(data) >= {"info", "images", "annotations", "categories"}
        ids = [c["id"] for c in data["categories"]]
        assert ids == sorted(ids) and ids != list(range(1, len(ids) + 1))  # non-contiguous, like COCO
        assert [c["name"] for c in data["categories"]] == [c.name for c in DEMO_CLASSES]
        assert [im["id"] for im in data["images"]] == list(range(first_id, first_id + count))
        annotated = {a["image_id"] for a in data["annotations"]}
        assert any(im["id"] not in annotated for im in data["images"])  # background-only images exist
        for image in data["images"]:
            assert (demo / f"{split}2017" / image["file_name"]).is_file()
            assert image["width"] == image["height"] == SIZE
        for a in data["annotations"]:
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= SIZE and y + h <= SIZE
            assert 0 < a["area"] <= w * h and a["iscrowd"] == 0
            for polygon in a["segmentation"]:
                xs, ys = polygon[0::2], polygon[1::2]
                # The polygon outlines the drawn shape: its extent matches the box within a pixel.
                assert (
                    min(xs) > x - 1.5
                    and max(xs) < x + w + 1.5
                    and min(ys) > y - 1.5
                    and max(ys) < y + h + 1.5
                )
        counts: dict[int, int] = {}
        for a in data["annotations"]:
            counts[a["image_id"]] = counts.get(a["image_id"], 0) + 1
        assert max(counts.values()) <= 4


def _demo_views(demo: Path, split: str):
    """Per-image labels as each of the three formats states them, parsed independently here."""
    data = json.loads((demo / "annotations" / f"instances_{split}2017.json").read_text())
    cat_name = {c["id"]: c["name"] for c in data["categories"]}
    coco: dict[str, set[str]] = {}
    single: dict[str, str] = {}  # images showing exactly one object -> its class
    for image in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        coco[image["file_name"]] = {cat_name[a["category_id"]] for a in anns}
        if len(anns) == 1:
            single[image["file_name"]] = cat_name[anns[0]["category_id"]]
    dictionary = [
        line.split("\t")
        for line in (demo / "tencent" / "dictionary_and_semantic_hierarchy.txt").read_text().splitlines()
    ]
    tencent: dict[str, dict[str, float]] = {}
    for line in (demo / "tencent" / f"{split}.txt").read_text().splitlines():
        path, *pairs = line.split("\t")
        assert path.startswith(f"{split}2017/")
        tencent[path.split("/", 1)[1]] = {
            dictionary[int(p.split(":")[0])][2]: float(p.split(":")[1]) for p in pairs
        }
    folder = {p.name: p.parent.name for p in (demo / "folder" / split).glob("*/*.jpg")}
    return coco, single, tencent, folder, dictionary


@pytest.mark.parametrize("split", ["train", "val"])
def test_demo_views_agree(demo, split):
    coco, single, tencent, folder, dictionary = _demo_views(demo, split)
    parent_of = {name: dictionary[int(parent)][2] for _, parent, name in dictionary if int(parent) >= 0}
    assert [row[2] for row in dictionary] == list(SUPERCLASSES) + [c.name for c in DEMO_CLASSES]
    assert coco.keys() == tencent.keys()
    for name, classes in coco.items():
        leaves = {k for k, v in tencent[name].items() if v == 1.0}
        parents = {k for k, v in tencent[name].items() if v == 0.9}
        assert leaves == classes, name
        assert parents == {parent_of[c] for c in classes}, name
        assert set(tencent[name]) == leaves | parents
    assert folder == single  # the single-label view: the images with one object, labelled by it
    assert set(folder.values()) == {c.name for c in DEMO_CLASSES}  # every class present in both splits
    for name, cls in folder.items():
        assert (demo / "folder" / split / cls / name).read_bytes() == (
            demo / f"{split}2017" / name
        ).read_bytes()


def test_demo_is_read_by_every_reader(demo):
    coco = CocoMultiLabel(
        demo / "val2017", demo / "annotations" / "instances_val2017.json", validate_files=True
    )
    dictionary = read_tencent_dictionary(demo / "tencent" / "dictionary_and_semantic_hierarchy.txt")
    tencent = TencentML(demo, demo / "tencent" / "val.txt", num_classes=len(dictionary), validate_files=True)
    leaves_only = TencentML(
        demo, demo / "tencent" / "val.txt", num_classes=len(dictionary), min_confidence=1.0
    )
    folder = ImageFolderDataset(demo / "folder" / "val")
    assert coco.num_classes == len(DEMO_CLASSES) == len(dictionary) - len(SUPERCLASSES)
    assert len(coco) == len(tencent) == NUM_VAL
    tencent_column = [next(c.index for c in dictionary if c.name == name) for name in coco.categories]
    for index in range(NUM_VAL):
        image, target = coco[index]
        assert image.mode == "RGB" and image.size == (SIZE, SIZE)
        tencent_image, tencent_target = tencent[index]
        assert np.array_equal(pixels(image), pixels(tencent_image))
        assert torch.equal(leaves_only[index][1][tencent_column], target)
        assert torch.equal(tencent_target[tencent_column], target)
    assert folder.classes == sorted(c.name for c in DEMO_CLASSES)
    coco_by_file = {os.path.basename(p): coco.targets[i] for i, p in enumerate(coco.paths)}
    for path, label in folder.samples:
        assert coco_by_file[os.path.basename(path)][coco.categories.index(folder.classes[label])] == 1


def test_datasets_survive_pickling(demo):
    # DataLoader workers started with "spawn" (macOS, Windows, some DDP launchers) receive a pickled copy.
    datasets = [
        CocoMultiLabel(demo / "train2017", demo / "annotations" / "instances_train2017.json"),
        TencentML(demo, demo / "tencent" / "train.txt", num_classes=12, soft_targets=True),
        ImageFolderDataset(demo / "folder" / "train", on_bad_sample="skip"),
    ]
    for dataset in datasets:
        clone = pickle.loads(pickle.dumps(dataset))
        assert len(clone) == len(dataset) and list(clone.paths) == list(dataset.paths)
        for index in (0, len(dataset) - 1):
            (image, target), (image2, target2) = dataset[index], clone[index]
            assert np.array_equal(pixels(image), pixels(image2))
            assert torch.equal(torch.as_tensor(target), torch.as_tensor(target2))


def test_demo_placement_hides_at_most_a_quarter_of_any_object():
    from ssl_zoo.data.demo_images import _overlaps_if_placed

    def square(x0: int, side: int) -> np.ndarray:
        mask = np.zeros((8, 32), dtype=bool)
        mask[:side, x0:x0 + side] = True
        return mask

    first = square(0, 8)  # 64 px
    areas, hidden = np.array([64]), np.array([0])
    assert _overlaps_if_placed(square(6, 8), [first], areas, hidden).tolist() == [16]  # a quarter of each: fits
    assert _overlaps_if_placed(square(5, 8), [first], areas, hidden) is None  # 24 of 64: too much
    assert _overlaps_if_placed(square(6, 8), [first], areas, np.array([1])) is None  # the first is hidden already
    assert _overlaps_if_placed(square(7, 8), [first], areas, hidden).tolist() == [8]
    assert _overlaps_if_placed(square(7, 4), [first], areas, hidden).tolist() == [4]  # a quarter of its own 16
    assert _overlaps_if_placed(square(6, 4), [first], areas, hidden) is None  # half of its own: too much
    assert _overlaps_if_placed(square(0, 8), [], np.zeros(0), np.zeros(0)).tolist() == []  # the first object


def test_demo_objects_overlap_and_are_annotated_as_seen():
    """Two to four objects of 12-19 px fit a 32 px image only if they may overlap: they do, the images stay
    multi-label, and the annotations describe the visible pixels."""
    from ssl_zoo.data.demo_images import _POLYGONS, render_image

    multi = nonempty = occluded = 0
    for index in range(300):
        _, objects = render_image(0, "train", index, 32)
        nonempty += bool(objects)
        multi += len(objects) >= 2
        seen = np.zeros((32, 32), dtype=int)
        for obj in objects:
            x, y, w, h = (int(v) for v in obj["bbox"])
            assert 0 < obj["area"] <= w * h
            seen[y:y + h, x:x + w] += 1
            name = DEMO_CLASSES[obj["class_index"]].name
            occluded += name in _POLYGONS and not obj["segmentation"]
        # visible regions are disjoint: their areas sum to at most the pixels the boxes cover
        assert sum(obj["area"] for obj in objects) <= (seen > 0).sum()
    assert occluded > 0  # objects do hide one another, and a hidden one has no outline polygon
    assert multi >= 0.4 * nonempty  # designed: half of the non-empty images show two to four objects


def test_demo_class_shapes_are_distinct():
    # Learnability: two classes drawn at the same place and size never overlap by more than 80%
    # (soft IoU of the coverage masks), whatever the rotation of the second one.
    names = [c.name for c in DEMO_CLASSES]
    masks = {
        name: [_draw_object(name, 64, 32.0, 32.0, 20.0, angle) for angle in np.linspace(0, 2 * np.pi, 37)]
        for name in names
    }
    for i, a in enumerate(names):
        reference = masks[a][0]
        assert reference.sum() > 0.3 * 40 * 40 / 4, a  # a sizeable object, not a sliver
        for b in names[i + 1 :]:
            best = max(np.minimum(reference, m).sum() / np.maximum(reference, m).sum() for m in masks[b])
            assert best < 0.8, (a, b, best)


def test_demo_output_folder_rules(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("do not delete")
    with pytest.raises(FileExistsError, match="not a demo dataset"):
        make_demo_dataset(foreign, 2, 2, 32, workers=1)
    assert (foreign / "thesis.tex").read_text() == "do not delete"
    out = make_demo_dataset(tmp_path / "d", 3, 2, 32, workers=1)
    make_demo_dataset(out, 2, 2, 32, workers=1)  # a previous demo is replaced
    assert len(list((out / "train2017").iterdir())) == 2
    for kwargs, name in (
        ({"num_train": 0}, "num_train"),
        ({"size": 16}, "size"),
        ({"workers": -1}, "workers"),
        ({"seed": -1}, "seed"),
    ):
        with pytest.raises(ValueError, match=name):
            make_demo_dataset(tmp_path / "x", **{"num_train": 2, "num_val": 2, "size": 32, **kwargs})


def test_demo_command_line(tmp_path, capsys):
    assert (
        main(
            [
                "--out",
                str(tmp_path / "cli"),
                "--num-train",
                "3",
                "--num-val",
                "2",
                "--size",
                "32",
                "--seed",
                "3",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert "3 + 2 demo images" in capsys.readouterr().out
    assert (tmp_path / "cli" / ".complete").is_file()
    assert len(list((tmp_path / "cli" / "val2017").glob("*.jpg"))) == 2
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "bad"), "--num-val", "0"])
