"""What every evaluation LightningModule shares: the backbone from a checkpoint, the class count from the
data module, validation metrics over the whole split, and the ``eval.json`` record.

The protocols themselves (:class:`~ssl_zoo.eval.linear.LinearProbe`,
:class:`~ssl_zoo.eval.linear.MultiLabelLinearProbe`, :class:`~ssl_zoo.eval.finetune.FineTune`,
:class:`~ssl_zoo.eval.knn.KNNProbe`) subclass :class:`EvalModule` once and read top-down on their own.
They run with the pre-training data modules and CLI:
``python -m ssl_zoo fit --config experiments/eval/<protocol>.yaml --model.init_args.ckpt <run>/checkpoints/last.ckpt``.
"""

from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy

from ssl_zoo.checkpoints import (
    BackboneWeights,
    backbone_from_weights,
    backbone_kwargs_of,
    read_backbone_weights,
)
from ssl_zoo.eval.metrics import multilabel_metrics
from ssl_zoo.eval.results import append_eval_record, make_eval_record, results_file_for
from ssl_zoo.models.backbones import Backbone
from ssl_zoo.utils.signatures import init_parameters

__all__ = [
    "DEFAULT_IMG_SIZE",
    "EvalBackbone",
    "EvalModule",
    "build_eval_backbone",
    "first_occurrences",
    "resolve_eval_backbone",
    "single_label_metrics",
]

#: Input side of an evaluation when neither the configuration nor the checkpoint gives one (the papers' 224).
DEFAULT_IMG_SIZE = 224


@dataclass
class EvalBackbone:
    """The backbone an evaluation runs, with the settings it was resolved to."""

    backbone: Backbone
    img_size: int  # input side of the evaluation transforms (ViT / Swin are built for it)
    teacher: bool  # the checkpoint's momentum / EMA teacher rather than its student
    kwargs: dict[str, Any]  # the Backbone arguments it was built with


def resolve_eval_backbone(
    ckpt: str | BackboneWeights | None,
    backbone: str | None = None,
    backbone_kwargs: dict | None = None,
    teacher: bool | None = None,
    img_size: int | None = None,
    **overrides: Any,
) -> EvalBackbone:
    """The backbone to evaluate and its settings; what the configuration leaves unset (``None``) comes from
    the checkpoint.

    * architecture and its :class:`~ssl_zoo.models.Backbone` arguments (patch size, Swin window, depth):
      the pre-training run's (:func:`~ssl_zoo.checkpoints.backbone_from_weights`); an explicit
      ``backbone`` or patch size that contradicts them is an error naming both;
    * input side: ``img_size``, else ``backbone_kwargs["img_size"]``, else the pre-training resolution
      (:attr:`~ssl_zoo.checkpoints.BackboneWeights.img_size`), else 224; ViT position embeddings are
      resampled when it differs from pre-training;
    * weights: the student unless ``teacher`` is true. Every method here is evaluated on its student (the
      online / query encoder: SimSiam and MoCo v2/v3 evaluate it, MVP's teacher is the frozen CLIP model,
      HVP-MTL transfers the trained encoder), so ``None`` means the student.

    ``ckpt`` may be the weights already read (:func:`~ssl_zoo.checkpoints.read_backbone_weights`), so that a
    caller that needed them first does not read the file twice. Without ``ckpt`` the backbone is randomly
    initialised (the baseline every table needs) and ``backbone``
    must name it. ``overrides`` (``drop_path_rate``) are laid over ``backbone_kwargs``; ``None`` values are
    dropped so the checkpoint's own settings stay.
    """
    kwargs = {**(backbone_kwargs or {}), **{k: v for k, v in overrides.items() if v is not None}}
    teacher = bool(teacher)
    if ckpt:
        weights = ckpt if isinstance(ckpt, BackboneWeights) else read_backbone_weights(ckpt, teacher=teacher)
        size = img_size or kwargs.get("img_size") or weights.img_size or DEFAULT_IMG_SIZE
        kwargs["img_size"] = int(size)
        model = backbone_from_weights(weights, backbone, kwargs)
        return EvalBackbone(model, int(size), teacher, backbone_kwargs_of(weights, kwargs))
    if backbone is None:
        raise ValueError(
            "model.backbone is unset and there is no model.ckpt: give the pre-training checkpoint to evaluate "
            "(--model.init_args.ckpt runs/<name>/<stamp>/checkpoints/last.ckpt, or make <job> CKPT=...), or a "
            "timm name for the randomly initialised baseline (--model.init_args.backbone resnet18)"
        )
    if teacher:
        raise ValueError("model.teacher=true needs a pre-training checkpoint (model.ckpt)")
    size = int(img_size or kwargs.get("img_size") or DEFAULT_IMG_SIZE)
    kwargs["img_size"] = size
    return EvalBackbone(Backbone(backbone, **kwargs), size, teacher, kwargs)


