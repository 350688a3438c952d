"""Linear evaluation on a frozen backbone: single-label (ImageNet protocol) and multi-label (GAMP, COCO).

* :class:`LinearProbe` — MoCo v2 / SimSiam / MAE linear classification: a linear layer on the frozen,
  pooled feature, optionally behind a BatchNorm without affine parameters (MAE §A.2, MoCo v3), trained
  with SGD or LARS under a cosine schedule; top-1 / top-5 accuracy.
* :class:`MultiLabelLinearProbe` — BAM+IA-CLoss §3.3: a linear multi-label classifier on global average +
  max pooling (GAMP) of the last feature map, BCE loss, SGD with lr = 10 x batch / 256, momentum 0.9,
  weight decay 1e-4, cosine, 100 epochs; mAP, CP, CR, CF1, OP, OR, OF1.

The backbone is frozen: eval mode throughout (BatchNorm uses its running statistics, no dropout or drop
path) and no gradients. With ``cache_features=True`` the features of both splits are computed once, at
the start of ``fit``, without augmentation (the evaluation transform), and the head trains on the cached
features looked up by dataset index: the demo runs in about a minute on two CPU cores, and on large data
it trades the protocol's crop augmentation for one backbone pass per image.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from ssl_zoo.eval.features import FeaturePoolingName, check_pooling, embed, split_batch
from ssl_zoo.eval.module import EvalModule
from ssl_zoo.eval.transforms import (
    NoImage,
    SingleView,
    center_crop_transform,
    random_resized_crop_transform,
    resize_flip_transform,
    resize_transform,
)
from ssl_zoo.utils.optim import LARS, global_batch_size, scaled_lr, warmup_cosine_scheduler

__all__ = ["LinearProbe", "MultiLabelLinearProbe"]


class LinearProbe(EvalModule):
    """Linear classifier on frozen features, single-label (ImageNet protocol).

    Defaults are MoCo v2's linear evaluation (SGD, lr 30 for a batch of 256, momentum 0.9, no weight
    decay, 100 epochs; cosine instead of MoCo's step schedule at epochs 60/80, as MoCo v3 and SimSiam use).
    ``experiments/eval/linear_mocov2.yaml``, ``linear_simsiam.yaml`` (LARS, lr 0.02 x B/256, 90 epochs) and
    ``linear_mae_mvp.yaml`` (LARS, lr 0.1 x B/256, BN before the head, 90 epochs, 10 warmup) hold the others.

    Args:
        ckpt: pre-training checkpoint or timm state dict; ``None`` evaluates a randomly initialised backbone.
        backbone: timm name (required without ``ckpt``; must match the checkpoint's if given).
        backbone_kwargs: extra :class:`~ssl_zoo.models.Backbone` arguments over the checkpoint's.
        teacher: evaluate the momentum / EMA teacher of the checkpoint instead of the student (``None``: the
            student, see :func:`~ssl_zoo.eval.module.resolve_eval_backbone`).
        num_classes: classes of the head; ``None`` = the data module's.
        img_size: input side; ``None`` = the checkpoint's pre-training resolution (224 without one). ViT
            position embeddings are interpolated when it differs from pre-training.
        pooling: ``backbone`` (its own pooled embedding: ResNet average pool, ViT CLS token) or ``gap`` /
            ``gmp`` / ``gamp`` of the last feature map.
        batch_norm: BatchNorm1d without affine parameters (eps 1e-6) before the linear layer (MAE, MoCo v3).
        optimizer: ``sgd`` or ``lars`` (trust ratio on the weight matrix, MoCo v3 / MAE variant).
        base_lr: lr for 256 images; the lr is ``base_lr * lr_batch_size / 256``.
        lr_batch_size: batch used to scale the lr; ``None`` = the global batch.
        momentum, weight_decay: optimiser settings.
        warmup_epochs: linear warmup before the cosine decay.
        cache_features: compute frozen features once without augmentation and train the head on them.
        cache_batch_size: batch size of the caching pass (``None`` = the data module's).
    """

    protocol = "linear"

    def __init__(
        self,
        ckpt: str | None = None,
        backbone: str | None = None,
        backbone_kwargs: dict | None = None,
        teacher: bool | None = None,
        num_classes: int | None = None,
        img_size: int | None = None,
        pooling: FeaturePoolingName = "backbone",
        batch_norm: bool = False,
        optimizer: Literal["sgd", "lars"] = "sgd",
        base_lr: float = 30.0,
        lr_batch_size: int | None = None,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_epochs: int = 0,
        cache_features: bool = False,
        cache_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        check_pooling(pooling, "model.pooling")
        if optimizer not in ("sgd", "lars"):
            raise ValueError(f"model.optimizer must be 'sgd' or 'lars', got '{optimizer}'")
        if base_lr <= 0:
            raise ValueError(f"model.base_lr must be > 0, got {base_lr}")
        if img_size is not None and img_size < 1:
            raise ValueError(f"model.img_size must be >= 1, got {img_size}")
        self.save_hyperparameters()
        if "multilabel" not in self.hparams:
            self.hparams.multilabel = False
        # ViT / Swin are built for the evaluation resolution (the Backbone ignores img_size for ResNets).
        self.backbone = self.build_backbone()
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.head: nn.Module | None = None
        if num_classes is not None:
            self.build_head(num_classes)
        self._cache: dict[str, Tensor] = {}

    def build_head(self, num_classes: int) -> None:
        linear = nn.Linear(self.backbone.num_features, num_classes)
        nn.init.normal_(linear.weight, std=0.01)  # MoCo / MAE linear-probe initialisation
        nn.init.zeros_(linear.bias)
        if self.hparams.batch_norm:
            # MAE §A.2: BN without affine parameters normalises the features' scale, which differs a lot
            # between pre-training methods, so one lr fits all; it folds into the linear layer afterwards.
            self.head = nn.Sequential(nn.BatchNorm1d(self.backbone.num_features, affine=False, eps=1e-6), linear)
        else:
            self.head = linear

    def train(self, mode: bool = True) -> LinearProbe:
        """Lightning switches the module to train mode every epoch; the frozen backbone stays in eval."""
        super().train(mode)
        self.backbone.eval()
        return self

    # ------------------------------------------------------------------ data hooks
    def train_transform(self):
        if self.hparams.cache_features:
            return NoImage()
        return SingleView(random_resized_crop_transform(self.hparams.img_size))

    def eval_image_transform(self):
        """The deterministic transform of validation and of the feature cache."""
        return center_crop_transform(self.hparams.img_size)

    def val_transform(self):
        if self.hparams.cache_features:
            return NoImage()
        return SingleView(self.eval_image_transform())

    # ------------------------------------------------------------------ frozen features
    @torch.no_grad()
    def _extract_split(self, split: str) -> Tensor:
        datamodule = self.trainer.datamodule
        loader = datamodule.labelled_dataloader(split, batch_size=self.hparams.cache_batch_size,
                                                transform=self.eval_image_transform())
        feats = []
        for batch in loader:
            images, _, _ = split_batch(batch)
            feats.append(embed(self.backbone, images.to(self.device), self.hparams.pooling).float())
        return torch.cat(feats)  # [N, D], dataset order (the loader does not shuffle)

    def _ensure_cache(self, splits: tuple[str, ...]) -> None:
        if not self.hparams.cache_features:
            return
        for split in splits:
            if split not in self._cache:
                start = time.perf_counter()
                self._cache[split] = self._extract_split(split)
                rank_zero_info(f"cached {tuple(self._cache[split].shape)} frozen {split} features "
                               f"in {time.perf_counter() - start:.1f} s")

    def on_fit_start(self) -> None:
        self._ensure_cache(("train", "val"))

    def on_validation_start(self) -> None:
        self._ensure_cache(("val",))

    def features(self, batch: dict, split: str) -> Tensor:
        """Frozen features ``[B, D]`` of a batch: looked up by dataset index when cached, else computed."""
        if self.hparams.cache_features:
            return self._cache[split][batch["index"].to(self._cache[split].device)]
        images, _, _ = split_batch(batch)
        with torch.no_grad():
            return embed(self.backbone, images, self.hparams.pooling).float()

    # ------------------------------------------------------------------ steps
    def forward(self, x: Tensor) -> Tensor:
        """Images ``[B, 3, S, S]`` -> logits ``[B, C]``."""
        with torch.no_grad():
            feats = embed(self.backbone, x, self.hparams.pooling).float()
        return self.head(feats)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        feats = self.features(batch, "train")  # [B, D], no gradient
        logits = self.head(feats)  # [B, C]
        loss = self.loss_on(logits, batch["target"])
        self.log("train/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=feats.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        feats = self.features(batch, "val")
        logits = self.head(feats)
        self.log("val/loss", self.loss_on(logits, batch["target"]), on_epoch=True, sync_dist=True,
                 batch_size=feats.shape[0])
        self.accumulate(logits, batch["target"], batch.get("index"))

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        lr = scaled_lr(hp.base_lr, hp.lr_batch_size or global_batch_size(self.trainer))
        params = list(self.head.parameters())
        if hp.optimizer == "lars":
            optimizer = LARS(params, lr=lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.SGD(params, lr=lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        total = self.trainer.estimated_stepping_batches
        warmup = int(hp.warmup_epochs * total / max(self.trainer.max_epochs or 1, 1))
        scheduler = warmup_cosine_scheduler(optimizer, total, warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class MultiLabelLinearProbe(LinearProbe):
    """Linear multi-label classifier on GAMP-pooled frozen features (BAM+IA-CLoss §3.3).

    logits = W * GAMP(F) + b with F the last feature map ``[B, D, H, W]`` (ViT: patch tokens on their grid)
    and GAMP(F) = (GAP(F) + GMP(F)) / 2; loss: BCE with logits. Defaults are the paper's: SGD, lr =
    10 x batch / 256, momentum 0.9, weight decay 1e-4, cosine over 100 epochs, 224 px (448 in the
    high-resolution setting, ``experiments/eval/gamp_coco_448.yaml``).

    Crops: by default images are squashed to a square without cropping (so no labelled object is cut away)
    and flipped for training (``train_crop="squash"``, ``val_crop="squash"``). ``train_crop=
    "random_resized_crop"`` trains on RandomResizedCrop (scale 0.08-1, torchvision's default) + flip, and
    ``val_crop="center_crop"`` evaluates on the short side resized to ``img_size / 0.875`` and a centre crop
    (the ImageNet protocol). The paper configs train on random resized crops and evaluate on squashed
    images, as the BAM+IA-CLoss reference linear-evaluation script does (``ssl_zoo/eval/README.md``).

    Validation reports mAP, CP, CR, CF1, OP, OR, OF1 (:func:`~ssl_zoo.eval.metrics.multilabel_metrics`,
    a label is predicted when its probability is ``>= threshold``). Arguments as :class:`LinearProbe`, plus
    ``threshold``, ``train_crop`` and ``val_crop``.
    """

    protocol = "multilabel_linear"

    def __init__(
        self,
        ckpt: str | None = None,
        backbone: str | None = None,
        backbone_kwargs: dict | None = None,
        teacher: bool | None = None,
        num_classes: int | None = None,
        img_size: int | None = None,
        pooling: FeaturePoolingName = "gamp",
        batch_norm: bool = False,
        optimizer: Literal["sgd", "lars"] = "sgd",
        base_lr: float = 10.0,
        lr_batch_size: int | None = None,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        warmup_epochs: int = 0,
        cache_features: bool = False,
        cache_batch_size: int | None = None,
        threshold: float = 0.5,
        train_crop: Literal["squash", "random_resized_crop"] = "squash",
        val_crop: Literal["squash", "center_crop"] = "squash",
    ) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"model.threshold must lie in [0, 1], got {threshold}")
        if train_crop not in ("squash", "random_resized_crop"):
            raise ValueError(f"model.train_crop must be 'squash' or 'random_resized_crop', got '{train_crop}'")
        if val_crop not in ("squash", "center_crop"):
            raise ValueError(f"model.val_crop must be 'squash' or 'center_crop', got '{val_crop}'")
        super().__init__(ckpt, backbone, backbone_kwargs, teacher, num_classes, img_size, pooling, batch_norm,
                         optimizer, base_lr, lr_batch_size, momentum, weight_decay, warmup_epochs,
                         cache_features, cache_batch_size)
        self.hparams.multilabel = True

    def train_transform(self):
        if self.hparams.cache_features:
            return NoImage()
        if self.hparams.train_crop == "random_resized_crop":
            return SingleView(random_resized_crop_transform(self.hparams.img_size))
        return SingleView(resize_flip_transform(self.hparams.img_size))

    def eval_image_transform(self):
        if self.hparams.val_crop == "center_crop":
            return center_crop_transform(self.hparams.img_size)
        return resize_transform(self.hparams.img_size)
