"""BAM's blocks (``ssl_zoo.augment.blocks``): block boxes against hand-computed ones, each block's views are
crops of that block only (hand-made images with one colour per quadrant), determinism under a seed, and the
pair shuffling that keeps pairs aligned and gradients flowing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision import transforms as T

from ssl_zoo.augment import (
    BlockwiseAugmentation,
    block_boxes,
    shuffle_pairs,
)

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
