"""Every loss against an independent brute-force computation of its equation (float64 loops),
closed-form cases, invariances, gradients, bfloat16 inputs; plus the EMA update and the single-process
distributed utilities."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightly.models.utils import concat_all_gather, update_momentum
from lightly.utils import dist as lightly_dist
from torch import nn

from ssl_zoo.losses import (
    ImageAwareContrastiveLoss,
    KeyQueue,
    SupConLoss,
    SwappedPredictionLoss,
    SymmetricKLDivergence,
    WeightedAsymmetricLoss,
    masked_l1_loss,
    moco_v2_info_nce,
    moco_v3_info_nce,
    mpcl_total_loss,
    mvp_alignment_loss,
    projector_contrastive_regularization,
    ptb_weights,
    sinkhorn_clamped_fraction,
    sinkhorn_knopp,
    swapped_prediction_loss,
    symmetric_kl_divergence,
)
from ssl_zoo.utils import distributed as D


def _rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(
    actual: torch.Tensor | float, expected: float | np.ndarray, rtol: float = 1e-5, atol: float = 1e-5
):
    actual = actual.detach().double().numpy() if isinstance(actual, torch.Tensor) else actual
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --------------------------------------------------------------------------------------------------
# Image-aware contrastive loss and SupCon


def _ia_reference(z: np.ndarray, ids: list[int], tau: float, supcon: bool = False) -> float:
    """BAM+IA-CLoss Eq. 1 (or SupCon L_out) with explicit loops over anchors, candidates, positives."""
    z = _unit(z.astype(np.float64))
    n = len(ids)
    losses = []
    for i in range(n):
        candidates = [a for a in range(n) if a != i]
        positives = [p for p in candidates if ids[p] == ids[i]]
        if not positives:
            continue
        denominator = sum(math.exp(float(z[i] @ z[a]) / tau) for a in candidates)
        if supcon:
            terms = [math.log(math.exp(float(z[i] @ z[p]) / tau) / denominator) for p in positives]
            losses.append(-sum(terms) / len(positives))
        else:
            numerator = sum(math.exp(float(z[i] @ z[p]) / tau) for p in positives)
            losses.append(-math.log(numerator / denominator) / len(positives))
    return sum(losses) / len(losses)


def _ia_reference_torch(z: torch.Tensor, ids: list[int], tau: float, supcon: bool = False) -> torch.Tensor:
    """Same equation with torch scalar ops in float64, to differentiate it independently."""
    z = z / z.norm(dim=1, keepdim=True)
    n = len(ids)
    losses = []
    for i in range(n):
        candidates = [a for a in range(n) if a != i]
        positives = [p for p in candidates if ids[p] == ids[i]]
        if not positives:
            continue
        denominator = sum(torch.exp(z[i] @ z[a] / tau) for a in candidates)
        if supcon:
            losses.append(
                -sum(torch.log(torch.exp(z[i] @ z[p] / tau) / denominator) for p in positives)
                / len(positives)
            )
        else:
            numerator = sum(torch.exp(z[i] @ z[p] / tau) for p in positives)
            losses.append(-torch.log(numerator / denominator) / len(positives))
    return sum(losses) / len(losses)


IDS_CASES = [
    [0, 0, 1, 1, 2, 2],  # pairs: one positive each
    [0, 1, 0, 1, 0, 2, 3, 3, 3, 3],  # groups of 3 and 4, one singleton
    [5, 5, 5, 5, 5, 5, 5, 5],  # a single image, 8 views (BAM: 4 blocks x 2 views)
]


@pytest.mark.parametrize("ids", IDS_CASES)
@pytest.mark.parametrize("dim", [3, 16])
@pytest.mark.parametrize("tau", [0.1, 0.5])
@pytest.mark.parametrize("supcon", [False, True])
def test_ia_and_supcon_match_brute_force(ids, dim, tau, supcon):
    z = torch.randn(len(ids), dim, generator=_rng(len(ids) + dim))
    loss_cls = SupConLoss if supcon else ImageAwareContrastiveLoss
    loss = loss_cls(temperature=tau)(z, torch.tensor(ids))
    assert loss.dtype == torch.float32 and loss.ndim == 0
    _close(loss, _ia_reference(z.numpy(), ids, tau, supcon))


@pytest.mark.parametrize("supcon", [False, True])
def test_ia_and_supcon_gradients_match_brute_force(supcon):
    ids = IDS_CASES[1]
    z = torch.randn(len(ids), 8, generator=_rng(1), requires_grad=True)
    loss_cls = SupConLoss if supcon else ImageAwareContrastiveLoss
    loss_cls(temperature=0.2)(z, torch.tensor(ids)).backward()
    z64 = z.detach().double().requires_grad_(True)
    _ia_reference_torch(z64, ids, 0.2, supcon).backward()
    _close(z.grad, z64.grad.numpy(), rtol=1e-4, atol=1e-6)


def _nt_xent(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR NT-Xent: cross-entropy over the 2B-1 other views, target the partner view."""
    z = F.normalize(torch.cat([a, b]).double(), dim=1)
    n = z.shape[0]
    logits = (z @ z.T / tau).masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    partner = (torch.arange(n) + n // 2) % n
    return F.cross_entropy(logits, partner)


def test_ia_loss_with_one_positive_equals_nt_xent():
    a = torch.randn(7, 10, generator=_rng(2))
    b = torch.randn(7, 10, generator=_rng(3))
    ids = torch.cat([torch.arange(7), torch.arange(7)])
    z = torch.cat([a, b])
    for tau in (0.07, 0.5):
        expected = float(_nt_xent(a, b, tau))
        _close(ImageAwareContrastiveLoss(temperature=tau)(z, ids), expected)
        _close(SupConLoss(temperature=tau)(z, ids), expected)


def test_ia_loss_differs_from_supcon_with_several_positives():
    """1/|P| multiplies the log of the sum in Eq. 1, not a sum of logs."""
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    z = torch.randn(6, 4, generator=_rng(4))
    ia, sup = ImageAwareContrastiveLoss()(z, ids), SupConLoss()(z, ids)
    assert not torch.isclose(ia, sup, rtol=1e-3)


def test_ia_loss_closed_form_identical_views():
    """All views identical: every similarity is 1, so l_i = -(1/|P|) log(|P| / (N-1))."""
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    z = torch.ones(7, 5)
    expected = np.mean([-math.log(2 / 6) / 2] * 3 + [-math.log(3 / 6) / 3] * 4)
    _close(ImageAwareContrastiveLoss()(z, ids), expected)
    _close(SupConLoss()(z, ids), -math.log(1 / 6))


def test_ia_loss_invariant_to_permutation_and_scale():
    ids = torch.tensor(IDS_CASES[1])
    z = torch.randn(len(ids), 6, generator=_rng(5))
    perm = torch.randperm(len(ids), generator=_rng(6))
    loss = ImageAwareContrastiveLoss()(z, ids)
    _close(ImageAwareContrastiveLoss()(z[perm], ids[perm]), float(loss))
    _close(ImageAwareContrastiveLoss()(3.7 * z, ids), float(loss))


@pytest.mark.parametrize("supcon", [False, True])
def test_ia_and_supcon_stable_at_tau_001(supcon):
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    z = torch.randn(8, 4, generator=_rng(7))
    z[1] = z[0] + 1e-3  # near-duplicate positive: s/tau close to 100
    z[3] = -z[2]  # opposite positive: s/tau = -100
    z = z.requires_grad_(True)
    loss_cls = SupConLoss if supcon else ImageAwareContrastiveLoss
    loss = loss_cls(temperature=0.01)(z, ids)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    _close(loss, _ia_reference(z.detach().numpy(), ids.tolist(), 0.01, supcon), rtol=1e-4)


def test_ia_loss_accepts_bfloat16():
    ids = torch.tensor(IDS_CASES[1])
    z = torch.randn(len(ids), 8, generator=_rng(8)).bfloat16().requires_grad_(True)
    loss = ImageAwareContrastiveLoss()(z, ids)
    loss.backward()
    assert loss.dtype == torch.float32 and z.grad.dtype == torch.bfloat16
    _close(loss, _ia_reference(z.detach().float().numpy(), ids.tolist(), 0.1), rtol=1e-4)
    _close(
        SupConLoss()(z, ids), _ia_reference(z.detach().float().numpy(), ids.tolist(), 0.1, True), rtol=1e-4
    )


@pytest.mark.parametrize("loss_cls", [ImageAwareContrastiveLoss, SupConLoss])
def test_no_positive_gives_zero_with_zero_gradient(loss_cls):
    z = torch.randn(4, 3, generator=_rng(9), requires_grad=True)
    loss = loss_cls()(z, torch.arange(4))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("loss_cls", [ImageAwareContrastiveLoss, SupConLoss])
def test_contrastive_losses_reject_bad_arguments(loss_cls):
    with pytest.raises(ValueError, match="temperature"):
        loss_cls(temperature=0.0)
    with pytest.raises(ValueError, match="shape"):
        loss_cls()(torch.randn(4, 3), torch.arange(3))


# --------------------------------------------------------------------------------------------------
# Weighted asymmetric loss


def _asl_reference(logits, targets, eta=10.0, gp=4.0, gn=1.0, eps=1e-8) -> float:
    total = 0.0
    for row_x, row_y in zip(logits.tolist(), targets.tolist(), strict=True):
        for x, y in zip(row_x, row_y, strict=True):
            p = 1.0 / (1.0 + math.exp(-x))
            total -= y * eta * (1 - p) ** gp * math.log(max(p, eps))
            total -= (1 - y) * p**gn * math.log(max(1 - p, eps))
    return total / len(logits)


@pytest.mark.parametrize("shape", [(1, 1), (4, 7), (9, 30)])
@pytest.mark.parametrize(
    "params",
    [{}, {"eta": 1.0, "gamma_pos": 0.0, "gamma_neg": 0.0}, {"eta": 3.0, "gamma_pos": 2.0, "gamma_neg": 3.0}],
)
def test_asl_matches_brute_force(shape, params):
    logits = 3 * torch.randn(shape, generator=_rng(10))
    targets = (torch.rand(shape, generator=_rng(11)) < 0.3).float()
    keys = {"eta": "eta", "gamma_pos": "gp", "gamma_neg": "gn"}
    expected = _asl_reference(logits, targets, **{keys[k]: v for k, v in params.items()})
    _close(WeightedAsymmetricLoss(**params)(logits, targets), expected)


def test_asl_soft_targets_and_bfloat16():
    logits = 2 * torch.randn(5, 6, generator=_rng(12))
    targets = torch.rand(5, 6, generator=_rng(13))  # confidences in [0, 1]
    _close(WeightedAsymmetricLoss()(logits, targets), _asl_reference(logits, targets))
    logits_bf16 = logits.bfloat16()
    loss = WeightedAsymmetricLoss()(logits_bf16, targets.bfloat16())
    assert loss.dtype == torch.float32
    _close(loss, _asl_reference(logits_bf16.float(), targets.bfloat16().float()), rtol=1e-4)


def test_asl_closed_form_and_extremes():
    # logits 0: p = 1/2; positive: -eta * 2^-gamma_pos * log(1/2); negative: -2^-gamma_neg * log(1/2).
    loss = WeightedAsymmetricLoss()(torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    _close(loss, (3 * 10 * 0.5**4 * math.log(2) + 0.5 * math.log(2)) / 2)
    # Confidently wrong logits hit the eps floor: -eta * 1 * log(eps) for the missed positive.
    logits = torch.tensor([[-100.0, 100.0]], requires_grad=True)
    loss = WeightedAsymmetricLoss()(logits, torch.tensor([[1.0, 0.0]]))
    loss.backward()
    _close(loss, -10 * math.log(1e-8) - math.log(1e-8))
    assert torch.isfinite(logits.grad).all()


def test_asl_rejects_bad_arguments():
    with pytest.raises(ValueError, match="eta"):
        WeightedAsymmetricLoss(eta=0.0)
    with pytest.raises(ValueError, match="gamma"):
        WeightedAsymmetricLoss(gamma_neg=-1.0)
    with pytest.raises(ValueError, match="shape"):
        WeightedAsymmetricLoss()(torch.zeros(2, 3), torch.zeros(2, 4))


# --------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp and swapped prediction


def _sinkhorn_reference(scores: np.ndarray, epsilon=0.05, iterations=3, clamp_max=10.0) -> np.ndarray:
    """The SwAV loop in float64, literally: exp, divide by total, rows to 1/K, columns to 1/B."""
    q = np.exp(np.minimum(scores.astype(np.float64) / epsilon, clamp_max)).T  # [K, B]
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        for r in range(k):
            q[r] /= q[r].sum() * k
        for c in range(b):
            q[:, c] /= q[:, c].sum() * b
    return (q * b).T


@pytest.mark.parametrize("shape", [(4, 3), (16, 10), (7, 32)])
@pytest.mark.parametrize(
    "kwargs", [{}, {"epsilon": 0.5, "iterations": 1}, {"iterations": 10, "clamp_max": 5.0}]
)
def test_sinkhorn_matches_brute_force(shape, kwargs):
    scores = torch.randn(shape, generator=_rng(14))
    codes = sinkhorn_knopp(scores, **kwargs)
    assert codes.shape == shape and codes.dtype == torch.float32
    _close(codes, _sinkhorn_reference(scores.numpy(), **kwargs), rtol=1e-4, atol=1e-6)
    _close(codes.sum(dim=1), np.ones(shape[0]))


def test_sinkhorn_without_clamp():
    scores = torch.randn(6, 5, generator=_rng(15))
    _close(
        sinkhorn_knopp(scores, clamp_max=None),
        _sinkhorn_reference(scores.numpy(), clamp_max=np.inf),
        rtol=1e-4,
    )


def test_sinkhorn_marginals():
    b, k = 32, 8
    scores = F.normalize(torch.randn(b, k, generator=_rng(16)), dim=1)
    codes = sinkhorn_knopp(scores)
    _close(codes.sum(dim=1), np.ones(b))  # exact after the last column step
    # Prototypes approximately equipartitioned after 3 rounds, and more so than the plain softmax.
    spread = (codes.sum(dim=0) - b / k).abs().max()
    assert spread < 0.5 * b / k
    assert spread < (torch.softmax(scores / 0.05, dim=1).sum(dim=0) - b / k).abs().max()
    _close(sinkhorn_knopp(scores, iterations=200).sum(dim=0), np.full(k, b / k), rtol=1e-3)


def test_sinkhorn_survives_underflow_and_extreme_scores():
    # Sample 0 lies 6 below everything: exp(-120) underflows in float32 but not in float64.
    scores = torch.randn(5, 4, generator=_rng(17)) * 0.1
    scores[0] -= 6.0
    codes = sinkhorn_knopp(scores, clamp_max=None)
    _close(codes, _sinkhorn_reference(scores.numpy(), clamp_max=np.inf), rtol=1e-3, atol=1e-6)
    for extreme in (1e4, -1e4):
        wild = torch.randn(8, 6, generator=_rng(18)) * extreme
        codes = sinkhorn_knopp(wild)
        assert torch.isfinite(codes).all() and (codes >= 0).all()
        _close(codes.sum(dim=1), np.ones(8), rtol=1e-4)


def test_lightly_sinkhorn_equals_ours_in_range_but_turns_an_underflow_into_nan():
    """Why ``sinkhorn_knopp`` is not a wrapper over lightly's ``sinkhorn``: on the clamped scores lightly gives
    the same codes wherever ``exp(scores / epsilon)`` stays in float32's range (cosines at the paper's
    epsilon = 0.05), but it iterates on ``Q`` itself, so one sample whose column underflows makes 0/0 and the
    NaN spreads through the row sums to every sample's codes (under DDP, every rank's). Ours iterates on log Q."""
    from lightly.loss.swav_loss import sinkhorn as lightly_sinkhorn

    cosines = F.normalize(torch.randn(64, 16, generator=_rng(24)), dim=1) @ F.normalize(
        torch.randn(30, 16, generator=_rng(25)), dim=1).T  # [B, K] sample-prototype cosines
    clamped = (cosines / 0.05).clamp(max=10.0)
    _close(lightly_sinkhorn(clamped, iterations=3, epsilon=1.0), sinkhorn_knopp(cosines).numpy(), atol=1e-6)
    scores = torch.randn(5, 4, generator=_rng(17)) * 0.1
    scores[0] -= 6.0  # exp(-120) underflows in float32
    assert torch.isnan(lightly_sinkhorn(scores / 0.05, iterations=3, epsilon=1.0)).all()
    assert torch.isfinite(sinkhorn_knopp(scores, clamp_max=None)).all()


def test_sinkhorn_float32_from_bfloat16_without_grad():
    scores = torch.randn(6, 5, generator=_rng(19)).bfloat16().requires_grad_(True)
    codes = sinkhorn_knopp(scores)
    assert codes.dtype == torch.float32 and not codes.requires_grad
    _close(codes, _sinkhorn_reference(scores.detach().float().numpy()), rtol=1e-4, atol=1e-6)


def test_sinkhorn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_knopp(torch.randn(3, 2), epsilon=0.0)
    with pytest.raises(ValueError, match="iterations"):
        sinkhorn_knopp(torch.randn(3, 2), iterations=0)


def _log_softmax_loop(row: list[torch.Tensor], tau: float) -> list[torch.Tensor]:
    """log softmax(row / tau) written out: x_k / tau - log(sum_j exp(x_j / tau)) (float64 scalars, autograd)."""
    log_z = torch.log(sum(torch.exp(v / tau) for v in row))
    return [v / tau - log_z for v in row]


def _swapped_reference(sa, sb, ca, cb, tau) -> torch.Tensor:
    """HVP-MTL Eq. 2 in float64, one sample and one prototype at a time:
    l(f_a, q_b) + l(f_b, q_a) with l(s, q) = -sum_k q_k log softmax(s / tau)_k, each term a batch mean.

    Takes float64 tensors (the scores may require grad: the brute-force gradient comes from autograd)."""
    b, k = sa.shape
    term_ab = term_ba = 0.0
    for i in range(b):
        la = _log_softmax_loop([sa[i, j] for j in range(k)], tau)
        lb = _log_softmax_loop([sb[i, j] for j in range(k)], tau)
        term_ab = term_ab - sum(cb[i, j] * la[j] for j in range(k))
        term_ba = term_ba - sum(ca[i, j] * lb[j] for j in range(k))
    return term_ab / b + term_ba / b


@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_swapped_prediction_matches_brute_force_and_is_symmetric(tau):
    sa, sb = torch.randn(2, 6, 5, generator=_rng(20)).unbind(0)
    ca, cb = sinkhorn_knopp(sa), sinkhorn_knopp(sb)
    loss_fn = SwappedPredictionLoss(temperature=tau)
    loss = loss_fn(sa, sb, ca, cb)
    _close(loss, _swapped_reference(sa.double(), sb.double(), ca.double(), cb.double(), tau).item())
    _close(loss_fn(sb, sa, cb, ca), float(loss))  # swapping the views
    bf16 = loss_fn(sa.bfloat16(), sb.bfloat16(), ca, cb)
    assert bf16.dtype == torch.float32
    ref = _swapped_reference(sa.bfloat16().double(), sb.bfloat16().double(), ca.double(), cb.double(), tau)
    _close(bf16, ref.item(), rtol=1e-4)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_swapped_prediction_gradient_matches_brute_force(tau):
    """d loss / d scores of both views equals autograd through the float64 loop over Eq. 2."""
    sa, sb = torch.randn(2, 5, 4, generator=_rng(23)).unbind(0)
    ca, cb = sinkhorn_knopp(sa), sinkhorn_knopp(sb)
    sa32, sb32 = sa.clone().requires_grad_(True), sb.clone().requires_grad_(True)
    swapped_prediction_loss(sa32, sb32, ca, cb, temperature=tau).backward()
    sa64, sb64 = sa.double().requires_grad_(True), sb.double().requires_grad_(True)
    _swapped_reference(sa64, sb64, ca.double(), cb.double(), tau).backward()
    _close(sa32.grad, sa64.grad.numpy(), rtol=1e-4, atol=1e-6)
    _close(sb32.grad, sb64.grad.numpy(), rtol=1e-4, atol=1e-6)
    # Closed form of the gradient for one term: (softmax(s / tau) - q) / (tau * B); Eq. 2 adds no factor 1/2.
    expected_a = (torch.softmax(sa.double() / tau, dim=1) - cb.double()) / (tau * sa.shape[0])
    _close(sa32.grad, expected_a.numpy(), rtol=1e-4, atol=1e-6)


def test_swapped_prediction_closed_form_and_gradients():
    k = 7
    uniform = torch.full((3, k), 1.0 / k)
    # Uniform scores and codes: each swapped term is log K, and Eq. 2 sums the two.
    _close(SwappedPredictionLoss()(torch.zeros(3, k), torch.zeros(3, k), uniform, uniform), 2 * math.log(k))
    sa = torch.randn(3, k, generator=_rng(21), requires_grad=True)
    codes = torch.rand(3, k, generator=_rng(22)).requires_grad_(True)
    SwappedPredictionLoss()(sa, sa.detach(), codes, codes).backward()
    assert torch.isfinite(sa.grad).all() and sa.grad.abs().sum() > 0
    assert codes.grad is None  # codes are targets


def test_sinkhorn_clamped_fraction_counts_the_clamped_entries():
    scores = torch.tensor([[0.49, 0.51, -1.0], [0.6, 0.5, 0.2]])
    # scores / 0.05 > 10 exactly where score > 0.5: 0.51 and 0.6 (0.5 itself is not clamped).
    _close(sinkhorn_clamped_fraction(scores), 2 / 6)
    _close(sinkhorn_clamped_fraction(scores, epsilon=0.1, clamp_max=4.0), 4 / 6)  # score > 0.4
    _close(sinkhorn_clamped_fraction(scores, clamp_max=None), 0.0)
    wild = torch.randn(16, 9, generator=_rng(24))
    brute = sum(float(v) / 0.05 > 10.0 for v in wild.flatten()) / wild.numel()
    _close(sinkhorn_clamped_fraction(wild), brute)
    # What the fraction reports is what Sinkhorn does: clamped entries of a row get equal codes.
    row = torch.tensor([[0.9, 0.7, 0.1, -0.3]])
    codes = sinkhorn_knopp(row.repeat(4, 1), iterations=1)
    _close(codes[0, 0], float(codes[0, 1]))
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_clamped_fraction(scores, epsilon=0.0)


# --------------------------------------------------------------------------------------------------
# Masked image modelling and MVP alignment


def _masked_l1_reference(pred, target, mask) -> float:
    total, count = 0.0, 0
    b, c, h, w = pred.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                if mask[i, 0, y, x]:
                    count += c
                    total += sum(abs(float(pred[i, ch, y, x] - target[i, ch, y, x])) for ch in range(c))
    return total / count


@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (2, 3, 6, 5)])
def test_masked_l1_matches_brute_force(shape):
    pred = torch.randn(shape, generator=_rng(23))
    target = torch.randn(shape, generator=_rng(24))
    mask = torch.rand(shape[0], 1, *shape[2:], generator=_rng(25)) < 0.5
    mask[0, 0, 0, 0] = True
    expected = _masked_l1_reference(pred, target, mask)
    _close(masked_l1_loss(pred, target, mask), expected)
    _close(masked_l1_loss(pred, target, mask.float()), expected)
    bf16 = masked_l1_loss(pred.bfloat16(), target.bfloat16(), mask)
    assert bf16.dtype == torch.float32
    _close(bf16, _masked_l1_reference(pred.bfloat16().float(), target.bfloat16().float(), mask), rtol=1e-4)


