"""Dense transfer readers (``ssl_zoo.transfer.data.datasets``): COCO instances (polygons, RLE, crowds), VOC's
two years with detectron2's boxes, ADE20K's reduced zero label."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from ssl_zoo.transfer.data.datasets import ADE20K, CocoInstances, VOCDetection
from ssl_zoo.transfer.data.transforms import (
    hflip_detection_target,
)


def _write_image(path: Path, w: int, h: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 128, dtype=np.uint8)).save(path)


def test_coco_instances_reads_polygons_rle_and_crowds(tmp_path):
    h, w = 20, 30
    _write_image(tmp_path / "img" / "a.jpg", w, h)
    square = np.zeros((h, w), dtype=np.uint8)
    square[2:8, 3:9] = 1
    compressed = mask_utils.encode(np.asfortranarray(square))
    compressed["counts"] = compressed["counts"].decode("ascii")
    runs = [0 * 0]  # uncompressed RLE (column-major run lengths) of the rectangle rows 10..14, columns 20..24
    flat = np.zeros((h, w), dtype=np.uint8)
    flat[10:15, 20:25] = 1
    values = flat.ravel(order="F")
    runs, current, count = [], 0, 0
    for v in values:
        if v != current:
            runs.append(count)
            current, count = v, 0
        count += 1
    runs.append(count)
    data = {
        "images": [{"id": 7, "file_name": "a.jpg", "width": w, "height": h}],
        "categories": [{"id": 9, "name": "late"}, {"id": 3, "name": "early"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 9, "bbox": [3, 2, 6, 6], "area": 36, "iscrowd": 0,
             "segmentation": compressed},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [1, 12, 10, 6], "area": 30, "iscrowd": 0,
             "segmentation": [[1, 12, 11, 12, 11, 18, 1, 18]]},
            {"id": 3, "image_id": 7, "category_id": 3, "bbox": [20, 10, 5, 5], "area": 25, "iscrowd": 1,
             "segmentation": {"size": [h, w], "counts": runs}},
            {"id": 4, "image_id": 7, "category_id": 3, "bbox": [25, 0, 0, 4], "area": 0, "iscrowd": 0,
             "segmentation": []},  # no area: dropped
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    dataset = CocoInstances(tmp_path / "img", tmp_path / "ann.json", with_masks=True)
    image, target, _, _ = dataset.load_sample(0)
    assert dataset.classes == ["early", "late"]
    assert target["labels"].tolist() == [2, 1, 1]  # category 9 -> label 2, 3 -> 1
    assert target["iscrowd"].tolist() == [0, 0, 1]
    assert torch.equal(target["masks"][0], torch.from_numpy(square))
    assert target["masks"][1].sum() > 0 and target["masks"][1][12:18, 1:11].float().mean() > 0.8
    assert torch.equal(target["masks"][2], torch.from_numpy(flat))
    assert target["boxes"][1].tolist() == [1, 12, 11, 18]
    flipped = hflip_detection_target(target, w)
    assert flipped["boxes"][0].tolist() == [w - 9, 2, w - 3, 8]
    assert torch.equal(flipped["masks"][0], torch.from_numpy(square[:, ::-1].copy()))


def test_voc_reads_two_years_with_detectron2_boxes(tmp_path):
    for year, names in (("2007", ["000001"]), ("2012", ["2008_000002", "2008_000003"])):
        base = tmp_path / f"VOC{year}"
        (base / "ImageSets" / "Main").mkdir(parents=True)
        (base / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(names) + "\n")
        (base / "Annotations").mkdir()
        for name in names:
            _write_image(base / "JPEGImages" / f"{name}.jpg", 50, 40)
            (base / "Annotations" / f"{name}.xml").write_text(
                "<annotation><object><name>dog</name><difficult>1</difficult><bndbox><xmin>5</xmin><ymin>6</ymin>"
                "<xmax>20</xmax><ymax>30</ymax></bndbox></object><object><name>person</name><bndbox><xmin>1</xmin>"
                "<ymin>1</ymin><xmax>50</xmax><ymax>40</ymax></bndbox></object></annotation>")
    dataset = VOCDetection(tmp_path, "2007-trainval+2012-trainval")
    assert len(dataset) == 3
    _, target, _, _ = dataset.load_sample(2)
    assert target["boxes"].tolist() == [[4, 5, 20, 30], [0, 0, 50, 40]]
    assert target["labels"].tolist() == [12, 15] and target["difficult"].tolist() == [1, 0]
    with pytest.raises(FileNotFoundError, match="2007-test"):
        VOCDetection(tmp_path, "2007-test")


def test_ade20k_reduce_zero_label_and_bad_label(tmp_path):
    for split in ("training",):
        _write_image(tmp_path / "images" / split / "a.jpg", 6, 4)
        label = np.array([[0, 1, 2, 3, 0, 1]] * 4, dtype=np.uint8)
        (tmp_path / "annotations" / split).mkdir(parents=True)
        Image.fromarray(label).save(tmp_path / "annotations" / split / "a.png")
    _, target, _, _ = ADE20K(tmp_path, "training", num_classes=3).load_sample(0)
    assert target[0].tolist() == [255, 0, 1, 2, 255, 0]
    with pytest.raises(ValueError, match="outside the 2 classes"):
        ADE20K(tmp_path, "training", num_classes=2).load_sample(0)
