"""Attention maps of a ViT checkpoint (MVP Figure 3): the CLS token's attention over input images.

::

    python -m ssl_zoo.cli.viz attention --ckpt runs/mvp/<stamp>/checkpoints/last.ckpt --images a.jpg b.jpg --out grid.png
    python -m ssl_zoo.cli.viz attention --ckpt runs/mvp/<stamp>/checkpoints/last.ckpt --images photos/ --average-heads
    python -m ssl_zoo.cli.viz attention --ckpt vit_state_dict.pth --backbone vit_base_patch16_224 --images photos/

writes a PNG grid: one row per image, the (resized, centre-cropped) input first, then one map per attention
head of the chosen block (the last by default): the softmax attention of the CLS query over the patch keys,
``softmax(q_cls . k / sqrt(d) [+ relative position bias])`` restricted to the patch tokens, drawn on the
patch grid. With ``--average-heads`` each image gets one map instead, the mean of those maps over the heads
(:func:`head_averaged_cls_attention`): MVP Figure 3 ("averaging their attention maps of all heads in
ViT-B/16 with CLS token as the query", §4.4). Each map is min-max normalised on its own and coloured with
viridis (dark = low, yellow = high).

Any ViT or BEiT checkpoint that :func:`ssl_zoo.checkpoints.load_backbone` reads works: ssl_zoo
pre-training checkpoints (MVP, MoCo v3 / MPCL-ViT, HVP-MTL-ViT; ``--teacher`` draws the EMA teacher) and
plain timm state dicts (``--backbone`` names the architecture). The attention weights are read by timm's
``AttentionExtract`` at the softmax of timm's own attention module (its unfused path), so they are exactly what
the model computes, relative position biases of BEiT included.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.utils import AttentionExtract
from torch import Tensor

from ssl_zoo.models.backbones import TOKEN_FAMILIES, Backbone

__all__ = ["VIRIDIS", "cls_attention", "colorize", "head_averaged_cls_attention", "load_images", "main",
           "render_attention_grid"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
#: viridis-like colour map: 9 evenly spaced anchors close to matplotlib's viridis, linearly interpolated.
VIRIDIS = np.array([
    [68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
    [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37],
], dtype=np.float64)
HEADER = 14  # pixels of the label row above the grid


def input_size(backbone: Backbone) -> int:
    """The square input side the backbone's patch embedding was built for."""
    img = backbone.model.patch_embed.img_size
    return int(img[0] if isinstance(img, Sequence) else img)


def load_images(paths: Sequence[str | Path], size: int) -> tuple[list[Image.Image], Tensor]:
    """Images (files, or directories of image files) -> (``size x size`` RGB crops, normalised ``[B, 3, S, S]``).

    Each image's short side is resized to ``size`` (bicubic) and the centre ``size x size`` is kept, so the
    whole central square is shown rather than a zoomed-in crop.
    """
    files: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found = sorted(p for p in entry.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"--images: directory '{entry}' holds no image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        elif entry.is_file():
            files.append(entry)
        else:
            raise FileNotFoundError(f"--images: '{entry}' does not exist")
    crops = []
    for file in files:
        try:
            with Image.open(file) as image:
                image = image.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"--images: cannot read '{file}' as an image ({err})") from None
        scale = size / min(image.size)
        w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        crops.append(image.crop((left, top, left + size, top + size)))
    pixels = torch.stack([torch.from_numpy(np.asarray(c, dtype=np.float32) / 255.0).permute(2, 0, 1) for c in crops])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    return crops, (pixels - mean) / std


@torch.no_grad()
def cls_attention(backbone: Backbone, images: Tensor, block: int = -1) -> Tensor:
    """Attention of the CLS query over the patch keys in ``block``: ``[B, heads, h, w]``.

    The row of the softmax attention matrix that belongs to the CLS token, with the prefix columns (CLS,
    register tokens) left out, reshaped to the patch grid. Read by timm's ``AttentionExtract`` at the block's
    ``softmax`` (traced on the unfused path, which applies the softmax explicitly), in eval mode.
    """
    if backbone.family not in TOKEN_FAMILIES:
        raise ValueError(f"attention maps need a ViT or BEiT backbone, '{backbone.name}' is a {backbone.family}")
    blocks = backbone.model.blocks
    if not -len(blocks) <= block < len(blocks):
        raise ValueError(f"block {block} does not exist: '{backbone.name}' has {len(blocks)} blocks")
    node = f"blocks.{block % len(blocks)}.attn.softmax"
    attn, was_training = blocks[block].attn, backbone.training
    fused = attn.fused_attn
    attn.fused_attn = False  # the fused kernel (scaled_dot_product_attention) has no softmax to read
    try:
        extract = AttentionExtract(backbone.model, names=[node], mode="eval")  # an fx trace sharing the weights
        attn.fused_attn = fused
        weights = extract(images)[node].float()  # [B, heads, T, T], rows sum to 1
    finally:
        attn.fused_attn = fused
        backbone.train(was_training)
    prefix = backbone.num_prefix_tokens
    cls_row = weights[:, :, 0, prefix:]  # [B, heads, N]
    h, w = backbone.model.patch_embed.grid_size
    return cls_row.reshape(*cls_row.shape[:2], h, w)


