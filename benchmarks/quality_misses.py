"""Why a recipe does not beat random init on a dataset: evidence for the quality benchmark's misses.

    python -m benchmarks.quality_misses --root data/photo_digits --work benchmarks/runs/quality_photo_digits \\
        [--seeds 0] [--out benchmarks/results/misses_photo_digits.json]

Two measurements, printed as Markdown and written to ``--out``:

* ``crops``: how much of the object a training view keeps. RandomResizedCrop's boxes are drawn as torchvision draws
  them (area share in ``[min_scale, 1]``, aspect ratio in ``[3/4, 4/3]``) against every single-object training
  image's object box (the COCO view of ``--root``), for the lower crop bounds of the recipes: 0.2 (the views of
  MoCo v2, MoCo v3, SimSiam and MPCL), 0.35 (the supervised ceiling) and 0.08 (timm's default). Per bound: the mean
  share of the object's box inside the crop, the share of crops that keep at least half of it, and the object's
  side in the 32 px view.
* ``neighbours``: what a backbone's nearest neighbours share. For random init and every run the benchmark trained
  under ``--work`` (each method, lightly's peers, the supervised ceiling), the 20 nearest training images of each
  training image (cosine on the frozen backbone's pooled features at the recipe's resolution, itself left out):
  the share of the same class, and, where the dataset records it (``photo`` in the COCO images, written by
  :mod:`benchmarks.photo_digits`), of the same photograph behind the object; beside each, the share that random
  neighbours would give. A backbone whose neighbours share the photograph far more than chance, and the class at
  chance, tells images apart by their background.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

from benchmarks.recipes import ROOT, architecture, architecture_key, find_views

CROP_SCALES = (0.08, 0.2, 0.35)
NEIGHBOURS = 20
CROPS_PER_OBJECT = 20


def single_object_boxes(coco_root: str, split: str = "train") -> dict[str, list[float]]:
    """``file_name -> [x, y, w, h]`` of the images with exactly one annotated object, and the image side."""
    data = json.loads((Path(coco_root) / "annotations" / f"instances_{split}2017.json").read_text())
    count = Counter(a["image_id"] for a in data["annotations"])
    names = {image["id"]: image for image in data["images"]}
    return {names[a["image_id"]]["file_name"]: [*a["bbox"], names[a["image_id"]]["width"]]
            for a in data["annotations"] if count[a["image_id"]] == 1}


def crop_statistics(boxes: list[list[float]], min_scale: float, size: int = 32, seed: int = 0) -> dict[str, float]:
    """Object share kept by RandomResizedCrop(scale=(min_scale, 1)) crops of images with the given object boxes
    ``[x, y, w, h, image side]``, and the object's side in a ``size`` px view."""
    import torch
    import torchvision.transforms as T

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    kept, sides = [], []
    try:
        for x, y, w, h, side in boxes:
            canvas = torch.empty(3, int(side), int(side))
            for _ in range(CROPS_PER_OBJECT):
                top, left, ch, cw = T.RandomResizedCrop.get_params(canvas, scale=(min_scale, 1.0), ratio=(3 / 4, 4 / 3))
                ix = max(0.0, min(x + w, left + cw) - max(x, left))
                iy = max(0.0, min(y + h, top + ch) - max(y, top))
                kept.append(ix * iy / (w * h))
                sides.append(max(w, h) * size / math.sqrt(cw * ch))
    finally:
        torch.random.set_rng_state(generator_state)
    return {"min_scale": min_scale, "mean_kept": round(100 * sum(kept) / len(kept), 1),
            "kept_half_or_more": round(100 * sum(k >= 0.5 for k in kept) / len(kept), 1),
            "object_side_px": round(sorted(sides)[len(sides) // 2], 1), "objects": len(boxes)}


def neighbour_shares(features, labels: list, k: int = NEIGHBOURS) -> tuple[float, float]:
    """Share of each sample's ``k`` nearest others (cosine) with its label, and the share random picks would give."""
    import torch
    import torch.nn.functional as F

    x = F.normalize(features.float(), dim=1)
    similarity = x @ x.T
    similarity.fill_diagonal_(-float("inf"))
    nearest = similarity.topk(k, dim=1).indices  # [N, k]
    codes = {label: i for i, label in enumerate(dict.fromkeys(labels))}
    y = torch.tensor([codes[label] for label in labels])
    same = (y[nearest] == y[:, None]).float().mean().item()
    counts = torch.bincount(y).float()
    chance = ((counts * (counts - 1)).sum() / (len(y) * (len(y) - 1))).item()
    return round(100 * same, 1), round(100 * chance, 1)


def backbones(work: Path, methods: list[str], seeds: list[int]):
    """``(name, seed, architecture, backbone)`` of random init and of every finished run under ``work``."""
    from benchmarks import quality
    from benchmarks.recipes import PEER

    state = quality.merged_state(work) if work.is_dir() else {"trained_from": {}}
    baselines_done = set()
    for method in methods:
        arch = architecture(method)
        key = architecture_key(arch)
        for seed in seeds:
            names = [method, f"{PEER}/{method}"]
            if (key, seed) not in baselines_done:  # an architecture's baselines once
                baselines_done.add((key, seed))
                names.append(f"supervised/{key}")
                yield f"random/{key}", seed, arch, quality.random_backbone(arch, seed)
            for name in names:
                run = state["trained_from"].get(name, {}).get(str(seed))
                ckpt = Path(run[0]) / "checkpoints" / "last.ckpt" if run else None
                if ckpt and ckpt.is_file():
                    yield name, seed, arch, quality.load_student(str(ckpt), arch)


def measure(root: str, work: Path, methods: list[str], seeds: list[int]) -> dict:
    import torch

    from ssl_zoo.data.folder import ImageFolderDataset
    from ssl_zoo.eval import extract_features
    from ssl_zoo.eval.transforms import center_crop_transform

    views = find_views(root)
    report: dict = {"root": root, "work": str(work), "crops": [], "neighbours": []}
    boxes = single_object_boxes(views.coco) if views.coco else {}
    if boxes:
        report["crops"] = [crop_statistics(list(boxes.values()), s) for s in CROP_SCALES]
    photos = {}
    if views.coco:
        coco = json.loads((Path(views.coco) / "annotations" / "instances_train2017.json").read_text())
        photos = {image["file_name"]: image.get("photo") for image in coco["images"] if image.get("photo")}
    for name, seed, arch, backbone in backbones(work, methods, seeds):
        dataset = ImageFolderDataset(str(Path(views.folder) / "train"), transform=center_crop_transform(arch["img_size"]))
        features = extract_features(backbone, torch.utils.data.DataLoader(dataset, batch_size=256), "backbone")[0]
        row = {"backbone": name, "seed": seed}
        row["same_class"], row["same_class_by_chance"] = neighbour_shares(features, [y for _, y in dataset.samples])
        names = [Path(path).name for path, _ in dataset.samples]
        if photos and all(n in photos for n in names):
            row["same_photo"], row["same_photo_by_chance"] = neighbour_shares(features, [photos[n] for n in names])
        report["neighbours"].append(row)
        print(row, flush=True)
    return report


def markdown(report: dict) -> str:
    lines = []
    if report["crops"]:
        lines += ["| crop scale from | object kept (mean %) | crops keeping >= half of it (%) | object side in the view (px, median) |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {c['min_scale']} | {c['mean_kept']} | {c['kept_half_or_more']} | {c['object_side_px']} |"
                  for c in report["crops"]]
        lines.append("")
    lines += [f"| backbone | seed | same class among {NEIGHBOURS} nearest (%) | by chance | same photograph (%) | by chance |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in report["neighbours"]:
        lines.append(f"| {r['backbone']} | {r['seed']} | {r['same_class']} | {r['same_class_by_chance']} | "
                     f"{r.get('same_photo', '—')} | {r.get('same_photo_by_chance', '—')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.recipes import METHODS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="the benchmark's --root (a folder view and, for crops, COCO)")
    parser.add_argument("--work", default="benchmarks/runs/quality", help="the benchmark's --work")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", default="", help="JSON report ('' = print only)")
    args = parser.parse_args(argv)
    report = measure(args.root, ROOT / args.work, args.methods, args.seeds)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
