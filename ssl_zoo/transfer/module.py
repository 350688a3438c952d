"""What the detection and segmentation modules share: the backbone from a pre-training checkpoint (any ssl_zoo
method, or a plain timm state dict, or random initialisation), the optimiser with layer-wise lr decay and the
step schedules, and the ``eval.json`` record (:class:`~ssl_zoo.eval.module.EvalModule`'s)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from ssl_zoo.checkpoints import read_backbone_weights
from ssl_zoo.eval.finetune import backbone_layer_matcher
from ssl_zoo.eval.module import EvalModule, build_eval_backbone
from ssl_zoo.models.backbones import Backbone
from ssl_zoo.transfer.optim import dense_param_groups, lr_scheduler
from ssl_zoo.transfer.pyramids import dense_model_kwargs
from ssl_zoo.utils.optim import global_batch_size

__all__ = ["DenseTransferModule", "build_dense_backbone", "family_of_name"]


def family_of_name(name: str) -> str:
    """``resnet`` / ``vit`` / ``beit`` / ``swin`` from a timm model name (for options needed before the model
    exists)."""
    lowered = name.lower()
    for family, marks in (("swin", ("swin",)), ("beit", ("beit",)), ("vit", ("vit_", "deit")),
                          ("resnet", ("resnet",))):
        if lowered.startswith(marks):
            return family
    return "unknown"


def build_dense_backbone(ckpt: str | None, backbone: str | None, backbone_kwargs: dict | None, teacher: bool,
                         img_size: int | None = None, drop_path_rate: float | None = None,
                         fixed_size: int | None = None) -> Backbone:
    """The pre-trained backbone (:func:`~ssl_zoo.eval.module.build_eval_backbone`, the file read once) built to
    take inputs of any size (:func:`~ssl_zoo.transfer.pyramids.dense_model_kwargs`; a BEiT keeps its window and
    the pyramids pad its input to it: ``fixed_size`` is that window's input side when ``img_size`` is unset), its
    pre-training ``model_kwargs`` kept."""
    weights = read_backbone_weights(ckpt, teacher=teacher) if ckpt else None
    name = backbone or (weights.name if weights is not None else None)
    if name is None:
        if weights is not None:  # the loader names what the file holds and what to set
            return build_eval_backbone(weights, backbone, backbone_kwargs, teacher, img_size=img_size)
        raise ValueError("model.backbone is unset and there is no model.ckpt: give a checkpoint or a timm name")
    kwargs = dict(backbone_kwargs or {})
    kwargs["model_kwargs"] = {**(kwargs.get("model_kwargs") or {}), **dense_model_kwargs(family_of_name(name))}
    if family_of_name(name) == "beit" and img_size is None and fixed_size is not None:
        img_size = fixed_size
    return build_eval_backbone(weights, backbone, kwargs, teacher, img_size=img_size, drop_path_rate=drop_path_rate)


class DenseTransferModule(EvalModule):
    """Shared plumbing of :class:`~ssl_zoo.transfer.detection.ObjectDetection` and
    :class:`~ssl_zoo.transfer.segmentation.SemanticSegmentation` (optimiser hyperparameters are documented
    there). Subclasses hold the backbone (:meth:`hold_backbone`) and build ``self.model`` around it in
    :meth:`build_head`."""

    def setup(self, stage: str) -> None:
        """The class count comes from the data module unless ``model.num_classes`` is set; then the heads."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.hparams.num_classes is None:
            if datamodule is None or not hasattr(datamodule, "num_classes"):
                raise ValueError("model.num_classes is unknown: set it, or train with an ssl_zoo data module")
            self.hparams.num_classes = int(datamodule.num_classes)
        elif datamodule is not None and hasattr(datamodule, "num_classes") and \
                int(datamodule.num_classes) != int(self.hparams.num_classes):
            raise ValueError(f"model.num_classes={self.hparams.num_classes} but {type(datamodule).__name__} under "
                             f"'{datamodule.root}' has {datamodule.num_classes} classes")
        if getattr(self, "model", None) is None:
            self.build_head(int(self.hparams.num_classes))

    @property
    def backbone(self) -> Backbone:
        """The pre-trained backbone inside the model (found, not registered a second time)."""
        for module in self.modules():
            if isinstance(module, Backbone):
                return module
        return self.__dict__["_unbuilt_backbone"]  # before the heads exist (see hold_backbone)

    def hold_backbone(self, backbone: Backbone) -> None:
        """Keep the backbone until :meth:`build_head` puts it into the model, without registering it here (a
        registered copy would be saved twice in every checkpoint)."""
        self.__dict__["_unbuilt_backbone"] = backbone

    def best_checkpoint_metric(self) -> str:
        """The validation metric (higher is better) that picks the best checkpoint."""
        raise NotImplementedError

    def configure_callbacks(self) -> list:
        """Replace the CLI's best-checkpoint rule (lowest ``train/loss_epoch``, logged at epoch ends) by the best
        validation metric: iteration-based recipes validate in the middle of an epoch, where no epoch loss exists."""
        trainer = self.trainer
        if not trainer.checkpoint_callbacks:  # checkpointing off
            return []
        from lightning.pytorch.callbacks import ModelCheckpoint

        metric = self.best_checkpoint_metric()
        return [ModelCheckpoint(dirpath=os.path.join(trainer.default_root_dir, "checkpoints"), monitor=metric,
                                mode="max", save_top_k=1, save_last=False, auto_insert_metric_name=False,
                                filename="best-step{step:06d}")]

    # ------------------------------------------------------------------ optimisation
    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """timm's grouping hook, read by ``param_groups_layer_decay``: a parameter name's layer id (BEiT's numbering
        of the backbone, the neck and heads at L + 1; :func:`~ssl_zoo.eval.finetune.backbone_layer_matcher`)."""
        return backbone_layer_matcher(self, self.backbone)

    def peak_lr(self) -> float:
        """``lr`` is the recipe's lr for ``lr_reference_batch`` images per step; it scales with the global batch."""
        hp = self.hparams
        batch = global_batch_size(self.trainer) if self._trainer is not None else hp.lr_reference_batch
        return hp.lr * batch / hp.lr_reference_batch

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        lr = self.peak_lr()
        groups = dense_param_groups(self, self.backbone, lr, hp.weight_decay, hp.layer_decay, hp.decay_biases)
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=lr, momentum=hp.momentum)
        else:
            optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(hp.betas))
        scheduler = lr_scheduler(optimizer, int(self.trainer.estimated_stepping_batches), schedule=hp.lr_schedule,
                                 warmup_steps=hp.warmup_steps, warmup_ratio=hp.warmup_ratio,
                                 milestones=hp.lr_milestones, gamma=hp.lr_gamma, power=hp.poly_power)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def eval_settings(self) -> dict[str, Any]:
        settings = super().eval_settings()
        settings.update(max_steps=self.trainer.max_steps, global_steps=self.trainer.global_step)
        return settings

    def validate_optimiser_settings(self) -> None:
        hp = self.hparams
        if hp.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"model.optimizer must be 'sgd' or 'adamw', got '{hp.optimizer}'")
        if hp.lr <= 0:
            raise ValueError(f"model.lr must be > 0, got {hp.lr}")
        if not 0.0 < hp.layer_decay <= 1.0:
            raise ValueError(f"model.layer_decay must lie in (0, 1], got {hp.layer_decay}")
        if any(not 0.0 < m < 1.0 for m in hp.lr_milestones):
            raise ValueError(f"model.lr_milestones are fractions of the run in (0, 1), got {hp.lr_milestones}")
