"""Sinkhorn-Knopp codes and the swapped prediction loss (HVP-MTL Eq. 2, ``ssl_zoo.losses.sinkhorn``).

The SwAV loop written literally in float64, marginals, underflow and extreme scores (and why lightly's
``sinkhorn`` is not used), the clamped share, the swapped loss and its gradient against a float64 loop, and the
codes over the global batch in 2 gloo processes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl_zoo.losses import (
    SwappedPredictionLoss,
    sinkhorn_clamped_fraction,
    sinkhorn_knopp,
    swapped_prediction_loss,
)
from tests.helpers.loss_checks import close, rng
from tests.helpers.two_process_losses import N_LOCAL, WORLD, close_across_ranks


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
    scores = torch.randn(shape, generator=rng(14))
    codes = sinkhorn_knopp(scores, **kwargs)
    assert codes.shape == shape and codes.dtype == torch.float32
    close(codes, _sinkhorn_reference(scores.numpy(), **kwargs), rtol=1e-4, atol=1e-6)
    close(codes.sum(dim=1), np.ones(shape[0]))


def test_sinkhorn_without_clamp():
    scores = torch.randn(6, 5, generator=rng(15))
    close(
        sinkhorn_knopp(scores, clamp_max=None),
        _sinkhorn_reference(scores.numpy(), clamp_max=np.inf),
        rtol=1e-4,
    )


def test_sinkhorn_marginals():
    b, k = 32, 8
    scores = F.normalize(torch.randn(b, k, generator=rng(16)), dim=1)
    codes = sinkhorn_knopp(scores)
    close(codes.sum(dim=1), np.ones(b))  # exact after the last column step
    # Prototypes approximately equipartitioned after 3 rounds, and more so than the plain softmax.
    spread = (codes.sum(dim=0) - b / k).abs().max()
    assert spread < 0.5 * b / k
    assert spread < (torch.softmax(scores / 0.05, dim=1).sum(dim=0) - b / k).abs().max()
    close(sinkhorn_knopp(scores, iterations=200).sum(dim=0), np.full(k, b / k), rtol=1e-3)


def test_sinkhorn_survives_underflow_and_extreme_scores():
    # Sample 0 lies 6 below everything: exp(-120) underflows in float32 but not in float64.
    scores = torch.randn(5, 4, generator=rng(17)) * 0.1
    scores[0] -= 6.0
    codes = sinkhorn_knopp(scores, clamp_max=None)
    close(codes, _sinkhorn_reference(scores.numpy(), clamp_max=np.inf), rtol=1e-3, atol=1e-6)
    for extreme in (1e4, -1e4):
        wild = torch.randn(8, 6, generator=rng(18)) * extreme
        codes = sinkhorn_knopp(wild)
        assert torch.isfinite(codes).all() and (codes >= 0).all()
        close(codes.sum(dim=1), np.ones(8), rtol=1e-4)


def test_lightly_sinkhorn_equals_ours_in_range_but_turns_an_underflow_into_nan():
    """Why ``sinkhorn_knopp`` is not a wrapper over lightly's ``sinkhorn``: on the clamped scores lightly gives
    the same codes wherever ``exp(scores / epsilon)`` stays in float32's range (cosines at the paper's
    epsilon = 0.05), but it iterates on ``Q`` itself, so one sample whose column underflows makes 0/0 and the
    NaN spreads through the row sums to every sample's codes (under DDP, every rank's). Ours iterates on log Q."""
    from lightly.loss.swav_loss import sinkhorn as lightly_sinkhorn

    cosines = F.normalize(torch.randn(64, 16, generator=rng(24)), dim=1) @ F.normalize(
        torch.randn(30, 16, generator=rng(25)), dim=1).T  # [B, K] sample-prototype cosines
    clamped = (cosines / 0.05).clamp(max=10.0)
    close(lightly_sinkhorn(clamped, iterations=3, epsilon=1.0), sinkhorn_knopp(cosines).numpy(), atol=1e-6)
    scores = torch.randn(5, 4, generator=rng(17)) * 0.1
    scores[0] -= 6.0  # exp(-120) underflows in float32
    assert torch.isnan(lightly_sinkhorn(scores / 0.05, iterations=3, epsilon=1.0)).all()
    assert torch.isfinite(sinkhorn_knopp(scores, clamp_max=None)).all()


def test_sinkhorn_float32_from_bfloat16_without_grad():
    scores = torch.randn(6, 5, generator=rng(19)).bfloat16().requires_grad_(True)
    codes = sinkhorn_knopp(scores)
    assert codes.dtype == torch.float32 and not codes.requires_grad
    close(codes, _sinkhorn_reference(scores.detach().float().numpy()), rtol=1e-4, atol=1e-6)


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
    sa, sb = torch.randn(2, 6, 5, generator=rng(20)).unbind(0)
    ca, cb = sinkhorn_knopp(sa), sinkhorn_knopp(sb)
    loss_fn = SwappedPredictionLoss(temperature=tau)
    loss = loss_fn(sa, sb, ca, cb)
    close(loss, _swapped_reference(sa.double(), sb.double(), ca.double(), cb.double(), tau).item())
    close(loss_fn(sb, sa, cb, ca), float(loss))  # swapping the views
    bf16 = loss_fn(sa.bfloat16(), sb.bfloat16(), ca, cb)
    assert bf16.dtype == torch.float32
    ref = _swapped_reference(sa.bfloat16().double(), sb.bfloat16().double(), ca.double(), cb.double(), tau)
    close(bf16, ref.item(), rtol=1e-4)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_swapped_prediction_gradient_matches_brute_force(tau):
    """d loss / d scores of both views equals autograd through the float64 loop over Eq. 2."""
    sa, sb = torch.randn(2, 5, 4, generator=rng(23)).unbind(0)
    ca, cb = sinkhorn_knopp(sa), sinkhorn_knopp(sb)
    sa32, sb32 = sa.clone().requires_grad_(True), sb.clone().requires_grad_(True)
    swapped_prediction_loss(sa32, sb32, ca, cb, temperature=tau).backward()
    sa64, sb64 = sa.double().requires_grad_(True), sb.double().requires_grad_(True)
    _swapped_reference(sa64, sb64, ca.double(), cb.double(), tau).backward()
    close(sa32.grad, sa64.grad.numpy(), rtol=1e-4, atol=1e-6)
    close(sb32.grad, sb64.grad.numpy(), rtol=1e-4, atol=1e-6)
    # Closed form of the gradient for one term: (softmax(s / tau) - q) / (tau * B); Eq. 2 adds no factor 1/2.
    expected_a = (torch.softmax(sa.double() / tau, dim=1) - cb.double()) / (tau * sa.shape[0])
    close(sa32.grad, expected_a.numpy(), rtol=1e-4, atol=1e-6)


def test_swapped_prediction_closed_form_and_gradients():
    k = 7
    uniform = torch.full((3, k), 1.0 / k)
    # Uniform scores and codes: each swapped term is log K, and Eq. 2 sums the two.
    close(SwappedPredictionLoss()(torch.zeros(3, k), torch.zeros(3, k), uniform, uniform), 2 * math.log(k))
    sa = torch.randn(3, k, generator=rng(21), requires_grad=True)
    codes = torch.rand(3, k, generator=rng(22)).requires_grad_(True)
    SwappedPredictionLoss()(sa, sa.detach(), codes, codes).backward()
    assert torch.isfinite(sa.grad).all() and sa.grad.abs().sum() > 0
    assert codes.grad is None  # codes are targets


def test_sinkhorn_clamped_fraction_counts_the_clamped_entries():
    scores = torch.tensor([[0.49, 0.51, -1.0], [0.6, 0.5, 0.2]])
    # scores / 0.05 > 10 exactly where score > 0.5: 0.51 and 0.6 (0.5 itself is not clamped).
    close(sinkhorn_clamped_fraction(scores), 2 / 6)
    close(sinkhorn_clamped_fraction(scores, epsilon=0.1, clamp_max=4.0), 4 / 6)  # score > 0.4
    close(sinkhorn_clamped_fraction(scores, clamp_max=None), 0.0)
    wild = torch.randn(16, 9, generator=rng(24))
    brute = sum(float(v) / 0.05 > 10.0 for v in wild.flatten()) / wild.numel()
    close(sinkhorn_clamped_fraction(wild), brute)
    # What the fraction reports is what Sinkhorn does: clamped entries of a row get equal codes.
    row = torch.tensor([[0.9, 0.7, 0.1, -0.3]])
    codes = sinkhorn_knopp(row.repeat(4, 1), iterations=1)
    close(codes[0, 0], float(codes[0, 1]))
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_clamped_fraction(scores, epsilon=0.0)


@pytest.mark.distributed
@pytest.mark.parametrize("key", ["codes", "codes_extreme"])
def test_sinkhorn_uses_global_batch(two_process_losses, key):
    per_rank, single = two_process_losses
    codes = torch.cat([r[key] for r in per_rank])
    assert torch.isfinite(codes).all()
    close_across_ranks(codes, single[key], atol=1e-5, rtol=1e-3)
    close_across_ranks(codes.sum(dim=1), torch.ones(WORLD * N_LOCAL))
