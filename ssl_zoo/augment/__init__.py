"""View transforms and mask generators.

Transforms take one decoded PIL image (the SimSiam / MoCo / BAM ones also an undecoded
:class:`~ssl_zoo.data.io.EncodedImage`, see :mod:`ssl_zoo.augment.views`) and return ``dict[str, Tensor]`` with at least
``"views": Tensor[V, 3, S, S]``; they are pure, picklable and draw from torch's RNG.
"""

from ssl_zoo.augment.blocks import BlockwiseAugmentation, block_boxes, shuffle_pairs
from ssl_zoo.augment.masking import BEiTMaskGenerator, BlockwiseMaskGenerator, RandomPatchMaskGenerator
from ssl_zoo.augment.views import (
    NORMALIZATIONS,
    HVPTransform,
    MultiViewTransform,
    MVPTransform,
    PILGaussianBlur,
    SeparableGaussianBlur,
    TorchSeeded,
    TwoViewTransform,
    ViewPipeline,
    blur_kernel_size,
    blur_step,
    byol_view,
    gaussian_blur_separable,
    mocov2_transform,
    mocov3_transform,
    normalize_transform,
    simsiam_view,
)

__all__ = [
    "NORMALIZATIONS",
    "BEiTMaskGenerator",
    "BlockwiseAugmentation",
    "BlockwiseMaskGenerator",
    "HVPTransform",
    "MVPTransform",
    "MultiViewTransform",
    "PILGaussianBlur",
    "RandomPatchMaskGenerator",
    "SeparableGaussianBlur",
    "ViewPipeline",
    "TorchSeeded",
    "TwoViewTransform",
    "block_boxes",
    "blur_kernel_size",
    "blur_step",
    "byol_view",
    "gaussian_blur_separable",
    "mocov2_transform",
    "mocov3_transform",
    "normalize_transform",
    "shuffle_pairs",
    "simsiam_view",
]
