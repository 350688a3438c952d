"""Weighted asymmetric loss for multi-label classification (HVP-MTL Eq. 1, after Ridnik et al.'s ASL)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssl_zoo.losses.precision import float32_math

__all__ = ["WeightedAsymmetricLoss", "weighted_asymmetric_loss"]


@float32_math
def weighted_asymmetric_loss(
    logits: Tensor,
    targets: Tensor,
    eta: float = 10.0,
    gamma_pos: float = 4.0,
    gamma_neg: float = 1.0,
    eps: float = 1e-8,
) -> Tensor:
    """HVP-MTL Eq. 1, summed over classes and averaged over the batch.

    With ``p = sigmoid(logits)``:
    ``loss = -( y * eta * (1-p)^gamma_pos * log(max(p, eps)) + (1-y) * p^gamma_neg * log(max(1-p, eps)) )``.

    ``eta`` up-weights the rare positives; ``gamma_pos``/``gamma_neg`` focus each side on hard
    examples. The focusing weights keep their gradient, as the equation is written.

    Args:
        logits: ``[B, C]`` raw scores (any float dtype; computed in float32).
        targets: ``[B, C]`` labels in ``{0, 1}``, or soft confidences in ``[0, 1]`` used as ``y``.
        eta: weight of the positive term, ``> 0``.
        gamma_pos: focusing exponent of positives, ``>= 0``.
        gamma_neg: focusing exponent of negatives, ``>= 0``.
        eps: floor inside the logarithms, ``> 0``.

    Returns:
        Scalar float32 loss (this rank's batch only; no gather).
    """
    if logits.shape != targets.shape or logits.ndim != 2:
        raise ValueError(
            f"logits and targets must both have shape [B, C], got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    p = torch.sigmoid(logits.float())  # [B, C]
    y = targets.float()
    loss_pos = y * eta * (1.0 - p).pow(gamma_pos) * torch.log(p.clamp(min=eps))
    loss_neg = (1.0 - y) * p.pow(gamma_neg) * torch.log((1.0 - p).clamp(min=eps))
    return -(loss_pos + loss_neg).sum(dim=1).mean()


class WeightedAsymmetricLoss(nn.Module):
    """Weighted asymmetric multi-label loss of HVP-MTL (Eq. 1); see :func:`weighted_asymmetric_loss`.

    Args:
        eta: weight of the positive term, ``> 0``.
        gamma_pos: focusing exponent of positives, ``>= 0``.
        gamma_neg: focusing exponent of negatives, ``>= 0``.
        eps: floor inside the logarithms, ``> 0``.
    """

    def __init__(
        self, eta: float = 10.0, gamma_pos: float = 4.0, gamma_neg: float = 1.0, eps: float = 1e-8
    ) -> None:
        super().__init__()
        if eta <= 0:
            raise ValueError(f"eta must be > 0, got {eta}")
        if gamma_pos < 0 or gamma_neg < 0:
            raise ValueError(f"gamma_pos and gamma_neg must be >= 0, got {gamma_pos} and {gamma_neg}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eta = eta
        self.gamma_pos = gamma_pos
        self.gamma_neg = gamma_neg
        self.eps = eps

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """``logits, targets: [B, C]`` -> scalar loss."""
        return weighted_asymmetric_loss(logits, targets, self.eta, self.gamma_pos, self.gamma_neg, self.eps)

    def extra_repr(self) -> str:
        return f"eta={self.eta}, gamma_pos={self.gamma_pos}, gamma_neg={self.gamma_neg}, eps={self.eps}"
