"""``load_backbone`` (``ssl_zoo.checkpoints.load``): student and teacher of our checkpoints, plain timm state dicts,
position embeddings resampled, and mismatches named with both architectures and the tensors' shapes."""


import pytest
import torch

from ssl_zoo.checkpoints import load_backbone
from ssl_zoo.models import Backbone
from tests.helpers.pretraining_checkpoints import (
    TINY_VIT,
    assert_same_weights,
    make_pretraining_checkpoint,
    random_backbone,
)


def test_load_backbone_student_and_teacher(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    student, teacher = make_pretraining_checkpoint(ckpt)
    loaded_student = load_backbone(ckpt)
    loaded_teacher = load_backbone(ckpt, teacher=True)
    assert loaded_student.name == "resnet18"
    assert_same_weights(loaded_student, student)
    assert_same_weights(loaded_teacher, teacher)
    assert not torch.equal(loaded_student.model.conv1.weight, loaded_teacher.model.conv1.weight)
    assert_same_weights(load_backbone(ckpt, backbone="resnet18"), student)  # same name given explicitly


def test_architecture_mismatch_names_both(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    make_pretraining_checkpoint(ckpt, teacher=False)
    with pytest.raises(ValueError, match=r"'resnet18'.*'resnet34'"):
        load_backbone(ckpt, backbone="resnet34")
    plain = tmp_path / "plain.pth"
    torch.save(random_backbone("resnet18", 0).model.state_dict(), plain)
    with pytest.raises(ValueError, match=r"resnet18.*'resnet50'") as info:
        load_backbone(plain, backbone="resnet50")
    assert "missing" in str(info.value) and "shape" in str(info.value)


def test_changed_backbone_kwargs_report_tensor_shapes(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    make_pretraining_checkpoint(ckpt, name="vit_tiny_patch16_224", teacher=False,
                                backbone_kwargs=TINY_VIT)
    with pytest.raises(ValueError, match=r"architecture mismatch.*vit_tiny_patch16_224.*patch_embed.proj.weight"):
        load_backbone(ckpt, backbone_kwargs={"model_kwargs": {"patch_size": 8}})


def test_teacher_requested_but_absent(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    make_pretraining_checkpoint(ckpt, teacher=False)
    with pytest.raises(ValueError, match="no teacher backbone"):
        load_backbone(ckpt, teacher=True)
    plain = tmp_path / "plain.pth"
    torch.save(random_backbone("resnet18", 0).model.state_dict(), plain)
    with pytest.raises(ValueError, match="not an ssl_zoo pre-training checkpoint"):
        load_backbone(plain, backbone="resnet18", teacher=True)


def test_plain_timm_state_dict_with_head_and_ddp_prefix(tmp_path):
    import timm

    torch.manual_seed(0)
    with_head = timm.create_model("resnet18", num_classes=10)
    path = tmp_path / "timm.pth"
    torch.save({"model": {f"module.{k}": v for k, v in with_head.state_dict().items()}}, path)
    loaded = load_backbone(path, backbone="resnet18")
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, with_head.state_dict()[k]), k
    # A torchvision-width ResNet states its architecture in its tensors (blocks per stage, bottlenecks): no name.
    unnamed = load_backbone(path)
    assert unnamed.name == "resnet18"
    for k, v in unnamed.model.state_dict().items():
        assert torch.equal(v, with_head.state_dict()[k]), k
    # A bare ViT does not (its attention heads are not in the shapes): the backbone must be named.
    vit = tmp_path / "vit.pth"
    torch.save(Backbone("vit_tiny_patch16_224", **TINY_VIT).model.state_dict(), vit)
    with pytest.raises(ValueError, match="pass backbone=<timm name>") as info:
        load_backbone(vit)
    assert "embed dim 192, 2 blocks" in str(info.value)  # the guess from the tensors' names and shapes


def test_vit_position_embeddings_resampled_to_a_new_resolution(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    student, _ = make_pretraining_checkpoint(ckpt, name="vit_tiny_patch16_224", teacher=False,
                                             backbone_kwargs=TINY_VIT)
    with pytest.warns(UserWarning, match="resampled"):
        loaded = load_backbone(ckpt, backbone_kwargs={"img_size": 64})
    assert loaded.model.pos_embed.shape == (1, 1 + 16, 192)
    torch.testing.assert_close(loaded.model.pos_embed[:, :1], student.model.pos_embed[:, :1])  # CLS kept
    assert torch.equal(loaded.model.blocks[0].attn.qkv.weight, student.model.blocks[0].attn.qkv.weight)
    assert loaded(torch.randn(1, 3, 64, 64)).shape == (1, 192)


def test_merge_backbone_kwargs_merges_model_kwargs_key_by_key():
    from ssl_zoo.checkpoints import merge_backbone_kwargs

    recorded = {"img_size": 224, "drop_path_rate": 0.1, "model_kwargs": {"init_values": 0.1, "global_pool": "token"}}
    merged = merge_backbone_kwargs(recorded, {"img_size": 32, "model_kwargs": {"global_pool": "avg"}})
    assert merged == {"img_size": 32, "drop_path_rate": 0.1,
                      "model_kwargs": {"init_values": 0.1, "global_pool": "avg"}}
    assert merge_backbone_kwargs(recorded, None) == recorded and recorded["model_kwargs"]["global_pool"] == "token"
