"""Lightning's private loop counters that ``ssl_zoo.utils.loop_progress`` reads: tests that fail loudly when
Lightning changes what they pin."""

from __future__ import annotations

from lightning.pytorch import Callback

from ssl_zoo.utils.loop_progress import (
    lightning_private_batches_done,
    lightning_private_epochs_started,
    lightning_private_fit_loop_state,
    lightning_private_next_epoch_loop_state,
)
from tests.helpers.tiny_trainer import BATCHES_PER_EPOCH, fit_tiny_module


class _RecordProgress(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append((trainer.current_epoch + 1, batch_idx + 1, lightning_private_epochs_started(trainer),
                          lightning_private_batches_done(trainer)))


def test_lightning_private_loop_counters_follow_the_hooks(tmp_path):
    """The _fit loop's private counters read by ``ssl_zoo.utils.loop_progress``: in every ``on_train_batch_end``
    the epoch started is the hook's (1-based) epoch and the batches done are ``batch_idx + 1``; after a stop in
    the middle of epoch 2 they still name that epoch and its batches, while ``current_epoch`` has moved on."""
    record = _RecordProgress()
    fit_tiny_module(tmp_path, [record])
    assert [(e, b) for e, b, _, _ in record.seen] == [(e, b) for e in (1, 2) for b in range(1, BATCHES_PER_EPOCH + 1)]
    assert all(started == epoch and done == batch for epoch, batch, started, done in record.seen)
    stopped = fit_tiny_module(tmp_path, [], max_steps=BATCHES_PER_EPOCH + 2)  # 2 batches into the second epoch
    assert (lightning_private_epochs_started(stopped), lightning_private_batches_done(stopped)) == (2, 2)


def test_next_epoch_loop_state_reads_lightnings_fit_loop_layout(tmp_path):
    """The loop state a checkpoint written at a complete epoch's end carries: that epoch completed, the batch,
    scheduler and optimiser counters of the current epoch back at zero, totals kept, the captured state untouched."""

    class CaptureAtEpochEnd(Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.state = lightning_private_fit_loop_state(trainer)

    capture = CaptureAtEpochEnd()
    fit_tiny_module(tmp_path, [capture], max_epochs=1)
    before = capture.state
    after = lightning_private_next_epoch_loop_state(before)
    assert before["epoch_progress"]["current"]["completed"] == 0 and before["epoch_progress"]["current"]["processed"] == 1
    assert after["epoch_progress"]["current"]["completed"] == after["epoch_progress"]["current"]["processed"] == 1
    assert before["epoch_loop.batch_progress"]["current"]["processed"] == BATCHES_PER_EPOCH
    assert set(after["epoch_loop.batch_progress"]["current"].values()) == {0}
    assert after["epoch_loop.batch_progress"]["total"]["processed"] == BATCHES_PER_EPOCH
    assert after["epoch_loop.batch_progress"]["is_last_batch"] is False
    optimiser = after["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]
    assert optimiser and all(set(p["current"].values()) == {0} for p in optimiser.values())
    assert optimiser["step"]["total"]["completed"] == BATCHES_PER_EPOCH