def test_masked_l1_full_and_empty_mask():
    pred = torch.randn(2, 3, 4, 4, generator=_rng(26), requires_grad=True)
    target = torch.randn(2, 3, 4, 4, generator=_rng(27))
    _close(masked_l1_loss(pred, target, torch.ones(2, 1, 4, 4)), float((pred - target).abs().mean().detach()))
    loss = masked_l1_loss(pred, target, torch.zeros(2, 1, 4, 4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(pred.grad, torch.zeros_like(pred))
    with pytest.raises(ValueError, match="mask"):
        masked_l1_loss(pred, target, torch.ones(2, 4, 4))


def _mvp_reference(pred, target, mask=None) -> float:
    per_image = []
    for i in range(pred.shape[0]):
        tokens = [0] + [m + 1 for m in range(pred.shape[1] - 1) if mask is None or mask[i, m]]
        cos = [float(pred[i, t] @ target[i, t] / (pred[i, t].norm() * target[i, t].norm())) for t in tokens]
        per_image.append(-sum(cos) / len(tokens))
    return sum(per_image) / len(per_image)


@pytest.mark.parametrize("shape", [(1, 2, 3), (3, 9, 8)])
def test_mvp_alignment_matches_brute_force(shape):
    pred = torch.randn(shape, generator=_rng(28))
    target = torch.randn(shape, generator=_rng(29))
    mask = torch.rand(shape[0], shape[1] - 1, generator=_rng(30)) < 0.5
    _close(mvp_alignment_loss(pred, target), _mvp_reference(pred, target))
    _close(mvp_alignment_loss(pred, target, mask), _mvp_reference(pred, target, mask))
    _close(mvp_alignment_loss(pred, target, torch.ones_like(mask)), _mvp_reference(pred, target))
    bf16 = mvp_alignment_loss(pred.bfloat16(), target.bfloat16(), mask)
    assert bf16.dtype == torch.float32
    _close(
        bf16, _mvp_reference(pred.bfloat16().float(), target.bfloat16().float(), mask), rtol=1e-4, atol=1e-4
    )


def test_mvp_alignment_closed_form():
    pred = torch.randn(2, 5, 4, generator=_rng(31), requires_grad=True)
    _close(mvp_alignment_loss(pred, 2 * pred.detach()), -1.0)
    _close(mvp_alignment_loss(pred, -pred.detach()), 1.0)
    # No masked token: only the CLS term remains.
    target = torch.randn(2, 5, 4, generator=_rng(32))
    none_masked = torch.zeros(2, 4, dtype=torch.bool)
    expected = -F.cosine_similarity(pred[:, 0].detach(), target[:, 0], dim=-1).mean()
    loss = mvp_alignment_loss(pred, target, none_masked)
    _close(loss, float(expected))
    loss.backward()
    assert torch.equal(pred.grad[:, 1:], torch.zeros_like(pred.grad[:, 1:]))
    with pytest.raises(ValueError, match="mask"):
        mvp_alignment_loss(pred, target, torch.ones(2, 5, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------
# MPCL


def _pcr_reference(z: np.ndarray) -> np.ndarray:
    mp, b, _ = z.shape
    out = np.zeros(mp)
    for m in range(mp):
        for i in range(b):
            s = sum(
                float(z[m, i] @ z[o, i] / (np.linalg.norm(z[m, i]) * np.linalg.norm(z[o, i])))
                for o in range(mp)
                if o != m
            )
            out[m] += s / (mp - 1) / b
    return out


@pytest.mark.parametrize("shape", [(2, 3, 4), (4, 5, 8)])
def test_pcr_matches_brute_force_and_gradients_flow(shape):
    z = torch.randn(shape, generator=_rng(33)).requires_grad_(True)
    pcr = projector_contrastive_regularization(z)
    assert pcr.shape == (shape[0],) and pcr.dtype == torch.float32
    _close(pcr, _pcr_reference(z.detach().numpy().astype(np.float64)))
    pcr.sum().backward()
    assert torch.isfinite(z.grad).all() and (z.grad.abs().sum(dim=(1, 2)) > 0).all()
    bf16 = projector_contrastive_regularization(z.detach().bfloat16())
    _close(bf16, _pcr_reference(z.detach().bfloat16().float().numpy()), rtol=1e-4, atol=1e-4)


def test_pcr_closed_form_and_errors():
    same = torch.randn(1, 4, 6, generator=_rng(34)).expand(3, 4, 6)
    _close(projector_contrastive_regularization(same), np.ones(3))
    z = torch.zeros(2, 1, 2)
    z[0, 0, 0], z[1, 0, 1] = 1.0, 1.0  # orthogonal projector outputs
    _close(projector_contrastive_regularization(z), np.zeros(2))
    with pytest.raises(ValueError, match="Mp >= 2"):
        projector_contrastive_regularization(torch.randn(1, 4, 6))


def test_ptb_weights():
    acc = torch.tensor([0.9, 0.5, 0.7, 0.2])
    for eps in (0.5, 0.1, 2.0):
        w = ptb_weights(acc, epsilon=eps)
        raw = [math.exp((1 - a) / eps) for a in acc.tolist()]
        _close(w, np.array(raw) / sum(raw))
        _close(w.sum(), 1.0)
        # Lower accuracy, larger weight.
        assert torch.equal(torch.argsort(w), torch.argsort(-acc))
    _close(ptb_weights(torch.full((3,), 0.4)), np.full(3, 1 / 3))
    with pytest.raises(ValueError, match="acc"):
        ptb_weights(torch.tensor([45.0, 60.0]))
    with pytest.raises(ValueError, match="epsilon"):
        ptb_weights(acc, epsilon=0.0)


def test_mpcl_total_loss():
    losses = torch.tensor([2.0, 3.0, 1.5], requires_grad=True)
    pcr = torch.tensor([0.2, -0.1, 0.4], requires_grad=True)
    weights = torch.tensor([0.5, 0.3, 0.2])
    total = mpcl_total_loss(losses, pcr, weights, lam=0.1)
    expected = (
        sum(
            w * x + 0.1 * p
            for w, x, p in zip([0.5, 0.3, 0.2], [2.0, 3.0, 1.5], [0.2, -0.1, 0.4], strict=True)
        )
        / 3
    )
    _close(total, expected)
    total.backward()
    _close(losses.grad, np.array([0.5, 0.3, 0.2]) / 3)
    _close(pcr.grad, np.full(3, 0.1 / 3))
    _close(mpcl_total_loss(losses, pcr, torch.full((3,), 1.0), lam=0.0), float(losses.detach().mean()))
    with pytest.raises(ValueError, match="shape"):
        mpcl_total_loss(losses, pcr, torch.ones(2))


# --------------------------------------------------------------------------------------------------
# MoCo


def _info_nce_reference(q, k, negatives_per_query, tau):
    """Loops: -log softmax of the positive among [positive, negatives]; acc = positive is the max."""
    losses, hits = [], []
    for i in range(len(q)):
        qi = q[i] / np.linalg.norm(q[i])
        pos = float(qi @ (k[i] / np.linalg.norm(k[i]))) / tau
        negs = [float(qi @ n) / tau for n in negatives_per_query(i)]
        m = max([pos, *negs])
        losses.append(-(pos - m - math.log(sum(math.exp(v - m) for v in [pos, *negs]))))
        hits.append(pos >= max(negs) if negs else True)
    return float(np.mean(losses)), float(np.mean(hits))


@pytest.mark.parametrize("b,nq,d", [(1, 1, 2), (5, 12, 8)])
@pytest.mark.parametrize("tau", [0.2, 0.07])
def test_moco_v2_matches_brute_force(b, nq, d, tau):
    q = torch.randn(b, d, generator=_rng(35))
    k = q + 0.5 * torch.randn(b, d, generator=_rng(36))
    queue = F.normalize(torch.randn(nq, d, generator=_rng(37)), dim=1)
    loss, acc = moco_v2_info_nce(q, k, queue, temperature=tau)
    exp_loss, exp_acc = _info_nce_reference(q.numpy(), k.numpy(), lambda i: queue.numpy(), tau)
    _close(loss, exp_loss)
    _close(acc, exp_acc)
    loss_m, acc_m = moco_v2_info_nce(q.bfloat16(), k.bfloat16(), queue, temperature=tau)
    assert loss_m.dtype == torch.float32
    exp_bf16, _ = _info_nce_reference(
        q.bfloat16().float().numpy(), k.bfloat16().float().numpy(), lambda i: queue.numpy(), tau
    )
    _close(loss_m, exp_bf16, rtol=1e-4)


@pytest.mark.parametrize("b,d", [(1, 3), (6, 8)])
@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_moco_v3_matches_brute_force(b, d, tau):
    q = torch.randn(b, d, generator=_rng(38))
    k = q + 0.8 * torch.randn(b, d, generator=_rng(39))
    loss, acc = moco_v3_info_nce(q, k, temperature=tau)
    k_unit = _unit(k.numpy().astype(np.float64))
    exp_loss, exp_acc = _info_nce_reference(
        q.numpy(), k.numpy(), lambda i: [k_unit[j] for j in range(b) if j != i], tau
    )
    _close(loss, 2 * tau * exp_loss)
    _close(acc, exp_acc)
    # bfloat16 inputs: the loss is the float64 reference on the bf16-rounded values (computed in float32 inside)
    qb, kb = q.bfloat16().float().numpy(), k.bfloat16().float().numpy()
    kb_unit = _unit(kb.astype(np.float64))
    exp_bf16, _ = _info_nce_reference(qb, kb, lambda i: [kb_unit[j] for j in range(b) if j != i], tau)
    _close(moco_v3_info_nce(q.bfloat16(), k.bfloat16(), temperature=tau)[0], 2 * tau * exp_bf16, rtol=1e-4)


def test_moco_closed_forms_and_gradients():
    tau, b = 0.2, 4
    eye = torch.eye(b)  # orthonormal queries, each its own key
    q = eye.clone().requires_grad_(True)
    k = eye.clone().requires_grad_(True)
    loss, acc = moco_v3_info_nce(q, k, temperature=tau)
    _close(loss, 2 * tau * -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + b - 1)))
    assert acc.item() == 1.0 and not acc.requires_grad
    loss.backward()
    assert k.grad is None and torch.isfinite(q.grad).all()  # keys come from the momentum encoder
    # MoCo v2 with a queue orthogonal to every query: the queue logits are all 0.
    q2 = torch.cat([eye, torch.zeros(b, 3)], dim=1)  # [4, 7]
    queue = torch.cat([torch.zeros(3, b), torch.eye(3)], dim=1)  # [3, 7]
    loss2, acc2 = moco_v2_info_nce(q2, 5 * q2, queue, temperature=tau)
    _close(loss2, -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 3)))
    assert acc2.item() == 1.0
    # A query pointing at a queue entry instead of its key is counted as wrong.
    _, acc3 = moco_v2_info_nce(queue[:1], -queue[:1], queue, temperature=tau)
    assert acc3.item() == 0.0


