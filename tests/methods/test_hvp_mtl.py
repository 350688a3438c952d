"""HVP-MTL: the Query2Label head's wiring (its layout: tests/models/test_query2label.py), every loss term against a
float64 brute force, the leave-one-out switches, the EMA teacher, the demo config through the CLI and every config
under experiments/hvp_mtl.

Models are tiny (2-block ViT-Tiny at 32 px = 2 x 2 patches, 16-wide decoder, 7 prototypes, LayerNorm heads, no
dropout), so the file runs in well under a minute on 2 CPU cores. DDP equivalence: tests/jobs/test_ddp_every_method.py.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from ssl_zoo.methods import HVPMTL
from ssl_zoo.methods import hvp_mtl as hvp_module
from ssl_zoo.models.query2label import GroupWiseLinear

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "experiments" / "hvp_mtl"
C = 5  # classes of the tiny model
S = 32  # view side
ALPHAS = {"mcls": 0.3, "cl": 0.7, "mim": 1.3, "mom": 2.0}

TINY = dict(
    backbone="vit_tiny_patch16_224",
    backbone_kwargs={"img_size": S, "model_kwargs": {"depth": 2}},
    num_classes=C,
    img_size=S,
    decoder_dim=16,
    decoder_heads=2,
    decoder_ffn_dim=32,
    decoder_dropout=0.0,
    num_prototypes=7,
    cluster_hidden_dim=16,
    cluster_dim=8,
    head_norm="layer",
    mask_patch_size=16,
    warmup_epochs=0,
    lr_batch_size=1024,
)


def _model(seed: int = 0, perturb_teacher: bool = True, **overrides) -> HVPMTL:
    args = {**TINY, **{f"alpha_{k}": v for k, v in ALPHAS.items()}, **overrides}
    torch.manual_seed(seed)
    model = HVPMTL(**args)
    if perturb_teacher and model.teacher_backbone is not None:
        # At initialisation the teacher equals the student and L_mom is 0; move it so the term is informative.
        with torch.no_grad():
            for p in [*model.teacher_backbone.parameters(), *model.teacher_decoder.parameters()]:
                p.add_(0.05 * torch.randn_like(p))
    return model


def _batch(n: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    grid = S // 16
    # 3 of the 4 patches masked in every image (ceil(0.6 * 4)), at random places.
    mask = torch.stack([torch.randperm(grid * grid, generator=g) < 3 for _ in range(n)]).view(n, grid, grid)
    return {
        "views": torch.randn(n, 2, 3, S, S, generator=g),
        "mask": mask,
        "target": (torch.rand(n, C, generator=g) < 0.4).float(),
        "index": torch.arange(n),
    }


class _LogRecorder:
    """Stands in for LightningModule.log outside a Trainer and keeps the last value of each key."""

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}

    def __call__(self, name, value, *args, **kwargs) -> None:
        self.values[name] = torch.as_tensor(value).detach()


def _step(model: HVPMTL, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    recorder = _LogRecorder()
    model.log = recorder  # instance attribute shadows the method
    loss = model.training_step(batch, 0)
    return loss, recorder.values


# ---------------------------------------------------------------------- float64 brute-force references
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    for i, row in enumerate(x):
        shifted = row - row.max()
        out[i] = shifted - np.log(np.exp(shifted).sum())
    return out


def _ref_asl(logits, y, eta=10.0, gp=4.0, gn=1.0, eps=1e-8) -> float:
    total = 0.0
    for b in range(logits.shape[0]):
        for c in range(logits.shape[1]):
            p = 1.0 / (1.0 + np.exp(-logits[b, c]))
            total -= y[b, c] * eta * (1 - p) ** gp * np.log(max(p, eps))
            total -= (1 - y[b, c]) * p**gn * np.log(max(1 - p, eps))
    return total / logits.shape[0]


def _ref_sinkhorn(scores, eps=0.05, iters=3, clamp=10.0) -> np.ndarray:
    q = np.exp(np.minimum(scores / eps, clamp)).T  # [K, B]
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iters):
        q = q / q.sum(axis=1, keepdims=True) / k
        q = q / q.sum(axis=0, keepdims=True) / b
    return (q * b).T


def _ref_swapped(s0, s1, q0, q1, tau=0.1) -> float:
    """Eq. 2: l(f_0, q_1) + l(f_1, q_0), the sum of the two swapped cross-entropies, each a batch mean."""
    lp0, lp1 = _log_softmax(s0 / tau), _log_softmax(s1 / tau)
    return float(np.mean([-((q1[i] * lp0[i]).sum() + (q0[i] * lp1[i]).sum()) for i in range(len(s0))]))


def _ref_masked_l1(pred, target, pixel_mask) -> float:
    err, count = 0.0, 0
    b, ch, h, w = pred.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                if pixel_mask[i, y, x]:
                    err += np.abs(pred[i, :, y, x] - target[i, :, y, x]).sum()
                    count += ch
    return err / count


def _ref_symmetric_kl(a, b, temperature) -> float:
    """Eq. 6: (KL(S, S') + KL(S', S)) / 2 of the softmax-normalised similarities, batch mean."""
    pa, pb = np.exp(_log_softmax(a / temperature)), np.exp(_log_softmax(b / temperature))
    return float(np.mean([(pa[i] * np.log(pa[i] / pb[i]) + pb[i] * np.log(pb[i] / pa[i])).sum() / 2
                          for i in range(len(a))]))


def _ref_cosines(g, q) -> np.ndarray:
    out = np.empty((g.shape[0], q.shape[0]))
    for i in range(g.shape[0]):
        for c in range(q.shape[0]):
            out[i, c] = g[i] @ q[c] / (np.linalg.norm(g[i]) * np.linalg.norm(q[c]))
    return out


# ---------------------------------------------------------------------- Query2Label head
def test_group_wise_linear_is_one_classifier_per_class():
    torch.manual_seed(0)
    head = GroupWiseLinear(4, 6)
    h = torch.randn(3, 4, 6)
    w, b = _np(head.weight), _np(head.bias)
    expected = np.array([[_np(h)[i, c] @ w[c] + b[c] for c in range(4)] for i in range(3)])
    np.testing.assert_allclose(_np(head(h)), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[B, 4, 6\]"):
        head(torch.randn(3, 5, 6))


def test_decoder_options_reach_the_query2label_head():
    """The head's layout is Query2Label's by default (tests/models/test_query2label.py); the constructor passes every
    decoder option through, and the distillation reads Q0 and the memory of that head."""
    model = _model()
    dec = model.decoder
    assert len(dec.encoder) == 1 and len(dec.layers) == 2
    assert all(layer.self_attn is None for layer in dec.layers)  # no self-attention among the label queries
    dense = _model(decoder_self_attention=True, decoder_encoder_layers=0, decoder_layers=1, decoder_norm_first=True)
    assert len(dense.decoder.encoder) == 0 and len(dense.decoder.layers) == 1
    assert dense.decoder.layers[0].self_attn is not None and dense.decoder.layers[0].norm_first
    assert dense.teacher_decoder.layers[0].self_attn is not None  # the teacher is a copy of the same head
    loss, _ = _step(dense, _batch(2))
    assert torch.isfinite(loss)
    memory = _model(distill_embedding="memory_mean")
    f = memory.backbone.forward_map(_batch(2)["views"][:, 1])
    torch.testing.assert_close(memory.image_embedding(memory.decoder, f, None),
                               memory.decoder.encode(f)[0].mean(dim=1))


# ---------------------------------------------------------------------- the four terms and Eq. 7
def test_every_term_matches_brute_force_and_total_is_eq7():
    model = _model()
    batch = _batch(4)
    loss, logged = _step(model, batch)

    x0, x1 = batch["views"][:, 0], batch["views"][:, 1]
    with torch.no_grad():
        # L_mim on view 0 with its mask; target = the (normalised) input pixels.
        recon = model.mim_decoder(model.backbone.forward_map(x0, batch["mask"], model.mask_token))
        pixel_mask = np.stack([np.kron(m, np.ones((16, 16))) for m in batch["mask"].numpy()]).astype(bool)
        l_mim = _ref_masked_l1(_np(recon), _np(x0), pixel_mask)
        # L_cl on both unmasked views, each encoded on its own here.
        w = _np(model.prototypes.weight)
        w = w / np.linalg.norm(w, axis=1, keepdims=True)
        scores = []
        for x in (x0, x1):
            z = _np(model.cluster_projector(model.backbone.forward_map(x).mean(dim=(2, 3))))
            scores.append((z / np.linalg.norm(z, axis=1, keepdims=True)) @ w.T)
        codes = [_ref_sinkhorn(s) for s in scores]
        l_cl = _ref_swapped(scores[0], scores[1], codes[0], codes[1], tau=0.1)
        # L_mcls on view 1: per-class dot products of the decoder tokens, weighted asymmetric loss.
        f1 = model.backbone.forward_map(x1)
        tokens = _np(model.decoder.decode(f1))  # [B, C, d]
        gw, gb = _np(model.decoder.classifier.weight), _np(model.decoder.classifier.bias)
        logits = np.einsum("bcd,cd->bc", tokens, gw) + gb
        l_mcls = _ref_asl(logits, _np(batch["target"]))
        # L_mom on view 1: S(g, Q0) of student and teacher, g = mean of the decoder tokens; Eq. 6 has no
        # temperature, so the default is T = 1.
        assert model.hparams.distill_temperature == 1.0
        s_student = _ref_cosines(tokens.mean(axis=1), _np(model.decoder.query_embed))
        t_tokens = _np(model.teacher_decoder.decode(model.teacher_backbone.forward_map(x1)))
        s_teacher = _ref_cosines(t_tokens.mean(axis=1), _np(model.teacher_decoder.query_embed))
        l_mom = _ref_symmetric_kl(s_student, s_teacher, 1.0)

    refs = {"mcls": l_mcls, "cl": l_cl, "mim": l_mim, "mom": l_mom}
    for task, ref in refs.items():
        assert np.isfinite(ref) and ref > 0, task
        np.testing.assert_allclose(logged[f"train/loss_{task}"].item(), ref, rtol=1e-4, err_msg=task)
    total = sum(ALPHAS[t] * refs[t] for t in refs)  # Eq. 7
    np.testing.assert_allclose(loss.item(), total, rtol=1e-4)
    np.testing.assert_allclose(logged["train/loss"].item(), total, rtol=1e-4)
    # Collapse indicator: std over the batch of the l2-normalised pooled encoder features of both views.
    with torch.no_grad():
        pooled = np.concatenate([_np(model.backbone.forward_map(x).mean(dim=(2, 3))) for x in (x0, x1)])
    unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    np.testing.assert_allclose(logged["train/z_std"].item(), unit.std(axis=0, ddof=1).mean(), rtol=1e-4)


def test_codes_are_computed_per_view_over_the_batch():
    """Sinkhorn sees the whole batch: codes of an image change when the other images change."""
    scores = torch.randn(6, 7)
    codes = hvp_module.sinkhorn_knopp(scores)
    assert not torch.allclose(hvp_module.sinkhorn_knopp(scores[:3]), codes[:3], atol=1e-3)


def test_sinkhorn_clamp_share_is_logged():
    """train/sinkhorn_clamped is the share of the [2B, K] entries with scores / epsilon > T_max."""
    model = _model(sinkhorn_clamp_max=2.0)  # cosines above 0.1 are clamped: a share strictly inside (0, 1)
    batch = _batch(4)
    _, logged = _step(model, batch)
    with torch.no_grad():
        w = _np(model.prototypes.weight)
        w = w / np.linalg.norm(w, axis=1, keepdims=True)
        clamped = total = 0
        for x in (batch["views"][:, 0], batch["views"][:, 1]):
            z = _np(model.cluster_projector(model.backbone.forward_map(x).mean(dim=(2, 3))))
            for cosine in ((z / np.linalg.norm(z, axis=1, keepdims=True)) @ w.T).flatten():
                clamped += cosine / 0.05 > 2.0
                total += 1
    assert 0 < clamped < total
    np.testing.assert_allclose(logged["train/sinkhorn_clamped"].item(), clamped / total, rtol=1e-6)


@pytest.mark.parametrize("frozen_steps, steps", [(2, 3), (0, 1)])
def test_prototypes_are_frozen_for_the_first_steps(frozen_steps, steps, tmp_path):
    """SwAV: the prototypes get no update during the first freeze_prototypes_niters optimiser steps (their
    gradient is dropped; they still take part in the forward pass, so the rest of the network trains)."""
    from lightning.pytorch import Callback, Trainer

    class Record(Callback):
        def __init__(self) -> None:
            self.prototypes: list[torch.Tensor] = []
            self.projector: list[torch.Tensor] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.prototypes.append(pl_module.prototypes.weight.detach().clone())
            self.projector.append(next(pl_module.cluster_projector.parameters()).detach().clone())

    model = _model(freeze_prototypes_niters=frozen_steps, perturb_teacher=False)
    assert model.hparams.freeze_prototypes_niters == frozen_steps
    model.normalize_prototypes()  # what every step does first, so "unchanged" compares like with like
    start = model.prototypes.weight.detach().clone()
    projector_start = next(model.cluster_projector.parameters()).detach().clone()
    record = Record()
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                      callbacks=[record])
    trainer.fit(model, train_dataloaders=DataLoader([_batch(4, seed=s) for s in range(steps)], batch_size=None))
    assert len(record.prototypes) == steps
    for step, (prototypes, projector) in enumerate(zip(record.prototypes, record.projector, strict=True)):
        assert not torch.equal(projector, projector_start), step  # the projection MLP trains from step 1
        moved = (prototypes - start).abs().max().item()
        # Frozen: only the per-step re-normalisation's float rounding (~1e-7); trained: an AdamW step of ~lr = 1e-4.
        assert moved < 1e-6 if step < frozen_steps else moved > 1e-5, (step, moved)
    assert HVPMTL(**TINY).hparams.freeze_prototypes_niters == 313  # SwAV's default


# ---------------------------------------------------------------------- leave-one-out (Table 5)
def _raise(*args, **kwargs):
    raise AssertionError("a removed task was computed")


# Per task: the modules that must not exist, and the functions that must never run when its alpha is 0.
REMOVED = {
    "mcls": (["decoder.classifier", "asl"],
             [(GroupWiseLinear, "forward"), (hvp_module.WeightedAsymmetricLoss, "forward")]),
    "cl": (["cluster_projector", "prototypes", "swapped_prediction"],
           [(hvp_module.MLPHead, "forward"), (hvp_module, "sinkhorn_knopp"), (HVPMTL, "normalize_prototypes")]),
    "mim": (["mask_token", "mim_decoder"],
            [(hvp_module, "masked_l1_loss"), (hvp_module.Backbone, "_apply_mask"), (torch.nn.PixelShuffle, "forward")]),
    "mom": (["teacher_backbone", "teacher_decoder"],
            [(HVPMTL, "teacher_similarity"), (hvp_module, "symmetric_kl_divergence"), (hvp_module, "update_momentum")]),
}


@pytest.mark.parametrize("task", list(REMOVED))
def test_zero_alpha_removes_the_task_entirely(task, monkeypatch):
    model = _model(**{f"alpha_{task}": 0.0})
    modules, functions = REMOVED[task]
    names = [n for n, _ in model.named_parameters()]
    for prefix in modules:
        assert not any(n == prefix or n.startswith(prefix + ".") for n in names), prefix
    for owner, attr in functions:
        monkeypatch.setattr(owner, attr, _raise)

    # Count encoder passes: images per call, masked or not.
    calls: list[tuple[int, bool]] = []
    forward_map = model.backbone.forward_map

    def spy(x, mask=None, mask_token=None):
        calls.append((x.shape[0], mask is not None))
        return forward_map(x, mask, mask_token)

    monkeypatch.setattr(model.backbone, "forward_map", spy)
    batch = _batch(4)
    loss, logged = _step(model, batch)
    model.on_train_batch_end(None, batch, 0)  # the EMA hook must be a no-op without a teacher

    assert f"train/loss_{task}" not in logged
    kept = [t for t in ALPHAS if t != task]
    np.testing.assert_allclose(loss.item(), sum(ALPHAS[t] * logged[f"train/loss_{t}"].item() for t in kept), rtol=1e-5)
    expected_calls = {"mim": [(8, False)], "cl": [(4, True), (4, False)]}.get(task, [(4, True), (8, False)])
    assert calls == expected_calls
    # The remaining heads are all trained (nothing left for DDP's find_unused_parameters).
    loss.backward()
    untrained = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not untrained, untrained


def test_alpha_validation():
    with pytest.raises(ValueError, match="alpha_cl must be >= 0"):
        HVPMTL(**{**TINY, "alpha_cl": -1.0})
    with pytest.raises(ValueError, match="at least one"):
        HVPMTL(**{**TINY, "alpha_mcls": 0.0, "alpha_cl": 0.0, "alpha_mim": 0.0, "alpha_mom": 0.0})
    with pytest.raises(ValueError, match="backbone_kwargs.img_size: 64"):
        HVPMTL(**{**TINY, "img_size": 64})
    with pytest.raises(ValueError, match="alpha_mim: 0"):
        HVPMTL(**{**TINY, "backbone": "resnet18", "backbone_kwargs": None})
    with pytest.raises(ValueError, match="ema_momentum"):
        HVPMTL(**{**TINY, "ema_momentum": 1.5})


# ---------------------------------------------------------------------- teacher
def test_teacher_gets_no_gradient_and_stays_in_eval_mode():
    model = _model()
    model.train()
    assert not model.teacher_backbone.training and not model.teacher_decoder.training
    assert model.backbone.training
    loss, _ = _step(model, _batch(2))
    loss.backward()
    teacher = [*model.teacher_backbone.parameters(), *model.teacher_decoder.parameters()]
    assert all(not p.requires_grad and p.grad is None for p in teacher)
    student = [n for n, p in model.named_parameters() if not n.startswith("teacher_") and p.grad is None]
    assert not student, student


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_teacher_is_ema_of_student_after_one_optimizer_step(accumulate, tmp_path):
    from lightning.pytorch import Trainer

    m = 0.9
    model = _model(ema_momentum=m, perturb_teacher=True)
    teacher_before = {**{f"b.{k}": v for k, v in _params(model.teacher_backbone).items()},
                      **{f"d.{k}": v for k, v in _params(model.teacher_decoder).items()}}
    batches = [_batch(2, seed=s) for s in range(2)]
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=1, accumulate_grad_batches=accumulate, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path))
    trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
    assert trainer.global_step == 1
    student = {**{f"b.{k}": v for k, v in _params(model.backbone).items()},
               **{f"d.{k}": v for k, v in _params(model.decoder).items()}}
    teacher = {**{f"b.{k}": v for k, v in _params(model.teacher_backbone).items()},
               **{f"d.{k}": v for k, v in _params(model.teacher_decoder).items()}}
    assert teacher.keys() == student.keys() == teacher_before.keys()
    moved = 0
    for name in teacher:
        expected = m * teacher_before[name] + (1 - m) * student[name]  # exactly one EMA step
        torch.testing.assert_close(teacher[name], expected, rtol=1e-5, atol=1e-6, msg=name)
        moved += int(not torch.equal(teacher[name], teacher_before[name]))
    assert moved == len(teacher)


def test_num_classes_must_match_the_data():
    from types import SimpleNamespace

    model = _model()
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(num_classes=C + 1))
    with pytest.raises(ValueError, match=f"num_classes: {C + 1}"):
        model.setup("fit")
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(num_classes=C))
    model.setup("fit")


def test_swin_encoder_masks_its_4px_patch_grid_and_reconstructs_at_stride_32():
    # A one-block-per-stage Swin at 32 px: patch grid 8 x 8, F0 [B, 8 * 24, 1, 1].
    swin = dict(backbone="swin_tiny_patch4_window7_224", mask_patch_size=8, backbone_kwargs={
        "img_size": S, "model_kwargs": {"window_size": 1, "depths": [1, 1, 1, 1], "embed_dim": 24,
                                        "num_heads": [1, 1, 1, 1]}})
    model = _model(**swin)
    transform = model.train_transform()
    assert transform.mask_generator.model_patch_size == 4 and transform.mask_generator.scale == 2
    batch = _batch(2)
    batch["mask"] = torch.stack([transform.mask_generator() for _ in range(2)])  # [2, 8, 8], 2 x 2 blocks
    assert model.mim_decoder(torch.zeros(1, 192, 1, 1)).shape == (1, 3, S, S)  # PixelShuffle(32)
    pixel = model.pixel_mask(batch["mask"])
    assert pixel.shape == (2, 1, S, S)
    expected = np.stack([np.kron(m, np.ones((4, 4))) for m in batch["mask"].numpy()])
    np.testing.assert_array_equal(pixel[:, 0].numpy(), expected)
    loss, logged = _step(model, batch)
    assert all(torch.isfinite(logged[f"train/loss_{t}"]) for t in ALPHAS)
    loss.backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


def test_train_transform_masks_the_patch_grid():
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    out = _model(perturb_teacher=False).train_transform()(img)
    assert out["views"].shape == (2, 3, S, S) and out["mask"].shape == (2, 2) and out["mask"].sum() == 3


# ---------------------------------------------------------------------- configs and the CLI
CONFIGS = sorted(p for p in EXPERIMENTS.rglob("*.yaml") if p.name != "tables.yaml")  # the manifest: tests/tables/test_manifest.py
PAPER = {"swinb_tencentml_30ep.yaml": "swin_base_patch4_window7_224", "vitb_tencentml_30ep.yaml": "vit_base_patch16_224",
         "swint_tencentml_30ep.yaml": "swin_tiny_patch4_window7_224",
         "swins_tencentml_30ep.yaml": "swin_small_patch4_window7_224"}
# Overlays: the loss-term ablations of Table 5 (on ViT-B) and the multi-label-only row (beside Table 5), each with
# the alphas it runs.
PAPER_ALPHAS = {"mcls": 0.001, "cl": 0.02, "mim": 1.0, "mom": 10.0}
OVERLAYS = {**{f"ablations/no_{t}.yaml": {**PAPER_ALPHAS, t: 0.0} for t in ALPHAS},
            "baselines/mcls_only.yaml": {"mcls": 1.0, "cl": 0.0, "mim": 0.0, "mom": 0.0}}
VITB = EXPERIMENTS / "vitb_tencentml_30ep.yaml"


def test_every_config_is_known():
    names = {str(p.relative_to(EXPERIMENTS)) for p in CONFIGS}
    assert names == {"demo.yaml", "cpu.yaml", *PAPER, *OVERLAYS}


def _parse(*configs: Path) -> dict:
    from ssl_zoo.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exit_info:
        main(["fit", *(arg for c in configs for arg in ("--config", str(c))), "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(buf.getvalue())


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_config_parses_and_builds(config):
    """Every config (an overlay on the ViT-B paper config, as Table 5 runs them) builds the paper's settings."""
    overlay = str(config.relative_to(EXPERIMENTS)) in OVERLAYS
    cfg = _parse(VITB, config) if overlay else _parse(config)
    assert cfg["model"]["class_path"] == "ssl_zoo.methods.HVPMTL"
    assert cfg["data"]["class_path"].endswith("TencentMLDataModule")
    init = cfg["model"]["init_args"]
    assert init["num_classes"] == cfg["data"]["init_args"]["num_classes"]
    with torch.device("meta"):  # the constructor's validation, without allocating Swin-B
        model = HVPMTL(**init)
    if config.name in ("demo.yaml", "cpu.yaml"):  # the laptop-sized runs, on the built-in demo set
        assert cfg["data"]["init_args"]["root"] == "data/demo"
        dictionary = ROOT / "data/demo/tencent/dictionary_and_semantic_hierarchy.txt"
        if dictionary.is_file():
            assert init["num_classes"] == len(dictionary.read_text().strip().splitlines())
        return
    trainer = cfg["trainer"]
    assert trainer["devices"] * trainer["num_nodes"] * cfg["data"]["init_args"]["batch_size"] == 1024
    assert trainer["max_epochs"] == 30 and trainer["precision"] == "bf16-mixed"
    hp = model.hparams
    assert (hp.base_lr, hp.lr_reference, hp.weight_decay, hp.warmup_epochs) == (1e-4, 1024, 0.05, 5)
    assert hp.base_lr * hp.final_lr_ratio == pytest.approx(1e-7)
    assert (hp.num_prototypes, hp.ema_momentum, hp.num_classes) == (3000, 0.995, 11166)
    assert (hp.distill_temperature, hp.freeze_prototypes_niters) == (1.0, 313)  # Eq. 6 has no temperature; SwAV
    assert model.alphas == OVERLAYS.get(str(config.relative_to(EXPERIMENTS)), PAPER_ALPHAS)
    assert hp.backbone == ("vit_base_patch16_224" if overlay else PAPER[config.name])
    # Tencent ML-Images as released: the ImageNet-id list and the Open Images URL list, each with its own images.
    data = cfg["data"]["init_args"]
    for split in ("train", "val"):
        assert data[f"{split}_list"] is None
        assert [entry["list_file"] for entry in data[f"{split}_lists"]] == [
            f"{split}_image_id_from_imagenet.txt", f"{split}_urls_from_openimages.txt"]
        assert len({entry["image_root"] for entry in data[f"{split}_lists"]}) == 2
    assert data["url_file_name"] == "parent_basename"
    if overlay:
        assert cfg["name"] != "hvp_mtl_vitb_tencentml_30ep"  # its own run directory


@pytest.mark.slow
def test_demo_fast_dev_run_through_the_cli(demo_root, tmp_path, monkeypatch):
    from ssl_zoo.cli import main

    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli = main(["fit", "--config", str(EXPERIMENTS / "demo.yaml"), "--trainer.fast_dev_run", "1",
                "--trainer.accelerator", "cpu", "--run_root", str(tmp_path), "--data.init_args.root", demo_root,
                "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "8",
                # 2 of the 12 blocks: the wiring is what is tested, CPU time is scarce.
                "--model.init_args.backbone_kwargs", '{"img_size": 64, "model_kwargs": {"depth": 2}}'])
    metrics = cli.trainer.callback_metrics
    for key in ("loss", "loss_mcls", "loss_cl", "loss_mim", "loss_mom", "z_std", "sinkhorn_clamped"):
        assert torch.isfinite(metrics[f"train/{key}"]), key
    model = cli.model
    # One optimiser step moved the student; the teacher followed by (1 - m) only, so the two now differ.
    pairs = list(zip(model.teacher_backbone.parameters(), model.backbone.parameters(), strict=True))
    assert all(not t.requires_grad for t, _ in pairs)
    assert not all(torch.equal(t, s) for t, s in pairs)
