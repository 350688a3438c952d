"""The multi-label evaluation paths end to end: files -> data module -> features -> vote / probe -> metric.

* the multi-label kNN vote of :class:`~ssl_zoo.eval.FinalKNNProbe` (``probe/knn_mAP``, the metric of half the
  sweep files) against a brute-force loop over the vote and over average precision;
* the kNN vote and the GAMP linear probe on features where the answer is known (mAP 100);
* evaluation under 2 processes (DistributedSampler pads the last shard) equal to 1 process.

The data is a small COCO-format set written here: 32 px grey images, 3 categories (COCO ids 2, 5, 9), a
category present as a bright 8 x 8 square in its own colour channel at a random place.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from PIL import Image
from torch import nn

from ssl_zoo.data import CocoDataModule
from ssl_zoo.eval import FinalKNNProbe, KNNProbe, MultiLabelLinearProbe, read_eval_records
from ssl_zoo.eval.transforms import resize_transform
from ssl_zoo.models import Backbone

CATEGORY_IDS = (2, 5, 9)
SIZE = 32


def _write_split(root: Path, split: str, num: int, seed: int) -> None:
    """Training images cycle through all 8 label sets (each set is in the bank); validation ones are random."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    (root / f"{split}2017").mkdir(parents=True)
    for i in range(num):
        labels = np.array([(i >> c) & 1 for c in range(3)], bool) if split == "train" else rng.random(3) < 0.5
        pixels = np.full((SIZE, SIZE, 3), 110, dtype=np.uint8)
        for c in np.flatnonzero(labels):
            x, y = rng.integers(0, SIZE - 8, size=2)
            pixels[y:y + 8, x:x + 8, c] = 255
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": CATEGORY_IDS[c],
                                "bbox": [float(x), float(y), 8.0, 8.0], "area": 64.0, "iscrowd": 0})
        name = f"{i:04d}.png"
        Image.fromarray(pixels).save(root / f"{split}2017" / name)
        images.append({"id": i + 1, "file_name": name, "width": SIZE, "height": SIZE})
    (root / "annotations").mkdir(exist_ok=True)
    categories = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in CATEGORY_IDS]
    (root / "annotations" / f"instances_{split}2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories}))


@pytest.fixture(scope="module")
def squares_root(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("squares")
    _write_split(root, "train", 40, seed=0)
    _write_split(root, "val", 15, seed=1)  # odd: 2 processes get padded shards
    return str(root)


def _datamodule(root: str, batch_size: int = 4) -> CocoDataModule:
    return CocoDataModule(root=root, batch_size=batch_size, num_workers=0)


class ColourMap(nn.Module):
    """A "backbone" whose last feature map is the normalised image itself: GAP / GAMP features of the
    squares data encode exactly which categories are present."""

    name = "colour_map"
    num_features = 3

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # something for .parameters() to find

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_map(x).mean(dim=(2, 3))


# ---------------------------------------------------------------------- brute force
def _features(backbone: nn.Module, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    backbone.eval()
    with torch.no_grad():
        items = [dataset[i] for i in range(len(dataset))]
        feats = torch.stack([backbone(image[None])[0] for image, _ in items]).double()
    return feats, torch.stack([torch.as_tensor(t) for _, t in items]).double()


def _brute_force_knn_scores(queries, bank, bank_targets, k: int, temperature: float) -> torch.Tensor:
    scores = []
    for q in queries:
        sims = [float(q @ b / (q.norm() * b.norm())) for b in bank]
        nearest = sorted(range(len(bank)), key=lambda j: -sims[j])[:k]
        weights = np.exp([sims[j] / temperature for j in nearest])
        weights /= weights.sum()
        scores.append(sum(w * bank_targets[j] for w, j in zip(weights, nearest, strict=True)))
    return torch.stack(scores)


def _brute_force_map(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over classes with a positive of: mean over positives i of precision among samples scoring >= s_i."""
    aps = []
    for c in range(targets.shape[1]):
        positives = [i for i in range(len(targets)) if targets[i, c] == 1]
        if not positives:
            continue
        precisions = []
        for i in positives:
            retrieved = [j for j in range(len(targets)) if scores[j, c] >= scores[i, c]]
            precisions.append(sum(targets[j, c] for j in retrieved) / len(retrieved))
        aps.append(float(sum(precisions) / len(precisions)))
    return 100.0 * sum(aps) / len(aps)


class _Recorder:
    def __init__(self) -> None:
        self.logged = []

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append((metrics, step))


def _final_knn(backbone: nn.Module, datamodule, tmp_path: Path, **probe_args) -> dict:
    recorder = _Recorder()
    trainer = SimpleNamespace(is_global_zero=True, datamodule=datamodule, loggers=[recorder], callback_metrics={},
                              fast_dev_run=False, default_root_dir=str(tmp_path), global_step=3, current_epoch=0,
                              precision_plugin=SimpleNamespace(forward_context=nullcontext))
    FinalKNNProbe(max_train_samples=None, max_val_samples=None, **probe_args).on_train_end(
        trainer, SimpleNamespace(backbone=backbone, hparams={"img_size": SIZE}))
    (logged, step), = recorder.logged
    assert step == 3
    return logged


# ---------------------------------------------------------------------- tests
def test_multilabel_knn_probe_matches_a_brute_force_vote_and_average_precision(squares_root, tmp_path):
    torch.manual_seed(0)
    backbone = Backbone("test_resnet")
    datamodule = _datamodule(squares_root)
    logged = _final_knn(backbone, datamodule, tmp_path, k=5, temperature=0.07)

    transform = resize_transform(SIZE)  # the multi-label evaluation transform: whole image, no crop
    bank, bank_targets = _features(backbone, datamodule.labelled_dataset("train", transform=transform))
    queries, targets = _features(backbone, datamodule.labelled_dataset("val", transform=transform))
    assert bank_targets.shape == (40, 3) and targets.shape == (15, 3)
    scores = _brute_force_knn_scores(queries, bank, bank_targets, k=5, temperature=0.07)
    assert logged["probe/knn_mAP"] == pytest.approx(_brute_force_map(scores, targets), abs=1e-3)
    record, = read_eval_records(tmp_path / "eval.json")
    assert record["metrics"]["mAP"] == pytest.approx(logged["probe/knn_mAP"])


def test_multilabel_knn_on_features_that_encode_the_labels_is_perfect(squares_root, tmp_path):
    logged = _final_knn(ColourMap(), _datamodule(squares_root), tmp_path, k=1, pooling="gap")
    assert logged["probe/knn_mAP"] == pytest.approx(100.0)
    assert logged["probe/knn_OF1"] == pytest.approx(100.0)


@pytest.mark.slow
def test_gamp_probe_learns_features_that_encode_the_labels(squares_root, tmp_path):
    torch.manual_seed(0)
    probe = MultiLabelLinearProbe(backbone="test_resnet", img_size=SIZE, cache_features=True, base_lr=100.0)
    probe.backbone = ColourMap().requires_grad_(False)
    trainer = Trainer(max_epochs=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
                      num_sanity_val_steps=0, check_val_every_n_epoch=30)
    trainer.fit(probe, datamodule=_datamodule(squares_root, batch_size=8))
    assert probe.last_val_metrics["mAP"] == pytest.approx(100.0)
    assert probe.last_val_metrics["OF1"] > 90.0


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_evaluation_equals_one_process(squares_root, tmp_path):
    """15 validation images over 2 processes: 8 each, one padded duplicate that must not count twice."""
    results = {}
    for devices in (1, 2):
        torch.manual_seed(0)
        probe = KNNProbe(backbone="test_resnet", img_size=SIZE, k=5)
        trainer = Trainer(devices=devices, accelerator="cpu", strategy="ddp_spawn" if devices > 1 else "auto",
                          logger=False, enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=tmp_path / f"devices{devices}")
        trainer.validate(probe, datamodule=_datamodule(squares_root, batch_size=3))
        record, = read_eval_records(tmp_path / f"devices{devices}" / "eval.json")
        assert record["settings"]["world_size"] == devices
        results[devices] = record["metrics"]
    assert results[2].keys() == results[1].keys() and "mAP" in results[1]
    for name, value in results[1].items():
        assert results[2][name] == pytest.approx(value, abs=1e-6), name
