"""Multimodality-guided feature alignment loss of MVP (Eq. 9)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ssl_zoo.losses.precision import float32_math

__all__ = ["mvp_alignment_loss"]


@float32_math
def mvp_alignment_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Negative mean token-wise cosine similarity between predicted and teacher features (MVP Eq. 9).

    Per image, with ``cos_0`` the CLS token and ``cos_m`` patch token ``m``:

    * ``mask=None``: ``-(cos_0 + sum_{m=1..M} cos_m) / (M + 1)``;
    * ``mask`` given: ``-(cos_0 + sum_{m masked} cos_m) / (1 + number masked)`` (masked tokens only).

    The result is averaged over the batch. ``target`` is used as given: the caller produces it
    without gradient (frozen CLIP teacher).

    Args:
        pred: ``[B, 1+M, D]`` student features, CLS token first (computed in float32).
        target: ``[B, 1+M, D]`` teacher features.
        mask: optional ``[B, M]`` bool, True at masked patch tokens.

    Returns:
        Scalar float32 loss over this rank's batch.
    """
    if pred.shape != target.shape or pred.ndim != 3 or pred.shape[1] < 1:
        raise ValueError(
            f"pred and target must both have shape [B, 1+M, D], got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)  # [B, 1+M]
    if mask is None:
        return -cos.mean(dim=1).mean()
    b, m = pred.shape[0], pred.shape[1] - 1
    if tuple(mask.shape) != (b, m):
        raise ValueError(f"mask must have shape [B, M] = {(b, m)}, got {tuple(mask.shape)}")
    weights = mask.float()  # [B, M]
    total = cos[:, 0] + (cos[:, 1:] * weights).sum(dim=1)  # [B] CLS + masked patches
    return -(total / (1.0 + weights.sum(dim=1))).mean()
