"""Pre-training from streaming shards (:mod:`ssl_zoo.data.shard`) with litdata's ``StreamingDataset`` and
``StreamingDataLoader``, from a local folder or an object store.

:class:`StreamingDataModule` replaces the file-based data modules for every method and probe: the same view
transform hook (``train_transform()``), the same batch keys, the same labelled splits (``labelled_dataset``).
litdata reads the training set:

* **Order.** ``StreamingDataset(shuffle=True, seed=<run seed>, drop_last=True)``: each epoch permutes the chunks
  with (seed, epoch), gives every process the same number of whole batches (the samples left over sit the epoch
  out) and every DataLoader worker consecutive whole batches of its process's part, and permutes the samples of
  each chunk (``item_shuffle_window=0``: the whole chunk). No two processes or workers read the same sample and a
  worker reads one chunk at a time; the converter stored the samples shuffled, so a chunk is a random sample of
  the dataset.
* **Views.** Every sample's views are a function of (seed, epoch, sample index)
  (:func:`~ssl_zoo.data.sampler.seeded_rng`, as in the file-based path), whatever worker serves it.
* **Exact resume.** The checkpoint holds the epoch and the batches the trainer finished (the data module's
  ``state_dict``, as for the file-based modules); :meth:`StreamingDataLoader.resume` hands litdata's loader the
  state it would have had after those batches, and litdata replays its order from there.
* **Object stores.** ``root`` may be any URL litdata reads (``s3://``, ``gs://``, ``azure://``, ``r2://``,
  ``hf://``): litdata copies the chunks each worker is about to read into ``cache_dir`` and reads the labelled
  splits record by record with ranged reads.

Where the layer differs from litdata's own loader, and why (each shown against the library in
``tests/data/test_streaming.py``): Lightning hands a loader the state it saved only when it builds the loader after
restoring the loops, not when ``configure_optimizers`` asked for ``estimated_stepping_batches`` first (every method
here does), so the data module keeps the position, as the file-based modules do; after ``load_state_dict`` litdata
stays in its resume mode until an epoch is iterated to exhaustion, which Lightning never does when the loader has
a length (the next epoch would repeat the resumed one); and persistent litdata workers count epochs themselves, so
an epoch cut short (``limit_train_batches``) would be served again.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

# See ssl_zoo.data.shard: no PyPI version check from every DataLoader worker. Before litdata is imported.
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

import litdata  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from litdata.streaming.sampler import ChunkedIndex  # noqa: E402
from torch.utils.data import Dataset, get_worker_info  # noqa: E402

from ssl_zoo.data.bad_sample_policy import BadSamplePolicy, transform_encoded  # noqa: E402
from ssl_zoo.data.datamodule import PretrainDataModule, ViewDataset, run_seed  # noqa: E402
from ssl_zoo.data.decode import EncodedImage  # noqa: E402
from ssl_zoo.data.image_list import Sample  # noqa: E402
from ssl_zoo.data.sampler import SampleKey  # noqa: E402
from ssl_zoo.data.shard import META_FILE, SHARD_FORMAT  # noqa: E402
from ssl_zoo.utils.loop_progress import lightning_private_batches_done  # noqa: E402

__all__ = [
    "READ_SETTINGS",
    "ShardDataset",
    "StreamingDataLoader",
    "StreamingDataModule",
    "StreamingViewDataset",
    "litdata_loader_state",
    "record_image",
    "split_meta",
]

INDEX_FILE = "index.json"  # litdata's chunk index
URL_PREFIXES = ("s3://", "gs://", "azure://", "r2://", "hf://", "local:")  # what litdata's downloaders read

#: litdata's reading settings for our records: each chunk permuted whole (litdata's default permutes blocks of 256
#: records, which keeps the same images together every epoch), and each record deserialised alone (its "auto"
#: deserialises windows of up to 256 rows of a bytes field, which made the shards 0.5x as fast as files to read and
#: 0.9x with the decode; benchmarks/RESULTS.md, "Streaming shards read by litdata").
READ_SETTINGS = {"item_shuffle_window": 0, "batch_decode": 0}

# Lightning warns that an IterableDataset's __len__ may be wrong when its workers are not configured
# independently; litdata gives each worker its own whole batches, so the length is exact.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


def _local(location: str) -> str:
    return location[len("file://"):] if location.startswith("file://") else location


def _is_url(location: str) -> bool:
    location = _local(location)
    if location.startswith(URL_PREFIXES):
        return True
    if "://" in location:
        raise ValueError(f"'{location}': litdata reads {', '.join(URL_PREFIXES)} URLs or local folders")
    return False


def split_meta(location: str) -> dict[str, Any]:
    """The split's ``ssl_zoo.json`` (format, classes, counts), checked; for a URL copied with litdata's downloader."""
    location = _local(location).rstrip("/")
    hint = ("convert a dataset with `python -m ssl_zoo.data.shard {folder,coco,tencent} ROOT OUT`; a split is "
            "OUT/train or OUT/val")
    if _is_url(location):
        from litdata.streaming.downloader import get_downloader

        with tempfile.TemporaryDirectory() as tmp:
            copy = os.path.join(tmp, META_FILE)
            try:
                get_downloader(location, tmp, []).download_file(f"{location}/{META_FILE}", copy)
                text = Path(copy).read_text(encoding="utf-8")
            except (FileNotFoundError, OSError) as error:
                raise FileNotFoundError(f"'{location}/{META_FILE}' does not exist or cannot be read ({error}): "
                                        f"{hint}") from error
    else:
        missing = [name for name in (META_FILE, INDEX_FILE) if not os.path.isfile(os.path.join(location, name))]
        if missing:
            raise FileNotFoundError(f"'{location}' is not a converted split: {' and '.join(missing)} missing ({hint})")
        text = Path(location, META_FILE).read_text(encoding="utf-8")
    meta = json.loads(text)
    if meta.get("format") != SHARD_FORMAT:
        raise ValueError(f"{location}/{META_FILE}: not an ssl_zoo shard description (format {meta.get('format')!r})")
    return meta


def record_image(record: dict[str, Any], where: str) -> EncodedImage:
    """A shard record's image, with the header the converter stored (shards written before it was stored:
    parsed here)."""
    name = f"{record['path']} ({where})"
    if "width" in record:
        return EncodedImage.with_header(record["image"], name, (record["width"], record["height"]), record["format"])
    return EncodedImage(record["image"], name)


_ALLOCATOR_TUNED = False


def keep_freed_buffers() -> bool:
    """Let glibc serve large allocations from the heap and keep freed memory for reuse (``mallopt``:
    ``M_MMAP_THRESHOLD`` 64 MiB, ``M_TRIM_THRESHOLD`` 256 MiB); once per process, a no-op elsewhere.

    A streaming worker allocates a buffer per record read (an image, often above glibc's 128 KiB mmap threshold)
    and Pillow's decode buffers: by default each is a fresh ``mmap``, faulted in page by page and unmapped when
    freed. With the heap kept, the next record reuses the previous one's pages (``benchmarks/data_pipeline.py``
    runs the file path in the same allocator, so shards and files are compared under the same setting).
    Called in the streaming DataLoader workers only, not in the training process.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
        _ALLOCATOR_TUNED = bool(libc.mallopt(m_mmap_threshold, 64 << 20) and libc.mallopt(m_trim_threshold, 256 << 20))
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): the default allocator stays
        _ALLOCATOR_TUNED = False
    return _ALLOCATOR_TUNED


