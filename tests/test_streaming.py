"""Streaming shards: conversion round trips, bad images at conversion, the epoch's parts per rank and worker,
exact resume of the stream, the data module in place of the file-based ones, and a SIGKILLed streaming run.

The shards are converted once per session from the tiny demo set (48 + 16 images, 64 px) with small chunks
(16 KB: a few images each), so that every test sees many chunks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from ssl_zoo.data import CocoMultiLabel, ImageFolderDataset, TencentML, load_image
from ssl_zoo.data.datamodule import ViewDataset
from ssl_zoo.data.io import BadImageError, EncodedImage
from ssl_zoo.data.shard import BAD_SAMPLES_FILE, META_FILE, convert_split, main, read_source
from ssl_zoo.data.streaming import (
    ShardDataset,
    ShardSplit,
    StreamingDataLoader,
    StreamingDataModule,
    StreamingViewDataset,
    rank_segments,
    record_image,
    worker_pieces,
)

ROOT = Path(__file__).resolve().parents[1]
CHUNK = "16KB"


@pytest.fixture(scope="session")
def shard_root(demo_root, tmp_path_factory) -> Path:
    """The demo set converted in all three formats: ``<root>/{folder,coco,tencent}/{train,val}``."""
    out = tmp_path_factory.mktemp("shards")
    main(["folder", f"{demo_root}/folder", str(out / "folder"), "--chunk-bytes", CHUNK, "--num-workers", "1"])
    for kind in ("coco", "tencent"):
        for split in ("train", "val"):
            convert_split(read_source(kind, demo_root, split, num_classes=12), str(out / kind / split),
                          chunk_bytes=CHUNK, num_workers=1)
    return out


def _records(location: Path) -> list[dict]:
    split = ShardSplit(str(location))
    return [split.read(i) for i in range(len(split))]


# ------------------------------------------------------------------------------------------ round trips
def _source_dataset(kind: str, demo_root: str, split: str):
    if kind == "folder":
        return ImageFolderDataset(f"{demo_root}/folder/{split}")
    if kind == "coco":
        return CocoMultiLabel(f"{demo_root}/{split}2017", f"{demo_root}/annotations/instances_{split}2017.json")
    return TencentML(demo_root, f"{demo_root}/tencent/{split}.txt", num_classes=12)


@pytest.mark.parametrize("kind", ["folder", "coco", "tencent"])
def test_round_trip_same_images_labels_and_order(kind, demo_root, shard_root):
    for split in ("train", "val"):
        source = _source_dataset(kind, demo_root, split)
        records = _records(shard_root / kind / split)
        # Order: the permutation of the source that the seed names, every image exactly once.
        order = [r["source_index"] for r in records]
        assert sorted(order) == list(range(len(source)))
        expected = np.random.default_rng(np.random.SeedSequence([0])).permutation(len(source)).tolist()
        assert order == expected
        shards = ShardDataset(ShardSplit(str(shard_root / kind / split)))
        assert len(shards) == len(source)
        for position, record in enumerate(records):
            i = record["source_index"]
            assert record["image"] == Path(source.paths[i]).read_bytes()  # the file's bytes, not re-encoded
            header = EncodedImage.read(source.paths[i])  # the stored header is the file's
            assert (record["width"], record["height"], record["format"]) == (*header.size, header.format)
            image, target = shards[position]
            assert np.array_equal(np.asarray(image), np.asarray(load_image(source.paths[i])))
            if kind == "folder":
                assert target == source.target(i)
            else:
                assert torch.equal(target, source.target(i))
    meta = json.loads((shard_root / kind / "train" / META_FILE).read_text())
    assert meta["multilabel"] == (kind != "folder") and meta["num_bad"] == 0


def test_tencent_confidences_travel_with_the_images(demo_root, shard_root):
    source = TencentML(demo_root, f"{demo_root}/tencent/train.txt", num_classes=12, soft_targets=True,
                       min_confidence=0.95)
    shards = ShardDataset(ShardSplit(str(shard_root / "tencent" / "train")), soft_targets=True, min_confidence=0.95)
    for position in range(len(shards)):
        record = shards.record(position)
        pairs = list(zip(record["labels"].tolist(), record["confidences"].tolist(), strict=True))
        assert pairs == [(label, pytest.approx(conf)) for label, conf in
                         TencentML(demo_root, f"{demo_root}/tencent/train.txt", num_classes=12).label_pairs(
                             record["source_index"])]
        assert torch.equal(shards[position][1], source.target(record["source_index"]))


def test_same_seed_same_order_other_seed_other_order_no_shuffle_source_order(demo_root, tmp_path):
    source = read_source("folder", f"{demo_root}/folder", "val")
    orders = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4), ("d", None)):
        convert_split(source, str(tmp_path / name), chunk_bytes=CHUNK, num_workers=2, shuffle_seed=seed)
        orders[name] = [r["source_index"] for r in _records(tmp_path / name)]
    assert orders["a"] == orders["b"] != orders["c"]  # two conversion workers keep the order too
    assert orders["d"] == list(range(len(source)))


# ------------------------------------------------------------------------------------------ bad images
def test_broken_images_are_left_out_and_listed(demo_root, tmp_path):
    tree = tmp_path / "folder"
    shutil.copytree(f"{demo_root}/folder/train", tree / "train", copy_function=shutil.copyfile)
    files = sorted(p for p in (tree / "train").rglob("*.jpg"))
    truncated, empty, html = files[3], files[10], files[20]
    truncated.write_bytes(truncated.read_bytes()[: len(truncated.read_bytes()) // 2])
    empty.write_bytes(b"")
    html.write_bytes(b"<html><body>404 Not Found</body></html>")
    source = read_source("folder", str(tree), "train")
    report = convert_split(source, str(tmp_path / "out"), chunk_bytes=CHUNK, num_workers=2)

    bad_paths = {str(truncated), str(empty), str(html)}
    assert report.num_written == len(source) - 3
    lines = (tmp_path / "out" / BAD_SAMPLES_FILE).read_text().splitlines()
    listed = [line.split("\t") for line in lines]
    assert all(len(fields) == 2 for fields in listed)  # path<TAB>reason, as a run's bad_samples.txt
    assert [path for path, _ in listed] == [p for p in source.paths if p in bad_paths]  # in source order
    reasons = dict(listed)
    assert "empty" in reasons[str(empty)] and "not a recognised image" in reasons[str(html)]
    assert "truncated" in reasons[str(truncated)].lower()
    kept = {source.paths[r["source_index"]] for r in _records(tmp_path / "out")}
    assert kept == set(source.paths) - bad_paths


# ------------------------------------------------------------------------------------------ ranks and workers
def _stream(split_dir: Path, rank: int = 0, world: int = 1, workers: int = 0, batch: int = 4, window: int = 2,
            seed: int = 7) -> StreamingViewDataset:
    identity = ShardDataset(ShardSplit(str(split_dir)), transform=lambda img: {"views": torch.zeros(1)})
    return StreamingViewDataset(ViewDataset(identity), seed=seed, rank=rank, world_size=world, batch_size=batch,
                                num_workers=workers, shuffle_window=window)


def _served(stream: StreamingViewDataset, workers: int, epoch: int) -> list[int]:
    stream.set_epoch(epoch)
    loader = StreamingDataLoader(stream, batch_size=stream.batch_size, drop_last=True, num_workers=workers)
    return torch.cat([batch["index"] for batch in loader]).tolist()


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_read_disjoint_parts_that_cover_the_epoch(world, shard_root):
    split_dir = shard_root / "folder" / "train"
    n = len(ShardSplit(str(split_dir)))
    for epoch in (0, 1):
        parts = [set(_stream(split_dir, r, world).epoch_indices(epoch)) for r in range(world)]
        for a in range(world):
            for b in range(a + 1, world):
                assert not parts[a] & parts[b]
        covered = set().union(*parts)
        # every sample but those of the last incomplete batch of each rank; the part sizes are equal
        per_rank = n // world
        assert all(len(p) == per_rank // 4 * 4 for p in parts)
        assert len(covered) == world * (per_rank // 4 * 4) and covered <= set(range(n))
    # the segments themselves partition N - N mod W samples
    sizes = ShardSplit(str(split_dir)).chunk_sizes
    segments = [rank_segments(sizes, 7, 0, r, world) for r in range(world)]
    samples = [i for part in segments for s in part for i in range(s.start, s.stop)]
    assert len(samples) == len(set(samples)) == n - n % world


def test_each_worker_reads_its_own_chunks_and_the_loader_serves_the_plan(shard_root):
    split_dir = shard_root / "folder" / "train"
    segments = rank_segments(ShardSplit(str(split_dir)).chunk_sizes, 7, 0, 0, 1)
    pieces = worker_pieces(segments, batch_size=4, num_workers=2)
    samples = [[i for s in piece for i in range(s.start, s.stop)] for piece in pieces]
    assert not set(samples[0]) & set(samples[1]) and all(len(s) % 4 == 0 for s in samples)
    for workers in (0, 2):
        stream = _stream(split_dir, workers=workers)
        for epoch in (0, 1):
            assert _served(stream, workers, epoch) == stream.epoch_indices(epoch)
    a, b = _stream(split_dir, workers=2).epoch_indices(0), _stream(split_dir, workers=2).epoch_indices(1)
    assert a != b and sorted(a) != a  # reshuffled every epoch


@pytest.mark.parametrize("done", [1, 2])
def test_stream_resumes_after_the_batches_done(done, shard_root):
    split_dir = shard_root / "folder" / "train"
    full = _stream(split_dir, workers=2).epoch_indices(1)
    resumed = _stream(split_dir, workers=2)
    resumed.resume(epoch=1, batches_done=done)
    loader = StreamingDataLoader(resumed, batch_size=4, drop_last=True, num_workers=2)
    assert torch.cat([b["index"] for b in loader]).tolist() == full[4 * done:]
    resumed.set_epoch(2)  # the next epoch is complete again
    assert _served(resumed, 2, 2) == _stream(split_dir, workers=2).epoch_indices(2)


def test_views_are_functions_of_seed_epoch_and_index(shard_root):
    from ssl_zoo.augment import mocov2_transform

    def views_by_index(workers: int) -> dict[int, torch.Tensor]:
        shards = ShardDataset(ShardSplit(str(shard_root / "folder" / "train")), transform=mocov2_transform(16))
        stream = StreamingViewDataset(ViewDataset(shards), seed=5, rank=0, world_size=1, batch_size=4,
                                      num_workers=workers)
        loader = StreamingDataLoader(stream, batch_size=4, drop_last=True, num_workers=workers)
        return {int(i): v for batch in loader for i, v in zip(batch["index"], batch["views"], strict=True)}

    one, two = views_by_index(0), views_by_index(2)
    assert one.keys() == two.keys()
    assert all(torch.equal(one[i], two[i]) for i in one)


# ------------------------------------------------------------------------------------------ the data module
def test_data_module_in_place_of_the_file_based_ones(demo_root, shard_root):
    from ssl_zoo.data import TencentMLDataModule

    dm = StreamingDataModule(root=str(shard_root / "tencent"), batch_size=4, num_workers=0)
    files = TencentMLDataModule(root=demo_root, num_classes=12, batch_size=4, num_workers=0)
    assert dm.num_classes == 12 and dm.multilabel
    val = dm.labelled_dataset("val")
    reference = files.labelled_dataset("val")
    for position in range(len(val)):
        image, target = val[position]
        source_index = val.record(position)["source_index"]
        ref_image, ref_target = reference[source_index]
        assert torch.equal(image, ref_image) and torch.equal(target, ref_target)
    batch = next(iter(dm.labelled_dataloader("val", batch_size=8)))
    assert batch[0].shape[0] == 8 and batch[1].shape == (8, 12)
    folder = StreamingDataModule(root=str(shard_root / "folder"), batch_size=4, num_workers=0)
    assert folder.num_classes == 10 and not folder.multilabel

    train = StreamingDataModule(root=str(shard_root / "folder"), batch_size=4, num_workers=0,
                                train_transform=lambda img: {"views": torch.zeros(2, 3, 8, 8)})
    loader = train.train_dataloader()
    batch = next(iter(loader))
    assert batch["views"].shape == (4, 2, 3, 8, 8) and batch["target"].shape == (4,)
    assert len(loader) == len(train.train_set) // 4


def test_missing_or_foreign_root_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StreamingDataModule(root=str(tmp_path / "nowhere")).check_root()
    (tmp_path / "train").mkdir()
    dm = StreamingDataModule(root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"not a converted split.*python -m ssl_zoo.data.shard"):
        dm.num_classes  # noqa: B018


def test_object_store_url_is_read_through_the_cache(shard_root, tmp_path):
    """A URL (here fsspec's in-memory file system) is copied chunk by chunk into the cache and released after use."""
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    for path in (shard_root / "folder" / "train").iterdir():
        memory.pipe(f"/shards/train/{path.name}", path.read_bytes())
    remote = ShardSplit("memory://shards/train", cache_dir=str(tmp_path / "cache"))
    assert remote.remote and remote.local_dir.startswith(str(tmp_path / "cache"))
    local = ShardSplit(str(shard_root / "folder" / "train"))
    identity = ShardDataset(remote, transform=lambda img: {"views": torch.zeros(1)})
    stream = StreamingViewDataset(ViewDataset(identity), seed=1, rank=0, world_size=1, batch_size=4, num_workers=0)
    served = [int(item["index"]) for item in stream]
    assert served == _stream(shard_root / "folder" / "train", seed=1).epoch_indices(0)
    assert not [f for f in os.listdir(remote.local_dir) if f.endswith(".bin")]  # released after use
    assert remote.read(5)["image"] == local.read(5)["image"]  # random access fetches the chunk on demand
    with pytest.raises(FileNotFoundError, match="memory://shards/nothing"):
        ShardSplit("memory://shards/nothing", cache_dir=str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------------ SIGKILL + resume
BATCH = 4  # about 27 single-label demo images: 6 steps per epoch


def _command(shards: str, every: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ssl_zoo", "fit", "--config", "experiments/mpcl/demo.yaml",
            "--model.init_args.backbone", "test_resnet", "--model.init_args.img_size", "32",
            "--model.init_args.queue_size", "64", "--model.init_args.projector_hidden_dims", "64",
            "--data", "ssl_zoo.data.StreamingDataModule", "--data.init_args.root", shards,
            "--data.init_args.batch_size", str(BATCH), "--data.init_args.num_workers", "2",
            "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--checkpoint_every_n_steps", str(every), *extra]


@pytest.mark.slow
def test_killed_streaming_run_resumes_exactly(shard_root, tmp_path):
    """SIGKILL part-way through epoch 1, --resume: the same per-step losses and final state as without the kill."""
    from test_resume import _env, _load, assert_resumed_run_matches

    shards = str(shard_root / "folder")
    steps_per_epoch = len(ShardSplit(f"{shards}/train")) // BATCH
    every, kill_after, total = steps_per_epoch + 1, steps_per_epoch + 3, 2 * steps_per_epoch
    assert kill_after < total
    full_dir, runs, marker = tmp_path / "full", tmp_path / "runs", tmp_path / "stalled"
    stall = json.dumps({"class_path": "test_resume.StallAfterStep",
                        "init_args": {"step": kill_after, "marker": str(marker)}})
    full = subprocess.Popen(_command(shards, every, "--trainer.default_root_dir", str(full_dir)),
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = subprocess.Popen(_command(shards, every, "--run_root", str(runs), f"--trainer.callbacks+={stall}"),
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 400
        while not marker.exists():
            assert victim.poll() is None, f"the run to be killed ended early:\n{victim.communicate()[0][-3000:]}"
            assert time.monotonic() < deadline, "the run to be killed never reached its stall step"
            time.sleep(0.2)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    finally:
        if victim.poll() is None:
            victim.kill()
    (killed_dir,) = (runs / "mpcl").iterdir()
    ckpt = _load(killed_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == every and ckpt["epoch"] == 1
    position = ckpt["StreamingDataModule"]["train_stream"]  # the data module's state_dict
    assert position["epoch"] == 1 and position["batches"] == 1 and position["num_workers"] == 2

    resumed = subprocess.run(_command(shards, every, "--run_root", str(runs), "--resume", "true"),
                             cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out[-3000:]

    assert_resumed_run_matches(full_dir, killed_dir, every, total)


def test_batches_collate(shard_root):
    shards = ShardDataset(ShardSplit(str(shard_root / "coco" / "val")),
                          transform=lambda img: {"views": torch.zeros(2, 3, 4, 4)})
    batch = default_collate([ViewDataset(shards)[i] for i in range(3)])
    assert batch["target"].shape == (3, shards.num_classes) and batch["index"].tolist() == [0, 1, 2]


def test_open_range_reads_each_record_when_asked_as_litdata_reads_it(shard_root):
    """The streaming reader's per-record reads (any order) give litdata's own records; closed, it refuses."""
    split = ShardSplit(str(shard_root / "folder" / "train"))
    stop = int(split.chunk_starts[1])
    with split.open_range(0, stop) as records:
        for i in reversed(range(stop)):  # a shuffled window asks in any order
            record, expected = records[i], split.read(i)
            assert bytes(record["image"]) == expected["image"]
            assert record["source_index"] == expected["source_index"] and record["path"] == expected["path"]
        assert 0 in records and stop not in records
        with pytest.raises(IndexError, match="not in"):
            records[stop]
    with pytest.raises(ValueError, match="closed"):
        records[1]


def test_records_of_a_range_are_read_in_place_and_decode_as_the_files(demo_root, shard_root):
    """read_range hands out memoryviews into its reads (no second copy) with the stored header; they decode
    exactly as the file does, at full and reduced scale. A record without a stored header is parsed."""
    split = ShardSplit(str(shard_root / "folder" / "train"))
    stop = int(split.chunk_starts[1])
    source = ImageFolderDataset(f"{demo_root}/folder/train")
    for record in split.read_range(0, min(stop, 5)):
        image = record_image(record, "test")
        from_file = EncodedImage.read(source.paths[record["source_index"]])
        assert image.size == from_file.size and image.format == from_file.format
        for reduce in (1, 2):
            assert np.array_equal(np.asarray(image.decode(reduce)), np.asarray(from_file.decode(reduce)))
        old = {k: v for k, v in record.items() if k not in ("width", "height", "format")}
        assert record_image(old, "test").size == from_file.size
    with pytest.raises(BadImageError, match="exceeds the limit"):
        EncodedImage.with_header(b"...", "big.jpg", (100_000, 100_000), "JPEG")
