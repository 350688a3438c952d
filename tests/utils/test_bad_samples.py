"""``BadSampleMonitor`` (``ssl_zoo.utils.bad_samples``): the epoch's count of skipped files is logged and the files
listed, also summed over DDP ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from ssl_zoo.data.datamodule import ImageFolderDataModule
from ssl_zoo.utils.bad_samples import BadSampleMonitor
from tests.data.images import expected_walk, labelled_tree, pixel_views
from tests.helpers.tiny_trainer import logged_values


class PixelModule(LightningModule):
    """The smallest module a Trainer accepts: a linear map of the 1x1 views (the data is what is tested)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x = batch["views"][:, 0, :, 0, 0] / 255.0  # [B, 3]
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit_with_monitor(root: Path, run_dir: Path, num_workers: int, **trainer_kwargs) -> None:
    datamodule = ImageFolderDataModule(root=str(root), train_dir="train", batch_size=5, num_workers=num_workers,
                                       on_bad_sample="skip", train_transform=pixel_views)
    trainer = Trainer(max_epochs=2, logger=CSVLogger(run_dir, name="", version=""), default_root_dir=run_dir,
                      callbacks=[BadSampleMonitor()], enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", **trainer_kwargs)
    trainer.fit(PixelModule(), datamodule=datamodule)


def _check_reported(run_dir: Path, files: list[tuple[Path, int, bool]], reference: int) -> None:
    assert logged_values(run_dir / "metrics.csv", "data/skipped_epoch") == [reference, reference]
    assert logged_values(run_dir / "metrics.csv", "data/skipped_total") == [reference, 2 * reference]
    lines = (run_dir / "bad_samples.txt").read_text().splitlines()
    listed = dict(line.split("\t") for line in lines)
    assert set(listed) == {str(p) for p, _, b in files if b}
    reasons = {Path(p).stem: reason for p, reason in listed.items()}
    assert reasons["003"] == "empty file (0 bytes)" and reasons["017"] == "not a recognised image format"


def test_bad_sample_monitor_logs_the_epoch_count_and_lists_the_files(tmp_path):
    bad = {3: "zero-byte", 4: "truncated", 17: "text", 22: "random"}
    files = labelled_tree(tmp_path / "tree" / "train", 40, bad=bad)
    is_bad = [b for _, _, b in files]
    reference = sum(expected_walk(is_bad, position)[1] for position in range(len(files)))
    _fit_with_monitor(tmp_path / "tree", tmp_path / "run", num_workers=2, devices=1)
    _check_reported(tmp_path / "run", files, reference)


@pytest.mark.slow
@pytest.mark.distributed
def test_bad_sample_monitor_sums_over_ddp_ranks(tmp_path):
    bad = {3: "zero-byte", 4: "truncated", 17: "text", 22: "random", 30: "corrupt-header"}
    files = labelled_tree(tmp_path / "tree" / "train", 40, bad=bad)
    is_bad = [b for _, _, b in files]
    reference = sum(expected_walk(is_bad, position)[1] for position in range(len(files)))
    # 40 images over 2 ranks: 20 each, no padding, so every position is drawn exactly once per epoch.
    _fit_with_monitor(tmp_path / "tree", tmp_path / "run", num_workers=0, devices=2, strategy="ddp_spawn")
    _check_reported(tmp_path / "run", files, reference)
