"""Multi-label metrics (``ssl_zoo.eval.metrics``) against independent brute-force computations, sklearn and
torchmetrics: mAP, CP / CR / CF1 and OP / OR / OF1, ties, thresholds and classes without positives."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from torchmetrics.functional.classification import (
    multilabel_average_precision,
    multilabel_f1_score,
    multilabel_stat_scores,
)

from ssl_zoo.eval.metrics import MULTILABEL_METRIC_NAMES, average_precision, multilabel_metrics


# --------------------------------------------------------------------------------------------- references
def reference_multilabel(scores: np.ndarray, targets: np.ndarray, threshold: float) -> dict[str, float]:
    """Plain loops over classes and samples, written from the definitions (no vectorised tricks)."""
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    n, c = scores.shape
    aps = []
    for j in range(c):
        positives = [i for i in range(n) if targets[i, j] == 1]
        if not positives:
            continue
        precisions = []
        for i in positives:
            retrieved = [m for m in range(n) if scores[m, j] >= scores[i, j]]
            hits = sum(targets[m, j] for m in retrieved)
            precisions.append(hits / len(retrieved))
        aps.append(sum(precisions) / len(precisions))
    tp = [0] * c
    npred = [0] * c
    ngt = [0] * c
    for i in range(n):
        for j in range(c):
            pred = scores[i, j] >= threshold
            npred[j] += int(pred)
            ngt[j] += int(targets[i, j] == 1)
            tp[j] += int(pred and targets[i, j] == 1)
    cp = sum(tp[j] / npred[j] if npred[j] else 0.0 for j in range(c)) / c
    cr = sum(tp[j] / ngt[j] if ngt[j] else 0.0 for j in range(c)) / c
    op = sum(tp) / sum(npred) if sum(npred) else 0.0
    orr = sum(tp) / sum(ngt) if sum(ngt) else 0.0

    def f1(p, r):
        return 2 * p * r / (p + r) if p + r else 0.0

    return {"mAP": 100 * (sum(aps) / len(aps) if aps else math.nan), "CP": 100 * cp, "CR": 100 * cr,
            "CF1": 100 * f1(cp, cr), "OP": 100 * op, "OR": 100 * orr, "OF1": 100 * f1(op, orr)}


#: AP comes from torchmetrics, whose precision curve is float32 (a few float32 rounding steps, relative);
#: the other metrics are ratios of integer counts in float64.
AP_TOLERANCE = dict(rel=1e-6, abs=1e-9)


def assert_metrics_close(got: dict, want: dict) -> None:
    assert set(got) == set(MULTILABEL_METRIC_NAMES) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], **(AP_TOLERANCE if key == "mAP" else dict(abs=1e-9))), key


# --------------------------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multilabel_metrics_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    targets = (rng.random((40, 7)) < 0.3).astype(np.float32)
    targets[0] = 1  # every class has a positive
    scores = rng.random((40, 7)).astype(np.float32)
    got = multilabel_metrics(torch.from_numpy(scores), torch.from_numpy(targets), threshold=0.4)
    assert_metrics_close(got, reference_multilabel(scores, targets, 0.4))


def test_average_precision_matches_sklearn_with_and_without_ties():
    rng = np.random.default_rng(3)
    targets = (rng.random((60, 5)) < 0.4).astype(np.float64)
    targets[0] = 1
    for scores in (rng.random((60, 5)), np.round(rng.random((60, 5)), 1)):  # the second has many ties
        ap = average_precision(torch.from_numpy(scores), torch.from_numpy(targets)).numpy()
        want = [average_precision_score(targets[:, j], scores[:, j]) for j in range(5)]
        np.testing.assert_allclose(ap, want, rtol=AP_TOLERANCE["rel"], atol=1e-12)


def test_average_precision_closed_form():
    # Ranked: pos, neg, pos, neg -> precision at the positives 1/1 and 2/3.
    scores = torch.tensor([[0.9], [0.8], [0.7], [0.1]])
    targets = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    assert average_precision(scores, targets).item() == pytest.approx((1 + 2 / 3) / 2)
    # A tie between a positive and a negative at the top: both count as retrieved together -> 1/2.
    scores = torch.tensor([[0.5], [0.5], [0.1]])
    targets = torch.tensor([[1.0], [0.0], [0.0]])
    assert average_precision(scores, targets).item() == pytest.approx(0.5)


def test_class_without_positives_is_left_out_of_map_and_counts_zero_recall():
    scores = torch.tensor([[0.9, 0.8], [0.2, 0.1], [0.7, 0.3]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])  # class 1 has no positive
    got = multilabel_metrics(scores, targets)
    assert got["mAP"] == pytest.approx(100.0)  # class 0 ranked perfectly; class 1 does not enter the mean
    assert torch.isnan(average_precision(scores, targets)[1])
    # class 1: predicted once (0.8 >= 0.5), never right -> precision 0, recall 0 (no positives).
    assert got["CP"] == pytest.approx(100 * (1.0 + 0.0) / 2)
    assert got["CR"] == pytest.approx(100 * (1.0 + 0.0) / 2)
    assert got["OP"] == pytest.approx(100 * 2 / 3)
    assert got["OR"] == pytest.approx(100.0)
    assert_metrics_close(got, reference_multilabel(scores.numpy(), targets.numpy(), 0.5))
    # torchmetrics' macro AP counts the class without positives as 0
    with pytest.warns(UserWarning, match="No positive samples"):
        assert multilabel_average_precision(scores, targets.long(), num_labels=2, average="macro").item() == 0.5


def test_class_never_predicted_has_precision_zero_not_nan():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.3]])
    targets = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    got = multilabel_metrics(scores, targets)
    assert all(math.isfinite(v) for v in got.values())
    assert got["CP"] == pytest.approx(100 * (0.5 + 0.0) / 2)  # class 0: 1 of 2 predictions right
    assert got["CR"] == pytest.approx(100 * (1.0 + 0.0) / 2)
    assert got["CF1"] == pytest.approx(2 * got["CP"] * got["CR"] / (got["CP"] + got["CR"]))
    assert_metrics_close(got, reference_multilabel(scores.numpy(), targets.numpy(), 0.5))


def test_score_equal_to_threshold_counts_as_positive():
    scores = torch.tensor([[0.5], [0.4999], [0.7]])
    targets = torch.tensor([[1.0], [1.0], [0.0]])
    got = multilabel_metrics(scores, targets, threshold=0.5)
    # predicted: rows 0 (== threshold) and 2 -> TP 1, NP 2, NG 2
    assert got["OP"] == pytest.approx(50.0)
    assert got["OR"] == pytest.approx(50.0)
    strict = multilabel_metrics(scores, targets, threshold=0.50001)
    assert strict["OR"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="num_labels"):  # torchmetrics' multi-label functions need two labels
        multilabel_stat_scores(scores, targets.long(), num_labels=1)


def test_threshold_boundary_is_inclusive_where_torchmetrics_is_strict():
    """score == threshold is a prediction (the contract); torchmetrics' own threshold is ``score > t``, so ours
    equals torchmetrics' at the next float below t, and differs from it at t."""
    scores = torch.tensor([[0.5, 0.25], [0.25, 0.75], [0.75, 0.5]], dtype=torch.float64)
    targets = torch.tensor([[1, 1], [0, 1], [1, 0]])
    got = multilabel_metrics(scores, targets, threshold=0.5)
    # predicted (>=): class 0 rows 0, 2 (both right); class 1 rows 1 (right), 2 (wrong)
    assert (got["OP"], got["OR"], got["CP"], got["CR"]) == pytest.approx((75.0, 75.0, 75.0, 75.0))
    assert_metrics_close(got, reference_multilabel(scores.numpy(), targets.numpy(), 0.5))

    def true_and_predicted(threshold):
        stats = multilabel_stat_scores(scores, targets, num_labels=2, threshold=threshold, average=None)
        return stats[:, 0].sum().item(), (stats[:, 0] + stats[:, 1]).sum().item()

    assert true_and_predicted(0.5) == (2, 2)  # the scores equal to 0.5 are not predicted
    assert true_and_predicted(math.nextafter(0.5, 0.0)) == (3, 4)  # ours: OP = 3 / 4
    assert got["OP"] == pytest.approx(100 * 3 / 4)


