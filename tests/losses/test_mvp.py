"""MVP's alignment loss (MVP Eq. 9, ``ssl_zoo.losses.mvp``): negative cosine over the CLS and the masked tokens
against a loop, its gradient, bfloat16 inputs and closed forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssl_zoo.losses import (
    mvp_alignment_loss,
)
from tests.helpers.loss_checks import check_value_and_gradients, close, cosine, rand, rng


def _mvp_reference(pred, target, mask=None) -> float:
    per_image = []
    for i in range(pred.shape[0]):
        tokens = [0] + [m + 1 for m in range(pred.shape[1] - 1) if mask is None or mask[i, m]]
        cos = [float(pred[i, t] @ target[i, t] / (pred[i, t].norm() * target[i, t].norm())) for t in tokens]
        per_image.append(-sum(cos) / len(tokens))
    return sum(per_image) / len(per_image)


@pytest.mark.parametrize("shape", [(1, 2, 3), (3, 9, 8)])
def test_mvp_alignment_matches_brute_force(shape):
    pred = torch.randn(shape, generator=rng(28))
    target = torch.randn(shape, generator=rng(29))
    mask = torch.rand(shape[0], shape[1] - 1, generator=rng(30)) < 0.5
    close(mvp_alignment_loss(pred, target), _mvp_reference(pred, target))
    close(mvp_alignment_loss(pred, target, mask), _mvp_reference(pred, target, mask))
    close(mvp_alignment_loss(pred, target, torch.ones_like(mask)), _mvp_reference(pred, target))
    bf16 = mvp_alignment_loss(pred.bfloat16(), target.bfloat16(), mask)
    assert bf16.dtype == torch.float32
    close(
        bf16, _mvp_reference(pred.bfloat16().float(), target.bfloat16().float(), mask), rtol=1e-4, atol=1e-4
    )


def test_mvp_alignment_closed_form():
    pred = torch.randn(2, 5, 4, generator=rng(31), requires_grad=True)
    close(mvp_alignment_loss(pred, 2 * pred.detach()), -1.0)
    close(mvp_alignment_loss(pred, -pred.detach()), 1.0)
    # No masked token: only the CLS term remains.
    target = torch.randn(2, 5, 4, generator=rng(32))
    none_masked = torch.zeros(2, 4, dtype=torch.bool)
    expected = -F.cosine_similarity(pred[:, 0].detach(), target[:, 0], dim=-1).mean()
    loss = mvp_alignment_loss(pred, target, none_masked)
    close(loss, float(expected))
    loss.backward()
    assert torch.equal(pred.grad[:, 1:], torch.zeros_like(pred.grad[:, 1:]))
    with pytest.raises(ValueError, match="mask"):
        mvp_alignment_loss(pred, target, torch.ones(2, 5, dtype=torch.bool))


def _mvp_loop(pred, target, mask=None):
    per_image = []
    for b in range(pred.shape[0]):
        cosines = [cosine(pred[b, 0], target[b, 0])]
        for m in range(1, pred.shape[1]):
            if mask is None or mask[b, m - 1]:
                cosines.append(cosine(pred[b, m], target[b, m]))
        per_image.append(-sum(cosines) / len(cosines))
    return torch.stack(per_image).mean()


@pytest.mark.parametrize("masked", [False, True])
def test_mvp_alignment_gradient_matches_the_loop_over_eq9(masked):
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]]) if masked else None
    inputs = {"pred": rand(2, 5, 6, seed=15), "target": rand(2, 5, 6, seed=16), "mask": mask}
    check_value_and_gradients(mvp_alignment_loss, _mvp_loop, inputs, with_grad=("pred",))
