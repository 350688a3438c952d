"""Learning rates and LARS (``ssl_zoo.utils.optim``): the schedule and scaling rules as tables, the lr an optimiser
actually holds in a run, and LARS against hand-computed and official updates.

Expected values are written out by hand from the formulas (linear scaling rule, Goyal et al. 2017; linear
warm-up then half-cosine, SGDR), not recomputed with the functions under test.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from ssl_zoo.data import ImageFolderDataModule, TencentMLDataModule
from ssl_zoo.data.tencent import read_tencent_dictionary
from ssl_zoo.eval import LinearProbe
from ssl_zoo.methods import BAMIA, HVPMTL, MPCLMoCoV2
from ssl_zoo.utils.optim import LARS, global_batch_size, scaled_lr, warmup_cosine, warmup_cosine_scheduler


@pytest.mark.parametrize("step,total,warmup,final,expected", [
    (0, 10, 0, 0.0, 1.0),
    (5, 10, 0, 0.0, 0.5),
    (10, 10, 0, 0.0, 0.0),
    (15, 10, 0, 0.0, 0.0),  # past the end: stays at the floor
    (5, 10, 0, 0.1, 0.55),
    (10, 10, 0, 0.1, 0.1),
    (0, 12, 4, 0.0, 0.25),  # warm-up: (step + 1) / warmup
    (3, 12, 4, 0.0, 1.0),
    (4, 12, 4, 0.0, 1.0),  # cosine starts at its peak
    (8, 12, 4, 0.0, 0.5),
    (6, 12, 4, 0.0, 0.8535533905932737),  # (1 + cos(pi / 4)) / 2
    (12, 12, 4, 0.0, 0.0),
])
def test_warmup_cosine_table(step, total, warmup, final, expected):
    assert warmup_cosine(step, total, warmup, final) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("base,batch,reference,expected", [
    (0.05, 512, 256, 0.1),  # SimSiam / BAM: 0.05 x 512 / 256
    (0.05, 128, 256, 0.025),
    (0.03, 256, 256, 0.03),  # MoCo v2
    (1.5e-4, 4096, 256, 2.4e-3),  # MoCo v3 ViT
    (1e-4, 2048, 1024, 2e-4),  # HVP-MTL: 1e-4 per 1024
    (1.5e-3, 2048, 2048, 1.5e-3),  # MVP / BEiT: 1.5e-3 per 2048
])
def test_scaled_lr_table(base, batch, reference, expected):
    assert scaled_lr(base, batch, reference) == pytest.approx(expected, rel=1e-12)


def test_global_batch_counts_processes_and_accumulation():
    trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=32), world_size=8, accumulate_grad_batches=2)
    assert global_batch_size(trainer) == 512
    with pytest.raises(ValueError, match="per-process batch size"):
        global_batch_size(SimpleNamespace(datamodule=None, world_size=1, accumulate_grad_batches=1))


def test_constant_groups_keep_their_lr():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=0.2)
    scheduler = warmup_cosine_scheduler(optimizer, total_steps=4, constant_groups=(1,))
    seen = []
    for _ in range(4):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert [lr for lr, _ in seen] == pytest.approx([0.2, 0.1707106781, 0.1, 0.0292893219])
    assert [lr for _, lr in seen] == [0.2] * 4


# ---------------------------------------------------------------------- the lr an optimiser holds in a run
class LrRecorder(Callback):
    """Every param group's lr as the optimiser is about to step."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append([group["lr"] for group in optimizer.param_groups])


def _fit(module, datamodule, tmp_path, **trainer_kwargs) -> LrRecorder:
    recorder = LrRecorder()
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", default_root_dir=tmp_path, callbacks=[recorder], num_sanity_val_steps=0,
                      limit_val_batches=0, **trainer_kwargs)
    trainer.fit(module, datamodule=datamodule)
    return recorder


TINY_SIMSIAM = dict(backbone="test_resnet", img_size=32, proj_hidden_dim=8, proj_dim=8, pred_hidden_dim=4,
                    bam=False, ia_loss="none")


