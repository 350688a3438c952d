"""Robust image decoding and the ``on_bad_sample`` policy shared by every dataset reader.

Large crawled datasets (Tencent ML-Images, web-scale COCO mirrors) always contain a few files that
are empty, truncated by an interrupted download, HTML error pages saved as ``.jpg``, CMYK or 16-bit
scans, or images whose EXIF says "rotate me". :func:`load_image` turns every readable file into an
upright 8-bit RGB ``PIL.Image`` and every unreadable one into a :class:`BadImageError` that names the
file, so a run either stops with a useful message (``on_bad_sample="raise"``) or replaces the sample
deterministically and keeps count (``on_bad_sample="skip"``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import operator
import os
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, Literal, NamedTuple, TypeVar

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = [
    "MAX_IMAGE_PIXELS",
    "BAD_SAMPLE_POLICIES",
    "BadImageError",
    "BadSamplePolicy",
    "EncodedImage",
    "Fetched",
    "JPEG_REDUCTIONS",
    "ImageListDataset",
    "PathArray",
    "Sample",
    "load_image",
    "set_max_image_pixels",
    "to_rgb",
    "transform_encoded",
]

logger = logging.getLogger(__name__)

#: Largest accepted image, in pixels (width * height). 2**28 = 268M pixels, e.g. 16384 x 16384, is far
#: above any real photo in COCO / ImageNet / Tencent ML-Images (their largest are a few tens of Mpx) but
#: stops decompression bombs before they allocate gigabytes. Change it with :func:`set_max_image_pixels`,
#: or per call with ``load_image(max_pixels=...)``.
MAX_IMAGE_PIXELS: int = 2**28

# Pillow's own guard warns above its limit and raises above twice its limit, inside ``Image.open``. Set it
# explicitly so the behaviour does not depend on the Pillow version's default (89.5 Mpx today) or on
# another library having disabled it (``Image.MAX_IMAGE_PIXELS = None`` is a common copy-pasted "fix").
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def set_max_image_pixels(pixels: int) -> None:
    """Set the largest accepted image size (width * height) here and in Pillow's own guard."""
    global MAX_IMAGE_PIXELS
    if pixels < 1:
        raise ValueError(f"pixels must be >= 1, got {pixels}")
    MAX_IMAGE_PIXELS = int(pixels)
    Image.MAX_IMAGE_PIXELS = int(pixels)


#: Background that transparent pixels are composited on (RGBA, LA, PA and palette images with a
#: transparent index). White, as browsers and image viewers show such images, so logos and product shots
#: with transparent backgrounds look the way their authors intended; black would hide dark foregrounds.
TRANSPARENT_BACKGROUND: tuple[int, int, int] = (255, 255, 255)

BAD_SAMPLE_POLICIES = ("raise", "skip")

# Threads for the up-front existence check of image files (I/O bound; the GIL is released in stat).
_STAT_THREADS = 16

T = TypeVar("T")


