"""MVP (``ssl_zoo.methods.mvp``): masking, the frozen teacher, the loss wiring (Eq. 9), BEiT's settings and schedule,
the configs and the demo through the CLI (the teachers: tests/models/test_teachers.py; DDP:
tests/jobs/test_ddp_every_method.py)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ssl_zoo.methods import MVP
from tests.helpers.tiny_mvp import IMAGE_SIDE, TINY_CLIP, mvp_batch, quiet, tiny_mvp

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------- student
def test_masked_positions_carry_the_mask_token():
    model = tiny_mvp()
    batch = mvp_batch(3)
    x, mask = batch["views"][:, 0], batch["mask"].flatten(1)
    vit = model.backbone.model
    assert isinstance(vit.norm_pre, torch.nn.Identity)  # so the blocks' input is the embedding itself
    seen = {}
    handle = vit.blocks.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0].detach()))
    model.predict_tokens(x, batch["mask"])
    handle.remove()
    embeddings = seen["x"][:, 1:] - vit.pos_embed[:, 1:].detach()  # [B, N, D] input embedding of each patch
    patch_embeddings = vit.patch_embed(x).detach()  # [B, N, D]
    token = model.mask_token.detach()
    assert token.abs().sum() > 0
    for b in range(3):
        for n in range(4):
            expected = token if mask[b, n] else patch_embeddings[b, n]
            torch.testing.assert_close(embeddings[b, n], expected, rtol=1e-5, atol=1e-6)
            if not mask[b, n]:
                assert not torch.allclose(embeddings[b, n], token)


def test_patch_grid_mismatch_is_a_configuration_error():
    teacher_cfg = {**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "patch_size": 8}}
    with pytest.raises(ValueError, match=r"patch grids differ.*2x2.*4x4"):
        tiny_mvp(teacher_kwargs=teacher_cfg)


def test_bad_loss_on_is_rejected():
    with pytest.raises(ValueError, match="loss_on"):
        tiny_mvp(loss_on="visible")


@pytest.mark.parametrize("loss_on", ["all", "masked"])
def test_training_step_is_eq9_on_student_predictions_and_teacher_targets(loss_on):
    model = tiny_mvp(loss_on=loss_on)
    batch = mvp_batch(3)
    loss = model.training_step(batch, 0)
    with torch.no_grad():
        pred = model.predict_tokens(batch["views"][:, 0], batch["mask"]).numpy().astype(np.float64)
        target = model.teacher_backbone(batch["teacher_views"][:, 0]).numpy().astype(np.float64)
    mask = batch["mask"].flatten(1).numpy()
    per_image = []
    for b in range(3):
        used = [0] + [1 + m for m in range(4) if loss_on == "all" or mask[b, m]]
        cos = [pred[b, t] @ target[b, t] / (np.linalg.norm(pred[b, t]) * np.linalg.norm(target[b, t]))
               for t in used]
        per_image.append(-sum(cos) / len(used))
    np.testing.assert_allclose(loss.item(), np.mean(per_image), rtol=1e-5, atol=1e-6)


def test_teacher_gets_no_gradient_and_every_student_parameter_does():
    model = tiny_mvp()
    model.training_step(mvp_batch(2), 0).backward()
    for name, p in model.teacher_backbone.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    student = [n for n, p in model.named_parameters() if not n.startswith("teacher_backbone.")]
    assert "mask_token" in student and "head.weight" in student
    missing = [n for n, p in model.named_parameters() if n in student and p.grad is None]
    assert not missing, missing


def test_teacher_is_bit_identical_after_several_optimizer_steps():
    import lightning.pytorch as pl

    model = tiny_mvp()
    teacher_before = {k: v.clone() for k, v in model.teacher_backbone.state_dict().items()}
    student_before = model.backbone.model.patch_embed.proj.weight.detach().clone()
    batches = [{k: v[0] for k, v in mvp_batch(1, seed=i).items()} for i in range(8)]  # per-sample dicts
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(batches, batch_size=2))
    assert trainer.global_step == 3
    for k, v in model.teacher_backbone.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert all(p.grad is None for p in model.teacher_backbone.parameters())
    assert not model.teacher_backbone.training  # stays in eval mode while the student trains
    assert not torch.equal(model.backbone.model.patch_embed.proj.weight, student_before)
    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in model.teacher_backbone.parameters()}
    no_decay = trainer.optimizers[0].param_groups[0]  # timm's param_groups_weight_decay: [no decay, decay]
    assert no_decay["weight_decay"] == 0.0 and any(p is model.mask_token for p in no_decay["params"])
    assert trainer.optimizers[0].defaults["betas"] == (0.9, 0.98)


def test_train_transform_matches_the_student_grid():
    from PIL import Image

    sample = tiny_mvp().train_transform()(Image.new("RGB", (48, 40), (120, 30, 200)))
    assert sample["views"].shape == sample["teacher_views"].shape == (1, 3, IMAGE_SIDE, IMAGE_SIDE)
    assert sample["mask"].shape == (2, 2) and sample["mask"].sum() == 2


# ---------------------------------------------------------------------------------------- configs
CONFIGS = sorted(p for p in (ROOT / "experiments" / "mvp").glob("*.yaml") if p.name != "tables.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses(config):
    import contextlib
    import io

    from ssl_zoo.cli import main

    if config.name == "demo.yaml":  # the demo builds offline: instantiate it
        cli = quiet(main, ["--config", str(config)], run=False)
        assert isinstance(cli.model, MVP) and cli.model.teacher_backbone.grid_size == (4, 4)
        return
    # The paper configs would download CLIP ViT-B/16: parse and validate them without instantiating.
    with contextlib.redirect_stdout(io.StringIO()) as out, pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    if config.name == "cpu.yaml":  # a teacher the project trains itself (its supervised CPU ViT), as timm
        assert "teacher: timm" in out.getvalue()
        assert "teacher_pretrained: data/teachers/supervised_vit_cpu.pth" in out.getvalue()
        return
    assert "teacher_pretrained: openai" in out.getvalue()


@pytest.mark.slow
def test_demo_config_fast_dev_run(demo_root, tmp_path):
    from ssl_zoo.cli import main

    cli = main(["fit", "--config", str(ROOT / "experiments/mvp/demo.yaml"), "--trainer.fast_dev_run", "1",
                "--data.init_args.root", f"{demo_root}/folder", "--data.init_args.num_workers", "0",
                "--data.init_args.batch_size", "4", "--trainer.default_root_dir", str(tmp_path)])
    metrics = cli.trainer.callback_metrics
    # Eq. 9 itself is checked against brute force above; here the demo config must train and log its terms.
    assert torch.isfinite(metrics["train/loss"])
    assert "train/z_std" in metrics and "train/cos_masked" in metrics


# ---------------------------------------------------------------------------------------- BEiT details
TINY_BEIT = dict(backbone="beit_base_patch16_224",
                 backbone_kwargs={"img_size": IMAGE_SIDE, "model_kwargs": {
                     "depth": 2, "embed_dim": 96, "num_heads": 3, "use_shared_rel_pos_bias": True,
                     "use_rel_pos_bias": False, "use_abs_pos_emb": False, "global_pool": "token"}})


def test_beit_student_trains_with_the_shared_relative_position_bias():
    model = tiny_mvp(**TINY_BEIT)
    assert model.backbone.family == "beit" and model.backbone.model.pos_embed is None
    loss = model.training_step(mvp_batch(2), 0)
    assert torch.isfinite(loss)
    loss.backward()
    shared = model.backbone.model.rel_pos_bias.relative_position_bias_table
    assert shared.grad is not None and shared.grad.abs().sum() > 0
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    # no weight decay on the relative position bias table (BEiT's no_weight_decay list)
    from timm.optim import param_groups_weight_decay

    from ssl_zoo.utils.optim import NO_WEIGHT_DECAY

    no_decay, decay = param_groups_weight_decay(model, 0.05, no_weight_decay_list=NO_WEIGHT_DECAY)
    assert any(p is shared for p in no_decay["params"]) and not any(p is shared for p in decay["params"])


def test_paper_defaults_follow_beits_pretraining():
    from ssl_zoo.augment import BEiTMaskGenerator

    transform = tiny_mvp().train_transform()
    assert isinstance(transform.mask_generator, BEiTMaskGenerator)
    jitter = transform.geometric.transforms[0]
    assert type(jitter).__name__ == "ColorJitter" and jitter.brightness == (0.6, 1.4)  # strength 0.4
    assert jitter.contrast == (0.6, 1.4) and jitter.saturation == (0.6, 1.4) and jitter.hue is None
    hp = tiny_mvp().hparams
    assert (hp.warmup_lr, hp.min_lr, hp.mask_sampling, hp.color_jitter) == (1e-6, 1e-5, "beit", 0.4)


def beit_cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs, start_warmup_value):
    """BEiT's ``utils.cosine_scheduler`` (unilm/beit), written out with numpy."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate([warmup, cosine])


