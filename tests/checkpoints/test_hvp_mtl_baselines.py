"""The published baselines of experiments/hvp_mtl/tables.yaml that the converter loads, in the layouts their files
use (MoCo v3, DINO and MAE ViTs: tests/checkpoints/test_official_checkpoints.py), and the one it refuses:

* SimMIM's ViT-B (``{'model': {'encoder.*' BEiT names, shared relative position bias, mask_token, 'decoder.*'}}``)
  into timm's BEiT with mean pooling, as Table 1's SimMIM row evaluates it;
* timm's republished Swin-B (timm names, a 21,841-class ImageNet-22K head) into the headless Swin backbone of
  Tables 2-4's supervised rows;
* Microsoft's own Swin files (patch merging at the end of a stage, saved index buffers), refused by name: why
  Table 2 leaves SimMIM's Swin-B out and the supervised rows name timm's copies.

Models are two-block / one-block-per-stage versions of the same layouts, so the file runs in seconds.
"""

from __future__ import annotations

import re

import pytest
import timm
import torch

from ssl_zoo.checkpoints import backbone_from_weights, read_backbone_weights

BEIT_SMALL = {"depth": 2, "embed_dim": 192, "num_heads": 3}
SWIN_SMALL = {"depths": (1, 1, 1, 1), "embed_dim": 32, "num_heads": (1, 2, 4, 8)}


def _load(path, backbone: str, model_kwargs: dict):
    return backbone_from_weights(read_backbone_weights(path), backbone, {"model_kwargs": model_kwargs})


def test_simmim_vit_loads_into_beit_with_a_shared_bias_copied_into_every_block(tmp_path):
    torch.manual_seed(0)
    # SimMIM's pre-training ViT (config.py: USE_SHARED_RPB, no absolute position embedding, layer scale 0.1, final
    # norm) is timm's BEiT with a shared relative position bias and class-token pooling.
    encoder = timm.create_model("beit_base_patch16_224", num_classes=0, use_shared_rel_pos_bias=True,
                                use_rel_pos_bias=False, global_pool="token", **BEIT_SMALL).state_dict()
    encoder = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in encoder.items()}
    saved = {**{f"encoder.{k}": v for k, v in encoder.items()},
             "encoder.rel_pos_bias.relative_position_index": torch.zeros(197, 197, dtype=torch.long),
             "encoder.mask_token": torch.zeros(1, 1, 192),
             "decoder.0.weight": torch.zeros(768, 192, 1, 1), "decoder.0.bias": torch.zeros(768)}
    torch.save({"model": saved}, tmp_path / "simmim.pth")
    # Table 1's SimMIM row: finetune_vitb_hvp_simmim.yaml (mean pooling) with backbone beit_base_patch16_224.
    model = _load(tmp_path / "simmim.pth", "beit_base_patch16_224", {**BEIT_SMALL, "global_pool": "avg"}).model
    loaded = model.state_dict()
    table = encoder["rel_pos_bias.relative_position_bias_table"]
    for i in range(BEIT_SMALL["depth"]):
        torch.testing.assert_close(loaded[f"blocks.{i}.attn.relative_position_bias_table"], table)
        for name in ("attn.qkv.weight", "attn.q_bias", "attn.v_bias", "gamma_1", "mlp.fc2.weight"):
            torch.testing.assert_close(loaded[f"blocks.{i}.{name}"], encoder[f"blocks.{i}.{name}"])
    torch.testing.assert_close(loaded["patch_embed.proj.weight"], encoder["patch_embed.proj.weight"])
    assert isinstance(model.norm, torch.nn.Identity) and "fc_norm.weight" in loaded  # fresh norm after the mean


def _swin(**kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = timm.create_model("swin_tiny_patch4_window7_224", **SWIN_SMALL, **kwargs).state_dict()
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}


def test_timm_republished_swin_loads_without_its_imagenet22k_head(tmp_path):
    state = _swin(num_classes=21841)
    torch.save(state, tmp_path / "swin_in22k.pth")
    model = _load(tmp_path / "swin_in22k.pth", "swin_tiny_patch4_window7_224", SWIN_SMALL).model
    loaded = model.state_dict()
    assert not any(k.startswith("head.fc") for k in loaded)
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


def test_microsoft_swin_layout_is_refused_by_name(tmp_path):
    """Microsoft's files (and SimMIM's Swin under 'encoder.') merge patches at the end of stage i
    (``layers.i.downsample``), where timm's Swin does it at the start of stage i + 1, and save their
    relative_position_index buffers: a strict load names the mismatch rather than loading shifted weights."""
    original = {}
    for key, value in _swin(num_classes=1000).items():
        key = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        original[key.replace("head.fc.", "head.")] = value
    for stage in range(4):
        original[f"layers.{stage}.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    torch.save({"model": original}, tmp_path / "swin_base_patch4_window7_224.pth")
    with pytest.raises(ValueError, match=r"architecture mismatch.*missing: layers\.\d\.downsample"):
        _load(tmp_path / "swin_base_patch4_window7_224.pth", "swin_tiny_patch4_window7_224", SWIN_SMALL)
