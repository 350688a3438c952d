"""IA-CLoss (BAM + IA-CLoss Eq. 1) and SupCon ``L_out`` (``ssl_zoo.losses.ia_closs``).

Against a float64 loop over anchors, candidates and positives: the value, the gradient, closed forms (one positive
is NT-Xent; identical views), invariances, stability at tau = 0.01, bfloat16 inputs and argument errors. Under DDP
the loss sees the global batch: in one process standing in for rank 0 (the gathered keys keep their gradient) and
in 2 gloo processes against one process on the concatenated batch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ssl_zoo.losses.ia_closs as ia_closs
from ssl_zoo.losses import (
    ImageAwareContrastiveLoss,
    SupConLoss,
)
from tests.helpers.loss_checks import close, rng, unit_rows
from tests.helpers.two_process_losses import (
    D_IN,
    D_OUT,
    IDS,
    N_LOCAL,
    assert_loss_and_gradients_match_single_process,
    close_across_ranks,
    make_inputs,
)


def _ia_reference(z: np.ndarray, ids: list[int], tau: float, supcon: bool = False) -> float:
    """BAM+IA-CLoss Eq. 1 (or SupCon L_out) with explicit loops over anchors, candidates, positives."""
    z = unit_rows(z.astype(np.float64))
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
    z = torch.randn(len(ids), dim, generator=rng(len(ids) + dim))
    loss_cls = SupConLoss if supcon else ImageAwareContrastiveLoss
    loss = loss_cls(temperature=tau)(z, torch.tensor(ids))
    assert loss.dtype == torch.float32 and loss.ndim == 0
    close(loss, _ia_reference(z.numpy(), ids, tau, supcon))


@pytest.mark.parametrize("supcon", [False, True])
def test_ia_and_supcon_gradients_match_brute_force(supcon):
    ids = IDS_CASES[1]
    z = torch.randn(len(ids), 8, generator=rng(1), requires_grad=True)
    loss_cls = SupConLoss if supcon else ImageAwareContrastiveLoss
    loss_cls(temperature=0.2)(z, torch.tensor(ids)).backward()
    z64 = z.detach().double().requires_grad_(True)
    _ia_reference_torch(z64, ids, 0.2, supcon).backward()
    close(z.grad, z64.grad.numpy(), rtol=1e-4, atol=1e-6)


def _nt_xent(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR NT-Xent: cross-entropy over the 2B-1 other views, target the partner view."""
    z = F.normalize(torch.cat([a, b]).double(), dim=1)
    n = z.shape[0]
    logits = (z @ z.T / tau).masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    partner = (torch.arange(n) + n // 2) % n
    return F.cross_entropy(logits, partner)


def test_ia_loss_with_one_positive_equals_nt_xent():
    a = torch.randn(7, 10, generator=rng(2))
    b = torch.randn(7, 10, generator=rng(3))
    ids = torch.cat([torch.arange(7), torch.arange(7)])
    z = torch.cat([a, b])
    for tau in (0.07, 0.5):
        expected = float(_nt_xent(a, b, tau))
        close(ImageAwareContrastiveLoss(temperature=tau)(z, ids), expected)
        close(SupConLoss(temperature=tau)(z, ids), expected)


def test_ia_loss_differs_from_supcon_with_several_positives():
    """1/|P| multiplies the log of the sum in Eq. 1, not a sum of logs."""
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    z = torch.randn(6, 4, generator=rng(4))
    ia, sup = ImageAwareContrastiveLoss()(z, ids), SupConLoss()(z, ids)
    assert not torch.isclose(ia, sup, rtol=1e-3)


def test_ia_loss_closed_form_identical_views():
    """All views identical: every similarity is 1, so l_i = -(1/|P|) log(|P| / (N-1))."""
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    z = torch.ones(7, 5)
    expected = np.mean([-math.log(2 / 6) / 2] * 3 + [-math.log(3 / 6) / 3] * 4)
    close(ImageAwareContrastiveLoss()(z, ids), expected)
    close(SupConLoss()(z, ids), -math.log(1 / 6))


def test_ia_loss_invariant_to_permutation_and_scale():
    ids = torch.tensor(IDS_CASES[1])
    z = torch.randn(len(ids), 6, generator=rng(5))
    perm = torch.randperm(len(ids), generator=rng(6))
    loss = ImageAwareContrastiveLoss()(z, ids)
    close(ImageAwareContrastiveLoss()(z[perm], ids[perm]), float(loss))
    close(ImageAwareContrastiveLoss()(3.7 * z, ids), float(loss))


@pytest.mark.parametrize("supcon", [False, True])
def test_ia_and_supcon_stable_at_tau_001(supcon):
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    z = torch.randn(8, 4, generator=rng(7))
    z[1] = z[0] + 1e-3  # near-duplicate positive: s/tau close to 100
    z[3] = -z[2]  # opposite positive: s/tau = -100
    z = z.requires_grad_(True)
    loss_cls = SupConLoss if supcon else ImageAwareContrastiveLoss
    loss = loss_cls(temperature=0.01)(z, ids)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    close(loss, _ia_reference(z.detach().numpy(), ids.tolist(), 0.01, supcon), rtol=1e-4)


def test_ia_loss_accepts_bfloat16():
    ids = torch.tensor(IDS_CASES[1])
    z = torch.randn(len(ids), 8, generator=rng(8)).bfloat16().requires_grad_(True)
    loss = ImageAwareContrastiveLoss()(z, ids)
    loss.backward()
    assert loss.dtype == torch.float32 and z.grad.dtype == torch.bfloat16
    close(loss, _ia_reference(z.detach().float().numpy(), ids.tolist(), 0.1), rtol=1e-4)
    close(
        SupConLoss()(z, ids), _ia_reference(z.detach().float().numpy(), ids.tolist(), 0.1, True), rtol=1e-4
    )


@pytest.mark.parametrize("loss_cls", [ImageAwareContrastiveLoss, SupConLoss])
def test_no_positive_gives_zero_with_zero_gradient(loss_cls):
    z = torch.randn(4, 3, generator=rng(9), requires_grad=True)
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


FAKE_WORLD = 2


def _fake_rank0(monkeypatch, module, other: dict[torch.dtype, torch.Tensor]) -> None:
    """Rank 0 of ``FAKE_WORLD``; rank 1 holds ``other[dtype]`` for every gathered tensor of that dtype."""
    monkeypatch.setattr(module, "world_size", lambda: FAKE_WORLD)
    monkeypatch.setattr(module, "rank", lambda: 0)
    monkeypatch.setattr(module, "gather", lambda x: torch.cat([x, other[x.dtype].to(x)]))
    monkeypatch.setattr(module, "gather_no_grad", lambda x: torch.cat([x, other[x.dtype].to(x)]).detach())


def _ia_reference_of_rank0(z_local, z_other, ids_local, ids_other, tau):
    """Rank 0's share W * sum_{i local, |P(i)| >= 1} l_i / N_valid (global N_valid), as a float64 loop."""
    z_all = torch.cat([z_local, z_other])
    ids_all = torch.cat([ids_local, ids_other])
    unit = [v / v.norm() for v in z_all]
    n_valid = sum(int((ids_all == ids_all[j]).sum() > 1) for j in range(len(ids_all)))
    total = 0.0
    for i in range(len(z_local)):
        others = [a for a in range(len(z_all)) if a != i]
        positives = [p for p in others if ids_all[p] == ids_all[i]]
        if not positives:
            continue
        num = sum(torch.exp(unit[i] @ unit[p] / tau) for p in positives)
        den = sum(torch.exp(unit[i] @ unit[a] / tau) for a in others)
        total = total - torch.log(num / den) / len(positives)
    return FAKE_WORLD * total / n_valid


def test_ia_closs_keeps_the_gradient_through_the_gathered_keys(monkeypatch):
    g = torch.Generator().manual_seed(0)
    z_local, z_other = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    ids_local, ids_other = torch.tensor([0, 0, 1, 2, 3]), torch.tensor([1, 2, 4, 4, 5])  # ids 1, 2 span ranks
    # the other rank gathers its embeddings after normalising them, as this one does
    unit_other = torch.nn.functional.normalize(z_other, dim=1)
    _fake_rank0(monkeypatch, ia_closs, {torch.float32: unit_other, torch.int64: ids_other})

    z = z_local.clone().requires_grad_(True)
    loss = ia_closs.image_aware_contrastive_loss(z, ids_local, temperature=0.2)
    loss.backward()
    z64 = z_local.double().requires_grad_(True)
    expected = _ia_reference_of_rank0(z64, z_other.double(), ids_local, ids_other, 0.2)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.distributed
@pytest.mark.parametrize("key", ["ia_0.1", "ia_0.01", "sup_0.1", "sup_0.01"])
def test_loss_and_gradients_match_single_process(two_process_losses, key):
    assert_loss_and_gradients_match_single_process(*two_process_losses, key)


@pytest.mark.distributed
def test_ia_loss_without_gather_sees_local_batch_only(two_process_losses):
    per_rank, _ = two_process_losses
    for rank, r in enumerate(per_rank):
        inputs = make_inputs()
        lin = nn.Linear(D_IN, D_OUT)
        lin.load_state_dict(inputs["lin_state"])
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        expected = ImageAwareContrastiveLoss()(lin(inputs["x"][rows]), IDS[rows])
        close_across_ranks(r["ia_local"], expected.detach())
