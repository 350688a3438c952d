"""What the MPCL method files share: argument checks, the projectors' widths, the per-projector loss loop, a step's
logs, PTB's epoch boundary, the key encoder's momentum update and the lr schedule.

The equations live in the losses room: Eq. 2 and Eq. 4 in :mod:`ssl_zoo.losses.mpcl` (:class:`MPCLLoss` assembles
them), Eq. 3 in :mod:`ssl_zoo.losses.ptb`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightly.models.utils import update_momentum
from lightly.utils.debug import std_of_l2_normalized
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from ssl_zoo.losses.ptb import ProjectorTrainingBalance
from ssl_zoo.utils.loop_progress import training_epoch_completed
from ssl_zoo.utils.optim import warmup_cosine_scheduler

__all__ = ["check_arguments", "end_ptb_epoch", "log_step", "lr_schedule", "per_projector", "projector_widths",
           "start_ptb_epoch", "update_key_encoder"]

# model.<name> must satisfy the test; the CLI checks the Literal arguments itself.
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "num_projectors": (lambda v: v >= 1, "be >= 1"),
    "lam": (lambda v: v >= 0, "be >= 0"),
    "epsilon": (lambda v: v > 0, "be > 0"),
    "temperature": (lambda v: v > 0, "be > 0"),
    "queue_size": (lambda v: v >= 1, "be >= 1"),
    "ema_momentum": (lambda v: 0.0 <= v <= 1.0, "lie in [0, 1]"),
    "min_scale": (lambda v: 0.0 < v <= 1.0, "lie in (0, 1]"),
    "lambda_offdiag": (lambda v: v >= 0, "be >= 0"),
}


def check_arguments(**values: Any) -> None:
    """Raise one ``model.<name> must ...`` error for the first argument out of its range."""
    for name, value in values.items():
        valid, rule = _RANGES[name]
        if not valid(value):
            raise ValueError(f"model.{name} must {rule}, got {value}")


def projector_widths(hidden_dims: int | Sequence[int], num_projectors: int, shared_hidden: bool) -> list[int]:
    """One hidden width per projector: one int for all, or a list of ``num_projectors`` (the "Different" rows of
    Tables I / VII, which need separate MLPs)."""
    widths = [hidden_dims] * num_projectors if isinstance(hidden_dims, int) else list(hidden_dims)
    if len(widths) != num_projectors or any(w < 1 for w in widths):
        raise ValueError(f"model.projector_hidden_dims must be one positive int or a list of {num_projectors} "
                         f"(num_projectors) positive ints, got {hidden_dims}")
    if shared_hidden and len(set(widths)) > 1:
        raise ValueError(f"model.projector_hidden_dims {hidden_dims} gives the projectors different hidden widths, but "
                         "model.shared_hidden is true (one shared hidden layer); set model.init_args.shared_hidden: "
                         "false for separate MLPs")
    return widths


def per_projector(loss_fn: Callable[..., tuple[Tensor, Tensor]], *per_projector_args: Sequence[Tensor],
                  **kwargs: Any) -> tuple[Tensor, Tensor]:
    """``loss_fn(arg_1[m], arg_2[m], ..., **kwargs) -> (loss, accuracy)`` for every projector m: ``[Mp]``, ``[Mp]``."""
    results = [loss_fn(*args, **kwargs) for args in zip(*per_projector_args, strict=True)]
    return torch.stack([loss for loss, _ in results]), torch.stack([acc for _, acc in results])


def log_step(module: LightningModule, loss: Tensor, stats: dict[str, Tensor], z: Tensor, batch_size: int) -> None:
    """Log the loss, :class:`~ssl_zoo.losses.mpcl.MPCLLoss`'s statistics (already global) and the collapse indicator:
    the std of the l2-normalised embedding ``z [B, D]``, ~1/sqrt(D) when healthy, 0 when collapsed."""
    stats = dict(stats)
    acc = stats.pop("acc")
    module.log_dict({f"train/{name}": value for name, value in stats.items()}, on_epoch=True, batch_size=batch_size)
    module.log("train/acc", acc, prog_bar=True, on_epoch=True, batch_size=batch_size)
    module.log("train/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=batch_size)
    module.log("train/z_std", std_of_l2_normalized(z.detach()), on_epoch=True, batch_size=batch_size)


def start_ptb_epoch(ptb: ProjectorTrainingBalance, epoch: int) -> None:
    """``on_train_epoch_start``: a fresh epoch counts its own accuracies. Counts left over here come from an epoch
    cut short and not continued (Lightning calls the hook for a new epoch, not for one resumed mid-way, whose
    checkpointed counts the resumed run completes): they are dropped rather than mixed into this epoch."""
    if ptb.count.item() > 0:
        dropped = ptb.discard_epoch()
        rank_zero_info(f"MPCL: dropping the PTB counts of an unfinished epoch ({dropped} queries) at the start of "
                       f"epoch {epoch}")


def end_ptb_epoch(ptb: ProjectorTrainingBalance, trainer: Any, epoch: int) -> None:
    """``on_train_epoch_end``: a completed epoch's accuracies set the next epoch's weights (Eq. 3). An epoch cut short
    (``max_steps`` reached mid-epoch, a stop request) changes nothing: its counts stay in the buffers (and
    checkpoints), so a run resumed from it completes the epoch and only then re-weights, from the whole epoch."""
    if ptb.count.item() <= 0:
        return
    if not training_epoch_completed(trainer):
        rank_zero_info(f"MPCL: epoch {epoch} ended before its last batch; the PTB weights keep the last completed "
                       "epoch's accuracies")
        return
    ptb.close_epoch()


@torch.no_grad()
def update_key_encoder(module: LightningModule, momentum: float) -> None:
    """theta_xi <- m * theta_xi + (1 - m) * theta_theta for the key backbone and projectors (MoCo Eq. 2).

    Parameters only, as MoCo's ``_momentum_update_key_encoder``: the key encoder's BatchNorm statistics are its own,
    computed in its train-mode forward.
    """
    update_momentum(module.backbone, module.teacher_backbone, momentum)
    update_momentum(module.projectors, module.teacher_projectors, momentum)


def lr_schedule(module: LightningModule, optimizer: torch.optim.Optimizer, warmup_epochs: int,
                final_lr_ratio: float = 0.0) -> dict[str, Any]:
    """``configure_optimizers``' answer: per-step linear warmup over ``warmup_epochs``, then a half cosine down to
    ``final_lr_ratio`` x the peak."""
    total = module.trainer.estimated_stepping_batches
    warmup = int(warmup_epochs * total / max(module.trainer.max_epochs or 1, 1))
    scheduler = warmup_cosine_scheduler(optimizer, total, warmup, final_ratio=final_lr_ratio)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
