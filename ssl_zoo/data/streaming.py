"""Pre-training from streaming shards (:mod:`ssl_zoo.data.shard`), from a local folder or an object store.

:class:`StreamingDataModule` replaces the file-based data modules for every method and probe: the same view
transform hook (``train_transform()``), the same batch keys, the same labelled splits (``labelled_dataset``).
What changes is how the training set is read:

* **Order.** Each epoch permutes the chunks with ``(seed, epoch)``; the permuted sequence of samples is cut
  into ``world_size`` equal consecutive parts (the ``N mod world_size`` samples at its end sit the epoch
  out: every rank needs the same number of steps); each rank's part is cut into consecutive pieces of whole
  batches, one per DataLoader worker, and each worker shuffles its piece ``shuffle_window`` chunks at a time.
  A worker therefore reads a few chunks, sequentially, and no two ranks or workers read the same sample.
  The shards were written in a shuffled order (``python -m ssl_zoo.data.shard``), so a chunk is a random
  sample of the dataset and shuffling chunk by chunk mixes classes within every batch.
* **Batches.** The DataLoader takes batches from its workers in turn, so batch ``k`` of a rank's epoch is
  batch ``k // W`` of worker ``k % W``: the order is a function of (seed, epoch, rank, world size, workers,
  batch size, window), and every sample's views of ``(seed, epoch, sample index)``
  (:func:`~ssl_zoo.data.sampler.seeded_rng`, as in the file-based path).
* **Exact resume.** The checkpoint holds the epoch and the batches done (the data module's ``state_dict``);
  a resumed run's worker ``w`` continues the piece of worker ``(w + done) % W`` after its batches already
  trained on, so the first batch after the restart is the one the uninterrupted run trained on next.
  Resuming with another worker count, batch size, world size or window changes the order (a warning says so).
* **Object stores.** With ``root`` a URL (``s3://...``, ``gs://...``, any fsspec protocol whose package is
  installed), each process copies the chunks it is about to read into ``cache_dir`` (``prefetch_chunks`` ahead,
  in a background thread) and deletes them when it is done; the labelled splits keep the chunks they read.

The chunks are read with litdata's own record decoding (``StreamingDataset`` on the local copy); a worker reads
each record of its window with one ``read()`` from the chunk file when the record's turn comes
(:class:`ChunkRecords`; litdata's random access across chunks, and copying images out of its memory map, are
slow, and holding a window's records made their decode slower). Lightning calls ``set_epoch`` only on a
DataLoader's sampler, which an iterable dataset may not have, so :class:`StreamingDataLoader` exposes one that
forwards the epoch to the dataset through shared memory (DataLoader workers are forked once and kept between
epochs).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal, NamedTuple

# See ssl_zoo.data.shard: no PyPI version check from every DataLoader worker. Before litdata is imported.
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info  # noqa: E402

from ssl_zoo.data.datamodule import PretrainDataModule, ViewDataset, run_seed  # noqa: E402
from ssl_zoo.data.io import BadSamplePolicy, EncodedImage, Sample, transform_encoded  # noqa: E402
from ssl_zoo.data.sampler import SampleKey  # noqa: E402
from ssl_zoo.data.shard import META_FILE, SHARD_FORMAT  # noqa: E402
from ssl_zoo.utils.distributed import rank, world_size  # noqa: E402

__all__ = [
    "Segment",
    "ShardDataset",
    "ShardSplit",
    "StreamingDataLoader",
    "StreamingDataModule",
    "StreamingViewDataset",
    "rank_segments",
    "worker_pieces",
    "window_order",
]

INDEX_FILE = "index.json"  # litdata's chunk index

# Lightning warns that an IterableDataset's __len__ may be wrong when its workers are not configured
# independently; here each worker serves its own piece of whole batches, so the length is exact.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


def _is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def _local(location: str) -> str:
    return location[len("file://"):] if location.startswith("file://") else location


# ----------------------------------------------------------------------------------------- one split's chunks
class ShardSplit:
    """One converted split (``<root>/<split>``): its description, chunk table and records.

    Local folders are read in place. For a URL the index and the description are copied into
    ``<cache_dir>/<hash of the URL>/`` at construction and each chunk when it is first needed
    (:meth:`fetch`); downloads go to a temporary name and are renamed, so processes sharing the cache never
    read a partial file.

    Args:
        location: the split folder or URL.
        cache_dir: local folder for the chunks of a URL (default ``~/.cache/ssl_zoo/shards``).
    """

    def __init__(self, location: str, cache_dir: str | None = None) -> None:
        self.location = location.rstrip("/")
        self.remote = _is_url(self.location)
        if self.remote:
            import fsspec

            self._fs, self._remote_root = fsspec.core.url_to_fs(self.location)
            cache_root = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "ssl_zoo", "shards")
            self.local_dir = os.path.join(cache_root, hashlib.sha1(self.location.encode()).hexdigest()[:16])
            os.makedirs(self.local_dir, exist_ok=True)
            for name in (META_FILE, INDEX_FILE):
                self._download(name)
        else:
            self.local_dir = _local(self.location)
        missing = [name for name in (META_FILE, INDEX_FILE) if not os.path.isfile(os.path.join(self.local_dir, name))]
        if missing:
            raise FileNotFoundError(
                f"'{self.location}' is not a converted split: {' and '.join(missing)} missing (convert a dataset "
                "with `python -m ssl_zoo.data.shard {folder,coco,tencent} ROOT OUT`; a split is OUT/train or OUT/val)")
        with open(os.path.join(self.local_dir, META_FILE), encoding="utf-8") as f:
            self.meta: dict[str, Any] = json.load(f)
        if self.meta.get("format") != SHARD_FORMAT:
            raise ValueError(f"{self.location}/{META_FILE}: not an ssl_zoo shard description "
                             f"(format {self.meta.get('format')!r})")
        with open(os.path.join(self.local_dir, INDEX_FILE), encoding="utf-8") as f:
            chunks = json.load(f)["chunks"]
        self.chunk_files = [c["filename"] for c in chunks]
        self.chunk_sizes = np.asarray([c["chunk_size"] for c in chunks], dtype=np.int64)  # [C]
        self.chunk_starts = np.concatenate([[0], np.cumsum(self.chunk_sizes)])  # [C+1], global index of each chunk
        if int(self.chunk_starts[-1]) != int(self.meta["num_samples"]):
            raise ValueError(f"{self.location}: {INDEX_FILE} lists {int(self.chunk_starts[-1])} samples but "
                             f"{META_FILE} says {self.meta['num_samples']} (an interrupted conversion?)")
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._reader = None
        self._loader = None  # litdata's item decoder for the one-read path (False: chunks not plain)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # Readers, threads and locks are per process (DataLoader workers); rebuilt on first use.
        state = dict(self.__dict__)
        for key in ("_reader", "_loader", "_pool", "_pending", "_lock"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_process_state()

    def _check_process(self) -> None:
        if self._pid != os.getpid():  # forked into a DataLoader worker: no reader, pool or lock of the parent
            self._reset_process_state()

    def __len__(self) -> int:
        return int(self.chunk_starts[-1])

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_files)

    def chunk_of(self, index: int) -> int:
        return int(np.searchsorted(self.chunk_starts, index, side="right")) - 1

    # ---------------------------------------------------------------- chunk files
    def _download(self, name: str) -> None:
        target = os.path.join(self.local_dir, name)
        tmp = f"{target}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            self._fs.get_file(f"{self._remote_root.rstrip('/')}/{name}", tmp)
            os.replace(tmp, target)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"'{self.location}/{name}' does not exist") from error
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def _chunk_path(self, chunk: int) -> str:
        return os.path.join(self.local_dir, self.chunk_files[chunk])

    def fetch(self, chunks: Sequence[int]) -> None:
        """Start copying ``chunks`` of a URL into the cache in the background (no-op for local folders)."""
        if not self.remote:
            return
        self._check_process()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ssl_zoo-shard-fetch")
            for chunk in chunks:
                if chunk not in self._pending and not os.path.isfile(self._chunk_path(chunk)):
                    self._pending[chunk] = self._pool.submit(self._download, self.chunk_files[chunk])

    def _ensure(self, chunk: int) -> None:
        if not self.remote:
            return
        self._check_process()
        with self._lock:
            pending = self._pending.pop(chunk, None)
        if pending is not None:
            pending.result()  # raises the download's error, if any
        if not os.path.isfile(self._chunk_path(chunk)):
            self._download(self.chunk_files[chunk])

    def release(self, chunk: int) -> None:
        """Delete a URL's chunk from the cache (another process that still needs it copies it again)."""
        if self.remote:
            try:
                os.remove(self._chunk_path(chunk))
            except FileNotFoundError:
                pass

    # ---------------------------------------------------------------- records
    def _dataset(self):
        self._check_process()
        if self._reader is None:
            from litdata import StreamingDataset

            self._reader = StreamingDataset(self.local_dir)
        return self._reader

    def read(self, index: int) -> dict[str, Any]:
        """Record ``index``: ``image`` (bytes), ``labels``, ``confidences``, ``source_index``, ``path``."""
        self._ensure(self.chunk_of(index))
        return _owned(self._dataset()[index])

    def read_range(self, start: int, stop: int) -> list[dict[str, Any]]:
        """Records ``start..stop-1``, which must lie in one chunk, read in order."""
        with self.open_range(start, stop) as records:
            return [records[i] for i in range(start, stop)]

    def open_range(self, start: int, stop: int) -> ChunkRecords:
        """Records ``start..stop-1`` (inside one chunk) as a :class:`ChunkRecords` that reads each when asked."""
        chunk = self.chunk_of(start)
        if not 0 <= start < stop <= self.chunk_starts[chunk + 1]:
            raise IndexError(f"records {start}..{stop - 1} are not inside one chunk of {self.location}")
        self._ensure(chunk)
        dataset = self._dataset()
        if self._loader is None:
            self._loader = self._plain_loader(dataset, start) or False
        return ChunkRecords(self, chunk, start, stop, self._loader or None)

    @staticmethod
    def _plain_loader(dataset, index: int):
        """litdata's item decoder when the chunks are plain (uncompressed, unencrypted PyTree items), else None."""
        dataset[index]  # loads the index and sets the decoder up
        reader = getattr(getattr(dataset, "cache", None), "_reader", None)
        config = getattr(getattr(reader, "_config", None), "_config", None) or {}
        loader = getattr(reader, "_item_loader", None)
        plain = (config.get("item_loader") == "PyTreeLoader" and not config.get("compression")
                 and not config.get("encryption") and callable(getattr(loader, "deserialize", None)))
        return loader if plain else None


