"""kNN evaluation (``ssl_zoo.eval.knn``): the weighted vote against a brute force (single- and multi-label),
cosine similarity and k clipping, a perfect score on its own training set, the kNN monitor in a fit."""

import math
import os

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer

from ssl_zoo.data import ImageFolderDataModule
from ssl_zoo.eval.knn import KNNMonitor, knn_evaluate, knn_predict
from ssl_zoo.eval.transforms import SingleView, center_crop_transform
from ssl_zoo.models import Backbone
from tests.helpers.toy_images import ToyImageDataset


def reference_knn(features, bank, labels, num_classes, k, t):
    """DINO's weighted vote with explicit loops (labels: ints, or multi-hot rows)."""
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    out = []
    for q in f:
        sims = b @ q
        nearest = np.argsort(-sims)[:k]
        votes = np.zeros(num_classes)
        for j in nearest:
            y = np.eye(num_classes)[labels[j]] if np.ndim(labels[j]) == 0 else labels[j]
            votes += math.exp(sims[j] / t) * y
        out.append(votes / sum(math.exp(sims[j] / t) for j in nearest))
    return np.array(out)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_predict_matches_brute_force_single_label(k):
    rng = np.random.default_rng(k)
    bank, feats = rng.normal(size=(50, 8)), rng.normal(size=(7, 8))
    labels = rng.integers(0, 4, size=50)
    got = knn_predict(torch.from_numpy(feats), torch.from_numpy(bank), torch.from_numpy(labels), 4, k=k,
                      temperature=0.07, chunk_size=3)
    np.testing.assert_allclose(got.numpy(), reference_knn(feats, bank, labels, 4, k, 0.07), atol=1e-5)
    torch.testing.assert_close(got.sum(1), torch.ones(7))


def test_knn_predict_matches_brute_force_multi_label():
    rng = np.random.default_rng(5)
    bank, feats = rng.normal(size=(30, 6)), rng.normal(size=(4, 6))
    labels = (rng.random((30, 3)) < 0.4).astype(np.float32)
    got = knn_predict(torch.from_numpy(feats), torch.from_numpy(bank), torch.from_numpy(labels), k=10,
                      temperature=0.5)
    np.testing.assert_allclose(got.numpy(), reference_knn(feats, bank, labels, 3, 10, 0.5), atol=1e-5)
    assert ((got >= 0) & (got <= 1 + 1e-6)).all()


def test_knn_predict_is_cosine_and_clips_k():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    scaled_query = torch.tensor([[100.0, 1.0]])  # cosine: nearest is class 0 whatever the norm
    got = knn_predict(scaled_query, bank * 7, labels, k=50, temperature=0.07)  # k > N is clipped
    assert got.argmax(1).item() == 0 and got.shape == (1, 2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn_predict(scaled_query, bank, labels, k=0)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(scaled_query, bank, labels, temperature=0.0)


def test_knn_evaluate_with_k1_on_its_own_training_set_is_perfect():
    torch.manual_seed(0)
    backbone = Backbone("resnet18")
    loader = torch.utils.data.DataLoader(ToyImageDataset(), batch_size=5)
    got = knn_evaluate(backbone, loader, loader, k=1)
    assert got["top1"] == pytest.approx(100.0)
    assert backbone.training  # mode restored after the frozen pass


class _TinyPretraining(LightningModule):
    """The minimum a pre-training method has for the kNN monitor: a ``.backbone`` and a view transform."""

    def __init__(self):
        super().__init__()
        self.backbone = Backbone("resnet18")

    def train_transform(self):
        return SingleView(center_crop_transform(32))

    def training_step(self, batch, batch_idx):
        return self.backbone(batch["views"][:, 0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.slow
def test_knn_monitor_logs_knn_accuracy(demo_root, tmp_path):
    datamodule = ImageFolderDataModule(root=os.path.join(demo_root, "folder"), batch_size=8, num_workers=0)
    trainer = Trainer(max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, default_root_dir=tmp_path, accelerator="cpu",
                      callbacks=[KNNMonitor(img_size=32, k=5)])
    module = _TinyPretraining()
    trainer.fit(module, datamodule=datamodule)
    assert "val/knn_top5" in trainer.callback_metrics

    # Brute force on the backbone as the monitor saw it (lr 0: only BN statistics moved, before the vote):
    # centre-cropped 32 px features, each query's 5 most cosine-similar bank images vote with exp(s / 0.07).
    module.backbone.eval()
    features = {}
    for split in ("train", "val"):
        dataset = datamodule.labelled_dataset(split, transform=center_crop_transform(32))
        with torch.no_grad():
            features[split] = [(module.backbone(image[None])[0], int(target)) for image, target in dataset]
    hits = 0
    for query, target in features["val"]:
        sims = sorted(((float(torch.cosine_similarity(query, f, dim=0)), label) for f, label in features["train"]),
                      reverse=True)[:5]
        votes = {}
        for sim, label in sims:
            votes[label] = votes.get(label, 0.0) + math.exp(sim / 0.07)
        hits += max(votes, key=votes.get) == target
    expected = 100.0 * hits / len(features["val"])
    assert float(trainer.callback_metrics["val/knn_top1"]) == pytest.approx(expected, abs=1e-3)
