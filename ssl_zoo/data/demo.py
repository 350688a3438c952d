"""The built-in demo dataset: procedurally drawn multi-label images written in the real dataset formats.

``python -m ssl_zoo.data.demo --out data/demo [--num-train 4000 --num-val 1000 --size 32 --seed 0]``

Each image is a crop of a real photograph (one of scikit-image's bundled colour photographs, contrast halved)
with one to four objects from ten classes in front of it: seven filled shapes (circle, square, triangle, star,
crescent, ring, cross) and three glyphs drawn as thick strokes (the letters E, H, Z), each dark or light grey,
whichever contrasts with the background beneath it, at random size, position and rotation. Half of the images
show one large object, the others two to four smaller ones that may overlap a little, as objects in a photograph
do (at most a quarter of any object is hidden); a few (every 25th, from the 4th) show background only. Objects
are rasterised at 4x resolution and box-filtered down, so edges are anti-aliased like a photograph's.

The set is made so that learning shows: brightness, size, position and background are independent of the
class, so only the shape identifies it. A randomly initialised network's features are dominated by the
photograph's colours (its kNN accuracy is at chance), while an encoder trained to tell augmented images apart
(crops, colour jitter, grey scale, blur) must use the shapes: the objects have no colour of their own and the
backgrounds come in a handful of looks shared by hundreds of images. 32 px images keep a CPU pre-training run
within minutes (``experiments/<method>/cpu.yaml``, ``make bench-quality``).

The same images are described three ways, in the formats the real readers parse:

- COCO: ``train2017/``, ``val2017/``, ``annotations/instances_{train,val}2017.json`` with non-contiguous
  category ids (as in COCO) and tight boxes / areas measured on the drawn masks;
- Tencent ML-Images: ``tencent/{train,val}.txt`` (paths relative to the output folder), each object's
  class at confidence 1 and its superclass (``shape`` / ``glyph``) at 0.9, and the 3-column
  ``tencent/dictionary_and_semantic_hierarchy.txt``;
- class-per-folder: ``folder/{train,val}/<class>/<file>.jpg``, hard links to the JPEGs that show exactly one
  object, labelled with its class (the single-label view).

Generation is deterministic: each image draws from its own generator seeded by (seed, split, index), so
the output is byte-identical for a given seed whatever the number of worker processes.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ssl_zoo.data.demo_dense import write_dense_split

__all__ = ["DEMO_CLASSES", "SUPERCLASSES", "DemoClass", "make_demo_dataset", "render_image", "main"]


@dataclass(frozen=True)
class DemoClass:
    """A demo object class: its name, its superclass and its COCO category id."""

    name: str
    superclass: str
    coco_id: int


#: COCO category ids skip numbers as real COCO does (1..90 for 80 classes), so readers must map ids.
DEMO_CLASSES: tuple[DemoClass, ...] = (
    DemoClass("circle", "shape", 1),
    DemoClass("square", "shape", 2),
    DemoClass("triangle", "shape", 3),
    DemoClass("star", "shape", 5),
    DemoClass("crescent", "shape", 7),
    DemoClass("ring", "shape", 9),
    DemoClass("cross", "shape", 11),
    DemoClass("letter_E", "glyph", 14),
    DemoClass("letter_H", "glyph", 17),
    DemoClass("letter_Z", "glyph", 20),
)
#: Tencent label indices: superclasses first (0, 1), then DEMO_CLASSES in order (2..11).
SUPERCLASSES: tuple[str, ...] = ("shape", "glyph")
PARENT_CONFIDENCE = 0.9

_SUPERSAMPLE = 4  # objects are drawn at 4x and box-filtered down: anti-aliased edges
_EMPTY_EVERY, _EMPTY_OFFSET = 25, 3  # image i shows background only when i % 25 == 3
_SPLITS = {"train": 0, "val": 1}
_MARKER = ".complete"
_README_TITLE = "ssl_zoo demo dataset"


def tencent_index(class_index: int) -> int:
    """Tencent label index of ``DEMO_CLASSES[class_index]``."""
    return len(SUPERCLASSES) + class_index


# ------------------------------------------------------------------------------------------ geometry
def _rotate(points: Sequence[tuple[float, float]], angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(x * c - y * s, x * s + y * c) for x, y in points]


def _regular(n: int, radius: float, inner: float | None = None) -> list[tuple[float, float]]:
    """A regular n-gon (or an n-pointed star with inner radius ``inner``), first vertex pointing up."""
    points = []
    for k in range(n * (2 if inner else 1)):
        r = inner if inner and k % 2 else radius
        theta = -math.pi / 2 + math.pi * k / (n if inner else n / 2)
        points.append((r * math.cos(theta), r * math.sin(theta)))
    return points


def _crescent(offset: float, inner: float, points: int = 48) -> list[tuple[float, float]]:
    """A unit disc minus a disc of radius ``inner`` centred at ``(offset, 0)``: outer arc, then inner arc."""
    x = (1 + offset**2 - inner**2) / (2 * offset)  # where the two circles cross, at (x, +-y)
    y = math.sqrt(1 - x**2)
    theta0 = math.atan2(y, x)
    phi0 = math.atan2(y, x - offset)
    outer = [theta0 + (2 * math.pi - 2 * theta0) * k / points for k in range(points + 1)]
    inner_arc = [2 * math.pi - phi0 - (2 * math.pi - 2 * phi0) * k / points for k in range(1, points)]
    return [(math.cos(t), math.sin(t)) for t in outer] + [
        (offset + inner * math.cos(t), inner * math.sin(t)) for t in inner_arc
    ]


def _plus(arm: float) -> list[tuple[float, float]]:
    a = arm
    return [
        (a, -1),
        (a, -a),
        (1, -a),
        (1, a),
        (a, a),
        (a, 1),
        (-a, 1),
        (-a, a),
        (-1, a),
        (-1, -a),
        (-a, -a),
        (-a, -1),
    ]


# Outlines in units of the object radius (y points down). Sizes are scaled so that the classes cover
# similar areas at the same radius.
_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "circle": _regular(48, 1.0),
    "square": _regular(4, 1.1),
    "triangle": _regular(3, 1.25),
    "star": _regular(5, 1.15, inner=0.48),
    "crescent": _crescent(0.45, 0.8),
    "cross": _plus(0.34),
}
# Glyphs: polylines of a thick pen, in a 1.2 x 1.8 box.
_STROKES: dict[str, list[list[tuple[float, float]]]] = {
    "letter_E": [[(0.6, -0.9), (-0.6, -0.9), (-0.6, 0.9), (0.6, 0.9)], [(-0.6, 0.0), (0.45, 0.0)]],
    "letter_H": [[(-0.6, -0.9), (-0.6, 0.9)], [(0.6, -0.9), (0.6, 0.9)], [(-0.6, 0.0), (0.6, 0.0)]],
    "letter_Z": [[(-0.6, -0.9), (0.6, -0.9), (-0.6, 0.9), (0.6, 0.9)]],
}
_RING_INNER = 0.55
_STROKE_WIDTH = 0.32
_GLYPH_MAX_TILT = math.radians(25)  # glyphs stay upright enough to be read


def _outline(name: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal class in output pixel coordinates."""
    return [(cx + radius * x, cy + radius * y) for x, y in _rotate(_POLYGONS[name], angle)]


