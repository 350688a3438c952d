"""The per-channel statistics a view is normalised with: timm's ImageNet ones for the student, OpenAI CLIP's
(open_clip's) for a CLIP teacher, which sees its input normalised as in CLIP training (MVP §3.2)."""

from __future__ import annotations

from typing import Literal

from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T

__all__ = ["NORMALIZATIONS", "Normalization", "normalize_transform"]

Normalization = Literal["imagenet", "clip"]
#: Per-channel (mean, std) of timm's ImageNet statistics and of OpenAI CLIP's preprocessing (open_clip's): the
#: MVP teacher sees its input normalised as in CLIP training.
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "clip": (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
}


def normalize_transform(normalize: Normalization = "imagenet") -> T.Normalize:
    """``Normalize`` with the named statistics (``imagenet`` or ``clip``)."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {sorted(NORMALIZATIONS)}, got {normalize!r}")
    mean, std = NORMALIZATIONS[normalize]
    return T.Normalize(mean, std)