class BadImageError(OSError, ValueError):
    """An image file that cannot be decoded (empty, truncated, corrupt, not an image, too large, missing).

    Subclasses both ``OSError`` (what Pillow raises for undecodable files) and ``ValueError`` so existing
    ``except`` clauses for either keep working.

    Attributes:
        path: the offending file.
        reason: why it was rejected.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"cannot read image '{self.path}': {reason}")

    def __str__(self) -> str:
        # OSError.__str__ would format (errno, strerror) when constructed with two arguments; we pass one
        # message, but keep the formatting explicit.
        return f"cannot read image '{self.path}': {self.reason}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable with its two arguments (DataLoader workers send exceptions to the main process).
        return (type(self), (self.path, self.reason))


def _to_uint8_from_16bit(image: Image.Image) -> Image.Image:
    """Scale a 16-bit (``I;16*``) or 32-bit integer (``I``) grey image to 8 bits.

    ``I`` is what Pillow uses for 16-bit PNG / TIFF greyscale on some versions, so its values are taken
    as 16-bit: ``v8 = round(v16 * 255 / 65535)``, with values outside ``[0, 65535]`` clipped.
    """
    values = np.asarray(image, dtype=np.int64)  # [H, W]; I;16B is byte-swapped by numpy's view
    values = np.clip(values, 0, 65535)
    scaled = (values * 255 + 32767) // 65535  # round-half-up of v * 255 / 65535, exact in integers
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite an image with an alpha channel on :data:`TRANSPARENT_BACKGROUND`; returns RGB."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*TRANSPARENT_BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any decoded Pillow mode to 8-bit RGB.

    - ``RGB``: unchanged.
    - ``RGBA``, ``LA``, ``PA``, ``RGBa`` and ``P`` / ``L`` / ``RGB`` with a ``transparency`` entry:
      composited on :data:`TRANSPARENT_BACKGROUND` (white).
    - ``I;16``, ``I;16L``, ``I;16B``, ``I;16N``, ``I``: 16-bit grey scaled to 8 bits, then replicated.
    - ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``L``, ``1``, ``P``, ``F``: Pillow's conversion.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I;16") or mode == "I":
        return _to_uint8_from_16bit(image).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:
        return _flatten_alpha(image)
    return image.convert("RGB")


@contextlib.contextmanager
def _bad_image_errors(path: str) -> Iterator[None]:
    """Turn every exception that means "this file cannot be used" into a :class:`BadImageError` naming ``path``."""
    try:
        yield
    except BadImageError:
        raise
    except FileNotFoundError as error:
        raise BadImageError(path, "file not found") from error
    except UnidentifiedImageError as error:
        raise BadImageError(path, "not a recognised image format") from error
    except Image.DecompressionBombError as error:
        raise BadImageError(path, f"decompression bomb: {error}") from error
    except MemoryError:
        raise  # the machine is out of memory: not a property of this file
    except Exception as error:
        # Pillow reports truncated / corrupt data as OSError ("image file is truncated"), SyntaxError
        # (malformed headers), ValueError, EOFError, and malformed EXIF / TIFF tags as struct.error,
        # KeyError or IndexError depending on the plugin: all of them mean "this file cannot be used".
        raise BadImageError(path, f"{type(error).__name__}: {error}") from error


def _check_pixels(image: Image.Image, path: str, limit: int) -> None:
    _check_pixel_count(*image.size, path, limit)


def _check_pixel_count(width: int, height: int, path: str, limit: int) -> None:
    if width * height > limit:
        raise BadImageError(
            path,
            f"{width}x{height} = {width * height} pixels exceeds the limit of {limit} "
            "(possible decompression bomb; see ssl_zoo.data.io.set_max_image_pixels)",
        )


def _pixel_limit(max_pixels: int | None) -> int:
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if limit < 1:
        raise ValueError(f"max_pixels must be >= 1, got {limit}")
    return limit


def _decode_opened(image: Image.Image, reduce: int = 1) -> Image.Image:
    """Decode an opened image into an upright RGB image that owns its pixels.

    ``reduce`` > 1 asks a JPEG decoder for 1/2, 1/4 or 1/8 scale (DCT scaling: the inverse DCT runs on the
    low-frequency coefficients only, so the decoder does a fraction of the work); other formats ignore it.
    """
    if reduce > 1 and image.format == "JPEG":
        width, height = image.size
        image.draft(None, (max(1, width // reduce), max(1, height // reduce)))
    image.load()  # decode everything now: truncation surfaces here, inside the loader
    # exif_transpose returns a new image (rotated, or a plain copy), detached from the file that the
    # caller's `with` block closes.
    return to_rgb(ImageOps.exif_transpose(image))


def load_image(path: str | os.PathLike[str], max_pixels: int | None = None) -> Image.Image:
    """Decode ``path`` fully into an upright 8-bit RGB image, or raise :class:`BadImageError`.

    Steps: check the file is non-empty; open it (header only) and reject it if it has more than
    ``max_pixels`` pixels (decompression bombs); ``load()`` all pixel data so that truncated or corrupt
    files fail here rather than later inside a transform; apply the EXIF orientation
    (``ImageOps.exif_transpose``); convert to RGB with :func:`to_rgb`.

    A truncated file is only detected if ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is False (Pillow's
    default); some codebases set it globally, in which case the missing rows are filled with grey.

    Args:
        path: image file.
        max_pixels: largest accepted ``width * height``; None uses :data:`MAX_IMAGE_PIXELS`. Pillow's own
            guard (``PIL.Image.MAX_IMAGE_PIXELS``, raising above twice its value) still applies.

    Returns:
        A ``PIL.Image`` in mode ``RGB`` that owns its pixel data (the file is closed).

    Raises:
        BadImageError: the file is missing, empty, not an image, truncated, corrupt or too large.
    """
    path = os.fspath(path)
    limit = _pixel_limit(max_pixels)
    with _bad_image_errors(path):
        if os.path.getsize(path) == 0:
            raise BadImageError(path, "empty file (0 bytes)")
        with Image.open(path) as image:  # reads the header only
            _check_pixels(image, path, limit)
            return _decode_opened(image)


#: EXIF orientations that swap width and height (transpose, rotate 90 / 270, transverse).
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})

#: JPEG DCT scaling factors (libjpeg decodes at 1/1, 1/2, 1/4 or 1/8 of the stored size).
JPEG_REDUCTIONS = (1, 2, 4, 8)


def _byte_stream(data: bytes | memoryview) -> io.IOBase:
    # BytesIO shares a bytes object (no copy) and copies a memoryview once (tens of microseconds for a photograph,
    # against milliseconds of decoding); Pillow's decoder then reads from C. A Python-level reader over the view
    # costs a Python call per read, which made decoding shard records 0.8x as fast as decoding files.
    return io.BytesIO(data)


class EncodedImage:
    """An image file's bytes with its header read and its pixels decoded on demand.

    The view transforms take one (``accepts_encoded``): they draw every view's crop from :attr:`size` first,
    then :meth:`decode` once at the largest JPEG reduction that still leaves every crop at least as large as
    its output, so no view is upsampled and the views differ from a full decode only by resampling.

    The header is parsed at construction: an empty file, a file that is not an image or one above the pixel
    limit raises :class:`BadImageError` here; a truncated or corrupt body raises it from :meth:`decode`.

    Args:
        data: the encoded file (JPEG, PNG, ...): ``bytes``, or a ``memoryview`` into a larger buffer (a shard
            record), which is read in place, never copied whole.
        name: where it came from (file path, or ``shard#index``), for error messages.
        max_pixels: largest accepted ``width * height`` (default :data:`MAX_IMAGE_PIXELS`).

    Attributes:
        size: ``(width, height)`` as displayed, i.e. after the EXIF orientation.
        format: Pillow's format name (``"JPEG"``, ``"PNG"``...).
    """

    __slots__ = ("data", "name", "size", "format", "max_pixels")

    def __init__(self, data: bytes | memoryview, name: str, max_pixels: int | None = None) -> None:
        self.data = data
        self.name = name
        self.max_pixels = _pixel_limit(max_pixels)
        with _bad_image_errors(name):
            if not data:
                raise BadImageError(name, "empty file (0 bytes)")
            with Image.open(_byte_stream(data)) as image:
                _check_pixels(image, name, self.max_pixels)
                self.format = image.format
                width, height = image.size
                orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        self.size = (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)

    @classmethod
    def with_header(cls, data: bytes | memoryview, name: str, size: tuple[int, int], format: str,
                    max_pixels: int | None = None) -> EncodedImage:
        """An image whose header was read before (a shard record stores it at conversion): nothing is parsed
        here; ``size`` is the displayed ``(width, height)``. The pixel limit still applies."""
        image = cls.__new__(cls)
        image.data, image.name, image.format = data, name, format
        image.max_pixels = _pixel_limit(max_pixels)
        image.size = (int(size[0]), int(size[1]))
        _check_pixel_count(*image.size, name, image.max_pixels)
        return image

    @classmethod
    def read(cls, path: str | os.PathLike[str], max_pixels: int | None = None) -> EncodedImage:
        """The file at ``path`` (missing or unreadable: :class:`BadImageError`)."""
        path = os.fspath(path)
        with _bad_image_errors(path):
            with open(path, "rb") as f:
                data = f.read()
        return cls(data, path, max_pixels)

    def decode(self, reduce: int = 1) -> Image.Image:
        """The upright RGB image, decoded at ``1/reduce`` scale when the file is a JPEG (``reduce`` in 1, 2, 4, 8).

        The result may be slightly larger than ``size / reduce`` (libjpeg rounds up); use its own size.
        """
        if reduce not in JPEG_REDUCTIONS:
            raise ValueError(f"reduce must be one of {JPEG_REDUCTIONS}, got {reduce}")
        with _bad_image_errors(self.name), Image.open(_byte_stream(self.data)) as image:
            return _decode_opened(image, reduce)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.format}, {self.size[0]}x{self.size[1]}, {len(self.data)} bytes)"


def transform_encoded(transform: Callable[[EncodedImage], T], image: EncodedImage) -> T:
    """``transform(image)`` for a transform that decodes ``image`` itself; on :class:`BadImageError` (a corrupt
    body found by the decode) the torch RNG is put back, so a substitute sample draws what it would have drawn
    had the bad file been rejected before any view was sampled (as a full decode up front rejects it)."""
    state = torch.random.get_rng_state()
    try:
        return transform(image)
    except BadImageError:
        torch.random.set_rng_state(state)
        raise


def check_bad_sample_policy(on_bad_sample: str) -> str:
    """Validate an ``on_bad_sample`` value; returns it unchanged."""
    if on_bad_sample not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {on_bad_sample!r}")
    return on_bad_sample


class Fetched(NamedTuple, Generic[T]):
    """What :meth:`BadSamplePolicy.fetch` read: the index actually used, its value, the bad files passed over."""

    index: int  # index whose value is returned (the requested one unless it was unreadable)
    value: T
    skipped: tuple[tuple[str, str], ...]  # (path, reason) of every unreadable index passed over, in order


class BadSamplePolicy:
    """What a dataset does when an image cannot be read: ``"raise"`` or ``"skip"``.

    With ``"skip"``, index ``i`` is replaced by the first readable index among ``i+1, i+2, ...`` (modulo
    the dataset length), so the replacement is deterministic and the returned label is always the one of
    the image actually returned. Indices found bad are remembered and passed over without re-reading.
    Every bad index passed over increments :attr:`num_skipped` and is reported in the
    :class:`Fetched` result, so the count can travel with the sample out of a DataLoader worker; the
    first :attr:`max_recorded` distinct bad files are kept in :attr:`bad_paths` and logged. If no index
    is readable, a ``RuntimeError`` says so.

    :attr:`num_skipped` and :attr:`bad_paths` are per process: each DataLoader worker holds its own copy
    of the dataset. Use the ``skipped`` field of :meth:`fetch`'s result (what the data modules put in
    every batch) for counts that include the workers.

    Args:
        on_bad_sample: ``"raise"`` or ``"skip"``.
        max_recorded: how many distinct bad paths to keep and log, ``>= 0``.
    """

    def __init__(self, on_bad_sample: Literal["raise", "skip"] = "raise", max_recorded: int = 100) -> None:
        self.mode = check_bad_sample_policy(on_bad_sample)
        if max_recorded < 0:
            raise ValueError(f"max_recorded must be >= 0, got {max_recorded}")
        self.max_recorded = max_recorded
        self.num_skipped = 0
        self.bad_paths: list[str] = []
        self.bad_indices: dict[int, tuple[str, str]] = {}  # index -> (path, reason), read once

    def _record(self, index: int, error: BadImageError) -> tuple[str, str]:
        self.bad_indices[index] = (error.path, error.reason)
        if len(self.bad_paths) < self.max_recorded and error.path not in self.bad_paths:
            self.bad_paths.append(error.path)
            logger.warning("on_bad_sample='skip': skipping unreadable image (%s)", error)
        return self.bad_indices[index]

    def fetch(self, index: int, length: int, read: Callable[[int], T]) -> Fetched[T]:
        """Read sample ``index`` with ``read``, or with ``"skip"`` the first readable one after it.

        Only :class:`BadImageError` counts as a bad sample; any other exception propagates.
        """
        if self.mode == "raise":
            return Fetched(index, read(index), ())
        skipped: list[tuple[str, str]] = []
        for step in range(length):
            candidate = (index + step) % length
            known = self.bad_indices.get(candidate)
            if known is None:
                try:
                    return Fetched(candidate, read(candidate), tuple(skipped))
                except BadImageError as error:
                    known = self._record(candidate, error)
            skipped.append(known)
            self.num_skipped += 1
        raise RuntimeError(
            f"on_bad_sample='skip': none of the {length} samples could be read; "
            f"first unreadable files: {self.bad_paths[:5]}"
        )


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
