"""Every public layout against its official model code: build the official model (``tests/helpers/official_models.py``,
or torchvision / open_clip themselves), save it the way the official training script saves, load it through
ssl_zoo **without naming a backbone**, and compare the features with the official forward pass to 1e-5.

The head counts, norms and activations come from the layout (the tensors cannot tell them): a MoCo v3 ViT-S has
12 heads, DINO's 6, OpenAI CLIP uses QuickGELU and a LayerNorm before its blocks. A backbone that would compute
other features is refused with the setting to change.
"""

from __future__ import annotations

import argparse

import pytest
import torch
import torchvision
from open_clip.model import CLIP

from ssl_zoo.checkpoints import load_backbone, read_backbone_weights
from tests.helpers import official_models as official
from tests.helpers.official_models import (
    IMG,
    assert_features_close,
    ddp_state_dict,
    mocov3_vit_small_file,
    seeded_images,
    timm_pre_logits,
)


def _randomise_bn(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buffer.uniform_(0.5, 1.5)
    return model


# ---------------------------------------------------------------------------------------------- ResNet layouts
def _torchvision_resnet18(num_classes: int = 16) -> torchvision.models.ResNet:
    torch.manual_seed(0)
    return _randomise_bn(torchvision.models.resnet18(num_classes=num_classes, zero_init_residual=True))


def _resnet_features(encoder: torchvision.models.ResNet, x: torch.Tensor) -> torch.Tensor:
    encoder.fc = torch.nn.Identity()
    return encoder.eval()(x)


def test_simsiam_checkpoint_as_main_simsiam_saves_it(tmp_path):
    """simsiam ``builder.py``: a torchvision ResNet whose fc became the projector MLP; ``main_simsiam.py`` saves
    {'epoch', 'arch', 'state_dict' (DDP), 'optimizer'}."""
    encoder = _torchvision_resnet18()
    dim = encoder.fc.weight.shape[1]
    encoder.fc = torch.nn.Sequential(torch.nn.Linear(dim, 16, bias=False), torch.nn.BatchNorm1d(16))
    predictor = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 16))
    state = {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
             **{f"predictor.{k}": v for k, v in predictor.state_dict().items()}}
    path = tmp_path / "checkpoint_0099.pth.tar"
    torch.save({"epoch": 100, "arch": "resnet18", "state_dict": ddp_state_dict(state), "optimizer": {}}, path)
    loaded = load_backbone(path).eval()
    assert loaded.name == "resnet18"
    assert_features_close(loaded(seeded_images(size=64)), _resnet_features(encoder, seeded_images(size=64)))


def test_moco_v2_checkpoint_query_and_key_encoders(tmp_path):
    """moco ``builder.py`` (mlp=True): fc = Linear + ReLU + fc; the queue; ``main_moco.py``'s save."""
    query, key = _torchvision_resnet18(), _torchvision_resnet18()
    with torch.no_grad():
        for p in key.parameters():
            p.add_(0.1)
    for encoder in (query, key):
        dim = encoder.fc.weight.shape[1]
        encoder.fc = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU(), encoder.fc)
    state = {**{f"encoder_q.{k}": v for k, v in query.state_dict().items()},
             **{f"encoder_k.{k}": v for k, v in key.state_dict().items()},
             "queue": torch.randn(16, 64), "queue_ptr": torch.zeros(1, dtype=torch.long)}
    path = tmp_path / "moco_v2_200ep_pretrain.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": ddp_state_dict(state), "optimizer": {}}, path)
    x = seeded_images(size=64)
    assert_features_close(load_backbone(path).eval()(x), _resnet_features(query, x))
    assert_features_close(load_backbone(path, teacher=True).eval()(x), _resnet_features(key, x))


def test_mocov3_resnet_checkpoint(tmp_path):
    model = official.MoCoV3(_torchvision_resnet18, "fc")
    _randomise_bn(model)
    path = tmp_path / "r-50-1000ep.pth.tar"
    torch.save({"epoch": 100, "arch": "resnet18", "state_dict": ddp_state_dict(model.state_dict()), "optimizer": {},
                "scaler": {}}, path)
    x = seeded_images(size=64)
    assert_features_close(load_backbone(path).eval()(x), _resnet_features(model.base_encoder, x))


def test_torchvision_resnet_weights_need_no_name(tmp_path):
    reference = _torchvision_resnet18(num_classes=1000)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(reference.state_dict(), path)  # torchvision's published files: the bare state dict with fc
    loaded = load_backbone(path).eval()
    assert loaded.name == "resnet18"
    assert_features_close(loaded(seeded_images(size=64)), _resnet_features(reference, seeded_images(size=64)))


# ---------------------------------------------------------------------------------------------- ViT layouts