def test_key_queue_init_order_and_wrap_around():
    torch.manual_seed(0)
    queue = KeyQueue(dim=3, size=5)
    assert queue.keys.shape == (5, 3) and queue.ptr.dtype == torch.long and int(queue.ptr) == 0
    _close(queue.keys.norm(dim=1), np.ones(5))
    assert set(queue.state_dict()) == {"keys", "ptr"}
    expected = queue.keys.clone()
    ptr = 0
    for step, batch_size in enumerate([2, 2, 2, 3, 7, 1]):  # 5 is not a multiple of 2; 7 > size
        keys = torch.randn(batch_size, 3, generator=_rng(40 + step)) * 3
        queue.enqueue(keys)
        for key in keys:  # one at a time, oldest overwritten first
            expected[ptr] = key / key.norm()
            ptr = (ptr + 1) % 5
        _close(queue.keys, expected.numpy(), atol=1e-6)
        assert int(queue.ptr) == ptr


def test_key_queue_update_before_backward_is_safe():
    queue = KeyQueue(dim=4, size=8)
    q = torch.randn(2, 4, generator=_rng(50), requires_grad=True)
    k = torch.randn(2, 4, generator=_rng(51))
    loss, _ = moco_v2_info_nce(q, k, queue.keys)
    queue.enqueue(k)  # in-place update of the buffer between forward and backward
    loss.backward()
    assert torch.isfinite(q.grad).all()


