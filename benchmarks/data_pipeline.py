"""Input pipeline throughput per CPU core on real JPEG photographs, against lightly's matching transforms, and
reading from streaming shards against reading the same images from files.

    python -m benchmarks.data_pipeline --json benchmarks/results/data_pipeline.json

The photographs are the JPEGs that scikit-learn ships (``china.jpg``, ``flower.jpg``) and, when scikit-image is
installed, its JPEG samples (``hubble_deep_field.jpg``, ``retina.jpg``, ``rocket.jpg``). One process, one torch
thread (a DataLoader worker is single-threaded; ``--processes N`` runs N such processes at once, one per core).

**Views.** Every transform, with the methods' paper defaults at ``--size`` (224), on two kinds of input:

* ``bytes``: the file's bytes in memory, what a DataLoader worker holds after reading a file or a shard record.
  ssl_zoo's SimSiam / MoCo / BAM transforms take them undecoded (they decode once, at the JPEG scale their
  crops allow); everything else gets ``PIL.Image.open(...).convert("RGB")`` first, as lightly's datasets do;
* ``decoded``: the decoded RGB image, so the transform alone is timed.

Transforms: ``bam`` (BAM's 4 blocks x 2 SimSiam views, 8 views per image), ``simsiam`` (2 views) against
``lightly_simsiam`` (``lightly.transforms.SimSiamTransform``), ``mocov2`` against ``lightly_mocov2``
(``MoCoV2Transform``), ``mvp`` (one crop for student and CLIP teacher plus a block mask), ``hvp_mtl`` (two
RandAugment views plus a SimMIM mask). Each round times every transform in turn, each ssl_zoo transform right
next to its lightly counterpart; a ratio is the median over rounds of the per-round ratio, so a change of the
machine's load hits both sides of it.

**Shards.** ``--shard-copies`` copies of the photographs as a class-per-folder tree (one class per photograph),
converted with ``python -m ssl_zoo.data.shard`` (conversion images/s with 1 worker and with all cores), then
read in interleaved rounds from the files (open + read + header, and + full decode) and from the shards
(litdata's ``StreamingDataset`` iterated with the training stream's settings, + header, and + full decode), the
same images in the same order on both paths: the order litdata serves an epoch in (chunks permuted, each chunk's
records permuted). Each image is timed on both paths back to back (the order alternating from image to image), so
that the load of a shared machine hits both paths alike. The page cache holds both after the first round: this
is the CPU cost of each path, not a network file system's latency.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from benchmarks.timing import ROOT, environment, median_time, write_json

SKLEARN_IMAGES = ("china.jpg", "flower.jpg")
SKIMAGE_IMAGES = ("hubble_deep_field.jpg", "retina.jpg", "rocket.jpg")
#: ssl_zoo transform -> lightly's transform with the same recipe
LIGHTLY_PEERS = {"simsiam": "lightly_simsiam", "mocov2": "lightly_mocov2"}
INPUTS = ("bytes", "decoded")


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


def decode_bytes(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def transforms(size: int) -> dict[str, Callable[[Any], Any]]:
    """The methods' view transforms with their paper defaults, and lightly's SimSiam and MoCo v2 references."""
    from lightly.transforms import MoCoV2Transform, SimSiamTransform

    from ssl_zoo.augment import BlockwiseAugmentation, HVPTransform, MVPTransform, mocov2_transform

    grid = size // 16  # ViT/16 patch grid of MVP's student
    return {
        "simsiam": BlockwiseAugmentation(size=size, min_scale=0.2, bam=False),
        "lightly_simsiam": SimSiamTransform(input_size=size, min_scale=0.2),
        "mocov2": mocov2_transform(size),
        "lightly_mocov2": MoCoV2Transform(input_size=size, min_scale=0.2),
        "bam": BlockwiseAugmentation(size=size, overlap=0.2, min_scale=0.2, bam=True),
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


def _caller(transform: Callable, kind: str) -> Callable[[bytes, Image.Image], Any]:
    """How a worker calls ``transform`` on input ``kind``: bytes go undecoded only to transforms that take them."""
    if kind == "decoded":
        return lambda data, image: transform(image)
    if getattr(transform, "accepts_encoded", False):
        from ssl_zoo.data.decode import EncodedImage

        return lambda data, image: transform(EncodedImage(data, "photo"))
    return lambda data, image: transform(decode_bytes(data))


def time_transforms(size: int, rounds: int, passes: int, chosen: list[str], kinds: list[str]) -> dict[str, Any]:
    """Seconds per round for every (input kind, transform), rounds interleaved (runs in one process)."""
    torch.set_num_threads(1)  # per core: one process, one thread
    paths = photograph_paths()
    datas = [p.read_bytes() for p in paths]
    images = [decode(p) for p in paths]
    candidates = transforms(size)
    views = {name: count_views(candidates[name](images[0])) for name in chosen}  # also a warm-up
    calls = {(kind, name): _caller(candidates[name], kind) for kind in kinds for name in chosen}
    seconds: dict[str, list[float]] = {f"{kind}/{name}": [] for kind in kinds for name in chosen}
    for r in range(rounds):
        for kind in kinds:
            for name in chosen:
                torch.manual_seed(r)
                call = calls[kind, name]
                start = time.perf_counter()
                for _ in range(passes):
                    for data, image in zip(datas, images, strict=True):
                        call(data, image)
                seconds[f"{kind}/{name}"].append(time.perf_counter() - start)
    return {"seconds": seconds, "views": views, "calls_per_round": passes * len(images)}


def _time_in_process(args: tuple) -> dict[str, Any]:
    return time_transforms(*args)


def summarise(timings: list[dict[str, Any]], chosen: list[str], kinds: list[str]) -> list[dict[str, Any]]:
    """Per (input, transform): median rates over rounds (and processes) and the paired ratio to lightly's peer."""
    views, calls = timings[0]["views"], timings[0]["calls_per_round"]
    results = []
    for kind in kinds:
        for name in chosen:
            per_round = [s for t in timings for s in t["seconds"][f"{kind}/{name}"]]
            median_s = statistics.median(per_round)
            peer = LIGHTLY_PEERS.get(name)
            ratio = None
            if peer in chosen:
                # views/s ratio per round (same views per image on both sides), paired within a process
                ratios = [lightly / ours for t in timings for ours, lightly in
                          zip(t["seconds"][f"{kind}/{name}"], t["seconds"][f"{kind}/{peer}"], strict=True)]
                ratio = statistics.median(ratios)
            results.append({
                "input": kind,
                "transform": name,
                "views_per_call": views[name],
                "views_per_s_per_core": calls * views[name] / median_s,
                "images_per_s_per_core": calls / median_s,
                "ms_per_image": 1e3 * median_s / calls,
                "lightly_peer": peer if peer in chosen else None,
                "speedup_vs_lightly": ratio,
                "rounds_s": per_round,
            })
    return results


