"""Multi-view transforms: one decoded PIL image in, a dict of tensors out.

Every transform here is a picklable callable ``t(img) -> dict[str, Tensor]`` returning at least
``"views": Tensor[V, 3, S, S]`` (float, normalised). Extra keys (``"mask"``, ``"teacher_views"``,
``"block_ids"``) are tensors too, so torch's ``default_collate`` stacks a batch into ``[B, ...]``.
All randomness comes from torch's RNG (torchvision's random transforms use it), so
``torch.manual_seed`` makes a transform reproducible and each DataLoader worker, which torch seeds
differently, draws different views.

* :func:`simsiam_view` -- SimSiam / MoCo v2 view (Chen & He 2021, §A; Chen et al. 2020).
* :func:`byol_view`, :func:`mocov3_transform` -- MoCo v3's asymmetric views (Chen et al. 2021, §A).
* :class:`MVPTransform` -- BEiT-style crop shared by student and CLIP teacher, block-wise mask (MVP §3).
* :class:`HVPTransform` -- two RandAugment views and a SimMIM mask (HVP-MTL §3.1).

Speed. The SimSiam / MoCo / BYOL views are :class:`ViewPipeline` s: the torchvision ``Compose`` of the recipe,
run in two phases. :meth:`ViewPipeline.sample` draws every random parameter exactly as the ``Compose`` would, in
the same order, so a seed gives the same view; :meth:`ViewPipeline.render` then draws the pixels, with the
Gaussian blur of the reference code (PIL's filter, :class:`PILGaussianBlur`; ``blur="kernel"`` gives SimCLR's
23 x 23 kernel at 224 px as two 1-D passes, :func:`gaussian_blur_separable`, a twentieth of the cost of
torchvision's 2-D convolution), ``ToTensor`` + ``Normalize`` and the hue shift through lookup tables. Because the
parameters exist before the pixels, :class:`MultiViewTransform` and
:class:`~ssl_zoo.augment.blocks.BlockwiseAugmentation` accept an undecoded image (``accepts_encoded``; an
:class:`~ssl_zoo.data.io.EncodedImage`): they sample all views' crops from its header size, decode the JPEG once
at the smallest scale (1/2, 1/4 or 1/8, libjpeg's DCT scaling) that leaves every crop at least as large as its
output, and crop from that, so the views equal those of a full decode up to resampling.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image, ImageFilter, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import rand_augment_transform
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from ssl_zoo.augment.masking import BEiTMaskGenerator, BlockwiseMaskGenerator, RandomPatchMaskGenerator

__all__ = [
    "JPEG_REDUCTIONS",
    "PILGaussianBlur",
    "SeparableGaussianBlur",
    "ViewPipeline",
    "gaussian_blur_separable",
    "largest_reduction",
    "HVPTransform",
    "MVPTransform",
    "MultiViewTransform",
    "NORMALIZATIONS",
    "TorchSeeded",
    "TwoViewTransform",
    "blur_kernel_size",
    "blur_step",
    "byol_view",
    "mocov2_transform",
    "mocov3_transform",
    "normalize_transform",
    "simsiam_view",
]

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


def blur_kernel_size(size: int) -> int:
    """Odd Gaussian-blur kernel of about 10% of the view side (SimCLR §B.9: 23 px for 224 px)."""
    kernel = max(int(0.1 * size), 3)
    return kernel if kernel % 2 else kernel + 1


def _check_size(size: int, name: str = "size") -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{name} must be a positive integer (pixels), got {size!r}")


def _check_scale(min_scale: float) -> None:
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f"min_scale must lie in (0, 1], got {min_scale}")


def _as_rgb(img: Image.Image) -> Image.Image:
    """Grey-scale, palette and RGBA images become RGB, so every view has 3 channels."""
    return img if not isinstance(img, Image.Image) or img.mode == "RGB" else img.convert("RGB")


def _is_encoded(img) -> bool:
    """An undecoded image (``ssl_zoo.data.io.EncodedImage``: ``size``, ``format``, ``decode(reduce)``)."""
    return not isinstance(img, Image.Image) and callable(getattr(img, "decode", None)) and hasattr(img, "size")


# ----------------------------------------------------------------------------------------- separable blur
def _gaussian_kernel1d(kernel_size: int, sigma: float) -> Tensor:
    """torchvision's 1-D Gaussian kernel (``_get_gaussian_kernel1d``), float32, summing to 1."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return pdf / pdf.sum()