def test_moco_rejects_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        KeyQueue(dim=4, size=0)
    with pytest.raises(ValueError, match="shape"):
        KeyQueue(dim=4, size=8).enqueue(torch.randn(2, 3))
    with pytest.raises(ValueError, match="temperature"):
        moco_v3_info_nce(torch.randn(2, 3), torch.randn(2, 3), temperature=0.0)
    with pytest.raises(ValueError, match="shape"):
        moco_v2_info_nce(torch.randn(2, 3), torch.randn(2, 3), torch.randn(5, 4))


# --------------------------------------------------------------------------------------------------
# Symmetric KL distillation


def _sym_kl_reference(s, t, temp) -> torch.Tensor:
    """HVP-MTL Eq. 6 in float64, one class at a time: (KL(p_s||p_t) + KL(p_t||p_s)) / 2, batch mean.

    Takes tensors (converted to float64); ``s`` may require grad: the brute-force gradient comes from autograd."""
    s, t = s.double(), t.double()

    def softmax(row):
        e = [torch.exp(v / temp) for v in row]
        z = sum(e)
        return [v / z for v in e]

    total = 0.0
    for i in range(s.shape[0]):
        ps, pt = softmax(list(s[i])), softmax(list(t[i]))
        kl_st = sum(a * torch.log(a / b) for a, b in zip(ps, pt, strict=True))
        kl_ts = sum(b * torch.log(b / a) for a, b in zip(ps, pt, strict=True))
        total = total + (kl_st + kl_ts) / 2
    return total / s.shape[0]


