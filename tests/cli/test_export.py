"""Export: timm state dicts load strictly, torchvision models compute the same features, detectron2 names."""

import pickle

import pytest
import timm
import torch
import torchvision

from ssl_zoo.cli.export import export_checkpoint, main, to_detectron2, to_torchvision
from ssl_zoo.models import Backbone
from tests.helpers.pretraining_checkpoints import TINY_VIT

TINY_SWIN = {"img_size": 32, "model_kwargs": {"depths": (1, 1, 1, 1), "embed_dim": 24, "num_heads": (1, 1, 1, 1),
                                              "window_size": 2}}


def _seeded(name: str, seed: int, **kwargs) -> Backbone:
    torch.manual_seed(seed)
    model = Backbone(name, **kwargs).eval()
    with torch.no_grad():
        for buffer_name, buffer in model.named_buffers():
            if buffer_name.endswith(("running_mean", "running_var")):
                buffer.uniform_(0.5, 1.5)  # non-default statistics, so a missed buffer shows
    return model


def _checkpoint(tmp_path, name="resnet18", kwargs=None):
    kwargs = kwargs or {}
    student, teacher = _seeded(name, 0, **kwargs), _seeded(name, 1, **kwargs)
    state = {f"backbone.{k}": v for k, v in student.state_dict().items()}
    state.update({f"teacher_backbone.{k}": v for k, v in teacher.state_dict().items()})
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": state, "hyper_parameters": {"backbone": name, "backbone_kwargs": kwargs or None}}, path)
    return path, student, teacher


@pytest.mark.parametrize("teacher", [False, True])
def test_timm_export_loads_strictly(tmp_path, teacher):
    ckpt, student, other = _checkpoint(tmp_path)
    out = export_checkpoint(ckpt, "timm", tmp_path / "r18.pth", teacher=teacher)
    model = timm.create_model("resnet18", num_classes=0)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    want = (other if teacher else student).model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_timm_export_of_vit_and_safetensors(tmp_path):
    from safetensors.torch import load_file

    ckpt, student, _ = _checkpoint(tmp_path, "vit_tiny_patch16_224", TINY_VIT)
    out = export_checkpoint(ckpt, "timm", tmp_path / "vit.safetensors")
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, depth=2)
    model.load_state_dict(load_file(str(out)), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), student(x))


def test_torchvision_resnet_has_torchvision_keys_and_same_features():
    backbone = _seeded("resnet18", 0)
    state = to_torchvision(backbone)
    tv = torchvision.models.resnet18(weights=None)
    result = tv.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    tv.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tv.eval()(x), backbone(x))


def test_torchvision_vit_maps_fused_qkv_and_gives_the_same_features():
    from torchvision.models.vision_transformer import VisionTransformer

    backbone = _seeded("vit_tiny_patch16_224", 0, **TINY_VIT)
    state = to_torchvision(backbone)
    tv = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=3, hidden_dim=192, mlp_dim=768)
    result = tv.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["heads.head.bias", "heads.head.weight"] and not result.unexpected_keys
    assert torch.equal(state["encoder.layers.encoder_layer_1.self_attention.in_proj_weight"],
                       backbone.model.blocks[1].attn.qkv.weight)
    tv.heads = torch.nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tv.eval()(x), backbone(x), atol=1e-5, rtol=1e-4)


def test_torchvision_export_refuses_swin():
    with pytest.raises(ValueError, match="no torchvision mapping.*swin"):
        to_torchvision(Backbone("swin_tiny_patch4_window7_224", **TINY_SWIN))


def _expected_d2_resnet18_names() -> set[str]:
    """detectron2's ResNet-18 parameter/buffer names, written out from its module layout."""
    bn = ("weight", "bias", "running_mean", "running_var")
    names = {"stem.conv1.weight", *(f"stem.conv1.norm.{b}" for b in bn)}
    for stage in (2, 3, 4, 5):
        for block in (0, 1):
            prefix = f"res{stage}.{block}"
            for conv in ("conv1", "conv2"):
                names |= {f"{prefix}.{conv}.weight", *(f"{prefix}.{conv}.norm.{b}" for b in bn)}
        if stage > 2:
            names |= {f"res{stage}.0.shortcut.weight", *(f"res{stage}.0.shortcut.norm.{b}" for b in bn)}
    return names


def test_detectron2_resnet_names_and_values(tmp_path):
    ckpt, student, _ = _checkpoint(tmp_path)
    out = export_checkpoint(ckpt, "detectron2", tmp_path / "r18.pkl")
    with open(out, "rb") as f:
        obj = pickle.load(f)
    assert obj["__author__"] == "ssl_zoo" and obj["matching_heuristics"] is True
    model = obj["model"]
    assert set(model) == _expected_d2_resnet18_names()
    timm_state = student.model.state_dict()
    pairs = {"stem.conv1.weight": "conv1.weight", "stem.conv1.norm.running_var": "bn1.running_var",
             "res2.1.conv2.norm.weight": "layer1.1.bn2.weight", "res4.0.shortcut.weight": "layer3.0.downsample.0.weight",
             "res5.0.shortcut.norm.running_mean": "layer4.0.downsample.1.running_mean"}
    for d2_name, timm_name in pairs.items():
        assert torch.equal(torch.from_numpy(model[d2_name]), timm_state[timm_name]), d2_name
    # .pth variant: the same layout with tensors
    pth = to_detectron2(student)
    assert set(pth["model"]) == set(model) and isinstance(pth["model"]["stem.conv1.weight"], torch.Tensor)


def test_detectron2_vit_keeps_timm_names_for_matching_heuristics():
    backbone = _seeded("vit_tiny_patch16_224", 0, **TINY_VIT)
    obj = to_detectron2(backbone)
    assert obj["matching_heuristics"] is True
    assert set(obj["model"]) == set(backbone.model.state_dict())


def test_command_line(tmp_path, capsys):
    ckpt, _, teacher = _checkpoint(tmp_path)
    out = tmp_path / "teacher.pth"
    assert main(["--ckpt", str(ckpt), "--to", "torchvision", "--out", str(out), "--teacher"]) == 0
    assert "torchvision.models.resnet18()" in capsys.readouterr().out
    assert torch.equal(torch.load(out, weights_only=True)["layer2.0.conv1.weight"],
                       teacher.model.layer2[0].conv1.weight)
    assert main(["--ckpt", str(tmp_path / "missing.ckpt"), "--to", "timm", "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
