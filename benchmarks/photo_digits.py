"""A second dataset for the quality benchmark, built from real data that installed packages ship: handwritten
digits in front of crops of real photographs. The CPU recipes were designed on the demo; this set was designed
(and its seed fixed) before any recipe ran on it, and is not for tuning them.

``python -m benchmarks.photo_digits --out data/photo_digits [--seed 0]``, then
``python -m benchmarks.quality --root data/photo_digits``.

What it is made of, all on disk with the packages (nothing is downloaded):

* the objects: scikit-learn's ``load_digits`` -- 1,797 handwritten digits (UCI "optdigits"), 8 x 8 cells of ink
  density 0-16, 174-183 per class, 10 classes;
* the backgrounds: crops of 15 photographs, scikit-learn's ``load_sample_images`` (china, flower) and
  scikit-image's bundled ones (:data:`TRAIN_PHOTOS`, :data:`VAL_PHOTOS`; those that need a download are left out).

How one 32 px image is made (each from its own generator, seeded by (seed, split, index)):

1. background: a square crop of 15-50 % of a photograph's short side at a random place, flipped or not, resized
   to 32 px (antialiased) and faded to 60 % of its contrast around its mean: a real photograph's texture and
   colours at many scales (thousands of distinct backgrounds, not a handful of looks);
2. digit: the 8 x 8 cells drawn at 4x resolution (bicubic), rotated by up to 15 degrees, box-filtered down to a
   box of 16-24 px (half to three quarters of the image side), its centre within 2 px of the image centre, so
   that the centre crop of the probes and most of a recipe's random crops keep it;
3. ink: dark (luminance 0-55) on a light background or light (200-255) on a dark one, measured under the digit,
   with a random hue at saturation up to 0.5: neither colour nor brightness tells the class.

Splits: per class, a seeded quarter of the digits is the validation split, the rest the training split (no digit
in both); every training digit appears twice (two backgrounds, sizes, angles), every validation digit once:
2,694 training and 450 validation images at seed 0. Training and validation backgrounds come from disjoint
photographs, so that a network that tells images apart by their background cannot score: its nearest training
neighbours of a validation image show other photographs. Class, background, size, angle and ink are
independent; only the digit's shape gives the class.

Layout (the demo's): ``folder/{train,val}/<digit>/<id>.png`` (the single-label view) and the same images as
COCO, ``{train,val}2017/`` and ``annotations/instances_{train,val}2017.json`` (one box per image; the multi-label
recipes, HVP-MTL, and the GAMP probe read it).

It lives in ``benchmarks/`` rather than in ``ssl_zoo.data``: it is a held-out benchmark of the recipes, not a
reader, and its digits come from scikit-learn, a development dependency of the project only.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32
#: Photographs behind the training images and behind the validation images: disjoint, each a mix of colour and
#: grey photographs (scikit-image name, or ``sklearn:<file>`` for ``load_sample_images``).
TRAIN_PHOTOS: tuple[str, ...] = ("sklearn:china.jpg", "rocket", "coffee", "astronaut", "stereo_motorcycle",
                                 "camera", "brick", "grass", "coins")
VAL_PHOTOS: tuple[str, ...] = ("sklearn:flower.jpg", "chelsea", "immunohistochemistry", "retina", "gravel", "moon")
VAL_FRACTION = 0.25  # of each class's digits
TRAIN_COPIES = 2  # images per training digit
CROP_SHARE = (0.15, 0.5)  # background crop side / the photograph's short side
FADE = 0.6  # background contrast kept around its mean
DIGIT_SIDE = (16, 24)  # px, the 8 x 8 digit's box before rotation
MAX_ANGLE = 15.0  # degrees
MAX_OFFSET = 2.0  # px, the digit's centre from the image centre
DARK_INK, LIGHT_INK = (0.0, 55.0), (200.0, 255.0)
MAX_INK_SATURATION = 0.5
_SUPERSAMPLE = 4
_SPLITS = {"train": 0, "val": 1}
_MARKER = ".complete"
_PHOTO_CACHE: dict[str, np.ndarray] = {}


def photograph(name: str) -> np.ndarray:
    """A photograph of :data:`TRAIN_PHOTOS` / :data:`VAL_PHOTOS` as ``uint8[H, W, 3]`` (grey ones repeated)."""
    if name not in _PHOTO_CACHE:
        if name.startswith("sklearn:"):
            from sklearn.datasets import load_sample_image

            image = load_sample_image(name.removeprefix("sklearn:"))
        else:
            from skimage import data as skimage_data

            image = getattr(skimage_data, name)()
            if name == "stereo_motorcycle":  # (left, right, disparity): the left view
                image = image[0]
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        _PHOTO_CACHE[name] = np.ascontiguousarray(image[..., :3].astype(np.uint8))
    return _PHOTO_CACHE[name]


def split_digits(targets: np.ndarray, seed: int, val_fraction: float = VAL_FRACTION,
                 per_class: int | None = None) -> dict[str, np.ndarray]:
    """Indices of the training and validation digits: per class, a seeded ``val_fraction`` to validation.
    ``per_class`` keeps only that many digits of each class (small sets for tests)."""
    rng = np.random.default_rng([seed, 7])
    splits: dict[str, list[int]] = {"train": [], "val": []}
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(targets == digit))[:per_class]
        n_val = int(round(val_fraction * len(members)))
        splits["val"] += members[:n_val].tolist()
        splits["train"] += members[n_val:].tolist()
    return {split: np.asarray(sorted(indices)) for split, indices in splits.items()}


def _background(rng: np.random.Generator, photos: Sequence[str]) -> tuple[np.ndarray, str]:
    name = photos[int(rng.integers(len(photos)))]
    photo = photograph(name)
    height, width = photo.shape[:2]
    side = rng.uniform(*CROP_SHARE) * min(height, width)
    x0, y0 = rng.uniform(0, width - side), rng.uniform(0, height - side)
    crop = Image.fromarray(photo).resize((SIZE, SIZE), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    image = np.asarray(crop, dtype=np.float32)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    mean = image.mean(axis=(0, 1), keepdims=True)
    return mean + FADE * (image - mean), name


def _digit_alpha(rng: np.random.Generator, cells: np.ndarray) -> np.ndarray:
    """Coverage ``float32[SIZE, SIZE]`` in [0, 1] of one 8 x 8 digit drawn, rotated and placed."""
    side = int(rng.integers(DIGIT_SIDE[0], DIGIT_SIDE[1] + 1))
    big = Image.fromarray((cells / 16.0).astype(np.float32))  # mode "F"
    big = big.resize((side * _SUPERSAMPLE, side * _SUPERSAMPLE), Image.BICUBIC)
    big = big.rotate(float(rng.uniform(-MAX_ANGLE, MAX_ANGLE)), Image.BICUBIC, expand=True)
    canvas = Image.new("F", (SIZE * _SUPERSAMPLE, SIZE * _SUPERSAMPLE), 0.0)
    cx, cy = (SIZE / 2 + rng.uniform(-MAX_OFFSET, MAX_OFFSET) for _ in range(2))
    canvas.paste(big, (int(round(cx * _SUPERSAMPLE - big.width / 2)), int(round(cy * _SUPERSAMPLE - big.height / 2))))
    coverage = np.asarray(canvas.resize((SIZE, SIZE), Image.BOX), dtype=np.float32)
    # The cells are ink densities of 4 x 4 blocks: a soft threshold gives strokes with anti-aliased edges.
    return np.clip((coverage - 0.2) / 0.5, 0.0, 1.0)


def ink_colour(rng: np.random.Generator, luminance: float) -> np.ndarray:
    """RGB ``float32[3]`` in [0, 255] of a digit drawn over a background of mean ``luminance`` (0-255): light on
    dark, dark on light, with a random tint of the same luminance."""
    low, high = LIGHT_INK if luminance < 128.0 else DARK_INK
    value = rng.uniform(low, high) / 255.0
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, MAX_INK_SATURATION), 1.0)
    # Scale the tint so that its luminance is the chosen one (a saturated colour keeps the contrast).
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return np.clip(np.asarray(rgb, dtype=np.float32) * value / max(lum, 1e-3), 0.0, 1.0) * 255.0


def render_image(seed: int, split: str, index: int, cells: np.ndarray) -> tuple[Image.Image, list[float], str]:
    """Image ``index`` of ``split``, showing the digit ``cells`` (``[8, 8]``, 0-16), its box ``[x, y, w, h]`` and
    the photograph behind it."""
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    background, photo = _background(rng, TRAIN_PHOTOS if split == "train" else VAL_PHOTOS)  # [S, S, 3]
    alpha = _digit_alpha(rng, cells)  # [S, S]
    under = alpha > 0.3
    luminance = float((background @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32))[under].mean())
    image = background * (1.0 - alpha[..., None]) + ink_colour(rng, luminance) * alpha[..., None]
    ys, xs = np.nonzero(alpha > 0.25)
    box = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8)), box, photo


def _coco(split: str, records: list[tuple[int, str, int, list[float], str, int]], seed: int) -> dict:
    return {
        "info": {"description": f"photo_digits ({split}), seed {seed}", "version": "1.0", "year": 2017},
        "licenses": [],
        # Besides COCO's keys: the photograph behind the digit and the digit's index in load_digits (what a
        # network's nearest neighbours may share besides the class).
        "images": [{"id": i, "file_name": name, "width": SIZE, "height": SIZE, "photo": photo, "digit_index": k}
                   for i, name, _, _, photo, k in records],
        "annotations": [{"id": i, "image_id": i, "category_id": digit + 1, "bbox": box, "area": box[2] * box[3],
                         "iscrowd": 0} for i, _, digit, box, _, _ in records],
        "categories": [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)],
    }


def make_photo_digits(out: str | os.PathLike = "data/photo_digits", seed: int = 0,
                      per_class: int | None = None) -> Path:
    """Write the dataset into ``out`` (replacing an earlier one; a folder that is not one is refused) and return
    its path. ``per_class`` keeps that many digits of each class (small sets for tests)."""
    from sklearn.datasets import load_digits

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / _MARKER).is_file():
        raise FileExistsError(f"--out {out}: exists and is not a photo_digits dataset; choose another folder")
    digits = load_digits()
    splits = split_digits(digits.target, seed, per_class=per_class)
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "annotations").mkdir(parents=True)
    image_id = 0
    counts = {}
    for split, members in splits.items():
        copies = TRAIN_COPIES if split == "train" else 1
        (staging / f"{split}2017").mkdir()
        records = []
        for index, digit_index in enumerate(np.repeat(members, copies)):
            image, box, photo = render_image(seed, split, index, digits.images[digit_index])
            digit = int(digits.target[digit_index])
            name = f"{image_id:06d}.png"
            image.save(staging / f"{split}2017" / name)
            folder = staging / "folder" / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            os.link(staging / f"{split}2017" / name, folder / name)
            records.append((image_id, name, digit, box, photo, int(digit_index)))
            image_id += 1
        (staging / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(_coco(split, records, seed)))
        counts[split] = {"images": len(records), "digits": len(members)}
    meta = {"seed": seed, "per_class": per_class, "counts": counts, "train_photos": TRAIN_PHOTOS,
            "val_photos": VAL_PHOTOS, "source": "benchmarks/photo_digits.py"}
    (staging / "README.txt").write_text(__doc__)
    (staging / _MARKER).write_text(json.dumps(meta) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/photo_digits")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = make_photo_digits(args.out, args.seed)
    counts = json.loads((out / _MARKER).read_text())["counts"]
    print(f"wrote {out}: " + ", ".join(f"{s} {c['images']} images of {c['digits']} digits" for s, c in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
