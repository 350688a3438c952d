"""Mask generators for masked image modelling.

* :class:`BlockwiseMaskGenerator` -- BEiT's block-wise masking (Bao et al. 2022, Algorithm 1), used by
  MVP (Wei et al. 2022, §3.2) on the ViT patch grid, completed so that every mask has exactly the asked
  number of patches.
* :class:`BEiTMaskGenerator` -- the same algorithm exactly as BEiT's code samples it (``MaskingGenerator``
  of unilm/beit): masks may end a little short of the target and the last rectangles may be small.
* :class:`RandomPatchMaskGenerator` -- SimMIM's random masking of large mask patches (Xie et al. 2022,
  §3.1), used by HVP-MTL (§3.1) on the Swin/ViT patch-embedding grid.

Both draw from torch's RNG (the global one, or an explicit ``generator``), so ``torch.manual_seed``
makes them reproducible and every DataLoader worker, which torch seeds differently, gets its own
masks. Both return ``torch.bool`` tensors with True = masked patch.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
from torch import Tensor

__all__ = ["BEiTMaskGenerator", "BlockwiseMaskGenerator", "RandomPatchMaskGenerator"]

# (top, left, height, width) of one masked rectangle on the patch grid.
Rectangle = tuple[int, int, int, int]


def _positive_int(value: object, name: str) -> int:
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        number = 0
    if isinstance(value, bool) or number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


def _grid_and_count(input_size: object, num_masking_patches: object) -> tuple[int, int, int]:
    """Validated ``(height, width)`` of the patch grid and the number of patches to mask, in ``[0, h * w]``."""
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        input_size = (input_size, input_size)
    if not isinstance(input_size, tuple | list) or len(input_size) != 2:
        raise ValueError(f"input_size must be an int or a pair (h, w) of ints, got {input_size!r}")
    height = _positive_int(input_size[0], "input_size[0]")
    width = _positive_int(input_size[1], "input_size[1]")
    if isinstance(num_masking_patches, bool) or not hasattr(num_masking_patches, "__index__"):
        raise ValueError(f"num_masking_patches must be an integer, got {num_masking_patches!r}")
    count = operator.index(num_masking_patches)
    if not 0 <= count <= height * width:
        raise ValueError(
            f"num_masking_patches must lie in [0, {height * width}] (the {height}x{width} grid), got {count}"
        )
    return height, width, count


class BlockwiseMaskGenerator:
    """BEiT block-wise masking on an ``h x w`` patch grid (BEiT Algorithm 1; MVP §3.2).

    Rectangles are added until exactly ``num_masking_patches`` patches are masked:

    * target area ``s ~ U(min_num_patches, max(min_num_patches, budget))`` and aspect ratio
      ``r = exp(U(log min_aspect, log 1/min_aspect))`` (log-uniform), giving a rectangle of
      ``round(sqrt(s r))`` rows by ``round(sqrt(s / r))`` columns at a uniform position, where
      ``budget = min(remaining, max_num_patches)``;
    * the rectangle is kept when it adds between 1 and ``budget`` new patches (overlapping earlier
      rectangles is allowed, exceeding the target never is); up to 10 draws per rectangle.

    Every rectangle has at least ``min_num_patches`` patches and an aspect ratio (rows / columns) in
    ``[min_aspect, 1 / min_aspect]`` -- the rounded shape is checked, since rounding alone can leave
    the range (BEiT keeps such shapes, e.g. 2 x 7 = 14 patches for ``s = 16``).

    Departure from BEiT: when ten draws fail, BEiT stops and returns a mask with fewer patches than
    asked for. Here an exhaustive search over every valid rectangle and position continues the mask,
    and in the rare dead end where no valid rectangle adds between 1 and ``budget`` patches the mask
    is restarted. Every mask therefore has exactly ``num_masking_patches`` patches, so the masked
    tokens of a batch form a dense ``[B, num_masking_patches, D]`` tensor. A rectangle may also span a
    whole side of the grid (BEiT requires sides strictly shorter than the grid's, which leaves no
    valid rectangle on the small grids of low-resolution runs).

    Args:
        input_size: patch grid ``(h, w)``, or one int for a square grid (224 px / 16 px -> 14).
        num_masking_patches: patches to mask per call (75 of 196 = 40% in BEiT and MVP).
        min_num_patches: smallest rectangle, in patches (16).
        max_num_patches: most new patches one rectangle may add; ``None`` = no limit beyond the target.
        min_aspect: smallest rows / columns ratio (0.3); the largest is ``1 / min_aspect``.

    Raises:
        ValueError: for arguments out of range, and when no mask with exactly ``num_masking_patches``
            patches is found with these rectangle constraints (checked once at construction).
    """

    attempts_per_rectangle: int = 10
    max_restarts: int = 100

    def __init__(
        self,
        input_size: int | tuple[int, int] = (14, 14),
        num_masking_patches: int = 75,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
    ) -> None:
        self.height, self.width, num_masking_patches = _grid_and_count(input_size, num_masking_patches)
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = _positive_int(min_num_patches, "min_num_patches")
        if 0 < num_masking_patches < min_num_patches:
            raise ValueError(
                f"num_masking_patches={num_masking_patches} is smaller than min_num_patches={min_num_patches}: "
                "no rectangle is small enough"
            )
        if max_num_patches is not None:
            _positive_int(max_num_patches, "max_num_patches")
            if max_num_patches < min_num_patches:
                raise ValueError(
                    f"max_num_patches must be >= min_num_patches={min_num_patches} or None, got {max_num_patches}"
                )
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        if not 0.0 < min_aspect <= 1.0:
            raise ValueError(f"min_aspect must lie in (0, 1], got {min_aspect}")
        self.min_aspect = float(min_aspect)
        self.log_aspect_range = (math.log(min_aspect), -math.log(min_aspect))

        # Every rectangle shape (rows, cols) that may be used: fits the grid, is large enough and has
        # an allowed aspect ratio. The exhaustive search runs over these.
        self.shapes = [
            (h, w)
            for h in range(1, self.height + 1)
            for w in range(1, self.width + 1)
            if h * w >= self.min_num_patches and self._aspect_ok(h, w)
        ]
        if num_masking_patches > 0 and not self.shapes:
            raise ValueError(
                f"no rectangle of at least min_num_patches={min_num_patches} patches with aspect ratio in "
                f"[{min_aspect}, {1 / min_aspect:.3g}] fits the {self.height}x{self.width} grid"
            )
        self._candidates, self._corners = self._candidate_table()
        # Fail at construction, not in a DataLoader worker hours later, when the target cannot be hit
        # exactly (e.g. 17 patches with rectangles of >= 16: the first 4x4 leaves 1, which no valid
        # rectangle can add). A private generator leaves the global RNG untouched.
        try:
            self.sample_rectangles(generator=torch.Generator().manual_seed(0))
        except RuntimeError as error:
            raise ValueError(str(error)) from None

    def _aspect_ok(self, h: int, w: int) -> bool:
        return h / w >= self.min_aspect and w / h >= self.min_aspect

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_size=({self.height}, {self.width}), "
            f"num_masking_patches={self.num_masking_patches}, min_num_patches={self.min_num_patches}, "
            f"max_num_patches={self.max_num_patches}, min_aspect={self.min_aspect})"
        )

    # ------------------------------------------------------------------ sampling
    def _draw(self, mask: np.ndarray, budget: int, generator: torch.Generator | None) -> Rectangle | None:
        """Up to 10 BEiT draws of one rectangle adding between 1 and ``budget`` new patches."""
        for _ in range(self.attempts_per_rectangle):
            u = torch.rand(4, generator=generator).tolist()
            # BEiT: s ~ U(min, budget); when fewer than min_num_patches remain, only overlapping
            # rectangles of the minimum size can finish the mask.
            area = self.min_num_patches + u[0] * max(budget - self.min_num_patches, 0)
            aspect = math.exp(
                self.log_aspect_range[0] + u[1] * (self.log_aspect_range[1] - self.log_aspect_range[0])
            )
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (1 <= h <= self.height and 1 <= w <= self.width):
                continue
            if h * w < self.min_num_patches or not self._aspect_ok(h, w):
                continue  # rounding left the allowed shapes
            top = min(int(u[2] * (self.height - h + 1)), self.height - h)
            left = min(int(u[3] * (self.width - w + 1)), self.width - w)
            new = h * w - int(mask[top : top + h, left : left + w].sum())
            if 0 < new <= budget:
                return top, left, h, w
        return None

    def _candidate_table(self) -> tuple[np.ndarray, np.ndarray]:
        """Every valid rectangle at every position, and the integral-image corners of each.

        Returns:
            candidates: ``[K, 4]`` int64 rows ``(top, left, height, width)``.
            corners: ``[4, K]`` flat indices into the ``(h+1) x (w+1)`` integral image, such that the
                masked patches under candidate ``k`` are ``I[c0] - I[c1] - I[c2] + I[c3]``.
        """
        rows = [
            (top, left, h, w)
            for h, w in self.shapes
            for top in range(self.height - h + 1)
            for left in range(self.width - w + 1)
        ]
        candidates = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
        top, left, h, w = candidates.T
        stride = self.width + 1
        corners = np.stack(
            [
                (top + h) * stride + left + w,  # bottom-right
                top * stride + left + w,  # top-right
                (top + h) * stride + left,  # bottom-left
                top * stride + left,  # top-left
            ]
        )
        return candidates, corners

    def _search(self, mask: np.ndarray, budget: int, generator: torch.Generator | None) -> Rectangle | None:
        """A uniformly chosen valid rectangle adding between 1 and ``budget`` patches, or None."""
        integral = np.zeros((self.height + 1, self.width + 1), dtype=np.int64)
        integral[1:, 1:] = mask.cumsum(0).cumsum(1)
        flat = integral.ravel()
        c = self._corners
        covered = flat[c[0]] - flat[c[1]] - flat[c[2]] + flat[c[3]]  # [K] masked patches under each
        new = self._candidates[:, 2] * self._candidates[:, 3] - covered
        valid = np.flatnonzero((new > 0) & (new <= budget))
        if len(valid) == 0:
            return None
        index = valid[int(torch.randint(len(valid), (1,), generator=generator))]
        top, left, h, w = (int(v) for v in self._candidates[index])
        return top, left, h, w

    def sample_rectangles(self, generator: torch.Generator | None = None) -> list[Rectangle]:
        """The rectangles ``(top, left, height, width)`` of one mask, in the order they were added.

        Raises:
            RuntimeError: when ``max_restarts`` consecutive tries end in a dead end, which means the
                target cannot be reached with these rectangle constraints.
        """
        for _ in range(self.max_restarts):
            mask = np.zeros((self.height, self.width), dtype=np.int64)
            rectangles: list[Rectangle] = []
            count = 0
            while count < self.num_masking_patches:
                budget = min(self.num_masking_patches - count, self.max_num_patches)
                rect = self._draw(mask, budget, generator) or self._search(mask, budget, generator)
                if rect is None:
                    break  # dead end: restart
                top, left, h, w = rect
                count += h * w - int(mask[top : top + h, left : left + w].sum())
                mask[top : top + h, left : left + w] = 1
                rectangles.append(rect)
            else:
                return rectangles
        raise RuntimeError(
            f"could not mask exactly num_masking_patches={self.num_masking_patches} patches of the "
            f"{self.height}x{self.width} grid with rectangles of at least min_num_patches={self.min_num_patches} "
            f"patches and aspect ratio in [{self.min_aspect}, {1 / self.min_aspect:.3g}] "
            f"(max_num_patches={self.max_num_patches}); lower min_num_patches or change num_masking_patches"
        )

    def __call__(self, generator: torch.Generator | None = None) -> Tensor:
        """One mask: ``BoolTensor[h, w]`` with exactly ``num_masking_patches`` True entries."""
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        for top, left, h, w in self.sample_rectangles(generator):
            mask[top : top + h, left : left + w] = True
        return mask


class BEiTMaskGenerator:
    """BEiT block-wise masking exactly as BEiT's reference code samples it (``masking_generator.py`` of
    unilm/beit, the generator MVP's pre-training inherits), drawing from torch's RNG.

    While fewer than ``num_masking_patches`` patches are masked, with ``budget = min(remaining,
    max_num_patches)``, up to ``attempts_per_rectangle`` (10) rectangles are proposed:

    * area ``s ~ U(min_num_patches, budget)`` -- when ``budget < min_num_patches`` the interval is reversed
      (``random.uniform`` allows it), so the **last rectangles may be smaller than** ``min_num_patches``;
    * aspect ratio ``r`` log-uniform in ``[min_aspect, max_aspect]``, shape ``round(sqrt(s r))`` rows by
      ``round(sqrt(s / r))`` columns, kept only when both sides are **strictly** smaller than the grid's;
    * top-left corner uniform over the positions where the rectangle fits;
    * the proposal is accepted when it adds between 1 and ``budget`` new patches (overlap allowed).

    When ten proposals in a row are rejected, sampling **gives up**: the mask is returned with fewer
    patches than asked for (never more). Rounding may also leave a rectangle's shape slightly outside
    the area / aspect bounds, as in BEiT. Use :class:`BlockwiseMaskGenerator` for masks of exactly
    ``num_masking_patches`` patches.

    Args:
        input_size: patch grid ``(h, w)``, or one int for a square grid (224 px / 16 px -> 14).
        num_masking_patches: patches to mask per call at most (75 of 196 in BEiT and MVP).
        min_num_patches: lower end of the rectangle-area draw (16; BEiT's ``min_mask_patches_per_block``).
        max_num_patches: most new patches one rectangle may add; ``None`` = the target.
        min_aspect: smallest rows / columns ratio (0.3).
        max_aspect: largest ratio; ``None`` = ``1 / min_aspect``.
    """

    attempts_per_rectangle: int = 10

    def __init__(
        self,
        input_size: int | tuple[int, int] = (14, 14),
        num_masking_patches: int = 75,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.height, self.width, self.num_masking_patches = _grid_and_count(input_size, num_masking_patches)
        self.min_num_patches = _positive_int(min_num_patches, "min_num_patches")
        if max_num_patches is not None:
            _positive_int(max_num_patches, "max_num_patches")
        self.max_num_patches = self.num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = 1.0 / min_aspect if max_aspect is None and min_aspect > 0 else max_aspect
        if not (min_aspect > 0 and max_aspect is not None and max_aspect >= min_aspect):
            raise ValueError(f"need 0 < min_aspect <= max_aspect, got min_aspect={min_aspect}, max_aspect={max_aspect}")
        self.min_aspect, self.max_aspect = float(min_aspect), float(max_aspect)
        self.log_aspect_range = (math.log(self.min_aspect), math.log(self.max_aspect))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_size=({self.height}, {self.width}), "
            f"num_masking_patches={self.num_masking_patches}, min_num_patches={self.min_num_patches}, "
            f"max_num_patches={self.max_num_patches}, min_aspect={self.min_aspect}, max_aspect={self.max_aspect})"
        )

    def propose(self, budget: int, generator: torch.Generator | None = None) -> Rectangle | None:
        """One proposal ``(top, left, height, width)``, or None when its shape does not fit strictly inside
        the grid (BEiT's ``w < width and h < height``)."""
        u = torch.rand(2, generator=generator).tolist()
        area = self.min_num_patches + u[0] * (budget - self.min_num_patches)  # U(min, budget), either order
        log_lo, log_hi = self.log_aspect_range
        aspect = math.exp(log_lo + u[1] * (log_hi - log_lo))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if not (w < self.width and h < self.height):
            return None
        # randint(0, H - h) of BEiT is inclusive at both ends: H - h + 1 positions.
        top = int(torch.randint(self.height - h + 1, (1,), generator=generator))
        left = int(torch.randint(self.width - w + 1, (1,), generator=generator))
        return top, left, h, w

    def sample_rectangles(self, generator: torch.Generator | None = None) -> list[Rectangle]:
        """The accepted rectangles ``(top, left, height, width)`` of one mask, in the order they were added."""
        mask = np.zeros((self.height, self.width), dtype=np.int64)
        rectangles: list[Rectangle] = []
        count = 0
        while count < self.num_masking_patches:
            budget = min(self.num_masking_patches - count, self.max_num_patches)
            for _ in range(self.attempts_per_rectangle):
                rect = self.propose(budget, generator)
                if rect is None:
                    continue
                top, left, h, w = rect
                new = h * w - int(mask[top : top + h, left : left + w].sum())
                if 0 < new <= budget:
                    mask[top : top + h, left : left + w] = 1
                    rectangles.append(rect)
                    count += new
                    break
            else:
                break  # ten rejected proposals in a row: BEiT gives up with a smaller mask
        return rectangles

    def __call__(self, generator: torch.Generator | None = None) -> Tensor:
        """One mask: ``BoolTensor[h, w]`` with at most ``num_masking_patches`` True entries."""
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        for top, left, h, w in self.sample_rectangles(generator):
            mask[top : top + h, left : left + w] = True
        return mask


class RandomPatchMaskGenerator:
    """SimMIM random masking (SimMIM §3.1; HVP-MTL §3.1) on the model's patch grid.

    The image is split into ``(input_size // mask_patch_size)^2`` mask patches, of which exactly
    ``ceil(mask_ratio * (input_size // mask_patch_size)^2)`` are chosen uniformly without
    replacement; each covers ``(mask_patch_size // model_patch_size)^2`` model patches.

    Args:
        input_size: image side in pixels (224).
        mask_patch_size: side of one mask patch in pixels (32 in SimMIM and HVP-MTL).
        model_patch_size: side of one model patch in pixels (4 for Swin's patch embedding, 16 for ViT-B/16).
        mask_ratio: fraction of mask patches to mask, in [0, 1] (0.6).
    """

    def __init__(
        self,
        input_size: int = 224,
        mask_patch_size: int = 32,
        model_patch_size: int = 16,
        mask_ratio: float = 0.6,
    ) -> None:
        self.input_size = _positive_int(input_size, "input_size")
        self.mask_patch_size = _positive_int(mask_patch_size, "mask_patch_size")
        self.model_patch_size = _positive_int(model_patch_size, "model_patch_size")
        if input_size % mask_patch_size:
            raise ValueError(
                f"input_size={input_size} must be divisible by mask_patch_size={mask_patch_size}"
            )
        if mask_patch_size % model_patch_size:
            raise ValueError(
                f"mask_patch_size={mask_patch_size} must be divisible by model_patch_size={model_patch_size}"
            )
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must lie in [0, 1], got {mask_ratio}")
        self.mask_ratio = float(mask_ratio)
        self.rand_size = input_size // mask_patch_size  # mask patches per side
        self.scale = mask_patch_size // model_patch_size  # model patches per mask patch side
        self.token_count = self.rand_size**2
        self.mask_count = int(math.ceil(self.token_count * mask_ratio))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_size={self.input_size}, mask_patch_size={self.mask_patch_size}, "
            f"model_patch_size={self.model_patch_size}, mask_ratio={self.mask_ratio})"
        )

    def __call__(self, generator: torch.Generator | None = None) -> Tensor:
        """One mask: ``BoolTensor[input_size // model_patch_size, input_size // model_patch_size]``."""
        chosen = torch.randperm(self.token_count, generator=generator)[: self.mask_count]
        coarse = torch.zeros(self.token_count, dtype=torch.bool)
        coarse[chosen] = True
        coarse = coarse.view(self.rand_size, self.rand_size)  # [R, R] on the mask-patch grid
        # Each mask patch covers a scale x scale block of model patches: [R*scale, R*scale].
        return coarse.repeat_interleave(self.scale, dim=0).repeat_interleave(self.scale, dim=1)
