"""Symmetric KL distillation between student and teacher predictions (HVP-MTL Eq. 6)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ssl_zoo.losses.precision import float32_math

__all__ = ["SymmetricKLDivergence", "symmetric_kl_divergence"]


@float32_math
def symmetric_kl_divergence(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """``KL(p_s || p_t) + KL(p_t || p_s)`` of ``p = softmax(logits / T)``, averaged over the batch (HVP-MTL Eq. 6).

    Computed as ``sum_c (p_s - p_t) * (log p_s - log p_t)``, which equals the sum of both
    divergences. Only the student receives a gradient (through both terms); the teacher's logits
    are detached, as a distillation target.

    Args:
        student_logits: ``[B, C]`` (any float dtype; computed in float32).
        teacher_logits: ``[B, C]``.
        temperature: softmax temperature ``T > 0``.

    Returns:
        Scalar float32 loss over this rank's batch.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(
            f"student_logits and teacher_logits must both have shape [B, C], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)  # [B, C]
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)  # [B, C]
    per_sample = ((log_p_s.exp() - log_p_t.exp()) * (log_p_s - log_p_t)).sum(dim=1)  # [B]
    return per_sample.mean()


class SymmetricKLDivergence(nn.Module):
    """Symmetric KL distillation loss (HVP-MTL Eq. 6); see :func:`symmetric_kl_divergence`.

    Args:
        temperature: softmax temperature ``T > 0``.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """``[B, C]`` logits of both models -> scalar loss."""
        return symmetric_kl_divergence(student_logits, teacher_logits, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
