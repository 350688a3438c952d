"""Streaming shards: conversion round trips, bad images at conversion, litdata's parts per rank and worker,
exact resume of the stream, the data module in place of the file-based ones, and a SIGKILLed streaming run.
Where our layer differs from litdata's own loader, a test runs litdata alone and shows the difference.

The shards are converted once per session from the tiny demo set (48 + 16 images, 64 px) with small chunks
(16 KB: a few images each), so that every test sees many chunks.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import lightning
import litdata
import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from ssl_zoo.data import CocoMultiLabel, ImageFolderDataset, TencentML, load_image
from ssl_zoo.data.datamodule import ViewDataset
from ssl_zoo.data.decode import BadImageError, EncodedImage
from ssl_zoo.data.shard import BAD_SAMPLES_FILE, META_FILE, convert_split, main, read_source
from ssl_zoo.data.streaming import (
    ShardDataset,
    StreamingDataLoader,
    StreamingDataModule,
    StreamingViewDataset,
    litdata_loader_state,
    record_image,
)
from tests.helpers import resume
from tests.helpers.ddp_utils import run_distributed

ROOT = Path(__file__).resolve().parents[2]
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
    split = ShardDataset(str(location))
    return [split.record(i) for i in range(len(split))]


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
        shards = ShardDataset(str(shard_root / kind / split))
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
    shards = ShardDataset(str(shard_root / "tencent" / "train"), soft_targets=True, min_confidence=0.95)
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
BATCH_OF_4 = 4


def _no_views(image) -> dict[str, torch.Tensor]:
    return {"views": torch.zeros(1)}


def _loader(split_dir: Path, workers: int = 0, seed: int = 7, transform=_no_views, **kwargs) -> StreamingDataLoader:
    shards = ShardDataset(str(split_dir), transform=transform)
    return StreamingDataLoader(StreamingViewDataset(ViewDataset(shards), seed=seed), batch_size=BATCH_OF_4,
                               num_workers=workers, **kwargs)


def _take(loader, batches: int, key: str | None = "index") -> list[list[int]]:
    """The next ``batches`` batches of a new iteration, then stop without exhausting it (as Lightning's fit loop
    stops at ``len(loader)``)."""
    return [(b[key] if key else b).tolist() for b in itertools.islice(iter(loader), batches)]


def _rank_epochs(rank: int, world_size: int, split_dir: str) -> dict[int | str, list]:
    """This rank's samples in epochs 0 and 1, with 0 and with 2 DataLoader workers, and the labelled split as this
    rank reads it by index."""
    loaders = {workers: _loader(Path(split_dir), workers) for workers in (0, 2)}
    epochs: dict[int | str, list] = {workers: [sum(_take(loader, len(loader)), []) for _ in range(2)]
                                     for workers, loader in loaders.items()}
    shards = ShardDataset(split_dir)
    epochs["by_index"] = [shards.record(i)["source_index"] for i in range(len(shards))]
    return epochs


@pytest.mark.distributed
def test_ranks_read_disjoint_equal_parts_of_every_epoch(shard_root):
    """Two gloo processes: litdata gives each the same number of whole batches and no sample twice."""
    split_dir = shard_root / "folder" / "train"
    n, world = len(ShardDataset(str(split_dir))), 2
    per_rank = run_distributed(_rank_epochs, world_size=world, split_dir=str(split_dir))
    for workers in (0, 2):
        for epoch in (0, 1):
            parts = [part[workers][epoch] for part in per_rank]
            assert [len(p) for p in parts] == [n // BATCH_OF_4 // world * BATCH_OF_4] * world
            assert not set(parts[0]) & set(parts[1]) and all(len(set(p)) == len(p) for p in parts)
        assert per_rank[0][workers][0] != per_rank[0][workers][1]  # reshuffled every epoch
    every_record = [r["source_index"] for r in _records(split_dir)]
    assert all(part["by_index"] == every_record for part in per_rank)  # the probes' splits: every record, by index


def test_the_loader_serves_whole_batches_of_distinct_samples_reshuffled_every_epoch(shard_root):
    split_dir = shard_root / "folder" / "train"
    n = len(ShardDataset(str(split_dir)))
    for workers in (0, 2):
        loader = _loader(split_dir, workers)
        assert len(loader) == n // BATCH_OF_4
        epochs = [sum(_take(loader, len(loader)), []) for _ in range(2)]
        for served in epochs:
            assert len(served) == len(set(served)) == n // BATCH_OF_4 * BATCH_OF_4
        assert epochs[0] != epochs[1] and sorted(epochs[0]) != epochs[0]


@pytest.mark.parametrize("done", [1, 2])
def test_stream_resumes_after_the_batches_done(done, shard_root):
    """Resumed after ``done`` batches of epoch 1: the rest of that epoch, then a fresh epoch 2, taking exactly
    ``len(loader)`` batches of each iteration as Lightning does."""
    split_dir = shard_root / "folder" / "train"
    for workers in (0, 2):
        full = _loader(split_dir, workers)
        epochs = [_take(full, len(full)) for _ in range(3)]
        resumed = _loader(split_dir, workers)
        resumed.resume(epoch=1, batches_done=done)
        assert _take(resumed, len(resumed) - done) == epochs[1][done:]
        assert _take(resumed, len(resumed)) == epochs[2]  # the next epoch is complete again


def test_resume_hands_litdata_the_state_its_own_loader_would_have(shard_root):
    """``litdata_loader_state`` builds litdata's own format: equal to ``state_dict()`` of litdata's loader after
    the same batches (a change of litdata's format fails here)."""
    split_dir = shard_root / "folder" / "train"
    for workers, done in ((0, 1), (0, 3), (2, 1), (2, 2), (2, 5)):
        reference = _loader(split_dir, workers)
        iterator = iter(reference)
        for _ in range(done):
            next(iterator)
        expected = reference.state_dict()
        del iterator
        assert litdata_loader_state(_loader(split_dir, workers), 1, done) == expected


def _litdata_alone(split_dir: Path, workers: int, persistent: bool = False) -> litdata.StreamingDataLoader:
    dataset = litdata.StreamingDataset(str(split_dir), shuffle=True, seed=7, drop_last=True, item_shuffle_window=0,
                                       transform=lambda record: record["source_index"])
    return litdata.StreamingDataLoader(dataset, batch_size=BATCH_OF_4, num_workers=workers,
                                       persistent_workers=persistent)


def test_litdata_alone_repeats_a_resumed_epoch_that_the_trainer_left_at_its_length(shard_root):
    """Why :class:`StreamingDataLoader` leaves litdata's resume mode on every new iteration: after
    ``load_state_dict`` litdata leaves it only when an epoch is iterated to exhaustion, which Lightning never does
    when the loader has a length; litdata's next epoch then replays the resumed one."""
    split_dir = shard_root / "folder" / "train"
    full = _litdata_alone(split_dir, 0)
    epochs = [_take(full, len(full), key=None) for _ in range(2)]
    saved = _litdata_alone(split_dir, 0)
    iterator = iter(saved)
    next(iterator), next(iterator)
    state = saved.state_dict()
    resumed = _litdata_alone(split_dir, 0)
    resumed.load_state_dict(state)
    assert _take(resumed, len(resumed) - 2, key=None) == epochs[0][2:]  # the resume itself is exact
    assert _take(resumed, len(resumed), key=None) == epochs[0][2:] != epochs[1]  # litdata: the same batches again


def test_litdata_alone_persistent_workers_repeat_an_epoch_cut_short(shard_root):
    """Why :class:`StreamingDataLoader` starts its workers every epoch: persistent litdata workers count epochs
    when they reach the end of their part, so after an epoch cut short (``limit_train_batches``) the next one is
    served in the same order."""
    split_dir = shard_root / "folder" / "train"
    persistent = _litdata_alone(split_dir, 2, persistent=True)
    assert _take(persistent, 2, key=None) == _take(persistent, 2, key=None)
    ours = _loader(split_dir, 2, persistent_workers=True)  # asked for, not granted
    assert _take(ours, 2) != _take(ours, 2)


def test_litdata_alone_loaded_twice_moves_its_worker_cycle_twice(shard_root):
    """Why :class:`StreamingDataLoader` ignores ``load_state_dict`` (Lightning's, in runs where it hands one back
    after the data module's ``resume``): litdata's loader, handed the same state twice, credits the next batches to
    the wrong workers, which its next checkpoint would carry."""
    split_dir = shard_root / "folder" / "train"
    saved = _litdata_alone(split_dir, 2)
    iterator = iter(saved)
    next(iterator)
    state = saved.state_dict()
    del iterator
    once, twice = _litdata_alone(split_dir, 2), _litdata_alone(split_dir, 2)
    once.load_state_dict(state)
    twice.load_state_dict(state), twice.load_state_dict(state)
    next(iter(once)), next(iter(twice))
    assert once.state_dict()["latest_worker_idx"] == 1 != twice.state_dict()["latest_worker_idx"]

    full, ours = _loader(split_dir, 2), _loader(split_dir, 2)
    ours.resume(0, 1)
    ours.load_state_dict(state), ours.load_state_dict(state)
    assert _take(ours, len(ours) - 1) == _take(full, len(full))[1:]
    assert ours.state_dict()["latest_worker_idx"] == full.state_dict()["latest_worker_idx"]


def _source_index(record: dict) -> float:
    return float(record["source_index"])


class _RecordingLoader(litdata.StreamingDataLoader):
    loaded: list[int] = []

    def load_state_dict(self, obj: dict) -> None:
        _RecordingLoader.loaded.append(obj["num_samples_yielded"])
        super().load_state_dict(obj)


class _TinyModule(lightning.LightningModule):
    def __init__(self, asks_for_total_steps: bool) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.asks_for_total_steps = asks_for_total_steps

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return (self.w * batch).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.asks_for_total_steps:  # as every method's warmup-cosine schedule does
            assert self.trainer.estimated_stepping_batches > 0
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_hands_litdata_its_state_back_only_without_estimated_stepping_batches(shard_root, tmp_path):
    """Why the data module, not Lightning, resumes the loader: a mid-epoch checkpoint's loader state reaches
    litdata's loader only when ``configure_optimizers`` did not ask for ``estimated_stepping_batches`` (Lightning
    builds the loader then, before restoring the loops, and does not build it again)."""
    settings = {"max_epochs": 2, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                "enable_model_summary": False, "accelerator": "cpu"}

    def loader() -> _RecordingLoader:
        return _RecordingLoader(litdata.StreamingDataset(str(shard_root / "folder" / "train"), shuffle=True,
                                                         drop_last=True, transform=_source_index), batch_size=4)

    handed_back = {}
    for asks in (True, False):
        trainer = lightning.Trainer(max_steps=2, **settings)
        trainer.fit(_TinyModule(asks), loader())
        trainer.save_checkpoint(tmp_path / "mid_epoch.ckpt")
        _RecordingLoader.loaded = []
        lightning.Trainer(max_steps=4, **settings).fit(_TinyModule(asks), loader(), ckpt_path=tmp_path / "mid_epoch.ckpt")
        handed_back[asks] = _RecordingLoader.loaded
    assert handed_back == {True: [], False: [8]}  # 2 batches of 4 samples


def test_views_are_functions_of_seed_epoch_and_index(shard_root):
    from ssl_zoo.augment import mocov2_transform

    def views_by_index(workers: int) -> dict[tuple[int, int], torch.Tensor]:
        loader = _loader(shard_root / "folder" / "train", workers, seed=5, transform=mocov2_transform(16))
        return {(epoch, int(i)): v for epoch in (0, 1) for batch in itertools.islice(iter(loader), len(loader))
                for i, v in zip(batch["index"], batch["views"], strict=True)}

    one, two = views_by_index(0), views_by_index(2)
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)  # whatever worker served the sample
    both = next(i for epoch, i in one if epoch == 0 and (1, i) in one)
    assert not torch.equal(one[0, both], one[1, both])  # another epoch, other views


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
    """A URL (litdata's ``local:`` store: the downloader and cache that ``s3://`` and ``gs://`` go through) is
    copied chunk by chunk into ``cache_dir`` and served as the local folder is; the labelled splits read it by
    index. A root litdata cannot read is refused in one line."""
    cache = tmp_path / "cache"
    settings = {"batch_size": 4, "num_workers": 0, "train_transform": lambda img: {"views": torch.zeros(1)}}
    remote = StreamingDataModule(root=f"local:{shard_root / 'folder'}", cache_dir=str(cache), **settings)
    local = StreamingDataModule(root=str(shard_root / "folder"), **settings)
    assert remote.num_classes == local.num_classes == 10
    remote_loader, local_loader = remote.train_dataloader(), local.train_dataloader()
    assert _take(remote_loader, len(remote_loader)) == _take(local_loader, len(local_loader))
    assert list(cache.rglob("chunk-*.bin"))  # read from copies in the cache
    val, local_val = remote.labelled_dataset("val"), local.labelled_dataset("val")
    assert all(torch.equal(val[i][0], local_val[i][0]) for i in range(len(local_val)))
    with pytest.raises(FileNotFoundError, match=r"data.root: 'local:.*nothing/train/ssl_zoo.json' does not exist"):
        StreamingDataModule(root=f"local:{tmp_path / 'nothing'}", cache_dir=str(cache)).num_classes  # noqa: B018
    with pytest.raises(ValueError, match=r"data.root: 'memory://shards': litdata reads s3://"):
        StreamingDataModule(root="memory://shards").check_root()


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
    shards = str(shard_root / "folder")
    steps_per_epoch = len(ShardDataset(f"{shards}/train")) // BATCH
    every, kill_after, total = steps_per_epoch + 1, steps_per_epoch + 3, 2 * steps_per_epoch
    assert kill_after < total
    full_dir, runs, marker = tmp_path / "full", tmp_path / "runs", tmp_path / "stalled"
    stall = resume.stall_callback(kill_after, marker)
    full = resume.start_run(_command(shards, every, "--trainer.default_root_dir", str(full_dir)))
    victim = resume.start_run(_command(shards, every, "--run_root", str(runs), f"--trainer.callbacks+={stall}"))
    resume.kill_when_stalled(victim, marker, timeout=400)
    (killed_dir,) = (runs / "mpcl").iterdir()
    ckpt = resume.load_checkpoint(killed_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == every and ckpt["epoch"] == 1
    position = ckpt["StreamingDataModule"]["train_stream"]  # the data module's state_dict
    assert position["epoch"] == 1 and position["batches"] == 1 and position["num_workers"] == 2

    resumed = subprocess.run(_command(shards, every, "--run_root", str(runs), "--resume", "true"),
                             cwd=ROOT, env=resume.run_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out[-3000:]

    resume.assert_resumed_run_matches(full_dir, killed_dir, every, total)


def test_batches_collate(shard_root):
    shards = ShardDataset(str(shard_root / "coco" / "val"),
                          transform=lambda img: {"views": torch.zeros(2, 3, 4, 4)})
    batch = default_collate([ViewDataset(shards)[i] for i in range(3)])
    assert batch["target"].shape == (3, shards.num_classes) and batch["index"].tolist() == [0, 1, 2]


def test_records_carry_the_header_and_decode_as_the_files(demo_root, shard_root):
    """Records read through litdata hold the file's bytes with the stored header; they decode exactly as the file
    does, at full and reduced scale. A record without a stored header is parsed."""
    shards = ShardDataset(str(shard_root / "folder" / "train"))
    source = ImageFolderDataset(f"{demo_root}/folder/train")
    for index in range(5):
        record = shards.record(index)
        image = record_image(record, "test")
        from_file = EncodedImage.read(source.paths[record["source_index"]])
        assert image.size == from_file.size and image.format == from_file.format
        for reduce in (1, 2):
            assert np.array_equal(np.asarray(image.decode(reduce)), np.asarray(from_file.decode(reduce)))
        old = {k: v for k, v in record.items() if k not in ("width", "height", "format")}
        assert record_image(old, "test").size == from_file.size
    with pytest.raises(BadImageError, match="exceeds the limit"):
        EncodedImage.with_header(b"...", "big.jpg", (100_000, 100_000), "JPEG")
