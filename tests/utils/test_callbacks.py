"""``ssl_zoo.utils.callbacks``: the NaN / Inf guard (stop naming the term, or skip the step and count it, also
under gradient accumulation) and the throughput monitor where Lightning's does not give what ours does."""

from __future__ import annotations

import csv

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ThroughputMonitor as LightningThroughputMonitor

from ssl_zoo.utils.callbacks import NonFiniteGuard, NonFiniteLossError, ThroughputMonitor, batch_num_images
from tests.helpers.resume import assert_same_state, load_checkpoint
from tests.helpers.tiny_trainer import fit_tiny_module

# The demo's single-label view (about 27 training images at the fixture's size): 6 steps per epoch.
BATCH = 4


class _PoisonStep(Callback):
    """Makes the model's loss non-finite from optimiser step ``step`` on (the fault under test)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            batch["views"].fill_(float("nan"))


def test_nonfinite_loss_stops_naming_the_term_and_saves_the_last_good_state(tmp_path, demo_root):
    guard = NonFiniteGuard(action="stop")
    seen = {}

    class Spy(Callback):  # the state after the last good step, as the bad step begins
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                seen.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    with pytest.raises(NonFiniteLossError, match=r"global step 3 .*train/loss.*=nan.*last-good\.ckpt"):
        from ssl_zoo.data import ImageFolderDataModule
        from ssl_zoo.methods import MPCLMoCoV2

        torch.manual_seed(0)
        model = MPCLMoCoV2(backbone="test_resnet", img_size=32, num_projectors=2, projector_hidden_dims=32,
                           queue_size=32)
        Trainer(max_steps=6, logger=False, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=str(tmp_path), callbacks=[Spy(), _PoisonStep(3), guard],
                enable_checkpointing=False).fit(
            model, datamodule=ImageFolderDataModule(root=f"{demo_root}/folder", batch_size=8, num_workers=0))
    saved = load_checkpoint(tmp_path / "checkpoints" / "last-good.ckpt")
    assert saved["global_step"] == 3
    # every tensor, parameters and buffers (MoCo queues, BatchNorm statistics, PTB counts), as before the bad
    # batch: the bad forward pass had already written queue keys and BN statistics, and they were put back
    assert_same_state(seen, dict(saved["state_dict"]), "state_dict")
    assert all(v.isfinite().all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_nonfinite_loss_skip_leaves_weights_untouched_and_counts(tmp_path, demo_root):
    states = {}

    class Spy(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            states[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    guard = NonFiniteGuard(action="skip", max_skips=2)  # the steps all lie in the first epoch (6 steps)
    from ssl_zoo.data import ImageFolderDataModule
    from ssl_zoo.methods import MPCLMoCoV2

    torch.manual_seed(0)
    model = MPCLMoCoV2(backbone="test_resnet", img_size=32, num_projectors=2, projector_hidden_dims=32, queue_size=32,
                       ema_momentum=1.0)  # a frozen teacher: only the skipped optimiser steps could move anything
    trainer = Trainer(max_steps=6, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path), callbacks=[Spy(), _PoisonStep(2), guard],
                      enable_checkpointing=False)
    with pytest.raises(NonFiniteLossError, match=r"after 2 skipped steps \(max_skips=2\)"):
        trainer.fit(model, datamodule=ImageFolderDataModule(root=f"{demo_root}/folder", batch_size=BATCH,
                                                            num_workers=0))
    assert guard.num_skipped == 2
    # steps 2 and 3 were skipped: the module (weights, queues, BN statistics, PTB) is as at step 2's start
    assert any(not torch.equal(states[1][k], states[2][k]) for k in states[2])  # a good step changes the module
    assert_same_state(states[2], states[3], "after a skipped step")
    assert_same_state(states[2], states[4], "after two skipped steps")
    assert trainer.callback_metrics["train/nonfinite_skips"] == 2


def test_skip_under_gradient_accumulation_forgets_the_whole_step(tmp_path, demo_root):
    """A bad first micro-batch: the step is skipped and the good second micro-batch's buffer writes undone."""
    from ssl_zoo.data import ImageFolderDataModule
    from ssl_zoo.methods import MPCLMoCoV2

    states = {}

    class PoisonFirstMicroBatch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            states[batch_idx] = {k: v.clone() for k, v in pl_module.state_dict().items()}
            if batch_idx == 2:  # micro-batches 2 and 3 make the second optimiser step
                batch["views"].fill_(float("inf"))

    torch.manual_seed(0)
    model = MPCLMoCoV2(backbone="test_resnet", img_size=32, num_projectors=2, projector_hidden_dims=32, queue_size=32,
                       ema_momentum=1.0)
    guard = NonFiniteGuard(action="skip")
    Trainer(max_steps=3, accumulate_grad_batches=2, logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=str(tmp_path), enable_checkpointing=False,
            callbacks=[PoisonFirstMicroBatch(), guard]).fit(
        model, datamodule=ImageFolderDataModule(root=f"{demo_root}/folder", batch_size=BATCH, num_workers=0))
    assert guard.num_skipped == 1
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[2])  # the first step did train
    assert_same_state(states[2], states[4], "after the skipped accumulated step")


def test_lightning_throughput_monitor_does_not_give_what_ours_does(tmp_path):
    """Why ``ssl_zoo.utils.callbacks.ThroughputMonitor`` is ours: Lightning's ``ThroughputMonitor`` sends its rates
    to the loggers only (not to the progress bar, nor to ``trainer.callback_metrics``, which the run summary
    prints), and only once a window of ``window_size`` batches (100 by default) has been seen."""
    ours = fit_tiny_module(tmp_path / "ours", [ThroughputMonitor()])
    assert "train/images_per_s" in ours.progress_bar_metrics and "train/images_per_s" in ours.callback_metrics

    def logged_columns(trainer: Trainer) -> set[str]:
        with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
            return set(next(csv.reader(f)))

    for window, rate_logged in ((100, False), (2, True)):
        with pytest.warns(UserWarning, match="flops_per_batch"):  # on every run of a module without FLOPs
            theirs = fit_tiny_module(tmp_path / f"lightning{window}", [LightningThroughputMonitor(batch_num_images,
                                                                                     window_size=window)])
        shown = set(theirs.progress_bar_metrics) | set(theirs.callback_metrics)
        assert not any("per_sec" in name for name in shown)
        assert ("train/device/samples_per_sec" in logged_columns(theirs)) is rate_logged
