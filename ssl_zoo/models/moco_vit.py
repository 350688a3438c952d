"""The ViT as MoCo v3 builds it (Chen, Xie, He 2021, §4.2 and moco-v3 ``vits.py``), applied to a timm ViT.

MoCo v3's ``VisionTransformerMoCo`` differs from a plain timm ViT in four ways, all reproduced here:

1. a *fixed* 2-D sin-cos position embedding (zeros for the class token), not learned;
2. every ``nn.Linear`` xavier-uniform with zero bias, the fused ``qkv`` projection initialised as three
   separate ``D x D`` matrices (bound ``sqrt(6 / (D + D))`` rather than ``sqrt(6 / (3D + D))``);
3. the class token drawn from N(0, 1e-6^2); the patch projection (a conv) xavier-uniform over its flattened
   ``3 * p * p`` fan-in, zero bias;
4. optionally (``--stop-grad-conv1``, on in every ViT recipe) the patch projection frozen at its random init,
   the paper's fix for the training instability.

Everything else (LayerNorm eps 1e-6, qkv bias, MLP ratio 4) is already timm's ``vit_*_patch16_224``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["init_moco_v3_vit", "sincos_2d_position_embedding"]


def sincos_2d_position_embedding(grid_size: tuple[int, int], embed_dim: int, temperature: float = 10000.0) -> Tensor:
    """MoCo v3's fixed 2-D sin-cos embedding of a ``grid_size = (h, w)`` patch grid: ``[h*w, embed_dim]``.

    Four blocks of ``embed_dim / 4`` channels, ``[sin(a * omega), cos(a * omega), sin(b * omega), cos(b * omega)]``
    with ``omega_k = temperature^(-k / (embed_dim/4))``; ``(a, b)`` are the coordinates of a patch as MoCo v3's
    ``torch.meshgrid(grid_w, grid_h)`` (``ij`` indexing) enumerates them: the first coordinate is the slow one
    in the token order, i.e. the row on a square grid.
    """
    h, w = grid_size
    if embed_dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs an embed_dim divisible by 4, got {embed_dim}")
    grid_a, grid_b = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                                    indexing="ij")
    pos_dim = embed_dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)  # [D/4]
    out_a = grid_a.flatten()[:, None] * omega[None]  # [h*w, D/4]
    out_b = grid_b.flatten()[:, None] * omega[None]
    return torch.cat([out_a.sin(), out_a.cos(), out_b.sin(), out_b.cos()], dim=1)  # [h*w, D]


@torch.no_grad()
def init_moco_v3_vit(model: nn.Module, freeze_patch_projection: bool = True) -> nn.Module:
    """Re-initialise a timm ``VisionTransformer`` in place as MoCo v3's ``VisionTransformerMoCo``.

    Args:
        model: a timm ``VisionTransformer`` (``patch_embed.proj`` a conv, ``pos_embed`` over prefix + patches).
        freeze_patch_projection: fix the random patch projection (MoCo v3 ``--stop-grad-conv1``).

    Returns:
        ``model``, for chaining. The position embedding is set and excluded from training
        (``requires_grad=False``); with ``freeze_patch_projection`` so is the patch projection.
    """
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise ValueError(f"MoCo v3's ViT initialisation needs a timm VisionTransformer, got {type(model).__name__}")
    embed_dim = model.embed_dim
    # (1) fixed 2-D sin-cos position embedding; prefix (class) tokens get zeros, as MoCo v3's pe_token.
    patches = sincos_2d_position_embedding(tuple(model.patch_embed.grid_size), embed_dim)  # [N, D]
    num_pos = model.pos_embed.shape[1]
    prefix = num_pos - patches.shape[0]
    if prefix < 0:
        raise ValueError(f"pos_embed has {num_pos} positions for a {tuple(model.patch_embed.grid_size)} patch grid")
    table = torch.cat([torch.zeros(prefix, embed_dim), patches])[None]  # [1, prefix + N, D]
    model.pos_embed.copy_(table.to(model.pos_embed))
    model.pos_embed.requires_grad_(False)

    # (2) xavier-uniform linears, q, k and v treated as three matrices; zero biases.
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if "qkv" in name:
                fan_out, fan_in = module.weight.shape[0] // 3, module.weight.shape[1]
                bound = math.sqrt(6.0 / float(fan_out + fan_in))
                nn.init.uniform_(module.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    # (3) class token and patch projection.
    if getattr(model, "cls_token", None) is not None:
        nn.init.normal_(model.cls_token, std=1e-6)
    proj = model.patch_embed.proj
    bound = math.sqrt(6.0 / float(proj.weight[0].numel() + embed_dim))  # fan-in 3 * p * p, fan-out D
    nn.init.uniform_(proj.weight, -bound, bound)
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)
    # (4) MoCo v3 §4.2: the random patch projection stays fixed.
    if freeze_patch_projection:
        proj.requires_grad_(False)
    return model
