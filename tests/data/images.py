"""Images whose pixels identify them, broken image files and class-per-folder trees built from both, for the data
tests (also those of ``utils`` and ``jobs`` that read such files)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def pixels(image: Image.Image) -> np.ndarray:
    """The image's pixels as an int64 array ``[H, W, C]``."""
    return np.asarray(image).astype(np.int64)


def save_solid(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (6, 4)) -> Path:
    """A lossless solid-colour image: its colour identifies it after loading."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="PNG")  # lossless whatever the suffix
    return path


def colour_encoding(index: int) -> tuple[int, int, int]:
    """A colour that encodes ``index`` exactly (for ``index < 65536``)."""
    return (index % 256, index // 256, 77)


def index_from_colour(colour) -> int:
    """The index :func:`colour_encoding` encoded in ``colour`` (an RGB triple)."""
    return int(colour[0]) + 256 * int(colour[1])


def pixel_views(image: Image.Image) -> dict[str, torch.Tensor]:
    """A view transform that keeps the identity of the image: its top-left pixel as a 1x1 view."""
    colour = torch.as_tensor(pixels(image)[0, 0])  # [3]
    return {"views": colour.view(1, 3, 1, 1).float()}


# ---------------------------------------------------------------------------------------------- broken files
def jpeg_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    """The bytes of a valid JPEG of seeded random pixels (``size`` is width, height)."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buffer, "JPEG", quality=90
    )
    return buffer.getvalue()


#: One of each kind of broken file met in crawled data; "missing" is a listed file that is not on disk.
BAD_CONTENT = {
    "zero-byte": b"",
    "truncated": jpeg_bytes()[: len(jpeg_bytes()) // 2],
    "text": b"<html><body>404 Not Found</body></html>\n",
    "random": bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8)),
    "corrupt-header": b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
}


BAD_KINDS = [*BAD_CONTENT, "missing"]


def break_file(path: Path, kind: str) -> None:
    """Overwrite ``path`` with the ``BAD_CONTENT`` of ``kind``, or delete it for "missing"."""
    if kind == "missing":
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(BAD_CONTENT[kind])


# ---------------------------------------------------------------------------------------------- folder trees
def labelled_tree(root: Path, n: int, bad: dict[int, str], num_classes: int = 4) -> list[tuple[Path, int, bool]]:
    """``root/<class>/<i>.png`` with image ``i`` of class ``i % num_classes`` coloured ``colour_encoding(i)``.

    ``bad`` maps image numbers to a kind of breakage. A class-per-folder dataset lists what is on disk, so
    "missing" files are written here and must be removed with :func:`remove_missing` after the dataset
    is built (a file deleted while a run goes on). Returns ``(path, label, is_bad)`` in ImageFolder order
    (class folder, then file name).
    """
    files = []
    for i in range(n):
        label = i % num_classes
        path = save_solid(root / f"c{label}" / f"{i:03d}.png", colour_encoding(i))
        if i in bad and bad[i] != "missing":
            break_file(path, bad[i])
        files.append((path, label, i in bad))
    return sorted(files)


def remove_missing(root: Path, bad: dict[int, str]) -> None:
    """Delete the images of a :func:`labelled_tree` that ``bad`` marks "missing"."""
    for i, kind in bad.items():
        if kind == "missing":
            next(root.glob(f"*/{i:03d}.png")).unlink()


def expected_walk(is_bad: list[bool], position: int) -> tuple[int, int]:
    """Brute force of the skip policy: (position actually read, bad files passed over) for a request."""
    j, skipped = position, 0
    while is_bad[j]:
        skipped += 1
        j = (j + 1) % len(is_bad)
    return j, skipped


IMAGENET_WNIDS = ["n01440764", "n01443537", "n01484850"]


def imagenet_tree(root: Path, per_class: int = 4) -> list[str]:
    """An ImageNet-style tree ``root/{train,val}/<wnid>/<wnid>_<k>.JPEG`` of tiny images; returns the train names."""
    names = []
    for split in ("train", "val"):
        for c, wnid in enumerate(IMAGENET_WNIDS):
            (root / split / wnid).mkdir(parents=True)
            for k in range(per_class):
                name = f"{wnid}_{100 + k}.JPEG"
                Image.new("RGB", (32, 32), (40 * c, 20 * k, 90)).save(root / split / wnid / name, format="JPEG")
                if split == "train":
                    names.append(name)
    return names
