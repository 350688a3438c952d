"""Fine-tuning (``ssl_zoo.eval.finetune``): BEiT's mean-pooling head from pre-training checkpoints, layer decay as
BEiT and SimMIM assign it, the semi-supervised recipes (MPCL Table V) and the training crop scale."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from ssl_zoo.cli import main
from ssl_zoo.eval.finetune import FineTune, layer_ids
from tests.helpers.pretraining_checkpoints import (
    BEIT_PRETRAIN,
    TINY_VIT,
    make_beit_pretraining_checkpoint,
    make_pretraining_checkpoint,
)


def test_finetune_crop_scale_reaches_the_training_crop():
    """``crop_scale`` is the area range of the training RandomResizedCrop (timm's (0.08, 1) by default)."""
    kwargs = dict(backbone="resnet18", backbone_kwargs={"model_kwargs": {"layers": [1, 1, 1, 1]}}, img_size=32,
                  auto_augment=None, re_prob=0.0)
    default, narrow = FineTune(**kwargs), FineTune(**kwargs, crop_scale=(0.35, 1.0))
    assert default.train_transform().transform.transforms[0].scale == (0.08, 1.0)
    assert narrow.train_transform().transform.transforms[0].scale == (0.35, 1.0)
    with pytest.raises(ValueError, match="model.crop_scale"):
        FineTune(**kwargs, crop_scale=(0.5, 0.2))


ROOT = Path(__file__).resolve().parents[2]


BEIT_FINETUNE = {"model_kwargs": {"use_shared_rel_pos_bias": False, "use_rel_pos_bias": True}}


def test_beit_mean_pooling_head_loads_a_pretraining_checkpoint(tmp_path):
    ckpt = tmp_path / "mvp" / "last.ckpt"
    student = make_beit_pretraining_checkpoint(ckpt)
    model = FineTune(ckpt=str(ckpt), num_classes=5, img_size=32, use_mean_pooling=True,
                     backbone_kwargs=BEIT_FINETUNE).eval()
    vit, pre = model.backbone.model, student.model
    assert isinstance(vit.norm, torch.nn.Identity) and isinstance(vit.fc_norm, torch.nn.LayerNorm)
    assert torch.equal(vit.fc_norm.weight, torch.ones(192)) and torch.equal(vit.fc_norm.bias, torch.zeros(192))
    assert vit.rel_pos_bias is None  # BEiT fine-tuning: one table per block, each the pre-trained shared one
    shared = pre.rel_pos_bias.relative_position_bias_table
    for block in vit.blocks:
        assert torch.equal(block.attn.relative_position_bias_table, shared)
    fresh_or_copied = {"fc_norm.weight", "fc_norm.bias"} | {
        f"blocks.{i}.attn.relative_position_bias_table" for i in range(len(vit.blocks))}
    pre_state = pre.state_dict()
    for key, value in vit.state_dict().items():  # everything else, layer scale included, is the checkpoint's
        if key not in fresh_or_copied:
            assert torch.equal(value, pre_state[key]), key
    # Brute force: the pre-training model's tokens before its final norm, patch tokens averaged, a fresh
    # LayerNorm (eps 1e-6, BEiT's), then the linear head.
    x = torch.randn(3, 3, 32, 32)
    seen = {}
    handle = pre.norm.register_forward_pre_hook(lambda _m, args: seen.setdefault("tokens", args[0]))
    with torch.no_grad():
        pre.eval().forward_features(x)
        handle.remove()
        pooled = torch.nn.functional.layer_norm(seen["tokens"][:, 1:].mean(1), (192,), eps=1e-6)
        torch.testing.assert_close(model(x), model.head(pooled), rtol=1e-5, atol=1e-5)


def test_beit_state_dict_saved_by_beits_own_code_loads(tmp_path):
    """BEiT's code saves the relative_position_index buffers (timm recomputes them): they are dropped."""
    ckpt = tmp_path / "mvp" / "last.ckpt"
    student = make_beit_pretraining_checkpoint(ckpt)
    state = dict(student.model.state_dict())
    state["rel_pos_bias.relative_position_index"] = student.model.rel_pos_bias.relative_position_index.clone()
    plain = tmp_path / "beit.pth"
    torch.save({"model": state}, plain)
    kwargs = {"img_size": 32, "model_kwargs": {**BEIT_PRETRAIN, **BEIT_FINETUNE["model_kwargs"]}}
    model = FineTune(ckpt=str(plain), backbone="beit_base_patch16_224", backbone_kwargs=kwargs, num_classes=3,
                     img_size=32, use_mean_pooling=True)
    table = student.model.rel_pos_bias.relative_position_bias_table
    assert torch.equal(model.backbone.model.blocks[1].attn.relative_position_bias_table, table)
    state["rel_pos_bias.relative_position_index"] += 1  # a wrong index would be recomputed too, never loaded
    torch.save({"model": state}, plain)
    again = FineTune(ckpt=str(plain), backbone="beit_base_patch16_224", backbone_kwargs=kwargs, num_classes=3,
                     img_size=32, use_mean_pooling=True)
    assert torch.equal(again.backbone.model.blocks[0].attn.relative_position_index,
                       model.backbone.model.blocks[0].attn.relative_position_index)


def test_mean_pooling_head_on_a_vit_and_its_errors(tmp_path):
    ckpt = tmp_path / "vit.ckpt"
    student, _ = make_pretraining_checkpoint(ckpt, name="vit_tiny_patch16_224", teacher=False,
                                             backbone_kwargs={**TINY_VIT, "model_kwargs": {"depth": 2, "init_values": 0.1}})
    model = FineTune(ckpt=str(ckpt), num_classes=3, img_size=32, use_mean_pooling=True)
    vit = model.backbone.model
    assert isinstance(vit.norm, torch.nn.Identity) and vit.global_pool == "avg"
    # the recorded model_kwargs (layer scale) survive the head option's model_kwargs
    assert torch.equal(vit.blocks[0].ls1.gamma, student.model.blocks[0].ls1.gamma)
    with pytest.raises(ValueError, match="use_mean_pooling needs model.pooling 'backbone'"):
        FineTune(backbone="vit_tiny_patch16_224", backbone_kwargs=TINY_VIT, use_mean_pooling=True, pooling="gap")
    with pytest.raises(ValueError, match="fc_norm"):
        FineTune(backbone="resnet18", use_mean_pooling=True)


def test_finetune_layer_decay_follows_beit():
    """lr scale of ViT layer l is decay^(L + 1 - l): patch embedding l = 0, block i l = i + 1, head L + 1."""
    model = FineTune(backbone="vit_tiny_patch16_224", backbone_kwargs={"model_kwargs": {"depth": 3}}, img_size=32,
                     num_classes=5, layer_decay=0.5)
    groups = model.param_groups(lr=1.0)
    scale_of = {}
    for group in groups:
        for p in group["params"]:
            scale_of[id(p)] = (group["lr_scale"], group["lr"], group["weight_decay"])
    vit = model.backbone.model
    depth = len(vit.blocks)
    assert scale_of[id(vit.patch_embed.proj.weight)][0] == pytest.approx(0.5 ** (depth + 1))
    for i in (0, depth - 1):
        scale, lr, wd = scale_of[id(vit.blocks[i].mlp.fc1.weight)]
        assert scale == pytest.approx(0.5 ** (depth - i)) and lr == pytest.approx(scale) and wd == 0.05
        assert scale_of[id(vit.blocks[i].norm1.weight)][2] == 0.0  # no decay on norms
    assert scale_of[id(vit.norm.weight)][0] == 1.0  # the final norm sits with the head, as in BEiT / MAE
    assert scale_of[id(model.head.weight)] == (1.0, 1.0, 0.05)
    assert scale_of[id(model.head.bias)][2] == 0.0
    assert scale_of[id(vit.pos_embed)][2] == 0.0 and scale_of[id(vit.cls_token)][2] == 0.0
    assert len(scale_of) == sum(1 for _ in model.parameters())  # every parameter is optimised once


@pytest.mark.parametrize("pct", [1, 10])
def test_semisup_configs_follow_barlow_twins_evaluate(pct):
    """MPCL's footnote 2: Barlow Twins' evaluate.py (README: --epochs 20 --lr-backbone 0.005 --lr-classifier 0.5
    --weight-decay 0; batch 256, SGD momentum 0.9, CosineAnnealingLR over the epochs), same values for 1 % and 10 %."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "experiments" / "eval" / f"semisup_in1k_r50_{pct}pct.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    cfg = yaml.safe_load(buf.getvalue())
    init = cfg["model"]["init_args"]
    assert cfg["trainer"]["max_epochs"] == 20
    assert cfg["trainer"]["devices"] * cfg["data"]["init_args"]["batch_size"] == 256
    assert cfg["data"]["init_args"]["train_subset"] == f"{pct}percent.txt"
    assert (init["optimizer"], init["momentum"], init["nesterov"], init["weight_decay"]) == ("sgd", 0.9, False, 0.0)
    assert (init["base_lr"], init["head_base_lr"], init["lr_batch_size"]) == (0.005, 0.5, 256)
    assert (init["lr_interval"], init["warmup_epochs"], init["min_lr_ratio"]) == ("epoch", 0, 0.0)
    assert init["head_init_std"] == 0.01 and init["label_smoothing"] == 0.0 and init["mixup"] == init["cutmix"] == 0.0
    assert init["auto_augment"] is None and init["color_jitter"] is None and init["re_prob"] == 0.0


def test_semisup_optimiser_has_two_lrs_and_a_per_epoch_cosine():
    """The head at --lr-classifier, the backbone at --lr-backbone, both following CosineAnnealingLR(opt, 20)."""
    from types import SimpleNamespace

    model = FineTune(backbone="resnet18", num_classes=5, img_size=32, optimizer="sgd", nesterov=False, base_lr=0.005,
                     head_base_lr=0.5, lr_batch_size=256, weight_decay=0.0, layer_decay=1.0, warmup_epochs=0,
                     min_lr_ratio=0.0, lr_interval="epoch")
    model._trainer = SimpleNamespace(max_epochs=20, estimated_stepping_batches=20 * 7)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "epoch"
    assert isinstance(optimizer, torch.optim.SGD) and not optimizer.defaults["nesterov"]
    head = {id(p) for p in model.head.parameters()}
    lrs = {}
    for group in optimizer.param_groups:
        assert group["weight_decay"] == 0.0
        for p in group["params"]:
            lrs[id(p)] = group["lr"]
    assert len(lrs) == sum(1 for _ in model.parameters())
    assert {lrs[i] for i in head} == {0.5} and {v for i, v in lrs.items() if i not in head} == {0.005}
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)],
                                                                           lr=1.0), 20)
    for _ in range(20):  # one scheduler step per epoch, as evaluate.py's scheduler.step()
        factor = reference.get_last_lr()[0]
        assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx([0.005 * factor, 0.5 * factor])
        optimizer.step()
        scheduler.step()
        reference.optimizer.step()
        reference.step()
    with pytest.raises(ValueError, match="model.lr_interval"):
        FineTune(backbone="resnet18", lr_interval="iteration")


def _simmim_swin_layer(name: str, depths: list[int]) -> int:
    """SimMIM's optimizer.get_swin_layer on timm parameter names (timm's layers.{i}.downsample is SimMIM's
    layers.{i-1}.downsample: the patch merging that ends stage i - 1)."""
    parts = name.split(".")
    if name.startswith("patch_embed"):
        return 0
    if parts[0] == "layers" and parts[2] == "downsample":
        return sum(depths[: int(parts[1])])
    if parts[0] == "layers" and parts[2] == "blocks":
        return sum(depths[: int(parts[1])]) + int(parts[3]) + 1
    return sum(depths) + 1  # final norm and head


def test_finetune_layer_decay_follows_simmim_for_swin():
    """Swin layer ids as SimMIM fine-tunes them: l = 0 patch embedding, blocks counted across stages, patch
    merging with the block before it, L + 1 the final norm and head; lr scale decay^(L + 1 - l)."""
    depths = [1, 2, 1, 1]
    model = FineTune(backbone="swin_tiny_patch4_window7_224", img_size=32, num_classes=5, layer_decay=0.5,
                     backbone_kwargs={"model_kwargs": {"depths": depths, "embed_dim": 24, "num_heads": [1, 1, 1, 1],
                                                       "window_size": 1}})
    swin = model.backbone.model
    ids = layer_ids(swin)
    assert any("downsample" in n for n in ids)
    for name, _ in swin.named_parameters():
        assert ids[name] == _simmim_swin_layer(name, depths), name
    scale_of = {id(p): g["lr_scale"] for g in model.param_groups(lr=1.0) for p in g["params"]}
    top = sum(depths) + 1
    for name, param in swin.named_parameters():
        assert scale_of[id(param)] == pytest.approx(0.5 ** (top - _simmim_swin_layer(name, depths))), name
    assert scale_of[id(model.head.weight)] == 1.0


def test_layer_ids_depart_from_timms_matcher_only_where_beit_and_simmim_do():
    """timm's ``group_matcher`` (what ``param_groups_layer_decay`` numbers by) merges the final norm into the last
    block (BEiT / MAE: L + 1, with the head) and numbers Swin's patch merging with the next stage's first block
    (SimMIM: with the block before it). Everything else, ResNet and mean-pooled BEiT included, is timm's."""
    import timm
    from timm.models import group_parameters

    swin = {"img_size": 32, "depths": [1, 2, 1, 1], "embed_dim": 24, "num_heads": [1, 1, 1, 1], "window_size": 1}
    expected = {
        "vit_tiny_patch16_224": ({"depth": 3, "img_size": 32}, {"norm.weight": +1, "norm.bias": +1}),
        "beit_base_patch16_224": ({"depth": 2, "embed_dim": 96, "num_heads": 3, "img_size": 32}, {}),
        "resnet18": ({}, {}),
        "swin_tiny_patch4_window7_224": (swin, {"norm.weight": +1, "norm.bias": +1,
                                                **{f"layers.{i}.downsample.{p}": -1 for i in (1, 2, 3)
                                                   for p in ("norm.weight", "norm.bias", "reduction.weight")}}),
    }
    for name, (kwargs, moved) in expected.items():
        model = timm.create_model(name, num_classes=5, **kwargs)
        timm_ids = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
        ours = layer_ids(model)
        assert {n: ours[n] - timm_ids[n] for n in ours if ours[n] != timm_ids[n]} == moved, name


def test_finetune_resnet_head_sits_one_layer_after_the_last_block():
    """The headless ResNet's ids stop at its last block (L); the fine-tuning head is L + 1 (BEiT's numbering), so
    the last block already takes one decay step."""
    model = FineTune(backbone="resnet18", img_size=32, num_classes=5, layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in model.param_groups(lr=1.0) for p in g["params"]}
    resnet = model.backbone.model
    assert scale_of[id(model.head.weight)] == 1.0
    assert scale_of[id(resnet.layer4[1].conv1.weight)] == 0.5 and scale_of[id(resnet.conv1.weight)] == 0.5 ** 9