@functools.lru_cache(maxsize=64)
def _reflect_taps(length: int, kernel_size: int) -> np.ndarray:
    """Flat positions ``row * length + column`` of every tap of a ``[length, length]`` 1-D blur matrix with
    reflect padding folded in: row ``i`` holds the kernel centred on ``i``; a tap outside ``[0, length)`` lands
    on the pixel it mirrors onto (``torch.nn.functional.pad(mode="reflect")``: ``-k -> k``,
    ``length-1+k -> length-1-k``)."""
    pad = kernel_size // 2
    if pad >= length:
        raise ValueError(f"a blur kernel of {kernel_size} needs images larger than {pad} pixels, got {length}")
    rows = np.repeat(np.arange(length), kernel_size)
    cols = rows + np.tile(np.arange(kernel_size), length) - pad
    cols = np.where(cols < 0, -cols, cols)
    cols = np.where(cols >= length, 2 * (length - 1) - cols, cols)
    return rows * length + cols


def _blur_matrix(length: int, kernel_size: int, sigma: float) -> Tensor:
    """``[length, length]`` matrix of a 1-D Gaussian blur with reflect padding: ``out = A @ x``."""
    kernel = _gaussian_kernel1d(kernel_size, sigma).numpy()
    flat = np.bincount(_reflect_taps(length, kernel_size), weights=np.tile(kernel, length), minlength=length * length)
    return torch.from_numpy(flat.astype(np.float32).reshape(length, length))


def _banded_matmul(matrix: Tensor, x: Tensor, half_width: int, block: int = 32) -> Tensor:
    """``matrix @ x`` for a matrix whose rows are zero beyond ``half_width`` of the diagonal (plus the reflected
    taps, which stay inside the same window): row blocks times the column window they touch."""
    length = matrix.shape[0]
    out = torch.empty(length, x.shape[1])
    for r0 in range(0, length, block):
        r1 = min(length, r0 + block)
        c0, c1 = max(0, r0 - half_width), min(length, r1 + half_width)
        torch.mm(matrix[r0:r1, c0:c1], x[c0:c1], out=out[r0:r1])
    return out