def test_mocov3_vit_small_has_12_heads(tmp_path):
    model, path = mocov3_vit_small_file(tmp_path)
    weights = read_backbone_weights(path)
    assert weights.layout == "mocov3" and weights.architecture.facts["num_heads"] == 12
    x = seeded_images()
    loaded = load_backbone(path).eval()
    assert loaded.model.blocks[0].attn.num_heads == 12
    assert_features_close(loaded(x), timm_pre_logits(model.base_encoder, x))
    assert_features_close(load_backbone(path, teacher=True).eval()(x), timm_pre_logits(model.momentum_encoder, x))
    # naming timm's vit_small_patch16_224 (6 heads by default) is corrected from the layout: 12 heads
    named = load_backbone(path, backbone="vit_small_patch16_224").eval()
    assert named.model.blocks[0].attn.num_heads == 12
    assert_features_close(named(x), timm_pre_logits(model.base_encoder, x))


def test_mocov3_vit_small_into_a_6_head_vit_is_refused_in_one_line(tmp_path):
    _, path = mocov3_vit_small_file(tmp_path)
    with pytest.raises(ValueError, match=r"num_heads 12 in the checkpoint's architecture, 6 in '.*'.*"
                                         r"set model_kwargs \{num_heads: 12\}") as info:
        load_backbone(path, backbone="vit_small_patch16_224", backbone_kwargs={"model_kwargs": {"num_heads": 6}})
    assert "\n" not in str(info.value) and "moco-v3 vits.py" in str(info.value)
    with pytest.raises(ValueError, match="num_heads 12 .* 6 in 'deit_small_patch16_224'"):
        load_backbone(path, backbone="deit_small_patch16_224", backbone_kwargs={"img_size": IMG})


def test_dino_training_checkpoint_student_and_teacher(tmp_path):
    """DINO ``main_dino.py``: {'student' (DDP), 'teacher', 'optimizer', 'epoch', 'args', 'dino_loss'}."""
    torch.manual_seed(2)
    student = official.MultiCropWrapper(official.DinoViT(), official.DinoHead(384))
    torch.manual_seed(3)
    teacher = official.MultiCropWrapper(official.DinoViT(), official.DinoHead(384))
    path = tmp_path / "checkpoint.pth"
    torch.save({"student": ddp_state_dict(student.state_dict()), "teacher": teacher.state_dict(), "optimizer": {},
                "epoch": 100, "args": argparse.Namespace(arch="vit_small", patch_size=16),
                "dino_loss": {"center": torch.zeros(1, 32)}}, path)
    x = seeded_images()
    loaded = load_backbone(path).eval()
    assert loaded.model.blocks[0].attn.num_heads == 6
    assert_features_close(loaded(x), student.backbone.eval()(x))
    assert_features_close(load_backbone(path, teacher=True).eval()(x), teacher.backbone.eval()(x))
    # the released backbone-only file (dino_deitsmall16_pretrain.pth) is a bare state dict: the name is needed
    bare = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(student.backbone.state_dict(), bare)
    with pytest.raises(ValueError, match="pass backbone=<timm name>"):
        load_backbone(bare)
    named = load_backbone(bare, backbone="vit_small_patch16_224", backbone_kwargs={"img_size": IMG,
                                                                                   "model_kwargs": {"depth": 2}})
    assert_features_close(named.eval()(x), student.backbone(x))


def test_mae_pretraining_checkpoint(tmp_path):
    """MAE's released pre-training file: {'model': encoder + decoder}; ``main_linprobe`` reads the CLS token."""
    torch.manual_seed(4)
    encoder = official.mae_vit_base()
    decoder = {"mask_token": torch.randn(1, 1, 16), "decoder_embed.weight": torch.randn(16, 768),
               "decoder_pos_embed": torch.randn(1, 5, 16), "decoder_blocks.0.norm1.weight": torch.randn(16),
               "decoder_norm.weight": torch.randn(16), "decoder_pred.weight": torch.randn(768, 16)}
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("head.")}
    path = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save({"model": {**state, **decoder}}, path)
    weights = read_backbone_weights(path)
    assert weights.layout == "mae" and weights.name == "vit_base_patch16_224"
    x = seeded_images()
    assert_features_close(load_backbone(path).eval()(x), encoder.eval().features(x))


def _beit_file(tmp_path, name: str, **kwargs) -> tuple[official.BeitViT, str]:
    torch.manual_seed(5)
    model = official.BeitViT(**kwargs).eval()
    path = tmp_path / name
    torch.save({"model": official.beit_state_dict(model), "optimizer": {}, "epoch": 799, "scaler": {},
                "args": argparse.Namespace(model="beit_base_patch16_224_8k_vocab")}, path)
    return model, str(path)


