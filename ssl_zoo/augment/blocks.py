"""Block-wise Augmentation Module (BAM+IA-CLoss §3.1, "Self-Supervised Contrastive Learning for
Multi-Label Images").

A multi-label image holds several objects, so two random crops of the whole image often show
different ones. BAM splits the image into four overlapping, corner-anchored blocks, each covering
``50% + gamma`` of the width and of the height, and augments every block independently with
SimSiam's pipeline into two views: one image yields 8 views, and the two views of a block are a
positive pair that more likely shows the same content. The order of all pairs in a batch is
shuffled (:func:`shuffle_pairs`) so the four blocks of one image are not always adjacent.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch import Tensor

from ssl_zoo.augment.normalize import Normalization
from ssl_zoo.augment.recipes import simsiam_view
from ssl_zoo.augment.views import (
    BlurKind,
    ViewPipeline,
    as_rgb,
    check_min_scale,
    check_pixels,
    is_encoded,
    render_views,
)

__all__ = ["BlockwiseAugmentation", "block_boxes", "shuffle_pairs"]

Box = tuple[int, int, int, int]


def _check_overlap(overlap: float) -> None:
    if not 0.0 <= overlap <= 0.5:
        raise ValueError(f"overlap (gamma) must lie in [0, 0.5], got {overlap}")


def block_boxes(width: int, height: int, overlap: float = 0.2) -> list[Box]:
    """The four BAM blocks of a ``width x height`` image (BAM §3.1).

    Each block is ``round((0.5 + overlap) * width)`` wide and ``round((0.5 + overlap) * height)`` tall
    (Python's ``round``, halves to even) and anchored at one corner of the image, so neighbouring
    blocks overlap by about ``2 * overlap`` of the side; ``overlap = 0`` gives the four quadrants and
    ``overlap = 0.5`` four copies of the whole image.

    Args:
        width, height: image size in pixels.
        overlap: gamma in [0, 0.5] (0.2 in the paper).

    Returns:
        ``(left, top, right, bottom)`` boxes (PIL ``crop`` convention, right/bottom exclusive) in the
        order top-left, top-right, bottom-left, bottom-right.
    """
    _check_overlap(overlap)
    if isinstance(width, bool) or isinstance(height, bool) or width < 1 or height < 1:
        raise ValueError(f"width and height must be positive, got {width} x {height}")
    block_w = round((0.5 + overlap) * width)
    block_h = round((0.5 + overlap) * height)
    if block_w < 1 or block_h < 1:
        raise ValueError(f"a {width} x {height} image is too small for blocks with overlap={overlap}")
    right, bottom = width - block_w, height - block_h  # left / top edge of the right / bottom blocks
    return [
        (0, 0, block_w, block_h),  # top-left
        (right, 0, width, block_h),  # top-right
        (0, bottom, block_w, height),  # bottom-left
        (right, bottom, width, height),  # bottom-right
    ]


class BlockwiseAugmentation:
    """BAM view transform (BAM §3.1): 4 blocks x 2 SimSiam views per image, or plain SimSiam.

    With ``bam=True`` returns ``{"views": Tensor[8, 3, S, S], "block_ids": LongTensor[8]}`` ordered
    block 0 view 1, block 0 view 2, block 1 view 1, ... so ``block_ids = [0, 0, 1, 1, 2, 2, 3, 3]``
    (blocks in :func:`block_boxes` order). With ``bam=False`` it is SimSiam's transform: two views of
    the whole image and ``block_ids = [0, 0]``.

    Args:
        size: side of every view in pixels (224).
        overlap: gamma, the extra fraction beyond one half that each block covers, in [0, 0.5] (0.2).
        min_scale: lower bound of RandomResizedCrop's area fraction, relative to the block (0.2).
        bam: split into blocks; ``False`` gives SimSiam's two whole-image views.
        normalize: normalisation statistics (``imagenet`` or ``clip``).
        blur: the views' Gaussian blur, see :func:`~ssl_zoo.augment.views.blur_step` (``pil``, the reference code's).
        view_transform: the per-view transform (PIL image -> ``Tensor[3, size, size]``); ``None`` =
            :func:`simsiam_view` with ``size``, ``min_scale``, ``normalize`` and ``blur``. Lets ablations and tests
            swap the augmentation while keeping the block logic.
    """

    def __init__(
        self,
        size: int = 224,
        overlap: float = 0.2,
        min_scale: float = 0.2,
        bam: bool = True,
        normalize: Normalization = "imagenet",
        view_transform: Callable[[Image.Image], Tensor] | None = None,
        blur: BlurKind = "pil",
    ) -> None:
        _check_overlap(overlap)
        check_pixels(size)
        check_min_scale(min_scale)
        self.size = size
        self.overlap = overlap
        self.bam = bam
        self.view_transform = view_transform or simsiam_view(
            size, min_scale=min_scale, normalize=normalize, blur=blur)

    @property
    def num_views(self) -> int:
        return 8 if self.bam else 2

    #: takes an undecoded image too: all 8 crops are drawn first, then the JPEG is decoded once at the scale they
    #: allow (see :mod:`ssl_zoo.augment.views`)
    accepts_encoded = True

    def __call__(self, img) -> dict[str, Tensor]:
        if isinstance(self.view_transform, ViewPipeline) and min(img.size) >= 2:
            # Each view's crop is drawn inside its block and taken from the whole image at the block's offset:
            # the same pixels as cropping the block first, without copying it.
            width, height = img.size
            boxes = block_boxes(width, height, overlap=self.overlap) if self.bam else [(0, 0, width, height)]
            plan = [(self.view_transform, (left, top, right - left, bottom - top))
                    for left, top, right, bottom in boxes for _ in range(2)]
            views = render_views(img, plan)
            return {
                "views": torch.stack(views),  # [8, 3, S, S] (or [2, ...]): block k's pair at rows 2k, 2k+1
                "block_ids": torch.arange(len(boxes)).repeat_interleave(2),  # [8]: 0 0 1 1 2 2 3 3
            }
        img = as_rgb(img.decode() if is_encoded(img) else img)
        if self.bam and min(img.size) < 2:
            # A 1-pixel side has blocks of round(0.5 + gamma) pixels: 0 at gamma = 0. Such images exist in
            # crawled data (tracking pixels, thumbnails); repeating the pixel keeps every block non-empty.
            img = img.resize((max(img.width, 2), max(img.height, 2)), Image.Resampling.NEAREST)
        regions = (
            [img.crop(box) for box in block_boxes(*img.size, overlap=self.overlap)] if self.bam else [img]
        )
        views = [self.view_transform(region) for region in regions for _ in range(2)]
        return {
            "views": torch.stack(views),  # [8, 3, S, S] (or [2, ...]): block k's pair at rows 2k, 2k+1
            "block_ids": torch.arange(len(regions)).repeat_interleave(2),  # [8]: 0 0 1 1 2 2 3 3
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, overlap={self.overlap}, bam={self.bam},\n"
            f"  view_transform={self.view_transform!r}\n)"
        )


def shuffle_pairs(
    views: Tensor, block_ids: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Flattens a batch of view pairs and shuffles the order of the pairs (BAM §3.1).

    Pair ``j`` of image ``b`` is ``(views[b, 2j], views[b, 2j + 1])``. All ``P = B * V / 2`` pairs are
    put in one random order; the two views of a pair stay aligned at the same position of ``view1``
    and ``view2``.

    Args:
        views: ``[B, V, 3, S, S]`` with ``V`` even, as stacked from :class:`BlockwiseAugmentation`.
        block_ids: ``[B, V]``; both views of a pair must carry the same id.
        generator: RNG of the permutation; ``None`` uses torch's global RNG.

    Returns:
        view1: ``[P, 3, S, S]`` first views.
        view2: ``[P, 3, S, S]`` second views, aligned with ``view1``.
        image_index: ``[P]`` long, row of the pair's image in the batch.
        block_ids: ``[P]`` block of each pair.
    """
    if views.ndim != 5:
        raise ValueError(f"views must have shape [B, V, 3, S, S], got {tuple(views.shape)}")
    b, v = views.shape[:2]
    if v % 2:
        raise ValueError(f"views must hold an even number V of views per image (pairs), got V={v}")
    if tuple(block_ids.shape) != (b, v):
        raise ValueError(f"block_ids must have shape [B, V] = [{b}, {v}], got {tuple(block_ids.shape)}")
    if not torch.equal(block_ids[:, 0::2], block_ids[:, 1::2]):
        raise ValueError("block_ids must be equal for the two views of each pair (positions 2j and 2j+1)")
    num_pairs = b * v // 2
    device = generator.device if generator is not None else views.device
    order = torch.randperm(num_pairs, generator=generator, device=device).to(views.device)  # [P]
    view1 = views[:, 0::2].flatten(0, 1)[order]  # [B, V/2, 3, S, S] -> [P, 3, S, S]
    view2 = views[:, 1::2].flatten(0, 1)[order]
    image_index = torch.arange(b, device=views.device).repeat_interleave(v // 2)[order]  # [P]
    return view1, view2, image_index, block_ids[:, 0::2].flatten()[order.to(block_ids.device)]
