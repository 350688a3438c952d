"""Reporting of the unreadable images that ``on_bad_sample="skip"`` replaced during pre-training.

A DataLoader worker is a separate process: a counter kept on the dataset object there never reaches the
main process, let alone the other DDP ranks. So the data modules put the skipped files in every sample
(``ViewDataset``: ``num_skipped`` and ``bad_files``), they travel with the batch, and this callback adds
them up on each rank and sums over ranks at the end of every epoch. The per-epoch count is therefore
exact whatever ``num_workers`` and the number of processes are.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

__all__ = ["BadSampleMonitor", "read_bad_files"]


def read_bad_files(batch: Any) -> list[tuple[str, str]]:
    """The ``(path, reason)`` of every unreadable file passed over to build ``batch`` (repeats included).

    Reads the ``bad_files`` strings of a data-module batch (one JSON list per sample, ``""`` when none);
    any other batch yields ``[]``. Host-side only: no device synchronisation.
    """
    if not isinstance(batch, dict):
        return []
    entries = batch.get("bad_files")
    if not isinstance(entries, list | tuple):
        return []
    return [(path, reason) for entry in entries if entry for path, reason in json.loads(entry)]


class BadSampleMonitor(Callback):
    """Logs how many unreadable images were skipped each epoch and lists them in the run directory.

    Per training epoch, summed over DataLoader workers and DDP ranks:

    * ``data/skipped_epoch``: unreadable files passed over to build this epoch's batches (an unreadable
      file is replaced by the next readable one, so each bad file is counted once per epoch in which it
      is drawn; ``k`` consecutive bad files in dataset order count ``k, k-1, ..., 1`` for the ``k``
      samples they stand in for);
    * ``data/skipped_total``: the same, summed over all epochs so far (kept across resumes);
    * ``<dirpath>/<filename>``: the first ``max_listed`` distinct unreadable files, one
      ``path<TAB>reason`` per line, rewritten on global rank 0 after every epoch that found new ones.

    Does nothing for batches without ``bad_files`` (``on_bad_sample="raise"`` stops at the first bad file).

    Args:
        filename: name of the list in ``dirpath``.
        max_listed: distinct files to list (the counts are always exact).
        dirpath: where to write the list; ``None`` = ``trainer.default_root_dir`` (the CLI's run directory).
    """

    def __init__(self, filename: str = "bad_samples.txt", max_listed: int = 1000, dirpath: str | None = None) -> None:
        if max_listed < 0:
            raise ValueError(f"max_listed must be >= 0, got {max_listed}")
        self.filename = filename
        self.max_listed = max_listed
        self.dirpath = dirpath
        self.skipped_total = 0
        self.listed: dict[str, str] = {}  # path -> reason, insertion-ordered, at most max_listed
        self._epoch_skipped = 0
        self._epoch_files: dict[str, str] = {}

    def path(self, trainer: Trainer) -> str:
        return os.path.join(self.dirpath or trainer.default_root_dir, self.filename)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_skipped = 0
        self._epoch_files = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for path, reason in read_bad_files(batch):
            self._epoch_skipped += 1
            if len(self._epoch_files) < self.max_listed:
                self._epoch_files.setdefault(path, reason)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        count = torch.tensor(self._epoch_skipped, dtype=torch.long, device=pl_module.device)
        count = int(trainer.strategy.reduce(count, reduce_op="sum"))  # all ranks
        files = [self._epoch_files]
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            files = [{} for _ in range(trainer.world_size)]
            dist.all_gather_object(files, self._epoch_files)
        self.skipped_total += count
        new = 0
        for rank_files in files:
            for path, reason in rank_files.items():
                if path not in self.listed and len(self.listed) < self.max_listed:
                    self.listed[path] = reason
                    new += 1
        pl_module.log("data/skipped_epoch", float(count), on_step=False, on_epoch=True)
        pl_module.log("data/skipped_total", float(self.skipped_total), on_step=False, on_epoch=True)
        if count and trainer.is_global_zero:
            target = self.path(trainer)
            if new:
                os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
                with open(target, "w", encoding="utf-8") as f:
                    f.writelines(f"{path}\t{reason}\n" for path, reason in self.listed.items())
            rank_zero_warn(
                f"epoch {trainer.current_epoch}: {count} unreadable images were skipped "
                f"(on_bad_sample='skip'; {self.skipped_total} so far); the files are listed in '{target}'"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_total": self.skipped_total, "listed": [[p, r] for p, r in self.listed.items()]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_total = int(state_dict.get("skipped_total", 0))
        self.listed = {path: reason for path, reason in state_dict.get("listed", [])}
