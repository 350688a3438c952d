"""Image transforms of the evaluation protocols, in the data modules' view-dict format.

The data modules ask the LightningModule for ``train_transform()`` / ``val_transform()`` returning a
callable ``PIL image -> {"views": Tensor[V, 3, S, S]}``; evaluation uses one view (``V = 1``). Everything
here is a picklable class or a torchvision ``Compose``, so loader workers can use it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torchvision.transforms import v2 as T

from ssl_zoo.augment.recipes import safe_posterize
from ssl_zoo.data.datamodule import eval_transform

__all__ = [
    "NoImage",
    "finetune_train_transform",
    "SingleView",
    "center_crop_transform",
    "random_resized_crop_transform",
    "resize_flip_transform",
    "resize_transform",
]


class SingleView:
    """Wrap an image transform ``PIL -> Tensor[3, S, S]`` into ``PIL -> {"views": Tensor[1, 3, S, S]}``."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, image) -> dict[str, Tensor]:
        return {"views": self.transform(image).unsqueeze(0)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


class NoImage:
    """Cached-feature mode: the image is not used (features are looked up by dataset index), so return a
    1-pixel placeholder view instead of resizing and normalising it."""

    def __call__(self, image) -> dict[str, Tensor]:
        return {"views": torch.zeros(1, 3, 1, 1)}


def _to_normalised_tensor() -> list:
    return [T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]


def random_resized_crop_transform(size: int, scale: tuple[float, float] = (0.08, 1.0)) -> T.Compose:
    """Linear-probe training augmentation of MoCo / SimSiam / MAE: RandomResizedCrop + horizontal flip."""
    return T.Compose([T.PILToTensor(), T.RandomResizedCrop(size, scale=scale, antialias=True),
                      T.RandomHorizontalFlip(), *_to_normalised_tensor()])


def center_crop_transform(size: int, interpolation: str = "bilinear") -> T.Compose:
    """ImageNet evaluation: resize the short side to ``size / 0.875``, centre crop ``size``.

    ``interpolation="bicubic"`` resizes the PIL image bicubically, as BEiT's and MAE's evaluation
    (``transforms.Resize(size, interpolation=3)``) does.
    """
    if interpolation == "bilinear":
        return eval_transform(size)
    if interpolation != "bicubic":
        raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {interpolation!r}")
    return T.Compose([T.Resize(int(round(size / 0.875)), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                      T.CenterCrop(size), T.PILToTensor(), *_to_normalised_tensor()])


def resize_transform(size: int) -> T.Compose:
    """Multi-label evaluation: resize the whole image to ``size x size`` (no crop, so no object is cut off;
    the COCO protocol of ML-GCN / ASL / BAM+IA-CLoss)."""
    return T.Compose([T.PILToTensor(), T.Resize((size, size), antialias=True), *_to_normalised_tensor()])


def resize_flip_transform(size: int) -> T.Compose:
    """Multi-label linear-probe training: :func:`resize_transform` + horizontal flip."""
    return T.Compose([T.PILToTensor(), T.Resize((size, size), antialias=True), T.RandomHorizontalFlip(),
                      *_to_normalised_tensor()])


def finetune_train_transform(size: int, auto_augment: str | None, re_prob: float,
                             color_jitter: float | None = 0.4,
                             crop_scale: tuple[float, float] = (0.08, 1.0)) -> Callable:
    """BEiT / DeiT fine-tuning augmentation (timm ``create_transform``): RandomResizedCrop (bicubic, area
    fraction in ``crop_scale``, timm's and torchvision's (0.08, 1) by default), flip, RandAugment
    ``auto_augment``, normalisation and random erasing with probability ``re_prob``. Without ``auto_augment``
    timm applies ``ColorJitter(color_jitter)`` instead; ``color_jitter=None`` leaves only the crop and flip
    (SimCLR's semi-supervised fine-tuning)."""
    import timm.data
    from timm.data.auto_augment import RandAugment

    transform = timm.data.create_transform(size, is_training=True, auto_augment=auto_augment, re_prob=re_prob,
                                           re_mode="pixel", re_count=1, interpolation="bicubic",
                                           color_jitter=color_jitter, scale=tuple(crop_scale))
    for step in getattr(transform, "transforms", []):
        if isinstance(step, RandAugment):
            safe_posterize(step)  # Pillow >= 11 refuses the 0-bit posterize that ``inc1`` asks for
    return transform

