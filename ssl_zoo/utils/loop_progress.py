"""How far the fit loop has got: the one place that reads Lightning's private loop counters.

Lightning 2.x keeps its loops private (``trainer.fit_loop`` is a ``_FitLoop``) and no public ``Trainer`` property
gives the batches trained in the current epoch or the epoch a stopped run was in. ``test_library_contracts.py``
checks both counters against the hooks' own ``batch_idx`` and epoch, so a change in Lightning fails loudly.
"""

from __future__ import annotations

from typing import Any

__all__ = ["lightning_private_batches_done", "lightning_private_epochs_started"]


def lightning_private_batches_done(trainer: Any) -> int:
    """Training batches processed in the current epoch (``fit_loop.epoch_loop.batch_progress.current.processed``)."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)


def lightning_private_epochs_started(trainer: Any) -> int:
    """Training epochs started, the current one included (``fit_loop.epoch_progress.current.started``): the 1-based
    epoch being trained, which ``trainer.current_epoch`` already counts as done once a stop cut it short."""
    return int(trainer.fit_loop.epoch_progress.current.started)
