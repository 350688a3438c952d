"""Convert an image dataset into streaming shards: ``python -m ssl_zoo.data.shard {folder,coco,tencent} ROOT OUT``.

Millions of small files on a shared file system starve the GPUs (every image is an open, a stat and a small
read on the metadata server); a few thousand large chunk files read sequentially do not. This module writes
each split of an ImageFolder tree, a COCO ``instances`` file or a Tencent ML-Images list into the chunk
format of litdata (Lightning's streaming format: ``index.json`` plus ``chunk-<worker>-<n>.bin`` files, written
by :func:`litdata.optimize`), which :class:`~ssl_zoo.data.streaming.StreamingDataModule` reads from a local
folder or an object store.

Why litdata and not WebDataset tars (both were tried on the demo data and the benchmark photographs):

* random access by sample index: the chunk index gives every chunk's sample count, so litdata's reader computes
  each epoch's order and each rank's and worker's part without scanning, skips to any point of an epoch on
  resume, and serves the labelled splits of the probes as ordinary map-style datasets. A tar is a stream:
  resuming or indexing it needs a separate index (``wids``) or a scan;
* reading cost: 30 us per sample from a local chunk against 600 us to parse the same sample out of a tar with
  webdataset's pipeline (1,920 demo images, one process);
* object stores (``s3://``, ``gs://``, ...) and the writer's parallel conversion come with the package.

What the shards hold, per sample (a litdata PyTree item):

* ``image``: the original file's bytes, unchanged (no re-encoding, so the pixels are the source's pixels);
* ``labels`` (int32) and ``confidences`` (float32): class indices with their confidences: one label for a
  class-per-folder tree, COCO's categories (mapped to ``0..C-1`` in ascending category id, confidence 1), every
  ``label:confidence`` pair of a Tencent list line (the ancestors' 0.8 / 0.9 included);
* ``source_index`` and ``path``: the sample's index in the source dataset and its path relative to the root.

Every image is decoded once during conversion (at 1/8 JPEG scale by default: the entropy-coded data is
still read in full, so truncation is found, at a fraction of the cost) and an image that cannot be decoded is
left out and listed in ``<split>/bad_samples.txt`` as ``path<TAB>reason``, the format of a run's
``bad_samples.txt``. The samples are written in a shuffled order (``--shuffle-seed``, default 0): a chunk then
holds a random sample of the dataset instead of one class of a sorted folder tree, which is what lets a
reader shuffle chunk by chunk. ``ssl_zoo.json`` beside ``index.json`` describes the split (format, classes,
counts, the conversion settings and its speed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# litdata asks PyPI for a newer version of itself (a 30 s timeout) in every process that opens a dataset;
# cluster nodes rarely reach PyPI. Set before litdata is imported: it reads the variable at import time.
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

import numpy as np  # noqa: E402

from ssl_zoo.data.decode import BadImageError, EncodedImage  # noqa: E402
from ssl_zoo.data.image_list import PathArray  # noqa: E402

__all__ = [
    "BAD_SAMPLES_FILE",
    "META_FILE",
    "ConversionReport",
    "SourceSplit",
    "convert_split",
    "main",
    "read_source",
]

META_FILE = "ssl_zoo.json"
BAD_SAMPLES_FILE = "bad_samples.txt"
SHARD_FORMAT = "ssl_zoo-shards"
SHARD_FORMAT_VERSION = 1

Kind = Literal["folder", "coco", "tencent"]
Verify = Literal["full", "draft", "header"]
_VERIFY_REDUCE = {"full": 1, "draft": 8}


@dataclass
class SourceSplit:
    """One split of a source dataset as the converter needs it: image paths and sparse labels, in source order.

    Attributes:
        kind: ``folder`` (single label), ``coco`` or ``tencent`` (multi-label).
        split: ``train`` or ``val``.
        root: folder the stored ``path`` of each sample is relative to.
        paths: full path of each image.
        label_offsets: ``[N+1]`` CSR row pointers into ``labels`` / ``confidences``.
        labels: ``[L]`` int32 class indices.
        confidences: ``[L]`` float32 confidences (1 unless the source gives them).
        num_classes: number of classes.
        classes: class names in index order (empty when the source has no names, e.g. a Tencent list).
        source: what was read (files and options), recorded in ``ssl_zoo.json``.
    """

    kind: Kind
    split: str
    root: str
    paths: PathArray
    label_offsets: np.ndarray
    labels: np.ndarray
    confidences: np.ndarray
    num_classes: int
    classes: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def multilabel(self) -> bool:
        return self.kind != "folder"

    def label_arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.label_offsets[index], self.label_offsets[index + 1]
        return self.labels[start:end].copy(), self.confidences[start:end].copy()

    def relative_path(self, index: int) -> str:
        path = self.paths[index]
        try:
            return os.path.relpath(path, self.root)
        except ValueError:  # another drive (Windows)
            return path


def _csr(rows: Sequence[Sequence[tuple[int, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    labels = np.fromiter((label for r in rows for label, _ in r), dtype=np.int32, count=int(offsets[-1]))
    confidences = np.fromiter((conf for r in rows for _, conf in r), dtype=np.float32, count=int(offsets[-1]))
    return offsets, labels, confidences


def read_source(kind: Kind, root: str, split: str, **options: Any) -> SourceSplit:
    """Read one split with ssl_zoo's own readers, so order and labels are exactly those of the file-based
    data modules (:class:`~ssl_zoo.data.ImageFolderDataModule`, :class:`~ssl_zoo.data.CocoDataModule`,
    :class:`~ssl_zoo.data.TencentMLDataModule`, whose default file names these options share).

    Options: ``folder``: ``train_dir`` / ``val_dir``; ``coco``: ``train_images``, ``train_ann``, ``val_images``,
    ``val_ann``; ``tencent``: ``train_list``, ``val_list``, ``num_classes``.
    """

    def at(relative: str) -> str:
        return relative if os.path.isabs(relative) else os.path.join(root, relative)

    if kind == "folder":
        from ssl_zoo.data.folder import ImageFolderDataset

        folder = at(options.get(f"{split}_dir", split))
        ds = ImageFolderDataset(folder)
        rows = [[(label, 1.0)] for label in ds.targets]
        offsets, labels, confs = _csr(rows)
        return SourceSplit("folder", split, folder, ds.paths, offsets, labels, confs, ds.num_classes,
                           list(ds.classes), {"folder": folder})
    if kind == "coco":
        from ssl_zoo.data.coco import CocoMultiLabel

        images = at(options.get(f"{split}_images", f"{split}2017"))
        ann = at(options.get(f"{split}_ann", f"annotations/instances_{split}2017.json"))
        ds = CocoMultiLabel(images, ann)
        rows = [[(int(c), 1.0) for c in np.flatnonzero(ds.targets[i].numpy())] for i in range(len(ds))]
        offsets, labels, confs = _csr(rows)
        return SourceSplit("coco", split, images, ds.paths, offsets, labels, confs, ds.num_classes,
                           list(ds.categories), {"images": images, "ann_file": ann,
                                                 "category_ids": list(ds.category_ids)})
    if kind == "tencent":
        from ssl_zoo.data.tencent import TENCENT_NUM_CLASSES, TencentML

        list_file = at(options.get(f"{split}_list", f"tencent/{split}.txt"))
        num_classes = int(options.get("num_classes") or TENCENT_NUM_CLASSES)
        ds = TencentML(root, list_file, num_classes=num_classes)  # every listed label, confidences kept
        return SourceSplit("tencent", split, root, ds.paths, ds.label_offsets, ds.labels, ds.confidences,
                           num_classes, [], {"list_file": list_file})
    raise ValueError(f"kind must be one of folder, coco, tencent; got {kind!r}")


class _ConvertSample:
    """litdata ``optimize`` function: source index -> shard record, or ``None`` (left out) for a bad image.

    Runs in litdata's worker processes; a bad image is appended to ``<report_dir>/bad-<pid>.tsv`` so that
    the parent can merge the reasons of all workers.
    """

    def __init__(self, source: SourceSplit, verify: Verify, report_dir: str) -> None:
        self.source = source
        self.verify = verify
        self.report_dir = report_dir

    def __call__(self, index: int) -> dict[str, Any] | None:
        path = self.source.paths[index]
        try:
            image = EncodedImage.read(path)  # header: empty, not an image, too many pixels
            if self.verify in _VERIFY_REDUCE:
                image.decode(_VERIFY_REDUCE[self.verify])  # body: truncated or corrupt data, bad EXIF
        except BadImageError as error:
            with open(os.path.join(self.report_dir, f"bad-{os.getpid()}.tsv"), "a", encoding="utf-8") as f:
                reason = " ".join(error.reason.split())  # one line per file
                f.write(f"{index}\t{error.path}\t{reason}\n")
            return None
        labels, confidences = self.source.label_arrays(index)
        # The header travels with the bytes, so a reader knows the size before decoding without parsing it again.
        return {"image": image.data, "width": image.size[0], "height": image.size[1], "format": image.format,
                "labels": labels, "confidences": confidences, "source_index": int(index),
                "path": self.source.relative_path(index)}


@dataclass
class ConversionReport:
    """What :func:`convert_split` wrote."""

    out_dir: str
    num_source: int
    num_written: int
    bad: list[tuple[str, str]]
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.num_source / self.seconds if self.seconds > 0 else math.inf


def _parse_bytes(text: str | int) -> int:
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "K": 10**3, "M": 10**6, "G": 10**9, "B": 1}
    value = text.strip().upper()
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * factor)
    return int(value)


def _is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def _prepare_output(out_dir: str, overwrite: bool) -> None:
    if _is_url(out_dir):
        return  # litdata checks remote targets itself (it refuses one holding an index without mode=overwrite)
    path = Path(out_dir)
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output folder '{out_dir}' is not empty; pass --overwrite to replace it")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def _write_text(location: str, text: str) -> None:
    if _is_url(location):
        import fsspec

        with fsspec.open(location, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        Path(location).write_text(text, encoding="utf-8")


def convert_split(
    source: SourceSplit,
    out_dir: str,
    chunk_bytes: str | int = "64MB",
    num_workers: int | None = None,
    shuffle_seed: int | None = 0,
    verify: Verify = "draft",
    overwrite: bool = False,
    verbose: bool = False,
) -> ConversionReport:
    """Write ``source`` into litdata chunks in ``out_dir`` (a folder or an object-store URL litdata can write).

    Args:
        source: the split (:func:`read_source`).
        out_dir: output folder of this split.
        chunk_bytes: target chunk size (``"64MB"``, litdata's recommendation).
        num_workers: conversion processes (default: all cores).
        shuffle_seed: write the samples in the order of a permutation seeded with this; ``None`` keeps the
            source order.
        verify: ``draft`` decodes each JPEG at 1/8 scale (finds truncated and corrupt files), ``full`` at full
            scale, ``header`` reads the header only (empty files, non-images, decompression bombs).
        overwrite: replace a non-empty ``out_dir``.
        verbose: show litdata's progress bar.
    """
    from litdata import optimize

    if verify not in ("full", "draft", "header"):
        raise ValueError(f"verify must be one of full, draft, header; got {verify!r}")
    if len(source) == 0:
        raise ValueError(f"no images in the {source.split} split of {source.source}")
    _prepare_output(out_dir, overwrite)
    order = np.arange(len(source)) if shuffle_seed is None else \
        np.random.default_rng(np.random.SeedSequence([int(shuffle_seed) & 0xFFFFFFFFFFFFFFFF])).permutation(len(source))
    workers = max(1, min(num_workers or os.cpu_count() or 1, len(source)))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ssl_zoo-shard-") as report_dir:
        optimize(
            fn=_ConvertSample(source, verify, report_dir),
            inputs=order.tolist(),
            output_dir=out_dir,
            chunk_bytes=_parse_bytes(chunk_bytes),
            num_workers=workers,
            keep_data_ordered=True,  # each worker converts one contiguous slice: the chunks keep `order`
            reorder_files=False,
            # fork: workers inherit the source lists instead of re-importing torch (spawn costs ~20 s per
            # worker on a busy machine; the conversion itself needs no CUDA).
            start_method="fork" if sys.platform.startswith("linux") else None,
            mode="overwrite" if overwrite else None,
            verbose=verbose,
        )
        seconds = time.perf_counter() - start
        bad_rows: list[tuple[int, str, str]] = []
        for name in os.listdir(report_dir):
            with open(os.path.join(report_dir, name), encoding="utf-8") as f:
                for line in f:
                    index, path, reason = line.rstrip("\n").split("\t", 2)
                    bad_rows.append((int(index), path, reason))
    bad_rows.sort()  # source order, whatever the worker that met the file
    bad = [(path, reason) for _, path, reason in bad_rows]
    written = len(source) - len(bad)
    if written == 0:
        raise RuntimeError(f"none of the {len(source)} images of {source.source} could be read")
    _write_text(_join(out_dir, BAD_SAMPLES_FILE), "".join(f"{p}\t{r}\n" for p, r in bad))
    meta = {
        "format": SHARD_FORMAT,
        "version": SHARD_FORMAT_VERSION,
        "kind": source.kind,
        "split": source.split,
        "multilabel": source.multilabel,
        "num_classes": source.num_classes,
        "classes": source.classes,
        "num_samples": written,
        "num_source": len(source),
        "num_bad": len(bad),
        "source": source.source,
        "shuffle_seed": shuffle_seed,
        "verify": verify,
        "chunk_bytes": _parse_bytes(chunk_bytes),
        "conversion": {"num_workers": workers, "seconds": round(seconds, 3),
                       "images_per_s": round(len(source) / seconds, 1) if seconds > 0 else None},
    }
    _write_text(_join(out_dir, META_FILE), json.dumps(meta, indent=1) + "\n")
    return ConversionReport(out_dir, len(source), written, bad, seconds)


def _join(location: str, name: str) -> str:
    return f"{location.rstrip('/')}/{name}" if _is_url(location) else os.path.join(location, name)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ssl_zoo.data.shard",
        description="Convert a dataset's splits into streaming shards (litdata chunks) for StreamingDataModule.",
        epilog="Example: python -m ssl_zoo.data.shard folder /datasets/imagenet /datasets/imagenet-shards",
    )
    kinds = parser.add_subparsers(dest="kind", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("root", help="dataset root (as given to the file-based data module)")
    common.add_argument("out", help="output folder (or object-store URL); each split goes to OUT/<split>/")
    common.add_argument("--splits", nargs="+", default=["train", "val"], help="splits to convert")
    common.add_argument("--chunk-bytes", default="64MB", help="target chunk size (default 64MB)")
    common.add_argument("--num-workers", type=int, default=None, help="conversion processes (default: all cores)")
    common.add_argument("--shuffle-seed", type=int, default=0, help="seed of the write order (default 0)")
    common.add_argument("--no-shuffle", action="store_true", help="keep the source order")
    common.add_argument("--verify", choices=["draft", "full", "header"], default="draft",
                        help="decode check: JPEG at 1/8 scale (default), full scale, or header only")
    common.add_argument("--overwrite", action="store_true", help="replace non-empty output folders")
    common.add_argument("--verbose", action="store_true", help="litdata's progress bar")

    folder = kinds.add_parser("folder", parents=[common], help="class-per-folder tree (ImageNet layout)")
    folder.add_argument("--train-dir", default="train")
    folder.add_argument("--val-dir", default="val")
    coco = kinds.add_parser("coco", parents=[common], help="COCO instances_*.json (multi-label)")
    coco.add_argument("--train-images", default="train2017")
    coco.add_argument("--train-ann", default="annotations/instances_train2017.json")
    coco.add_argument("--val-images", default="val2017")
    coco.add_argument("--val-ann", default="annotations/instances_val2017.json")
    tencent = kinds.add_parser("tencent", parents=[common], help="Tencent ML-Images lists (multi-label)")
    tencent.add_argument("--train-list", default="tencent/train.txt")
    tencent.add_argument("--val-list", default="tencent/val.txt")
    tencent.add_argument("--num-classes", type=int, default=None, help="default 11166")
    return parser


def main(argv: list[str] | None = None) -> list[ConversionReport]:
    args = _build_parser().parse_args(argv)
    skip = {"kind", "root", "out", "splits", "chunk_bytes", "num_workers", "shuffle_seed", "no_shuffle", "verify",
            "overwrite", "verbose"}
    options = {k: v for k, v in vars(args).items() if k not in skip}
    reports = []
    for split in args.splits:
        source = read_source(args.kind, args.root, split, **options)
        out_dir = _join(args.out, split)
        report = convert_split(source, out_dir, chunk_bytes=args.chunk_bytes, num_workers=args.num_workers,
                               shuffle_seed=None if args.no_shuffle else args.shuffle_seed, verify=args.verify,
                               overwrite=args.overwrite, verbose=args.verbose)
        print(f"{split}: {report.num_written} of {report.num_source} images -> {out_dir} in {report.seconds:.1f} s "
              f"({report.images_per_s:.0f} images/s); {len(report.bad)} left out"
              + (f", listed in {_join(out_dir, BAD_SAMPLES_FILE)}" if report.bad else ""), flush=True)
        reports.append(report)
    return reports


if __name__ == "__main__":
    main()
