"""ssl_zoo.augment: BAM blocks and pair shuffling, mask generators, multi-view transforms.

Geometry is checked against hand-computed boxes and hand-made images (solid quadrants, pixel values
that encode their coordinates); masks against brute-force counts on the grid; the MVP crop against
an explicit un-normalise / re-normalise; determinism under ``torch.manual_seed``.
"""

from __future__ import annotations

import math
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from torch.utils.data import default_collate
from torchvision import transforms as T

from ssl_zoo.augment import (
    BEiTMaskGenerator,
    BlockwiseAugmentation,
    BlockwiseMaskGenerator,
    HVPTransform,
    MultiViewTransform,
    MVPTransform,
    RandomPatchMaskGenerator,
    TwoViewTransform,
    block_boxes,
    blur_kernel_size,
    mocov2_transform,
    mocov3_transform,
    shuffle_pairs,
    simsiam_view,
)

# The published statistics the views normalise with: torchvision's / timm's ImageNet ones, and OpenAI CLIP's
# preprocessing (CLIP's clip/clip.py), written out here rather than read from the libraries.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A real photograph (427 x 640 RGB)."""
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image("china.jpg"))


QUADRANT_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # TL, TR, BL, BR


def quadrant_image(width: int, height: int) -> Image.Image:
    """Solid colour per quadrant, in block_boxes order (width and height even)."""
    a = np.zeros((height, width, 3), dtype=np.uint8)
    h2, w2 = height // 2, width // 2
    a[:h2, :w2], a[:h2, w2:], a[h2:, :w2], a[h2:, w2:] = QUADRANT_COLOURS
    return Image.fromarray(a)


def coordinate_image(width: int, height: int) -> Image.Image:
    """Red channel = x, green channel = y, blue = 7: every pixel says where it came from."""
    a = np.zeros((height, width, 3), dtype=np.uint8)
    a[..., 0] = np.arange(width)[None, :]
    a[..., 1] = np.arange(height)[:, None]
    a[..., 2] = 7
    return Image.fromarray(a)


# --------------------------------------------------------------------------------------------- block_boxes
@pytest.mark.parametrize(
    ("width", "height", "overlap", "expected"),
    [
        # 0.7 * 100 = 70 wide, 0.7 * 80 = 56 tall
        (100, 80, 0.2, [(0, 0, 70, 56), (30, 0, 100, 56), (0, 24, 70, 80), (30, 24, 100, 80)]),
        # quadrants
        (100, 80, 0.0, [(0, 0, 50, 40), (50, 0, 100, 40), (0, 40, 50, 80), (50, 40, 100, 80)]),
        # four copies of the whole image
        (100, 80, 0.5, [(0, 0, 100, 80)] * 4),
        # the photo: 0.7 * 640 = 448, 0.7 * 427 = 298.9 -> 299
        (640, 427, 0.2, [(0, 0, 448, 299), (192, 0, 640, 299), (0, 128, 448, 427), (192, 128, 640, 427)]),
        # 0.6 * 50 = 30, 0.6 * 30 = 18
        (50, 30, 0.1, [(0, 0, 30, 18), (20, 0, 50, 18), (0, 12, 30, 30), (20, 12, 50, 30)]),
        # Python's round halves to even: round(2.5) = 2, round(3.5) = 4
        (5, 7, 0.0, [(0, 0, 2, 4), (3, 0, 5, 4), (0, 3, 2, 7), (3, 3, 5, 7)]),
    ],
)
def test_block_boxes_hand_computed(width, height, overlap, expected):
    assert block_boxes(width, height, overlap) == expected


def test_block_boxes_default_overlap_is_0_2():
    assert block_boxes(100, 80) == block_boxes(100, 80, 0.2)


@pytest.mark.parametrize("overlap", [-0.01, 0.51, 1.0])
def test_block_boxes_rejects_overlap_outside_range(overlap):
    with pytest.raises(ValueError, match=r"overlap.*\[0, 0\.5\]"):
        block_boxes(100, 80, overlap)
    with pytest.raises(ValueError, match=r"overlap.*\[0, 0\.5\]"):
        BlockwiseAugmentation(size=32, overlap=overlap)


def test_block_boxes_rejects_empty_image():
    with pytest.raises(ValueError):
        block_boxes(0, 10)
    with pytest.raises(ValueError, match="too small"):
        block_boxes(1, 1, overlap=0.0)  # round(0.5) = 0


