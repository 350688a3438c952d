"""Dataset readers for dense transfer: COCO instances, Pascal VOC detection and ADE20K scene parsing.

Each reads the published layout and yields ``(image, target)`` through a joint transform (image and
annotation together, :mod:`ssl_zoo.transfer.data.transforms`), with the project's bad-sample policy
(:class:`~ssl_zoo.data.image_list.ImageListDataset`: ``on_bad_sample="raise"`` names the unreadable file,
``"skip"`` substitutes the next readable sample with its own annotation).

Detection targets follow torchvision's detection models: ``boxes`` float ``[N, 4]`` (x1, y1, x2, y2 in
continuous pixel coordinates), ``labels`` int64 ``[N]`` in ``1..C`` (0 is torchvision's background),
``iscrowd`` uint8 ``[N]``, ``area`` float ``[N]``, ``image_id`` and, with masks, ``masks`` uint8 ``[N, H, W]``.
VOC targets add ``difficult`` uint8 ``[N]``.

Per-image annotations are kept as JSON strings in one :class:`~ssl_zoo.data.image_list.PathArray` buffer, so that
forked DataLoader workers do not copy millions of Python objects.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ssl_zoo.data.decode import BadImageError
from ssl_zoo.data.image_list import ImageListDataset, PathArray, Sample

__all__ = [
    "ADE20K",
    "VOC_CLASSES",
    "CocoInstances",
    "VOCDetection",
    "decode_coco_mask",
    "parse_voc_splits",
]


class _JointDataset(ImageListDataset):
    """An :class:`ImageListDataset` whose transform takes and returns ``(image, annotation)``."""

    def read_annotation(self, index: int, image: Image.Image) -> Any:
        raise NotImplementedError

    def _read(self, index: int) -> tuple[Image.Image, Any]:
        image = self.load(index)
        return image, self.read_annotation(index, image)

    def load_sample(self, index: int) -> Sample:
        length = len(self)
        if not -length <= index < length:
            raise IndexError(f"index {index} out of range for a dataset of {length} images")
        used, (image, annotation), skipped = self.bad_sample_policy.fetch(index % length, length, self._read)
        if self.transform is not None:
            image, annotation = self.transform(image, annotation)
        return Sample(image, annotation, used, skipped)

    def target(self, index: int) -> Any:  # the annotation needs the decoded image (its size): see load_sample
        raise NotImplementedError("dense datasets return their annotation with the image (load_sample)")


# ------------------------------------------------------------------------------------------ COCO
def decode_coco_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygon list, uncompressed RLE with a ``counts`` list, or compressed RLE)
    as a ``uint8 [H, W]`` mask, the way pycocotools' ``COCO.annToMask`` decodes it."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):  # polygons: [[x1, y1, x2, y2, ...], ...], merged into one RLE
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE (iscrowd annotations)
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:  # compressed RLE
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    return mask_utils.decode(rle).astype(np.uint8)


def _has_mask(segmentation: Any) -> bool:
    return bool(segmentation) and (isinstance(segmentation, list | dict))


class CocoInstances(_JointDataset):
    """COCO ``instances_*.json``: boxes and (optionally) instance masks per image.

    Categories are numbered ``1..C`` in ascending category-id order; images are in ascending id order.
    Crowd annotations (``iscrowd: 1``) are kept with ``iscrowd = 1``: the detection module leaves them out
    of the training targets and the COCO evaluation ignores detections matched to them, as COCO does. With
    ``with_masks``, an annotation that has no segmentation cannot supervise a mask head; it is kept as an
    ignored region like a crowd (``iscrowd = 1``, its box as the mask). Boxes with no area after clipping to
    the image are dropped (torchvision's reference recipe).

    Args:
        root: image folder (e.g. ``coco/train2017``).
        ann_file: the instances JSON.
        transform: ``(PIL image, target) -> (image, target)``.
        with_masks: decode ``segmentation`` into ``masks``.
        drop_images_without_annotations: leave out images without a non-crowd annotation (detectron2's
            ``FILTER_EMPTY_ANNOTATIONS``, on for training).
        on_bad_sample: ``raise`` or ``skip``.
    """

    def __init__(self, root: str | os.PathLike, ann_file: str | os.PathLike, transform: Callable | None = None,
                 with_masks: bool = True, drop_images_without_annotations: bool = False,
                 on_bad_sample: Literal["raise", "skip"] = "raise") -> None:
        self.ann_file = os.fspath(ann_file)
        try:
            with open(self.ann_file, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{self.ann_file}: not valid JSON ({error})") from error
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise ValueError(f"{self.ann_file}: the top level has no '{key}' list")
        self.category_ids = sorted(int(c["id"]) for c in data["categories"])
        names = {int(c["id"]): c.get("name", str(c["id"])) for c in data["categories"]}
        self.classes = [names[i] for i in self.category_ids]
        label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        per_image: dict[int, list] = {}
        for n, ann in enumerate(data["annotations"]):
            for key in ("image_id", "category_id", "bbox"):
                if key not in ann:
                    raise ValueError(f"{self.ann_file}: annotations[{n}] has no '{key}' key")
            if ann["category_id"] not in label_of:
                raise ValueError(f"{self.ann_file}: annotations[{n}] (id {ann.get('id')}) names category "
                                 f"{ann['category_id']}, which is not in 'categories'")
            per_image.setdefault(int(ann["image_id"]), []).append(
                [label_of[ann["category_id"]], [float(v) for v in ann["bbox"]], int(ann.get("iscrowd", 0)),
                 float(ann.get("area", 0.0)), ann.get("segmentation") if with_masks else None])
        images = sorted(data["images"], key=lambda im: int(im["id"]))
        known = {int(im["id"]) for im in images}
        orphans = sorted(set(per_image) - known)
        if orphans:
            raise ValueError(f"{self.ann_file}: annotations refer to image ids {orphans[:5]} not in 'images'")
        if drop_images_without_annotations:
            images = [im for im in images if any(not a[2] for a in per_image.get(int(im["id"]), []))]
        self.image_ids = [int(im["id"]) for im in images]
        self.annotations = PathArray(json.dumps(per_image.get(i, []), separators=(",", ":")) for i in self.image_ids)
        self.with_masks = with_masks
        super().__init__((os.path.join(os.fspath(root), im["file_name"]) for im in images), transform, on_bad_sample)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def locate(self, indices: Sequence[int]) -> list[str]:
        return [f"image id {self.image_ids[i]}" for i in indices]

    def read_annotation(self, index: int, image: Image.Image) -> dict[str, Tensor]:
        width, height = image.size
        records = json.loads(self.annotations[index])
        labels, boxes, crowd, areas, masks = [], [], [], [], []
        for label, (x, y, w, h), iscrowd, area, segmentation in records:
            x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
            x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
            if x2 <= x1 or y2 <= y1:
                continue
            if self.with_masks:
                if _has_mask(segmentation):
                    masks.append(decode_coco_mask(segmentation, height, width))
                else:  # no outline: an ignored region, like a crowd
                    box_mask = np.zeros((height, width), dtype=np.uint8)
                    box_mask[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))] = 1
                    masks.append(box_mask)
                    iscrowd = 1
            labels.append(label)
            boxes.append([x1, y1, x2, y2])
            crowd.append(iscrowd)
            areas.append(area if area > 0 else (x2 - x1) * (y2 - y1))
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "iscrowd": torch.tensor(crowd, dtype=torch.uint8),
            "area": torch.tensor(areas, dtype=torch.float32),
            "image_id": torch.tensor(self.image_ids[index]),
        }
        if self.with_masks:
            target["masks"] = (torch.from_numpy(np.stack(masks)) if masks
                               else torch.zeros((0, height, width), dtype=torch.uint8))
        return target

    def __repr__(self) -> str:
        return f"CocoInstances({len(self)} images, {self.num_classes} classes, '{self.ann_file}')"


# ------------------------------------------------------------------------------------------ VOC
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def parse_voc_splits(splits: str | Sequence[str]) -> list[tuple[str, str]]:
    """``"2007-trainval+2012-trainval"`` (or a list of ``year-set`` items) -> ``[("2007", "trainval"), ...]``."""
    items = splits.split("+") if isinstance(splits, str) else list(splits)
    out = []
    for item in items:
        year, _, image_set = item.strip().partition("-")
        if not year or not image_set:
            raise ValueError(f"VOC split '{item}' is not of the form <year>-<image set>, e.g. 2007-trainval")
        out.append((year, image_set))
    return out


class VOCDetection(_JointDataset):
    """Pascal VOC detection from ``VOCdevkit/VOC<year>/{Annotations, JPEGImages, ImageSets/Main}``.

    Several year/image-set pairs are concatenated (``2007-trainval+2012-trainval`` for training, ``2007-test``
    for testing). Boxes are read as detectron2 reads them: the 1-based corner ``(xmin, ymin)`` minus 1, so
    a box covers ``[xmin - 1, xmax]`` in continuous coordinates. Difficult objects are kept (detectron2 trains
    on them) and flagged in ``difficult``; the VOC evaluation ignores them.

    Args:
        root: the ``VOCdevkit`` folder.
        splits: year/image-set pairs (see :func:`parse_voc_splits`).
        transform: ``(PIL image, target) -> (image, target)``.
        classes: class names in label order (VOC's 20 by default).
        on_bad_sample: ``raise`` or ``skip``.
    """

    def __init__(self, root: str | os.PathLike, splits: str | Sequence[str] = "2007-test",
                 transform: Callable | None = None, classes: Sequence[str] = VOC_CLASSES,
                 on_bad_sample: Literal["raise", "skip"] = "raise") -> None:
        self.root = Path(root)
        self.classes = list(classes)
        label_of = {name: i + 1 for i, name in enumerate(self.classes)}
        paths, annotations, self.image_names = [], [], []
        for year, image_set in parse_voc_splits(splits):
            base = self.root / f"VOC{year}"
            list_file = base / "ImageSets" / "Main" / f"{image_set}.txt"
            if not list_file.is_file():
                raise FileNotFoundError(f"VOC image set '{list_file}' does not exist (root '{self.root}', "
                                        f"split '{year}-{image_set}')")
            for line_no, line in enumerate(list_file.read_text().splitlines(), 1):
                name = line.strip()
                if not name:
                    continue
                xml_file = base / "Annotations" / f"{name}.xml"
                objects = self._parse_xml(xml_file, label_of, f"{list_file}:{line_no}")
                paths.append(str(base / "JPEGImages" / f"{name}.jpg"))
                annotations.append(json.dumps(objects, separators=(",", ":")))
                self.image_names.append(f"{year}/{name}")
        self.annotations = PathArray(annotations)
        super().__init__(paths, transform, on_bad_sample)

    @staticmethod
    def _parse_xml(xml_file: Path, label_of: dict[str, int], listed_at: str) -> list:
        try:
            tree = ET.parse(xml_file)
        except (OSError, ET.ParseError) as error:
            raise ValueError(f"{xml_file} (listed at {listed_at}): cannot read the annotation ({error})") from error
        objects = []
        for n, obj in enumerate(tree.findall("object")):
            name = (obj.findtext("name") or "").strip()
            if name not in label_of:
                raise ValueError(f"{xml_file}: object {n} has class '{name}', not one of the {len(label_of)} classes")
            box = obj.find("bndbox")
            if box is None:
                raise ValueError(f"{xml_file}: object {n} ('{name}') has no <bndbox>")
            try:
                x1, y1, x2, y2 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError) as error:
                raise ValueError(f"{xml_file}: object {n} ('{name}') has a malformed <bndbox> ({error})") from error
            difficult = int(obj.findtext("difficult") or 0)
            objects.append([label_of[name], [x1 - 1.0, y1 - 1.0, x2, y2], difficult])
        return objects

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def locate(self, indices: Sequence[int]) -> list[str]:
        return [f"image {self.image_names[i]}" for i in indices]

    def read_annotation(self, index: int, image: Image.Image) -> dict[str, Tensor]:
        records = json.loads(self.annotations[index])
        return {
            "boxes": torch.tensor([r[1] for r in records], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([r[0] for r in records], dtype=torch.int64),
            "difficult": torch.tensor([r[2] for r in records], dtype=torch.uint8),
            "iscrowd": torch.zeros(len(records), dtype=torch.uint8),
            "image_id": torch.tensor(index),
        }


# ------------------------------------------------------------------------------------------ ADE20K
class ADE20K(_JointDataset):
    """ADE20K scene parsing (``ADEChallengeData2016``): ``images/<split>/*.jpg`` and the per-pixel class PNGs
    ``annotations/<split>/*.png`` (0 = "other", 1..150 = the classes).

    With ``reduce_zero_label`` (the mmseg / BEiT convention), class ``k`` becomes ``k - 1`` and 0 becomes
    the ignore index 255, so the 150 classes are ``0..149``. Labels outside the classes stop with an error
    naming the file.

    Args:
        root: the ``ADEChallengeData2016`` folder.
        split: ``training`` or ``validation``.
        transform: ``(PIL image, uint8 label [H, W]) -> (image, label)``.
        num_classes: classes after reduce-zero-label (150).
        reduce_zero_label: see above.
        on_bad_sample: ``raise`` or ``skip`` (an unreadable image or annotation PNG).
    """

    def __init__(self, root: str | os.PathLike, split: str = "training", transform: Callable | None = None,
                 num_classes: int = 150, reduce_zero_label: bool = True,
                 on_bad_sample: Literal["raise", "skip"] = "raise") -> None:
        self.root = Path(root)
        image_dir, label_dir = self.root / "images" / split, self.root / "annotations" / split
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                hint = (" (a demo dataset written before the demo had ADE20K-layout annotations: regenerate it with "
                        "`rm -rf data/demo && make demo-data`)" if "demo" in str(self.root) else "")
                raise FileNotFoundError(f"ADE20K folder '{folder}' does not exist (root '{self.root}', split "
                                        f"'{split}'){hint}")
        stems = sorted(p.stem for p in image_dir.glob("*.jpg"))
        if not stems:
            raise FileNotFoundError(f"no .jpg images in '{image_dir}'")
        missing = [s for s in stems if not (label_dir / f"{s}.png").is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images of '{image_dir}' have no annotation in '{label_dir}', "
                                    f"e.g. {missing[0]}.png")
        self.label_paths = PathArray(str(label_dir / f"{s}.png") for s in stems)
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        super().__init__((str(image_dir / f"{s}.jpg") for s in stems), transform, on_bad_sample)

    def read_annotation(self, index: int, image: Image.Image) -> np.ndarray:
        path = self.label_paths[index]
        try:
            with Image.open(path) as png:
                label = np.asarray(png, dtype=np.uint8)
        except OSError as error:
            raise BadImageError(path, f"unreadable annotation ({error})") from error
        if label.ndim != 2 or label.shape != (image.height, image.width):
            raise ValueError(f"{path}: annotation of shape {label.shape} does not match its image "
                             f"({image.height}x{image.width}); ADE20K annotations are single-channel PNGs")
        if self.reduce_zero_label:
            label = np.where(label == 0, 255, label.astype(np.int16) - 1).astype(np.uint8)
        valid = label[label != 255]
        if valid.size and int(valid.max()) >= self.num_classes:
            raise ValueError(f"{path}: class {int(valid.max()) + int(self.reduce_zero_label)} outside the "
                             f"{self.num_classes} classes (data.num_classes)")
        return label