def _draw_object(name: str, size: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Rasterise one object; returns its coverage ``float32[size, size]`` in [0, 1]."""
    ss = _SUPERSAMPLE
    mask = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(mask)
    if name in _POLYGONS:
        draw.polygon([(x * ss, y * ss) for x, y in _outline(name, cx, cy, radius, angle)], fill=255)
    elif name == "ring":
        for r, fill in ((radius, 255), (radius * _RING_INNER, 0)):
            draw.ellipse([(cx - r) * ss, (cy - r) * ss, (cx + r) * ss, (cy + r) * ss], fill=fill)
    else:
        width = _STROKE_WIDTH * radius * ss
        for stroke in _STROKES[name]:
            points = [((cx + radius * x) * ss, (cy + radius * y) * ss) for x, y in _rotate(stroke, angle)]
            draw.line(points, fill=255, width=max(1, round(width)), joint="curve")
            for x, y in (points[0], points[-1]):  # round pen caps
                draw.ellipse([x - width / 2, y - width / 2, x + width / 2, y + width / 2], fill=255)
    return np.asarray(mask.reduce(ss), dtype=np.float32) / 255.0  # [size, size], box filter


def _segmentation(name: str, cx: float, cy: float, radius: float, angle: float) -> list[list[float]]:
    """COCO polygon list; empty for the ring (it has a hole) and the glyphs (strokes, not outlines)."""
    if name not in _POLYGONS:
        return []
    return [[round(float(v), 2) for point in _outline(name, cx, cy, radius, angle) for v in point]]


# ------------------------------------------------------------------------------------------ backgrounds
def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


#: The photographs behind the objects: scikit-image's bundled colour photographs (no download). Their
#: content (a face, a cat, coffee, a rocket, stained tissue, a retina, deep space) has nothing to do with
#: the classes, and a random network sees mostly them.
PHOTOGRAPHS: tuple[str, ...] = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "cat",
)
_PHOTO_CACHE: dict[str, Image.Image] = {}


def _photograph(name: str) -> Image.Image:
    """A bundled scikit-image photograph as an RGB PIL image, decoded once per process."""
    photo = _PHOTO_CACHE.get(name)
    if photo is None:
        from skimage import data as skimage_data

        photo = Image.fromarray(np.ascontiguousarray(getattr(skimage_data, name)()[..., :3]), mode="RGB")
        _PHOTO_CACHE[name] = photo
    return photo


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A crop of a real photograph ``float32[size, size, 3]``, recoloured and at reduced contrast.

    The crop covers 80-100% of the photograph's short side, so at demo sizes it is the photograph's colour
    layout rather than its fine texture: eight photographs, flipped or not, a handful of looks shared by
    hundreds of images. That makes the background a weak cue to tell images apart (the object's shape is the
    strong one) while it still dominates the colours a random network responds to. Its contrast is halved
    around its mean, so that the objects in front stay visible.
    """
    photo = _photograph(PHOTOGRAPHS[int(rng.integers(len(PHOTOGRAPHS)))])
    width, height = photo.size
    side = rng.uniform(0.8, 1.0) * min(width, height)
    x0, y0 = rng.uniform(0, width - side), rng.uniform(0, height - side)
    crop = photo.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    image = np.asarray(crop, dtype=np.float32)  # [S, S, 3], the photograph's own colours
    if rng.random() < 0.5:
        image = image[:, ::-1]
    mean = image.mean(axis=(0, 1), keepdims=True)
    return mean + 0.5 * (image - mean)


#: Object grey levels: dark or light, whichever contrasts with the background beneath. Objects carry no hue of
#: their own, so colour cannot tell images apart: an encoder trained to tell images apart must use the shapes
#: (and the photograph behind them), while a random network's features follow the photograph's colours.
GREY_LEVELS: tuple[float, ...] = (15.0, 45.0, 210.0, 240.0)


def _object_colour(rng: np.random.Generator, local_luminance: float) -> np.ndarray:
    """A grey level whose luminance differs from the background under the object by >= 60 (the farthest level
    otherwise), with a little jitter so that no two objects are exactly alike."""
    levels = np.asarray(GREY_LEVELS, dtype=np.float32)
    contrasting = levels[np.abs(levels - local_luminance) >= 60.0]
    if contrasting.size == 0:
        contrasting = levels[[int(np.argmax(np.abs(levels - local_luminance)))]]
    level = float(contrasting[int(rng.integers(contrasting.size))])
    return np.clip(level + rng.normal(0.0, 6.0, 3), 0, 255).astype(np.float32)


# ------------------------------------------------------------------------------------------ images
#: Objects per image: one (the single-label images of the class-per-folder view) or two to four.
_OBJECT_COUNTS, _OBJECT_COUNT_P = (1, 2, 3, 4), (0.5, 0.25, 0.17, 0.08)
#: Object radius as a fraction of the image side: large when alone, smaller when sharing the image. Objects that
#: share an image are large enough (12-19 px across at 32 px) that a 4 x 4 patch shows only a piece of one: with
#: 8-13 px objects a random ViT/4's max-pooled patch tokens already told which shapes an image holds (GAMP mAP 34,
#: against 40 for a ViT trained on the labels; with these sizes 30 against 45, seed 0, benchmarks/RESULTS.md).
_RADIUS_SINGLE, _RADIUS_SEVERAL = (0.2, 0.36), (0.2, 0.3)
#: Largest share of an object that other objects may hide (its footprint's overlap with theirs). Objects of the
#: sizes above rarely fit two to four to an image without overlap.
_MAX_HIDDEN = 0.25


def _overlaps_if_placed(footprint: np.ndarray, placed: list[np.ndarray], areas: np.ndarray, hidden: np.ndarray
                        ) -> np.ndarray | None:
    """Overlap of a candidate object with each placed one, or ``None`` when placing it would hide too much.

    Args:
        footprint: ``bool[S, S]``, the candidate's pixels (coverage > 0); it is drawn in front of the others.
        placed: the footprints of the objects already placed, in drawing order.
        areas: ``[len(placed)]`` their pixel counts.
        hidden: ``[len(placed)]`` pixels of each already covered by the objects drawn after it.

    Returns:
        ``int[len(placed)]`` pixels of each placed object the candidate covers, when the candidate overlaps the
        others by at most ``_MAX_HIDDEN`` of its own footprint and leaves each of them hidden by at most
        ``_MAX_HIDDEN`` of theirs; else ``None``.
    """
    overlaps = np.asarray([(footprint & other).sum() for other in placed], dtype=np.int64)
    if overlaps.sum() > _MAX_HIDDEN * footprint.sum() or (hidden + overlaps > _MAX_HIDDEN * areas).any():
        return None
    return overlaps


def render_image(seed: int, split: str, index: int, size: int = 32) -> tuple[Image.Image, list[dict]]:
    """Draw demo image ``index`` of ``split``; deterministic in ``(seed, split, index, size)``.

    Returns:
        The RGB image and its objects, in drawing order, as dicts with ``class_index`` (into
        :data:`DEMO_CLASSES`), ``bbox`` (COCO ``[x, y, w, h]`` of its visible pixels: at least half covered by
        it and not by an object drawn later), ``area`` (that pixel count) and ``segmentation`` (a COCO polygon
        list; empty for the ring, the glyphs and any object partly hidden).
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {tuple(_SPLITS)}, got {split!r}")
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    canvas = _background(rng, size)
    if index % _EMPTY_EVERY == _EMPTY_OFFSET:
        num_objects = 0
    else:
        num_objects = int(rng.choice(_OBJECT_COUNTS, p=_OBJECT_COUNT_P))
    # The first images of each split show one object of each class in turn, so that every class has a
    # folder in both splits of the class-per-folder view (ImageFolder numbers classes by the folders present).
    first_of_class = index - (index > _EMPTY_OFFSET)  # images 0, 1, 2, 4, ... -> classes 0, 1, 2, 3, ...
    if num_objects and first_of_class < len(DEMO_CLASSES):
        classes = [first_of_class]
    else:
        classes = [int(c) for c in rng.integers(len(DEMO_CLASSES), size=num_objects)]
    low, high = _RADIUS_SINGLE if len(classes) == 1 else _RADIUS_SEVERAL

    footprints: list[np.ndarray] = []  # each placed object's footprint (coverage > 0), in drawing order
    areas = np.zeros(0, dtype=np.int64)  # their pixel counts
    hidden = np.zeros(0, dtype=np.int64)  # pixels of each covered by the objects drawn after it
    drawn: list[tuple[dict, np.ndarray, list[list[float]]]] = []  # (record, solid mask, polygon)
    for class_index in classes:
        name = DEMO_CLASSES[class_index].name
        for _ in range(40):  # rejection sampling: inside the image, hiding at most _MAX_HIDDEN of any object
            radius = rng.uniform(low, high) * size
            cx, cy = rng.uniform(radius, size - radius, size=2)
            tilt = _GLYPH_MAX_TILT if name.startswith("letter") else math.pi
            angle = rng.uniform(-tilt, tilt)
            coverage = _draw_object(name, size, cx, cy, radius, angle)
            solid = coverage >= 0.5
            touches_border = (
                coverage[0].any() or coverage[-1].any() or coverage[:, 0].any() or coverage[:, -1].any()
            )
            footprint = coverage > 0
            if not touches_border:
                overlaps = _overlaps_if_placed(footprint, footprints, areas, hidden)
                if overlaps is not None:
                    break
        else:
            continue  # no spot left: the image keeps fewer objects
        if not solid.any():
            continue
        hidden = np.append(hidden + overlaps, 0)
        areas = np.append(areas, footprint.sum())
        footprints.append(footprint)
        local = float(_luminance(canvas[solid]).mean())  # background brightness under the object
        colour = _object_colour(rng, local)
        alpha = coverage[..., None]  # [S, S, 1]
        canvas = canvas * (1.0 - alpha) + colour * alpha
        drawn.append(({"class_index": class_index}, solid, _segmentation(name, cx, cy, radius, angle)))
    # Annotations of what is seen, as COCO's: the box and area of each object's pixels that no later object
    # covers (at least half covered by it, as the boxes always counted); an outline polygon only for an object
    # nothing hides (a polygon cannot hold the hidden part's edge; the ring and the glyphs have none anyway).
    objects: list[dict] = []
    covered_later = np.zeros((size, size), dtype=bool)
    for record, solid, polygon in reversed(drawn):
        visible = solid & ~covered_later
        covered_later |= solid
        if not visible.any():
            continue
        rows, cols = np.nonzero(visible)
        x0, y0 = int(cols.min()), int(rows.min())
        record.update(
            bbox=[float(x0), float(y0), float(cols.max() - x0 + 1), float(rows.max() - y0 + 1)],
            area=float(visible.sum()),
            segmentation=polygon if visible.sum() == solid.sum() else [],
        )
        objects.append(record)
    objects.reverse()  # drawing order
    canvas += rng.normal(0.0, 2.5, canvas.shape).astype(np.float32)  # sensor-like grain over everything
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mode="RGB")
    return image, objects


def _render_to_file(task: tuple[int, str, int, int, str]) -> list[dict]:
    seed, split, index, size, path = task
    image, objects = render_image(seed, split, index, size)
    image.save(path, format="JPEG", quality=90)
    return objects


# ------------------------------------------------------------------------------------------ writers
def _image_id(split: str, index: int, num_train: int) -> int:
    # Unique across splits, as in COCO, so file names never collide.
    return index + 1 + (num_train if split == "val" else 0)


def _coco_json(
    split: str, records: list[tuple[int, str, list[dict]]], size: int, seed: int, first_annotation_id: int
) -> dict:
    images, annotations = [], []
    annotation_id = first_annotation_id
    for image_id, file_name, objects in records:
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": size,
                "height": size,
                "license": 0,
                "date_captured": "",
            }
        )
        for obj in objects:
            annotations.append(
                {
                    "id": annotation_id,
                    "image_id": image_id,
                    "category_id": DEMO_CLASSES[obj["class_index"]].coco_id,
                    "bbox": obj["bbox"],
                    "area": obj["area"],
                    "iscrowd": 0,
                    "segmentation": obj["segmentation"],
                }
            )
            annotation_id += 1
    return {
        "info": {
            "description": f"{_README_TITLE} ({split}), seed {seed}",
            "version": "1.0",
            "year": 2017,
            "contributor": "ssl_zoo",
            "date_created": "2017-01-01",
        },
        "licenses": [{"id": 0, "name": "public domain", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": c.coco_id, "name": c.name, "supercategory": c.superclass} for c in DEMO_CLASSES
        ],
    }


def _tencent_line(relative_path: str, objects: list[dict]) -> str:
    classes = sorted({obj["class_index"] for obj in objects})
    parents = sorted({SUPERCLASSES.index(DEMO_CLASSES[c].superclass) for c in classes})
    fields = (
        [relative_path]
        + [f"{tencent_index(c)}:1" for c in classes]
        + [f"{p}:{PARENT_CONFIDENCE}" for p in parents]
    )
    return "\t".join(fields)


def _tencent_dictionary() -> str:
    # 3-column form: wnid, parent index (-1 for a root), name; line i describes class i. The wnids are
    # synthetic (n9xxxxxxx is outside WordNet's range).
    lines = [f"n9{i:07d}\t-1\t{name}" for i, name in enumerate(SUPERCLASSES)]
    lines += [
        f"n9{tencent_index(i):07d}\t{SUPERCLASSES.index(c.superclass)}\t{c.name}"
        for i, c in enumerate(DEMO_CLASSES)
    ]
    return "\n".join(lines) + "\n"


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # file systems without hard links
        shutil.copyfile(source, target)


def _readme(num_train: int, num_val: int, size: int, seed: int) -> str:
    rows = "\n".join(
        f"  {i:>2}  {c.name:<9} {c.superclass:<6} coco_id={c.coco_id:<3} tencent_index={tencent_index(i)}"
        for i, c in enumerate(DEMO_CLASSES)
    )
    return f"""{_README_TITLE}
{"=" * len(_README_TITLE)}

Procedurally drawn multi-label images ({size}x{size} JPEG, quality 90): 1-4 objects of {len(DEMO_CLASSES)}
classes in front of photograph crops; every {_EMPTY_EVERY}th image (from index {_EMPTY_OFFSET}) is background only.
Generated by `python -m ssl_zoo.data.demo --out <this folder> --num-train {num_train} --num-val {num_val} \\
--size {size} --seed {seed}`; the same arguments reproduce it byte for byte.

Layout
  train2017/, val2017/                       {num_train} + {num_val} images, COCO file names
  annotations/instances_{{train,val}}2017.json COCO instances (boxes, areas, polygons where exact)
  tencent/{{train,val}}.txt                    Tencent ML-Images lists: class:1 and superclass:{PARENT_CONFIDENCE}
  tencent/dictionary_and_semantic_hierarchy.txt  3-column class dictionary (synthetic wnids)
  folder/{{train,val}}/<class>/*.jpg            single-label view (one-object images), hard links
  .complete                                  written when everything else is in place

Classes (index in COCO order = ascending category id)
{rows}
Tencent superclasses: {", ".join(f"{i}={name}" for i, name in enumerate(SUPERCLASSES))}
"""


def _is_previous_demo(path: Path) -> bool:
    readme = path / "README.txt"
    if (path / _MARKER).exists():
        return True
    return readme.is_file() and readme.read_text(encoding="utf-8", errors="replace").startswith(_README_TITLE)


def make_demo_dataset(
    out: str | os.PathLike[str] = "data/demo",
    num_train: int = 4000,
    num_val: int = 1000,
    size: int = 32,
    seed: int = 0,
    workers: int = 0,
) -> Path:
    """Generate the demo dataset into ``out`` and return its path.

    Everything is written to a sibling ``.<name>.partial`` folder, which replaces ``out`` once complete
    (with the ``.complete`` marker inside), so an interrupted run never leaves a half-written dataset
    behind a marker. An existing ``out`` is replaced only if it is empty or a previous demo dataset.

    Args:
        out: output folder.
        num_train: training images, ``>= 1``.
        num_val: validation images, ``>= 1``.
        size: image side in pixels, ``>= 32``.
        seed: random seed, ``>= 0``; the output is a pure function of the arguments.
        workers: processes used for drawing; 0 = ``min(8, cpu count)``, 1 = this process only.

    Raises:
        ValueError: an argument outside its range.
        FileExistsError: ``out`` exists, is not empty and is not a demo dataset.
    """
    checks = (("num_train", num_train, 1), ("num_val", num_val, 1), ("size", size, 32), ("seed", seed, 0))
    for name, value, low in checks:
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    out = Path(out)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or _is_previous_demo(out))):
        raise FileExistsError(f"'{out}' exists and is not a demo dataset; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)

    counts = {"train": num_train, "val": num_val}
    tasks: list[tuple[int, str, int, int, str]] = []
    for split, count in counts.items():
        (staging / f"{split}2017").mkdir(parents=True)
        for index in range(count):
            file_name = f"{_image_id(split, index, num_train):012d}.jpg"
            tasks.append((seed, split, index, size, str(staging / f"{split}2017" / file_name)))
    workers = workers or min(8, os.cpu_count() or 1)
    if workers > 1 and len(tasks) >= 64:
        with multiprocessing.get_context().Pool(workers) as pool:
            results = pool.map(_render_to_file, tasks, chunksize=32)
    else:
        results = [_render_to_file(task) for task in tasks]

    (staging / "annotations").mkdir()
    (staging / "tencent").mkdir()
    next_annotation_id = 1
    position = 0
    for split, count in counts.items():
        records = []
        for index in range(count):
            image_id = _image_id(split, index, num_train)
            records.append((image_id, f"{image_id:012d}.jpg", results[position]))
            position += 1
        coco = _coco_json(split, records, size, seed, next_annotation_id)
        next_annotation_id += len(coco["annotations"])
        (staging / "annotations" / f"instances_{split}2017.json").write_text(
            json.dumps(coco, separators=(",", ":")), encoding="utf-8"
        )
        # Dense-transfer annotations (ADE20K-layout class maps), kept in their own module.
        write_dense_split(staging, split, records, size)
        (staging / "tencent" / f"{split}.txt").write_text(
            "".join(_tencent_line(f"{split}2017/{name}", objects) + "\n" for _, name, objects in records),
            encoding="utf-8",
        )
        for _, name, objects in records:
            if len(objects) != 1:
                continue  # the single-label view holds the images that show exactly one object
            folder = staging / "folder" / split / DEMO_CLASSES[objects[0]["class_index"]].name
            folder.mkdir(parents=True, exist_ok=True)
            _link_or_copy(staging / f"{split}2017" / name, folder / name)
    (staging / "tencent" / "dictionary_and_semantic_hierarchy.txt").write_text(
        _tencent_dictionary(), encoding="utf-8"
    )
    (staging / "README.txt").write_text(_readme(num_train, num_val, size, seed), encoding="utf-8")
    (staging / _MARKER).write_text(
        json.dumps({"num_train": num_train, "num_val": num_val, "size": size, "seed": seed}) + "\n",
        encoding="utf-8",
    )

    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssl_zoo.data.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/demo", help="output folder (default: data/demo)")
    parser.add_argument("--num-train", type=int, default=4000, help="training images (default: 4000)")
    parser.add_argument("--num-val", type=int, default=1000, help="validation images (default: 1000)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--workers", type=int, default=0, help="drawing processes; 0 = min(8, CPUs)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = make_demo_dataset(args.out, args.num_train, args.num_val, args.size, args.seed, args.workers)
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    print(
        f"wrote {args.num_train} + {args.num_val} demo images to {out} in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
