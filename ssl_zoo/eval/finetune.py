"""End-to-end fine-tuning with layer-wise lr decay (the BEiT / MVP protocol), single- and multi-label.

BEiT §2.6 / MVP §4: AdamW, lr 4e-3 for a batch of 1024 (``base_lr`` 1e-3 per 256 images here), layer-wise
lr decay 0.65 (the lr of layer l is ``lr * decay^(L + 1 - l)``, embeddings at l = 0, the head at L + 1),
weight decay 0.05 (none on biases, norms, tokens and position embeddings), 20 warmup epochs then cosine,
drop path 0.1, RandAugment, random erasing 0.25, mixup 0.8, cutmix 1.0 and label smoothing 0.1 (timm's
``Mixup`` and ``SoftTargetCrossEntropy``), 100 epochs for ViT-B. Multi-label data (COCO, Tencent ML-Images)
is fine-tuned with BCE on mixed multi-hot targets (timm's ``Mixup(multi_label=True)``, each label smoothed
towards 0.5) and reports the multi-label metrics.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Literal

import timm
import timm.data
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import group_parameters
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import Tensor, nn

from ssl_zoo.eval.features import FeaturePoolingName, check_pooling, embed, split_batch
from ssl_zoo.eval.module import EvalModule
from ssl_zoo.eval.transforms import (
    SingleView,
    center_crop_transform,
    finetune_train_transform,
    resize_transform,
)
from ssl_zoo.utils.optim import global_batch_size, scaled_lr, warmup_cosine_scheduler

__all__ = ["FineTune", "backbone_layer_matcher", "check_mean_pooling", "layer_ids", "timm_prefix", "with_mean_pooling"]


def with_mean_pooling(backbone_kwargs: dict | None) -> dict:
    """``backbone_kwargs`` with timm's ``global_pool="avg"`` added to ``model_kwargs``: for timm's ViT and
    BEiT this means mean of the patch tokens, then ``fc_norm`` (a fresh LayerNorm), no final norm."""
    kwargs = dict(backbone_kwargs or {})
    kwargs["model_kwargs"] = {**(kwargs.get("model_kwargs") or {}), "global_pool": "avg"}
    return kwargs


def check_mean_pooling(backbone) -> None:
    """Fail clearly when a backbone built with ``global_pool="avg"`` does not have BEiT's head layout."""
    model = backbone.model
    if not (isinstance(getattr(model, "fc_norm", None), nn.LayerNorm) and isinstance(getattr(model, "norm", None), nn.Identity)):
        raise ValueError(
            f"model.use_mean_pooling needs a timm ViT or BEiT whose avg pooling ends in a LayerNorm 'fc_norm' "
            f"and drops the final 'norm'; backbone '{backbone.name}' ({backbone.family}) has "
            f"fc_norm={type(getattr(model, 'fc_norm', None)).__name__}, norm={type(getattr(model, 'norm', None)).__name__}"
        )


#: Parameter-name prefixes of what follows the blocks in a timm model: final norm, pooled norm, classifier.
_AFTER_BLOCKS = ("norm.", "fc_norm.", "head.", "fc.")


def layer_ids(model: nn.Module) -> dict[str, int]:
    """BEiT / MAE layer ids of a timm model's parameters: 0 embeddings, 1..L blocks, L + 1 what follows them.

    timm's ``group_matcher(coarse=False)`` numbers the embeddings and the blocks (ViT / BEiT blocks, Swin blocks
    across stages, ResNet blocks); ours departs from it where the recipes do (``tests/eval/test_finetune.py`` names each):

    * the final ``norm`` goes after the last block, with the head: BEiT's ``get_num_layer_for_vit`` and MAE's
      ``get_layer_id_for_vit`` give it L + 1, timm's matcher merges it into block L (``MATCH_PREV_GROUP``);
    * a Swin patch-merging layer goes with the block *before* it, as SimMIM numbers it
      (``optimizer.get_swin_layer``: ``layers.i.downsample`` -> ``sum(depths[:i + 1])``, the last block of stage
      i). SimMIM's Swin merges patches at the end of a stage, timm's at the start of the next one
      (``layers.{i+1}.downsample``), which timm's matcher numbers with that stage's first block.
    """
    ids = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    after = _last_block(ids) + 1
    ids = {n: after if n.startswith(_AFTER_BLOCKS) else ids.get(n, after) for n, _ in model.named_parameters()}
    if type(model).__name__.startswith("SwinTransformer"):
        ids = {n: i - 1 if n.startswith("layers.") and n.split(".")[2] == "downsample" else i for n, i in ids.items()}
    return ids


def _last_block(ids: dict[str, int]) -> int:
    return max((i for n, i in ids.items() if not n.startswith(_AFTER_BLOCKS)), default=0)


