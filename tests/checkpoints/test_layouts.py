"""Public checkpoint layouts load into ssl_zoo backbones through one recogniser (``ssl_zoo.checkpoints.layouts``).

Each test writes a synthetic checkpoint in a published layout (the key names and extra heads the SimSiam,
MoCo v1/v2/v3, DINO, MAE, BEiT, timm and torchvision code save), loads it with ``load_backbone`` and compares
every tensor with the source model; torchvision models are also compared by their forward pass.
"""

import argparse

import pytest
import torch
import torchvision

from ssl_zoo.checkpoints import UnknownCheckpointLayout, load_backbone, recognise
from ssl_zoo.models import Backbone
from tests.helpers.pretraining_checkpoints import TINY_VIT

# A ResNet-18 with one block per stage and narrow stages keeps the files small; the key names are ResNet-18's.
TINY_RESNET = {"model_kwargs": {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16}}


def _random_state(name: str, seed: int, **kwargs) -> dict[str, torch.Tensor]:
    """The timm state dict of a randomly initialised backbone, BN statistics randomised too."""
    torch.manual_seed(seed)
    model = Backbone(name, **kwargs).model
    with torch.no_grad():
        for key, buffer in model.named_buffers():
            if key.endswith(("running_mean", "running_var")):
                buffer.uniform_(0.5, 1.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def resnets():
    return _random_state("resnet18", 0, **TINY_RESNET), _random_state("resnet18", 1, **TINY_RESNET)


@pytest.fixture(scope="module")
def vits():
    return _random_state("vit_tiny_patch16_224", 0, **TINY_VIT), _random_state("vit_tiny_patch16_224", 1, **TINY_VIT)


def _prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v for k, v in state.items()}


def _mlp(prefix: str, dims=(128, 16, 8)) -> dict:
    """A projector / predictor / head MLP under ``prefix`` (what the evaluation must leave out)."""
    out = {}
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        out[f"{prefix}{2 * i}.weight"] = torch.randn(d_out, d_in)
        out[f"{prefix}{2 * i + 1}.running_mean"] = torch.randn(d_out)
    return out


def _load(tmp_path, obj, name, teacher=False, **kwargs) -> dict[str, torch.Tensor]:
    path = tmp_path / "public.pth.tar"
    torch.save(obj, path)
    return load_backbone(path, backbone=name, backbone_kwargs=kwargs or None, teacher=teacher).model.state_dict()


def _assert_equal(loaded: dict, expected: dict) -> None:
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


# ---------------------------------------------------------------------------------------------- ResNet layouts
def test_simsiam_layout_drops_the_projector(tmp_path, resnets):
    student, _ = resnets
    state = {**_prefixed("module.encoder.", student), **_mlp("module.encoder.fc."), **_mlp("module.predictor.")}
    obj = {"epoch": 100, "arch": "resnet18", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}
    _assert_equal(_load(tmp_path, obj, "resnet18", **TINY_RESNET), student)
    converted = recognise(obj)
    assert converted.layout == "simsiam"
    assert "predictor.*" in converted.dropped and "encoder.fc.*" in converted.dropped
    with pytest.raises(ValueError, match="simsiam checkpoint.*holds one model only"):
        _load(tmp_path, obj, "resnet18", teacher=True, **TINY_RESNET)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_moco_layout_student_and_momentum_encoder(tmp_path, resnets, version):
    query, key = resnets
    heads = {}
    for encoder in ("encoder_q", "encoder_k"):
        if version == "v1":  # one linear layer
            heads[f"module.{encoder}.fc.weight"] = torch.randn(8, 128)
            heads[f"module.{encoder}.fc.bias"] = torch.randn(8)
        else:  # MoCo v2's MLP head: fc.0, fc.2
            heads.update(_mlp(f"module.{encoder}.fc."))
    state = {**_prefixed("module.encoder_q.", query), **_prefixed("module.encoder_k.", key), **heads,
             "module.queue": torch.randn(8, 32), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    obj = {"epoch": 200, "arch": "resnet18", "state_dict": state}
    _assert_equal(_load(tmp_path, obj, "resnet18", **TINY_RESNET), query)
    _assert_equal(_load(tmp_path, obj, "resnet18", teacher=True, **TINY_RESNET), key)
    assert recognise(obj).layout == "moco"


def test_mocov3_resnet_layout(tmp_path, resnets):
    base, momentum = resnets
    state = {**_prefixed("module.base_encoder.", base), **_mlp("module.base_encoder.fc."),
             **_prefixed("module.momentum_encoder.", momentum), **_mlp("module.momentum_encoder.fc."),
             **_mlp("module.predictor.", (8, 16, 8))}
    obj = {"epoch": 100, "arch": "resnet18", "state_dict": state, "optimizer": {}, "scaler": {}}
    _assert_equal(_load(tmp_path, obj, "resnet18", **TINY_RESNET), base)
    _assert_equal(_load(tmp_path, obj, "resnet18", teacher=True, **TINY_RESNET), momentum)


def test_torchvision_resnet_state_dict_gives_the_same_features(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=7)
    with torch.no_grad():
        for key, buffer in reference.named_buffers():
            if key.endswith(("running_mean", "running_var")):
                buffer.uniform_(0.5, 1.5)
    path = tmp_path / "resnet_torchvision.pth"
    torch.save(reference.state_dict(), path)  # with its classifier fc
    loaded = load_backbone(path, backbone="resnet18", backbone_kwargs={"model_kwargs": {"layers": [1, 1, 1, 1]}})
    loaded.eval()
    reference.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), reference.eval()(x))
    assert recognise(torch.load(path, weights_only=True)).layout == "timm"


