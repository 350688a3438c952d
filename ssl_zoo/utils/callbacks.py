"""Training callbacks shared by all methods (never part of a method's maths)."""

from __future__ import annotations

import time

from lightning.pytorch import Callback, LightningModule, Trainer


def batch_num_images(batch) -> int:
    """Number of images (not views) in a pre-training batch dict or an ``(x, y)`` tuple."""
    if isinstance(batch, dict) and "views" in batch:
        return int(batch["views"].shape[0])
    if isinstance(batch, list | tuple) and batch and hasattr(batch[0], "shape"):
        return int(batch[0].shape[0])
    return 0


class ThroughputMonitor(Callback):
    """Logs ``train/images_per_s`` (per process, exponentially smoothed) to the progress bar and loggers.

    The time of a step is measured from one batch's end to the next, so data loading is included.
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
