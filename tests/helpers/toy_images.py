"""A seeded in-memory image dataset for the evaluation tests: random 32 px images with labels cycling through the
classes."""

from __future__ import annotations

import torch


class ToyImageDataset(torch.utils.data.Dataset):
    """``n`` seeded random ``[3, 32, 32]`` images; image ``i`` has label ``i % num_classes``."""

    def __init__(self, n=12, num_classes=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 32, 32, generator=g)
        self.labels = torch.arange(n) % num_classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]
