"""Robust image decoding: every readable file an upright 8-bit RGB image, every unreadable one a named error.

Large crawled datasets (Tencent ML-Images, web-scale COCO mirrors) always contain a few files that
are empty, truncated by an interrupted download, HTML error pages saved as ``.jpg``, CMYK or 16-bit
scans, or images whose EXIF says "rotate me". :func:`load_image` turns every readable file into an
upright 8-bit RGB ``PIL.Image`` and every unreadable one into a :class:`BadImageError` that names the
file, so a run either stops with a useful message (``on_bad_sample="raise"``) or replaces the sample
deterministically and keeps count (``on_bad_sample="skip"``, :mod:`ssl_zoo.data.bad_sample_policy`).
:class:`EncodedImage` holds a file's bytes with its header read, for the view transforms that decode once at
a reduced JPEG scale.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

__all__ = [
    "MAX_IMAGE_PIXELS",
    "BadImageError",
    "EncodedImage",
    "JPEG_REDUCTIONS",
    "load_image",
    "set_max_image_pixels",
    "to_rgb",
]

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
            "(possible decompression bomb; see ssl_zoo.data.decode.set_max_image_pixels)",
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
