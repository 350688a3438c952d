"""The built-in demo dataset: procedurally drawn multi-label images written in the real dataset formats.

``python -m ssl_zoo.data.demo --out data/demo [--num-train 4000 --num-val 1000 --size 32 --seed 0]``

The images (:mod:`ssl_zoo.data.demo_images`: one to four grey objects of ten classes in front of photograph
crops, drawn so that only an object's shape tells its class) are 32 px, which keeps a CPU pre-training run
within minutes (``experiments/<method>/cpu.yaml``, ``make bench-quality``).

The same images are described three ways, in the formats the real readers parse:

- COCO: ``train2017/``, ``val2017/``, ``annotations/instances_{train,val}2017.json`` with non-contiguous
  category ids (as in COCO) and tight boxes / areas measured on the drawn masks;
- Tencent ML-Images: ``tencent/{train,val}.txt`` (paths relative to the output folder), each object's
  class at confidence 1 and its superclass (``shape`` / ``glyph``) at 0.9, and the 3-column
  ``tencent/dictionary_and_semantic_hierarchy.txt``;
- class-per-folder: ``folder/{train,val}/<class>/<file>.jpg``, hard links to the JPEGs that show exactly one
  object, labelled with its class (the single-label view);

and for the dense transfer jobs as ADE20K-layout class maps (:mod:`ssl_zoo.data.demo_dense`).

Generation is deterministic: each image draws from its own generator seeded by (seed, split, index), so
the output is byte-identical for a given seed whatever the number of worker processes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ssl_zoo.data.demo_dense import link_or_copy, write_dense_split
from ssl_zoo.data.demo_images import DEMO_CLASSES, EMPTY_EVERY, EMPTY_OFFSET, SUPERCLASSES, render_image

__all__ = ["PARENT_CONFIDENCE", "make_demo_dataset", "main", "tencent_index"]

#: Confidence of an object's superclass label in the Tencent lists.
PARENT_CONFIDENCE = 0.9

_MARKER = ".complete"
_README_TITLE = "ssl_zoo demo dataset"


def tencent_index(class_index: int) -> int:
    """Tencent label index of ``DEMO_CLASSES[class_index]``."""
    return len(SUPERCLASSES) + class_index


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


def _readme(num_train: int, num_val: int, size: int, seed: int) -> str:
    rows = "\n".join(
        f"  {i:>2}  {c.name:<9} {c.superclass:<6} coco_id={c.coco_id:<3} tencent_index={tencent_index(i)}"
        for i, c in enumerate(DEMO_CLASSES)
    )
    return f"""{_README_TITLE}
{"=" * len(_README_TITLE)}

Procedurally drawn multi-label images ({size}x{size} JPEG, quality 90): 1-4 objects of {len(DEMO_CLASSES)}
classes in front of photograph crops; every {EMPTY_EVERY}th image (from index {EMPTY_OFFSET}) is background only.
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
            link_or_copy(staging / f"{split}2017" / name, folder / name)
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
