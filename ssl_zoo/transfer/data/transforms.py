"""Augmentations of the detection and semantic-segmentation recipes (image and annotation together).

Detection (detectron2 / mmdet Mask R-CNN): the random flip happens here, on the image, boxes and masks;
the multi-scale resize of the shorter side (e.g. 640..800 for MoCo's COCO recipe, 480..800 for VOC and Swin)
happens inside the model, in torchvision's ``GeneralizedRCNNTransform``, which also maps the predictions back
to the original image size so that evaluation runs on the original annotations.

Semantic segmentation (mmseg's ADE20K pipeline, used by BEiT, MVP and Swin): random rescale with a ratio in
[0.5, 2.0] of the (2048, 512) scale keeping the aspect ratio, a random ``crop_size`` crop in which no class
covers more than 75% of the labelled pixels (10 tries), a horizontal flip, mmseg's photometric distortion,
ImageNet normalisation and padding to the crop size (image 0, label 255). Evaluation resizes the image to the
(2048, 512) scale and keeps the label at its original size.

Random draws come from torch's global generator; the data modules seed it per sample from
(seed, epoch, index), so a resumed run sees the same augmentations.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor

__all__ = [
    "DetectionEvalTransform",
    "DetectionTrainTransform",
    "SegmentationEvalTransform",
    "SegmentationTrainTransform",
    "hflip_detection_target",
    "photometric_distortion",
    "rescale_size",
]

IGNORE_INDEX = 255


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high))


def _coin(p: float) -> bool:
    return bool(torch.rand(()) < p)


# ------------------------------------------------------------------------------------------ detection
def hflip_detection_target(target: dict[str, Tensor], width: int) -> dict[str, Tensor]:
    """Mirror boxes ``[N, 4]`` (x1, y1, x2, y2; continuous pixel coordinates) and masks ``[N, H, W]``."""
    out = dict(target)
    boxes = target["boxes"]
    out["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    if "masks" in target:
        out["masks"] = target["masks"].flip(-1)
    return out


class DetectionTrainTransform:
    """PIL image + target -> float image ``[3, H, W]`` in [0, 1] + target, flipped with probability ``flip_prob``."""

    def __init__(self, flip_prob: float = 0.5) -> None:
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must lie in [0, 1], got {flip_prob}")
        self.flip_prob = flip_prob

    def __call__(self, image: Image.Image, target: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        tensor = TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True)  # [3, H, W]
        if _coin(self.flip_prob):
            tensor = tensor.flip(-1)
            target = hflip_detection_target(target, tensor.shape[-1])
        return tensor, target


class DetectionEvalTransform:
    """PIL image + target -> float image in [0, 1] + the target unchanged."""

    def __call__(self, image: Image.Image, target: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True), target


# ------------------------------------------------------------------------------------------ segmentation
def rescale_size(width: int, height: int, scale: Sequence[float]) -> tuple[int, int]:
    """mmcv's ``imrescale`` size: the largest size keeping the aspect ratio with the long side <= max(scale)
    and the short side <= min(scale), rounded half up. Returns ``(width, height)``."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def photometric_distortion(image: Tensor, brightness_delta: float = 32, contrast: tuple[float, float] = (0.5, 1.5),
                           saturation: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> Tensor:
    """mmseg's ``PhotoMetricDistortion`` on an image ``[3, H, W]`` with values in [0, 255].

    Each step with probability 1/2: brightness (+U(-32, 32)), contrast (x U(0.5, 1.5)) either first or
    last (coin flip), saturation (x U(0.5, 1.5)), hue (+U{-18..18} of OpenCV's 180 hue steps); values are
    clipped to [0, 255] after each step. torchvision's saturation / hue adjustments stand in for mmcv's
    OpenCV HSV conversion.
    """
    def clip(x: Tensor) -> Tensor:
        return x.clamp(0.0, 255.0)

    if _coin(0.5):
        image = clip(image + _uniform(-brightness_delta, brightness_delta))
    contrast_first = _coin(0.5)
    if contrast_first and _coin(0.5):
        image = clip(image * _uniform(*contrast))
    if _coin(0.5):
        image = clip(TF.adjust_saturation(image / 255.0, _uniform(*saturation)) * 255.0)
    if _coin(0.5):
        shift = int(torch.randint(-hue_delta, hue_delta + 1, ()))
        image = clip(TF.adjust_hue(image / 255.0, shift / 180.0) * 255.0)
    if not contrast_first and _coin(0.5):
        image = clip(image * _uniform(*contrast))
    return image


