"""COCO multi-label reader (``ssl_zoo.data.coco``): targets in ascending category-id order against an
independent reading of the JSON, annotated-only filtering, and broken annotations named by file and key."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from ssl_zoo.data import (
    BadImageError,
    CocoMultiLabel,
)
from tests.data.images import colour_encoding, index_from_colour, pixels, save_solid


def _coco(tmp_path: Path) -> tuple[Path, Path, dict]:
    """Three images (ids 42, 7, 100), three categories listed out of id order, image 100 unannotated."""
    images = [{"id": i, "file_name": f"{i}.png", "width": 6, "height": 4} for i in (42, 7, 100)]
    annotations = [
        {"id": 1, "image_id": 42, "category_id": 18},
        {"id": 2, "image_id": 42, "category_id": 1},
        {"id": 3, "image_id": 7, "category_id": 90},
        {"id": 4, "image_id": 7, "category_id": 90},
    ]
    categories = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]
    data = {"images": images, "annotations": annotations, "categories": categories}
    root = tmp_path / "images"
    for image in images:
        save_solid(root / image["file_name"], colour_encoding(image["id"]))
    ann = tmp_path / "instances_test.json"
    ann.write_text(json.dumps(data))
    return root, ann, data


# Each case breaks the fixture in one way; the error must name the file and the offending key.
COCO_BREAKAGES = {
    "no images": (lambda d: d.pop("images"), "the top level has no 'images' key"),
    "no annotations": (lambda d: d.pop("annotations"), "the top level has no 'annotations' key"),
    "no categories": (lambda d: d.pop("categories"), "the top level has no 'categories' key"),
    "images not a list": (lambda d: d.update(images={}), "'images' must be a list, got dict"),
    "no file_name": (lambda d: d["images"][1].pop("file_name"), "images[1] has no 'file_name'"),
    "empty file_name": (lambda d: d["images"][1].update(file_name=""), "images[1]['file_name'] must be a non-empty"),
    "no image id": (lambda d: d["images"][0].pop("id"), "images[0] has no 'id'"),
    "mixed id types": (lambda d: d["images"][0].update(id="42"), "image 'id' values must all be integers"),
    "no category_id": (lambda d: d["annotations"][2].pop("category_id"), "annotations[2] has no 'category_id'"),
    "no category name": (lambda d: d["categories"][1].pop("name"), "categories[1] has no 'name'"),
    "unknown category": (lambda d: d["annotations"][0].update(category_id=3), "annotations[0]['category_id'] = 3"),
    "unknown image": (lambda d: d["annotations"][3].update(image_id=5), "annotations[3]['image_id'] = 5"),
    "duplicate image id": (lambda d: d["images"][2].update(id=42), "images[2] repeats image id 42"),
    "duplicate category id": (lambda d: d["categories"][2].update(id=1), "categories[2] repeats category id 1"),
    "annotation not an object": (lambda d: d["annotations"].append([1, 2]), "annotations[4] must be a JSON object"),
}


@pytest.mark.parametrize("case", list(COCO_BREAKAGES))
def test_coco_validation_names_file_and_key(tmp_path, case):
    root, ann, data = _coco(tmp_path)
    mutate, message = COCO_BREAKAGES[case]
    mutate(data)
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        CocoMultiLabel(root, ann)
    assert "instances_test.json" in str(info.value)


def test_coco_not_json_names_the_file(tmp_path):
    root, ann, _ = _coco(tmp_path)
    ann.write_text('{"images": [')  # an interrupted download
    with pytest.raises(ValueError, match=r"instances_test\.json: not valid JSON"):
        CocoMultiLabel(root, ann)


def test_coco_validate_files_names_the_image_id(tmp_path):
    root, ann, _ = _coco(tmp_path)
    CocoMultiLabel(root, ann, validate_files=True)
    (root / "100.png").unlink()
    CocoMultiLabel(root, ann)  # not checked by default
    with pytest.raises(FileNotFoundError, match=r"1 of 3 images listed in '.*instances_test\.json' do not exist, "
                                                 r"e\.g\. image id 100: '.*100\.png'"):
        CocoMultiLabel(root, ann, validate_files=True)


def test_coco_skip_returns_the_substitute_with_its_own_target(tmp_path):
    root, ann, _ = _coco(tmp_path)
    (root / "7.png").write_bytes(b"")  # image id 7, first in id order
    dataset = CocoMultiLabel(root, ann, transform=lambda im: index_from_colour(pixels(im)[0, 0]), on_bad_sample="skip")
    image_id, target = dataset[0]
    assert image_id == 42 and dataset.image_ids[1] == 42
    # categories in ascending id order: person (1), dog (18), toothbrush (90); image 42 has person and dog
    assert target.tolist() == [1.0, 1.0, 0.0]
    assert dataset.num_skipped == 1 and dataset.bad_paths == [str(root / "7.png")]
    with pytest.raises(BadImageError, match="7.png"):
        CocoMultiLabel(root, ann)[0]


def colour_of_index(index: int) -> tuple[int, int, int]:
    return (index * 17 % 256, 255 - index * 29 % 256, 100 + index * 7 % 150)


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
        save_solid(root / image["file_name"], colour_of_index(image["id"]))
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
        assert pixels(image)[0, 0].tolist() == list(colour_of_index(image_id))
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
        assert pixels(image)[0, 0].tolist() == list(colour_of_index(image_id))
