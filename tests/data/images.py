"""Images whose pixels identify them, for the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


def save_solid(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (6, 4)) -> Path:
    """A lossless solid-colour image: its colour identifies it after loading."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="PNG")  # lossless whatever the suffix
    return path
