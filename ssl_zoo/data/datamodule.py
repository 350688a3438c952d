"""LightningDataModules over the real dataset formats.

The pre-training batch is a dict produced by the method's view transform (the *view transform hook*):
the data module asks the LightningModule for ``train_transform()`` at ``setup`` time, so each method
supplies its own multi-view augmentation while the data module stays method-agnostic. Every sample is
decoded once; the transform makes all of its views from that one image. Items are

    {"views": Tensor[V, 3, S, S], <method-specific keys, e.g. "block_ids", "mask">,
     "target": Tensor[C] | int, "index": int}

and torch's default collate stacks them into ``[B, ...]``. Lightning injects the ``DistributedSampler``
under DDP (``Trainer(use_distributed_sampler=True)``, its default), so ``batch_size`` is per process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from ssl_zoo.augment.views import IMAGENET_MEAN, IMAGENET_STD


def eval_transform(size: int = 224, resize_ratio: float = 0.875) -> Callable:
    """Deterministic evaluation transform: resize the short side to size/0.875, centre-crop, normalise."""
    return T.Compose(
        [
            T.PILToTensor(),
            T.Resize(int(round(size / resize_ratio)), antialias=True),
            T.CenterCrop(size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class ViewDataset(Dataset):
    """Wraps a labelled dataset whose transform returns a dict of views; adds ``target`` and ``index``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        views, target = self.dataset[index]
        if not isinstance(views, dict) or "views" not in views:
            raise TypeError(
                "a pre-training view transform must return a dict with a 'views' tensor [V, 3, S, S]; "
                f"got {type(views).__name__}"
            )
        return {**views, "target": target, "index": index}


class PretrainDataModule(LightningDataModule):
    """Loader settings shared by every dataset format; subclasses only say how to build the datasets.

    Args:
        root: dataset root directory.
        batch_size: images per process and step (each image yields several views).
        num_workers: DataLoader worker processes per process.
        pin_memory: pin host memory (only when a GPU is present).
        persistent_workers: keep workers alive between epochs (when ``num_workers > 0``).
        on_bad_sample: ``raise`` (an unreadable image stops the run naming the file) or ``skip``
            (replaced by another sample and counted).
        validate_files: check that every image file exists at setup (fails in seconds, not hours).
        eval_size: input size of the evaluation transform used by ``labelled_dataset``.
        train_transform: override the method's view transform (tests, ablations).
    """

    def __init__(
        self,
        root: str = "data/demo",
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        on_bad_sample: Literal["raise", "skip"] = "raise",
        validate_files: bool = False,
        eval_size: int = 224,
        train_transform: Callable | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.root = root
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.on_bad_sample = on_bad_sample
        self.validate_files = validate_files
        self.eval_size = eval_size
        self.train_transform = train_transform
        self.train_set: ViewDataset | None = None

    # ----------------------------------------------------------- what subclasses provide
    def build_dataset(self, split: Literal["train", "val"], transform: Callable | None) -> Dataset:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @property
    def multilabel(self) -> bool:
        return True

    # ----------------------------------------------------------- shared
    def _path(self, relative: str) -> str:
        return relative if os.path.isabs(relative) else os.path.join(self.root, relative)

    def check_root(self) -> None:
        if not Path(self.root).is_dir():
            hint = " (run `make demo-data` to generate the built-in demo dataset)" if "demo" in self.root else ""
            raise FileNotFoundError(f"data.root: dataset root '{self.root}' does not exist{hint}")

    def _module_hook(self, name: str) -> Callable | None:
        module = self.trainer.lightning_module if self.trainer is not None else None
        return getattr(module, name, None)

    def _resolve_train_transform(self) -> Callable:
        if self.train_transform is not None:
            return self.train_transform
        hook = self._module_hook("train_transform")
        if hook is None:
            raise RuntimeError(
                "the data module needs a view transform: pass data.train_transform or give the "
                "LightningModule a train_transform() method"
            )
        return hook()

    def setup(self, stage: str | None = None) -> None:
        self.check_root()
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = ViewDataset(self.build_dataset("train", self._resolve_train_transform()))
            if len(self.train_set) < self.batch_size:
                raise ValueError(
                    f"data.batch_size={self.batch_size} is larger than the {len(self.train_set)} training "
                    f"images under '{self.root}' (drop_last would leave no batch)"
                )

    def val_dataloader(self) -> DataLoader:
        """Validation split through the module's ``val_transform()`` hook (probes, fine-tuning)."""
        hook = self._module_hook("val_transform")
        if hook is None:
            raise RuntimeError("validation needs a val_transform() method on the LightningModule")
        return self._loader(ViewDataset(self.build_dataset("val", hook())), shuffle=False, drop_last=False)

    def labelled_dataset(self, split: Literal["train", "val"], transform: Callable | None = None) -> Dataset:
        """The split as ``(image_tensor, target)`` pairs with the evaluation transform (probes, kNN)."""
        self.check_root()
        return self.build_dataset(split, transform or eval_transform(self.eval_size))

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool, batch_size: int | None = None) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        # drop_last: every method here normalises over the batch (BN, Sinkhorn, in-batch negatives).
        return self._loader(self.train_set, shuffle=True, drop_last=True)

    def labelled_dataloader(self, split: Literal["train", "val"], batch_size: int | None = None,
                            shuffle: bool = False, transform: Callable | None = None) -> DataLoader:
        return self._loader(self.labelled_dataset(split, transform), shuffle=shuffle, drop_last=False,
                            batch_size=batch_size)

    def bad_sample_count(self) -> int:
        """Samples replaced so far under ``on_bad_sample='skip'`` (this process, main-process loading)."""
        return int(getattr(self.train_set.dataset, "num_skipped", 0)) if self.train_set else 0