def head_averaged_cls_attention(backbone: Backbone, images: Tensor, block: int = -1) -> Tensor:
    """MVP Figure 3's map: the CLS query's attention over the patch keys in ``block``, averaged over the heads:
    ``[B, h, w]``.

    The mean over heads of :func:`cls_attention`, i.e. per image (1/H) sum_h softmax(q_cls^h . k^h / sqrt(d)
    [+ bias^h]) over the patch columns (MVP §4.4: "We average their attention maps of all heads").
    """
    return cls_attention(backbone, images, block).mean(dim=1)


def colorize(maps: Tensor) -> np.ndarray:
    """``[..., h, w]`` maps -> ``uint8 [..., h, w, 3]`` viridis colours, each map min-max normalised alone."""
    flat = maps.detach().cpu().double().flatten(-2)
    low, high = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    unit = ((flat - low) / (high - low).clamp(min=1e-12)).reshape(maps.shape).numpy()
    position = unit * (len(VIRIDIS) - 1)
    index = np.clip(np.floor(position).astype(np.int64), 0, len(VIRIDIS) - 2)
    frac = (position - index)[..., None]
    rgb = VIRIDIS[index] * (1.0 - frac) + VIRIDIS[index + 1] * frac
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def render_attention_grid(crops: Sequence[Image.Image], attention: Tensor, cell: int | None = None,
                          labels: Sequence[str] | None = None) -> Image.Image:
    """The grid: a label row, then per image its crop and one coloured map per entry of ``attention``'s second
    axis (``[B, maps, h, w]``: the heads, or a single head-averaged map), each ``cell`` pixels square (default:
    the crop size, at least 112). ``labels`` name the map columns (default ``head 1``, ``head 2``...). Maps are
    enlarged with nearest-neighbour resampling, so every patch is one flat square."""
    b, heads, h, w = attention.shape
    labels = list(labels) if labels is not None else [f"head {i + 1}" for i in range(heads)]
    if len(labels) != heads:
        raise ValueError(f"labels: {len(labels)} given for {heads} map(s) per image")
    cell = cell or max(crops[0].width, 112)
    grid = Image.new("RGB", ((1 + heads) * cell, HEADER + b * cell), "white")
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(["image", *labels]):
        draw.text((column * cell + 3, 1), label, fill="black")
    colours = colorize(attention)  # [B, heads, h, w, 3]
    for row in range(b):
        top = HEADER + row * cell
        grid.paste(crops[row].resize((cell, cell), Image.Resampling.BICUBIC), (0, top))
        for head in range(heads):
            tile = Image.fromarray(colours[row, head]).resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(tile, ((1 + head) * cell, top))
    return grid


def attention_figure(
    ckpt: str,
    images: Sequence[str],
    out: str | Path = "attention.png",
    backbone: str | None = None,
    teacher: bool = False,
    block: int = -1,
    img_size: int | None = None,
    backbone_kwargs: dict | None = None,
    average_heads: bool = False,
) -> Path:
    """Load the checkpoint's ViT, draw the CLS attention grid of ``images`` and write it to ``out`` (PNG):
    one map per head, or with ``average_heads`` one head-averaged map per image (MVP Figure 3)."""
    from ssl_zoo.checkpoints import load_backbone

    kwargs = {**(backbone_kwargs or {}), **({"img_size": img_size} if img_size else {})}
    model = load_backbone(ckpt, backbone=backbone, backbone_kwargs=kwargs or None, teacher=teacher)
    crops, batch = load_images(images, input_size(model))
    if average_heads:
        attention, labels = head_averaged_cls_attention(model, batch, block).unsqueeze(1), ["mean of heads"]
    else:
        attention, labels = cls_attention(model, batch, block), None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    render_attention_grid(crops, attention, labels=labels).save(out, format="PNG")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssl_zoo.cli.viz", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("attention", help="PNG grid of the CLS token's attention, per head or averaged over the "
                                         "heads (MVP Figure 3)")
    p.add_argument("--ckpt", required=True, help="ssl_zoo pre-training checkpoint or plain timm state dict")
    p.add_argument("--images", required=True, nargs="+", help="image files and/or directories of images")
    p.add_argument("--out", default="attention.png", help="PNG to write (default: attention.png)")
    p.add_argument("--backbone", default=None, help="timm name; required for plain state dicts")
    p.add_argument("--teacher", action="store_true", help="draw the checkpoint's momentum/EMA teacher")
    p.add_argument("--block", type=int, default=-1, help="transformer block whose attention is drawn (default: last)")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the checkpoint's)")
    p.add_argument("--average-heads", action="store_true",
                   help="one map per image, the mean of the heads' maps (MVP Figure 3) instead of one per head")
    p.add_argument("--backbone-kwargs", type=json.loads, default=None,
                   help='JSON Backbone arguments for a plain state dict, e.g. \'{"model_kwargs": {"depth": 6}}\'')
    args = parser.parse_args(argv)
    try:
        out = attention_figure(args.ckpt, args.images, args.out, args.backbone, args.teacher, args.block,
                               args.img_size, args.backbone_kwargs, args.average_heads)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