# ----------------------------------------------------------------------------------------- map-style dataset
class ShardDataset(Dataset):
    """A converted split as a map-style dataset of ``(transform(image), target)``, like the file-based readers.

    Records are read by index through litdata's ``StreamingDataset`` (:attr:`records`). Targets: an ``int`` class
    for a class-per-folder source, a float multi-hot ``Tensor[C]`` for COCO and Tencent (Tencent: labels below
    ``min_confidence`` dropped; with ``soft_targets`` the values are the confidences, as
    :class:`~ssl_zoo.data.TencentML` does). A transform with ``accepts_encoded`` gets an
    :class:`~ssl_zoo.data.decode.EncodedImage` (it decodes once, at the JPEG scale its crops allow); any other the
    decoded RGB image. The converter dropped unreadable images, but ``on_bad_sample`` still applies to the
    shards (e.g. converted with ``--verify header``).

    :attr:`held` ``(index, record)``, set by the training stream to the record litdata just read, is used instead
    of reading that record again.

    Args:
        location: the split folder or URL (``<root>/<split>``).
        cache_dir: where litdata copies a URL's chunks (default: litdata's cache folder).
    """

    def __init__(self, location: str, transform: Callable | None = None,
                 on_bad_sample: Literal["raise", "skip"] = "raise", min_confidence: float | None = None,
                 soft_targets: bool = False, cache_dir: str | None = None) -> None:
        if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence must lie in [0, 1] or be None, got {min_confidence}")
        self.location = _local(location).rstrip("/")
        self.cache_dir = cache_dir
        self.meta = split_meta(self.location)
        self.transform = transform
        self.on_bad_sample = on_bad_sample
        self.bad_sample_policy = BadSamplePolicy(on_bad_sample)
        self.min_confidence = min_confidence
        self.soft_targets = soft_targets
        self.multilabel = bool(self.meta["multilabel"])
        self.num_classes = int(self.meta["num_classes"])
        self.classes: list[str] = list(self.meta.get("classes", []))
        self.held: tuple[int, dict[str, Any]] | None = None
        self._records: tuple[int, litdata.StreamingDataset] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_records": None}  # litdata's reader is opened again in each process

    @property
    def records(self) -> litdata.StreamingDataset:
        """litdata's dataset of the split, indexed by sample (one per process)."""
        if self._records is None or self._records[0] != os.getpid():
            self._records = (os.getpid(), litdata.StreamingDataset(self.location, cache_dir=self.cache_dir,
                                                                   **READ_SETTINGS))
        return self._records[1]

    def __len__(self) -> int:
        return int(self.meta["num_samples"])

    def record(self, index: int) -> dict[str, Any]:
        """Record ``index``: ``image`` (the file's bytes), ``width``, ``height``, ``format``, ``labels``,
        ``confidences``, ``source_index``, ``path``."""
        if self.held is not None and self.held[0] == index:
            return self.held[1]
        return self.records[int(index)]

    def target(self, record: dict[str, Any]) -> int | torch.Tensor:
        labels, confidences = np.asarray(record["labels"]), np.asarray(record["confidences"])
        if not self.multilabel:
            return int(labels[0])
        if self.min_confidence is not None:
            keep = confidences >= self.min_confidence
            labels, confidences = labels[keep], confidences[keep]
        target = torch.zeros(self.num_classes, dtype=torch.float32)  # [C]
        if len(labels):
            values = torch.from_numpy(confidences.astype(np.float32)) if self.soft_targets else torch.ones(len(labels))
            target.scatter_reduce_(0, torch.from_numpy(labels.astype(np.int64)), values, reduce="amax")
        return target

    def encoded(self, index: int) -> EncodedImage:
        return record_image(self.record(index), f"sample {index} of {self.location}")

    def load_sample(self, index: int) -> Sample:
        """Sample ``index`` (or under ``"skip"`` the next readable one) with its target and the files passed over."""
        index = int(index)
        length = len(self)
        if not 0 <= index < length:
            raise IndexError(f"index {index} out of range for {length} samples")
        if getattr(self.transform, "accepts_encoded", False):
            used, image, skipped = self.bad_sample_policy.fetch(
                index, length, lambda i: transform_encoded(self.transform, self.encoded(i)))
        else:
            used, image, skipped = self.bad_sample_policy.fetch(index, length, lambda i: self.encoded(i).decode())
            if self.transform is not None:
                image = self.transform(image)
        return Sample(image, self.target(self.record(used)), used, skipped)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        sample = self.load_sample(index)
        return sample.image, sample.target