def test_beit_pretraining_checkpoint_tokens(tmp_path):
    """unilm BEiT pre-training: shared relative position bias, layer scale, no absolute position embedding."""
    model, path = _beit_file(tmp_path, "beit_base_patch16_224_pt22k.pth")
    weights = read_backbone_weights(path)
    assert weights.layout == "beit" and weights.name == "beit_base_patch16_224"
    assert weights.kwargs["model_kwargs"]["use_shared_rel_pos_bias"] is True
    assert "mask_token" in weights.dropped and "lm_head.*" in weights.dropped
    loaded = load_backbone(path).eval()
    x = seeded_images()
    with torch.no_grad():
        assert_features_close(loaded.forward_tokens(x), model.forward_features(x))
        assert_features_close(loaded(x), model.forward_features(x)[:, 0])


def test_beit_v2_drops_its_cls_pretraining_blocks(tmp_path):
    model, path = _beit_file(tmp_path, "beitv2_base_patch16_224_pt1k.pth", cls_pt_layers=1)
    weights = read_backbone_weights(path)
    assert "cls_pt_layers.*" in weights.dropped
    with torch.no_grad():
        assert_features_close(load_backbone(path).eval().forward_tokens(seeded_images()),
                              model.forward_features(seeded_images()))


def test_beit_fine_tuned_checkpoint_mean_pooling(tmp_path):
    """unilm BEiT fine-tuning layout: one relative position table per block, ``fc_norm`` after the patch mean."""
    model, path = _beit_file(tmp_path, "beit_base_patch16_224_pt22k_ft22k.pth", pretraining=False)
    weights = read_backbone_weights(path)
    assert weights.architecture.facts["global_pool"] == "avg"
    with torch.no_grad():
        assert_features_close(load_backbone(path).eval()(seeded_images()), model.forward_features(seeded_images()))


def test_torchvision_vit_b(tmp_path):
    torch.manual_seed(6)
    reference = torchvision.models.VisionTransformer(image_size=IMG, patch_size=16, num_layers=1, num_heads=12,
                                                     hidden_dim=768, mlp_dim=3072, num_classes=10)
    path = tmp_path / "vit_b_16-c867db91.pth"
    torch.save(reference.state_dict(), path)
    loaded = load_backbone(path).eval()
    assert loaded.name == "vit_base_patch16_224"
    reference.heads = torch.nn.Identity()
    assert_features_close(loaded(seeded_images()), reference.eval()(seeded_images()))


def test_openai_clip_visual_tower_through_open_clip(tmp_path):
    """OpenAI CLIP's ViT-B/16 visual tower (QuickGELU, LayerNorm eps 1e-5 and ``ln_pre``) as open_clip builds it;
    the state dict of the whole CLIP model (text tower included) as OpenAI's and open_clip's files hold it."""
    torch.manual_seed(7)
    clip = CLIP(embed_dim=32, vision_cfg={"image_size": IMG, "patch_size": 16, "width": 768, "layers": 1},
                text_cfg={"context_length": 8, "vocab_size": 50, "width": 64, "heads": 1, "layers": 1},
                quick_gelu=True).eval()
    path = tmp_path / "ViT-B-16.pt"
    torch.save(clip.state_dict(), path)
    weights = read_backbone_weights(path)
    assert weights.layout == "openai_clip" and weights.name == "vit_base_patch16_clip_quickgelu_224"
    assert "visual.proj" in weights.dropped and "transformer.*" in weights.dropped
    loaded = load_backbone(path).eval()
    x = seeded_images()
    with torch.no_grad():
        assert_features_close(loaded(x) @ clip.visual.proj, clip.encode_image(x))
    with pytest.raises(ValueError, match="act 'QuickGELU' in the checkpoint's architecture, 'GELU'"):
        load_backbone(path, backbone="vit_base_patch16_clip_224", backbone_kwargs={"img_size": IMG,
                                                                                   "model_kwargs": {"depth": 1}})


def test_timm_state_dicts_named_by_the_user(tmp_path):
    """timm's own files (its model code is the official one): a bare ViT state dict does not state its heads, so
    the name is given; with it, the features are timm's."""
    import timm

    torch.manual_seed(8)
    reference = timm.create_model("vit_small_patch16_224", img_size=IMG, depth=2, num_classes=10).eval()
    path = tmp_path / "vit_small_patch16_224.augreg_in21k.bin"
    torch.save(reference.state_dict(), path)
    loaded = load_backbone(path, backbone="vit_small_patch16_224",
                           backbone_kwargs={"img_size": IMG, "model_kwargs": {"depth": 2}}).eval()
    assert_features_close(loaded(seeded_images()), timm_pre_logits(reference, seeded_images()))
