"""The demo dataset's images: ten object classes drawn in front of real photographs, one image at a time.

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
backgrounds come in a handful of looks shared by hundreds of images.

:func:`render_image` is deterministic: each image draws from its own generator seeded by (seed, split, index).
:mod:`ssl_zoo.data.demo` writes the images and their annotations in the real datasets' formats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "DEMO_CLASSES",
    "EMPTY_EVERY",
    "EMPTY_OFFSET",
    "GREY_LEVELS",
    "PHOTOGRAPHS",
    "SPLITS",
    "SUPERCLASSES",
    "SUPERSAMPLE",
    "DemoClass",
    "render_image",
]


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

#: Objects are drawn at 4x and box-filtered down: anti-aliased edges (the dense class maps are drawn the same way).
SUPERSAMPLE = 4
#: Image ``i`` of a split shows background only when ``i % EMPTY_EVERY == EMPTY_OFFSET``.
EMPTY_EVERY, EMPTY_OFFSET = 25, 3
#: The splits and the number each mixes into its images' seeds.
SPLITS = {"train": 0, "val": 1}


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
    ss = SUPERSAMPLE
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
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    canvas = _background(rng, size)
    if index % EMPTY_EVERY == EMPTY_OFFSET:
        num_objects = 0
    else:
        num_objects = int(rng.choice(_OBJECT_COUNTS, p=_OBJECT_COUNT_P))
    # The first images of each split show one object of each class in turn, so that every class has a
    # folder in both splits of the class-per-folder view (ImageFolder numbers classes by the folders present).
    first_of_class = index - (index > EMPTY_OFFSET)  # images 0, 1, 2, 4, ... -> classes 0, 1, 2, 3, ...
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

