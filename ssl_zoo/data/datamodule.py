"""LightningDataModules over the real dataset formats.

The pre-training batch is a dict produced by the method's view transform (the *view transform hook*):
the data module asks the LightningModule for ``train_transform()`` at ``setup`` time, so each method
supplies its own multi-view augmentation while the data module stays method-agnostic. Every sample is
decoded once; the transform makes all of its views from that one image. Items are

    {"views": Tensor[V, 3, S, S], <method-specific keys, e.g. "block_ids", "mask">,
     "target": Tensor[C] | int, "index": int, "num_skipped": int, "bad_files": str}

and torch's default collate stacks them into ``[B, ...]`` (``bad_files`` into a list of ``B`` strings).
``index`` and ``target`` always belong to the image in ``views``; ``num_skipped`` and ``bad_files`` say
which unreadable files were passed over to produce it under ``on_bad_sample="skip"``, so the count leaves
DataLoader worker processes with the data (see :class:`ssl_zoo.utils.bad_samples.BadSampleMonitor`). The training
sampler (:class:`ssl_zoo.data.sampler.ResumableSampler`) shards the data over the processes under DDP, so
``batch_size`` is per process; the order and every sample's views are functions of (seed, epoch, index), and
the sampler's position is checkpointed, so a resumed run sees the data an uninterrupted one would have.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from ssl_zoo.data.bad_sample_policy import check_bad_sample_policy
from ssl_zoo.data.sampler import ResumableSampler, SampleKey, sample_seed, seeded_rng
from ssl_zoo.utils.distributed import rank, world_size
from ssl_zoo.utils.loop_progress import lightning_private_batches_done


def eval_transform(size: int = 224, resize_ratio: float = 0.875) -> Callable:
    """Deterministic evaluation transform: resize the short side to size/0.875, centre-crop, normalise."""
    return T.Compose(
        [
            T.PILToTensor(),
            T.Resize(int(round(size / resize_ratio)), antialias=True),
            T.CenterCrop(size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ]
    )


class ViewDataset(Dataset):
    """Wraps a labelled dataset whose transform returns a dict of views; adds provenance keys.

    Adds ``target`` and ``index`` of the image actually returned (after an ``on_bad_sample="skip"``
    substitution, those of the substitute: labels never shift to another image), ``num_skipped``, the
    number of unreadable files passed over to produce this item, and ``bad_files``, those files as a JSON
    list of ``[path, reason]`` pairs (``""`` when none; a string, because default collate cannot stack
    lists of different lengths).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int | SampleKey) -> dict[str, Any]:
        if isinstance(index, SampleKey):  # from ResumableSampler: the views are a function of (seed, epoch, index)
            with seeded_rng(sample_seed(index.seed, index.epoch, index.index)):
                return self[index.index]
        load_sample = getattr(self.dataset, "load_sample", None)
        if load_sample is not None:
            views, target, used, skipped = load_sample(index)
        else:  # any other (image, target) dataset: no substitution, nothing to report
            (views, target), used, skipped = self.dataset[index], index, ()
        if not isinstance(views, dict) or "views" not in views:
            raise TypeError(
                "a pre-training view transform must return a dict with a 'views' tensor [V, 3, S, S]; "
                f"got {type(views).__name__}"
            )
        return {
            **views,
            "target": target,
            "index": used,
            "num_skipped": len(skipped),
            "bad_files": json.dumps([list(pair) for pair in skipped]) if skipped else "",
        }