class ChunkRecords:
    """Records ``start..stop-1`` of one chunk of a :class:`ShardSplit`, each read from the chunk file when asked.

    Uncompressed chunks (litdata's ``PyTreeLoader`` without compression or encryption): the range's offset table
    is read once, then ``records[i]`` is one seek and one ``read()`` of record ``i``'s bytes, decoded by litdata's
    own item loader; its image is a ``memoryview`` into that read (one copy per image, as from a file). Nothing
    is held between requests but the last record (a sample's image and target read it twice), so serving a
    shuffled window costs what reading its files one by one costs. Holding a whole window of records instead
    (tens of MB) made decoding them ~10 % slower than decoding files read one at a time
    (``benchmarks/data_pipeline.py``). Other chunks: the range is read through litdata up front and held.
    A context manager; :meth:`close` closes the chunk file.
    """

    def __init__(self, split: ShardSplit, chunk: int, start: int, stop: int, loader: Any | None) -> None:
        self.split, self.chunk, self.start, self.stop = split, chunk, int(start), int(stop)
        self._loader = loader
        self._last: tuple[int, dict[str, Any]] | None = None
        self._file = None
        self._held: list[dict[str, Any]] | None = None
        if loader is None:
            # bytes(): litdata hands out views of its memory map, which it unmaps when it moves to another chunk.
            dataset = split._dataset()
            self._held = [_owned(dataset[i]) for i in range(self.start, self.stop)]
            return
        self._file = open(split._chunk_path(chunk), "rb")
        # layout: uint32 num_items, uint32[num_items + 1] absolute offsets of the items, the items
        first = self.start - int(split.chunk_starts[chunk])
        self._file.seek(4 * (1 + first))
        self._offsets = np.frombuffer(self._file.read(4 * (self.stop - self.start + 1)), dtype="<u4").astype(np.int64)

    def __contains__(self, index: int) -> bool:
        return self.start <= index < self.stop

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not self.start <= index < self.stop:
            raise IndexError(f"record {index} is not in {self.start}..{self.stop - 1} of {self.split.location}")
        if self._held is not None:
            return self._held[index - self.start]
        if self._last is not None and self._last[0] == index:
            return self._last[1]
        if self._file is None:
            raise ValueError(f"records {self.start}..{self.stop - 1} of {self.split.location} are closed")
        k = index - self.start
        self._file.seek(int(self._offsets[k]))
        record = self._loader.deserialize(memoryview(self._file.read(int(self._offsets[k + 1] - self._offsets[k]))))
        self._last = (index, record)
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._last = None

    def __enter__(self) -> ChunkRecords:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WindowRecords:
    """The records of the segments a streaming worker is serving (index -> record), read when asked."""

    def __init__(self, parts: Sequence[ChunkRecords]) -> None:
        self.parts = list(parts)

    def _part(self, index: int) -> ChunkRecords | None:
        return next((part for part in self.parts if index in part), None)

    def __contains__(self, index: int) -> bool:
        return self._part(index) is not None

    def __getitem__(self, index: int) -> dict[str, Any]:
        part = self._part(index)
        if part is None:
            raise KeyError(index)
        return part[index]

    def close(self) -> None:
        for part in self.parts:
            part.close()


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


