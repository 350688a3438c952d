"""Checkpoints a run can be resumed from exactly, written so that a crash never leaves a broken one.

* :class:`AtomicCheckpointIO` writes ``<name>.tmp`` next to the target, syncs it to disk and renames it over
  the target, so ``last.ckpt`` is always either the previous or the new checkpoint, never a truncated file.
* :class:`LastCheckpoint` writes ``checkpoints/last.ckpt`` every N optimiser steps and at the end of every
  epoch, *between* steps: after the LightningModule's own ``on_train_batch_end`` (where the momentum methods
  update their EMA teachers), which runs after every callback's, so Lightning's ``ModelCheckpoint`` would
  save a teacher one EMA update behind the student.
* :class:`RNGStateCheckpoint` stores the Python, NumPy, torch CPU and CUDA RNG states of every rank and
  restores them when training resumes (dropout, drop path, random shuffles inside the methods).

Together with the data module's checkpointed sampler position (:mod:`ssl_zoo.data.sampler`) and Lightning's
own model / optimiser / scheduler / loop state, a run killed at any point and restarted from ``last.ckpt``
continues the trajectory it would have followed. :func:`find_resume_checkpoint` is the lookup behind the
command line's ``--resume``.
"""

from __future__ import annotations

import copy
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ssl_zoo.utils.loop_progress import (
    lightning_private_batches_done,
    lightning_private_fit_loop_state,
    lightning_private_next_epoch_loop_state,
)

__all__ = [
    "AtomicCheckpointIO",
    "BetweenStepsSaver",
    "BatchEndLoopState",
    "LastCheckpoint",
    "RNGStateCheckpoint",
    "find_resume_checkpoint",
    "keep_previous_metrics",
    "save_between_steps",
]


