"""COCO ``instances_*.json`` as a multi-label classification dataset (the HVP-MTL / BAM evaluation setup).

Read with the standard library's ``json``: pycocotools is not needed to turn box annotations into
per-image label sets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from ssl_zoo.data.image_list import ImageListDataset

__all__ = ["CocoMultiLabel", "read_coco_multilabel"]


def _require(record: Any, keys: tuple[str, ...], where: str, source: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{source}: {where} must be a JSON object, got {type(record).__name__}")
    for key in keys:
        if key not in record:
            raise ValueError(f"{source}: {where} has no '{key}' key")


def read_coco_multilabel(
    ann_file: str | os.PathLike[str],
) -> tuple[list[int], list[str], list[int], list[str], Tensor]:
    """Parse a COCO ``instances`` file into per-image multi-hot targets.

    Categories are mapped to ``0..C-1`` in ascending category-id order (COCO's 80 ids run from 1 to 90
    with gaps). Every annotation counts, ``iscrowd`` ones included: a crowd of people still shows people.
    Images without annotations are kept with an all-zero target. Images are ordered by ascending id, as
    torchvision's ``CocoDetection`` does.

    Args:
        ann_file: path to the JSON file.

    Returns:
        ``(image_ids, file_names, category_ids, category_names, targets)`` with ``targets`` a float32
        ``Tensor[N, C]`` in ``{0, 1}``.

    Raises:
        ValueError: missing keys, duplicate image or category ids, annotations naming an unknown
            category or a non-existing image; the message names the file and the key.
    """
    source = os.fspath(ann_file)
    try:
        with open(source, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source}: not valid JSON ({error})") from error
    _require(data, ("images", "annotations", "categories"), "the top level", source)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise ValueError(f"{source}: '{key}' must be a list, got {type(data[key]).__name__}")

    category_names: dict[int, str] = {}
    for i, category in enumerate(data["categories"]):
        _require(category, ("id", "name"), f"categories[{i}]", source)
        cat_id = category["id"]
        if not isinstance(cat_id, int) or isinstance(cat_id, bool):
            raise ValueError(f"{source}: categories[{i}]['id'] must be an integer, got {cat_id!r}")
        if cat_id in category_names:
            raise ValueError(f"{source}: categories[{i}] repeats category id {cat_id}")
        category_names[cat_id] = str(category["name"])
    category_ids = sorted(category_names)
    cat_to_index = {cat_id: index for index, cat_id in enumerate(category_ids)}

    file_name_of: dict[int, str] = {}
    for i, image in enumerate(data["images"]):
        _require(image, ("id", "file_name"), f"images[{i}]", source)
        image_id = image["id"]
        if image_id in file_name_of:
            raise ValueError(f"{source}: images[{i}] repeats image id {image_id!r}")
        file_name = image["file_name"]
        if not isinstance(file_name, str) or not file_name:
            raise ValueError(
                f"{source}: images[{i}]['file_name'] must be a non-empty string, got {file_name!r}"
            )
        file_name_of[image_id] = file_name
    try:
        image_ids = sorted(file_name_of)
    except TypeError as error:  # mixed id types cannot be ordered
        raise ValueError(f"{source}: image 'id' values must all be integers ({error})") from error
    row_of = {image_id: row for row, image_id in enumerate(image_ids)}

    targets = torch.zeros(len(image_ids), len(category_ids), dtype=torch.float32)  # [N, C]
    for i, annotation in enumerate(data["annotations"]):
        _require(annotation, ("image_id", "category_id"), f"annotations[{i}]", source)
        image_id, cat_id = annotation["image_id"], annotation["category_id"]
        if image_id not in row_of:
            raise ValueError(
                f"{source}: annotations[{i}]['image_id'] = {image_id!r} is not the id of any entry in 'images'"
            )
        if cat_id not in cat_to_index:
            raise ValueError(
                f"{source}: annotations[{i}]['category_id'] = {cat_id!r} is not the id of any entry in "
                "'categories'"
            )
        targets[row_of[image_id], cat_to_index[cat_id]] = 1.0

    file_names = [file_name_of[image_id] for image_id in image_ids]
    names = [category_names[cat_id] for cat_id in category_ids]
    return image_ids, file_names, category_ids, names, targets


class CocoMultiLabel(ImageListDataset):
    """COCO multi-label classification: ``item = (image, target Float[C])``, ``C = 80`` for real COCO.

    Args:
        root: folder holding the images (``file_name`` is relative to it), e.g. ``coco/train2017``.
        ann_file: ``instances_*.json`` (boxes and masks are ignored; only category ids are read).
        transform: applied to the decoded RGB ``PIL.Image``.
        on_bad_sample: ``"raise"``: an unreadable image raises :class:`~ssl_zoo.data.decode.BadImageError`
            naming the file; ``"skip"``: it is replaced by the next readable image (with that image's
            target) and counted in :attr:`num_skipped`.
        validate_files: check at construction that every listed image exists (a ``stat`` each).
        annotated_only: keep only the images with at least one annotation (``iscrowd`` ones count), as the
            multi-label COCO protocol of ML-GCN / ASL and the BAM+IA-CLoss reference code read the split
            (train2017: 117,266 of 118,287 images; val2017: 4,952 of 5,000). ``False`` keeps the
            background-only images with an all-zero target.

    Attributes:
        categories: category names in class order (ascending category id).
        category_ids: COCO category id of each class.
        image_ids: COCO image id of each sample.
        targets: float32 ``Tensor[N, C]`` of all targets (for evaluation).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        ann_file: str | os.PathLike[str],
        transform: Callable | None = None,
        on_bad_sample: Literal["raise", "skip"] = "raise",
        validate_files: bool = False,
        annotated_only: bool = False,
    ) -> None:
        self.root = os.fspath(root)
        self.ann_file = os.fspath(ann_file)
        self.annotated_only = annotated_only
        image_ids, file_names, category_ids, names, targets = read_coco_multilabel(self.ann_file)
        if annotated_only:
            # An image has an annotation iff its target has a positive: every annotation sets its class.
            keep = targets.any(dim=1).tolist()
            image_ids = [i for i, k in zip(image_ids, keep, strict=True) if k]
            file_names = [f for f, k in zip(file_names, keep, strict=True) if k]
            targets = targets[torch.tensor(keep, dtype=torch.bool)]
            if not image_ids:
                raise ValueError(f"{self.ann_file}: annotated_only=True but no image has an annotation")
        super().__init__([os.path.join(self.root, f) for f in file_names], transform, on_bad_sample)
        self.image_ids = image_ids
        self.category_ids = category_ids
        self.categories = names
        self.targets = targets
        if validate_files:
            self.check_files(self.ann_file)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def locate(self, indices: Sequence[int]) -> list[str]:
        return [f"image id {self.image_ids[index]!r}" for index in indices]

    def target(self, index: int) -> Tensor:
        return self.targets[index].clone()  # [C]; a copy so callers cannot edit the shared table

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={self.root!r}, ann_file={self.ann_file!r}, images={len(self)}, "
            f"classes={self.num_classes}, annotated_only={self.annotated_only}, "
            f"on_bad_sample={self.on_bad_sample!r})"
        )
