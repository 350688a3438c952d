"""Dense annotations of the demo dataset: ADE20K-layout per-pixel class maps, so the segmentation transfer job
runs on the demo images (instance masks need nothing extra: the demo's COCO JSON already holds each object's
polygon as ``segmentation``, which :class:`~ssl_zoo.transfer.data.datasets.CocoInstances` decodes).

Written from the demo's per-object records (``class_index``, ``bbox``, ``segmentation`` polygons, as
:func:`ssl_zoo.data.demo_images.render_image` returns them) into ``ADEChallengeData2016/`` under the demo folder:

- ``images/{training,validation}/<name>.jpg``: hard links to the COCO-layout JPEGs (same images);
- ``annotations/{training,validation}/<name>.png``: 8-bit class maps, ADE20K's convention of 0 = "other"
  (ignored under reduce-zero-label), 1 = background, ``2 + class_index`` = the demo classes, so that after
  reduce-zero-label the 11 classes are 0 (background) .. 10. An object is rasterised from its polygon at 4x
  and box-filtered down (a pixel belongs to it when at least half covered, as the demo's boxes count pixels);
  an object without a polygon (the ring, whose hole a COCO polygon cannot hold, and the stroked glyphs) cannot
  be labelled exactly, so its box is 0 = ignored;
- ``classes.txt``: the class names in label order after reduce-zero-label.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ssl_zoo.data.demo_images import DEMO_CLASSES, SUPERSAMPLE

__all__ = ["ADE_DIR", "NUM_DENSE_CLASSES", "dense_class_names", "link_or_copy", "semantic_label_map",
           "write_dense_split"]

ADE_DIR = "ADEChallengeData2016"
_ADE_SPLITS = {"train": "training", "val": "validation"}
_OTHER, _BACKGROUND, _FIRST_CLASS = 0, 1, 2


def dense_class_names() -> list[str]:
    """Label order after reduce-zero-label: background, then the demo classes."""
    return ["background", *(c.name for c in DEMO_CLASSES)]


NUM_DENSE_CLASSES = 1 + len(DEMO_CLASSES)  # background + the demo classes


def semantic_label_map(objects: Sequence[dict], size: int) -> np.ndarray:
    """``uint8 [size, size]`` ADE20K-style class map of one image's objects (see the module docstring)."""
    label = np.full((size, size), _BACKGROUND, dtype=np.uint8)
    for obj in objects:
        polygons = obj.get("segmentation") or []
        if not polygons:
            x, y, w, h = (int(round(v)) for v in obj["bbox"])
            label[y:y + h, x:x + w] = _OTHER
            continue
        ss = SUPERSAMPLE
        canvas = Image.new("L", (size * ss, size * ss), 0)
        draw = ImageDraw.Draw(canvas)
        for polygon in polygons:
            draw.polygon([(v * ss) for v in polygon], fill=255)
        coverage = np.asarray(canvas.reduce(ss), dtype=np.uint8)  # [size, size], box filter
        label[coverage >= 128] = _FIRST_CLASS + int(obj["class_index"])
    return label


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``target`` to ``source`` (the demo's views share one JPEG), or copy it where links fail."""
    try:
        os.link(source, target)
    except OSError:  # file systems without hard links
        shutil.copyfile(source, target)


def write_dense_split(out: str | os.PathLike, split: str, records: Sequence[tuple[int, str, list[dict]]],
                      size: int) -> None:
    """Write the ADE20K-layout images and class maps of one demo split.

    Args:
        out: the demo folder being written (holding ``<split>2017/<file_name>``).
        split: ``train`` or ``val``.
        records: ``(image_id, file_name, objects)`` per image, the objects as ``render_image`` returns them.
        size: image side in pixels.
    """
    out = Path(out)
    folder = _ADE_SPLITS[split]
    image_dir = out / ADE_DIR / "images" / folder
    label_dir = out / ADE_DIR / "annotations" / folder
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    for _, file_name, objects in records:
        link_or_copy(out / f"{split}2017" / file_name, image_dir / file_name)
        stem = os.path.splitext(file_name)[0]
        Image.fromarray(semantic_label_map(objects, size), mode="L").save(label_dir / f"{stem}.png")
    (out / ADE_DIR / "classes.txt").write_text("\n".join(dense_class_names()) + "\n", encoding="utf-8")
