"""Weighted k-nearest-neighbour evaluation of frozen features (InstDisc §3.4, DINO §4.1 / ``eval_knn.py``).

Each validation feature votes with its ``k`` most cosine-similar training features, neighbour j weighted
by ``exp(s_j / T)``; the class scores are the weighted votes. Defaults are DINO's: k = 20, T = 0.07.

* :func:`knn_predict` — the vote, single-label (class indices) or multi-label (multi-hot targets);
* :func:`knn_evaluate` — features of two loaders -> top-1 / top-5 (or the multi-label metrics);
* :class:`KNNProbe` — the same as an evaluation LightningModule
  (``python -m ssl_zoo validate --config experiments/eval/knn_demo.yaml --model.init_args.ckpt ...``);
* :class:`KNNMonitor` — a callback that tracks kNN accuracy of a pre-training run on detached features.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from ssl_zoo.eval.features import FeaturePoolingName, check_pooling, embed, extract_features, split_batch
from ssl_zoo.eval.metrics import multilabel_metrics
from ssl_zoo.eval.module import EvalModule, single_label_metrics
from ssl_zoo.eval.transforms import SingleView, center_crop_transform, resize_transform
from ssl_zoo.models.backbones import Backbone

__all__ = ["KNNMonitor", "KNNProbe", "check_knn_args", "knn_evaluate", "knn_predict"]

#: Names of the monitor's metrics: ``val/knn_top1`` (single-label) or ``val/knn_mAP`` (multi-label) ...
MONITOR_PREFIX = "val/knn_"


def check_knn_args(k: int, temperature: float) -> None:
    """Raise ``ValueError`` unless ``k >= 1`` neighbours and the vote's temperature ``T > 0`` (every kNN entry
    point checks its arguments here, before any feature is computed)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def knn_predict(
    features: Tensor,
    bank: Tensor,
    bank_targets: Tensor,
    num_classes: int | None = None,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> Tensor:
    """Class scores ``[B, C]`` of a weighted kNN vote (InstDisc §3.4, DINO §4.1).

    With s_j the cosine similarity of a query to its j-th nearest bank feature (j = 1..k),
    score_c = sum_j w_j * y_jc with w_j = exp(s_j / T) / sum_l exp(s_l / T), where y_j is the one-hot
    (single-label) or multi-hot (multi-label) target of neighbour j. The normalisation makes single-label
    scores sum to 1 and multi-label scores lie in [0, 1]; it does not change the ranking of DINO's
    unnormalised vote.

    Args:
        features: queries ``[B, D]`` (L2-normalised here).
        bank: training features ``[N, D]`` (L2-normalised here).
        bank_targets: ``LongTensor[N]`` class indices, or ``Tensor[N, C]`` multi-hot targets.
        num_classes: classes for index targets (default: ``max + 1``); ignored for multi-hot targets.
        k: neighbours (clipped to ``N``).
        temperature: T of the vote weights.
        chunk_size: queries per similarity matrix (bounds memory at ``chunk_size x N``).
    """
    check_knn_args(k, temperature)
    if features.dim() != 2 or bank.dim() != 2 or features.shape[1] != bank.shape[1]:
        raise ValueError(f"features [B, D] and bank [N, D] must share D; got {tuple(features.shape)} and "
                         f"{tuple(bank.shape)}")
    if bank_targets.shape[0] != bank.shape[0]:
        raise ValueError(f"bank_targets has {bank_targets.shape[0]} rows for a bank of {bank.shape[0]} features")
    if bank_targets.dim() == 1:
        num_classes = int(num_classes if num_classes is not None else bank_targets.max().item() + 1)
        votes_of = nn.functional.one_hot(bank_targets.long(), num_classes).float()  # [N, C]
    elif bank_targets.dim() == 2:
        votes_of = bank_targets.float()
    else:
        raise ValueError(f"bank_targets must be [N] or [N, C], got shape {tuple(bank_targets.shape)}")
    k = min(k, bank.shape[0])
    bank = nn.functional.normalize(bank.float(), dim=1)
    votes_of = votes_of.to(bank.device)
    out = []
    for start in range(0, features.shape[0], chunk_size):
        q = nn.functional.normalize(features[start:start + chunk_size].float().to(bank.device), dim=1)
        sims, idx = (q @ bank.t()).topk(k, dim=1)  # [b, k] cosine similarities of the k nearest
        weights = (sims / temperature).softmax(dim=1)  # exp(s/T) normalised over the neighbours
        out.append(torch.einsum("bk,bkc->bc", weights, votes_of[idx]))  # [b, C]
    return torch.cat(out)


def _knn_metrics(scores: Tensor, targets: Tensor) -> dict[str, float]:
    if targets.dim() == 2:
        return multilabel_metrics(scores, targets)
    return single_label_metrics(scores, targets)


@torch.no_grad()
def knn_evaluate(
    backbone: Backbone,
    train_loader: Iterable,
    val_loader: Iterable,
    k: int = 20,
    temperature: float = 0.07,
    pooling: FeaturePoolingName = "backbone",
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """kNN accuracy of a frozen backbone: the training features are the bank, validation features vote.

    Loaders yield ``(images, targets)`` (``labelled_dataloader``) or view dicts; use a deterministic
    transform for both. Returns ``{"top1", "top5"}`` in percent for class-index targets, and
    :func:`~ssl_zoo.eval.metrics.multilabel_metrics` (mAP ... OF1) for multi-hot targets.
    """
    check_knn_args(k, temperature)
    bank, bank_targets = extract_features(backbone, train_loader, pooling, device)
    feats, targets = extract_features(backbone, val_loader, pooling, device)
    num_classes = None
    if bank_targets.dim() == 1:
        num_classes = int(max(bank_targets.max().item(), targets.max().item()) + 1)
    scores = knn_predict(feats, bank, bank_targets, num_classes, k, temperature)
    return _knn_metrics(scores, targets)


def evenly_spaced_subset(dataset, cap: int | None):
    """At most ``cap`` samples, evenly spaced over the dataset (every class of a sorted folder tree stays in)."""
    if cap is None or cap >= len(dataset):
        return dataset
    return Subset(dataset, torch.linspace(0, len(dataset) - 1, cap).long().tolist())


def labelled_split_loader(datamodule, split: str, size: int, cap: int | None = None) -> DataLoader:
    """A deterministic loader over an ssl_zoo data module's labelled ``split`` for a kNN vote.

    Multi-label images are resized whole (no object cut off), single-label ones centre-cropped: the evaluation
    transforms of :class:`KNNProbe`. ``cap`` keeps an evenly spaced subset (see :func:`evenly_spaced_subset`).
    """
    multilabel = bool(getattr(datamodule, "multilabel", False))
    transform = resize_transform(size) if multilabel else center_crop_transform(size)
    dataset = evenly_spaced_subset(datamodule.labelled_dataset(split, transform=transform), cap)
    return DataLoader(dataset, batch_size=datamodule.batch_size, num_workers=datamodule.num_workers)


@torch.no_grad()
def knn_vote_on_splits(
    backbone: nn.Module,
    datamodule,
    size: int,
    k: int,
    temperature: float,
    pooling: FeaturePoolingName,
    max_train_samples: int | None,
    max_val_samples: int | None,
    num_classes: int | None = None,
    feature_context=None,
) -> tuple[dict[str, float], int, int] | None:
    """The kNN vote of a data module's labelled splits: train is the bank, val votes (see :func:`knn_predict`).

    Returns ``(metrics, bank size, number of queries)``, or None when the training split carries no labels.
    ``num_classes`` (single-label only) defaults to ``max + 1`` over both splits; ``feature_context`` wraps the
    feature extraction (e.g. the trainer's precision context), not the vote.
    """
    context = feature_context if feature_context is not None else contextlib.nullcontext()
    with context:
        bank, bank_targets = extract_features(
            backbone, labelled_split_loader(datamodule, "train", size, max_train_samples), pooling)
        if bank_targets.dim() == 2 and not bank_targets.any():
            return None
        feats, targets = extract_features(
            backbone, labelled_split_loader(datamodule, "val", size, max_val_samples), pooling)
    if bank_targets.dim() == 2:
        num_classes = None
    elif num_classes is None:
        num_classes = int(max(bank_targets.max().item(), targets.max().item()) + 1)
    scores = knn_predict(feats, bank, bank_targets, num_classes, k, temperature)
    return _knn_metrics(scores, targets), bank.shape[0], feats.shape[0]


class KNNProbe(EvalModule):
    """kNN evaluation as a LightningModule, run with ``validate`` (no training):

    ``python -m ssl_zoo validate --config experiments/eval/knn_demo.yaml --model.init_args.ckpt <ckpt>``

    At the start of validation the frozen training features become the bank (deterministic evaluation
    transform, one process each); validation batches vote with :func:`knn_predict`, and the metrics
    (top-1 / top-5, or mAP ... OF1 on multi-label data) are logged and appended to ``eval.json``.

    Args:
        ckpt, backbone, backbone_kwargs, teacher, img_size, pooling: as
            :class:`~ssl_zoo.eval.linear.LinearProbe`.
        k, temperature: DINO's 20 and 0.07.
        max_train_samples: cap of the bank (an evenly spaced subset); ``None`` = the whole training split
            (one batch under ``fast_dev_run``).
        threshold: decision threshold of the multi-label metrics.
    """

    protocol = "knn"

    def __init__(
        self,
        ckpt: str | None = None,
        backbone: str | None = None,
        backbone_kwargs: dict | None = None,
        teacher: bool | None = None,
        img_size: int | None = None,
        pooling: FeaturePoolingName = "backbone",
        k: int = 20,
        temperature: float = 0.07,
        max_train_samples: int | None = None,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        check_pooling(pooling, "model.pooling")
        check_knn_args(k, temperature)
        self.save_hyperparameters()
        self.hparams.num_classes = None
        self.hparams.multilabel = None
        self.backbone = self.build_backbone()
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.head = nn.Identity()  # no trainable part; keeps EvalModule.setup from building one
        self._bank: tuple[Tensor, Tensor] | None = None

    def build_head(self, num_classes: int) -> None:  # the vote needs no parameters
        pass

    def train(self, mode: bool = True) -> KNNProbe:
        super().train(mode)
        self.backbone.eval()
        return self

    def eval_image_transform(self):
        size = self.hparams.img_size
        return resize_transform(size) if self.is_multilabel else center_crop_transform(size)

    def train_transform(self):
        return SingleView(self.eval_image_transform())

    def val_transform(self):
        return SingleView(self.eval_image_transform())

    def on_validation_start(self) -> None:
        if self._bank is not None:
            return
        start = time.perf_counter()
        datamodule = self.trainer.datamodule
        dataset = datamodule.labelled_dataset("train", transform=self.eval_image_transform())
        cap = self.hparams.max_train_samples
        if self.trainer.fast_dev_run:  # a debug run: one batch of bank, as FinalKNNProbe does
            cap = min(cap or datamodule.batch_size, datamodule.batch_size)
        if cap is not None and cap < len(dataset):
            dataset = Subset(dataset, torch.linspace(0, len(dataset) - 1, cap).long().tolist())
        loader = DataLoader(dataset, batch_size=datamodule.batch_size, num_workers=datamodule.num_workers)
        bank, targets = extract_features(self.backbone, loader, self.hparams.pooling, self.device)
        self._bank = (bank.to(self.device), targets.to(self.device))
        rank_zero_info(f"kNN bank of {bank.shape[0]} training features in {time.perf_counter() - start:.1f} s")

    def forward(self, x: Tensor) -> Tensor:
        """Images ``[B, 3, S, S]`` -> kNN class scores ``[B, C]`` against the bank."""
        bank, targets = self._bank
        num_classes = None if targets.dim() == 2 else int(self.hparams.num_classes)
        return knn_predict(embed(self.backbone, x, self.hparams.pooling), bank, targets, num_classes,
                           self.hparams.k, self.hparams.temperature)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        images, targets, index = split_batch(batch)
        self._val_buffer.append((self(images), targets, index))  # scores are already probabilities

    def training_step(self, batch, batch_idx):
        raise RuntimeError("KNNProbe has nothing to train: run it with `python -m ssl_zoo validate`")

    def configure_optimizers(self):
        return None


class KNNMonitor(Callback):
    """kNN accuracy of a pre-training run's backbone, every ``every_n_epochs`` training epochs.

    Uses the data module's labelled splits (``labelled_dataloader``) and ``pl_module.backbone`` on detached
    features under ``torch.no_grad``; logs ``val/knn_top1`` (and ``val/knn_top5``) or ``val/knn_mAP`` (and
    ``val/knn_OF1``, ``val/knn_CF1``) on multi-label data, the first of them in the progress bar. Runs on global
    rank 0 only (a monitor, not a result). Turns itself off, with one warning, when the data module has no
    labelled splits or the training split has no labels.

    Args:
        every_n_epochs: evaluation period in training epochs.
        k, temperature: vote parameters (DINO's 20, 0.07).
        pooling: feature pooling (see :func:`~ssl_zoo.eval.features.embed`).
        img_size: evaluation resolution; ``None`` = the method's ``img_size`` hyperparameter (a ViT built for
            one size cannot take another), else the data module's ``eval_size``.
        max_train_samples, max_val_samples: caps on the bank and the queries (evenly spaced subsets), so the
            monitor costs a fraction of an epoch.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        k: int = 20,
        temperature: float = 0.07,
        pooling: FeaturePoolingName = "backbone",
        img_size: int | None = None,
        max_train_samples: int | None = 10000,
        max_val_samples: int | None = 2000,
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        check_knn_args(k, temperature)
        check_pooling(pooling)
        self.every_n_epochs = every_n_epochs
        self.k = k
        self.temperature = temperature
        self.pooling = pooling
        self.img_size = img_size
        self.max_train_samples = max_train_samples
        self.max_val_samples = max_val_samples
        self.enabled = True

    def _disable(self, reason: str) -> None:
        self.enabled = False
        warnings.warn(f"KNNMonitor disabled: {reason}", stacklevel=2)

    @torch.no_grad()
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled or (trainer.current_epoch + 1) % self.every_n_epochs or trainer.sanity_checking:
            return
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        backbone = getattr(pl_module, "backbone", None)
        if datamodule is None or not hasattr(datamodule, "labelled_dataset") or backbone is None:
            self._disable("needs an ssl_zoo data module (labelled_dataset) and a module with a .backbone")
            return
        size = self.img_size or int(pl_module.hparams.get("img_size") or getattr(datamodule, "eval_size", 224))
        vote = knn_vote_on_splits(backbone, datamodule, size, self.k, self.temperature, self.pooling,
                                  self.max_train_samples, self.max_val_samples,
                                  num_classes=getattr(datamodule, "num_classes", None))
        if vote is None:
            self._disable("the training split has no labels")
            return
        metrics = vote[0]
        keep = ("top1", "top5") if "top1" in metrics else ("mAP", "OF1", "CF1")
        pl_module.log(f"{MONITOR_PREFIX}{keep[0]}", metrics[keep[0]], prog_bar=True, rank_zero_only=True)
        pl_module.log_dict({f"{MONITOR_PREFIX}{k}": metrics[k] for k in keep[1:] if k in metrics},
                           rank_zero_only=True)
