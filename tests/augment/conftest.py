"""A real photograph every augmentation test crops (sklearn's sample ``china.jpg``, 640 x 427)."""

from __future__ import annotations

import pytest
from PIL import Image


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A real photograph (427 x 640 RGB)."""
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image("china.jpg"))
