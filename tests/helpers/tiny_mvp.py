"""A tiny MVP (ViT-Tiny student, open_clip teacher tower) and its masked batches, for the MVP and teacher tests."""

from __future__ import annotations

import warnings

import torch

from ssl_zoo.methods import MVP

IMAGE_SIDE = 32  # a 2 x 2 patch grid for both the student and the teacher (16 px patches)

# A tiny open_clip tower: 2 blocks, width 64, 16 px patches, 32-d joint space; the text tower is a stub.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": IMAGE_SIDE, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}

# A 2-block ViT-Tiny/16 student keeps every test fast.
TINY_MVP = dict(backbone="vit_tiny_patch16_224",
                backbone_kwargs={"img_size": IMAGE_SIDE, "model_kwargs": {"depth": 2}},
                img_size=IMAGE_SIDE, num_masking_patches=2, min_num_patches=1, teacher_kwargs=TINY_CLIP,
                lr_batch_size=2048, warmup_epochs=0)


def quiet(fn, *args, **kwargs):
    """Build something with a random teacher without printing the (expected) random-init warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def tiny_mvp(seed: int = 0, **overrides) -> MVP:
    """A seeded :data:`TINY_MVP` model (random teacher), with ``overrides`` of its arguments."""
    torch.manual_seed(seed)
    return quiet(MVP, **{**TINY_MVP, **overrides})


def mvp_batch(num_images: int, seed: int = 0) -> dict:
    """A seeded batch of one student and one teacher view per image, two of the 2 x 2 patches masked in each."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(num_images, 4, dtype=torch.bool)
    for i in range(num_images):  # two masked patches per image, at varying positions
        mask[i, torch.randperm(4, generator=g)[:2]] = True
    return {
        "views": torch.randn(num_images, 1, 3, IMAGE_SIDE, IMAGE_SIDE, generator=g),
        "teacher_views": torch.randn(num_images, 1, 3, IMAGE_SIDE, IMAGE_SIDE, generator=g),
        "mask": mask.view(num_images, 2, 2),
        "index": torch.arange(num_images),
    }
