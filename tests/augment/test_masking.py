"""Mask generators (``ssl_zoo.augment.masking``): block-wise masks with exact counts and valid rectangles, BEiT's
own sampler against BEiT's reference code in distribution, SimMIM's random patch masks, seeding."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from scipy import ndimage

from ssl_zoo.augment import (
    BEiTMaskGenerator,
    BlockwiseMaskGenerator,
    RandomPatchMaskGenerator,
)


def paint(rectangles, height, width) -> torch.Tensor:
    mask = torch.zeros(height, width, dtype=torch.bool)
    for top, left, h, w in rectangles:
        mask[top : top + h, left : left + w] = True
    return mask


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # BEiT / MVP: 75 of 14 x 14, rectangles >= 16
        {"input_size": 6, "num_masking_patches": 14, "min_num_patches": 4},
        {"input_size": (8, 12), "num_masking_patches": 40, "min_num_patches": 6, "min_aspect": 0.5},
        {"input_size": (14, 14), "num_masking_patches": 75, "min_num_patches": 16, "max_num_patches": 24},
    ],
)
def test_blockwise_mask_exact_count_and_valid_rectangles(kwargs):
    gen = BlockwiseMaskGenerator(**kwargs)
    height, width = gen.height, gen.width
    target, min_patches, min_aspect = gen.num_masking_patches, gen.min_num_patches, gen.min_aspect
    max_new = kwargs.get("max_num_patches") or target
    masks = []
    for seed in range(150):
        torch.manual_seed(seed)
        rectangles = gen.sample_rectangles()
        covered = torch.zeros(height, width, dtype=torch.bool)
        for top, left, h, w in rectangles:
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
            assert h * w >= min_patches
            assert min_aspect - 1e-9 <= h / w <= 1 / min_aspect + 1e-9
            before = int(covered.sum())
            covered[top : top + h, left : left + w] = True
            added = int(covered.sum()) - before
            assert 1 <= added <= max_new  # each rectangle adds something, never past the per-step cap
            assert int(covered.sum()) <= target  # never more than requested
        assert int(covered.sum()) == target
        torch.manual_seed(seed)
        mask = gen()
        assert mask.dtype == torch.bool and mask.shape == (height, width)
        assert torch.equal(mask, paint(rectangles, height, width))
        # independent check of the minimum size: each connected region holds a whole rectangle
        labels, n = ndimage.label(mask.numpy())
        sizes = np.bincount(labels.ravel())[1:]
        assert (sizes >= min_patches).all()
        masks.append(mask)
    # masks vary, and every patch of the grid gets masked by some seed
    assert len({m.numpy().tobytes() for m in masks}) > 100
    assert torch.stack(masks).any(0).all()


def test_blockwise_mask_default_is_beit_75_of_14x14():
    gen = BlockwiseMaskGenerator()
    assert (gen.height, gen.width) == (14, 14)
    torch.manual_seed(0)
    assert int(gen().sum()) == 75


def test_blockwise_mask_int_size_equals_square_tuple_and_seeded():
    a, b = BlockwiseMaskGenerator(input_size=10, num_masking_patches=30), BlockwiseMaskGenerator((10, 10), 30)
    torch.manual_seed(7)
    ma = a()
    torch.manual_seed(7)
    assert torch.equal(ma, b())
    g = torch.Generator().manual_seed(7)
    gb = torch.Generator().manual_seed(7)
    assert torch.equal(a(generator=g), a(generator=gb))


def test_blockwise_mask_construction_leaves_global_rng_alone():
    state = torch.get_rng_state()
    BlockwiseMaskGenerator()
    assert torch.equal(state, torch.get_rng_state())


def test_blockwise_mask_zero_patches():
    assert not BlockwiseMaskGenerator(num_masking_patches=0)().any()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_masking_patches": 197}, r"num_masking_patches must lie in \[0, 196\]"),
        ({"num_masking_patches": -1}, r"num_masking_patches must lie in"),
        ({"num_masking_patches": 10}, "smaller than min_num_patches"),
        ({"min_aspect": 0.0}, r"min_aspect must lie in \(0, 1\]"),
        ({"min_aspect": 1.5}, r"min_aspect must lie in \(0, 1\]"),
        ({"max_num_patches": 8}, "max_num_patches must be >= min_num_patches"),
        ({"input_size": (14, 0)}, "input_size"),
        (
            {"input_size": (3, 3), "num_masking_patches": 9, "min_num_patches": 16},
            "smaller than min_num_patches",
        ),
        # a 2 x 10 grid holds 2 x 8 = 16 patches only with aspect 0.25 < 0.3
        ({"input_size": (2, 10), "num_masking_patches": 16, "min_num_patches": 16}, "no rectangle"),
        # 17 patches from rectangles of >= 16: the first one leaves a remainder no rectangle can add
        ({"num_masking_patches": 17}, "could not mask exactly"),
    ],
)
def test_blockwise_mask_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockwiseMaskGenerator(**kwargs)


def beit_reference_mask(height, width, target, min_patches, rng: random.Random, min_aspect=0.3):
    """BEiT's ``MaskingGenerator`` (unilm/beit ``masking_generator.py``) written out with Python's ``random``:
    returns the masked-patch count and the areas of the accepted rectangles with the budget each was drawn in."""
    mask = np.zeros((height, width), dtype=np.int64)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    count, rectangles = 0, []
    while count < target:
        budget = target - count
        delta = 0
        for _ in range(10):
            area = rng.uniform(min_patches, budget)
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                new = h * w - mask[top : top + h, left : left + w].sum()
                if 0 < new <= budget:
                    mask[top : top + h, left : left + w] = 1
                    delta = int(new)
                    rectangles.append((h * w, budget))
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return count, rectangles


def _beit_masks(gen: BEiTMaskGenerator, seeds):
    """(mask, rectangles, budget of each rectangle) per seed, checking the invariants on the way."""
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        rectangles = gen.sample_rectangles()
        covered = torch.zeros(gen.height, gen.width, dtype=torch.bool)
        budgets = []
        for top, left, h, w in rectangles:
            assert h < gen.height and w < gen.width  # BEiT: sides strictly shorter than the grid's
            assert 0 <= top <= gen.height - h and 0 <= left <= gen.width - w
            budget = gen.num_masking_patches - int(covered.sum())
            before = int(covered.sum())
            covered[top : top + h, left : left + w] = True
            assert 1 <= int(covered.sum()) - before <= budget  # adds something, never past the target
            budgets.append(budget)
        torch.manual_seed(seed)
        mask = gen()
        assert torch.equal(mask, covered) and mask.dtype == torch.bool
        out.append((mask, rectangles, budgets))
    return out


def test_beit_sampler_masks_at_most_the_target_and_sometimes_fewer():
    gen = BEiTMaskGenerator()  # 75 of 14 x 14, rectangles drawn from >= 16 patches
    masks = _beit_masks(gen, range(300))
    counts = np.array([int(m.sum()) for m, _, _ in masks])
    assert counts.max() == 75 and (counts <= 75).all()
    assert (counts < 75).any()  # BEiT gives up after ten failed draws and keeps the smaller mask
    # The last rectangles may be smaller than min_num_patches: their area is drawn from U(16, budget) with
    # budget < 16. Rounding alone never goes below 12 patches for an area >= 16 (2 x 6 at aspect ~0.39), so
    # every rectangle under 12 patches must come from such a draw, and there are some.
    drawn = [(h * w, b) for _, rects, budgets in masks for (_, _, h, w), b in zip(rects, budgets, strict=True)]
    tiny = [(area, budget) for area, budget in drawn if area < 12]
    assert tiny and all(budget < 16 for _, budget in tiny)
    # The exact generator never stops short.
    torch.manual_seed(0)
    assert int(BlockwiseMaskGenerator()().sum()) == 75


def test_beit_sampler_gives_up_after_ten_failed_draws(monkeypatch):
    # 4 patches of a 2 x 2 grid: BEiT's sides must be < 2, i.e. 1 x 1, which an area of 4 never rounds to.
    gen = BEiTMaskGenerator(input_size=2, num_masking_patches=4, min_num_patches=4)
    calls = []
    original = BEiTMaskGenerator.propose
    monkeypatch.setattr(BEiTMaskGenerator, "propose",
                        lambda self, budget, generator=None: calls.append(budget) or original(self, budget, generator))
    assert not gen().any() and len(calls) == 10
    # A proposal that fits but adds nothing new is a failed draw too: one accepted 1 x 1, then ten rejections.
    calls.clear()
    monkeypatch.setattr(BEiTMaskGenerator, "propose", lambda self, budget, generator=None: calls.append(1) or (0, 0, 1, 1))
    mask = BEiTMaskGenerator(input_size=3, num_masking_patches=4, min_num_patches=1)()
    assert int(mask.sum()) == 1 and bool(mask[0, 0]) and len(calls) == 11


def test_beit_sampler_matches_beits_reference_code_in_distribution():
    """Same algorithm as BEiT's code (different random streams): compare the statistics of 1000 masks."""
    gen = BEiTMaskGenerator()
    ours = _beit_masks(gen, range(1000))
    rng = random.Random(0)
    reference = [beit_reference_mask(14, 14, 75, 16, rng) for _ in range(1000)]
    ours_counts = np.array([int(m.sum()) for m, _, _ in ours])
    ref_counts = np.array([c for c, _ in reference])
    assert abs(ours_counts.mean() - ref_counts.mean()) < 0.3  # both ~74.5, standard error ~0.03
    assert abs((ours_counts < 75).mean() - (ref_counts < 75).mean()) < 0.07
    ours_small = np.mean([h * w < 16 for _, rects, _ in ours for _, _, h, w in rects])
    ref_small = np.mean([area < 16 for _, rects in reference for area, _ in rects])
    assert abs(ours_small - ref_small) < 0.04
    ours_rects = np.mean([len(rects) for _, rects, _ in ours])
    ref_rects = np.mean([len(rects) for _, rects in reference])
    assert abs(ours_rects - ref_rects) < 0.2