@pytest.mark.slow
def test_simsiam_run_warms_up_decays_and_keeps_the_predictor_lr(demo_root, tmp_path):
    """Batch 4 x accumulation 2 = 8 images per step; 2 epochs x 2 steps, 1 warm-up epoch (2 steps)."""
    datamodule = ImageFolderDataModule(root=f"{demo_root}/folder", batch_size=4, num_workers=0)
    torch.manual_seed(0)
    module = BAMIA(**TINY_SIMSIAM, base_lr=0.05, warmup_epochs=1)
    recorder = _fit(module, datamodule, tmp_path, max_epochs=2, limit_train_batches=4, accumulate_grad_batches=2)
    peak = 0.05 * 8 / 256
    # warm-up (step+1)/2, then the cosine over the remaining 2 steps: 1, (1 + cos(pi/2)) / 2
    encoder = [0.5 * peak, peak, peak, 0.5 * peak]
    assert [lrs[0] for lrs in recorder.lrs] == pytest.approx(encoder, rel=1e-9)
    assert [lrs[1] for lrs in recorder.lrs] == pytest.approx([peak] * 4, rel=1e-9)  # fixed predictor lr


@pytest.mark.slow
def test_bam_lr_follows_lr_batch_size_not_the_global_batch(demo_root, tmp_path):
    datamodule = ImageFolderDataModule(root=f"{demo_root}/folder", batch_size=2, num_workers=0)
    torch.manual_seed(0)
    module = BAMIA(**{**TINY_SIMSIAM, "bam": True, "head_norm": "layer"}, base_lr=0.05, lr_batch_size=512)
    recorder = _fit(module, datamodule, tmp_path, max_epochs=1, limit_train_batches=2)
    assert [lrs[0] for lrs in recorder.lrs] == pytest.approx([0.1, 0.05], rel=1e-9)  # 0.1 x (1 + cos(pi/2))/2


@pytest.mark.slow
def test_mocov2_lr_is_003_per_256_with_cosine(demo_root, tmp_path):
    datamodule = ImageFolderDataModule(root=f"{demo_root}/folder", batch_size=4, num_workers=0)
    torch.manual_seed(0)
    module = MPCLMoCoV2(backbone="test_resnet", img_size=32, num_projectors=2, projector_hidden_dims=8, proj_dim=4,
                        queue_size=8)
    recorder = _fit(module, datamodule, tmp_path, max_epochs=1, limit_train_batches=4)
    peak = 0.03 * 4 / 256
    assert [lrs[0] for lrs in recorder.lrs] == pytest.approx(
        [peak, peak * 0.8535533905932737, peak * 0.5, peak * 0.1464466094067262], rel=1e-9)


@pytest.mark.slow
def test_hvp_mtl_lr_has_its_reference_batch_warmup_and_floor(demo_root, tmp_path):
    num_classes = len(read_tencent_dictionary(f"{demo_root}/tencent/dictionary_and_semantic_hierarchy.txt"))
    datamodule = TencentMLDataModule(root=demo_root, num_classes=num_classes, batch_size=2, num_workers=0)
    torch.manual_seed(0)
    module = HVPMTL(backbone="vit_tiny_patch16_224", backbone_kwargs={"img_size": 32, "model_kwargs": {"depth": 1}},
                    num_classes=num_classes, img_size=32, decoder_dim=8, decoder_heads=2, decoder_ffn_dim=8,
                    num_prototypes=4, cluster_hidden_dim=8, cluster_dim=4, head_norm="layer", mask_patch_size=16,
                    base_lr=1e-4, lr_reference=1024, warmup_epochs=1, final_lr_ratio=0.1)
    recorder = _fit(module, datamodule, tmp_path, max_epochs=2, limit_train_batches=2)
    peak = 1e-4 * 2 / 1024
    expected = [0.5 * peak, peak, peak, peak * (0.1 + 0.9 * 0.5)]
    for lrs in recorder.lrs:  # both groups (with and without weight decay) share the schedule
        assert lrs[0] == lrs[1]
    assert [lrs[0] for lrs in recorder.lrs] == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow
def test_linear_probe_lr_is_base_lr_per_256(demo_root, tmp_path):
    datamodule = ImageFolderDataModule(root=f"{demo_root}/folder", batch_size=8, num_workers=0)
    torch.manual_seed(0)
    probe = LinearProbe(backbone="test_resnet", img_size=32, cache_features=True, base_lr=30.0, warmup_epochs=1)
    recorder = _fit(probe, datamodule, tmp_path, max_epochs=2, limit_train_batches=1)
    peak = 30.0 * 8 / 256
    assert [lrs[0] for lrs in recorder.lrs] == pytest.approx([peak, peak], rel=1e-9)  # 1 warm-up step, then 1


def test_lars_step_matches_hand_computation():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(torch.randn(3))
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.01)
    w0, b0 = w.detach().clone(), b.detach().clone()
    gw, gb = torch.randn(3, 4), torch.randn(3)
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    d = gw + 0.1 * w0
    d = d * (0.01 * w0.norm() / d.norm())
    torch.testing.assert_close(w.detach(), w0 - 0.5 * d)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb)  # 1-D: plain SGD, no decay, no trust ratio
    # second step: momentum buffer v = 0.9 v + d
    w1 = w.detach().clone()
    w.grad = gw.clone()
    opt.step()
    d2 = gw + 0.1 * w1
    d2 = d2 * (0.01 * w1.norm() / d2.norm())
    torch.testing.assert_close(w.detach(), w1 - 0.5 * (0.9 * d + d2))


def test_lars_matches_the_official_update_on_hand_computed_steps():
    """MoCo v3 / Barlow Twins LARS: d = g + wd * p, trust ratio eta * ||p|| / ||g + wd * p|| on matrices; a bias
    takes neither (numbers worked out by hand; lightly's ||g|| + wd * ||p|| would give ratio 0.01 x 5 / 4.49)."""
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = LARS([w, b], lr=0.5, weight_decay=0.2, momentum=0.9, trust_coefficient=0.01)
    gw, gb = torch.tensor([[3.4, -0.8]], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64)
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    # d = [3.4, -0.8] + 0.2 x [3, 4] = [4, 0], ||d|| = 4; ratio 0.01 x 5 / 4 = 0.0125; step 0.5 x [0.05, 0]
    torch.testing.assert_close(w.detach(), torch.tensor([[2.975, 4.0]], dtype=torch.float64))
    torch.testing.assert_close(b.detach(), torch.tensor([0.75, -2.25], dtype=torch.float64))  # b - 0.5 g
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    # w: d2 = [3.4 + 0.595, -0.8 + 0.8] = [3.995, 0], ratio 0.01 ||w1|| / 3.995, v = 0.9 [0.05, 0] + d2 x ratio
    ratio = 0.01 * math.sqrt(2.975**2 + 4.0**2) / 3.995
    expected = torch.tensor([[2.975 - 0.5 * (0.9 * 0.05 + 3.995 * ratio), 4.0]], dtype=torch.float64)
    torch.testing.assert_close(w.detach(), expected)
    # b: v = 0.9 x 0.5 + 0.5 = 0.95, b - 0.5 x 0.95
    torch.testing.assert_close(b.detach(), torch.tensor([0.275, -2.725], dtype=torch.float64))


def test_lars_is_the_one_the_methods_and_probes_use():
    """One LARS for the project, in the utilities room; the linear probe and MPCL (Barlow Twins, MoCo v3) import it."""
    import ssl_zoo.eval.linear
    import ssl_zoo.methods.mpcl.barlow_twins
    import ssl_zoo.methods.mpcl.moco_v3
    import ssl_zoo.utils.optim

    assert ssl_zoo.eval.linear.LARS is ssl_zoo.utils.optim.LARS is LARS
    assert ssl_zoo.methods.mpcl.barlow_twins.LARS is ssl_zoo.methods.mpcl.moco_v3.LARS is LARS
    assert ssl_zoo.eval.LARS is LARS


def test_lars_scales_even_without_weight_decay():
    """Linear probes use weight decay 0: the trust ratio must still apply (lightly's LARS skips it)."""
    w = torch.nn.Parameter(torch.ones(2, 2))
    opt = LARS([w], lr=1.0, weight_decay=0.0, momentum=0.0, trust_coefficient=0.001)
    w.grad = torch.full((2, 2), 100.0)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.ones(2, 2) - 0.001 * 0.5 * 2)  # |w| = 2, step = 0.001*|w|
