"""The papers' view recipes (``ssl_zoo.augment.recipes``): MoCo v2 / v3 and SimSiam views, MVP's student and
CLIP-normalised teacher crop, HVP-MTL's masked views; seeding, pickling for DataLoader workers, images smaller than
the crop."""

from __future__ import annotations

import math
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from ssl_zoo.augment import (
    BEiTMaskGenerator,
    BlockwiseAugmentation,
    HVPTransform,
    MVPTransform,
    mocov2_transform,
    mocov3_transform,
    simsiam_view,
)

# The published statistics the views normalise with: torchvision's / timm's ImageNet ones, and OpenAI CLIP's
# preprocessing (CLIP's clip/clip.py), written out here rather than read from the libraries.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


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


def _method_transforms():
    return {
        "bam_gamma0": BlockwiseAugmentation(size=32, overlap=0.0),
        "bam": BlockwiseAugmentation(size=32),
        "simsiam": BlockwiseAugmentation(size=32, bam=False),
        "mocov2": mocov2_transform(32),
        "mocov3": mocov3_transform(32),
        "mvp": MVPTransform(size=32, patch_size=16, num_masking_patches=1, min_num_patches=1),
        "hvp_mtl": HVPTransform(size=32, model_patch_size=16, mask_patch_size=32),
    }


@pytest.mark.parametrize("size", [(1, 1), (2, 1), (1, 300), (300, 1), (5, 3)])
def test_images_smaller_than_the_crop_give_full_size_views_in_every_method(size):
    torch.manual_seed(0)
    image = Image.new("RGB", size, (200, 30, 90))
    for name, transform in _method_transforms().items():
        views = transform(image)["views"]
        assert views.shape[-3:] == (3, 32, 32) and torch.isfinite(views).all(), (name, size)
