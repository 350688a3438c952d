"""Multi-projector contrastive learning terms of MPCL (Eq. 2-4), and the weight-orthogonality alternative to PCR.

The three contract functions (:func:`projector_contrastive_regularization`, :func:`ptb_weights` = the bare
softmax of Eq. 3, :func:`mpcl_total_loss` = Eq. 4 as printed) are used as they stand; :func:`ptb_loss_weights`
is the loss-scale reading of Eq. 3-4 the method trains with (see its docstring).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_zoo.losses.precision import float32_math

__all__ = [
    "mpcl_total_loss",
    "projector_contrastive_regularization",
    "projector_weight_orthogonality",
    "ptb_loss_weights",
    "ptb_weights",
]

PTBScale = Literal["projectors", "literal"]


@float32_math
def projector_contrastive_regularization(z: Tensor) -> Tensor:
    """Projector contrastive regularisation (MPCL Eq. 2), one value per projector.

    ``pcr_m = mean_b (1/(Mp-1)) * sum_{l != m} cos(z_b^m, z_b^l)``: the similarity between the
    outputs of different projectors for the *same* sample. Adding it to the loss pushes the
    projectors apart, so gradients flow to every projector (it is a regulariser, not a target).

    Args:
        z: ``[Mp, B, D]`` outputs of ``Mp >= 2`` projectors (computed in float32).

    Returns:
        ``[Mp]`` float32 batch averages over this rank's batch.
    """
    if z.ndim != 3 or z.shape[0] < 2:
        raise ValueError(f"z must have shape [Mp, B, D] with Mp >= 2 projectors, got {tuple(z.shape)}")
    num_proj = z.shape[0]
    z = F.normalize(z.float(), dim=-1)  # [Mp, B, D]
    cos = torch.einsum("mbd,lbd->bml", z, z)  # [B, Mp, Mp] per-sample projector similarities
    off_diagonal = ~torch.eye(num_proj, dtype=torch.bool, device=z.device)  # [Mp, Mp], l != m
    per_sample = torch.where(off_diagonal, cos, 0.0).sum(dim=2) / (num_proj - 1)  # [B, Mp]
    return per_sample.mean(dim=0)


@float32_math
def ptb_weights(acc: Tensor, epsilon: float = 0.5) -> Tensor:
    """Performance-based task balancing weights (MPCL Eq. 3): ``softmax((1 - acc) / epsilon)``.

    Projectors with lower accuracy get larger weights. No gradient flows through the weights.

    Args:
        acc: ``[Mp]`` each projector's mean contrastive top-1 accuracy over the previous epoch, as a
            fraction in ``[0, 1]``.
        epsilon: softmax temperature, ``> 0``.

    Returns:
        ``[Mp]`` float32 weights summing to 1.
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if acc.ndim != 1:
        raise ValueError(f"acc must have shape [Mp], got {tuple(acc.shape)}")
    acc = acc.detach().float()
    if bool(((acc < 0) | (acc > 1)).any()):
        raise ValueError(f"acc must be fractions in [0, 1] (not percentages), got {acc.tolist()}")
    return torch.softmax((1.0 - acc) / epsilon, dim=0)