# ----------------------------------------------------------------------------------------- the training stream
class StreamingViewDataset(litdata.StreamingDataset):
    """litdata's ``StreamingDataset`` over the training split whose items are the view dicts
    :class:`~ssl_zoo.data.datamodule.ViewDataset` makes, the views of sample ``i`` in epoch ``e`` drawn under
    ``sample_seed(seed, e, i)`` (``e`` counted from 0 as the trainer counts; litdata counts from 1).

    Args:
        views: ``ViewDataset`` over a :class:`ShardDataset` with the method's view transform.
        seed: run seed: litdata's order and the views.
        shuffle: permute chunks and samples every epoch (False: stored order, e.g. for debugging).
        **kwargs: litdata's ``StreamingDataset`` settings (``max_pre_download``, ``max_cache_size``).
    """

    def __init__(self, views: ViewDataset, seed: int, shuffle: bool = True, **kwargs: Any) -> None:
        if not isinstance(views.dataset, ShardDataset):
            raise TypeError("StreamingViewDataset reads a ViewDataset over a ShardDataset")
        shards: ShardDataset = views.dataset
        super().__init__(shards.location, cache_dir=shards.cache_dir, shuffle=shuffle, seed=int(seed), drop_last=True,
                         **READ_SETTINGS, **kwargs)
        self.views = views

    def __iter__(self) -> StreamingViewDataset:
        if get_worker_info() is not None:
            keep_freed_buffers()
        return super().__iter__()

    def __getitem__(self, index: Any) -> Any:
        record = super().__getitem__(index)
        if not isinstance(index, ChunkedIndex):  # random access by index: the record itself
            return record
        shards: ShardDataset = self.views.dataset
        shards.held = (index.index, record)
        try:
            return self.views[SampleKey(index.index, self.seed, self.current_epoch - 1)]
        finally:
            shards.held = None


