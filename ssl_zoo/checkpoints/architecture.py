"""What a state dict cannot say about its backbone, and the check that a built backbone agrees with it.

Shapes give a ViT's width, depth, patch size and position grid, but not its number of attention heads (a
ViT-S/16 with 6 heads and one with 12 have tensors of the same shapes), its pooling, the epsilon of its
LayerNorms, its activation or whether it normalises the tokens before the first block. Each public layout
(:mod:`ssl_zoo.checkpoints.layouts`) knows these from its official model code and states them as an
:class:`Architecture`: a timm name with the :class:`~ssl_zoo.models.Backbone` arguments that rebuild it, plus
the ``facts`` that :func:`check_facts` compares with the backbone actually built, so that weights are never
loaded into a model that computes something else.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Architecture", "check_facts", "describe_state_dict", "model_facts", "resnet_name", "vit_grid",
           "vit_shape"]

_RESNET_DEPTHS = {  # (blocks per stage, bottleneck) -> timm name (torchvision's layer names and widths)
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}
_RESNET_STEM = 64  # every torchvision / timm ResNet above starts with 64 channels
_VIT_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}


@dataclass(frozen=True)
class Architecture:
    """A backbone as its official code builds it.

    ``name`` and ``kwargs`` rebuild it (``Backbone(name, **kwargs)``; ``name`` is None where the layout cannot
    name it and the user must). ``facts`` are what the tensors' shapes cannot tell (``num_heads``,
    ``norm_eps``, ``act``, ``pre_norm``, ``global_pool``), compared by :func:`check_facts`; ``described`` says
    in words what the file holds and which official code the facts come from.
    """

    name: str | None
    kwargs: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    described: str = ""


def resnet_name(state: Mapping[str, Tensor]) -> str | None:
    """The timm (= torchvision) ResNet name of a state dict with standard widths, else None."""
    if "conv1.weight" not in state or not any(k.startswith("layer4.") for k in state):
        return None
    blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    bottleneck = any(".conv3." in k for k in state)
    if state["conv1.weight"].shape[0] != _RESNET_STEM:
        return None
    return _RESNET_DEPTHS.get((blocks, bottleneck))


def vit_shape(state: Mapping[str, Tensor]) -> tuple[int, int, int] | None:
    """``(width, depth, patch)`` of a ViT / BEiT state dict under timm names, else None."""
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.dim() != 4 or any(k.startswith("layers.") for k in state):
        return None
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    return int(proj.shape[0]), depth, int(proj.shape[-1])


def vit_grid(state: Mapping[str, Tensor]) -> int | None:
    """Side of the square patch grid a ViT / BEiT was built for: from its absolute position embedding (class
    token + k^2, or k^2), else from a relative position bias table ((2k-1)^2 + 3 entries, BEiT)."""
    pos = state.get("pos_embed")
    if pos is not None and pos.dim() == 3:
        for prefix in (1, 0):  # 1 + k^2 is never a square, so the two readings cannot both fit
            side = math.isqrt(pos.shape[1] - prefix)
            if side > 0 and side * side == pos.shape[1] - prefix:
                return side
        return None
    table = next((v for k, v in state.items() if k.endswith("relative_position_bias_table")), None)
    if table is not None:
        span = math.isqrt(table.shape[0] - 3)
        if span * span == table.shape[0] - 3 and span % 2 == 1:
            return (span + 1) // 2
    return None


def describe_state_dict(state_dict: Mapping[str, Tensor]) -> str:
    """A short guess of the architecture a timm state dict belongs to (for error messages)."""
    keys = list(state_dict)
    if "conv1.weight" in state_dict and any(k.startswith("layer4.") for k in keys):
        name = resnet_name(state_dict)
        if name:
            return name
        blocks = tuple(len({k.split(".")[1] for k in keys if k.startswith(f"layer{i}.")}) for i in range(1, 5))
        kind = "bottleneck" if any(".conv3." in k for k in keys) else "basic"
        return f"a ResNet (blocks {blocks}, {kind}, stem {state_dict['conv1.weight'].shape[0]})"
    proj = state_dict.get("patch_embed.proj.weight")
    if proj is not None:
        dim, patch = int(proj.shape[0]), int(proj.shape[-1])
        if any(k.startswith("layers.") for k in keys):
            depths = [n for i in range(8)
                      if (n := len({k.split(".")[3] for k in keys if re.match(rf"layers\.{i}\.blocks\.\d+\.", k)}))]
            return f"a Swin (embed dim {dim}, patch {patch}, depths {tuple(depths)})"
        _, depth, _ = vit_shape(state_dict)
        size = _VIT_SIZES.get(dim)
        if any("relative_position_bias_table" in k for k in keys):  # BEiT: relative position biases
            shared = "shared" if "rel_pos_bias.relative_position_bias_table" in state_dict else "per-block"
            guess = f"beit_{size}_patch{patch}" if size and depth in (12, 24) else "a BEiT"
            return f"{guess} (embed dim {dim}, {depth} blocks, patch {patch}, {shared} relative position bias)"
        pos = state_dict.get("pos_embed")
        guess = f"vit_{size}_patch{patch}" if size and depth in (12, 24, 32) else "a ViT"
        grid = f", {pos.shape[1]} positions" if pos is not None else ""
        return f"{guess} (embed dim {dim}, {depth} blocks, patch {patch}{grid})"
    return f"an unknown architecture ({len(keys)} tensors, e.g. {', '.join(keys[:3])})"


def model_facts(model: nn.Module) -> dict[str, Any]:
    """The facts of a built timm ViT / BEiT (empty for other families): heads, LayerNorm epsilon, activation,
    a norm before the first block, pooling."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or len(blocks) == 0:
        return {}
    block = blocks[0]
    norm_pre = getattr(model, "norm_pre", None)
    return {
        "num_heads": int(block.attn.num_heads),
        "norm_eps": float(block.norm1.eps),
        "act": type(block.mlp.act).__name__,
        "pre_norm": isinstance(norm_pre, nn.LayerNorm),
        "global_pool": getattr(model, "global_pool", None),
    }