class PretrainDataModule(LightningDataModule):
    """Loader settings shared by every dataset format; subclasses only say how to build the datasets.

    Args:
        root: dataset root directory.
        batch_size: images per process and step (each image yields several views).
        num_workers: DataLoader worker processes per process.
        pin_memory: pin host memory (only when a GPU is present).
        persistent_workers: keep workers alive between epochs (when ``num_workers > 0``).
        on_bad_sample: ``raise`` (an unreadable image stops the run naming the file) or ``skip``
            (replaced by the next readable image, with that image's label; the CLI's
            :class:`~ssl_zoo.utils.bad_samples.BadSampleMonitor` logs ``data/skipped_epoch`` and lists the
            files in ``<run_dir>/bad_samples.txt``).
        validate_files: check at setup that every listed image file exists (COCO and Tencent lists; a
            class-per-folder tree is discovered from disk), so a wrong root or a partial download fails in
            seconds, not hours into the run.
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
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0 (0 loads in the main process), got {num_workers}")
        check_bad_sample_policy(on_bad_sample)
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
        self.train_sampler: ResumableSampler | None = None
        self._resume_position: dict[str, int] | None = None  # from a checkpoint, until the loader exists

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
            self.check_batch_size(len(self.train_set))

    def check_batch_size(self, num_images: int) -> None:
        """Reject, before any step, a per-process batch the run cannot use.

        Every process must get one full batch (``drop_last``; the ``DistributedSampler`` gives each of the
        ``W`` processes ``ceil(N / W)`` images), and the method may need a minimum per process, declared by
        its ``min_batch_size()`` hook as ``(minimum, reason)`` (e.g. 2 for heads with BatchNorm).
        """
        world = self.trainer.world_size if self.trainer is not None else 1
        per_process = math.ceil(num_images / world)
        if per_process < self.batch_size:
            spread = f" spread over {world} processes ({per_process} each)" if world > 1 else ""
            raise ValueError(
                f"data.batch_size={self.batch_size} is larger than the {num_images} training images under "
                f"'{self.root}'{spread}: drop_last would leave no batch; set data.init_args.batch_size <= "
                f"{per_process}"
            )
        hook = self._module_hook("min_batch_size")
        if hook is not None:
            minimum, reason = hook()
            if self.batch_size < minimum:
                raise ValueError(
                    f"data.batch_size={self.batch_size} is too small for "
                    f"{type(self.trainer.lightning_module).__name__}: it needs at least {minimum} images per "
                    f"process ({reason}); set data.init_args.batch_size >= {minimum}"
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

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool, batch_size: int | None = None,
                sampler: ResumableSampler | None = None) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and workers > 0,
            # Worker seeds come from this generator, not from the global RNG the model draws from.
            generator=torch.Generator().manual_seed(run_seed()) if sampler is not None else None,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches whose order and views depend only on (seed, epoch, position).

        The :class:`~ssl_zoo.data.sampler.ResumableSampler` shards over the ranks itself (Lightning keeps it
        under DDP) and, in a run resumed from a mid-epoch checkpoint, starts after the batches already done.
        """
        if self.train_set is None:
            self.setup("fit")
        self.train_sampler = ResumableSampler(self.train_set, seed=run_seed(), num_replicas=world_size(),
                                              rank=rank())
        if self._resume_position is not None:
            self._apply_resume_position(self._resume_position)
            self._resume_position = None
        # drop_last: every method here normalises over the batch (BN, Sinkhorn, in-batch negatives).
        return self._loader(self.train_set, shuffle=False, drop_last=True, sampler=self.train_sampler)

    # ----------------------------------------------------------- exact resume (checkpointed sampler position)
    def state_dict(self) -> dict[str, Any]:
        """The training sampler's position, saved in every checkpoint of a fit.

        ``start`` counts this rank's samples of epoch ``epoch`` already trained on: the batches the training
        loop has processed in the current epoch; a finished epoch resumes at the start of the next one.
        """
        trainer, sampler = self.trainer, self.train_sampler
        if trainer is None or sampler is None or trainer.state.fn != "fit":
            return {}
        epoch = trainer.current_epoch
        batches_done = lightning_private_batches_done(trainer)
        if batches_done >= trainer.num_training_batches:
            epoch, batches_done = epoch + 1, 0
        return {"train_sampler": {"epoch": epoch, "start": batches_done * self.batch_size,
                                  "batch_size": self.batch_size, "num_replicas": sampler.num_replicas,
                                  "seed": sampler.seed}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_position = state_dict.get("train_sampler")

    def _apply_resume_position(self, position: dict[str, int]) -> None:
        sampler = self.train_sampler
        changed = [f"{key} {position[key]} -> {now}" for key, now in
                   (("batch_size", self.batch_size), ("num_replicas", sampler.num_replicas), ("seed", sampler.seed))
                   if position.get(key, now) != now]
        if changed:
            warnings.warn(f"resuming with a different {', '.join(changed)} than the checkpoint: the run continues "
                          "but does not see the samples an uninterrupted run would have seen", stacklevel=2)
        sampler.resume(int(position["epoch"]), min(int(position["start"]), sampler.num_samples))

    def labelled_dataloader(self, split: Literal["train", "val"], batch_size: int | None = None,
                            shuffle: bool = False, transform: Callable | None = None) -> DataLoader:
        return self._loader(self.labelled_dataset(split, transform), shuffle=shuffle, drop_last=False,
                            batch_size=batch_size)


def run_seed() -> int:
    """The run's seed (``seed_everything`` exports it as ``PL_GLOBAL_SEED``; 0 when none was set)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))



class CocoDataModule(PretrainDataModule):
    """COCO 2017 multi-label (``instances_{train,val}2017.json``), or the demo data in COCO format.

    ``annotated_only`` keeps only the images with at least one annotation, in both splits (train2017:
    117,266 images, val2017: 4,952), as the BAM+IA-CLoss paper pre-trains and its reference code and ML-GCN /
    ASL evaluate; the default keeps every listed image (background-only ones with an all-zero target).
    """

    def __init__(
        self,
        root: str = "data/demo",
        train_images: str = "train2017",
        train_ann: str = "annotations/instances_train2017.json",
        val_images: str = "val2017",
        val_ann: str = "annotations/instances_val2017.json",
        annotated_only: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, **kwargs)
        self.splits = {"train": (train_images, train_ann), "val": (val_images, val_ann)}
        self.annotated_only = annotated_only
        self._num_classes: int | None = None

    def build_dataset(self, split, transform):
        from ssl_zoo.data.coco import CocoMultiLabel

        images, ann = self.splits[split]
        ds = CocoMultiLabel(self._path(images), self._path(ann), transform=transform,
                            on_bad_sample=self.on_bad_sample, validate_files=self.validate_files,
                            annotated_only=self.annotated_only)
        self._num_classes = ds.num_classes
        return ds

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            self.build_dataset("val", None)
        return self._num_classes  # type: ignore[return-value]


class TencentMLDataModule(PretrainDataModule):
    """Tencent ML-Images list files (paths relative to ``root``), or the demo data in that format.

    The release comes as two lists per split, each with its own images (:mod:`ssl_zoo.data.tencent`): ImageNet
    image ids (``train_image_id_from_imagenet.txt``, relative to a copy of the full ImageNet) and Open Images
    URLs (``train_urls_from_openimages.txt``, relative to the download folder). ``train_lists`` /
    ``val_lists`` read several lists into one dataset, each entry ``{list_file: ..., image_root: ...}``
    (both relative to ``root`` unless absolute; ``image_root`` defaults to ``root`` itself)::

        train_lists:
          - {list_file: train_image_id_from_imagenet.txt, image_root: imagenet}
          - {list_file: train_urls_from_openimages.txt, image_root: openimages/train}

    ``train_list`` / ``val_list`` name one list whose images lie under ``root`` (the demo data, or a single
    list of one's own). Give one form per split; with neither, the demo data's ``tencent/train.txt`` and
    ``tencent/val.txt`` are read.

    Args:
        root: dataset root.
        train_list, val_list: one list file per split (relative to ``root``).
        train_lists, val_lists: several lists per split, each with its own image folder.
        num_classes: label indices (11,166).
        min_confidence, soft_targets: see :class:`~ssl_zoo.data.tencent.TencentML`.
        url_file_name: the file a URL in a list stands for: ``basename`` (the first download script) or
            ``parent_basename`` (``<last directory>_<basename>``, what the release's
            ``download_urls_multithreading.py`` saves).
    """

    DEFAULT_LISTS = {"train": "tencent/train.txt", "val": "tencent/val.txt"}
    LIST_KEYS = ("list_file", "image_root")

    def __init__(
        self,
        root: str = "data/demo",
        train_list: str | None = None,
        val_list: str | None = None,
        train_lists: list[dict[str, str]] | None = None,
        val_lists: list[dict[str, str]] | None = None,
        num_classes: int = 11166,
        min_confidence: float | None = None,
        soft_targets: bool = False,
        url_file_name: Literal["basename", "parent_basename"] = "basename",
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, **kwargs)
        self.lists = {"train": self._list_specs("train", train_list, train_lists),
                      "val": self._list_specs("val", val_list, val_lists)}
        self._num_classes = num_classes
        self.min_confidence = min_confidence
        self.soft_targets = soft_targets
        self.url_file_name = url_file_name

    def _list_specs(self, split: str, single: str | None, several: list[dict[str, str]] | None
                    ) -> str | list[tuple[str, str]]:
        """One list file (a string), or ``[(list_file, image_root), ...]``; errors name the key at fault."""
        if single is not None and several is not None:
            raise ValueError(f"data.{split}_list and data.{split}_lists are both set: give one list file or "
                             "several, not both")
        if several is None:
            return single if single is not None else self.DEFAULT_LISTS[split]
        if not several:
            raise ValueError(f"data.{split}_lists is empty: give at least one {{list_file: ..., image_root: ...}}")
        specs = []
        for i, entry in enumerate(several):
            unknown = sorted(set(entry) - set(self.LIST_KEYS))
            if unknown or not entry.get("list_file"):
                raise ValueError(f"data.{split}_lists[{i}] = {dict(entry)}: each entry needs 'list_file' and may "
                                 f"give 'image_root' (unknown keys: {unknown})")
            specs.append((entry["list_file"], entry.get("image_root") or ""))
        return specs

    def build_dataset(self, split, transform):
        from ssl_zoo.data.tencent import TencentML

        spec = self.lists[split]
        if isinstance(spec, str):
            roots, list_files = self.root, self._path(spec)
        else:  # several lists, each with its own image folder
            roots = [self._path(image_root) if image_root else self.root for _, image_root in spec]
            list_files = [self._path(list_file) for list_file, _ in spec]
        return TencentML(roots, list_files, num_classes=self._num_classes,
                         transform=transform, on_bad_sample=self.on_bad_sample,
                         min_confidence=self.min_confidence, soft_targets=self.soft_targets,
                         validate_files=self.validate_files, url_file_name=self.url_file_name)

    @property
    def num_classes(self) -> int:
        return self._num_classes


class ImageFolderDataModule(PretrainDataModule):
    """ImageNet-1K / ImageNet-100 / any class-per-folder tree with ``train/`` and ``val/`` folders."""

    def __init__(self, root: str = "data/demo/folder", train_dir: str = "train", val_dir: str = "val",
                 train_subset: str | None = None, **kwargs: Any) -> None:
        """``train_subset``: a subset list (SimCLR's ``1percent.txt`` / ``10percent.txt``: one image file name per
        line, relative to ``root`` unless absolute) restricting the training split to the images it names, for
        semi-supervised fine-tuning; the classes stay those of the whole training tree."""
        super().__init__(root=root, **kwargs)
        self.dirs = {"train": train_dir, "val": val_dir}
        self.train_subset = train_subset
        self._num_classes: int | None = None

    def build_dataset(self, split, transform):
        from ssl_zoo.data.folder import ImageFolderDataset

        subset = self._path(self.train_subset) if split == "train" and self.train_subset else None
        ds = ImageFolderDataset(self._path(self.dirs[split]), transform=transform,
                                on_bad_sample=self.on_bad_sample, subset=subset)
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
