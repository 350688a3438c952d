"""Training callbacks shared by all methods (never part of a method's maths)."""

from __future__ import annotations

import os
import time
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from ssl_zoo.utils.checkpointing import BatchEndLoopState, BetweenStepsSaver, save_between_steps


def batch_num_images(batch) -> int:
    """Number of images (not views) in a pre-training batch dict, a dense-transfer batch dict (``images``: a
    list or a stacked tensor) or an ``(x, y)`` tuple."""
    if isinstance(batch, dict) and "views" in batch:
        return int(batch["views"].shape[0])
    if isinstance(batch, dict) and "images" in batch:
        return len(batch["images"])
    if isinstance(batch, list | tuple) and batch and hasattr(batch[0], "shape"):
        return int(batch[0].shape[0])
    return 0


class ThroughputMonitor(Callback):
    """Logs ``train/images_per_s`` (per process, exponentially smoothed) to the progress bar and loggers.

    The time of a step is measured from one batch's end to the next, so data loading is included. Ours, not
    Lightning's ``ThroughputMonitor``, which logs to the loggers only (no progress bar, nothing in the
    ``callback_metrics`` the run summary prints) and after a window of 100 batches (``tests/utils/test_callbacks.py``).
    """

    def __init__(self, smoothing: float = 0.9) -> None:
        self.smoothing = smoothing
        self._last: float | None = None
        self._rate: float | None = None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        n = batch_num_images(batch)
        if self._last is not None and n:
            rate = n / max(now - self._last, 1e-9)
            self._rate = rate if self._rate is None else self.smoothing * self._rate + (1 - self.smoothing) * rate
            pl_module.log("train/images_per_s", self._rate, prog_bar=True, on_step=True, on_epoch=False,
                          batch_size=n)
        self._last = now


class NonFiniteLossError(RuntimeError):
    """Raised by :class:`NonFiniteGuard` when the loss or a logged loss term is NaN or infinite."""