def gaussian_blur_separable(img: Image.Image, kernel_size: Sequence[int], sigma: float) -> Image.Image:
    """torchvision's ``F.gaussian_blur`` of a PIL image (same kernel, reflect padding, rounding), computed as a
    vertical then a horizontal 1-D pass (banded matrix products) instead of one 2-D convolution.

    The 2-D kernel torchvision convolves with is the outer product of the two 1-D kernels, so the passes give
    the same sums in another order: a pixel differs by 1 (of 255) in about 1e-5 of the cases (float rounding).

    Args:
        img: RGB or L image.
        kernel_size: ``(kx, ky)``, odd, as ``T.GaussianBlur.kernel_size``.
        sigma: the standard deviation (both directions).
    """
    kx, ky = kernel_size
    pixels = np.asarray(img)  # [H, W] or [H, W, C] uint8
    height, width = pixels.shape[:2]
    flat = torch.from_numpy(pixels.reshape(height, -1).astype(np.float32))  # [H, W*C]
    vertical = _blur_matrix(height, ky, sigma)
    flat = _banded_matmul(vertical, flat, ky // 2)  # vertical pass
    across = flat.reshape(height, width, -1).transpose(0, 1).reshape(width, -1)  # [W, H*C]
    horizontal = vertical if (width, kx) == (height, ky) else _blur_matrix(width, kx, sigma)  # square views: one
    across = _banded_matmul(horizontal, across, kx // 2)  # horizontal pass
    out = across.reshape(width, height, -1).transpose(0, 1).round_().clamp_(0, 255).to(torch.uint8)
    return Image.fromarray(out.reshape(pixels.shape).numpy(), mode=img.mode)


class SeparableGaussianBlur(T.GaussianBlur):
    """``T.GaussianBlur`` (same parameters, same sigma draw) computed by :func:`gaussian_blur_separable` on PIL
    images; tensors take torchvision's path."""

    def forward(self, img):
        if not isinstance(img, Image.Image):
            return super().forward(img)
        sigma = self.get_params(self.sigma[0], self.sigma[1])
        return gaussian_blur_separable(img, self.kernel_size, sigma)


class PILGaussianBlur(T.GaussianBlur):
    """The blur of SimSiam's, MoCo v2's and MoCo v3's reference code: PIL's ``ImageFilter.GaussianBlur`` with
    ``radius = sigma``, sigma uniform in ``sigma`` (drawn from torch's RNG as ``T.GaussianBlur`` draws it).

    Their ``loader.py`` (``GaussianBlur``: ``x.filter(ImageFilter.GaussianBlur(radius=sigma))``, sigma in
    [0.1, 2.0]) has no kernel size: PIL approximates the Gaussian by three box filters of matching variance, an
    O(1)-per-pixel filter. lightly's transforms use the same filter. The 23 px kernel of SimCLR / BYOL
    (``blur="kernel"``, :class:`SeparableGaussianBlur`) is the other reading; ``kernel_size`` is kept for it
    and for tensor inputs, which take torchvision's path.
    """

    def forward(self, img):
        if not isinstance(img, Image.Image):
            return super().forward(img)
        sigma = self.get_params(self.sigma[0], self.sigma[1])
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))


BlurKind = Literal["pil", "kernel"]


def blur_step(size: int, blur: BlurKind = "pil", sigma: tuple[float, float] = (0.1, 2.0)) -> T.GaussianBlur:
    """The Gaussian blur of a view of ``size`` px: PIL's (``pil``, the reference code of SimSiam / MoCo) or the
    ~10 % kernel of SimCLR / BYOL computed separably (``kernel``)."""
    if blur == "pil":
        return PILGaussianBlur(blur_kernel_size(size), sigma=sigma)
    if blur == "kernel":
        return SeparableGaussianBlur(blur_kernel_size(size), sigma=sigma)
    raise ValueError(f"blur must be 'pil' or 'kernel', got {blur!r}")


def _adjust_hue(img: Image.Image, hue_factor: float) -> Image.Image:
    """torchvision's PIL ``adjust_hue`` with the hue channel shifted by a lookup table (identical result)."""
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor ({hue_factor}) is not in [-0.5, 0.5].")
    if img.mode in {"L", "1", "I", "F"}:
        return img
    h, s, v = img.convert("HSV").split()
    # the same wrapping uint8 shift as torchvision's np.array(hue_factor * 255).astype(np.uint8)
    with np.errstate(over="ignore", invalid="ignore"):
        shift = int(np.array(hue_factor * 255).astype(np.uint8))
    h = h.point([(value + shift) % 256 for value in range(256)])
    return Image.merge("HSV", (h, s, v)).convert(img.mode)


_COLOR_OPS: tuple[Callable[[Image.Image, float], Image.Image], ...] = (
    F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, _adjust_hue)

#: JPEG DCT scaling factors (libjpeg decodes at 1/1, 1/2, 1/4 or 1/8 of the stored size).
JPEG_REDUCTIONS = (1, 2, 4, 8)