# --------------------------------------------------------------------------------------------- BAM
def test_bam_eight_views_with_block_ids(photo):
    out = BlockwiseAugmentation(size=32)(photo)
    assert set(out) == {"views", "block_ids"}
    assert out["views"].shape == (8, 3, 32, 32) and out["views"].dtype == torch.float32
    assert out["block_ids"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert out["block_ids"].dtype == torch.long
    assert torch.isfinite(out["views"]).all()
    # normalised: not in [0, 1] any more (ImageNet normalisation maps 0 to about -2)
    assert out["views"].min() < 0


def test_simsiam_mode_two_whole_image_views(photo):
    out = BlockwiseAugmentation(size=32, bam=False)(photo)
    assert out["views"].shape == (2, 3, 32, 32)
    assert out["block_ids"].tolist() == [0, 0]


@pytest.mark.parametrize(
    ("width", "height", "overlap"), [(40, 40, 0.2), (60, 40, 0.2), (50, 30, 0.1), (64, 48, 0.0)]
)
def test_bam_views_are_crops_of_the_right_blocks(width, height, overlap):
    # An identity per-view transform returns each block as it was cropped; the pixel values encode
    # the coordinates, so every view must show exactly its block's coordinates.
    aug = BlockwiseAugmentation(size=32, overlap=overlap, view_transform=T.PILToTensor())
    views = aug(coordinate_image(width, height))["views"]  # [8, 3, bh, bw] uint8
    bw, bh = round((0.5 + overlap) * width), round((0.5 + overlap) * height)
    corners = [(0, 0), (width - bw, 0), (0, height - bh), (width - bw, height - bh)]
    assert views.shape == (8, 3, bh, bw)
    for k, (left, top) in enumerate(corners):
        expected_x = torch.arange(left, left + bw).expand(bh, bw)
        expected_y = torch.arange(top, top + bh)[:, None].expand(bh, bw)
        for v in (2 * k, 2 * k + 1):
            assert torch.equal(views[v, 0].long(), expected_x)
            assert torch.equal(views[v, 1].long(), expected_y)
            assert (views[v, 2] == 7).all()


def test_bam_views_of_block_k_contain_only_block_k_colour():
    # Quadrant colours, overlap 0 and a geometric-only view transform: any crop of block k, resized
    # and flipped, can only contain block k's colour.
    geometric = T.Compose(
        [T.RandomResizedCrop(24, scale=(0.2, 1.0)), T.RandomHorizontalFlip(), T.PILToTensor()]
    )
    aug = BlockwiseAugmentation(size=24, overlap=0.0, view_transform=geometric)
    torch.manual_seed(0)
    for _ in range(5):
        out = aug(quadrant_image(96, 64))
        for v in range(8):
            colour = torch.tensor(QUADRANT_COLOURS[int(out["block_ids"][v])], dtype=torch.uint8)
            assert (out["views"][v] == colour[:, None, None]).all(), f"view {v} mixes colours"


def test_bam_overlap_mixes_neighbouring_colours():
    # Counter-check of the previous test: with overlap 0.5 every block is the whole image, so the
    # full-scale crop of block 0 shows all four colours.
    whole = T.Compose([T.Resize((32, 48)), T.PILToTensor()])
    views = BlockwiseAugmentation(size=32, overlap=0.5, view_transform=whole)(quadrant_image(96, 64))["views"]
    present = {tuple(p) for p in views[0].flatten(1).T.tolist()}
    assert set(QUADRANT_COLOURS) <= present


def test_bam_deterministic_under_seed(photo):
    aug = BlockwiseAugmentation(size=32)
    torch.manual_seed(3)
    a = aug(photo)["views"]
    torch.manual_seed(3)
    b = aug(photo)["views"]
    c = aug(photo)["views"]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # the two views of a block differ


def test_bam_collates_and_shuffles_end_to_end(photo):
    aug = BlockwiseAugmentation(size=16)
    batch = default_collate([aug(photo) for _ in range(3)])
    assert batch["views"].shape == (3, 8, 3, 16, 16)
    assert batch["block_ids"].shape == (3, 8)
    view1, view2, image_index, block_ids = shuffle_pairs(batch["views"], batch["block_ids"])
    assert view1.shape == view2.shape == (12, 3, 16, 16)
    for i in range(12):
        b, k = int(image_index[i]), int(block_ids[i])
        assert torch.equal(view1[i], batch["views"][b, 2 * k])
        assert torch.equal(view2[i], batch["views"][b, 2 * k + 1])


def test_grayscale_input_gives_three_channels(photo):
    out = BlockwiseAugmentation(size=16)(photo.convert("L"))
    assert out["views"].shape == (8, 3, 16, 16)


# --------------------------------------------------------------------------------------------- shuffle_pairs
def tagged_batch(b: int, v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """views[i, j] is filled with 100 i + j; block ids 0 0 1 1 ... per row."""
    tags = 100 * torch.arange(b)[:, None] + torch.arange(v)[None, :]  # [B, V]
    views = tags[:, :, None, None, None].float().expand(b, v, 3, 2, 2).clone()
    block_ids = torch.arange(v // 2).repeat_interleave(2).expand(b, v).clone()
    return views, block_ids


@pytest.mark.parametrize(("b", "v"), [(3, 8), (5, 2), (1, 8)])
def test_shuffle_pairs_keeps_pairs_aligned_and_is_a_permutation(b, v):
    views, block_ids = tagged_batch(b, v)
    view1, view2, image_index, pair_blocks = shuffle_pairs(
        views, block_ids, generator=torch.Generator().manual_seed(1)
    )
    p = b * v // 2
    assert view1.shape == view2.shape == (p, 3, 2, 2)
    assert image_index.shape == pair_blocks.shape == (p,)
    tag1, tag2 = view1[:, 0, 0, 0].long(), view2[:, 0, 0, 0].long()
    # first view of pair (i, k) is view 2k of image i, its partner is view 2k + 1
    assert torch.equal(tag1, 100 * image_index + 2 * pair_blocks)
    assert torch.equal(tag2, tag1 + 1)
    # every (image, block) pair appears exactly once
    assert sorted(zip(image_index.tolist(), pair_blocks.tolist(), strict=True)) == [
        (i, k) for i in range(b) for k in range(v // 2)
    ]


def test_shuffle_pairs_permutes_order_and_follows_seed():
    views, block_ids = tagged_batch(4, 8)  # 16 pairs
    identity = (100 * torch.arange(4)[:, None] + torch.arange(0, 8, 2)[None, :]).flatten()
    orders = []
    for seed in (0, 0, 1):
        view1, *_ = shuffle_pairs(views, block_ids, generator=torch.Generator().manual_seed(seed))
        orders.append(view1[:, 0, 0, 0].long())
    assert not torch.equal(orders[0], identity)
    assert torch.equal(orders[0], orders[1])
    assert not torch.equal(orders[0], orders[2])
    # global RNG when no generator is given
    torch.manual_seed(5)
    a = shuffle_pairs(views, block_ids)[2]
    torch.manual_seed(5)
    assert torch.equal(a, shuffle_pairs(views, block_ids)[2])


def test_shuffle_pairs_keeps_gradients():
    views, block_ids = tagged_batch(2, 4)
    views.requires_grad_(True)
    view1, view2, *_ = shuffle_pairs(views, block_ids)
    (view1.sum() + 2 * view2.sum()).backward()
    expected = torch.tensor([1.0, 2.0, 1.0, 2.0])[None, :, None, None, None].expand_as(views)
    assert torch.equal(views.grad, expected)


def test_shuffle_pairs_errors():
    views, block_ids = tagged_batch(2, 8)
    with pytest.raises(ValueError, match="even"):
        shuffle_pairs(views[:, :3], block_ids[:, :3])
    with pytest.raises(ValueError, match=r"\[B, V, 3, S, S\]"):
        shuffle_pairs(views[0], block_ids)
    with pytest.raises(ValueError, match="block_ids must have shape"):
        shuffle_pairs(views, block_ids[:, :4])
    bad = block_ids.clone()
    bad[0, 1] = 3
    with pytest.raises(ValueError, match="same id|equal"):
        shuffle_pairs(views, bad)


# --------------------------------------------------------------------------------------------- block-wise masks
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


# --------------------------------------------------------------------------------------------- BEiT's own sampler
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


def test_mvp_transform_beit_sampling(photo):
    transform = MVPTransform(size=224, mask_sampling="beit")
    assert isinstance(transform.mask_generator, BEiTMaskGenerator)
    counts = []
    for seed in range(20):
        torch.manual_seed(seed)
        counts.append(int(transform(photo)["mask"].sum()))
    assert max(counts) <= 75 and min(counts) > 50
    with pytest.raises(ValueError, match="mask_sampling"):
        MVPTransform(size=224, mask_sampling="random")


# --------------------------------------------------------------------------------------------- random patch masks
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


# --------------------------------------------------------------------------------------------- MVP
def test_mvp_teacher_is_the_same_crop_with_clip_statistics(photo):
    transform = MVPTransform(size=224)
    torch.manual_seed(0)
    out = transform(photo)
    assert set(out) == {"views", "teacher_views", "mask"}
    assert out["views"].shape == out["teacher_views"].shape == (1, 3, 224, 224)
    assert out["mask"].shape == (14, 14) and out["mask"].dtype == torch.bool
    assert int(out["mask"].sum()) == 75
    imagenet_mean, imagenet_std = (
        torch.tensor(IMAGENET_MEAN)[:, None, None],
        torch.tensor(IMAGENET_STD)[:, None, None],
    )
    clip_mean, clip_std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    pixels = out["views"][0] * imagenet_std + imagenet_mean  # undo the student normalisation
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    torch.testing.assert_close(out["teacher_views"][0], (pixels - clip_mean) / clip_std, atol=1e-5, rtol=0)
    assert not torch.allclose(out["teacher_views"], out["views"], atol=1e-3)  # different statistics


def test_mvp_small_grid_and_seed(photo):
    transform = MVPTransform(size=64, patch_size=16, num_masking_patches=6, min_num_patches=4)
    torch.manual_seed(1)
    a = transform(photo)
    torch.manual_seed(1)
    b = transform(photo)
    assert a["mask"].shape == (4, 4) and int(a["mask"].sum()) == 6
    for key in a:
        assert torch.equal(a[key], b[key])


def test_mvp_errors():
    with pytest.raises(ValueError, match="size=100 must be divisible by patch_size=16"):
        MVPTransform(size=100)
    with pytest.raises(ValueError, match=r"num_masking_patches must lie in \[0, 16\]"):
        MVPTransform(size=64, patch_size=16)  # 75 patches do not fit a 4 x 4 grid


# --------------------------------------------------------------------------------------------- HVP
def test_hvp_shapes_and_mask(photo):
    transform = HVPTransform(size=224, model_patch_size=4)
    out = transform(photo)
    assert set(out) == {"views", "mask"}
    assert out["views"].shape == (2, 3, 224, 224) and out["views"].dtype == torch.float32
    assert out["mask"].shape == (56, 56) and out["mask"].dtype == torch.bool
    assert int(out["mask"].sum()) == math.ceil(0.6 * 49) * 8 * 8
    assert not torch.equal(out["views"][0], out["views"][1])
    vit = HVPTransform(size=64, model_patch_size=16)(photo)
    assert vit["views"].shape == (2, 3, 64, 64) and vit["mask"].shape == (4, 4)


def test_hvp_follows_torch_seed_and_leaves_python_and_numpy_rng_alone(photo):
    # timm's RandAugment draws from `random` and NumPy; the transform seeds both from torch, so the
    # result depends on torch's seed only, and restores their global states.
    transform = HVPTransform(size=32, model_patch_size=4)
    outs = []
    for other_seed in (1, 2):
        random.seed(other_seed)
        np.random.seed(other_seed)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        torch.manual_seed(0)
        outs.append(transform(photo))
        assert random.getstate() == python_state
        assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    for key in outs[0]:
        assert torch.equal(outs[0][key], outs[1][key])
    torch.manual_seed(1)
    assert not torch.equal(transform(photo)["views"], outs[0]["views"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 100}, "size=100 must be divisible by mask_patch_size=32"),
        (
            {"mask_patch_size": 32, "model_patch_size": 12},
            "mask_patch_size=32 must be divisible by model_patch_size=12",
        ),
        ({"randaugment": "rand-q9"}, "randaugment"),
        ({"rotation": -1}, "rotation"),
        ({"normalize": "cifar"}, "normalize"),
    ],
)
def test_hvp_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HVPTransform(**kwargs)


# --------------------------------------------------------------------------------------------- SimSiam / MoCo views
@pytest.mark.parametrize(("size", "expected"), [(224, 23), (96, 9), (64, 7), (32, 3), (10, 3)])
def test_blur_kernel_size(size, expected):
    assert blur_kernel_size(size) == expected


def test_blur_kernel_is_odd_and_about_ten_percent():
    for size in range(40, 400):
        k = blur_kernel_size(size)
        assert k % 2 == 1 and abs(k - 0.1 * size) <= 1.0


@pytest.mark.parametrize("make", [mocov2_transform, mocov3_transform])
def test_two_view_transforms(make, photo):
    transform = make(32)
    torch.manual_seed(0)
    out = transform(photo)
    assert set(out) == {"views"}
    assert out["views"].shape == (2, 3, 32, 32) and out["views"].dtype == torch.float32
    assert not torch.equal(out["views"][0], out["views"][1])
    torch.manual_seed(0)
    assert torch.equal(out["views"], transform(photo)["views"])


def test_mocov3_views_are_asymmetric():
    transform = mocov3_transform(32)
    blur_p, solarize_p = [], []
    for view in transform.transforms:
        for step in view.transforms:
            if isinstance(step, T.RandomApply) and isinstance(step.transforms[0], T.GaussianBlur):
                blur_p.append(step.p)
            if isinstance(step, T.RandomSolarize):
                solarize_p.append(step.p)
    assert blur_p == [1.0, 0.1] and solarize_p == [0.0, 0.2]


def test_simsiam_view_normalises_with_imagenet_and_clip_statistics():
    # A mid-grey image stays grey through crop, grayscale, blur and flip; colour jitter only changes
    # brightness (contrast, saturation and hue leave a uniform grey image as it is). So every pixel of
    # a channel c equals (g - mean_c) / std_c for one brightness-scaled grey level g.
    grey = Image.new("RGB", (40, 40), (128, 128, 128))
    for name, (mean, std) in {
        "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
        "clip": (CLIP_MEAN, CLIP_STD),
    }.items():
        view = simsiam_view(16, normalize=name)
        torch.manual_seed(0)
        for _ in range(5):
            x = view(grey)  # [3, 16, 16]
            levels = x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
            assert torch.allclose(levels, levels[0, 0, 0].expand_as(levels), atol=2e-3)


def test_multi_view_transform_stacks_in_order(photo):
    first = T.Compose([T.Resize((8, 8)), T.ToTensor()])
    second = T.Compose([T.Resize((8, 8)), T.ToTensor(), T.Lambda(lambda x: 1 - x)])
    out = MultiViewTransform([first, second, first])(photo)["views"]
    assert out.shape == (3, 3, 8, 8)
    assert torch.equal(out[0], out[2]) and torch.allclose(out[1], 1 - out[0])
    assert TwoViewTransform(first)(photo)["views"].shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="at least one"):
        MultiViewTransform([])


# --------------------------------------------------------------------------------------------- pickling
@pytest.mark.parametrize(
    "make",
    [
        lambda: BlockwiseAugmentation(size=16),
        lambda: BlockwiseAugmentation(size=16, bam=False),
        lambda: mocov2_transform(16),
        lambda: mocov3_transform(16),
        lambda: MVPTransform(size=32, patch_size=16, num_masking_patches=2, min_num_patches=1),
        lambda: MVPTransform(size=64, patch_size=16, num_masking_patches=6, min_num_patches=2, mask_sampling="beit",
                             color_jitter=0.4),
        lambda: HVPTransform(size=32, model_patch_size=4),
    ],
)
def test_transforms_pickle_for_dataloader_workers(make, photo):
    transform = make()
    clone = pickle.loads(pickle.dumps(transform))
    torch.manual_seed(0)
    a = transform(photo)
    torch.manual_seed(0)
    b = clone(photo)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key])


def test_hvp_randaugment_survives_zero_bit_posterize():
    """timm asks Pillow for a 0-bit posterize at magnitude 10, which Pillow >= 13 refuses; it means black."""
    from PIL import Image as PILImage
    from timm.data.auto_augment import rand_augment_transform

    from ssl_zoo.augment.recipes import safe_posterize

    ra = safe_posterize(rand_augment_transform("rand-m10-inc1", {}))
    op = next(o for o in ra.ops if o.name == "PosterizeIncreasing")
    op.prob = 1.0
    out = op(PILImage.new("RGB", (8, 8), (200, 100, 50)))
    assert out.getpixel((0, 0)) == (0, 0, 0)
    # and a whole HVP transform at the maximal magnitude runs on a real photo
    t = HVPTransform(size=32, model_patch_size=4, mask_patch_size=16, randaugment="rand-m10-n4-inc1")
    from sklearn.datasets import load_sample_image

    img = PILImage.fromarray(load_sample_image("china.jpg"))
    for _ in range(20):
        assert t(img)["views"].shape == (2, 3, 32, 32)
