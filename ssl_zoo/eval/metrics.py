"""Multi-label classification metrics in the form the multi-label literature reports them.

COCO / VOC multi-label papers (ML-GCN, ASL, BAM+IA-CLoss, HVP-MTL) report mAP plus the per-class (C*) and
overall (O*) precision, recall and F1 at a fixed score threshold. Two details differ from torchmetrics and
are the reason this module exists (see the contract, ``ssl_zoo.eval.metrics.multilabel_metrics``):

* a prediction is positive when ``score >= threshold`` (torchmetrics uses ``>``);
* CF1 is the harmonic mean of CP and CR, not the mean of per-class F1 scores, and mAP averages only the
  classes that have at least one positive (torchmetrics' macro AP counts the others as 0).

Everything is computed in float64 on the CPU: a validation set is at most a few hundred thousand scores.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["MULTILABEL_METRIC_NAMES", "average_precision", "multilabel_metrics"]

MULTILABEL_METRIC_NAMES: tuple[str, ...] = ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1")


def _check_inputs(scores: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    if scores.dim() != 2 or scores.shape != targets.shape:
        raise ValueError(
            f"scores and targets must both be [N, C]; got {tuple(scores.shape)} and {tuple(targets.shape)}"
        )
    scores = scores.detach().to("cpu", torch.float64)
    targets = targets.detach().to("cpu", torch.float64)
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if not ((targets == 0) | (targets == 1)).all():
        raise ValueError("targets must be multi-hot: every entry 0 or 1")
    return scores, targets


def average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Per-class average precision ``[C]`` (float64); NaN for a class without positives.

    AP_c = (1/|P_c|) * sum_{i in P_c} precision_c(s_ic), where P_c are the positives of class c and
    precision_c(t) = |{j in P_c : s_jc >= t}| / |{j : s_jc >= t}| is the precision at the rank of sample i.
    Samples with equal scores share one rank (all of them count as retrieved together), which makes AP
    independent of the order of ties; without ties this is the familiar mean of precision@rank over the
    positives (and equals scikit-learn's ``average_precision_score``).

    Args:
        scores: ``[N, C]`` scores (any monotone scale: probabilities or logits).
        targets: ``[N, C]`` in ``{0, 1}``.
    """
    scores, targets = _check_inputs(scores, targets)
    s = scores.t().contiguous()  # [C, N]
    y = targets.t().contiguous()
    order = s.argsort(dim=1, descending=True)
    s_sorted = s.gather(1, order)  # [C, N], descending
    y_sorted = y.gather(1, order)
    tp_cum = y_sorted.cumsum(dim=1)  # positives among the first r+1 ranked samples
    # Number of samples scoring >= s_sorted[c, r]: the end of r's tie group (searchsorted on ascending -s).
    neg_sorted = (-s_sorted).contiguous()
    n_retrieved = torch.searchsorted(neg_sorted, neg_sorted, right=True)  # [C, N], >= 1
    precision = tp_cum.gather(1, n_retrieved - 1) / n_retrieved  # precision at each sample's rank
    num_pos = y.sum(dim=1)  # [C]
    return (precision * y_sorted).sum(dim=1) / num_pos  # 0/0 = NaN for classes without positives


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0/0 defined as 0 (a class never predicted has precision 0, never NaN)."""
    return torch.where(den > 0, num / den.clamp_min(1), torch.zeros_like(num))


def _f1(p: float, r: float) -> float:
    return 2.0 * p * r / (p + r) if p + r > 0 else 0.0


def multilabel_metrics(scores: Tensor, targets: Tensor, threshold: float = 0.5) -> dict[str, float]:
    """mAP, CP, CR, CF1, OP, OR, OF1 in percent (ML-GCN / ASL / BAM+IA-CLoss protocol).

    * mAP: mean of :func:`average_precision` over the classes with at least one positive (NaN when no
      class has one).
    * A prediction is positive when ``score >= threshold``. With per class c the true positives TP_c,
      predicted positives NP_c and ground-truth positives NG_c:
      CP = mean_c TP_c / NP_c, CR = mean_c TP_c / NG_c (mean over all C classes; 0/0 counts as 0, so a
      class never predicted has precision 0 and a class without positives recall 0),
      CF1 = 2 * CP * CR / (CP + CR);
      OP = sum_c TP_c / sum_c NP_c, OR = sum_c TP_c / sum_c NG_c, OF1 = 2 * OP * OR / (OP + OR).

    Args:
        scores: ``[N, C]`` probabilities (sigmoid outputs).
        targets: ``[N, C]`` in ``{0, 1}``.
        threshold: decision threshold on ``scores`` (inclusive).

    Returns:
        ``{"mAP", "CP", "CR", "CF1", "OP", "OR", "OF1"}`` as Python floats in percent.
    """
    ap = average_precision(scores, targets)
    scores, targets = _check_inputs(scores, targets)
    has_pos = targets.sum(dim=0) > 0
    mean_ap = ap[has_pos].mean().item() if has_pos.any() else math.nan

    predicted = (scores >= threshold).to(torch.float64)  # [N, C]
    tp = (predicted * targets).sum(dim=0)  # [C]
    n_pred = predicted.sum(dim=0)
    n_true = targets.sum(dim=0)
    cp = _ratio(tp, n_pred).mean().item()
    cr = _ratio(tp, n_true).mean().item()
    op = _ratio(tp.sum(), n_pred.sum()).item()
    or_ = _ratio(tp.sum(), n_true.sum()).item()
    return {
        "mAP": 100.0 * mean_ap,
        "CP": 100.0 * cp,
        "CR": 100.0 * cr,
        "CF1": 100.0 * _f1(cp, cr),
        "OP": 100.0 * op,
        "OR": 100.0 * or_,
        "OF1": 100.0 * _f1(op, or_),
    }