#: Facts whose difference changes what the loaded weights compute; a different pooling is a choice of the
#: evaluation (BEiT's fine-tuning pools the mean of a model pre-trained on its class token), not an error.
BINDING_FACTS = ("num_heads", "norm_eps", "act", "pre_norm")
_HOW_TO_SET = {
    "num_heads": lambda v: f"model_kwargs {{num_heads: {v}}}",
    "norm_eps": lambda v: f"a backbone whose LayerNorm epsilon is {v:g}",
    "act": lambda v: f"a backbone with {v} (e.g. timm's *_clip_quickgelu_* models for QuickGELU)",
    "pre_norm": lambda v: "a backbone with a LayerNorm before the first block (timm's *_clip_* ViTs)" if v
    else "a backbone without a LayerNorm before the first block",
}


def check_facts(architecture: Architecture, model: nn.Module, source: str, requested: str) -> None:
    """Refuse to load ``architecture``'s weights into a ``model`` that would compute other features.

    Raises:
        ValueError: one line per differing fact, naming the file, what its official code builds, what the
            requested backbone has and what to set.
    """
    built = model_facts(model)
    differences = [(k, v, built[k]) for k, v in architecture.facts.items()
                   if k in BINDING_FACTS and k in built and built[k] != v]
    if not differences:
        return
    what = "; ".join(f"{k} {v!r} in the checkpoint's architecture, {b!r} in '{requested}'" for k, v, b in differences)
    fixes = ", ".join(_HOW_TO_SET[k](v) for k, v, _ in differences)
    suggestion = f"leave model.backbone unset to use {architecture.name}" if architecture.name else ""
    raise ValueError(
        f"'{source}' holds {architecture.described or 'a backbone'}, which backbone '{requested}' does not "
        f"build ({what}): set {fixes}{', or ' + suggestion if suggestion else ''}"
    )


@torch.no_grad()
def default_facts(name: str) -> dict[str, Any]:
    """The facts of a timm model as its name builds it (on the meta device: no memory, no time)."""
    import timm

    with torch.device("meta"):
        return model_facts(timm.create_model(name, pretrained=False, num_classes=0))
