"""View-generation throughput per CPU core on real JPEG photographs, against lightly's SimSiamTransform.

    python -m benchmarks.data_pipeline --json benchmarks/results/data_pipeline.json

The photographs are the JPEGs that scikit-learn ships (``china.jpg``, ``flower.jpg``) and, when scikit-image is
installed, its JPEG samples (``hubble_deep_field.jpg``, ``retina.jpg``, ``rocket.jpg``). Each is decoded once
(PIL open + RGB conversion; the decode time is reported on its own), then every transform is applied to the
decoded images in one process with one torch thread: views/s per core.

Transforms, with the methods' paper defaults at ``--size`` (224):

* ``bam``: BAM's block-wise augmentation, 4 blocks x 2 SimSiam views = 8 views per image (``BAMIA``);
* ``simsiam``: ssl_zoo's SimSiam views (the same module with ``bam=False``, 2 views);
* ``lightly_simsiam``: ``lightly.transforms.SimSiamTransform`` (2 views), the reference;
* ``mocov2``: MoCo v2's two views (``MPCL``);
* ``mvp``: one crop normalised for the student and for the CLIP teacher, plus a BEiT block-wise mask (``MVP``);
* ``hvp_mtl``: two RandAugment views plus a SimMIM mask (``HVPMTL``, Swin patch 4).

Rounds interleave the transforms (each round times all of them in turn); figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from benchmarks.timing import ROOT, environment, median_time, write_json

SKLEARN_IMAGES = ("china.jpg", "flower.jpg")
SKIMAGE_IMAGES = ("hubble_deep_field.jpg", "retina.jpg", "rocket.jpg")


def photograph_paths() -> list[Path]:
    """The JPEG photographs shipped by scikit-learn and, when installed, scikit-image."""
    try:
        import sklearn
    except ImportError as err:
        raise RuntimeError("the data pipeline benchmark needs scikit-learn's sample JPEGs: pip install scikit-learn"
                           ) from err
    paths = [Path(sklearn.__file__).parent / "datasets" / "images" / name for name in SKLEARN_IMAGES]
    try:
        import skimage

        paths += [Path(skimage.__file__).parent / "data" / name for name in SKIMAGE_IMAGES]
    except ImportError:
        pass
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"sample photographs missing from the installed packages: {', '.join(missing)}")
    return paths


def decode(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")  # convert() loads the pixels: the image is decoded here, once


def transforms(size: int) -> dict[str, Callable[[Image.Image], Any]]:
    """The methods' view transforms with their paper defaults, and lightly's SimSiam reference."""
    from lightly.transforms import SimSiamTransform

    from ssl_zoo.augment import BlockwiseAugmentation, HVPTransform, MVPTransform, mocov2_transform

    grid = size // 16  # ViT/16 patch grid of MVP's student
    return {
        "bam": BlockwiseAugmentation(size=size, overlap=0.2, min_scale=0.2, bam=True),
        "simsiam": BlockwiseAugmentation(size=size, min_scale=0.2, bam=False),
        "lightly_simsiam": SimSiamTransform(input_size=size, min_scale=0.2),
        "mocov2": mocov2_transform(size),
        # BEiT's 75 of 196 masked patches and 16-patch rectangles at 224 px, in proportion at other sizes
        "mvp": MVPTransform(size=size, patch_size=16, num_masking_patches=75 * grid**2 // 196,
                            min_num_patches=max(1, 16 * grid**2 // 196)),
        "hvp_mtl": HVPTransform(size=size, model_patch_size=4, mask_patch_size=32),
    }


def count_views(output: Any) -> int:
    """Views in one transform output: ssl_zoo's ``{"views": [V, 3, S, S], ...}`` or lightly's list of views."""
    if isinstance(output, dict):
        return int(output["views"].shape[0])
    if isinstance(output, list | tuple):
        return len(output)
    raise TypeError(f"unexpected transform output {type(output).__name__}")


def markdown_table(report: dict[str, Any]) -> str:
    """The results of a report as a Markdown table."""
    lines = ["| transform | views per image | views/s per core | ms per image | views/s vs lightly SimSiam |",
             "| --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        versus = r["views_per_s_vs_lightly_simsiam"]
        lines.append(f"| {r['transform']} | {r['views_per_call']} | {r['views_per_s_per_core']:.1f} "
                     f"| {r['ms_per_image']:.1f} | {'' if versus is None else f'{versus:.2f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224, help="view side in pixels")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--passes", type=int, default=4, help="passes over the photographs per round and transform")
    parser.add_argument("--transforms", nargs="+", default=None, help="subset of the transforms to time")
    parser.add_argument("--json", default="benchmarks/results/data_pipeline.json")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of --json and exit")
    args = parser.parse_args(argv)
    if args.table:
        report = json.loads((ROOT / args.json).read_text())
        print(markdown_table(report))
        return report
    if args.size % 32:
        parser.error("--size must be a multiple of 32 (HVP-MTL's 32 px mask patches)")

    torch.set_num_threads(1)  # per core: one process, one thread
    paths = photograph_paths()
    images = [decode(p) for p in paths]
    decode_s = [median_time(lambda p=p: decode(p), 3) for p in paths]
    candidates = transforms(args.size)
    chosen = args.transforms or list(candidates)
    unknown = sorted(set(chosen) - set(candidates))
    if unknown:
        parser.error(f"unknown transforms {unknown}; choose from {', '.join(candidates)}")

    views_per_call = {name: count_views(candidates[name](images[0])) for name in chosen}  # also a warm-up
    seconds: dict[str, list[float]] = {name: [] for name in chosen}
    for r in range(args.rounds):
        for name in chosen:
            torch.manual_seed(r)
            transform = candidates[name]
            start = time.perf_counter()
            for _ in range(args.passes):
                for img in images:
                    transform(img)
            seconds[name].append(time.perf_counter() - start)

    calls = args.passes * len(images)
    results = []
    for name in chosen:
        per_round = seconds[name]
        median_s = statistics.median(per_round)
        results.append({
            "transform": name,
            "views_per_call": views_per_call[name],
            "views_per_s_per_core": calls * views_per_call[name] / median_s,
            "images_per_s_per_core": calls / median_s,
            "ms_per_image": 1e3 * median_s / calls,
            "rounds_s": per_round,
        })
    reference = next((r for r in results if r["transform"] == "lightly_simsiam"), None)
    for r in results:
        r["views_per_s_vs_lightly_simsiam"] = (r["views_per_s_per_core"] / reference["views_per_s_per_core"]
                                              if reference else None)
    report = {
        "command": "python -m benchmarks.data_pipeline " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": environment(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "images": [{"file": p.name, "width": im.width, "height": im.height, "decode_ms": 1e3 * s}
                   for p, im, s in zip(paths, images, decode_s, strict=True)],
        "decode_ms_per_image": 1e3 * statistics.mean(decode_s),
        "results": results,
    }
    write_json(args.json, report)
    print(f"decode (open + RGB) {report['decode_ms_per_image']:.1f} ms per image, {len(images)} photographs, "
          f"cpu count {os.cpu_count()}")
    for r in results:
        print(f"{r['transform']:16s} {r['views_per_call']} views  {r['views_per_s_per_core']:8.1f} views/s/core  "
              f"{r['ms_per_image']:7.2f} ms/image", flush=True)
    return report


if __name__ == "__main__":
    main()
