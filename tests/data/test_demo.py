"""The demo generator (``ssl_zoo.data.demo``): deterministic under its seed, its layouts (COCO JSON, Tencent
lists, folders) agree and are read by every reader, its objects are visible and distinct, its command line."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_zoo.data import (
    CocoMultiLabel,
    ImageFolderDataset,
    TencentML,
    read_tencent_dictionary,
)
from ssl_zoo.data.demo import main, make_demo_dataset
from ssl_zoo.data.demo_images import DEMO_CLASSES, SUPERCLASSES, _draw_object
from tests.data.images import pixels

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
