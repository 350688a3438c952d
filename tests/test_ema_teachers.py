"""Every EMA teacher follows theta_t <- m * theta_t + (1 - m) * theta_s once per optimiser step, in a real fit.

MoCo (Eq. 2) and HVP-MTL's momentum distillation average the *whole* teacher: MPCL's momentum backbone and
its momentum projectors, HVP-MTL's teacher encoder and teacher decoder. A snapshot of student and teacher is
taken before every batch and at the end of training; between two snapshots the teacher must have moved
exactly by the EMA rule when the optimiser stepped, and not at all when it did not (the first micro-batch of
an accumulated step). Buffers (BatchNorm statistics) are copied from the student.
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from ssl_zoo.data import ImageFolderDataModule, TencentMLDataModule
from ssl_zoo.data.tencent import read_tencent_dictionary
from ssl_zoo.methods import HVPMTL, MPCL

MOMENTUM = 0.5  # far from 1, so a missing update cannot hide in round-off
PAIRS = {MPCL: (("teacher_backbone", "backbone"), ("teacher_projectors", "projectors")),
         HVPMTL: (("teacher_backbone", "backbone"), ("teacher_decoder", "decoder"))}


class Snapshots(Callback):
    """Student and teacher parameters (and buffers) before every batch and at the end of training."""

    def __init__(self, pairs) -> None:
        self.pairs = pairs
        self.taken: list[dict] = []

    def _take(self, trainer, module) -> None:
        state = {"step": trainer.global_step}
        for teacher, student in self.pairs:
            state[teacher] = {n: t.detach().clone() for n, t in getattr(module, teacher).state_dict().items()}
            state[student] = {n: t.detach().clone() for n, t in getattr(module, student).state_dict().items()}
        self.taken.append(state)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._take(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self._take(trainer, module)


def _mpcl(flavour: str) -> MPCL:
    return MPCL(backbone="test_resnet", img_size=32, flavour=flavour, num_projectors=2, projector_hidden_dims=16,
                proj_dim=8, pred_hidden_dim=8, queue_size=16, ema_momentum=MOMENTUM, warmup_epochs=0,
                head_norm="layer" if flavour == "mocov3" else "none", base_lr=0.5 if flavour == "mocov2" else 0.05)


def _hvp(num_classes: int) -> HVPMTL:
    return HVPMTL(backbone="vit_tiny_patch16_224", backbone_kwargs={"img_size": 32, "model_kwargs": {"depth": 1}},
                  num_classes=num_classes, img_size=32, decoder_dim=16, decoder_heads=2, decoder_ffn_dim=16,
                  decoder_dropout=0.0, num_prototypes=5, cluster_hidden_dim=16, cluster_dim=8, head_norm="layer",
                  mask_patch_size=16, warmup_epochs=0, ema_momentum=MOMENTUM, base_lr=1e-2, lr_reference=8)


def _momentum(module, step: int, total: int) -> float:
    """The paper's schedule, written out: constant, or MoCo v3's 1 - (1 - m0)(1 + cos(pi k / K)) / 2."""
    if isinstance(module, MPCL) and module.hparams.flavour == "mocov3":
        return 1 - (1 - MOMENTUM) * (1 + math.cos(math.pi * step / total)) / 2
    return MOMENTUM


CASES = {
    "mpcl_mocov2": (lambda n: _mpcl("mocov2"), 1),
    "mpcl_mocov2_accumulate": (lambda n: _mpcl("mocov2"), 2),
    "mpcl_mocov3_accumulate": (lambda n: _mpcl("mocov3"), 2),
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

    moves = 0
    for before, after in zip(snapshots.taken, snapshots.taken[1:], strict=False):
        stepped = after["step"] > before["step"]
        for teacher, student in PAIRS[type(module)]:
            params = dict(getattr(module, student).named_parameters())
            for name, t_after in after[teacher].items():
                t_before, s_after = before[teacher][name], after[student][name]
                if name not in params:  # a buffer: copied from the student
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


# ---------------------------------------------------------------------- the same rule without a Trainer (fast)
def _tiny_hvp() -> HVPMTL:
    return _hvp(num_classes=4)


@pytest.mark.parametrize("build", [lambda: _mpcl("mocov2"), lambda: _mpcl("mocov3"), _tiny_hvp],
                         ids=["mpcl_mocov2", "mpcl_mocov3", "hvp_mtl"])
def test_one_step_moves_every_teacher_module_by_the_ema_rule(build):
    torch.manual_seed(0)
    module = build()
    module.log = lambda *args, **kwargs: None
    pairs = PAIRS[type(module)]
    for teacher, _ in pairs:  # a teacher distinct from its student, so that the update is visible
        with torch.no_grad():
            for p in getattr(module, teacher).parameters():
                p.add_(0.1 * torch.randn_like(p))
    before = {t: {n: p.clone() for n, p in getattr(module, t).named_parameters()} for t, _ in pairs}
    with torch.no_grad():  # stands in for an optimiser step of the student
        for _, student in pairs:
            for p in getattr(module, student).parameters():
                p.add_(0.1 * torch.randn_like(p))
    module.on_train_batch_end(None, None, 0)  # no trainer: global_step 0, total steps 1
    for teacher, student in pairs:
        s_params = dict(getattr(module, student).named_parameters())
        for name, t in getattr(module, teacher).named_parameters():
            m = _momentum(module, 0, 1)
            torch.testing.assert_close(t, m * before[teacher][name] + (1 - m) * s_params[name],
                                       msg=lambda msg, n=f"{teacher}.{name}": f"{n}: {msg}")


def test_the_gate_opens_once_per_optimizer_step():
    from ssl_zoo.utils.ema import OncePerOptimizerStep

    gate = OncePerOptimizerStep()
    assert gate(0) and gate(0)  # before start(): always open (hooks called without a trainer)
    gate.start(5)  # a run resumed after 5 steps
    assert [gate(step) for step in (5, 6, 6, 6, 7, 7)] == [False, True, False, False, True, False]
