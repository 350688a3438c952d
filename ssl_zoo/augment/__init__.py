"""View transforms and mask generators.

Transforms take one decoded PIL image (the SimSiam / MoCo / BAM ones also an undecoded
:class:`~ssl_zoo.data.decode.EncodedImage`, see :mod:`ssl_zoo.augment.views`) and return ``dict[str, Tensor]`` with at least
``"views": Tensor[V, 3, S, S]``; they are pure, picklable and draw from torch's RNG.

* :mod:`~ssl_zoo.augment.recipes` -- the papers' views (SimSiam / MoCo v2, MoCo v3, MVP's BEiT crop with its CLIP
  teacher view, HVP-MTL's RandAugment views with a SimMIM mask);
* :mod:`~ssl_zoo.augment.views` -- the fast pipeline they run on (parameters first, one reduced JPEG decode);
* :mod:`~ssl_zoo.augment.blocks` -- BAM's block-wise views; :mod:`~ssl_zoo.augment.masking` -- the mask generators;
* :mod:`~ssl_zoo.augment.normalize` -- the ImageNet and CLIP statistics views are normalised with.
"""

from ssl_zoo.augment.blocks import BlockwiseAugmentation, block_boxes, shuffle_pairs
from ssl_zoo.augment.masking import BEiTMaskGenerator, BlockwiseMaskGenerator, RandomPatchMaskGenerator
from ssl_zoo.augment.normalize import NORMALIZATIONS, Normalization, normalize_transform
from ssl_zoo.augment.recipes import (
    HVPTransform,
    MVPTransform,
    TorchSeeded,
    byol_view,
    mocov2_transform,
    mocov3_transform,
    safe_posterize,
    simsiam_view,
)
from ssl_zoo.augment.views import (
    BlurKind,
    MultiViewTransform,
    PILGaussianBlur,
    SeparableGaussianBlur,
    TwoViewTransform,
    ViewPipeline,
    blur_kernel_size,
    blur_step,
    gaussian_blur_separable,
)

__all__ = [
    "NORMALIZATIONS",
    "BlurKind",
    "Normalization",
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
    "safe_posterize",
    "shuffle_pairs",
    "simsiam_view",
]