@pytest.mark.parametrize("shape", [(1, 2), (4, 10)])
@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_symmetric_kl_matches_brute_force(shape, temp):
    s = 2 * torch.randn(shape, generator=_rng(52))
    t = 2 * torch.randn(shape, generator=_rng(53))
    loss = symmetric_kl_divergence(s, t, temperature=temp)
    _close(loss, _sym_kl_reference(s, t, temp).item())
    _close(symmetric_kl_divergence(t, s, temperature=temp), float(loss))  # symmetric in value
    _close(
        SymmetricKLDivergence(temp)(s.bfloat16(), t.bfloat16()),
        _sym_kl_reference(s.bfloat16().float(), t.bfloat16().float(), temp).item(),
        rtol=1e-4,
    )
    # Independent check with torch's KL: KL(p||q) = kl_div(log q, p); Eq. 6 is the mean of both directions.
    ls, lt = F.log_softmax(s / temp, dim=1), F.log_softmax(t / temp, dim=1)
    expected = 0.5 * (F.kl_div(lt, ls, log_target=True, reduction="batchmean") + F.kl_div(
        ls, lt, log_target=True, reduction="batchmean"
    ))
    _close(loss, float(expected))


@pytest.mark.parametrize("temp", [1.0, 0.3])
def test_symmetric_kl_gradient_matches_brute_force(temp):
    """The student's gradient equals autograd through the float64 loop over Eq. 6 (teacher held fixed)."""
    s = 2 * torch.randn(3, 5, generator=_rng(56))
    t = 2 * torch.randn(3, 5, generator=_rng(57))
    s32 = s.clone().requires_grad_(True)
    symmetric_kl_divergence(s32, t, temperature=temp).backward()
    s64 = s.double().requires_grad_(True)
    _sym_kl_reference(s64, t, temp).backward()
    _close(s32.grad, s64.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_symmetric_kl_default_temperature_is_one():
    """Eq. 6 has no temperature: the default is T = 1, for the function and the module."""
    s, t = torch.randn(2, 4, generator=_rng(58)), torch.randn(2, 4, generator=_rng(59))
    _close(symmetric_kl_divergence(s, t), _sym_kl_reference(s, t, 1.0).item())
    _close(SymmetricKLDivergence()(s, t), _sym_kl_reference(s, t, 1.0).item())


def test_symmetric_kl_zero_when_equal_and_student_only_gradient():
    s = torch.randn(3, 5, generator=_rng(54), requires_grad=True)
    t = torch.randn(3, 5, generator=_rng(55), requires_grad=True)
    _close(symmetric_kl_divergence(s, s.detach() + 10.0), 0.0)  # softmax is shift invariant
    symmetric_kl_divergence(s, t).backward()
    assert t.grad is None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# EMA and single-process distributed utilities


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_update_momentum_is_moco_eq2_on_the_parameters_only():
    """lightly's ``update_momentum(student, teacher, m)`` as the momentum methods call it: MoCo Eq. 2 on the
    parameters; the teacher's buffers (BatchNorm statistics) are left alone, as MoCo's key-encoder update
    leaves them."""
    torch.manual_seed(0)
    student, teacher = _net(), copy.deepcopy(_net()).requires_grad_(False)
    student(torch.randn(8, 3))  # changes the student's BatchNorm running statistics
    before = {n: t.clone() for n, t in teacher.state_dict().items()}
    update_momentum(student, teacher, m=0.9)
    s_params = dict(student.named_parameters())
    for name, p in teacher.named_parameters():
        _close(p, (0.9 * before[name] + 0.1 * s_params[name].detach()).numpy(), atol=1e-7)
    s_buffers = dict(student.named_buffers())
    for name, buf in teacher.named_buffers():
        assert torch.equal(buf, before[name]) and not torch.equal(buf, s_buffers[name]), name
    kept = {n: p.clone() for n, p in teacher.named_parameters()}
    update_momentum(student, teacher, m=1.0)
    assert all(torch.equal(p, kept[n]) for n, p in teacher.named_parameters())
    update_momentum(student, teacher, m=0.0)
    assert all(torch.equal(p, s_params[n]) for n, p in teacher.named_parameters())


def test_distributed_utilities_are_identity_on_one_process():
    assert D.world_size() == 1 and D.rank() == 0
    x = torch.randn(3, 2, requires_grad=True)
    assert D.gather(x) is x
    for fn in (D.gather_no_grad, D.all_reduce_sum, D.all_reduce_max):
        out = fn(x)
        assert torch.equal(out, x) and not out.requires_grad
    # What ours adds to lightly's gathers: they need a process group (and return one tensor per rank).
    for lightly_gather in (lightly_dist.gather, concat_all_gather):
        with pytest.raises(ValueError, match="process group"):
            lightly_gather(x)
