"""The fast view pipeline: one decoded PIL image (or an undecoded one) in, a dict of tensors out.

Every transform here is a picklable callable ``t(img) -> dict[str, Tensor]`` returning at least
``"views": Tensor[V, 3, S, S]`` (float, normalised). Extra keys (``"mask"``, ``"teacher_views"``,
``"block_ids"``) are tensors too, so torch's ``default_collate`` stacks a batch into ``[B, ...]``.
All randomness comes from torch's RNG (torchvision's random transforms use it), so
``torch.manual_seed`` makes a transform reproducible and each DataLoader worker, which torch seeds
differently, draws different views. The papers' recipes built from it are in :mod:`ssl_zoo.augment.recipes`.

Speed. The SimSiam / MoCo / BYOL views are :class:`ViewPipeline` s: the torchvision ``Compose`` of the recipe,
run in two phases. :meth:`ViewPipeline.sample` draws every random parameter exactly as the ``Compose`` would, in
the same order, so a seed gives the same view; :meth:`ViewPipeline.render` then draws the pixels, with the
Gaussian blur of the reference code (PIL's filter, :class:`PILGaussianBlur`; ``blur="kernel"`` gives SimCLR's
23 x 23 kernel at 224 px as two 1-D passes, :func:`gaussian_blur_separable`, a twentieth of the cost of
torchvision's 2-D convolution), ``ToTensor`` + ``Normalize`` and the hue shift through lookup tables. Because the
parameters exist before the pixels, :class:`MultiViewTransform` and
:class:`~ssl_zoo.augment.blocks.BlockwiseAugmentation` accept an undecoded image (``accepts_encoded``; an
:class:`~ssl_zoo.data.decode.EncodedImage`): they sample all views' crops from its header size, decode the JPEG once
at the smallest scale (1/2, 1/4 or 1/8, libjpeg's DCT scaling) that leaves every crop at least as large as its
output, and crop from that, so the views equal those of a full decode up to resampling.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import functional as F

__all__ = [
    "JPEG_REDUCTIONS",
    "BlurKind",
    "MultiViewTransform",
    "PILGaussianBlur",
    "SeparableGaussianBlur",
    "TwoViewTransform",
    "ViewPipeline",
    "as_rgb",
    "blur_kernel_size",
    "blur_step",
    "check_min_scale",
    "check_pixels",
    "gaussian_blur_separable",
    "is_encoded",
    "largest_reduction",
    "render_views",
]


def blur_kernel_size(size: int) -> int:
    """Odd Gaussian-blur kernel of about 10% of the view side (SimCLR §B.9: 23 px for 224 px)."""
    kernel = max(int(0.1 * size), 3)
    return kernel if kernel % 2 else kernel + 1


def check_pixels(size: int, name: str = "size") -> None:
    """Raise ``ValueError`` naming ``name`` unless ``size`` (a side or a patch, in pixels) is a positive int."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{name} must be a positive integer (pixels), got {size!r}")


def check_min_scale(min_scale: float) -> None:
    """Raise ``ValueError`` unless a random resized crop's smallest area fraction lies in (0, 1]."""
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f"min_scale must lie in (0, 1], got {min_scale}")


def as_rgb(img: Image.Image) -> Image.Image:
    """Grey-scale, palette and RGBA images become RGB, so every view has 3 channels."""
    return img if not isinstance(img, Image.Image) or img.mode == "RGB" else img.convert("RGB")


def is_encoded(img) -> bool:
    """An undecoded image (``ssl_zoo.data.decode.EncodedImage``: ``size``, ``format``, ``decode(reduce)``)."""
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
        img = as_rgb(img)
        return self.render(img, self.sample(img.width, img.height))


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
    if is_encoded(img):
        reduce = 1
        if img.format == "JPEG":
            smallest = min(min(p[0][2], p[0][3]) / pipeline.output_side
                           for (pipeline, _), p in zip(plan, params, strict=True))
            reduce = largest_reduction((width, height), smallest, 1)
        img = img.decode(reduce)
        if reduce > 1:
            scale = (img.width / width, img.height / height)
    img = as_rgb(img)
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
        img = as_rgb(img.decode() if is_encoded(img) else img)
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


