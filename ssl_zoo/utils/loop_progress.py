"""How far the fit loop has got: the one place that reads and writes Lightning's private loop counters.

Lightning 2.x keeps its loops private (``trainer.fit_loop`` is a ``_FitLoop``): no public ``Trainer`` property gives
the batches trained in the current epoch or the epoch a stopped run was in, and the loop state a checkpoint carries
is the private loops' own layout. ``tests/utils/test_loop_progress.py`` checks the counters against the hooks' own
``batch_idx`` and epoch and the layout against a real fit, so a change in Lightning fails loudly.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["lightning_private_batches_done", "lightning_private_epochs_started", "lightning_private_fit_loop_state",
           "lightning_private_next_epoch_loop_state", "training_epoch_completed"]


def lightning_private_batches_done(trainer: Any) -> int:
    """Training batches processed in the current epoch (``fit_loop.epoch_loop.batch_progress.current.processed``)."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)


def training_epoch_completed(trainer: Any) -> bool:
    """Whether the training epoch now ending ran over all its batches (Lightning's own test for an epoch's end,
    ``_num_ready_batches_reached``): False when ``max_steps`` or a stop request cut it short; True without a trainer
    (a caller that closes epochs by hand)."""
    if trainer is None:
        return True
    return trainer.is_last_batch or lightning_private_batches_done(trainer) >= trainer.num_training_batches


def lightning_private_epochs_started(trainer: Any) -> int:
    """Training epochs started, the current one included (``fit_loop.epoch_progress.current.started``): the 1-based
    epoch being trained, which ``trainer.current_epoch`` already counts as done once a stop cut it short."""
    return int(trainer.fit_loop.epoch_progress.current.started)


def lightning_private_fit_loop_state(trainer: Any) -> dict[str, Any]:
    """The fit loop's counters as Lightning writes them to ``checkpoint["loops"]["fit_loop"]``."""
    return trainer.fit_loop.state_dict()


def lightning_private_next_epoch_loop_state(fit_loop_state: dict[str, Any]) -> dict[str, Any]:
    """The fit loop's state at the start of the next epoch, from its state in ``on_train_epoch_end`` of a
    complete epoch (the epoch counted processed, not yet completed; its batch counters at the epoch's end).

    Lightning restores a checkpoint written at that point as "the epoch has finished" only in epoch-based
    training: with ``max_steps`` set it keeps the restored loops restarting, counts one more batch in the finished
    epoch and then starts the next one late. A checkpoint carrying the next epoch's start resumes at its first
    batch in both cases, where the data module's sampler position points.
    """
    state = copy.deepcopy(fit_loop_state)

    def zero(tracker: dict[str, Any]) -> None:
        for key in tracker:
            tracker[key] = 0

    for tracker in state["epoch_progress"].values():
        tracker["completed"] = tracker["processed"]
    batches = state["epoch_loop.batch_progress"]
    zero(batches["current"])
    batches["is_last_batch"] = False
    zero(state["epoch_loop.scheduler_progress"]["current"])
    for progress in state.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {}).values():
        zero(progress["current"])
    return state
