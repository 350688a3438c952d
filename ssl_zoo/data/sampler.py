"""Training-set order and augmentation randomness as pure functions of ``(seed, epoch, position)``.

Exact resume needs the data stream after a restart to be the one an uninterrupted run would have seen.
Two things usually depend on process history instead:

* the shuffle order: ``RandomSampler`` draws it from the global torch RNG when the epoch's iterator is
  created, and nothing skips the batches already trained on;
* the augmentations: each DataLoader worker's RNG is seeded once and then advances with every sample it
  happens to be given, so which crop a sample gets depends on which worker served it and what that
  worker did before (and with ``num_workers=0`` the augmentations share the RNG with the model).

:class:`ResumableSampler` fixes both: its permutation is ``DistributedSampler``'s (a function of seed and
epoch, sharded over ranks), it can start an epoch part-way through (:meth:`ResumableSampler.resume`), and
it hands out :class:`SampleKey` ``(index, seed, epoch)`` instead of bare indices. The dataset
(:class:`~ssl_zoo.data.datamodule.ViewDataset`) runs its transform under :func:`seeded_rng` with
``sample_seed(seed, epoch, index)``, computed in the DataLoader worker, so a sample's views depend only on
``(seed, epoch, index)``, whatever the worker count, the worker, or the point where training resumed.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["ResumableSampler", "SampleKey", "sample_seed", "seeded_rng"]


class SampleKey(NamedTuple):
    """What :class:`ResumableSampler` yields: the dataset index and the coordinates of its random stream."""

    index: int
    seed: int
    epoch: int


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed for sample ``index`` in ``epoch`` of a run seeded with ``seed`` (independent streams).

    NumPy's ``SeedSequence`` hashes the three integers, so nearby triples give unrelated seeds.
    """
    words = [int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch), int(index)]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0])


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed torch (CPU), Python's ``random`` and NumPy's global RNG with ``seed`` inside the block only.

    The previous states are restored on exit, so in the main process (``num_workers=0``) the data
    pipeline draws nothing from the RNG stream that the model uses.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that yields :class:`SampleKey` ``(index, seed, epoch)`` and can start part-way.

    The order is ``DistributedSampler``'s: a permutation seeded with ``seed + epoch``, padded to a multiple
    of ``num_replicas`` and dealt round-robin to the ranks (one process: the plain permutation). Because it
    *is* a ``DistributedSampler``, Lightning keeps it under DDP instead of replacing it with its own, and
    calls :meth:`set_epoch` before every epoch.

    Args:
        dataset: the map-style training set (only its length is used).
        seed: run seed (Lightning's ``PL_GLOBAL_SEED``); the same on every rank.
        num_replicas: number of processes (world size).
        rank: this process's global rank.
        shuffle: permute the indices every epoch (``False``: dataset order).
    """

    def __init__(self, dataset: Dataset, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=False)
        self._resume: tuple[int, int] | None = None  # (epoch, samples of this rank already used)

    def resume(self, epoch: int, start: int) -> None:
        """Continue ``epoch`` after its first ``start`` samples of this rank (a resumed run's first epoch).

        Also sets the epoch now: Lightning creates the resumed epoch's iterator before its ``set_epoch``
        call, and DataLoader workers draw their first indices as soon as the iterator exists.
        """
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.epoch = epoch
        self._resume = (epoch, start) if start else None

    def set_epoch(self, epoch: int) -> None:
        if self._resume is not None and self._resume[0] != epoch:
            self._resume = None  # the partly-trained epoch is over
        super().set_epoch(epoch)

    @property
    def start(self) -> int:
        """Samples of this rank skipped at the beginning of the current epoch."""
        return self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0

    def __iter__(self) -> Iterator[SampleKey]:
        indices = list(super().__iter__())[self.start :]
        return iter([SampleKey(index, self.seed, self.epoch) for index in indices])

    def __len__(self) -> int:
        # The full epoch: Lightning sizes the epoch from it and counts the resumed batches itself.
        return self.num_samples