# ----------------------------------------------------------------------------------------- atomic writes
class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic: temp file in the same folder, fsync, rename.

    Lightning's own save goes through an fsspec transaction whose temporary file lives in the system temp
    folder; when that is another file system than the run directory (node-local ``/tmp``, runs on a shared
    file system) the final move is a copy into the target, which a kill can truncate. A rename within one
    folder is atomic on POSIX file systems. Remote paths (``s3://``...) keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or get_filesystem(path).protocol not in ("file", ("file", "local")):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        try:  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:  # some file systems cannot fsync a directory; the data is already synced
            pass


# ----------------------------------------------------------------------------------------- between steps
class BatchEndLoopState:
    """The fit loop's state as it was at the end of the last training batch.

    A checkpoint written later (at the next batch start, at the epoch end, before a bad optimiser step) but
    carrying this loop state restores as if it had been written at that batch end, the point Lightning's
    restart logic expects, while the module, optimiser and callbacks it holds are the later, complete ones.
    """

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None

    def capture(self, trainer: Trainer) -> None:
        self.state = lightning_private_fit_loop_state(trainer)  # freshly built dicts of counters (~0.1 ms)

    def apply(self, checkpoint: dict[str, Any]) -> None:
        if self.state is not None:
            checkpoint["loops"]["fit_loop"] = copy.deepcopy(self.state)


def save_between_steps(trainer: Trainer, filepath: str, loop_state: BatchEndLoopState,
                       owner: BetweenStepsSaver) -> None:
    """``trainer.save_checkpoint(filepath)`` with the fit loop's state from the last batch end (all ranks)."""
    owner._loop_state_to_save = loop_state
    try:
        trainer.save_checkpoint(filepath, weights_only=False)
    finally:
        owner._loop_state_to_save = None


class BetweenStepsSaver(Callback):
    """Puts the batch-end loop state into the checkpoints this callback itself triggers."""

    _loop_state_to_save: BatchEndLoopState | None = None

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._loop_state_to_save is not None:
            self._loop_state_to_save.apply(checkpoint)


class LastCheckpoint(Checkpoint, BetweenStepsSaver):
    """``<dirpath>/last.ckpt`` every ``every_n_train_steps`` optimiser steps, at every epoch end and at the end.

    A save that falls due at the end of optimiser step ``k`` is written once everything belonging to step
    ``k`` has run, i.e. at the start of the next batch, with the loop state of the end of step ``k``; at the
    end of an epoch it is written after the epoch-end hooks. Resuming from it repeats nothing and skips
    nothing. (When training stops part-way through an epoch, Lightning runs the epoch-end hooks early, e.g.
    MPCL's PTB update; a run resumed from that checkpoint keeps their effect.)

    Args:
        dirpath: folder of ``last.ckpt`` (the run's ``checkpoints/``).
        every_n_train_steps: optimiser steps between saves; ``0`` saves at epoch ends only.
        filename: file name inside ``dirpath``.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 1000, filename: str = "last.ckpt") -> None:
        if every_n_train_steps < 0:
            raise ValueError(f"checkpoint_every_n_steps must be >= 0 (0 = at epoch ends only), got "
                             f"{every_n_train_steps}")
        self.dirpath = dirpath
        self.every_n_train_steps = every_n_train_steps
        self.filename = filename
        self.loop_state = BatchEndLoopState()
        self._due = False
        self._saved_at_step = -1
        self._step_at_batch_end = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=self.dirpath, filename=self.filename)

    @property
    def last_model_path(self) -> str:
        return os.path.join(self.dirpath, self.filename)

    def _save(self, trainer: Trainer, loop_state: BatchEndLoopState | None) -> None:
        self._due = False
        if trainer.sanity_checking or trainer.fast_dev_run or self._saved_at_step == trainer.global_step:
            return
        save_between_steps(trainer, self.last_model_path, loop_state or BatchEndLoopState(), self)
        self._saved_at_step = trainer.global_step

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._step_at_batch_end = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.loop_state.capture(trainer)
        # Only right after an optimiser step: mid-way through gradient accumulation the gradients so far
        # are in no checkpoint.
        stepped, self._step_at_batch_end = trainer.global_step != self._step_at_batch_end, trainer.global_step
        n = self.every_n_train_steps
        if stepped and n and trainer.global_step % n == 0 and trainer.global_step != self._saved_at_step:
            self._due = True

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._due:
            self._save(trainer, self.loop_state)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Runs with the other checkpoint callbacks, after the module's on_train_epoch_end (MPCL's PTB update).
        # A complete epoch: the loop state of the next epoch's start (lightning_private_next_epoch_loop_state),
        # resumed with the next epoch. An epoch cut short (max_steps, max_time, should_stop): the state of its last batch
        # end, so that a resumed run trains the rest of the epoch.
        complete = lightning_private_batches_done(trainer) >= trainer.num_training_batches
        if complete:
            next_epoch = BatchEndLoopState()
            next_epoch.state = lightning_private_next_epoch_loop_state(lightning_private_fit_loop_state(trainer))
            self._save(trainer, next_epoch)
        else:
            self._save(trainer, self.loop_state)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.loop_state.state is not None:  # e.g. max_steps reached mid-epoch
            self._save(trainer, self.loop_state)

    def state_dict(self) -> dict[str, Any]:
        return {"dirpath": self.dirpath, "saved_at_step": self._saved_at_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved_at_step = int(state_dict.get("saved_at_step", -1))


# ----------------------------------------------------------------------------------------- RNG states
def _rng_states() -> dict[str, Any]:
    # Tensors, ints, floats and tuples only: Lightning loads checkpoints with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The current device only: get_rng_state_all() would create a context on every visible GPU.
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    name, keys, pos, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


class RNGStateCheckpoint(Callback):
    """Saves every rank's global RNG states in each checkpoint and restores them when training resumes.

    Restored at ``on_train_start``, after the training DataLoader's iterator exists: nothing between that
    point and the next training step draws from these RNGs (the data pipeline has its own seeds), as
    nothing between the save and the next step did in the uninterrupted run.
    """

    def __init__(self) -> None:
        self._to_restore: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        import torch.distributed as dist

        states = _rng_states()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)
            return {"per_rank": gathered}
        return {"per_rank": [states]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict.get("per_rank")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._to_restore:
            return
        states, self._to_restore = self._to_restore, None
        if len(states) != trainer.world_size:
            rank_zero_warn(f"the checkpoint holds RNG states of {len(states)} processes, this run has "
                           f"{trainer.world_size}: random draws will differ from the uninterrupted run")
            return
        _set_rng_states(states[trainer.global_rank])


# ----------------------------------------------------------------------------------------- --resume
def find_resume_checkpoint(run_root: str, name: str, stamp: str | None = None) -> Path | None:
    """``<run_root>/<name>/<stamp>/checkpoints/last.ckpt`` of the newest run (or of run ``stamp``), if any.

    Run directories are named by their start time (``YYYYmmdd-HHMMSS``), so the newest sorts last.
    """
    base = Path(run_root) / name
    if stamp is not None:
        candidate = base / stamp / "checkpoints" / "last.ckpt"
        return candidate if candidate.is_file() else None
    found = sorted(base.glob("*/checkpoints/last.ckpt"), key=lambda p: p.parent.parent.name)
    return found[-1] if found else None


def keep_previous_metrics(run_dir: str) -> Path | None:
    """Rename an existing ``<run_dir>/metrics.csv`` to ``metrics.part<k>.csv`` (k = 1, 2, ...) and return it.

    Lightning's CSVLogger deletes ``metrics.csv`` when it finds one in its folder; a resumed run continues
    in the same folder, so its history up to the interruption is kept under the next free part number.
    """
    current = Path(run_dir) / "metrics.csv"
    if not current.is_file():
        return None
    k = 1
    while (kept := current.with_name(f"metrics.part{k}.csv")).exists():
        k += 1
    current.rename(kept)
    return kept
