"""BAM + IA-CLoss (``ssl_zoo.methods.bam_ia``): the loss composition, the SimSiam switch, gradients, the smallest
batch BatchNorm takes (DDP: tests/jobs/test_ddp_every_method.py).

SimSiam's objective (Chen & He 2021, Eq. 3-4): L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2 with D the negative cosine.
Both the pairing (p1 with the *other* view's z2) and the stop-gradient on the target branch are what keeps
SimSiam from collapsing; neither changes the loss value at a symmetric point, so they are checked against
an explicit computation on the same views: the value and every parameter's gradient.
"""

import copy

import pytest
import torch

from ssl_zoo.augment import (
    shuffle_pairs,
)
from ssl_zoo.methods import BAMIA
from tests.helpers.tolerances import assert_close_at_scale

TINY = dict(backbone="vit_tiny_patch16_224", backbone_kwargs={"img_size": 32}, img_size=32,
            proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=8, head_norm="layer")


def _batch(num_images: int, views: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "views": torch.randn(num_images, views, 3, 32, 32, generator=g),
        "block_ids": torch.arange(views // 2).repeat_interleave(2).expand(num_images, -1).clone(),
        "index": torch.arange(num_images) + 100,
    }


def _model(**overrides) -> BAMIA:
    torch.manual_seed(0)
    return BAMIA(**{**TINY, **overrides})


def _heads(model: BAMIA, batch: dict, seed: int):
    """The pair shuffle of ``training_step`` under ``seed`` and the heads' outputs, computed here independently."""
    from ssl_zoo.augment import shuffle_pairs

    torch.manual_seed(seed)
    x1, x2, row, _ = shuffle_pairs(batch["views"], batch["block_ids"])
    z1, z2 = model.projector(model.backbone(x1)), model.projector(model.backbone(x2))
    return model.predictor(z1), model.predictor(z2), z1, z2, batch["index"][row]


@pytest.mark.parametrize("ia_embeddings", ["cross", "projector"])
def test_total_loss_is_lsim_plus_lambda_lia(ia_embeddings):
    """Eq. 3 with L_ia of Eq. 1 recomputed from the heads' outputs: the mean over [p1; z2] and [p2; z1] (the
    authors' code, the default) or over the projections [z1; z2]."""
    from ssl_zoo.losses import ImageAwareContrastiveLoss

    batch = _batch(3)
    full = _model(lam=4.0, temperature=0.2, ia_embeddings=ia_embeddings)
    torch.manual_seed(1)
    total = full.training_step(batch, 0)
    only_sim = _model(ia_loss="none")
    torch.manual_seed(1)  # same pair shuffle
    l_sim = only_sim.training_step(batch, 0)
    p1, p2, z1, z2, ids = _heads(full, batch, seed=1)
    ids = ids.repeat(2)
    loss = ImageAwareContrastiveLoss(temperature=0.2)
    if ia_embeddings == "cross":
        l_ia = 0.5 * (loss(torch.cat([p1, z2]), ids) + loss(torch.cat([p2, z1]), ids))
    else:
        l_ia = loss(torch.cat([z1, z2]), ids)
    torch.testing.assert_close(total, l_sim + 4.0 * l_ia)


def test_defaults_follow_the_authors_code_where_the_paper_is_silent():
    """tau 0.3 and the cross embeddings (HHU-JialeChen/SSL simsiam/builder.py); the loss class keeps tau 0.1."""
    from ssl_zoo.losses import ImageAwareContrastiveLoss

    m = _model()
    assert m.hparams.ia_embeddings == "cross" and m.contrastive_loss.temperature == 0.3
    assert ImageAwareContrastiveLoss().temperature == 0.1


@pytest.mark.parametrize("ia_embeddings", ["cross", "projector"])
def test_which_embeddings_enter_eq1(ia_embeddings):
    """The tensors handed to the contrastive loss are exactly the named heads' outputs, with their gradients."""

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = []

        def forward(self, z, ids):
            self.calls.append((z, ids))
            return z.sum() * 0.0

    batch = _batch(3)
    m = _model(ia_embeddings=ia_embeddings)
    m.contrastive_loss = Recorder()
    torch.manual_seed(1)
    m.training_step(batch, 0)
    p1, p2, z1, z2, ids = _heads(m, batch, seed=1)
    expected = ([torch.cat([p1, z2]), torch.cat([p2, z1])] if ia_embeddings == "cross"
                else [torch.cat([z1, z2])])
    calls = m.contrastive_loss.calls
    assert len(calls) == len(expected)
    for (z, got_ids), want in zip(calls, expected, strict=True):
        torch.testing.assert_close(z, want)
        assert torch.equal(got_ids, ids.repeat(2))
        assert z.requires_grad  # no stop-gradient on either head's output in L_ia
    # The two options differ: the predictions p are not the projections z.
    assert not torch.allclose(torch.cat([p1, z2]), torch.cat([z1, z2]))


def test_bad_ia_embeddings_is_rejected():
    with pytest.raises(ValueError, match=r"model.ia_embeddings must be 'cross' or 'projector', got 'z'"):
        _model(ia_embeddings="z")


def test_simsiam_switch_uses_two_views_and_no_contrastive_term():
    m = _model(bam=False, ia_loss="none")
    assert m.contrastive_loss is None
    assert m.train_transform().bam is False
    logged = {}
    m.log = lambda name, value, **kwargs: logged.__setitem__(name, value)
    loss = m.training_step(_batch(4, views=2), 0)
    # The total is L_sim alone: no contrastive term is computed or logged.
    assert "train/loss_ia" not in logged
    torch.testing.assert_close(loss, logged["train/loss_sim"])
    torch.testing.assert_close(logged["train/loss"], logged["train/loss_sim"])


def test_supcon_switch():
    from ssl_zoo.losses import SupConLoss

    assert isinstance(_model(ia_loss="supcon").contrastive_loss, SupConLoss)


def test_bad_overlap_is_rejected():
    with pytest.raises(ValueError, match=r"overlap.*\[0, 0.5\]"):
        _model(overlap=0.6)


def test_stop_gradient_and_every_parameter_trained():
    m = _model()
    m.training_step(_batch(2), 0).backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    assert not no_grad, no_grad


@pytest.mark.parametrize("bam", [True, False])
def test_blur_option_sets_the_views_blur(bam):
    """``blur="kernel"`` swaps the reference code's PIL blur for SimCLR's ~10 % kernel (3 taps at 32 px) in the
    views of BAM's blocks and of SimSiam alike; the default stays the reference code's filter."""
    import torchvision.transforms as T

    from ssl_zoo.augment import PILGaussianBlur, SeparableGaussianBlur

    def blur(model):
        (step,) = [s.transforms[0] for s in model.train_transform().view_transform.transforms
                   if isinstance(s, T.RandomApply) and isinstance(s.transforms[0], T.GaussianBlur)]
        return step

    assert type(blur(_model(bam=bam))) is PILGaussianBlur
    kernel = blur(_model(bam=bam, blur="kernel"))
    assert type(kernel) is SeparableGaussianBlur and tuple(kernel.kernel_size) == (3, 3)
    assert kernel.sigma == (0.1, 2.0)


@pytest.mark.parametrize("bam", [True, False])
def test_min_batch_size_is_where_batchnorm_fails(bam):
    """The declared minimum is the real one: SimSiam's BatchNorm heads fail on one image, BAM's do not."""
    from ssl_zoo.methods import BAMIA

    model = BAMIA("resnet18", img_size=32, proj_hidden_dim=16, proj_dim=16, pred_hidden_dim=8, bam=bam,
                  ia_loss="none")
    num_views = 8 if bam else 2
    batch = {"views": torch.randn(1, num_views, 3, 32, 32), "index": torch.zeros(1, dtype=torch.long),
             "block_ids": torch.arange(num_views // 2).repeat_interleave(2)[None]}
    minimum, reason = model.min_batch_size()
    if bam:
        assert minimum == 1 and torch.isfinite(model.training_step(batch, 0))
    else:
        assert minimum == 2 and "BatchNorm" in reason
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            model.training_step(batch, 0)


TINY_SIMSIAM = dict(backbone="vit_tiny_patch16_224", backbone_kwargs={"img_size": 32, "model_kwargs": {"depth": 1}},
            img_size=32, proj_hidden_dim=16, proj_dim=12, pred_hidden_dim=6, head_norm="layer")


def _objective_batch(num_images: int, views: int) -> dict:
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
    model = BAMIA(**TINY_SIMSIAM, bam=bam, ia_loss="none")
    model.log = lambda *a, **k: None
    reference = copy.deepcopy(model)
    batch = _objective_batch(3, views)

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
    model = BAMIA(**TINY_SIMSIAM, bam=False, ia_loss="none")
    batch = _objective_batch(3, 2)
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