def record_image(record: dict[str, Any], where: str) -> EncodedImage:
    """A shard record's image, with the header the converter stored (shards written before it was stored:
    parsed here)."""
    name = f"{record['path']} ({where})"
    if "width" in record:
        return EncodedImage.with_header(record["image"], name, (record["width"], record["height"]), record["format"])
    return EncodedImage(record["image"], name)


def _owned(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "image": bytes(record["image"])}


# ----------------------------------------------------------------------------------------- map-style dataset
class ShardDataset(Dataset):
    """A converted split as a map-style dataset of ``(transform(image), target)``, like the file-based readers.

    Targets: an ``int`` class for a class-per-folder source, a float multi-hot ``Tensor[C]`` for COCO and
    Tencent (Tencent: labels below ``min_confidence`` dropped; with ``soft_targets`` the values are the
    confidences, as :class:`~ssl_zoo.data.TencentML` does). A transform with ``accepts_encoded`` gets an
    :class:`~ssl_zoo.data.io.EncodedImage` (it decodes once, at the JPEG scale its crops allow); any other the
    decoded RGB image. The converter dropped unreadable images, but ``on_bad_sample`` still applies to the
    shards (e.g. converted with ``--verify header``).

    :attr:`buffer` (index -> record), set by the streaming reader to the records of the window it is serving
    (read when asked), is consulted before reading the split.
    """

    def __init__(self, split: ShardSplit, transform: Callable | None = None,
                 on_bad_sample: Literal["raise", "skip"] = "raise", min_confidence: float | None = None,
                 soft_targets: bool = False) -> None:
        if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence must lie in [0, 1] or be None, got {min_confidence}")
        self.split = split
        self.transform = transform
        self.on_bad_sample = on_bad_sample
        self.bad_sample_policy = BadSamplePolicy(on_bad_sample)
        self.min_confidence = min_confidence
        self.soft_targets = soft_targets
        self.multilabel = bool(split.meta["multilabel"])
        self.num_classes = int(split.meta["num_classes"])
        self.classes: list[str] = list(split.meta.get("classes", []))
        self.buffer: WindowRecords | None = None

    def __len__(self) -> int:
        return len(self.split)

    def record(self, index: int) -> dict[str, Any]:
        if self.buffer is not None and index in self.buffer:
            return self.buffer[index]
        return self.split.read(index)

    def target(self, record: dict[str, Any]) -> int | torch.Tensor:
        labels, confidences = record["labels"], record["confidences"]
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
        return record_image(self.record(index), f"sample {index} of {self.split.location}")

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