def litdata_loader_state(loader: litdata.StreamingDataLoader, epoch: int, batches_done: int) -> dict[str, Any]:
    """What ``loader.state_dict()`` of litdata's fresh loader returns once it has handed out ``batches_done``
    batches of ``epoch`` (litdata's count, from 1): litdata's own format, built here from the trainer's count
    (``tests/data/test_streaming.py`` checks it against litdata's, so a change of that format fails there)."""
    samples = batches_done * loader.batch_size
    loader.dataset.set_epoch(epoch)
    return {"dataset": loader.dataset.state_dict(samples, loader.num_workers, loader.batch_size),
            "current_epoch": epoch, "num_samples_yielded": samples,
            "latest_worker_idx": (batches_done - 1) % max(loader.num_workers, 1)}


class StreamingDataLoader(litdata.StreamingDataLoader):
    """litdata's ``StreamingDataLoader`` that can start part-way through an epoch from the trainer's count of
    batches (:meth:`resume`), starts a fresh epoch on every new iteration after a resumed one, and starts its
    workers every epoch (see the module docstring)."""

    def __init__(self, dataset: StreamingViewDataset, **kwargs: Any) -> None:
        # Non-persistent workers: the epoch and resume state reach them from this process at every epoch's start.
        super().__init__(dataset, **{**kwargs, "persistent_workers": False})
        self._resume_pending = False

    def resume(self, epoch: int, batches_done: int) -> None:
        """Start ``epoch`` (the trainer's, from 0) after its first ``batches_done`` batches."""
        if not 0 <= batches_done <= len(self):
            raise ValueError(f"batches_done must lie in [0, {len(self)}], got {batches_done}")
        self.current_epoch = epoch  # litdata's next iteration counts it up to epoch + 1, its count
        if batches_done:
            super().load_state_dict(litdata_loader_state(self, epoch + 1, batches_done))
        self._resume_pending = True

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        """Ignored: the data module places the loader (:meth:`resume`). Lightning hands back the state it saved only
        in some runs (see the module docstring), and litdata's loader, loaded twice, moves its worker cycle twice."""

    def __iter__(self) -> Any:
        if not self._resume_pending:
            self.restore = False  # the resumed epoch is over, exhausted or not
        self._resume_pending = False
        yield from super().__iter__()


