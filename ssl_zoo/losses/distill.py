"""Symmetric KL distillation between student and teacher predictions (HVP-MTL Eq. 6).

Eq. 6 is ``L_mom = (KL(S, S') + KL(S', S)) / 2``: the *mean* of the two divergences, with no temperature
(``T = 1``). The temperature is kept as an option for other readings; HVP-MTL's default is 1.0 too.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ssl_zoo.losses.precision import float32_math

__all__ = ["SymmetricKLDivergence", "symmetric_kl_divergence"]


@float32_math
def symmetric_kl_divergence(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """``(KL(p_s || p_t) + KL(p_t || p_s)) / 2`` of ``p = softmax(logits / T)``, averaged over the batch (Eq. 6).

    Computed as ``0.5 * sum_c (p_s - p_t) * (log p_s - log p_t)``, which equals the mean of both
    divergences. Only the student receives a gradient (through both terms); the teacher's logits
    are detached, as a distillation target.

    Args:
        student_logits: ``[B, C]`` (any float dtype; computed in float32).
        teacher_logits: ``[B, C]``.
        temperature: softmax temperature ``T > 0``; Eq. 6 has none, i.e. 1.0.

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
    # KL(s||t) + KL(t||s) = sum_c (p_s - p_t)(log p_s - log p_t); Eq. 6 halves the sum.
    per_sample = 0.5 * ((log_p_s.exp() - log_p_t.exp()) * (log_p_s - log_p_t)).sum(dim=1)  # [B]
    return per_sample.mean()


class SymmetricKLDivergence(nn.Module):
    """Symmetric KL distillation loss (HVP-MTL Eq. 6); see :func:`symmetric_kl_divergence`.

    Args:
        temperature: softmax temperature ``T > 0`` (1.0: Eq. 6 has none).
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