# ----------------------------------------------------------------------------------------- shards vs files
def shard_benchmark(copies: int, rounds: int, workdir: Path, batch_decode: int | str | None = None) -> dict[str, Any]:
    """Convert ``copies`` copies of the photographs and time reading them from files and from the shards
    (``batch_decode``: litdata's setting for the shard reader; default the training stream's)."""
    import litdata

    from ssl_zoo.data.decode import EncodedImage
    from ssl_zoo.data.shard import convert_split, read_source
    from ssl_zoo.data.streaming import READ_SETTINGS, keep_freed_buffers, record_image

    paths = photograph_paths()
    tree = workdir / "photos" / "train"
    for path in paths:
        folder = tree / path.stem
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(copies):
            shutil.copyfile(path, folder / f"{k:05d}_{path.name}")
    source = read_source("folder", str(workdir / "photos"), "train")
    conversion = []
    for workers in sorted({1, os.cpu_count() or 1}):
        out = workdir / f"shards-{workers}"
        report = convert_split(source, str(out), num_workers=workers, chunk_bytes="64MB")
        conversion.append({"num_workers": workers, "images": report.num_source, "seconds": report.seconds,
                           "images_per_s": report.images_per_s})
    split = workdir / f"shards-{conversion[0]['num_workers']}"
    settings = {**READ_SETTINGS, **({} if batch_decode is None else {"batch_decode": batch_decode})}
    stream = litdata.StreamingDataset(str(split), shuffle=True, seed=0, **settings)

    def shard_records() -> Any:
        stream.set_epoch(1)  # the same epoch, so the same order, every round
        return iter(stream)

    # Both paths serve the same images in the same order, the stream's (the files of its records, one at a time,
    # as a map-style loader reads them).
    file_paths = [source.paths[record["source_index"]] for record in shard_records()]

    def paired_round(full: bool) -> tuple[float, float]:
        """Seconds on the file path and on the shard path over all images, timed image by image in pairs (the
        file then the record, or the record then the file, alternately), so that a change in the load of the
        (shared) machine hits both paths alike."""
        records, seconds = shard_records(), [0.0, 0.0]
        for k, path in enumerate(file_paths):
            for shard in ((False, True) if k % 2 else (True, False)):
                start = time.perf_counter()
                image = record_image(next(records), "benchmark") if shard else EncodedImage.read(path)
                if full:
                    image.decode()
                seconds[shard] += time.perf_counter() - start
        assert next(records, None) is None
        return seconds[0], seconds[1]

    keep_freed_buffers()  # what a streaming DataLoader worker does; the file path runs in the same allocator
    reads: dict[str, list[float]] = {"files": [], "shards": [], "files+decode": [], "shards+decode": []}
    paired_round(False)  # warm the page cache for both
    for _ in range(rounds):
        for suffix, full in (("", False), ("+decode", True)):
            files_s, shards_s = paired_round(full)
            reads[f"files{suffix}"].append(files_s)
            reads[f"shards{suffix}"].append(shards_s)
    n = len(file_paths)
    ratio = statistics.median(f / s for f, s in zip(reads["files"], reads["shards"], strict=True))
    ratio_decode = statistics.median(f / s for f, s in zip(reads["files+decode"], reads["shards+decode"], strict=True))
    return {
        "images": n,
        "bytes": sum(p.stat().st_size for p in paths) * copies,
        "chunks": len(json.loads((split / "index.json").read_text())["chunks"]),
        "litdata_settings": settings,
        "conversion": conversion,
        "read_images_per_s": {name: n / statistics.median(s) for name, s in reads.items()},
        "shards_vs_files": ratio,
        "shards_vs_files_with_decode": ratio_decode,
        "rounds_s": reads,
    }


