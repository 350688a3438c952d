"""What the tests of callbacks and loop counters share: a tiny LightningModule fitted by a real Trainer on CPU, and
the columns of the ``metrics.csv`` a run's CSVLogger writes."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

BATCHES_PER_EPOCH = 5


class TinyRegressionModule(LightningModule):
    """A linear map of random 4-d inputs, ``BATCHES_PER_EPOCH`` batches of 4 an epoch: the loop is what is tested."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(4 * BATCHES_PER_EPOCH, 4)), batch_size=4)


def fit_tiny_module(tmp_path, callbacks, **trainer_kwargs) -> Trainer:
    """Fit a :class:`TinyRegressionModule` (2 epochs unless ``max_epochs`` is given), logging every step to CSV."""
    trainer = Trainer(callbacks=callbacks, logger=CSVLogger(tmp_path), log_every_n_steps=1, accelerator="cpu",
                      enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                      **{"max_epochs": 2, **trainer_kwargs})
    trainer.fit(TinyRegressionModule())
    return trainer


def logged_values(metrics_csv: Path, key: str) -> list[float]:
    """The values logged under ``key`` in a CSVLogger's ``metrics.csv``, in row order (rows without it skipped)."""
    with open(metrics_csv, newline="") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]
