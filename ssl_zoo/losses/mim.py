"""Masked image modelling reconstruction loss (HVP-MTL Eq. 4, SimMIM)."""

from __future__ import annotations

from torch import Tensor

from ssl_zoo.losses.precision import float32_math

__all__ = ["masked_l1_loss"]


@float32_math
def masked_l1_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """L1 reconstruction error on masked pixels only (HVP-MTL Eq. 4, SimMIM Eq. 1).

    ``sum_{masked pixels, channels} |pred - target| / (number of masked pixels * channels)``.

    A mask without any masked pixel gives 0 rather than NaN (0/0), still attached to ``pred``'s graph
    so that every parameter receives a (zero) gradient, which DDP requires.

    Args:
        pred: ``[B, C, H, W]`` reconstruction (any float dtype; computed in float32).
        target: ``[B, C, H, W]`` original pixels (normalised as the model's input).
        mask: ``[B, 1, H, W]`` with 1 (or True) at masked pixels; broadcast over channels.

    Returns:
        Scalar float32 loss over this rank's batch.
    """
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(
            f"pred and target must both have shape [B, C, H, W], got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    b, c, h, w = pred.shape
    if tuple(mask.shape) != (b, 1, h, w):
        raise ValueError(f"mask must have shape [B, 1, H, W] = {(b, 1, h, w)}, got {tuple(mask.shape)}")
    mask = mask.float()  # [B, 1, H, W]
    error = (pred.float() - target.float()).abs() * mask  # [B, C, H, W], zero outside the mask
    num_masked = mask.sum() * c
    return error.sum() / num_masked.clamp(min=1.0)
