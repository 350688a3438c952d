"""``python -m ssl_zoo.checkpoints.convert IN OUT``: a published checkpoint -> an ssl_zoo backbone checkpoint.

Reads ``IN`` in any layout :mod:`ssl_zoo.checkpoints.layouts` knows (SimSiam, MoCo v1/v2/v3, DINO, MAE, BEiT /
BEiT v2, OpenAI CLIP, timm, torchvision), prints what it found (layout, which encoder, what was dropped, the
architecture and what it rests on), builds that architecture and loads the weights strictly, then writes
``OUT`` in the layout of an ssl_zoo pre-training checkpoint (``state_dict: backbone.model.*``, the architecture
in ``hyper_parameters``), so that every job takes it without naming a backbone::

    python -m ssl_zoo.checkpoints.convert vit-s-300ep.pth.tar mocov3_vits.pth   # MoCo v3 ViT-S/16
    make linear CKPT=mocov3_vits.pth

A file whose layout does not state its architecture (a bare timm ViT state dict) needs ``--backbone``
(``--backbone-kwargs '{model_kwargs: {num_heads: 12}}'`` for what the name does not build). Errors print one line
and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch
import yaml

from ssl_zoo.checkpoints.load import (
    STUDENT_PREFIX,
    backbone_from_weights,
    backbone_kwargs_of,
    read_backbone_weights,
)

__all__ = ["convert", "main"]


def convert(source: str | os.PathLike, out: str | os.PathLike, teacher: bool = False, backbone: str | None = None,
            backbone_kwargs: dict | None = None) -> list[str]:
    """Convert ``source`` into an ssl_zoo backbone checkpoint at ``out``; returns the report's lines."""
    weights = read_backbone_weights(source, teacher=teacher)
    model = backbone_from_weights(weights, backbone, backbone_kwargs)  # the check: strict load into the architecture
    name = backbone or weights.name
    kwargs = backbone_kwargs_of(weights, backbone_kwargs) if name == weights.name else dict(backbone_kwargs or {})
    img_size = kwargs.get("img_size") or weights.img_size
    hyper_parameters = {
        "backbone": name, "backbone_kwargs": kwargs, "img_size": img_size,
        "architecture_facts": dict(weights.architecture.facts),
        "architecture_described": weights.architecture.described,
        "converted_from": {"file": os.fspath(source), "layout": weights.layout, "encoder": weights.encoder,
                           "dropped": list(weights.dropped)},
    }
    state = {STUDENT_PREFIX + k: v.detach().clone() for k, v in model.model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save({"state_dict": state, "hyper_parameters": hyper_parameters}, out)
    shown = yaml.safe_dump(kwargs, default_flow_style=True, width=1000).strip()
    return [
        f"{source}: layout {weights.layout}, {weights.encoder}"
        + (f" (dropped: {', '.join(weights.dropped)})" if weights.dropped else ""),
        f"architecture: {name} {shown} ({weights.architecture.described})",
        f"wrote {out}: {len(state)} tensors, {sum(v.numel() for v in state.values()) / 1e6:.2f} M parameters; "
        f"evaluate it with e.g. `make linear CKPT={out}` (no backbone to name)",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssl_zoo.checkpoints.convert",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="the published checkpoint (.pth, .pth.tar, .pt, .ckpt, .safetensors)")
    parser.add_argument("out", help="where to write the ssl_zoo backbone checkpoint")
    parser.add_argument("--teacher", action="store_true",
                        help="take the momentum / EMA teacher (MoCo encoder_k / momentum_encoder, DINO teacher)")
    parser.add_argument("--backbone", default=None, help="timm name, for a file that does not state its architecture")
    parser.add_argument("--backbone-kwargs", default=None, type=yaml.safe_load,
                        help="Backbone arguments as YAML, e.g. '{model_kwargs: {num_heads: 12}}'")
    args = parser.parse_args(argv)
    try:
        lines = convert(args.source, args.out, args.teacher, args.backbone, args.backbone_kwargs)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