def test_scores_a_rounding_step_above_one_are_not_taken_for_logits():
    """A kNN vote can exceed 1 by a rounding step. torchmetrics takes any score outside [0, 1] for a logit and passes
    every score through a sigmoid (0.1 -> 0.52, predicted at 0.5); the scores are thresholded here as given."""
    scores = torch.tensor([[1.0 + 1e-6, 0.2], [0.2, 0.9], [0.1, 0.1]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    got = multilabel_metrics(scores, targets)
    assert (got["mAP"], got["OP"], got["OR"], got["CF1"]) == pytest.approx((100.0, 100.0, 100.0, 100.0))
    assert_metrics_close(got, reference_multilabel(scores.numpy(), targets.numpy(), 0.5))
    false_positives = multilabel_stat_scores(scores, targets.long(), num_labels=2, average=None)[:, 1]
    assert false_positives.tolist() == [2, 2]


def test_nothing_predicted_gives_zero_f1_not_nan():
    got = multilabel_metrics(torch.zeros(4, 3), torch.eye(4, 3))
    assert got["OP"] == got["OR"] == got["OF1"] == got["CF1"] == 0.0


def test_cf1_is_not_mean_of_per_class_f1():
    # class 0 perfect (F1 1), class 1 precision 1/3, recall 1 (F1 1/2) -> mean F1 0.75, CF1 from CP/CR differs
    scores = torch.tensor([[0.9, 0.9], [0.1, 0.9], [0.1, 0.9]])
    targets = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    got = multilabel_metrics(scores, targets)
    cp, cr = (1 + 1 / 3) / 2, 1.0
    assert got["CF1"] == pytest.approx(100 * 2 * cp * cr / (cp + cr))
    assert got["CF1"] != pytest.approx(75.0)
    # torchmetrics' macro F1 is that mean of per-class F1
    assert multilabel_f1_score(scores, targets.long(), num_labels=2, average="macro").item() == pytest.approx(0.75)


def test_metrics_reject_bad_inputs():
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        multilabel_metrics(torch.rand(3, 2), torch.ones(3, 3))
    with pytest.raises(ValueError, match="multi-hot"):
        multilabel_metrics(torch.rand(3, 2), torch.full((3, 2), 0.5))
    with pytest.raises(ValueError, match="NaN"):
        multilabel_metrics(torch.tensor([[float("nan")]]), torch.ones(1, 1))


def test_map_nan_when_no_class_has_positives():
    assert math.isnan(multilabel_metrics(torch.rand(3, 2), torch.zeros(3, 2))["mAP"])