@float32_math
def projector_weight_orthogonality(weights: Sequence[Tensor]) -> Tensor:
    """Orthogonality constraint on the projectors' weights (the MPCL Table II alternative to PCR), one value per
    projector.

    Table II: "'Orth.' means weights of MPHs were constrained to be orthogonal". The constraint is *between*
    projectors (the table compares ways of making the projectors differ), on the first layer each projector owns,
    the one that reads the input all projectors share: the output layer ``W_m [d_m, H]`` when the projectors
    share their hidden layers (it reads the shared hidden feature), the first hidden layer ``[H_m, D]`` of each
    separate MLP (it reads the backbone feature). Two projectors' weights are orthogonal when every row of one is
    orthogonal to every row of the other, i.e. they read orthogonal subspaces of the common input:

        orth_m = (1/(Mp-1)) * sum_{l != m} mean_{i, j} cos(W_m[i], W_l[j])^2
               = (1/(Mp-1)) * sum_{l != m} ||U_m U_l^T||_F^2 / (d_m d_l),   U = W with unit-norm rows

    The squared Frobenius norm of the cross-Gram matrix is the usual soft orthogonality penalty; taking it on
    unit-norm rows and averaging over the ``d_m d_l`` pairs makes it depend only on the directions (a penalty on
    raw weights could also be lowered by shrinking them, which is weight decay, not orthogonality) and keeps it
    in [0, 1], PCR's scale, so that it fills Eq. 4's regulariser slot with the same lambda. It is 0 exactly for
    mutually orthogonal projectors (possible when ``sum_m d_m <= D``), 1 when all rows are parallel.

    Args:
        weights: ``Mp >= 2`` matrices ``[d_m, D]`` with the same input width ``D`` (computed in float32). It
            reads no batch, so it is the same on every process.

    Returns:
        ``[Mp]`` float32 penalties.
    """
    if len(weights) < 2:
        raise ValueError(f"the orthogonality constraint needs Mp >= 2 projectors' weights, got {len(weights)}")
    if any(w.ndim != 2 for w in weights) or len({w.shape[1] for w in weights}) != 1:
        raise ValueError(f"weights must be matrices [d_m, D] reading one input width D, got "
                         f"{[tuple(w.shape) for w in weights]}")
    units = [F.normalize(w.float(), dim=1) for w in weights]  # [d_m, D], unit rows
    num_proj = len(units)
    zero = units[0].new_zeros(())
    pair = [[zero] * num_proj for _ in range(num_proj)]  # mean squared cosine between projectors m and o
    for m in range(num_proj):
        for o in range(m + 1, num_proj):
            pair[m][o] = pair[o][m] = (units[m] @ units[o].T).pow(2).mean()  # ||U_m U_o^T||_F^2 / (d_m d_o)
    pair = torch.stack([torch.stack(row) for row in pair])  # [Mp, Mp], zero diagonal
    return pair.sum(dim=1) / (num_proj - 1)


@torch.no_grad()
def ptb_loss_weights(acc: Tensor, epsilon: float = 0.5, scale: PTBScale = "projectors") -> Tensor:
    """The weights w_m that multiply the projectors' losses in Eq. 4 when PTB is on.

    Eq. 4 averages over the projectors, ``(1/Mp) * sum_m (w_m L_m + lam PCR_m)``; with the bare softmax of
    Eq. 3 as ``w_m`` (summing to 1) the contrastive part would be ``1/Mp`` of the mean projector loss, so
    switching PTB on would also divide the loss (and the gradient reaching the backbone) by ``Mp`` against PTB
    off (``w_m = 1``). Our reading: PTB *re-weights* the projectors, it does not shrink the loss, so the
    default ``scale="projectors"`` uses ``Mp * softmax((1 - acc) / epsilon)``, which sums to ``Mp`` and is 1
    for every projector when their accuracies are equal (exactly the PTB-off loss). ``scale="literal"`` keeps
    the bare softmax of Eq. 3 (:func:`ptb_weights`).

    Args:
        acc: ``[Mp]`` each projector's mean top-1 accuracy over the previous epoch, fractions in ``[0, 1]``.
        epsilon: softmax temperature of Eq. 3.
        scale: ``projectors`` (``Mp * softmax``) or ``literal`` (``softmax``).

    Returns:
        ``[Mp]`` float32 weights.
    """
    if scale not in ("projectors", "literal"):
        raise ValueError(f"scale must be 'projectors' or 'literal', got '{scale}'")
    weights = ptb_weights(acc, epsilon)  # [Mp], sums to 1 (Eq. 3)
    return weights * acc.shape[0] if scale == "projectors" else weights


@float32_math
def mpcl_total_loss(losses: Tensor, pcr: Tensor, weights: Tensor, lam: float = 0.01) -> Tensor:
    """MPCL objective (Eq. 4): ``(1/Mp) * sum_m (weights_m * losses_m + lam * pcr_m)``.

    Args:
        losses: ``[Mp]`` batch-averaged contrastive loss of each projector.
        pcr: ``[Mp]`` batch-averaged :func:`projector_contrastive_regularization`.
        weights: ``[Mp]`` :func:`ptb_weights` (treated as constants).
        lam: weight of the regulariser, ``>= 0``.

    Returns:
        Scalar float32 loss.
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if not (losses.ndim == 1 and losses.shape == pcr.shape == weights.shape):
        raise ValueError(
            f"losses, pcr and weights must all have shape [Mp], got {tuple(losses.shape)}, "
            f"{tuple(pcr.shape)} and {tuple(weights.shape)}"
        )
    per_projector = weights.detach().float() * losses.float() + lam * pcr.float()  # [Mp]
    return per_projector.mean()
