"""The base of the dataset readers: a list of image files, a target per file, and the bad-sample policy."""

from __future__ import annotations

import operator
import os
from array import array
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, NamedTuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ssl_zoo.data.bad_sample_policy import BadSamplePolicy, transform_encoded
from ssl_zoo.data.decode import EncodedImage, load_image

__all__ = ["ImageListDataset", "PathArray", "Sample"]

# Threads for the up-front existence check of image files (I/O bound; the GIL is released in stat).
_STAT_THREADS = 16


class PathArray(Sequence[str]):
    """An immutable list of strings stored as one UTF-8 buffer plus offsets.

    A Python list of millions of ``str`` objects is slowly copied into every forked DataLoader worker
    (reference counting touches each object's page); two numpy arrays are not.
    """

    def __init__(self, strings: Iterable[str]) -> None:
        # One pass, without an intermediate list: `strings` may be a generator over a huge file.
        buffer = bytearray()
        ends = array("q")
        for string in strings:
            buffer += string.encode("utf-8")
            ends.append(len(buffer))
        self._offsets = np.zeros(
            len(ends) + 1, dtype=np.int64
        )  # [N+1]; string i is [offsets[i], offsets[i+1])
        self._offsets[1:] = np.frombuffer(ends, dtype=np.int64)
        self._buffer = np.frombuffer(bytes(buffer), dtype=np.uint8)  # [total bytes], read-only

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} paths")
        index %= len(self)
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._buffer[start:end].tobytes().decode("utf-8")


class Sample(NamedTuple):
    """One item of an :class:`ImageListDataset` with its provenance (see :meth:`ImageListDataset.load_sample`)."""

    image: Any  # the transformed image (a PIL image without transform)
    target: Any  # the label of *this* image
    index: int  # the dataset index the image was read from (differs from the requested one after a skip)
    skipped: tuple[tuple[str, str], ...]  # (path, reason) of the unreadable files passed over


class ImageListDataset(Dataset):
    """Base of the dataset readers: a list of image files, a target per file, and the bad-sample policy.

    Subclasses fill :attr:`paths` (full paths) and implement :meth:`target`. Items are
    ``(transform(image) or PIL image, target)``; the transform is applied outside the bad-sample guard,
    so a bug in a transform is raised, never mistaken for a bad file.

    Args:
        paths: full image paths, one per sample (any iterable; stored as a :class:`PathArray`).
        transform: callable applied to the decoded RGB ``PIL.Image``.
        on_bad_sample: ``"raise"`` or ``"skip"`` (see :class:`BadSamplePolicy`).
    """

    def __init__(
        self,
        paths: Iterable[str],
        transform: Callable | None = None,
        on_bad_sample: Literal["raise", "skip"] = "raise",
    ) -> None:
        self.paths = paths if isinstance(paths, PathArray) else PathArray(paths)
        self.transform = transform
        self.on_bad_sample = on_bad_sample
        self.bad_sample_policy = BadSamplePolicy(on_bad_sample)

    def target(self, index: int) -> Any:
        """The label of sample ``index``."""
        raise NotImplementedError

    @property
    def num_skipped(self) -> int:
        """Bad indices passed over so far under ``on_bad_sample="skip"`` (this process)."""
        return self.bad_sample_policy.num_skipped

    @property
    def bad_paths(self) -> list[str]:
        """The first distinct unreadable files met so far (this process)."""
        return self.bad_sample_policy.bad_paths

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        """Decode image ``index`` (no transform, no bad-sample handling)."""
        return load_image(self.paths[index])

    def load_sample(self, index: int) -> Sample:
        """Sample ``index`` (or its substitute under ``"skip"``) with its target and the bad files passed over.

        What :meth:`__getitem__` returns, plus the index of the image actually returned and the unreadable
        files skipped to reach it, so that wrappers running in DataLoader workers can report them.
        """
        index = operator.index(index)  # Python / numpy / 0-dim integer tensor indices alike
        length = len(self)
        if not -length <= index < length:
            raise IndexError(f"index {index} out of range for a dataset of {length} images")
        index %= length
        if getattr(self.transform, "accepts_encoded", False):
            # The view transform decodes the file itself (once, at the reduced JPEG scale its crops allow), so
            # a corrupt body surfaces inside it: read and transform together under the bad-sample guard.
            used, image, skipped = self.bad_sample_policy.fetch(
                index, length, lambda i: transform_encoded(self.transform, EncodedImage.read(self.paths[i])))
            return Sample(image, self.target(used), used, skipped)
        used, image, skipped = self.bad_sample_policy.fetch(index, length, self.load)
        target = self.target(used)  # the label of the image actually returned
        if self.transform is not None:
            image = self.transform(image)
        return Sample(image, target, used, skipped)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        sample = self.load_sample(index)
        return sample.image, sample.target

    def missing_indices(self) -> list[int]:
        """Indices whose file does not exist (a ``stat`` each, no decoding).

        The ``stat`` calls run in a thread pool: on network file systems each one waits on a round trip,
        and a list of millions of images would otherwise take hours to check.
        """
        with ThreadPoolExecutor(max_workers=_STAT_THREADS) as pool:
            exists = pool.map(os.path.isfile, self.paths, chunksize=1024)
            return [index for index, ok in enumerate(exists) if not ok]

    def missing_files(self) -> list[str]:
        """Paths that do not exist as files (a cheap ``stat``, no decoding)."""
        return [self.paths[index] for index in self.missing_indices()]

    def locate(self, indices: Sequence[int]) -> list[str]:
        """Where each sample is listed in its annotation file, for error messages (subclasses refine it)."""
        return [f"sample {index}" for index in indices]

    def check_files(self, source: str) -> None:
        """Raise ``FileNotFoundError`` naming ``source`` (the annotation file) and where each missing image is listed."""
        missing = self.missing_indices()
        if missing:
            shown = "; ".join(
                f"{where}: '{self.paths[i]}'" for i, where in zip(missing[:5], self.locate(missing[:5]), strict=True)
            )
            raise FileNotFoundError(
                f"{len(missing)} of {len(self)} images listed in '{source}' do not exist, e.g. {shown} "
                "(fix the paths or the data root, or remove those entries)"
            )
