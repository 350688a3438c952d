"""LightningDataModules for dense transfer: COCO instances, Pascal VOC, ADE20K (and the demo data in their layouts).

They share the pre-training data modules' machinery (:class:`~ssl_zoo.data.datamodule.PretrainDataModule`):
the resumable training sampler (order and each sample's augmentation are functions of (seed, epoch, index),
and the position is checkpointed), the bad-sample policy and its reporting, the batch-size checks. A batch is

    {"images": list of Tensor[3, H_i, W_i] (detection) | Tensor[B, 3, c, c] (segmentation training),
     "targets": list of dicts (detection) | list of label maps / Tensor[B, c, c] (segmentation training),
     "index": Tensor[B], "num_skipped": Tensor[B], "bad_files": list of B strings}

Detection images keep their own sizes (the model resizes and batches them); segmentation training crops are
stacked; segmentation validation images keep their sizes (batch of 1 by default, as mmseg tests).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ssl_zoo.data.datamodule import PretrainDataModule, run_seed
from ssl_zoo.data.sampler import ResumableSampler, SampleKey, sample_seed, seeded_rng
from ssl_zoo.transfer.data.datasets import ADE20K, CocoInstances, VOCDetection
from ssl_zoo.transfer.data.transforms import (
    DetectionEvalTransform,
    DetectionTrainTransform,
    SegmentationEvalTransform,
    SegmentationTrainTransform,
)
from ssl_zoo.utils.distributed import rank, world_size

__all__ = ["ADE20KDataModule", "CocoInstancesDataModule", "DenseDataModule", "DenseDataset", "VOCDataModule",
           "collate_dense"]


def unpadded_shard_sampler(dataset: Dataset) -> DistributedSampler | None:
    """Each process's share of the validation images, every image exactly once (``None`` in one process).

    Lightning's default validation sampler under DDP is ``DistributedSampler``, which pads the last shard by
    repeating images so that every process gets as many; box / mask AP and mIoU, gathered over the processes,
    would then count those images twice. Shards here differ by at most one image instead, which validation
    allows (it has no per-step collective); Lightning keeps a ``DistributedSampler`` it is given.
    """
    if world_size() < 2:
        return None
    return UnrepeatedDistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=False)


class DenseDataset(Dataset):
    """Wraps a dense dataset (``load_sample`` -> image, annotation, index used, files skipped) into batch items,
    seeding each sample's augmentation from the :class:`~ssl_zoo.data.sampler.SampleKey` it is asked for."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int | SampleKey) -> dict[str, Any]:
        if isinstance(index, SampleKey):
            with seeded_rng(sample_seed(index.seed, index.epoch, index.index)):
                return self[index.index]
        image, target, used, skipped = self.dataset.load_sample(index)
        return {"image": image, "target": target, "index": used, "num_skipped": len(skipped),
                "bad_files": json.dumps([list(pair) for pair in skipped]) if skipped else ""}


def collate_dense(items: list[dict[str, Any]], stack: bool = False) -> dict[str, Any]:
    """Batch items of :class:`DenseDataset`; ``stack`` stacks same-size images and targets (segmentation crops)."""
    images = [item["image"] for item in items]
    targets = [item["target"] for item in items]
    return {
        "images": torch.stack(images) if stack else images,
        "targets": torch.stack(targets) if stack else targets,
        "index": torch.tensor([item["index"] for item in items]),
        "num_skipped": torch.tensor([item["num_skipped"] for item in items]),
        "bad_files": [item["bad_files"] for item in items],
    }


def _collate_stacked(items: list[dict[str, Any]]) -> dict[str, Any]:
    return collate_dense(items, stack=True)


