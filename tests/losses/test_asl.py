"""The weighted asymmetric loss (HVP-MTL Eq. 1, ``ssl_zoo.losses.asl``): value and gradient against a float64
loop over the equation, soft targets, bfloat16 inputs, closed forms at the extremes and argument errors."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_zoo.losses import (
    WeightedAsymmetricLoss,
    weighted_asymmetric_loss,
)
from tests.helpers.loss_checks import check_value_and_gradients, close, rand, rng


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
    logits = 3 * torch.randn(shape, generator=rng(10))
    targets = (torch.rand(shape, generator=rng(11)) < 0.3).float()
    keys = {"eta": "eta", "gamma_pos": "gp", "gamma_neg": "gn"}
    expected = _asl_reference(logits, targets, **{keys[k]: v for k, v in params.items()})
    close(WeightedAsymmetricLoss(**params)(logits, targets), expected)


def test_asl_soft_targets_and_bfloat16():
    logits = 2 * torch.randn(5, 6, generator=rng(12))
    targets = torch.rand(5, 6, generator=rng(13))  # confidences in [0, 1]
    close(WeightedAsymmetricLoss()(logits, targets), _asl_reference(logits, targets))
    logits_bf16 = logits.bfloat16()
    loss = WeightedAsymmetricLoss()(logits_bf16, targets.bfloat16())
    assert loss.dtype == torch.float32
    close(loss, _asl_reference(logits_bf16.float(), targets.bfloat16().float()), rtol=1e-4)


def test_asl_closed_form_and_extremes():
    # logits 0: p = 1/2; positive: -eta * 2^-gamma_pos * log(1/2); negative: -2^-gamma_neg * log(1/2).
    loss = WeightedAsymmetricLoss()(torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    close(loss, (3 * 10 * 0.5**4 * math.log(2) + 0.5 * math.log(2)) / 2)
    # Confidently wrong logits hit the eps floor: -eta * 1 * log(eps) for the missed positive.
    logits = torch.tensor([[-100.0, 100.0]], requires_grad=True)
    loss = WeightedAsymmetricLoss()(logits, torch.tensor([[1.0, 0.0]]))
    loss.backward()
    close(loss, -10 * math.log(1e-8) - math.log(1e-8))
    assert torch.isfinite(logits.grad).all()


def test_asl_rejects_bad_arguments():
    with pytest.raises(ValueError, match="eta"):
        WeightedAsymmetricLoss(eta=0.0)
    with pytest.raises(ValueError, match="gamma"):
        WeightedAsymmetricLoss(gamma_neg=-1.0)
    with pytest.raises(ValueError, match="shape"):
        WeightedAsymmetricLoss()(torch.zeros(2, 3), torch.zeros(2, 4))


def _asl_loop(logits, targets, eta, gamma_pos, gamma_neg, eps):
    total = 0.0
    for b in range(logits.shape[0]):
        for c in range(logits.shape[1]):
            p = 1 / (1 + torch.exp(-logits[b, c]))
            y = targets[b, c]
            total = total - (y * eta * (1 - p) ** gamma_pos * torch.log(torch.clamp(p, min=eps))
                             + (1 - y) * p**gamma_neg * torch.log(torch.clamp(1 - p, min=eps)))
    return total / logits.shape[0]


@pytest.mark.parametrize("eta,gamma_pos,gamma_neg", [(10.0, 4.0, 1.0), (1.0, 0.0, 0.0), (2.0, 1.0, 3.0)])
def test_asl_gradient_matches_the_loop_over_eq1(eta, gamma_pos, gamma_neg):
    targets = (rand(3, 5, seed=11) > 0).float()
    inputs = {"logits": 2 * rand(3, 5, seed=10), "targets": targets, "eta": eta, "gamma_pos": gamma_pos,
              "gamma_neg": gamma_neg, "eps": 1e-8}
    check_value_and_gradients(weighted_asymmetric_loss, _asl_loop, inputs, with_grad=("logits",))