# ---------------------------------------------------------------------------------------------- ViT layouts
def test_mocov3_vit_layout_drops_the_head_projector(tmp_path, vits):
    base, momentum = vits
    state = {**_prefixed("module.base_encoder.", base), **_mlp("module.base_encoder.head.", (192, 16, 8)),
             **_prefixed("module.momentum_encoder.", momentum), **_mlp("module.momentum_encoder.head.", (192, 16, 8)),
             **_mlp("module.predictor.", (8, 16, 8))}
    obj = {"epoch": 300, "arch": "vit_tiny", "state_dict": state}
    _assert_equal(_load(tmp_path, obj, "vit_tiny_patch16_224", **TINY_VIT), base)
    _assert_equal(_load(tmp_path, obj, "vit_tiny_patch16_224", teacher=True, **TINY_VIT), momentum)
    assert recognise(obj).layout == "mocov3"


def test_dino_layout_student_and_teacher(tmp_path, vits):
    student, teacher = vits
    head = {"head.mlp.0.weight": torch.randn(16, 192), "head.last_layer.weight_g": torch.randn(64, 1),
            "head.last_layer.weight_v": torch.randn(64, 16)}
    obj = {"student": {**_prefixed("module.backbone.", student), **_prefixed("module.", head)},  # DDP-wrapped
           "teacher": {**_prefixed("backbone.", teacher), **head},
           "optimizer": {"state": {}}, "epoch": 100,
           "args": argparse.Namespace(arch="vit_tiny", patch_size=16),  # DINO pickles its command line
           "dino_loss": {"center": torch.zeros(1, 64)}}
    _assert_equal(_load(tmp_path, obj, "vit_tiny_patch16_224", **TINY_VIT), student)
    _assert_equal(_load(tmp_path, obj, "vit_tiny_patch16_224", teacher=True, **TINY_VIT), teacher)
    assert recognise(obj).layout == "dino"


def test_mae_layout_drops_the_decoder(tmp_path, vits):
    encoder, _ = vits
    decoder = {"mask_token": torch.randn(1, 1, 16), "decoder_embed.weight": torch.randn(16, 192),
               "decoder_pos_embed": torch.randn(1, 5, 16), "decoder_blocks.0.norm1.weight": torch.randn(16),
               "decoder_norm.weight": torch.randn(16), "decoder_pred.weight": torch.randn(768, 16)}
    obj = {"model": {**encoder, **decoder}, "epoch": 799, "args": argparse.Namespace(model="mae_vit_tiny")}
    _assert_equal(_load(tmp_path, obj, "vit_tiny_patch16_224", **TINY_VIT), encoder)
    converted = recognise(obj)
    assert converted.layout == "mae" and "decoder_embed.*" in converted.dropped


def test_beit_layout_renames_q_v_biases_and_layer_scale(tmp_path):
    layer_scale = {"img_size": 32, "model_kwargs": {"depth": 2, "init_values": 0.1}}
    source = _random_state("vit_tiny_patch16_224", 2, **layer_scale)
    beit = {}
    for key, value in source.items():
        block, _, rest = key.partition(".attn.qkv.bias")
        if rest == "" and key.endswith(".attn.qkv.bias"):
            q, k, v = value.chunk(3)
            source[key] = torch.cat([q, torch.zeros_like(k), v])  # BEiT has no key bias: it is zero
            beit[f"{block}.attn.q_bias"], beit[f"{block}.attn.v_bias"] = q, v
        elif key.endswith((".ls1.gamma", ".ls2.gamma")):
            beit[key.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")] = value
        else:
            beit[key] = value
    beit.update({"mask_token": torch.randn(1, 1, 192), "lm_head.weight": torch.randn(32, 192),
                 "lm_head.bias": torch.randn(32)})
    obj = {"model": beit}
    _assert_equal(_load(tmp_path, obj, "vit_tiny_patch16_224", **layer_scale), source)
    converted = recognise(obj)
    assert converted.layout == "beit" and "blocks.0.attn.q_bias" in converted.state_dict  # timm Beit's names
    assert not any(k.startswith(("mask_token", "lm_head")) for k in converted.state_dict)
    # relative position biases reach a BEiT backbone (tests/eval/test_finetune.py); a plain ViT has none
    beit["blocks.0.attn.relative_position_bias_table"] = torch.zeros(12, 3)
    assert "blocks.0.attn.relative_position_bias_table" in recognise({"model": beit}).state_dict
    with pytest.raises(ValueError, match="relative position bias.*timm BEiT backbone"):
        _load(tmp_path, {"model": beit}, "vit_tiny_patch16_224", **layer_scale)


def test_torchvision_vit_state_dict_gives_the_same_features(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=3,
                                                     hidden_dim=192, mlp_dim=768, num_classes=5)
    path = tmp_path / "vit_torchvision.pth"
    torch.save(reference.state_dict(), path)
    loaded = load_backbone(path, backbone="vit_tiny_patch16_224", backbone_kwargs=TINY_VIT).eval()
    reference.heads = torch.nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), reference.eval()(x), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- errors