class DenseDataModule(PretrainDataModule):
    """Shared loaders of the dense data modules; subclasses build the datasets with their joint transforms.

    Args:
        root: dataset root.
        batch_size: training images per process and step (the recipes: 2 per GPU x 8 GPUs = 16).
        val_batch_size: validation images per process and step (``None`` = ``batch_size``).
        num_workers, pin_memory, persistent_workers, on_bad_sample, validate_files: as
            :class:`~ssl_zoo.data.datamodule.PretrainDataModule`.
    """

    stack_train: bool = False  # segmentation crops are stacked into one tensor
    evaluation: str = "coco"  # which metric the detection module computes (coco or voc)

    def __init__(self, root: str, batch_size: int = 2, val_batch_size: int | None = None, num_workers: int = 4,
                 pin_memory: bool = True, persistent_workers: bool = True,
                 on_bad_sample: Literal["raise", "skip"] = "raise", validate_files: bool = False) -> None:
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=persistent_workers, on_bad_sample=on_bad_sample,
                         validate_files=validate_files)
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"data.val_batch_size must be >= 1, got {val_batch_size}")
        self.val_batch_size = val_batch_size

    # ----------------------------------------------------------- what subclasses provide
    def build_dataset(self, split: Literal["train", "val"], transform: Callable | None) -> Dataset:
        raise NotImplementedError

    def train_transform_default(self) -> Callable:
        raise NotImplementedError

    def val_transform_default(self) -> Callable:
        raise NotImplementedError

    @property
    def multilabel(self) -> bool:
        return False

    # ----------------------------------------------------------- loaders
    def _checked(self, dataset: Dataset, source: str) -> Dataset:
        if self.validate_files and hasattr(dataset, "check_files"):
            dataset.check_files(source)
        return dataset

    def setup(self, stage: str | None = None) -> None:
        self.check_root()
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = DenseDataset(self.build_dataset("train", self.train_transform_default()))
            self.check_batch_size(len(self.train_set))

    def val_dataloader(self) -> DataLoader:
        self.check_root()
        dataset = DenseDataset(self.build_dataset("val", self.val_transform_default()))
        return self._loader(dataset, shuffle=False, drop_last=False, batch_size=self.val_batch_size or self.batch_size,
                            sampler=unpadded_shard_sampler(dataset))

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool, batch_size: int | None = None,
                sampler: Sampler | None = None) -> DataLoader:
        workers = self.num_workers
        training = isinstance(sampler, ResumableSampler)
        return DataLoader(
            dataset, batch_size=batch_size or self.batch_size, shuffle=shuffle, sampler=sampler, drop_last=drop_last,
            num_workers=workers, pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and workers > 0,
            collate_fn=_collate_stacked if (self.stack_train and training) else collate_dense,
            generator=torch.Generator().manual_seed(run_seed()) if training else None,
        )

    def labelled_dataset(self, split, transform=None):  # pragma: no cover - classification probes only
        raise NotImplementedError(f"{type(self).__name__} serves dense transfer, not classification probes")


class CocoInstancesDataModule(DenseDataModule):
    """COCO instances (boxes, masks from polygons or RLE, crowds ignored) or the demo data in COCO format.

    Args:
        root: the COCO folder (``train2017/``, ``val2017/``, ``annotations/``).
        train_images, val_images: image folders under ``root``.
        train_ann, val_ann: instances JSONs under ``root``.
        with_masks: instance masks (Mask R-CNN); ``False`` for box-only detection.
        flip_prob: horizontal-flip probability in training.
        drop_images_without_annotations: leave training images without a non-crowd annotation out
            (detectron2's default).
    """

    def __init__(self, root: str = "data/demo", train_images: str = "train2017", val_images: str = "val2017",
                 train_ann: str = "annotations/instances_train2017.json",
                 val_ann: str = "annotations/instances_val2017.json", with_masks: bool = True, flip_prob: float = 0.5,
                 drop_images_without_annotations: bool = True, batch_size: int = 2, val_batch_size: int | None = None,
                 num_workers: int = 4, pin_memory: bool = True, persistent_workers: bool = True,
                 on_bad_sample: Literal["raise", "skip"] = "raise", validate_files: bool = False) -> None:
        super().__init__(root, batch_size, val_batch_size, num_workers, pin_memory, persistent_workers, on_bad_sample,
                         validate_files)
        self.train_images, self.val_images = train_images, val_images
        self.train_ann, self.val_ann = train_ann, val_ann
        self.with_masks = with_masks
        self.flip_prob = flip_prob
        self.drop_images_without_annotations = drop_images_without_annotations
        self._num_classes: int | None = None
        self._classes: list[str] | None = None

    def train_transform_default(self) -> Callable:
        return DetectionTrainTransform(self.flip_prob)

    def val_transform_default(self) -> Callable:
        return DetectionEvalTransform()

    def build_dataset(self, split, transform):
        images, ann = (self.train_images, self.train_ann) if split == "train" else (self.val_images, self.val_ann)
        dataset = CocoInstances(self._path(images), self._path(ann), transform, with_masks=self.with_masks,
                                drop_images_without_annotations=self.drop_images_without_annotations and split == "train",
                                on_bad_sample=self.on_bad_sample)
        self._num_classes, self._classes = dataset.num_classes, dataset.classes
        return self._checked(dataset, self._path(ann))

    def _read_categories(self) -> None:
        path = self._path(self.val_ann)
        try:
            with open(path, encoding="utf-8") as f:
                categories = json.load(f)["categories"]
        except (OSError, KeyError, json.JSONDecodeError) as error:
            raise ValueError(f"data.val_ann: cannot read the categories of '{path}' ({error})") from error
        ordered = sorted(categories, key=lambda c: int(c["id"]))
        self._num_classes, self._classes = len(ordered), [c.get("name", str(c["id"])) for c in ordered]

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            self._read_categories()
        return int(self._num_classes)

    @property
    def classes(self) -> list[str]:
        if self._classes is None:
            self._read_categories()
        return list(self._classes)