def _normalize(image: Tensor) -> Tensor:
    """[3, H, W] in [0, 255] -> ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1) * 255.0
    return (image - mean) / std


class SegmentationTrainTransform:
    """mmseg's ADE20K training pipeline (see the module docstring). ``label``: ``uint8 [H, W]`` class indices
    after reduce-zero-label (255 = ignore). Returns a normalised image ``[3, c, c]`` and a label ``int64 [c, c]``.
    """

    def __init__(self, crop_size: int = 512, scale: tuple[int, int] = (2048, 512),
                 ratio_range: tuple[float, float] = (0.5, 2.0), cat_max_ratio: float = 0.75, flip_prob: float = 0.5,
                 photometric: bool = True, ignore_index: int = IGNORE_INDEX) -> None:
        if crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {crop_size}")
        if not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must be 0 < low <= high, got {ratio_range}")
        self.crop_size = crop_size
        self.scale = scale
        self.ratio_range = ratio_range
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.photometric = photometric
        self.ignore_index = ignore_index

    def _crop_box(self, height: int, width: int) -> tuple[int, int]:
        top = int(torch.randint(0, max(height - self.crop_size, 0) + 1, ()))
        left = int(torch.randint(0, max(width - self.crop_size, 0) + 1, ()))
        return top, left

    def __call__(self, image: Image.Image, label: np.ndarray) -> tuple[Tensor, Tensor]:
        ratio = _uniform(*self.ratio_range)
        width, height = rescale_size(image.width, image.height, [s * ratio for s in self.scale])
        image = image.resize((width, height), Image.BILINEAR)
        label = np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST))  # [h, w]
        c = self.crop_size
        top, left = self._crop_box(height, width)
        if self.cat_max_ratio < 1.0:  # mmseg RandomCrop: re-draw while one class dominates the crop
            for _ in range(10):
                values, counts = np.unique(label[top:top + c, left:left + c], return_counts=True)
                counts = counts[values != self.ignore_index]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                top, left = self._crop_box(height, width)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)[top:top + c, left:left + c].copy())
        pixels = pixels.permute(2, 0, 1)  # [3, h, w] in [0, 255]
        target = torch.from_numpy(label[top:top + c, left:left + c].astype(np.int64))  # [h, w]
        if _coin(self.flip_prob):
            pixels, target = pixels.flip(-1), target.flip(-1)
        if self.photometric:
            pixels = photometric_distortion(pixels)
        pixels = _normalize(pixels)
        pad_h, pad_w = c - pixels.shape[1], c - pixels.shape[2]  # images smaller than the crop are padded
        if pad_h > 0 or pad_w > 0:
            pixels = torch.nn.functional.pad(pixels, (0, pad_w, 0, pad_h), value=0.0)
            target = torch.nn.functional.pad(target, (0, pad_w, 0, pad_h), value=self.ignore_index)
        return pixels, target


class SegmentationEvalTransform:
    """Resize the image to the (2048, 512) scale (aspect ratio kept) and normalise; the label stays as it is,
    so metrics are counted at the original resolution (mmseg's test pipeline)."""

    def __init__(self, scale: tuple[int, int] | None = (2048, 512)) -> None:
        self.scale = scale

    def __call__(self, image: Image.Image, label: np.ndarray) -> tuple[Tensor, Tensor]:
        if self.scale is not None:
            image = image.resize(rescale_size(image.width, image.height, self.scale), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
        return _normalize(pixels), torch.from_numpy(label.astype(np.int64))
