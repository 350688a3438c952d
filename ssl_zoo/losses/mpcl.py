"""The multi-projector terms of MPCL (Eq. 2, Eq. 4), the Table II weight-orthogonality alternative to PCR, and
:class:`MPCLLoss`, which assembles Eq. 4 from the projectors' framework losses for every MPCL method.

The contract functions (:func:`projector_contrastive_regularization` = Eq. 2, :func:`mpcl_total_loss` = Eq. 4 as
printed; Eq. 3 is :func:`ssl_zoo.losses.ptb.ptb_weights`) are used as they stand.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_zoo.losses.precision import float32_math
from ssl_zoo.losses.ptb import ProjectorTrainingBalance, PTBScale
from ssl_zoo.utils.distributed import all_reduce_sum

__all__ = [
    "MPCLLoss",
    "mpcl_total_loss",
    "projector_contrastive_regularization",
    "projector_weight_orthogonality",
]


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


@float32_math
def mpcl_total_loss(losses: Tensor, pcr: Tensor, weights: Tensor, lam: float = 0.01) -> Tensor:
    """MPCL objective (Eq. 4): ``(1/Mp) * sum_m (weights_m * losses_m + lam * pcr_m)``.

    Args:
        losses: ``[Mp]`` batch-averaged contrastive loss of each projector.
        pcr: ``[Mp]`` batch-averaged :func:`projector_contrastive_regularization`.
        weights: ``[Mp]`` PTB's weights, :func:`~ssl_zoo.losses.ptb.ptb_weights` (treated as constants).
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


class MPCLLoss(nn.Module):
    """Eq. 4 over ``Mp`` projectors' losses: PTB's weights (Eq. 3), PCR (Eq. 2) in the regulariser slot.

        L = (1/Mp) * sum_m ( w_m * L_m + lam * R_m ),   R_m = PCR_m (+ the Table II orthogonality term)

    The framework (MoCo v2 / v3, Barlow Twins) computes each projector's loss ``L_m`` and contrastive top-1
    accuracy; :meth:`forward` adds the regulariser, weights the losses with :attr:`ptb` (its state: the epoch's
    accuracy counts, which each call extends) and returns the loss with the step's statistics over the global
    batch. With one projector PCR and the orthogonality term are undefined and left out, and PTB's weight is 1:
    the loss is the framework's own.

    Distributed: the framework losses come in as the framework computes them (MoCo's and Barlow Twins' see the
    global batch); PCR compares projectors on the same sample, so it averages over this rank's batch and DDP's
    gradient average makes it the global mean. PTB's counts and the returned statistics are summed over all ranks.

    Args:
        num_projectors: ``Mp >= 1``.
        lam: lambda, the weight of the regulariser in Eq. 4 (0.01).
        pcr: add PCR (Eq. 2), averaged over the views whose projections are given.
        orthogonality: add the Table II alternative, :func:`projector_weight_orthogonality` of the projectors'
            own weights, in the same slot with the same ``lam``.
        ptb: weight the losses by PTB (Eq. 3); ``False`` keeps ``w_m = 1``.
        epsilon: the softmax temperature of Eq. 3 (0.5).
        ptb_scale: ``projectors`` or ``literal``, see :mod:`ssl_zoo.losses.ptb`.
        gather_distributed: reduce the accuracy counts and statistics over all ranks (no-op on one process).
    """

    def __init__(self, num_projectors: int, lam: float = 0.01, pcr: bool = True, orthogonality: bool = False,
                 ptb: bool = True, epsilon: float = 0.5, ptb_scale: PTBScale = "projectors",
                 gather_distributed: bool = True) -> None:
        super().__init__()
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.lam, self.pcr, self.orthogonality = lam, pcr, orthogonality
        self.gather_distributed = gather_distributed
        self.ptb = ProjectorTrainingBalance(num_projectors, epsilon, ptb_scale, enabled=ptb,
                                            gather_distributed=gather_distributed)

    def regularizers(self, projections: Sequence[Tensor],
                     projector_weights: Sequence[Tensor] | None = None) -> dict[str, Tensor]:
        """The terms of Eq. 4's regulariser slot, each ``[Mp]``: ``pcr`` (Eq. 2, the mean over the views'
        projections ``[Mp, B, D]``) and / or ``orthogonality``; none with one projector."""
        terms: dict[str, Tensor] = {}
        if projections[0].shape[0] < 2:
            return terms
        if self.pcr:
            terms["pcr"] = torch.stack([projector_contrastive_regularization(z) for z in projections]).mean(dim=0)
        if self.orthogonality:
            if projector_weights is None:
                raise ValueError("the orthogonality term needs the projectors' own weights (projector_weights)")
            terms["orthogonality"] = projector_weight_orthogonality(projector_weights)
        return terms

    def forward(self, losses: Tensor, accs: Tensor, projections: Sequence[Tensor], batch_size: int,
                projector_weights: Sequence[Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Eq. 4 and the step's statistics.

        Args:
            losses: ``[Mp]`` each projector's batch-averaged framework loss (Eq. 1 for MoCo).
            accs: ``[Mp]`` each projector's top-1 accuracy over this rank's ``batch_size`` queries (fed to PTB).
            projections: the projector outputs ``[Mp, B, D]`` of each view that PCR compares (before any predictor).
            batch_size: this rank's number of images.
            projector_weights: :meth:`~ssl_zoo.models.multi_projector.MultiProjector.distinct_weights`, for the
                orthogonality term.

        Returns:
            The scalar float32 loss, and detached statistics over the global batch: ``proj{m}/loss``, ``/acc``,
            ``/weight`` (and ``/pcr``, ``/orthogonality`` when present) per projector, their means ``loss_contrastive``,
            ``pcr`` (0 when off), ``orthogonality`` (when on) and ``acc``.
        """
        terms = self.regularizers(projections, projector_weights)
        regularizer = sum(terms.values()) if terms else torch.zeros_like(losses)  # [Mp]
        weights = self.ptb.loss_weights()  # [Mp], this epoch's constants
        loss = mpcl_total_loss(losses, regularizer, weights, lam=self.lam)
        return loss, self.statistics(losses, terms, accs, batch_size, weights)

    @torch.no_grad()
    def statistics(self, losses: Tensor, terms: dict[str, Tensor], accs: Tensor, batch_size: int,
                   weights: Tensor) -> dict[str, Tensor]:
        """Add the step to PTB's counts and reduce its per-projector values over the global batch (one all-reduce
        besides PTB's)."""
        acc = self.ptb.update(accs, batch_size)  # [Mp] over the global batch
        names = ["pcr", "orthogonality"]
        n = torch.tensor([float(batch_size)], device=losses.device)
        values = torch.cat([losses.detach().float(), *(terms.get(name, torch.zeros_like(losses)).detach().float()
                                                       for name in names)]) * n
        values = torch.cat([values, n])
        if self.gather_distributed:
            values = all_reduce_sum(values)
        means = values[:-1].view(1 + len(names), -1) / values[-1]  # [3, Mp]: loss, pcr, orthogonality
        stats: dict[str, Tensor] = {}
        for m in range(losses.shape[0]):
            stats.update({f"proj{m}/loss": means[0, m], f"proj{m}/acc": acc[m], f"proj{m}/weight": weights[m]})
            stats.update({f"proj{m}/{name}": means[i, m] for i, name in enumerate(names, start=1) if name in terms})
        stats["loss_contrastive"] = means[0].mean()
        stats.update({name: means[i].mean() for i, name in enumerate(names, start=1) if name in terms or name == "pcr"})
        stats["acc"] = acc.mean()
        return stats
