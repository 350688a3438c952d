"""SimMIM's masked L1 (HVP-MTL Eq. 4, ``ssl_zoo.losses.mim``): the mean over masked pixels against a loop, its
gradient reaching masked predictions only, full and empty masks."""

from __future__ import annotations

import pytest
import torch

from ssl_zoo.losses import (
    masked_l1_loss,
)
from tests.helpers.loss_checks import check_value_and_gradients, close, rand, rng


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
    pred = torch.randn(shape, generator=rng(23))
    target = torch.randn(shape, generator=rng(24))
    mask = torch.rand(shape[0], 1, *shape[2:], generator=rng(25)) < 0.5
    mask[0, 0, 0, 0] = True
    expected = _masked_l1_reference(pred, target, mask)
    close(masked_l1_loss(pred, target, mask), expected)
    close(masked_l1_loss(pred, target, mask.float()), expected)
    bf16 = masked_l1_loss(pred.bfloat16(), target.bfloat16(), mask)
    assert bf16.dtype == torch.float32
    close(bf16, _masked_l1_reference(pred.bfloat16().float(), target.bfloat16().float(), mask), rtol=1e-4)


def test_masked_l1_full_and_empty_mask():
    pred = torch.randn(2, 3, 4, 4, generator=rng(26), requires_grad=True)
    target = torch.randn(2, 3, 4, 4, generator=rng(27))
    close(masked_l1_loss(pred, target, torch.ones(2, 1, 4, 4)), float((pred - target).abs().mean().detach()))
    loss = masked_l1_loss(pred, target, torch.zeros(2, 1, 4, 4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(pred.grad, torch.zeros_like(pred))
    with pytest.raises(ValueError, match="mask"):
        masked_l1_loss(pred, target, torch.ones(2, 4, 4))


def _masked_l1_loop(pred, target, mask):
    total, count = 0.0, 0.0
    for b in range(pred.shape[0]):
        for y in range(pred.shape[2]):
            for x in range(pred.shape[3]):
                if mask[b, 0, y, x] > 0:
                    count += pred.shape[1]
                    for c in range(pred.shape[1]):
                        total = total + torch.abs(pred[b, c, y, x] - target[b, c, y, x])
    return total / count


def test_masked_l1_gradient_reaches_masked_predictions_only():
    mask = (rand(2, 1, 4, 4, seed=14) > 0).float()
    inputs = {"pred": rand(2, 3, 4, 4, seed=12), "target": rand(2, 3, 4, 4, seed=13), "mask": mask}
    check_value_and_gradients(masked_l1_loss, _masked_l1_loop, inputs, with_grad=("pred",))
    pred = inputs["pred"].clone().requires_grad_(True)
    masked_l1_loss(pred, inputs["target"], mask).backward()
    assert not pred.grad[(mask == 0).expand_as(pred)].any()  # unmasked pixels carry no loss