class CocoDataModule(PretrainDataModule):
    """COCO 2017 multi-label (``instances_{train,val}2017.json``), or the demo data in COCO format."""

    def __init__(
        self,
        root: str = "data/demo",
        train_images: str = "train2017",
        train_ann: str = "annotations/instances_train2017.json",
        val_images: str = "val2017",
        val_ann: str = "annotations/instances_val2017.json",
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, **kwargs)
        self.splits = {"train": (train_images, train_ann), "val": (val_images, val_ann)}
        self._num_classes: int | None = None

    def build_dataset(self, split, transform):
        from ssl_zoo.data.coco import CocoMultiLabel

        images, ann = self.splits[split]
        ds = CocoMultiLabel(self._path(images), self._path(ann), transform=transform,
                            on_bad_sample=self.on_bad_sample, validate_files=self.validate_files)
        self._num_classes = ds.num_classes
        return ds

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            self.build_dataset("val", None)
        return self._num_classes  # type: ignore[return-value]


class TencentMLDataModule(PretrainDataModule):
    """Tencent ML-Images list files (paths relative to ``root``), or the demo data in that format."""

    def __init__(
        self,
        root: str = "data/demo",
        train_list: str = "tencent/train.txt",
        val_list: str = "tencent/val.txt",
        num_classes: int = 11166,
        min_confidence: float | None = None,
        soft_targets: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, **kwargs)
        self.lists = {"train": train_list, "val": val_list}
        self._num_classes = num_classes
        self.min_confidence = min_confidence
        self.soft_targets = soft_targets

    def build_dataset(self, split, transform):
        from ssl_zoo.data.tencent import TencentML

        return TencentML(self.root, self._path(self.lists[split]), num_classes=self._num_classes,
                         transform=transform, on_bad_sample=self.on_bad_sample,
                         min_confidence=self.min_confidence, soft_targets=self.soft_targets,
                         validate_files=self.validate_files)

    @property
    def num_classes(self) -> int:
        return self._num_classes


class ImageFolderDataModule(PretrainDataModule):
    """ImageNet-1K / ImageNet-100 / any class-per-folder tree with ``train/`` and ``val/`` folders."""

    def __init__(self, root: str = "data/demo/folder", train_dir: str = "train", val_dir: str = "val",
                 **kwargs: Any) -> None:
        super().__init__(root=root, **kwargs)
        self.dirs = {"train": train_dir, "val": val_dir}
        self._num_classes: int | None = None

    def build_dataset(self, split, transform):
        from ssl_zoo.data.folder import ImageFolderDataset

        ds = ImageFolderDataset(self._path(self.dirs[split]), transform=transform,
                                on_bad_sample=self.on_bad_sample)
        self._num_classes = len(ds.classes)
        return ds

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            self.build_dataset("train", None)
        return self._num_classes  # type: ignore[return-value]

    @property
    def multilabel(self) -> bool:
        return False