class VOCDataModule(DenseDataModule):
    """Pascal VOC detection: ``VOCdevkit`` with ``VOC2007`` (and ``VOC2012``), boxes only, VOC evaluation.

    Args:
        root: the ``VOCdevkit`` folder.
        train_splits: ``2007-trainval+2012-trainval`` (MoCo's VOC protocol).
        val_splits: ``2007-test``.
        flip_prob: horizontal-flip probability in training.
    """

    evaluation = "voc"

    def __init__(self, root: str = "data/VOCdevkit", train_splits: str = "2007-trainval+2012-trainval",
                 val_splits: str = "2007-test", flip_prob: float = 0.5, batch_size: int = 2,
                 val_batch_size: int | None = None, num_workers: int = 4, pin_memory: bool = True,
                 persistent_workers: bool = True, on_bad_sample: Literal["raise", "skip"] = "raise",
                 validate_files: bool = False) -> None:
        super().__init__(root, batch_size, val_batch_size, num_workers, pin_memory, persistent_workers, on_bad_sample,
                         validate_files)
        self.train_splits, self.val_splits = train_splits, val_splits
        self.flip_prob = flip_prob
        self.with_masks = False

    def train_transform_default(self) -> Callable:
        return DetectionTrainTransform(self.flip_prob)

    def val_transform_default(self) -> Callable:
        return DetectionEvalTransform()

    def build_dataset(self, split, transform):
        splits = self.train_splits if split == "train" else self.val_splits
        return self._checked(VOCDetection(self.root, splits, transform, on_bad_sample=self.on_bad_sample),
                             f"{self.root} ({splits})")

    @property
    def num_classes(self) -> int:
        from ssl_zoo.transfer.data.datasets import VOC_CLASSES

        return len(VOC_CLASSES)

    @property
    def classes(self) -> list[str]:
        from ssl_zoo.transfer.data.datasets import VOC_CLASSES

        return list(VOC_CLASSES)


class ADE20KDataModule(DenseDataModule):
    """ADE20K (``ADEChallengeData2016``) or the demo data in its layout, with mmseg's ADE20K pipeline.

    Args:
        root: the ``ADEChallengeData2016`` folder.
        num_classes: classes after reduce-zero-label (150).
        reduce_zero_label: 0 ("other") -> ignore 255, k -> k - 1.
        crop_size: training crop side (512).
        scale: the (long, short) scale images are resized to before the ratio (2048, 512).
        ratio_range: training rescale ratios (0.5, 2.0).
        cat_max_ratio: largest share of one class in a training crop (0.75).
        photometric: mmseg's photometric distortion in training.
        flip_prob: horizontal-flip probability in training.
        batch_size: training crops per process (2 per GPU x 8 = 16 in the recipes).
        val_batch_size: validation images per process (1, as mmseg tests).
    """

    stack_train = True

    def __init__(self, root: str = "data/ADEChallengeData2016", num_classes: int = 150,
                 reduce_zero_label: bool = True, crop_size: int = 512, scale: tuple[int, int] = (2048, 512),
                 ratio_range: tuple[float, float] = (0.5, 2.0), cat_max_ratio: float = 0.75, photometric: bool = True,
                 flip_prob: float = 0.5, batch_size: int = 2, val_batch_size: int | None = 1, num_workers: int = 4,
                 pin_memory: bool = True, persistent_workers: bool = True,
                 on_bad_sample: Literal["raise", "skip"] = "raise", validate_files: bool = False) -> None:
        super().__init__(root, batch_size, val_batch_size, num_workers, pin_memory, persistent_workers, on_bad_sample,
                         validate_files)
        if num_classes < 1 or num_classes > 255:
            raise ValueError(f"data.num_classes must lie in 1..255 (label PNGs are 8-bit), got {num_classes}")
        self._num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        self.crop_size = crop_size
        self.scale = tuple(scale)
        self.ratio_range = tuple(ratio_range)
        self.cat_max_ratio = cat_max_ratio
        self.photometric = photometric
        self.flip_prob = flip_prob

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def train_transform_default(self) -> Callable:
        return SegmentationTrainTransform(self.crop_size, self.scale, self.ratio_range, self.cat_max_ratio,
                                          self.flip_prob, self.photometric)

    def val_transform_default(self) -> Callable:
        return SegmentationEvalTransform(self.scale)

    def build_dataset(self, split, transform):
        folder = "training" if split == "train" else "validation"
        return self._checked(ADE20K(self.root, folder, transform, self._num_classes, self.reduce_zero_label,
                                    self.on_bad_sample), f"{self.root}/images/{folder}")