def largest_reduction(image_size: tuple[int, int], smallest_crop_side: float, output_side: int) -> int:
    """The largest JPEG reduction (1, 2, 4 or 8) under which a crop of ``smallest_crop_side`` pixels (of the
    full-size image) still has at least ``output_side`` pixels: every view is then only ever downsampled."""
    best = 1
    for reduce in JPEG_REDUCTIONS[1:]:
        if smallest_crop_side / reduce >= output_side and min(image_size) // reduce >= 1:
            best = reduce
    return best


class ViewPipeline(T.Compose):
    """A torchvision ``Compose`` of one view's recipe, run in two phases (same result, faster).

    ``sample(width, height)`` draws the random parameters of every step from torch's RNG exactly as the
    steps' own ``forward`` would, in the same order; ``render(img, params)`` then applies them without drawing:
    the crop and colour operations are torchvision's PIL functions, the blur :func:`gaussian_blur_separable`,
    the hue shift a lookup table. So ``view(img)`` under a seed equals ``T.Compose(view.transforms)(img)``
    under the same seed (up to the blur's float rounding), and the crops of several views can be known before
    the image is decoded.

    Steps: ``RandomResizedCrop`` (first), ``RandomApply([ColorJitter])``, ``RandomApply([GaussianBlur])``,
    ``RandomGrayscale``, ``RandomSolarize``, ``RandomHorizontalFlip``, ``ToTensor`` / ``PILToTensor``, ``Normalize``.
    """

    _SUPPORTED = (T.RandomApply, T.ColorJitter, T.GaussianBlur, T.RandomGrayscale, T.RandomSolarize,
                  T.RandomHorizontalFlip, T.ToTensor, T.PILToTensor, T.Normalize)

    def __init__(self, transforms: Sequence[Callable]) -> None:
        super().__init__(list(transforms))
        if not self.transforms or not isinstance(self.transforms[0], T.RandomResizedCrop):
            raise TypeError("a ViewPipeline starts with RandomResizedCrop")
        for step in self.transforms[1:]:
            inner = step.transforms if isinstance(step, T.RandomApply) else [step]
            if not isinstance(step, self._SUPPORTED) or len(inner) != 1 or not isinstance(inner[0], self._SUPPORTED):
                raise TypeError(f"ViewPipeline cannot run {step!r}")
        crop = self.transforms[0]
        self.output_side = min(crop.size) if isinstance(crop.size, Sequence) else int(crop.size)
        self._normalize_lut = None
        if len(self.transforms) >= 2 and isinstance(self.transforms[-2], T.ToTensor) and \
                isinstance(self.transforms[-1], T.Normalize):
            # ToTensor then Normalize map a uint8 value v of channel c to ((v / 255) - mean_c) / std_c, computed
            # here with the same float32 operations for all 256 values: a table lookup gives the same bits.
            mean = torch.as_tensor(self.transforms[-1].mean, dtype=torch.float32)[:, None]
            std = torch.as_tensor(self.transforms[-1].std, dtype=torch.float32)[:, None]
            self._normalize_lut = torch.arange(256, dtype=torch.float32).div(255).sub(mean).div(std).numpy()  # [C, 256]

    def sample(self, width: int, height: int) -> list:
        """Every step's parameters for a ``width x height`` image (the crop's ``(top, left, h, w)`` first)."""
        proxy = torch.zeros(()).expand(1, height, width)  # only its size is read (F.get_dimensions)
        crop = self.transforms[0]
        params: list = [crop.get_params(proxy, crop.scale, crop.ratio)]
        for step in self.transforms[1:]:
            if isinstance(step, T.RandomApply):
                if step.p < torch.rand(1):  # RandomApply.forward
                    params.append(None)
                    continue
                params.append(self._draw(step.transforms[0]))
            else:
                params.append(self._draw(step))
        return params

    @staticmethod
    def _draw(step):
        if isinstance(step, T.ColorJitter):
            return step.get_params(step.brightness, step.contrast, step.saturation, step.hue)
        if isinstance(step, T.GaussianBlur):
            return step.get_params(step.sigma[0], step.sigma[1])
        if isinstance(step, T.RandomGrayscale | T.RandomHorizontalFlip):
            return bool(torch.rand(1) < step.p)
        if isinstance(step, T.RandomSolarize):
            return torch.rand(1).item() < step.p
        return None  # ToTensor, Normalize: deterministic

    def render(self, img: Image.Image, params: list, offset: tuple[int, int] = (0, 0),
               scale: tuple[float, float] | None = None) -> Tensor:
        """The view of ``img`` with ``params`` from :meth:`sample`.

        Args:
            img: the RGB image the crop is taken from.
            params: from :meth:`sample` (crop coordinates relative to the region it was sampled on).
            offset: ``(left, top)`` of that region in ``img``'s full-size coordinates (BAM's blocks).
            scale: ``img``'s size over the full size the crop was sampled on, per axis, when ``img`` was
                decoded at reduced scale; the crop is then resampled from the matching sub-pixel box.
        """
        crop = self.transforms[0]
        top, left, h, w = params[0]
        left, top = left + offset[0], top + offset[1]
        if scale is None:
            out = F.resized_crop(img, top, left, h, w, crop.size, crop.interpolation, antialias=crop.antialias)
        else:
            sx, sy = scale
            size = crop.size if isinstance(crop.size, Sequence) else (crop.size, crop.size)
            resample = F.pil_modes_mapping[crop.interpolation]
            out = img.resize((size[1], size[0]), resample, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
        steps = list(zip(self.transforms[1:], params[1:], strict=True))
        if self._normalize_lut is not None:
            steps = steps[:-2]
        for step, p in steps:
            if isinstance(step, T.RandomApply):
                if p is None:
                    continue
                step = step.transforms[0]
            out = self._apply(step, p, out)
        if self._normalize_lut is not None:  # ToTensor + Normalize in one lookup per channel
            pixels = np.asarray(out)  # [S, S, C] uint8
            tensor = np.empty((pixels.shape[2], *pixels.shape[:2]), dtype=np.float32)  # [C, S, S]
            for c in range(pixels.shape[2]):
                np.take(self._normalize_lut[c], pixels[..., c], out=tensor[c])
            return torch.from_numpy(tensor)
        return out

    @staticmethod
    def _apply(step, p, img):
        if isinstance(step, T.ColorJitter):
            fn_idx, *factors = p
            for fn_id in fn_idx.tolist():
                if factors[fn_id] is not None:
                    img = _COLOR_OPS[fn_id](img, factors[fn_id])
            return img
        if isinstance(step, PILGaussianBlur):
            return img.filter(ImageFilter.GaussianBlur(radius=p))
        if isinstance(step, T.GaussianBlur):
            return gaussian_blur_separable(img, step.kernel_size, p)
        if isinstance(step, T.RandomGrayscale):
            return F.rgb_to_grayscale(img, num_output_channels=F.get_dimensions(img)[0]) if p else img
        if isinstance(step, T.RandomSolarize):
            return F.solarize(img, step.threshold) if p else img
        if isinstance(step, T.RandomHorizontalFlip):
            return F.hflip(img) if p else img
        return step(img)  # ToTensor, Normalize

    def __call__(self, img: Image.Image) -> Tensor:
        img = _as_rgb(img)
        return self.render(img, self.sample(img.width, img.height))


def simsiam_view(size: int, min_scale: float = 0.2, normalize: Normalization = "imagenet",
                 blur: BlurKind = "pil") -> ViewPipeline:
    """One SimSiam / MoCo v2 view (SimSiam §A, "the same as MoCo v2").

    RandomResizedCrop(scale=(min_scale, 1)), colour jitter (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale
    p=0.2, Gaussian blur (sigma in [0.1, 2.0]; PIL's filter as the reference code, or ``blur="kernel"``: a
    kernel of ~10% of ``size``, see :func:`blur_step`) p=0.5, horizontal flip, then to a normalised float
    tensor ``[3, size, size]``. A :class:`ViewPipeline` (see the module docstring).
    """
    _check_size(size)
    _check_scale(min_scale)
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
    _check_size(size)
    _check_scale(min_scale)
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


def render_views(img, plan: Sequence[tuple[ViewPipeline, tuple[int, int, int | None, int | None]]]) -> list[Tensor]:
    """Views of one image, each ``(pipeline, (left, top, width, height))`` cropping inside that region of the image
    (``None`` width / height: the whole image).

    All parameters are drawn first, region by region in ``plan`` order (the order in which calling each pipeline
    on its region would draw them); an undecoded image is then decoded once, at the largest JPEG reduction that
    keeps every crop at least as large as its output, and every view rendered from it.
    """
    width, height = img.size
    regions = [(left, top, w if w is not None else width, h if h is not None else height)
               for _, (left, top, w, h) in plan]
    params = [pipeline.sample(w, h) for (pipeline, _), (_, _, w, h) in zip(plan, regions, strict=True)]
    scale = None
    if _is_encoded(img):
        reduce = 1
        if img.format == "JPEG":
            smallest = min(min(p[0][2], p[0][3]) / pipeline.output_side
                           for (pipeline, _), p in zip(plan, params, strict=True))
            reduce = largest_reduction((width, height), smallest, 1)
        img = img.decode(reduce)
        if reduce > 1:
            scale = (img.width / width, img.height / height)
    img = _as_rgb(img)
    return [pipeline.render(img, p, offset=(left, top), scale=scale)
            for (pipeline, _), (left, top, _, _), p in zip(plan, regions, params, strict=True)]


class MultiViewTransform:
    """Applies each view transform to the same image: ``{"views": Tensor[V, 3, S, S]}``.

    Args:
        transforms: one callable per view, each PIL image -> ``Tensor[3, S, S]`` (same ``S`` for all).
    """

    def __init__(self, transforms: Sequence[Callable[[Image.Image], Tensor]]) -> None:
        if len(transforms) == 0:
            raise ValueError("transforms must contain at least one view transform")
        self.transforms = list(transforms)

    #: takes an undecoded image too (see the module docstring); the data readers then hand it the file's bytes
    accepts_encoded = True

    def __call__(self, img) -> dict[str, Tensor]:
        if all(isinstance(t, ViewPipeline) for t in self.transforms):
            return {"views": torch.stack(render_views(img, [(t, (0, 0, None, None)) for t in self.transforms]))}
        img = _as_rgb(img.decode() if _is_encoded(img) else img)
        return {"views": torch.stack([transform(img) for transform in self.transforms])}  # [V, 3, S, S]

    def __repr__(self) -> str:
        body = "".join(f"\n  {t!r}".replace("\n", "\n  ") for t in self.transforms)
        return f"{type(self).__name__}({body}\n)"


class TwoViewTransform(MultiViewTransform):
    """Two views of one image: ``{"views": Tensor[2, 3, S, S]}``.

    Args:
        view1: transform of the first view.
        view2: transform of the second view; ``None`` reuses ``view1`` (symmetric methods).
    """

    def __init__(
        self, view1: Callable[[Image.Image], Tensor], view2: Callable[[Image.Image], Tensor] | None = None
    ) -> None:
        super().__init__([view1, view1 if view2 is None else view2])


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
        _check_size(size)
        _check_size(patch_size, "patch_size")
        _check_scale(min_scale)
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
        pixels = self.geometric(_as_rgb(img))  # [3, S, S] in [0, 1], shared by student and teacher
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
        _check_size(size)
        _check_size(mask_patch_size, "mask_patch_size")
        _check_size(model_patch_size, "model_patch_size")
        _check_scale(min_scale)
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
        img = _as_rgb(img)
        return {
            "views": torch.stack([self.view(img), self.view(img)]),  # [2, 3, S, S]
            "mask": self.mask_generator(),  # [G, G] bool, for view 0
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(\n  {self.view!r},\n  {self.mask_generator!r}\n)"
