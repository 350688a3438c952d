"""The papers' view recipes, each a transform ``t(img) -> dict[str, Tensor]`` (see :mod:`ssl_zoo.augment.views`).

* :func:`simsiam_view`, :func:`mocov2_transform` -- SimSiam / MoCo v2 views (Chen & He 2021, §A; Chen et al. 2020).
* :func:`byol_view`, :func:`mocov3_transform` -- MoCo v3's asymmetric views (Chen et al. 2021, §A).
* :class:`MVPTransform` -- BEiT-style crop shared by student and CLIP teacher, block-wise mask (MVP §3).
* :class:`HVPTransform` -- two RandAugment views and a SimMIM mask (HVP-MTL §3.1).

The SimSiam / MoCo / BYOL views are :class:`~ssl_zoo.augment.views.ViewPipeline` s, the fast two-phase pipeline.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data.auto_augment import rand_augment_transform
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ssl_zoo.augment.masking import BEiTMaskGenerator, BlockwiseMaskGenerator, RandomPatchMaskGenerator
from ssl_zoo.augment.normalize import Normalization, normalize_transform
from ssl_zoo.augment.views import (
    BlurKind,
    TwoViewTransform,
    ViewPipeline,
    as_rgb,
    blur_step,
    check_min_scale,
    check_pixels,
)

__all__ = [
    "MASK_SAMPLERS",
    "HVPTransform",
    "MVPTransform",
    "TorchSeeded",
    "byol_view",
    "mocov2_transform",
    "mocov3_transform",
    "safe_posterize",
    "simsiam_view",
]


def simsiam_view(size: int, min_scale: float = 0.2, normalize: Normalization = "imagenet",
                 blur: BlurKind = "pil") -> ViewPipeline:
    """One SimSiam / MoCo v2 view (SimSiam §A, "the same as MoCo v2").

    RandomResizedCrop(scale=(min_scale, 1)), colour jitter (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale
    p=0.2, Gaussian blur (sigma in [0.1, 2.0]; PIL's filter as the reference code, or ``blur="kernel"``: a
    kernel of ~10% of ``size``, see :func:`blur_step`) p=0.5, horizontal flip, then to a normalised float
    tensor ``[3, size, size]``. A :class:`ViewPipeline` (see the module docstring).
    """
    check_pixels(size)
    check_min_scale(min_scale)
    return ViewPipeline(
        [
            T.RandomResizedCrop(size, scale=(min_scale, 1.0)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([blur_step(size, blur)], p=0.5),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            normalize_transform(normalize),
        ]
    )


def byol_view(
    size: int,
    min_scale: float = 0.08,
    blur_p: float = 1.0,
    solarize_p: float = 0.0,
    normalize: Normalization = "imagenet",
    blur: BlurKind = "pil",
) -> ViewPipeline:
    """One view of the BYOL / MoCo v3 family (MoCo v3 §A: BYOL's augmentation).

    RandomResizedCrop(scale=(min_scale, 1)), colour jitter (0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale
    p=0.2, Gaussian blur with probability ``blur_p`` (PIL's filter as MoCo v3's code, or ``blur="kernel"``,
    see :func:`blur_step`), solarisation (threshold 128) with probability
    ``solarize_p``, horizontal flip, normalised tensor ``[3, size, size]``. A :class:`ViewPipeline`.
    """
    check_pixels(size)
    check_min_scale(min_scale)
    for name, p in (("blur_p", blur_p), ("solarize_p", solarize_p)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {p}")
    return ViewPipeline(
        [
            T.RandomResizedCrop(size, scale=(min_scale, 1.0)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([blur_step(size, blur)], p=blur_p),
            T.RandomSolarize(threshold=128, p=solarize_p),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            normalize_transform(normalize),
        ]
    )



def mocov2_transform(
    size: int = 224, min_scale: float = 0.2, normalize: Normalization = "imagenet", blur: BlurKind = "pil"
) -> TwoViewTransform:
    """MoCo v2's two symmetric views (Chen et al. 2020, "MoCo v2"), the SimSiam family."""
    return TwoViewTransform(simsiam_view(size, min_scale=min_scale, normalize=normalize, blur=blur))


def mocov3_transform(
    size: int = 224, min_scale: float = 0.08, normalize: Normalization = "imagenet", blur: BlurKind = "pil"
) -> TwoViewTransform:
    """MoCo v3's asymmetric views (MoCo v3 §A, BYOL Table 6).

    View 1 is always blurred and never solarised; view 2 is blurred with p=0.1 and solarised with p=0.2.
    """
    return TwoViewTransform(
        byol_view(size, min_scale=min_scale, blur_p=1.0, solarize_p=0.0, normalize=normalize, blur=blur),
        byol_view(size, min_scale=min_scale, blur_p=0.1, solarize_p=0.2, normalize=normalize, blur=blur),
    )


#: MVP's block-wise mask samplers by name (``MVPTransform(mask_sampling=...)``).
MASK_SAMPLERS = {"exact": BlockwiseMaskGenerator, "beit": BEiTMaskGenerator}


class MVPTransform:
    """MVP's input pipeline (MVP §3.2, following BEiT §2.5 / its data pipeline).

    One random resized crop and horizontal flip are drawn *once*; the same pixels are then normalised
    twice -- with ImageNet statistics for the student ViT and with CLIP's statistics for the frozen
    CLIP teacher -- so student token ``m`` and teacher token ``m`` look at the same image patch.
    A block-wise mask on the ``(size / patch_size)^2`` patch grid says which student tokens are masked.

    Returns ``{"views": Tensor[1, 3, S, S], "teacher_views": Tensor[1, 3, S, S],
    "mask": BoolTensor[S/p, S/p]}``.

    Args:
        size: crop side in pixels (224).
        patch_size: ViT patch side (16); must divide ``size``.
        num_masking_patches: patches masked per image (75 of 196 in BEiT and MVP).
        min_num_patches: smallest masked rectangle, in patches (16).
        min_scale: lower bound of the crop's area fraction (0.08, BEiT).
        color_jitter: ColorJitter strength for brightness, contrast and saturation applied before the
            crop (BEiT uses 0.4); 0 disables it. Both views see the same jitter.
        mask_sampling: ``exact`` (:class:`~ssl_zoo.augment.BlockwiseMaskGenerator`: every mask has exactly
            ``num_masking_patches`` patches) or ``beit`` (:class:`~ssl_zoo.augment.BEiTMaskGenerator`, BEiT's
            own sampler: at most that many, small last rectangles, gives up after 10 failed draws).
    """

    def __init__(
        self,
        size: int = 224,
        patch_size: int = 16,
        num_masking_patches: int = 75,
        min_num_patches: int = 16,
        min_scale: float = 0.08,
        color_jitter: float = 0.0,
        mask_sampling: Literal["exact", "beit"] = "exact",
    ) -> None:
        check_pixels(size)
        check_pixels(patch_size, "patch_size")
        check_min_scale(min_scale)
        if size % patch_size:
            raise ValueError(f"size={size} must be divisible by patch_size={patch_size}")
        if color_jitter < 0:
            raise ValueError(f"color_jitter must be >= 0, got {color_jitter}")
        if mask_sampling not in MASK_SAMPLERS:
            raise ValueError(f"mask_sampling must be one of {sorted(MASK_SAMPLERS)}, got {mask_sampling!r}")
        grid = size // patch_size
        jitter = [T.ColorJitter(color_jitter, color_jitter, color_jitter)] if color_jitter > 0 else []
        # BEiT crops with bicubic interpolation for the 224 px input.
        self.geometric = T.Compose(
            [
                *jitter,
                T.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
            ]
        )
        self.student_normalize = normalize_transform("imagenet")
        self.teacher_normalize = normalize_transform("clip")
        self.mask_generator = MASK_SAMPLERS[mask_sampling](
            input_size=(grid, grid), num_masking_patches=num_masking_patches, min_num_patches=min_num_patches
        )

    def __call__(self, img: Image.Image) -> dict[str, Tensor]:
        pixels = self.geometric(as_rgb(img))  # [3, S, S] in [0, 1], shared by student and teacher
        return {
            "views": self.student_normalize(pixels)[None],  # [1, 3, S, S]
            "teacher_views": self.teacher_normalize(pixels)[None],  # [1, 3, S, S]
            "mask": self.mask_generator(),  # [S/p, S/p] bool
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(\n  {self.geometric!r},\n  {self.mask_generator!r}\n)"


class TorchSeeded:
    """Runs a transform that draws from Python's ``random`` and NumPy's global RNG (timm's
    RandAugment does) with both seeded from torch's RNG.

    This makes the transform follow ``torch.manual_seed`` and the per-worker torch seed of a
    DataLoader like the torchvision transforms around it. The previous global states are restored
    afterwards, so the call has no effect on other users of ``random`` / ``np.random``.
    """

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, img: Image.Image) -> Image.Image:
        seed = int(torch.randint(0, 2**32, (1,), dtype=torch.int64))
        python_state, numpy_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            return self.transform(img)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


def _posterize_keep_zero_bits(img: Image.Image, bits_to_keep: int, **_kwargs) -> Image.Image:
    """timm's posterize, extended to 0 bits (all black), which Pillow >= 13 refuses.

    timm's ``PosterizeIncreasing`` asks for 0 bits at magnitude 10; older Pillow returned a black image
    there, which is what the RandAugment policy intends.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def safe_posterize(randaugment: Callable) -> Callable:
    """Route the posterize ops of a timm RandAugment through :func:`_posterize_keep_zero_bits`."""
    for op in getattr(randaugment, "ops", []):
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize_keep_zero_bits
    return randaugment


class HVPTransform:
    """HVP-MTL's input pipeline (HVP-MTL §3.1): two views and a SimMIM mask for the first.

    Each view: RandomResizedCrop (bicubic), horizontal flip, timm RandAugment, colour jitter, random
    rotation, normalised tensor. The mask is drawn on the model's patch grid ``S / model_patch_size``
    with :class:`RandomPatchMaskGenerator`; the method applies it to view 0 only (the MIM branch).

    Returns ``{"views": Tensor[2, 3, S, S], "mask": BoolTensor[G, G]}`` with ``G = S / model_patch_size``.

    Args:
        size: view side in pixels (224).
        model_patch_size: patch-embedding stride of the backbone (4 for Swin, 16 for ViT-B/16).
        mask_patch_size: side of one SimMIM mask patch in pixels (32).
        mask_ratio: fraction of mask patches masked (0.6).
        randaugment: timm RandAugment config string (``rand-m9-mstd0.5-inc1``); ``None`` or ``""`` disables it.
        color_jitter: ColorJitter strength for brightness, contrast and saturation (0.4); 0 disables it.
        rotation: maximum rotation in degrees (10); 0 disables it.
        min_scale: lower bound of the crop's area fraction (0.08, timm's default).
        normalize: normalisation statistics of the student input.
    """

    def __init__(
        self,
        size: int = 224,
        model_patch_size: int = 4,
        mask_patch_size: int = 32,
        mask_ratio: float = 0.6,
        randaugment: str | None = "rand-m9-mstd0.5-inc1",
        color_jitter: float = 0.4,
        rotation: float = 10.0,
        min_scale: float = 0.08,
        normalize: Normalization = "imagenet",
    ) -> None:
        check_pixels(size)
        check_pixels(mask_patch_size, "mask_patch_size")
        check_pixels(model_patch_size, "model_patch_size")
        check_min_scale(min_scale)
        if size % mask_patch_size:
            raise ValueError(f"size={size} must be divisible by mask_patch_size={mask_patch_size}")
        if mask_patch_size % model_patch_size:
            raise ValueError(
                f"mask_patch_size={mask_patch_size} must be divisible by model_patch_size={model_patch_size}"
            )
        if color_jitter < 0:
            raise ValueError(f"color_jitter must be >= 0, got {color_jitter}")
        if rotation < 0:
            raise ValueError(f"rotation must be >= 0 (degrees), got {rotation}")
        norm = normalize_transform(normalize)  # validates ``normalize``
        fill = tuple(min(255, round(255 * m)) for m in norm.mean)  # the mean colour: ~0 after normalisation

        steps: list[Callable] = [
            T.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
        ]
        if randaugment:
            # The hyper-parameters timm's create_transform passes: translation up to 45% of the side,
            # the mean colour for pixels shifted in, bicubic resampling.
            hparams = {
                "translate_const": int(size * 0.45),
                "img_mean": fill,
                "interpolation": Image.Resampling.BICUBIC,
            }
            try:
                steps.append(TorchSeeded(safe_posterize(rand_augment_transform(randaugment, hparams))))
            except (AssertionError, KeyError, ValueError) as error:
                raise ValueError(
                    f"randaugment: invalid timm RandAugment config {randaugment!r} ({error})"
                ) from None
        if color_jitter > 0:
            steps.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
        if rotation > 0:
            # Corners rotated in are filled with the mean colour, i.e. zeros after normalisation.
            steps.append(
                T.RandomRotation(rotation, interpolation=InterpolationMode.BILINEAR, fill=list(fill))
            )
        steps += [T.ToTensor(), norm]
        self.view = T.Compose(steps)
        self.mask_generator = RandomPatchMaskGenerator(
            input_size=size,
            mask_patch_size=mask_patch_size,
            model_patch_size=model_patch_size,
            mask_ratio=mask_ratio,
        )

    def __call__(self, img: Image.Image) -> dict[str, Tensor]:
        img = as_rgb(img)
        return {
            "views": torch.stack([self.view(img), self.view(img)]),  # [2, 3, S, S]
            "mask": self.mask_generator(),  # [G, G] bool, for view 0
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(\n  {self.view!r},\n  {self.mask_generator!r}\n)"