def test_beit_sampler_is_seeded_by_torch_and_by_a_generator():
    gen = BEiTMaskGenerator(input_size=(8, 10), num_masking_patches=30, min_num_patches=4)
    torch.manual_seed(5)
    a = gen()
    torch.manual_seed(5)
    assert torch.equal(a, gen())
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(gen(generator=g1), gen(generator=g2))
    assert len({gen().numpy().tobytes() for _ in range(20)}) > 15
    assert not BEiTMaskGenerator(num_masking_patches=0)().any()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_masking_patches": 197}, r"num_masking_patches must lie in \[0, 196\]"),
    ({"min_aspect": 0.0}, "min_aspect"),
    ({"min_aspect": 0.5, "max_aspect": 0.4}, "min_aspect <= max_aspect"),
    ({"input_size": (14, 0)}, "input_size"),
])
def test_beit_sampler_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BEiTMaskGenerator(**kwargs)


@pytest.mark.parametrize(
    ("input_size", "mask_patch_size", "model_patch_size", "mask_ratio"),
    [(224, 32, 16, 0.6), (192, 32, 4, 0.6), (224, 32, 4, 0.6), (64, 16, 16, 0.75), (96, 32, 8, 0.5)],
)
def test_random_patch_mask_count_and_alignment(input_size, mask_patch_size, model_patch_size, mask_ratio):
    gen = RandomPatchMaskGenerator(input_size, mask_patch_size, model_patch_size, mask_ratio)
    grid = input_size // model_patch_size
    coarse, scale = input_size // mask_patch_size, mask_patch_size // model_patch_size
    expected = math.ceil(mask_ratio * coarse**2)
    seen = torch.zeros(coarse, coarse)
    for seed in range(20):
        torch.manual_seed(seed)
        mask = gen()
        assert mask.dtype == torch.bool and mask.shape == (grid, grid)
        # brute force: look at every mask-patch cell of the model grid
        cells = torch.zeros(coarse, coarse, dtype=torch.long)
        for i in range(coarse):
            for j in range(coarse):
                block = mask[i * scale : (i + 1) * scale, j * scale : (j + 1) * scale]
                assert block.all() or not block.any(), "a mask patch is partly masked"
                cells[i, j] = int(block.all())
        assert int(cells.sum()) == expected
        assert int(mask.sum()) == expected * scale**2
        seen += cells
    assert (seen > 0).sum() > coarse**2 // 2  # the choice moves around