# ----------------------------------------------------------------------------------------- the epoch's order
class Segment(NamedTuple):
    """Samples ``start..stop-1`` (global indices) of chunk ``chunk``."""

    chunk: int
    start: int
    stop: int


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(w) & 0xFFFFFFFFFFFFFFFF for w in words]))


def rank_segments(chunk_sizes: Sequence[int], seed: int, epoch: int, rank: int, world_size: int,
                  shuffle: bool = True) -> list[Segment]:
    """This rank's part of the epoch: the chunks permuted with ``(seed, epoch)``, their samples laid end to end
    and cut into ``world_size`` equal consecutive parts of ``N // world_size`` samples (the rest sit this
    epoch out). Returns the part as chunk segments, in order."""
    sizes = np.asarray(chunk_sizes, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    order = _rng(seed, epoch).permutation(len(sizes)) if shuffle else np.arange(len(sizes))
    per_rank = int(starts[-1]) // world_size
    low, high = rank * per_rank, (rank + 1) * per_rank
    segments, position = [], 0
    for chunk in order:
        size = int(sizes[chunk])
        a, b = max(low, position), min(high, position + size)
        if a < b:
            segments.append(Segment(int(chunk), int(starts[chunk]) + a - position, int(starts[chunk]) + b - position))
        position += size
        if position >= high:
            break
    return segments


def _cut(segments: Sequence[Segment], counts: Sequence[int]) -> list[list[Segment]]:
    """Consecutive pieces of ``counts[i]`` samples each (what is left over is dropped)."""
    pieces: list[list[Segment]] = []
    stream = iter(segments)
    current: Segment | None = None
    for count in counts:
        piece: list[Segment] = []
        while count > 0:
            if current is None:
                current = next(stream)
            take = min(count, current.stop - current.start)
            piece.append(Segment(current.chunk, current.start, current.start + take))
            count -= take
            current = Segment(current.chunk, current.start + take, current.stop) if current.start + take < \
                current.stop else None
        pieces.append(piece)
    return pieces


def worker_pieces(segments: Sequence[Segment], batch_size: int, num_workers: int) -> list[list[Segment]]:
    """A rank's part cut into ``num_workers`` consecutive pieces of whole batches.

    The rank has ``B = n // batch_size`` batches; the DataLoader takes batch ``k`` from worker ``k % W``, so
    worker ``w`` owns ``B // W`` batches, plus one when ``w < B % W`` (the leftover samples are dropped, as
    ``drop_last`` drops a partial batch).
    """
    total = sum(s.stop - s.start for s in segments)
    batches = total // batch_size
    counts = [(batches // num_workers + (w < batches % num_workers)) * batch_size for w in range(num_workers)]
    return _cut(segments, counts)


def window_order(piece: Sequence[Segment], window: int, rng: np.random.Generator | None
                 ) -> list[tuple[list[Segment], np.ndarray]]:
    """A worker's piece as windows of ``window`` consecutive segments, each with its samples in the order they
    are served (permuted by ``rng``; in segment order when ``rng`` is None)."""
    windows = []
    for first in range(0, len(piece), window):
        group = list(piece[first:first + window])
        indices = np.concatenate([np.arange(s.start, s.stop) for s in group])
        windows.append((group, indices if rng is None else rng.permutation(indices)))
    return windows


# ----------------------------------------------------------------------------------------- the training stream
class StreamingViewDataset(IterableDataset):
    """The training stream of one rank: view dicts (as :class:`~ssl_zoo.data.datamodule.ViewDataset` makes them)
    in the epoch order described in the module docstring.

    Args:
        views: ``ViewDataset`` over a :class:`ShardDataset` with the method's view transform.
        seed: run seed.
        rank, world_size: this process and the number of processes.
        batch_size: per-process batch size (the DataLoader's).
        num_workers: the DataLoader's workers (0: the main process serves as the one worker).
        shuffle: permute chunks and samples every epoch (False: stored order, e.g. for debugging).
        shuffle_window: chunks whose samples are mixed together within a worker.
        prefetch_chunks: chunks of a URL copied ahead of the one being read.
    """

    def __init__(self, views: ViewDataset, seed: int, rank: int, world_size: int, batch_size: int,
                 num_workers: int, shuffle: bool = True, shuffle_window: int = 2, prefetch_chunks: int = 2) -> None:
        if shuffle_window < 1:
            raise ValueError(f"shuffle_window must be >= 1 (chunks), got {shuffle_window}")
        if not isinstance(views.dataset, ShardDataset):
            raise TypeError("StreamingViewDataset reads a ViewDataset over a ShardDataset")
        self.views = views
        self.shards: ShardDataset = views.dataset
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.batch_size = int(batch_size)
        self.num_roles = max(1, int(num_workers))
        self.shuffle = shuffle
        self.shuffle_window = int(shuffle_window)
        self.prefetch_chunks = int(prefetch_chunks)
        # [epoch, epoch of the resume point, batches of that epoch already trained on]: shared memory, so that
        # set_epoch / resume in the main process reach workers forked earlier (persistent workers).
        self.state = torch.tensor([0, -1, 0], dtype=torch.int64).share_memory_()

    @property
    def batches_per_epoch(self) -> int:
        return len(self.shards) // self.world_size // self.batch_size

    def __len__(self) -> int:
        # Whole batches only: len(DataLoader) = batches_per_epoch with drop_last.
        return self.batches_per_epoch * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        if int(self.state[1]) != epoch:
            self.state[1], self.state[2] = -1, 0  # the partly trained epoch is over
        self.state[0] = epoch

    def resume(self, epoch: int, batches_done: int) -> None:
        """Start ``epoch`` after its first ``batches_done`` batches (a run resumed mid-epoch)."""
        if not 0 <= batches_done <= self.batches_per_epoch:
            raise ValueError(f"batches_done must lie in [0, {self.batches_per_epoch}], got {batches_done}")
        self.state[0], self.state[1], self.state[2] = epoch, epoch, batches_done

    def worker_windows(self, epoch: int, role: int) -> list[tuple[list[Segment], np.ndarray]]:
        """The windows worker ``role`` serves in ``epoch`` (a pure function of the settings)."""
        segments = rank_segments(self.shards.split.chunk_sizes, self.seed, epoch, self.rank, self.world_size,
                                 self.shuffle)
        piece = worker_pieces(segments, self.batch_size, self.num_roles)[role]
        rng = _rng(self.seed, epoch, self.rank, role, 1) if self.shuffle else None
        return window_order(piece, self.shuffle_window, rng)

    def epoch_indices(self, epoch: int) -> list[int]:
        """The rank's samples of ``epoch`` in the order the DataLoader yields them (for tests and inspection)."""
        streams = [np.concatenate([ix for _, ix in self.worker_windows(epoch, role)] or [np.zeros(0, np.int64)])
                   for role in range(self.num_roles)]
        out: list[int] = []
        for k in range(self.batches_per_epoch):
            role, j = k % self.num_roles, k // self.num_roles
            out += streams[role][j * self.batch_size:(j + 1) * self.batch_size].tolist()
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            keep_freed_buffers()
        if workers != self.num_roles:
            raise RuntimeError(f"the streaming dataset was planned for {self.num_roles} DataLoader workers but runs "
                               f"in {workers}: build the DataLoader with num_workers={self.num_roles}")
        epoch = int(self.state[0])
        done = int(self.state[2]) if int(self.state[1]) == epoch else 0
        # Worker w of a resumed loader continues the piece of worker (w + done) % W: the loader asks worker 0
        # first, and the next batch of the uninterrupted run is batch `done`, owned by worker done % W.
        role = (worker + done) % workers
        skip = (done - role + workers - 1) // workers * self.batch_size if done > role else 0
        windows = self.worker_windows(epoch, role)
        while windows and skip >= len(windows[0][1]):  # windows trained on before the interruption
            skip -= len(windows.pop(0)[1])
        split = self.shards.split
        upcoming = [s.chunk for group, _ in windows for s in group]  # the chunks in the order they are read
        read = 0
        try:
            for group, indices in windows:
                split.fetch(upcoming[read:read + len(group) + self.prefetch_chunks])  # URL: copy ahead
                window = WindowRecords([split.open_range(s.start, s.stop) for s in group])
                read += len(group)
                self.shards.buffer = window
                try:
                    for index in indices[skip:]:
                        yield self.views[SampleKey(int(index), self.seed, epoch)]
                finally:
                    window.close()
                    self.shards.buffer = None
                for segment in group:
                    split.release(segment.chunk)  # URL: a worker reads each chunk once per epoch
                skip = 0
        finally:
            self.shards.buffer = None


class _EpochHook(Sampler):
    """What a :class:`StreamingDataLoader` shows as its ``sampler``: Lightning's ``set_epoch`` reaches the dataset."""

    def __init__(self, dataset: StreamingViewDataset) -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[None]:
        return itertools.repeat(None)  # an iterable dataset's sampler yields nothing but "the next item"

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


class StreamingDataLoader(DataLoader):
    """A DataLoader over a :class:`StreamingViewDataset` whose ``sampler`` forwards ``set_epoch`` to it."""

    def __init__(self, dataset: StreamingViewDataset, **kwargs: Any) -> None:
        self._epoch_hook = _EpochHook(dataset)
        super().__init__(dataset, **kwargs)

    @property
    def sampler(self) -> _EpochHook:  # type: ignore[override]
        return self._epoch_hook

    @sampler.setter
    def sampler(self, value: Any) -> None:  # DataLoader.__init__ stores its constant sampler here
        self._constant_sampler = value


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
        shuffle_window: chunks mixed together by each worker (memory: about this many chunks per worker).
        cache_dir: where the chunks of a URL are copied (default ``~/.cache/ssl_zoo/shards``); node-local disk.
        prefetch_chunks: chunks of a URL copied ahead of the one being read, per worker.
        prefetch_factor: batches each DataLoader worker prepares ahead (torch's ``prefetch_factor``).
        min_confidence, soft_targets: Tencent labels, as in :class:`~ssl_zoo.data.TencentMLDataModule`.
        **kwargs: :class:`~ssl_zoo.data.datamodule.PretrainDataModule`'s loader settings (``batch_size``,
            ``num_workers``, ``pin_memory``, ``persistent_workers``, ``on_bad_sample``, ``eval_size``,
            ``train_transform``).
    """

    def __init__(
        self,
        root: str = "data/demo-shards/folder",
        train_split: str = "train",
        val_split: str = "val",
        shuffle: bool = True,
        shuffle_window: int = 2,
        cache_dir: str | None = None,
        prefetch_chunks: int = 2,
        prefetch_factor: int = 4,
        min_confidence: float | None = None,
        soft_targets: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, **kwargs)
        if shuffle_window < 1:
            raise ValueError(f"data.shuffle_window must be >= 1 (chunks), got {shuffle_window}")
        if prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor must be >= 1, got {prefetch_factor}")
        self.splits = {"train": train_split, "val": val_split}
        self.shuffle = shuffle
        self.shuffle_window = shuffle_window
        self.cache_dir = cache_dir
        self.prefetch_chunks = prefetch_chunks
        self.prefetch_factor = prefetch_factor
        self.min_confidence = min_confidence
        self.soft_targets = soft_targets
        self._split_readers: dict[str, ShardSplit] = {}
        self.train_stream: StreamingViewDataset | None = None

    def _location(self, split: str) -> str:
        return f"{self.root.rstrip('/')}/{self.splits[split]}"

    def split(self, split: Literal["train", "val"]) -> ShardSplit:
        if split not in self._split_readers:
            try:
                self._split_readers[split] = ShardSplit(self._location(split), self.cache_dir)
            except (FileNotFoundError, ValueError) as error:
                raise type(error)(f"data.root: {error}") from error
        return self._split_readers[split]

    def check_root(self) -> None:
        if not _is_url(self.root) and not os.path.isdir(_local(self.root)):
            hint = " (`make demo-shards` converts the demo dataset)" if "demo" in self.root else ""
            raise FileNotFoundError(f"data.root: shard folder '{self.root}' does not exist{hint}")

    def build_dataset(self, split, transform) -> ShardDataset:
        return ShardDataset(self.split(split), transform, on_bad_sample=self.on_bad_sample,
                            min_confidence=self.min_confidence, soft_targets=self.soft_targets)

    @property
    def num_classes(self) -> int:
        return int(self.split("train").meta["num_classes"])

    @property
    def multilabel(self) -> bool:
        return bool(self.split("train").meta["multilabel"])

    def check_batch_size(self, num_images: int) -> None:
        super().check_batch_size(num_images)
        world = self.trainer.world_size if self.trainer is not None else 1
        if num_images // world < self.batch_size:
            raise ValueError(f"data.batch_size={self.batch_size} is larger than the {num_images // world} training "
                             f"images each of {world} processes gets from '{self.root}': set "
                             f"data.init_args.batch_size <= {num_images // world}")

    def train_dataloader(self) -> StreamingDataLoader:
        """The rank's stream (see the module docstring), resumed after the batches a checkpoint already holds."""
        if self.train_set is None:
            self.setup("fit")
        stream = StreamingViewDataset(self.train_set, seed=run_seed(), rank=rank(), world_size=world_size(),
                                      batch_size=self.batch_size, num_workers=self.num_workers, shuffle=self.shuffle,
                                      shuffle_window=self.shuffle_window, prefetch_chunks=self.prefetch_chunks)
        if self.trainer is not None:
            stream.set_epoch(self.trainer.current_epoch)
        self.train_stream = stream
        if self._resume_position is not None:
            self._apply_resume_position(self._resume_position)
            self._resume_position = None
        workers = self.num_workers
        return StreamingDataLoader(
            stream,
            batch_size=self.batch_size,
            drop_last=True,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and workers > 0,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
        )

    def state_dict(self) -> dict[str, Any]:
        """The stream's position, saved in every checkpoint of a fit (see ``PretrainDataModule.state_dict``)."""
        trainer, stream = self.trainer, self.train_stream
        if trainer is None or stream is None or trainer.state.fn != "fit":
            return {}
        epoch = trainer.current_epoch
        batches_done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if batches_done >= trainer.num_training_batches:
            epoch, batches_done = epoch + 1, 0
        return {"train_stream": {"epoch": epoch, "batches": batches_done, **self._order_settings(stream)}}

    @staticmethod
    def _order_settings(stream: StreamingViewDataset) -> dict[str, Any]:
        return {"batch_size": stream.batch_size, "num_replicas": stream.world_size, "num_workers": stream.num_roles,
                "seed": stream.seed, "shuffle": stream.shuffle, "shuffle_window": stream.shuffle_window,
                "num_samples": len(stream.shards)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_position = state_dict.get("train_stream")

    def _apply_resume_position(self, position: dict[str, Any]) -> None:
        stream = self.train_stream
        now = self._order_settings(stream)
        changed = [f"{key} {position[key]} -> {value}" for key, value in now.items()
                   if key in position and position[key] != value]
        if changed:
            warnings.warn(f"resuming with a different {', '.join(changed)} than the checkpoint: the run continues "
                          "but does not see the samples an uninterrupted run would have seen", stacklevel=2)
        stream.resume(int(position["epoch"]), min(int(position["batches"]), stream.batches_per_epoch))