def timm_prefix(model: nn.Module, backbone) -> str:
    """The name prefix of ``backbone``'s timm model inside ``model`` (``backbone.model.`` in a :class:`FineTune`)."""
    for name, module in model.named_modules():
        if module is backbone:
            return f"{name}.model." if name else "model."
    raise ValueError("the backbone is not a submodule of the model")


def backbone_layer_matcher(model: nn.Module, backbone) -> Callable[[str], int]:
    """:func:`layer_ids` as a timm ``group_matcher`` of ``model``, which holds ``backbone``: the backbone's
    parameters take their ids, everything else in ``model`` (head, neck) the id after the last block, L + 1
    (also for a headless ResNet, whose own ids stop at its last block)."""
    prefix = timm_prefix(model, backbone)
    ids = layer_ids(backbone.model)
    after = _last_block(ids) + 1
    return lambda name: ids[name[len(prefix):]] if name.startswith(prefix) else after


class FineTune(EvalModule):
    """Fine-tune the whole backbone plus a linear head.

    Args:
        ckpt, backbone, backbone_kwargs, teacher: as :class:`~ssl_zoo.eval.linear.LinearProbe` (``ckpt=None``
            fine-tunes from a random initialisation, the from-scratch baseline).
        num_classes: classes of the head; ``None`` = the data module's.
        multilabel: BCE + multi-label metrics; ``None`` = the data module's task.
        img_size: input side; ``None`` = the checkpoint's pre-training resolution (224 without one).
        pooling: ``backbone`` (its own pooled embedding: ViT CLS token, ResNet/Swin average pool) or
            ``gap`` / ``gmp`` / ``gamp`` of the last map. BEiT averages the patch tokens and then applies a
            fresh LayerNorm (``use_mean_pooling``); ``gap`` averages tokens that went through the pre-trained
            final norm.
        use_mean_pooling: BEiT's fine-tuning head (``use_mean_pooling`` with ``fc_norm`` in BEiT's
            ``modeling_finetune.py``): the ViT / BEiT is built with timm's ``global_pool="avg"``, so its final
            norm is dropped, the patch tokens (CLS excluded) are averaged and a freshly initialised LayerNorm
            (``fc_norm``) normalises the mean; the pre-trained final norm is not loaded. Needs
            ``pooling="backbone"``.
        val_interpolation: resize of the evaluation transform (short side to ``img_size / 0.875``, centre
            crop): ``bilinear`` or ``bicubic`` (BEiT's ``Resize(size, interpolation=3)``).
        drop_path_rate: stochastic depth of the backbone (0.1).
        base_lr: AdamW lr for 256 images (BEiT's 4e-3 at batch 1024); lr = ``base_lr * batch / 256``.
        lr_batch_size: batch used to scale the lr (``None`` = the global batch).
        layer_decay: layer-wise lr decay factor (0.65; 1 disables it).
        weight_decay: AdamW weight decay (0.05).
        betas: AdamW betas (0.9, 0.999).
        warmup_epochs: linear warmup epochs (20).
        min_lr_ratio: final lr as a fraction of the peak (BEiT's 1e-6 / 4e-3).
        mixup, cutmix: alphas of timm's ``Mixup`` (0.8, 1.0); both 0 disables mixing.
        label_smoothing: 0.1.
        auto_augment: timm auto-augment policy (``rand-m9-mstd0.5-inc1``, BEiT's RandAugment) or ``None``.
        re_prob: random-erasing probability (0.25).
        head_init_std: std of the head's truncated-normal initialisation (BEiT: 0.02 x init_scale 0.001).
        threshold: decision threshold of the multi-label metrics.
        optimizer: ``adamw`` (BEiT) or ``sgd`` (SimCLR's semi-supervised fine-tuning: SGD with Nesterov
            momentum; ``betas`` then unused).
        momentum, nesterov: SGD momentum (0.9) and Nesterov (on); ``optimizer: sgd`` only.
        head_base_lr: the head's own lr for 256 images (scaled as ``base_lr``); ``None``: the backbone's (with
            layer decay, that of the last layer). Barlow Twins' semi-supervised recipe (``evaluate.py``:
            ``--lr-classifier`` 0.5 for the head, ``--lr-backbone`` 0.005 for the ResNet) sets both.
        lr_interval: ``step`` (warmup + cosine per optimiser step) or ``epoch`` (the cosine moves once per
            epoch, ``CosineAnnealingLR(optimizer, epochs)`` stepped after each epoch, as Barlow Twins'
            ``evaluate.py``; with ``warmup_epochs`` 0).
        color_jitter: timm's colour jitter strength, applied when ``auto_augment`` is ``None`` (0.4, timm's
            default); ``None``: crop and flip only.
        crop_scale: area fraction range of the training RandomResizedCrop ((0.08, 1), timm's default). Small
            images whose object fills only part of the frame (the demo) need a larger minimum, or many crops
            miss the object and the label is noise.
    """

    protocol = "finetune"

    def __init__(
        self,
        ckpt: str | None = None,
        backbone: str | None = None,
        backbone_kwargs: dict | None = None,
        teacher: bool | None = None,
        num_classes: int | None = None,
        multilabel: bool | None = None,
        img_size: int | None = None,
        pooling: FeaturePoolingName = "backbone",
        use_mean_pooling: bool = False,
        val_interpolation: Literal["bilinear", "bicubic"] = "bilinear",
        drop_path_rate: float = 0.1,
        base_lr: float = 1e-3,
        lr_batch_size: int | None = None,
        layer_decay: float = 0.65,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: int = 20,
        min_lr_ratio: float = 2.5e-4,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        label_smoothing: float = 0.1,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        head_init_std: float = 2e-5,
        threshold: float = 0.5,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        momentum: float = 0.9,
        nesterov: bool = True,
        color_jitter: float | None = 0.4,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        head_base_lr: float | None = None,
        lr_interval: Literal["step", "epoch"] = "step",
    ) -> None:
        super().__init__()
        check_pooling(pooling, "model.pooling")
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"model.layer_decay must lie in (0, 1], got {layer_decay}")
        if base_lr <= 0:
            raise ValueError(f"model.base_lr must be > 0, got {base_lr}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"model.label_smoothing must lie in [0, 1), got {label_smoothing}")
        if mixup < 0 or cutmix < 0:
            raise ValueError(f"model.mixup and model.cutmix must be >= 0, got {mixup} and {cutmix}")
        if not 0.0 <= re_prob <= 1.0:
            raise ValueError(f"model.re_prob must lie in [0, 1], got {re_prob}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"model.threshold must lie in [0, 1], got {threshold}")
        if use_mean_pooling and pooling != "backbone":
            raise ValueError(f"model.use_mean_pooling needs model.pooling 'backbone' (the pooled head), got '{pooling}'")
        if val_interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"model.val_interpolation must be 'bilinear' or 'bicubic', got '{val_interpolation}'")
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"model.optimizer must be 'adamw' or 'sgd', got '{optimizer}'")
        if head_base_lr is not None and head_base_lr <= 0:
            raise ValueError(f"model.head_base_lr must be > 0 (or null: the backbone's lr), got {head_base_lr}")
        if lr_interval not in ("step", "epoch"):
            raise ValueError(f"model.lr_interval must be 'step' or 'epoch', got '{lr_interval}'")
        if len(crop_scale) != 2 or not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"model.crop_scale must be (low, high) with 0 < low <= high <= 1, got {crop_scale}")
        self.save_hyperparameters()
        if use_mean_pooling:  # recorded in hparams, so that the fine-tuned checkpoint rebuilds the same head
            self.hparams.backbone_kwargs = with_mean_pooling(backbone_kwargs)
        self.backbone = self.build_backbone(drop_path_rate=drop_path_rate)
        if use_mean_pooling:
            check_mean_pooling(self.backbone)
        self.head: nn.Module | None = None
        if num_classes is not None:
            self.build_head(num_classes)
        self.mixup_fn = None

    def build_head(self, num_classes: int) -> None:
        self.head = nn.Linear(self.backbone.num_features, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=self.hparams.head_init_std)
        nn.init.zeros_(self.head.bias)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        hp = self.hparams
        if (hp.mixup > 0 or hp.cutmix > 0) and self.mixup_fn is None:
            kwargs = dict(mixup_alpha=hp.mixup, cutmix_alpha=hp.cutmix, label_smoothing=hp.label_smoothing,
                          num_classes=int(hp.num_classes))
            if hp.multilabel:
                if "multi_label" not in inspect.signature(timm.data.Mixup).parameters:
                    raise RuntimeError("multi-label mixup needs a timm whose Mixup accepts multi_label=True (timm 1.0.31 does); "
                                       "or set model.mixup 0 and model.cutmix 0")
                kwargs["multi_label"] = True
            self.mixup_fn = timm.data.Mixup(**kwargs)

    # ------------------------------------------------------------------ data hooks
    def train_transform(self):
        hp = self.hparams
        return SingleView(finetune_train_transform(hp.img_size, hp.auto_augment, hp.re_prob,
                                                   hp.get("color_jitter", 0.4), hp.get("crop_scale", (0.08, 1.0))))

    def val_transform(self):
        size, interpolation = self.hparams.img_size, self.hparams.get("val_interpolation", "bilinear")
        return SingleView(resize_transform(size) if self.is_multilabel
                          else center_crop_transform(size, interpolation=interpolation))

    # ------------------------------------------------------------------ steps
    def forward(self, x: Tensor) -> Tensor:
        """Images ``[B, 3, S, S]`` -> logits ``[B, C]``."""
        return self.head(embed(self.backbone, x, self.hparams.pooling))

    def training_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Soft-target CE after mixup, label-smoothed CE without it; BCE on (mixed) multi-hot targets."""
        hp = self.hparams
        logits = logits.float()
        if self.is_multilabel:
            if self.mixup_fn is None and hp.label_smoothing > 0:  # Mixup already smoothed the mixed targets
                targets = targets.float() * (1.0 - hp.label_smoothing) + 0.5 * hp.label_smoothing
            return nn.functional.binary_cross_entropy_with_logits(logits, targets.float())
        if self.mixup_fn is not None:
            return SoftTargetCrossEntropy()(logits, targets)
        if hp.label_smoothing > 0:
            return LabelSmoothingCrossEntropy(hp.label_smoothing)(logits, targets.long())
        return nn.functional.cross_entropy(logits, targets.long())

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        images, targets, _ = split_batch(batch)  # [B, 3, S, S], [B] or [B, C]
        if self.mixup_fn is not None:
            if images.shape[0] % 2:
                raise ValueError(f"mixup/cutmix need an even batch, got {images.shape[0]} images")
            images, targets = self.mixup_fn(images, targets)  # targets -> soft [B, C]
        loss = self.training_loss(self(images), targets)
        self.log("train/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=images.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        images, targets, index = split_batch(batch)
        logits = self(images)
        self.log("val/loss", self.loss_on(logits, targets), on_epoch=True, sync_dist=True,
                 batch_size=images.shape[0])
        self.accumulate(logits, targets, index)

    # ------------------------------------------------------------------ optimisation
    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """timm's grouping hook, read by ``param_groups_layer_decay``: a parameter name's layer id
        (:func:`backbone_layer_matcher`: BEiT's numbering of the backbone, the head at L + 1)."""
        return backbone_layer_matcher(self, self.backbone)

    def param_groups(self, lr: float, head_lr: float | None = None) -> list[dict]:
        """timm's ``param_groups_layer_decay`` over this module, numbered by :meth:`group_matcher`: the lr of layer
        id l is ``lr * layer_decay^(L + 1 - l)`` (BEiT §2.6), no weight decay on 1-D parameters (biases, norms) and
        on the backbone's ``no_weight_decay()`` tensors (position embeddings, tokens, relative position tables).
        With a ``head_lr``, the head's parameters form their own groups at that lr."""
        hp = self.hparams
        timm_model = self.backbone.model
        no_decay = [f"backbone.model.{n}" for n in getattr(timm_model, "no_weight_decay", set)()]
        groups = param_groups_layer_decay(self, hp.weight_decay, no_weight_decay_list=no_decay,
                                          layer_decay=hp.layer_decay)
        for group in groups:
            group["lr"] = lr * group["lr_scale"]
        if head_lr is not None:
            head = {id(p) for p in self.head.parameters()}
            groups = [{**g, "params": [p for p in g["params"] if id(p) not in head]} for g in groups]
            groups = [g for g in groups if g["params"]] + [
                {**g, "lr": head_lr, "lr_scale": 1.0} for g in param_groups_weight_decay(self.head, hp.weight_decay)]
        return groups

    def configure_optimizers(self):
        hp = self.hparams
        batch = hp.lr_batch_size or global_batch_size(self.trainer)
        lr = scaled_lr(hp.base_lr, batch)
        head_lr = scaled_lr(hp.head_base_lr, batch) if hp.get("head_base_lr") is not None else None
        groups = self.param_groups(lr, head_lr)
        if hp.get("optimizer", "adamw") == "sgd":  # SimCLR / Barlow Twins semi-supervised: SGD, momentum 0.9
            optimizer = torch.optim.SGD(groups, lr=lr, momentum=hp.momentum, nesterov=hp.nesterov)
        else:
            optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(hp.betas))
        interval = hp.get("lr_interval", "step")
        if interval == "epoch" and not (self.trainer.max_epochs or 0) > 0:
            raise ValueError("model.lr_interval 'epoch' runs the cosine over trainer.max_epochs, which is not set")
        total = self.trainer.estimated_stepping_batches if interval == "step" else self.trainer.max_epochs
        warmup = int(hp.warmup_epochs * total / max(self.trainer.max_epochs or 1, 1))
        scheduler = warmup_cosine_scheduler(optimizer, total, warmup, final_ratio=hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}
