"""The summary printed at the end of a run (``ssl_zoo.cli.run_summary``)."""



def test_run_summary_says_when_max_time_stopped_the_schedule(tmp_path):
    """A fit that trainer.max_time ends before max_epochs is named in the summary (epoch and step reached); one
    that ran its schedule within the limit is not."""
    import time

    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    from ssl_zoo.cli.run_summary import format_run_summary

    class SlowBatches(Callback):
        """Sleeps after every batch from global step ``from_step`` on, so that max_time runs out there."""

        def __init__(self, seconds, from_step=0):
            self.seconds, self.from_step = seconds, from_step

        def on_train_batch_end(self, trainer, *args, **kwargs):
            if trainer.global_step >= self.from_step:
                time.sleep(self.seconds)

    def fit(max_time, callbacks, max_epochs=50):
        trainer = Trainer(max_epochs=max_epochs, max_time=max_time, limit_train_batches=3, limit_val_batches=0,
                          logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path)
        trainer.fit(BoringModel())
        return trainer

    cut = fit({"seconds": 1}, [SlowBatches(0.1)])
    assert 0 < cut.global_step < 50 * 3
    summary = format_run_summary(cut, BoringModel(), "fit")
    (line,) = [row for row in summary.splitlines() if row.startswith("stopped")]
    # BoringModel takes one optimizer step per batch: the epoch reached and its batches follow from the steps.
    epoch = -(-cut.global_step // 3)  # ceil
    batches_done = cut.global_step - 3 * (epoch - 1)
    assert "trainer.max_time" in line
    assert f"in epoch {epoch} of 50, after {batches_done} of its 3 batches (step {cut.global_step})" in line

    # Cut short in its last epoch (the time runs out after its first batch, step 4 of 6): the schedule did not
    # finish either, though Lightning counts that epoch done.
    last = fit({"seconds": 2}, [SlowBatches(2.5, from_step=4)], max_epochs=2)
    assert 3 < last.global_step < 6 and last.current_epoch == 2
    assert f"in epoch 2 of 2, after {last.global_step - 3} of its 3 batches" in format_run_summary(
        last, BoringModel(), "fit")
    complete = fit({"minutes": 5}, [])
    assert complete.current_epoch == 50
    assert "stopped" not in format_run_summary(complete, BoringModel(), "fit")