class NonFiniteGuard(BetweenStepsSaver):
    """Stops the run (or skips the step) when the loss or a logged loss term is NaN or infinite.

    The check runs on the loss handed to ``backward`` and on every metric logged in the current step whose
    name contains ``terms`` (``train/loss``, ``train/loss_contrastive``, ``train/proj0/loss``...), before the
    optimiser step, so the weights are still those of the last finite step. Under DDP one rank's non-finite
    value is enough for all ranks to act (one boolean all-reduce per step).

    ``action="stop"`` saves ``<checkpoints>/last-good.ckpt`` and raises :class:`NonFiniteLossError` naming
    the terms, their values and the step. ``action="skip"`` drops the step's gradients so the optimiser
    leaves weights and moments untouched (under fp16 AMP the grad scaler skips the step itself), counts it
    in ``train/nonfinite_skips``, and stops as above once more than ``max_skips`` steps were skipped. The
    learning-rate schedule still advances, and the epoch averages of the logged terms include the bad value.

    The forward pass of a bad step may already have written buffers (BatchNorm statistics, MoCo queues,
    PTB counters); with ``snapshot_buffers`` (default) they are copied at every batch start and put back,
    so both the saved state and a skipped step are as if the bad batch had never been seen (the copy costs
    about one pass over the buffers per step, e.g. the 4 x 65,536 x 128 keys of MPCL's queues).

    Args:
        action: ``stop`` or ``skip``.
        terms: substring selecting the logged metrics checked besides the loss itself.
        max_skips: with ``skip``, the number of skipped steps tolerated (``None``: no limit).
        snapshot_buffers: restore the module's buffers as they were before the bad batch.
        filename: name of the last-good checkpoint in the run's ``checkpoints/`` folder.
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop", terms: str = "loss", max_skips: int | None = None,
                 snapshot_buffers: bool = True, filename: str = "last-good.ckpt") -> None:
        if action not in ("stop", "skip"):
            raise ValueError(f"NonFiniteGuard.action must be 'stop' or 'skip', got '{action}'")
        if max_skips is not None and max_skips < 0:
            raise ValueError(f"NonFiniteGuard.max_skips must be >= 0 or None, got {max_skips}")
        self.action = action
        self.terms = terms
        self.max_skips = max_skips
        self.snapshot_buffers = snapshot_buffers
        self.filename = filename
        self.num_skipped = 0
        self.loop_state = BatchEndLoopState()
        self._buffers: list[tuple[Tensor, Tensor]] = []
        self._batch_idx = 0
        self._drop_gradients = False

    def checkpoint_path(self, trainer: Trainer) -> str:
        callback = trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
        return os.path.join(folder, self.filename)

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.loop_state.capture(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.loop_state.capture(trainer)  # a bad first batch of the next epoch resumes at that epoch's start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_idx = batch_idx
        # Not while a skipped step waits for its optimiser step (gradient accumulation): the snapshot must
        # stay the one from before the bad micro-batch.
        if self.snapshot_buffers and not self._drop_gradients:
            self._buffers = [(b, b.detach().clone()) for b in pl_module.buffers()]

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        if self._drop_gradients:
            return  # a later micro-batch of a step already being skipped (it may see the bad one's buffers)
        bad_terms = self.non_finite_terms(trainer, loss)
        if not trainer.strategy.reduce_boolean_decision(bool(bad_terms), all=False):
            return
        where = (f"global step {trainer.global_step} (epoch {trainer.current_epoch}, batch {self._batch_idx})")
        terms = ", ".join(f"{name}={value}" for name, value in bad_terms) or "a loss term on another rank"
        if self.action == "skip" and (self.max_skips is None or self.num_skipped < self.max_skips):
            self.num_skipped += 1
            self._drop_gradients = True  # and restore the buffers once backward no longer needs them
            rank_zero_warn(f"non-finite loss at {where}: {terms}; skipping this optimiser step "
                           f"({self.num_skipped} skipped so far)")
            return
        self._restore_buffers()  # no backward follows: the graph may be invalidated
        path = self.checkpoint_path(trainer)
        save_between_steps(trainer, path, self.loop_state, self)
        limit = f" after {self.num_skipped} skipped steps (max_skips={self.max_skips})" if self.action == "skip" else ""
        raise NonFiniteLossError(
            f"non-finite loss at {where}{limit}: {terms}. The weights before this step are saved in {path} "
            "(resume with --ckpt_path); lower the learning rate, raise the warmup, check the data, or run with "
            "--nonfinite_loss skip to skip such steps"
        )

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if not self._drop_gradients:
            return
        self._drop_gradients = False
        self._restore_buffers()
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16 AMP: the grad scaler finds the non-finite gradients and skips the step itself
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # SGD, AdamW and LARS leave parameters without a gradient untouched

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.loop_state.capture(trainer)
        if not self._drop_gradients:
            self._buffers = []
        if self.action == "skip":
            pl_module.log("train/nonfinite_skips", float(self.num_skipped), on_step=True, on_epoch=False,
                          batch_size=1)

    def _restore_buffers(self) -> None:
        for buffer, saved in self._buffers:
            buffer.copy_(saved)

    # ------------------------------------------------------------------ check
    def non_finite_terms(self, trainer: Trainer, loss: Tensor | None) -> list[tuple[str, float]]:
        """``(name, value)`` of the loss and the step's logged ``terms`` metrics that are not finite."""
        named: list[tuple[str, Tensor]] = [] if loss is None else [("loss passed to backward", loss.detach())]
        for name, value in trainer.callback_metrics.items():
            # "x" holds this step's value of a metric logged with on_step; "x_step" repeats it and "x_epoch" is
            # the last epoch's average
            if self.terms in name and not name.endswith(("_step", "_epoch")) and isinstance(value, Tensor):
                named.append((name, value.detach()))
        if not named:
            return []
        device = named[0][1].device
        finite = torch.stack([v.float().reshape(-1).isfinite().all().to(device) for _, v in named])
        if bool(finite.all()):  # one host sync per step
            return []
        return [(name, float(v.float().reshape(-1)[~v.float().reshape(-1).isfinite()][0]))
                for (name, v), ok in zip(named, finite.tolist(), strict=True) if not ok]

    def state_dict(self) -> dict[str, Any]:
        return {"num_skipped": self.num_skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_skipped = int(state_dict.get("num_skipped", 0))