# ----------------------------------------------------------------------------------------- the data module
class StreamingDataModule(PretrainDataModule):
    """Pre-training and probes from shards written by ``python -m ssl_zoo.data.shard`` (local folder or URL).

    Accepted wherever ``CocoDataModule``, ``TencentMLDataModule`` or ``ImageFolderDataModule`` is: same view
    transform hook, batch keys, labelled splits, ``num_classes`` and ``multilabel`` (from the shards'
    ``ssl_zoo.json``), and exact mid-epoch resume.

    Args:
        root: the converter's output folder or URL, holding ``<train_split>/`` and ``<val_split>/``.
        train_split, val_split: split folder names.
        shuffle: permute chunks and samples every epoch.
        cache_dir: where litdata copies the chunks of a URL (default: litdata's cache folder); node-local disk.
        prefetch_chunks: chunks of a URL each worker copies ahead of the one it reads (litdata's
            ``max_pre_download``).
        max_cache_size: disk litdata's cache of a URL may use (``"100GB"``; default: litdata's, 75 % of the free
            disk); when the dataset fits, the chunks stay there between epochs.
        prefetch_factor: batches each DataLoader worker prepares ahead (torch's ``prefetch_factor``).
        min_confidence, soft_targets: Tencent labels, as in :class:`~ssl_zoo.data.TencentMLDataModule`.
        **kwargs: :class:`~ssl_zoo.data.datamodule.PretrainDataModule`'s loader settings (``batch_size``,
            ``num_workers``, ``pin_memory``, ``persistent_workers`` (evaluation loaders only: the training
            workers start every epoch), ``on_bad_sample``, ``eval_size``, ``train_transform``).
    """

    def __init__(
        self,
        root: str = "data/demo-shards/folder",
        train_split: str = "train",
        val_split: str = "val",
        shuffle: bool = True,
        cache_dir: str | None = None,
        prefetch_chunks: int = 2,
        max_cache_size: str | None = None,
        prefetch_factor: int = 4,
        min_confidence: float | None = None,
        soft_targets: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, **kwargs)
        if prefetch_chunks < 1:
            raise ValueError(f"data.prefetch_chunks must be >= 1, got {prefetch_chunks}")
        if prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor must be >= 1, got {prefetch_factor}")
        self.splits = {"train": train_split, "val": val_split}
        self.shuffle = shuffle
        self.cache_dir = cache_dir
        self.prefetch_chunks = prefetch_chunks
        self.max_cache_size = max_cache_size
        self.prefetch_factor = prefetch_factor
        self.min_confidence = min_confidence
        self.soft_targets = soft_targets
        self._metas: dict[str, dict[str, Any]] = {}
        self.train_loader: StreamingDataLoader | None = None

    def _location(self, split: str) -> str:
        return f"{_local(self.root).rstrip('/')}/{self.splits[split]}"

    def meta(self, split: Literal["train", "val"]) -> dict[str, Any]:
        if split not in self._metas:
            try:
                self._metas[split] = split_meta(self._location(split))
            except (FileNotFoundError, ValueError) as error:
                raise type(error)(f"data.root: {error}") from error
        return self._metas[split]

    def check_root(self) -> None:
        try:
            remote = _is_url(self.root)
        except ValueError as error:
            raise ValueError(f"data.root: {error}") from error
        if not remote and not os.path.isdir(_local(self.root)):
            hint = " (`make demo-shards` converts the demo dataset)" if "demo" in self.root else ""
            raise FileNotFoundError(f"data.root: shard folder '{self.root}' does not exist{hint}")

    def build_dataset(self, split, transform) -> ShardDataset:
        self.meta(split)  # errors name data.root
        return ShardDataset(self._location(split), transform, on_bad_sample=self.on_bad_sample,
                            min_confidence=self.min_confidence, soft_targets=self.soft_targets,
                            cache_dir=self.cache_dir)

    @property
    def num_classes(self) -> int:
        return int(self.meta("train")["num_classes"])

    @property
    def multilabel(self) -> bool:
        return bool(self.meta("train")["multilabel"])

    def check_batch_size(self, num_images: int) -> None:
        super().check_batch_size(num_images)
        world = self.trainer.world_size if self.trainer is not None else 1
        if num_images // world < self.batch_size:
            raise ValueError(f"data.batch_size={self.batch_size} is larger than the {num_images // world} training "
                             f"images each of {world} processes gets from '{self.root}': set "
                             f"data.init_args.batch_size <= {num_images // world}")

    def train_dataloader(self) -> StreamingDataLoader:
        """litdata's stream of this process (see the module docstring), resumed after the batches a checkpoint
        already holds."""
        if self.train_set is None:
            self.setup("fit")
        stream = StreamingViewDataset(self.train_set, seed=run_seed(), shuffle=self.shuffle,
                                      max_pre_download=self.prefetch_chunks, max_cache_size=self.max_cache_size)
        workers = self.num_workers
        loader = StreamingDataLoader(
            stream,
            batch_size=self.batch_size,
            drop_last=True,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
        )
        self.train_loader = loader
        if self.trainer is not None:
            loader.resume(self.trainer.current_epoch, 0)
        if self._resume_position is not None:
            self._apply_resume_position(self._resume_position)
            self._resume_position = None
        return loader

    def state_dict(self) -> dict[str, Any]:
        """The stream's position, saved in every checkpoint of a fit (see ``PretrainDataModule.state_dict``)."""
        trainer, loader = self.trainer, self.train_loader
        if trainer is None or loader is None or trainer.state.fn != "fit":
            return {}
        epoch = trainer.current_epoch
        batches_done = lightning_private_batches_done(trainer)
        if batches_done >= trainer.num_training_batches:
            epoch, batches_done = epoch + 1, 0
        return {"train_stream": {"epoch": epoch, "batches": batches_done, **self._order_settings(loader)}}

    @staticmethod
    def _order_settings(loader: StreamingDataLoader) -> dict[str, Any]:
        stream: StreamingViewDataset = loader.dataset
        return {"batch_size": loader.batch_size, "num_replicas": stream.distributed_env.world_size,
                "num_workers": loader.num_workers, "seed": stream.seed, "shuffle": stream.shuffle,
                "num_samples": len(stream.views)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_position = state_dict.get("train_stream")

    def _apply_resume_position(self, position: dict[str, Any]) -> None:
        loader = self.train_loader
        now = self._order_settings(loader)
        changed = [f"{key} {position[key]} -> {value}" for key, value in now.items()
                   if key in position and position[key] != value]
        if changed:
            warnings.warn(f"resuming with a different {', '.join(changed)} than the checkpoint: the run continues "
                          "but does not see the samples an uninterrupted run would have seen", stacklevel=2)
        loader.resume(int(position["epoch"]), min(int(position["batches"]), len(loader)))