def build_eval_backbone(
    ckpt: str | BackboneWeights | None,
    backbone: str | None,
    backbone_kwargs: dict | None,
    teacher: bool | None,
    **overrides: Any,
) -> Backbone:
    """The backbone of :func:`resolve_eval_backbone` alone (``overrides`` may hold ``img_size``)."""
    return resolve_eval_backbone(ckpt, backbone, backbone_kwargs, teacher, **overrides).backbone


def _declared_default(cls: type, name: str) -> Any:
    """The default of ``cls(name=...)``, looked up the class tree (``**kwargs`` hands arguments on)."""
    parameter = init_parameters(cls).get(name)
    return parameter.default if parameter is not None else inspect.Parameter.empty


def first_occurrences(index: Tensor) -> Tensor:
    """Positions of the first occurrence of each distinct value of ``index`` ``[N]``, in ascending value order.

    A ``DistributedSampler`` pads the last shard by repeating samples; gathering the shards of every process
    then holds those samples twice, and keeping one row per dataset index removes the duplicates.
    """
    unique, inverse = torch.unique(index, return_inverse=True)
    positions = torch.arange(index.numel(), device=index.device)
    return torch.full_like(unique, index.numel()).scatter_reduce(0, inverse, positions, reduce="amin")


def single_label_metrics(scores: Tensor, targets: Tensor, top_k: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent (torchmetrics, micro average); a k not below the class count is skipped."""
    num_classes = scores.shape[1]
    out = {}
    for k in top_k:
        if k < num_classes or k == 1:
            acc = multiclass_accuracy(scores.float(), targets.long(), num_classes=num_classes, top_k=k,
                                      average="micro")
            out[f"top{k}"] = 100.0 * acc.item()
    return out


class EvalModule(LightningModule):
    """Shared evaluation plumbing; subclasses set ``protocol`` and implement ``build_head``, the steps and
    the optimiser.

    Subclass contract: ``self.hparams`` holds ``ckpt``, ``teacher``, ``num_classes`` (``None`` = from the
    data module at setup), ``multilabel`` (``None`` = from the data module) and ``threshold``; validation
    steps call :meth:`accumulate` with logits, targets and dataset indices.
    """

    protocol: str = "eval"

    def __init__(self) -> None:
        super().__init__()
        self._val_buffer: list[tuple[Tensor, Tensor, Tensor | None]] = []
        self.last_val_metrics: dict[str, float] = {}
        self.last_val_epoch: int | None = None

    # ------------------------------------------------------------------ classes, heads
    def build_head(self, num_classes: int) -> None:
        raise NotImplementedError

    def build_backbone(self, **overrides: Any) -> Backbone:
        """The backbone of ``hparams`` ``ckpt``, ``backbone``, ``backbone_kwargs``, ``teacher`` and
        ``img_size`` (:func:`resolve_eval_backbone`), with the settings it resolved written back to
        ``hparams``: the transforms read the input side there, and the run's checkpoints and ``eval.json``
        record what was evaluated (so an evaluation checkpoint loads like a pre-training one)."""
        hp = self.hparams
        resolved = resolve_eval_backbone(hp.ckpt, hp.backbone, hp.backbone_kwargs, hp.teacher,
                                         img_size=hp.get("img_size"), **overrides)
        hp.backbone, hp.backbone_kwargs = resolved.backbone.name, resolved.kwargs
        hp.img_size, hp.teacher = resolved.img_size, resolved.teacher
        return resolved.backbone

    def align_eval_size(self, datamodule: Any) -> None:
        """Give the data module's evaluation transform (``eval_size``) the probe's input side, unless the
        configuration set it to another value, which is an error naming both."""
        size = self.hparams.get("img_size")
        current = getattr(datamodule, "eval_size", None)
        if size is None or current is None or current == size:
            return
        default = _declared_default(type(datamodule), "eval_size")
        if default is not inspect.Parameter.empty and current != default:
            raise ValueError(
                f"data.eval_size={current} contradicts the evaluation input size {size} (model.img_size, taken "
                f"from the checkpoint when unset): drop data.init_args.eval_size, or set "
                f"--model.init_args.img_size {current} to evaluate at {current} px"
            )
        datamodule.eval_size = size

    @property
    def is_multilabel(self) -> bool:
        return bool(self.hparams.multilabel)

    def setup(self, stage: str) -> None:
        """Take the class count and the task type from the data module, then build the head once."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            self.align_eval_size(datamodule)
        if datamodule is not None and hasattr(datamodule, "num_classes"):
            dm_multilabel = bool(getattr(datamodule, "multilabel", False))
            if self.hparams.multilabel is None:
                self.hparams.multilabel = dm_multilabel
            elif bool(self.hparams.multilabel) != dm_multilabel:
                kind = "multi-label" if dm_multilabel else "single-label"
                raise ValueError(
                    f"{type(self).__name__} is configured for {'multi' if self.hparams.multilabel else 'single'}"
                    f"-label targets but {type(datamodule).__name__} gives {kind} targets; use "
                    f"{'MultiLabelLinearProbe' if dm_multilabel else 'LinearProbe'} for linear evaluation, or set "
                    f"model.multilabel accordingly for fine-tuning"
                )
            if self.hparams.num_classes is None:
                self.hparams.num_classes = int(datamodule.num_classes)  # saved in checkpoints from here on
        if self.hparams.num_classes is None:
            raise ValueError("model.num_classes is unknown: set it, or train with an ssl_zoo data module")
        if self.hparams.multilabel is None:
            raise ValueError("model.multilabel is unknown: set it, or train with an ssl_zoo data module")
        if getattr(self, "head", None) is None:
            self.build_head(int(self.hparams.num_classes))

    # ------------------------------------------------------------------ validation metrics
    def scores(self, logits: Tensor) -> Tensor:
        """Class probabilities: sigmoid (multi-label) or softmax (single-label)."""
        return logits.float().sigmoid() if self.is_multilabel else logits.float().softmax(dim=-1)

    def loss_on(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Evaluation loss: BCE with logits (multi-label) or cross-entropy (single-label)."""
        if self.is_multilabel:
            return torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), targets.float())
        return torch.nn.functional.cross_entropy(logits.float(), targets.long())

    def accumulate(self, logits: Tensor, targets: Tensor, index: Tensor | None) -> None:
        """Keep one validation batch's scores for the epoch-level metrics (mAP needs the whole split)."""
        self._val_buffer.append((self.scores(logits).detach(), targets.detach(),
                                 index.detach() if index is not None else None))

    def on_validation_epoch_start(self) -> None:
        self._val_buffer = []

    def _gathered(self) -> tuple[Tensor, Tensor]:
        scores = torch.cat([s for s, _, _ in self._val_buffer])
        targets = torch.cat([t for _, t, _ in self._val_buffer])
        indices = [i for _, _, i in self._val_buffer]
        if self.trainer.world_size > 1:
            # Every process holds an equal-size shard (DistributedSampler pads by repeating samples):
            # gather, then keep one copy of each dataset index so padded duplicates do not count twice.
            scores = self.all_gather(scores).flatten(0, 1)
            targets = self.all_gather(targets).flatten(0, 1)
            if all(i is not None for i in indices):
                keep = first_occurrences(self.all_gather(torch.cat(indices)).flatten(0, 1))
                scores, targets = scores[keep], targets[keep]
        return scores, targets

    def compute_metrics(self, scores: Tensor, targets: Tensor) -> dict[str, float]:
        if self.is_multilabel:
            return multilabel_metrics(scores, targets, threshold=self.hparams.get("threshold", 0.5))
        return single_label_metrics(scores, targets)

    def on_validation_epoch_end(self) -> None:
        if not self._val_buffer:
            return
        scores, targets = self._gathered()
        metrics = self.compute_metrics(scores.cpu(), targets.cpu())
        self._val_buffer = []
        # Identical on every process (computed on the gathered split), so no sync_dist reduction is needed.
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, prog_bar=False)
        if not self.trainer.sanity_checking:
            self.last_val_metrics = metrics
            self.last_val_epoch = int(self.current_epoch)

    # ------------------------------------------------------------------ results
    def eval_settings(self) -> dict[str, Any]:
        """The protocol's settings for the ``eval.json`` record (hyperparameters plus the run's shape)."""
        settings = {k: v for k, v in self.hparams.items()
                    if k not in ("ckpt", "teacher", "backbone") and not k.startswith("_")}
        trainer = self.trainer
        settings.update(max_epochs=trainer.max_epochs, world_size=trainer.world_size)
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None:
            settings.update(data=type(datamodule).__name__, data_root=str(getattr(datamodule, "root", "")),
                            batch_size=getattr(datamodule, "batch_size", None))
        return settings

    def write_eval_record(self) -> None:
        """Append this run's final validation metrics to the owning pre-training run's ``eval.json``."""
        trainer = self.trainer
        if trainer.fast_dev_run:
            return  # debug runs are not results
        # trainer.log_dir broadcasts rank 0's directory under DDP: a collective, so every process asks for it
        # before all but one return.
        run_dir = trainer.log_dir or trainer.default_root_dir
        if not trainer.is_global_zero:
            return  # one process writes
        if not self.last_val_metrics:
            warnings.warn("no validation epoch ran, so no evaluation record was written to eval.json", stacklevel=2)
            return
        ckpt = self.hparams.get("ckpt")
        path = results_file_for(ckpt, run_dir)
        record = make_eval_record(
            ckpt, self.protocol, self.last_val_metrics, self.eval_settings(),
            teacher=bool(self.hparams.get("teacher", False)), backbone=self.backbone.name,
            epoch=self.last_val_epoch, eval_run_dir=os.path.abspath(run_dir),
        )
        append_eval_record(path, record)
        rank_zero_info(f"{self.protocol}: {self.last_val_metrics} -> {path}")

    def on_fit_end(self) -> None:
        self.write_eval_record()

    def on_validation_end(self) -> None:
        if self.trainer.state.fn == TrainerFn.VALIDATING:  # `validate` subcommand: the result is final
            self.write_eval_record()