def test_unknown_layout_lists_the_key_prefixes_it_found(tmp_path):
    obj = {"epoch": 3, "net": {"stem.conv.weight": torch.randn(4, 3, 3, 3), "stem.bn.weight": torch.randn(4),
                               "classifier.weight": torch.randn(2, 4)}}
    path = tmp_path / "mystery.pth"
    torch.save(obj, path)
    with pytest.raises(UnknownCheckpointLayout, match="mystery.pth.*unknown weight layout") as info:
        load_backbone(path, backbone="resnet18", backbone_kwargs=TINY_RESNET)
    message = str(info.value)
    assert "epoch" in message and "net (tensors)" in message  # the top-level keys
    obj = {"state_dict": {"module.encoder_x.conv.weight": torch.randn(2), "module.queue": torch.randn(2)}}
    with pytest.raises(UnknownCheckpointLayout) as info:
        recognise(obj, source="other.pth")
    assert "module.encoder_x.* (1)" in str(info.value) and "module.queue (1)" in str(info.value)
    # A known wrapper around something that is no backbone: the layout is named and the prefixes listed.
    with pytest.raises(UnknownCheckpointLayout, match=r"simsiam backbone part.*module\.encoder\.\* \(1\)"):
        recognise({"state_dict": {"module.encoder.stem.weight": torch.randn(2)}}, source="s.pth")


# ---------------------------------------------------------------------------------------------- BEiT windows
def _beit_geometric_offsets(src: int, dst: int) -> list[float]:
    """BEiT's source offsets (unilm beit/semantic_segmentation/backbone/beit.py ``init_weights``): the (2k-1)
    offsets of the small window placed on a geometric progression whose half-span reaches the large one's."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** (src // 2)) / (1.0 - q) > dst // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return [-d for d in reversed(dis)] + [0.0] + dis


def test_a_shared_relative_position_table_is_copied_into_each_block_and_interpolated_as_beit_does(tmp_path):
    """MVP's shared table (a 4 x 4 window at 64 px) into BEiT's segmentation layout at 128 px (8 x 8, one table
    per block): each block's table is BEiT's geometric-progression interpolation of the shared one (linear between
    the points, as timm does it; BEiT's code used SciPy's cubic interp2d), the three class-token entries kept."""
    from scipy.interpolate import RegularGridInterpolator

    mvp = {"img_size": 64, "model_kwargs": {"depth": 2, "embed_dim": 96, "num_heads": 3, "init_values": 0.1,
                                            "use_shared_rel_pos_bias": True, "use_rel_pos_bias": False,
                                            "use_abs_pos_emb": False}}
    source = _random_state("beit_base_patch16_224", 3, **mvp)
    shared = source["rel_pos_bias.relative_position_bias_table"]  # [(2*4-1)^2 + 3, heads]
    path = tmp_path / "mvp.pth"
    torch.save({"state_dict": {f"backbone.model.{k}": v for k, v in source.items()},
                "hyper_parameters": {"backbone": "beit_base_patch16_224", "backbone_kwargs": mvp}}, path)
    segmentation = {"img_size": 128, "model_kwargs": {"use_shared_rel_pos_bias": False, "use_rel_pos_bias": True}}
    loaded = load_backbone(path, backbone_kwargs=segmentation).model.state_dict()

    src, dst = 7, 15  # table sides: 2 * window - 1
    offsets = _beit_geometric_offsets(src, dst)
    targets = torch.arange(-(dst // 2), dst // 2 + 1, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(targets, targets, indexing="ij"), dim=-1).reshape(-1, 2).numpy()
    expected = torch.stack([
        torch.from_numpy(RegularGridInterpolator((offsets, offsets), shared[:-3, h].reshape(src, src).double().numpy(),
                                                 bounds_error=False, fill_value=None)(grid))
        for h in range(shared.shape[1])], dim=1).float()
    for block in range(2):
        table = loaded[f"blocks.{block}.attn.relative_position_bias_table"]
        assert table.shape == (dst * dst + 3, shared.shape[1])
        torch.testing.assert_close(table[:-3], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(table[-3:], shared[-3:])  # cls->token, token->cls, cls->cls
