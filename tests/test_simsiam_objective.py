"""SimSiam's objective inside BAM + IA-CLoss: which prediction meets which target, and where the gradient stops.

SimSiam (Chen & He 2021, Eq. 3-4): L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2 with D the negative cosine.
Both the pairing (p1 with the *other* view's z2) and the stop-gradient on the target branch are what keeps
SimSiam from collapsing; neither changes the loss value at a symmetric point, so they are checked against
an explicit computation on the same views: the value and every parameter's gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ssl_zoo.augment import shuffle_pairs
from ssl_zoo.methods import BAMIA
from tests.helpers.tolerances import assert_close_at_scale

TINY = dict(backbone="vit_tiny_patch16_224", backbone_kwargs={"img_size": 32, "model_kwargs": {"depth": 1}},
            img_size=32, proj_hidden_dim=16, proj_dim=12, pred_hidden_dim=6, head_norm="layer")


def _batch(num_images: int, views: int) -> dict:
    g = torch.Generator().manual_seed(3)
    return {"views": torch.randn(num_images, views, 3, 32, 32, generator=g),
            "block_ids": torch.arange(views // 2).repeat_interleave(2).expand(num_images, -1).clone(),
            "index": torch.arange(num_images)}


def _neg_cos(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) = -mean_i p_i.z_i / (|p_i| |z_i|), written out."""
    return -((p * z).sum(dim=1) / (p.norm(dim=1) * z.norm(dim=1))).mean()


def _explicit_simsiam_loss(model: BAMIA, batch: dict, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)  # the same pair shuffle as the training step
    x1, x2, _, _ = shuffle_pairs(batch["views"], batch["block_ids"])
    z1, z2 = model.projector(model.backbone(x1)), model.projector(model.backbone(x2))
    p1, p2 = model.predictor(z1), model.predictor(z2)
    return 0.5 * _neg_cos(p1, z2.detach()) + 0.5 * _neg_cos(p2, z1.detach())


@pytest.mark.parametrize("bam,views", [(False, 2), (True, 8)], ids=["simsiam", "bam"])
def test_lsim_pairs_each_prediction_with_the_other_views_detached_projection(bam, views):
    torch.manual_seed(0)
    model = BAMIA(**TINY, bam=bam, ia_loss="none")
    model.log = lambda *a, **k: None
    reference = copy.deepcopy(model)
    batch = _batch(3, views)

    torch.manual_seed(5)
    loss = model.training_step(batch, 0)
    expected = _explicit_simsiam_loss(reference, batch, seed=5)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)

    loss.backward()
    expected.backward()
    ref_grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        # The two sides sum in different orders: float32 round-off of the gradient's scale, whatever the
        # machine's threads (an element-wise rtol fails on elements near zero).
        assert_close_at_scale(p.grad, ref_grads[name].grad, msg=f"gradient of {name}")


def test_the_explicit_loss_distinguishes_the_wrong_readings():
    """The comparison above can fail: without the stop-gradient, or pairing p1 with z1, the numbers differ."""
    torch.manual_seed(0)
    model = BAMIA(**TINY, bam=False, ia_loss="none")
    batch = _batch(3, 2)
    torch.manual_seed(5)
    x1, x2, _, _ = shuffle_pairs(batch["views"], batch["block_ids"])
    z1, z2 = model.projector(model.backbone(x1)), model.projector(model.backbone(x2))
    p1, p2 = model.predictor(z1), model.predictor(z2)
    right = 0.5 * _neg_cos(p1, z2.detach()) + 0.5 * _neg_cos(p2, z1.detach())
    same_view = 0.5 * _neg_cos(p1, z1.detach()) + 0.5 * _neg_cos(p2, z2.detach())
    assert not torch.allclose(right, same_view, atol=1e-4)
    grad_right = torch.autograd.grad(right, model.projector.parameters(), retain_graph=True)
    no_stop = 0.5 * _neg_cos(p1, z2) + 0.5 * _neg_cos(p2, z1)
    torch.testing.assert_close(no_stop, right)  # the value alone cannot tell them apart ...
    grad_no_stop = torch.autograd.grad(no_stop, model.projector.parameters())
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(grad_right, grad_no_stop, strict=True))