# ----------------------------------------------------------------------------------------- report
def markdown_table(report: dict[str, Any]) -> str:
    """The view results of a report as a Markdown table (one row per input and transform)."""
    lines = ["| input | transform | views per image | views/s per core | images/s per core | ms per image "
             "| speed-up vs lightly's peer |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        versus = r["speedup_vs_lightly"]
        peer = f"{versus:.2f} (vs {r['lightly_peer']})" if versus is not None else ""
        lines.append(f"| {r['input']} | {r['transform']} | {r['views_per_call']} | {r['views_per_s_per_core']:.1f} "
                     f"| {r['images_per_s_per_core']:.1f} | {r['ms_per_image']:.1f} | {peer} |")
    return "\n".join(lines)


def shards_table(shards: dict[str, Any]) -> str:
    rates = shards["read_images_per_s"]
    lines = ["| read path | images/s (files) | images/s (shards) | shards / files |", "| --- | --- | --- | --- |",
             f"| read + header | {rates['files']:.0f} | {rates['shards']:.0f} | {shards['shards_vs_files']:.2f} |",
             f"| read + full decode | {rates['files+decode']:.0f} | {rates['shards+decode']:.0f} | "
             f"{shards['shards_vs_files_with_decode']:.2f} |"]
    conv = "; ".join(f"{c['num_workers']} worker{'s' if c['num_workers'] > 1 else ''}: {c['images_per_s']:.0f} images/s"
                     for c in shards["conversion"])
    return "\n".join(lines) + f"\n\nConversion of {shards['images']} images: {conv}."


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224, help="view side in pixels")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--passes", type=int, default=4, help="passes over the photographs per round and transform")
    parser.add_argument("--transforms", nargs="+", default=None, help="subset of the transforms to time")
    parser.add_argument("--inputs", nargs="+", choices=INPUTS, default=list(INPUTS), help="input kinds to time")
    parser.add_argument("--processes", type=int, default=1, help="processes timing at once (one per core)")
    parser.add_argument("--shard-copies", type=int, default=100,
                        help="copies of each photograph for the shards-vs-files read test (0 skips it)")
    parser.add_argument("--shard-batch-decode", type=lambda v: int(v) if v.lstrip("-").isdigit() else v,
                        default=None, help="litdata's batch_decode for the shard reader (default: the training "
                        "stream's, 0; 'auto' is litdata's own default)")
    parser.add_argument("--json", default="benchmarks/results/data_pipeline.json")
    parser.add_argument("--table", action="store_true", help="print the Markdown tables of --json and exit")
    args = parser.parse_args(argv)
    if args.table:
        report = json.loads((ROOT / args.json).read_text())
        print(markdown_table(report))
        if report.get("shards"):
            print()
            print(shards_table(report["shards"]))
        return report
    if args.size % 32:
        parser.error("--size must be a multiple of 32 (HVP-MTL's 32 px mask patches)")
    names = list(transforms(args.size))
    chosen = args.transforms or names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"unknown transforms {unknown}; choose from {', '.join(names)}")
    chosen = [n for n in names if n in chosen]  # each ssl_zoo transform next to its lightly peer

    work = (args.size, args.rounds, args.passes, chosen, args.inputs)
    if args.processes > 1:
        with multiprocessing.get_context("fork").Pool(args.processes) as pool:
            timings = pool.map(_time_in_process, [work] * args.processes)
    else:
        timings = [time_transforms(*work)]
    torch.set_num_threads(1)
    paths = photograph_paths()
    decode_s = [median_time(lambda p=p: decode(p), 3) for p in paths]
    shards = None
    if args.shard_copies > 0:
        with tempfile.TemporaryDirectory(prefix="ssl_zoo-bench-shards-") as workdir:
            shards = shard_benchmark(args.shard_copies, max(3, args.rounds), Path(workdir), args.shard_batch_decode)
    report = {
        "command": "python -m benchmarks.data_pipeline " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": environment(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "images": [{"file": p.name, "width": im.width, "height": im.height, "decode_ms": 1e3 * s}
                   for p, im, s in zip(paths, (decode(p) for p in paths), decode_s, strict=True)],
        "decode_ms_per_image": 1e3 * statistics.mean(decode_s),
        "results": summarise(timings, chosen, args.inputs),
        "shards": shards,
    }
    write_json(args.json, report)
    print(f"decode (open + RGB) {report['decode_ms_per_image']:.1f} ms per image, {len(paths)} photographs, "
          f"{args.processes} process(es), cpu count {os.cpu_count()}")
    print(markdown_table(report))
    if shards:
        print()
        print(shards_table(shards))
    return report


if __name__ == "__main__":
    main()
