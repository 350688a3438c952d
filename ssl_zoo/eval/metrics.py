"""Multi-label classification metrics in the form the multi-label literature reports them.

COCO / VOC multi-label papers (ML-GCN, ASL, BAM+IA-CLoss, HVP-MTL) report mAP plus the per-class (C*) and
overall (O*) precision, recall and F1 at a fixed score threshold. torchmetrics does the counting: the per-class
AP (``multilabel_average_precision(average=None)``, the functional form of ``MultilabelAveragePrecision``) and
the per-class true / false positives (``multilabel_stat_scores(average=None)``). What the contract
(``ssl_zoo.eval.metrics.multilabel_metrics``) fixes differently from torchmetrics stays here, each tested in
``tests/eval/test_metrics.py``:

* a prediction is positive when ``score >= threshold``: torchmetrics thresholds with ``>`` (and takes scores
  outside [0, 1] for logits, which it passes through a sigmoid), so it is given the 0/1 predictions;
* mAP averages only the classes that have at least one positive (torchmetrics' macro AP counts the others as 0);
* CF1 is the harmonic mean of CP and CR, not the mean of per-class F1 scores;
* torchmetrics' multi-label functions refuse a single label, which is then evaluated twice and counted once.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics.functional.classification import multilabel_average_precision, multilabel_stat_scores

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
    return scores, targets.long()


def _two_labels_at_least(x: Tensor) -> Tensor:
    """``[N, 1] -> [N, 2]`` (the column twice): torchmetrics' multi-label functions refuse a single label."""
    return x.repeat(1, 2) if x.shape[1] == 1 else x


def average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Per-class average precision ``[C]`` (float64); NaN for a class without positives.

    AP_c = (1/|P_c|) * sum_{i in P_c} precision_c(s_ic), where P_c are the positives of class c and
    precision_c(t) = |{j in P_c : s_jc >= t}| / |{j : s_jc >= t}| is the precision at the rank of sample i:
    samples with equal scores share one rank, as in scikit-learn's ``average_precision_score``. torchmetrics'
    ``multilabel_average_precision(average=None)`` on the classes with positives (its precision is float32).

    Args:
        scores: ``[N, C]`` probabilities (torchmetrics passes scores outside [0, 1] through a sigmoid).
        targets: ``[N, C]`` in ``{0, 1}``.
    """
    scores, targets = _check_inputs(scores, targets)
    has_pos = targets.sum(dim=0) > 0
    ap = torch.full((scores.shape[1],), math.nan, dtype=torch.float64)
    if has_pos.any():
        s, y = _two_labels_at_least(scores[:, has_pos]), _two_labels_at_least(targets[:, has_pos])
        per_class = multilabel_average_precision(s, y, num_labels=s.shape[1], average=None, validate_args=False)
        ap[has_pos] = per_class[: int(has_pos.sum())].double()
    return ap


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
    mean_ap = average_precision(scores, targets).nanmean().item()  # NaN-free exactly for the classes with positives
    scores, targets = _check_inputs(scores, targets)

    predicted = (scores >= threshold).long()  # the contract's inclusive threshold (torchmetrics' is score > t)
    num_classes = targets.shape[1]
    stats = multilabel_stat_scores(_two_labels_at_least(predicted), _two_labels_at_least(targets),
                                   num_labels=max(num_classes, 2), average=None, validate_args=False)
    stats = stats[:num_classes].double()
    tp, fp, fn = stats[:, 0], stats[:, 1], stats[:, 3]  # [C] each: torchmetrics' (tp, fp, tn, fn, support)
    cp = _ratio(tp, tp + fp).mean().item()
    cr = _ratio(tp, tp + fn).mean().item()
    op = _ratio(tp.sum(), (tp + fp).sum()).item()
    or_ = _ratio(tp.sum(), (tp + fn).sum()).item()
    return {
        "mAP": 100.0 * mean_ap,
        "CP": 100.0 * cp,
        "CR": 100.0 * cr,
        "CF1": 100.0 * _f1(cp, cr),
        "OP": 100.0 * op,
        "OR": 100.0 * or_,
        "OF1": 100.0 * _f1(op, or_),
    }