def test_random_patch_mask_closed_form_counts():
    # ceil(0.6 * 49) = 30 mask patches of 2 x 2 ViT-B/16 patches; ceil(0.6 * 36) = 22 of 8 x 8 Swin patches
    assert int(RandomPatchMaskGenerator(224, 32, 16, 0.6)().sum()) == 30 * 4
    assert int(RandomPatchMaskGenerator(192, 32, 4, 0.6)().sum()) == 22 * 64
    assert not RandomPatchMaskGenerator(64, 32, 16, 0.0)().any()
    assert RandomPatchMaskGenerator(64, 32, 16, 1.0)().all()


def test_random_patch_mask_seeded():
    gen = RandomPatchMaskGenerator()
    torch.manual_seed(11)
    a = gen()
    torch.manual_seed(11)
    assert torch.equal(a, gen())


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((100, 32, 16, 0.6), "input_size=100 must be divisible by mask_patch_size=32"),
        ((224, 32, 12, 0.6), "mask_patch_size=32 must be divisible by model_patch_size=12"),
        ((224, 32, 16, 1.5), r"mask_ratio must lie in \[0, 1\]"),
        ((224, 32, 16, -0.1), r"mask_ratio must lie in \[0, 1\]"),
        ((0, 32, 16, 0.6), "input_size must be a positive integer"),
    ],
)
def test_random_patch_mask_errors(args, match):
    with pytest.raises(ValueError, match=match):
        RandomPatchMaskGenerator(*args)
