"""Every EMA teacher follows theta_t <- m * theta_t + (1 - m) * theta_s once per optimiser step, in a real fit.

MoCo (Eq. 2) and HVP-MTL's momentum distillation average the *whole* teacher: MPCL's momentum backbone and
its momentum projectors, HVP-MTL's teacher encoder and teacher decoder. A snapshot of student and teacher is
taken before every batch, after it (before the EMA update) and at the end of training; between two snapshots
before batches the teacher must have moved exactly by the EMA rule when the optimiser stepped, and not at all
when it did not (the first micro-batch of an accumulated step).

Buffers (BatchNorm statistics) follow MoCo's code for the key encoder: the update leaves them alone, and they
are what the key encoder's own train-mode forward computed. HVP-MTL's teacher runs in eval mode and computes
no statistics, so it takes the student's.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from ssl_zoo.data import ImageFolderDataModule, TencentMLDataModule
from ssl_zoo.data.tencent import read_tencent_dictionary
from ssl_zoo.methods import HVPMTL, MPCLMoCoV2, MPCLMoCoV3

MOMENTUM = 0.5  # far from 1, so a missing update cannot hide in round-off
MOCO = (MPCLMoCoV2, MPCLMoCoV3)
MOCO_PAIRS = (("teacher_backbone", "backbone"), ("teacher_projectors", "projectors"))
PAIRS = {MPCLMoCoV2: MOCO_PAIRS, MPCLMoCoV3: MOCO_PAIRS,
         HVPMTL: (("teacher_backbone", "backbone"), ("teacher_decoder", "decoder"))}


def _state(trainer, module, pairs) -> dict:
    state = {"step": trainer.global_step}
    for teacher, student in pairs:
        state[teacher] = {n: t.detach().clone() for n, t in getattr(module, teacher).state_dict().items()}
        state[student] = {n: t.detach().clone() for n, t in getattr(module, student).state_dict().items()}
    return state


class Snapshots(Callback):
    """Student and teacher parameters and buffers before every batch, after it and at the end of training.

    Callbacks' ``on_train_batch_end`` runs before the module's, so ``after`` is taken before the EMA update. For
    MPCL on MoCo, ``replayed`` holds the buffers a copy of the key encoder (as it was before the batch) reaches by
    encoding the batch's key views in the training step's order (one process: no shuffle).
    """

    def __init__(self, pairs) -> None:
        self.pairs = pairs
        self.taken: list[dict] = []  # before every batch, and at the end
        self.after: list[dict] = []  # after every batch, before the EMA update
        self.replayed: list[dict] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.taken.append(_state(trainer, module, self.pairs))
        if isinstance(module, MOCO):
            backbone, projectors = copy.deepcopy(module.teacher_backbone), copy.deepcopy(module.teacher_projectors)
            views = batch["views"]
            # MoCo v3's step encodes the keys of both views (second, then first), MoCo v2's of the second only
            key_views = [views[:, 1], views[:, 0]] if isinstance(module, MPCLMoCoV3) else [views[:, 1]]
            with torch.no_grad():
                for x in key_views:
                    projectors(backbone(x))
            self.replayed.append({"teacher_backbone": dict(backbone.named_buffers()),
                                  "teacher_projectors": dict(projectors.named_buffers())})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.after.append(_state(trainer, module, self.pairs))

    def on_train_end(self, trainer, module) -> None:
        self.taken.append(_state(trainer, module, self.pairs))


def _mpcl(cls: type[MPCLMoCoV2 | MPCLMoCoV3]) -> MPCLMoCoV2 | MPCLMoCoV3:
    common = dict(backbone="test_resnet", img_size=32, num_projectors=2, projector_hidden_dims=16, proj_dim=8,
                  ema_momentum=MOMENTUM, warmup_epochs=0)
    if cls is MPCLMoCoV2:
        return MPCLMoCoV2(**common, queue_size=16, head_norm="none", base_lr=0.5)
    return MPCLMoCoV3(**common, pred_hidden_dim=8, head_norm="layer", base_lr=0.05)


def _hvp(num_classes: int, **kwargs) -> HVPMTL:
    kwargs = {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"img_size": 32, "model_kwargs": {"depth": 1}},
              **kwargs}
    return HVPMTL(**kwargs, num_classes=num_classes, img_size=32, decoder_dim=16, decoder_heads=2, decoder_ffn_dim=16,
                  decoder_dropout=0.0, num_prototypes=5, cluster_hidden_dim=16, cluster_dim=8, head_norm="layer",
                  mask_patch_size=16, warmup_epochs=0, ema_momentum=MOMENTUM, base_lr=1e-2, lr_reference=8)


def _momentum(module, step: int, total: int) -> float:
    """The paper's schedule, written out: constant, or MoCo v3's 1 - (1 - m0)(1 + cos(pi k / K)) / 2."""
    if isinstance(module, MPCLMoCoV3):
        return 1 - (1 - MOMENTUM) * (1 + math.cos(math.pi * step / total)) / 2
    return MOMENTUM


CASES = {
    "mpcl_mocov2": (lambda n: _mpcl(MPCLMoCoV2), 1),
    "mpcl_mocov2_accumulate": (lambda n: _mpcl(MPCLMoCoV2), 2),
    "mpcl_mocov3_accumulate": (lambda n: _mpcl(MPCLMoCoV3), 2),
    "hvp_mtl": (_hvp, 1),
    "hvp_mtl_accumulate": (_hvp, 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_every_teacher_module_is_an_ema_of_its_student_once_per_optimizer_step(case, demo_root, tmp_path):
    build, accumulate = CASES[case]
    if case.startswith("hvp"):
        num_classes = len(read_tencent_dictionary(f"{demo_root}/tencent/dictionary_and_semantic_hierarchy.txt"))
        datamodule = TencentMLDataModule(root=demo_root, num_classes=num_classes, batch_size=4, num_workers=0)
    else:
        datamodule = ImageFolderDataModule(root=f"{demo_root}/folder", batch_size=4, num_workers=0)
    torch.manual_seed(0)
    module = build(datamodule.num_classes)
    snapshots = Snapshots(PAIRS[type(module)])
    trainer = Trainer(max_epochs=1, limit_train_batches=4, accumulate_grad_batches=accumulate, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", default_root_dir=tmp_path, callbacks=[snapshots])
    trainer.fit(module, datamodule=datamodule)
    total = int(trainer.estimated_stepping_batches)
    assert trainer.global_step == 4 // accumulate

    moves = bn_buffers = 0
    for i, (before, after) in enumerate(zip(snapshots.taken, snapshots.taken[1:], strict=False)):
        stepped = after["step"] > before["step"]
        for teacher, student in PAIRS[type(module)]:
            params = dict(getattr(module, student).named_parameters())
            for name, t_after in after[teacher].items():
                t_before, s_after = before[teacher][name], after[student][name]
                if name not in params and isinstance(module, MOCO):  # a buffer of the key encoder: its own
                    torch.testing.assert_close(snapshots.after[i][teacher][name], snapshots.replayed[i][teacher][name],
                                               msg=lambda msg, n=f"{teacher}.{name}": f"{n} (its forward): {msg}")
                    assert torch.equal(t_after, snapshots.after[i][teacher][name]), f"{teacher}.{name} moved"
                    bn_buffers += name.endswith("running_mean")
                    continue
                if name not in params:  # a buffer of HVP-MTL's eval-mode teacher: copied from the student
                    if stepped:
                        torch.testing.assert_close(t_after, s_after, msg=f"{teacher}.{name} (buffer)")
                    continue
                if not stepped:
                    assert torch.equal(t_after, t_before), f"{teacher}.{name} moved without an optimiser step"
                    continue
                m = _momentum(module, after["step"], total)
                torch.testing.assert_close(t_after, m * t_before + (1 - m) * s_after, rtol=1e-5, atol=1e-6,
                                           msg=lambda msg, n=f"{teacher}.{name}": f"{n}: {msg}")
                moves += int(not torch.equal(t_after, t_before))
    assert moves > 0  # the student did train and the teachers did follow
    assert bn_buffers > 0 or isinstance(module, HVPMTL)  # MoCo's key encoder (test_resnet) has BatchNorm


# ---------------------------------------------------------------------- the same rule without a Trainer (fast)
def _tiny_hvp() -> HVPMTL:
    return _hvp(num_classes=4)


def _tiny_hvp_resnet() -> HVPMTL:
    """HVP-MTL on a ResNet (BatchNorm in the eval-mode teacher); masked image modelling needs a ViT or Swin."""
    return _hvp(num_classes=4, backbone="test_resnet", backbone_kwargs=None, alpha_mim=0.0)


@pytest.mark.parametrize("build", [lambda: _mpcl(MPCLMoCoV2), lambda: _mpcl(MPCLMoCoV3), _tiny_hvp, _tiny_hvp_resnet],
                         ids=["mpcl_mocov2", "mpcl_mocov3", "hvp_mtl", "hvp_mtl_resnet"])
def test_one_step_moves_every_teacher_module_by_the_ema_rule(build):
    torch.manual_seed(0)
    module = build()
    module.log = lambda *args, **kwargs: None
    pairs = PAIRS[type(module)]
    # A teacher distinct from its student, so that the update is visible; the student's BatchNorm statistics
    # differ from the teacher's too.
    for teacher, student in pairs:
        with torch.no_grad():
            for p in getattr(module, teacher).parameters():
                p.add_(0.1 * torch.randn_like(p))
            for name, buf in getattr(module, student).named_buffers():
                if name.endswith(("running_mean", "running_var")):
                    buf.add_(torch.rand_like(buf))
    before = {t: {n: p.clone() for n, p in getattr(module, t).named_parameters()} for t, _ in pairs}
    buffers_before = {t: {n: b.clone() for n, b in getattr(module, t).named_buffers()} for t, _ in pairs}
    with torch.no_grad():  # stands in for an optimiser step of the student
        for _, student in pairs:
            for p in getattr(module, student).parameters():
                p.add_(0.1 * torch.randn_like(p))
    module.on_train_batch_end(None, None, 0)  # no trainer: global_step 0, total steps 1
    bn_buffers = 0
    for teacher, student in pairs:
        s_params = dict(getattr(module, student).named_parameters())
        for name, t in getattr(module, teacher).named_parameters():
            m = _momentum(module, 0, 1)
            torch.testing.assert_close(t, m * before[teacher][name] + (1 - m) * s_params[name],
                                       msg=lambda msg, n=f"{teacher}.{name}": f"{n}: {msg}")
        s_buffers = dict(getattr(module, student).named_buffers())
        for name, buf in getattr(module, teacher).named_buffers():
            # MoCo's key encoder keeps its own statistics; HVP-MTL's eval-mode teacher takes the student's.
            expected = buffers_before[teacher][name] if isinstance(module, MOCO) else s_buffers[name]
            assert torch.equal(buf, expected), f"{teacher}.{name}"
            bn_buffers += name.endswith("running_mean") and not torch.equal(s_buffers[name],
                                                                            buffers_before[teacher][name])
    assert bn_buffers > 0 or build is _tiny_hvp  # the ViT teacher has no BatchNorm


def test_the_gate_opens_once_per_optimizer_step():
    from ssl_zoo.utils.ema import OncePerOptimizerStep

    gate = OncePerOptimizerStep()
    assert gate(0) and gate(0)  # before start(): always open (hooks called without a trainer)
    gate.start(5)  # a run resumed after 5 steps
    assert [gate(step) for step in (5, 6, 6, 6, 7, 7)] == [False, True, False, False, True, False]
