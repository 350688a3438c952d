"""The end-of-run kNN probe (``ssl_zoo.eval.final_probe``) against a brute-force vote, and its argument checks."""

import math
import warnings
from types import SimpleNamespace

import pytest
import torch


class _Recorder:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step=None):
        self.logged.append((dict(metrics), step))


def _brute_force_knn_top1(backbone, train_items, val_items, k, temperature):
    """Cosine similarity to every bank image, k nearest, exp(s/T)-weighted class votes, arg-max vs label."""
    backbone.eval()
    with torch.no_grad():
        bank = torch.nn.functional.normalize(backbone(torch.stack([x for x, _ in train_items])), dim=1)
        queries = torch.nn.functional.normalize(backbone(torch.stack([x for x, _ in val_items])), dim=1)
    correct = 0
    for q, (_, label) in zip(queries, val_items, strict=True):
        sims = [float(q @ b) for b in bank]
        nearest = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        votes = {}
        for j in nearest:
            votes[train_items[j][1]] = votes.get(train_items[j][1], 0.0) + math.exp(sims[j] / temperature)
        correct += max(votes, key=votes.get) == label
    return 100.0 * correct / len(val_items)


def test_final_knn_probe_matches_brute_force(demo_root, tmp_path):
    from contextlib import nullcontext

    from ssl_zoo.data import ImageFolderDataModule
    from ssl_zoo.eval import FinalKNNProbe, read_eval_records
    from ssl_zoo.eval.transforms import center_crop_transform
    from ssl_zoo.models import Backbone

    torch.manual_seed(0)
    datamodule = ImageFolderDataModule(root=f"{demo_root}/folder", batch_size=8, num_workers=0)
    module = SimpleNamespace(backbone=Backbone("resnet18"), hparams={"img_size": 32})
    recorder = _Recorder()
    trainer = SimpleNamespace(is_global_zero=True, datamodule=datamodule, loggers=[recorder], callback_metrics={},
                              fast_dev_run=False, default_root_dir=str(tmp_path), global_step=7, current_epoch=1,
                              precision_plugin=SimpleNamespace(forward_context=nullcontext))
    probe = FinalKNNProbe(k=5, max_train_samples=None, max_val_samples=None)
    probe.on_train_end(trainer, module)

    (logged, step), = recorder.logged
    assert step == 7
    transform = center_crop_transform(32)  # the method's img_size, single-label evaluation transform
    train_items = list(datamodule.labelled_dataset("train", transform=transform))
    val_items = list(datamodule.labelled_dataset("val", transform=transform))
    expected = _brute_force_knn_top1(module.backbone, train_items, val_items, k=5, temperature=0.07)
    assert logged["probe/knn_top1"] == pytest.approx(expected, abs=1e-4)
    assert float(trainer.callback_metrics["probe/knn_top1"]) == pytest.approx(expected, abs=1e-4)
    record, = read_eval_records(tmp_path / "eval.json")
    assert record["protocol"] == "knn_end_of_pretraining"
    assert record["metrics"]["top1"] == pytest.approx(expected, abs=1e-4)
    assert record["settings"]["bank_size"] == len(train_items)


def test_final_knn_probe_skips_without_a_backbone(demo_root):
    from ssl_zoo.eval import FinalKNNProbe

    recorder = _Recorder()
    trainer = SimpleNamespace(is_global_zero=True, datamodule=None, loggers=[recorder])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        FinalKNNProbe().on_train_end(trainer, SimpleNamespace(hparams={}))
    assert not recorder.logged
    assert any("FinalKNNProbe skipped" in str(w.message) for w in caught)


def test_final_knn_probe_rejects_bad_arguments():
    from ssl_zoo.eval import FinalKNNProbe

    for kwargs, key in [({"k": 0}, "k"), ({"temperature": 0.0}, "temperature"), ({"pooling": "cls"}, "pooling"),
                        ({"max_val_samples": 0}, "max_val_samples")]:
        with pytest.raises(ValueError, match=key):
            FinalKNNProbe(**kwargs)