def test_lr_schedule_is_beits_cosine_from_warmup_lr_to_min_lr():
    from types import SimpleNamespace

    model = tiny_mvp(warmup_epochs=2, lr_batch_size=None)
    steps_per_epoch, epochs = 7, 5
    model._trainer = SimpleNamespace(  # what configure_optimizers reads from the Trainer
        estimated_stepping_batches=steps_per_epoch * epochs, max_epochs=epochs, world_size=8,
        accumulate_grad_batches=1, datamodule=SimpleNamespace(batch_size=256))
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(steps_per_epoch * epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = beit_cosine_scheduler(1.5e-3, 1e-5, epochs, steps_per_epoch, 2, 1e-6)  # batch 8 x 256 = 2048
    np.testing.assert_allclose(lrs, expected, rtol=1e-9, atol=1e-12)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] > 1e-5


def test_default_warmup_of_the_other_methods_is_unchanged():
    from ssl_zoo.utils.optim import warmup_cosine

    # (step + 1) / warmup: the ramp from 0 that every other method has always used
    assert [warmup_cosine(s, 100, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(4, 100, 4) == pytest.approx(1.0)
    assert warmup_cosine(4, 100, 4, start_ratio=0.1) == pytest.approx(1.0)
    assert [warmup_cosine(s, 100, 4, start_ratio=0.1) for s in range(4)] == pytest.approx([0.1, 0.4, 0.7, 1.0])
