"""Barlow Twins loss (MPCLBarlowTwins) and the in-batch retrieval accuracy PTB uses with it.

The 2-process DDP equivalence of the loss (global-batch standardisation and cross-correlation, gathered with
gradients) runs inside the method in tests/jobs/test_ddp_every_method.py (``mpcl_barlowtwins``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightly.loss import BarlowTwinsLoss as LightlyBarlowTwinsLoss

from ssl_zoo.losses.barlow_twins import BarlowTwinsLoss, barlow_twins_loss, in_batch_retrieval_accuracy


def _ref_loss(za: np.ndarray, zb: np.ndarray, lam: float) -> float:
    """Eq. 1 element by element in float64: C_ij = sum_b a_bi b_bj / N on batch-standardised embeddings."""
    n, d = za.shape

    def standardise(z):
        return (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5)  # biased variance, BatchNorm's eps

    a, b = standardise(za), standardise(zb)
    total = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(a[k, i] * b[k, j] for k in range(n)) / n
            total += (1.0 - c_ij) ** 2 if i == j else lam * c_ij**2
    return total


def _pair(n: int = 6, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    za = torch.randn(n, d, generator=g)
    return za, 0.7 * za + 0.5 * torch.randn(n, d, generator=g)  # correlated second view


def test_loss_equals_brute_force_eq1():
    za, zb = _pair()
    for lam in (0.0051, 0.0, 1.0):
        got = barlow_twins_loss(za, zb, lambda_offdiag=lam)
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(_ref_loss(za.double().numpy(), zb.double().numpy(), lam), rel=1e-5)


def test_one_process_equals_lightly():
    za, zb = _pair(8, 4, seed=1)
    ours = BarlowTwinsLoss(lambda_offdiag=5e-3)(za, zb)
    theirs = LightlyBarlowTwinsLoss(lambda_param=5e-3, gather_distributed=False)(za, zb)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_closed_forms_symmetry_and_gradient():
    # standardised, decorrelated identical views: C = I / (1 + eps), so the loss is ~0
    z = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    assert barlow_twins_loss(z, z).item() < 1e-8
    za, zb = _pair(6, 3, seed=2)
    torch.testing.assert_close(barlow_twins_loss(za, zb), barlow_twins_loss(zb, za))  # C -> C^T
    za.requires_grad_(True)
    loss = barlow_twins_loss(za.bfloat16(), zb.bfloat16())  # bf16 in, float32 maths
    assert loss.dtype == torch.float32
    loss.backward()
    assert za.grad is not None and torch.isfinite(za.grad).all() and za.grad.abs().sum() > 0


def test_argument_errors():
    with pytest.raises(ValueError, match="at least 2 samples"):
        barlow_twins_loss(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        barlow_twins_loss(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="lambda_offdiag"):
        BarlowTwinsLoss(lambda_offdiag=-1.0)


def test_retrieval_accuracy_equals_brute_force():
    za, zb = _pair(7, 4, seed=3)
    a = za / za.norm(dim=1, keepdim=True)
    b = zb / zb.norm(dim=1, keepdim=True)
    expected = np.mean([int(torch.argmax(torch.stack([a[i] @ b[j] for j in range(7)])) == i) for i in range(7)])
    assert in_batch_retrieval_accuracy(za, zb).item() == pytest.approx(expected)
    assert in_batch_retrieval_accuracy(za, za).item() == 1.0
    assert in_batch_retrieval_accuracy(za, za.roll(1, dims=0)).item() < 1.0
