"""Backbone adapter: shapes per family, masking semantics, gradients, local checkpoints, clear errors."""

import pytest
import timm
import torch

from ssl_zoo.models import Backbone, MLPHead
from tests.helpers.pretraining_checkpoints import BEIT_PRETRAIN

SMALL = {
    "resnet18": {},
    "vit_tiny_patch16_224": {"img_size": 64},
    "beit_base_patch16_224": {"img_size": 64, "model_kwargs": BEIT_PRETRAIN},
    "swin_tiny_patch4_window7_224": {"img_size": 64, "model_kwargs": {"window_size": 2}},
}


@pytest.fixture(scope="module")
def backbones():
    torch.manual_seed(0)
    models = {name: Backbone(name, **kw).eval() for name, kw in SMALL.items()}
    with torch.no_grad():  # timm starts relative position biases at zero; random ones make them matter
        models["beit_base_patch16_224"].model.rel_pos_bias.relative_position_bias_table.normal_(std=0.5)
    return models


@pytest.mark.parametrize("name", list(SMALL))
def test_feature_views_shapes(backbones, name):
    b = backbones[name]
    x = torch.randn(2, 3, 64, 64)
    pooled = b(x)
    fmap = b.forward_map(x)
    assert pooled.shape == (2, b.num_features)
    assert fmap.shape[:2] == (2, b.num_features)
    assert fmap.shape[2] == fmap.shape[3] == 64 // b.output_stride
    assert torch.isfinite(pooled).all() and torch.isfinite(fmap).all()
    # num_features agrees with timm's own classifier-free model.
    assert b.num_features == timm.create_model(name, num_classes=0, **{k: v for k, v in SMALL[name].items()
                                                                      if k == "img_size"}
                                               | SMALL[name].get("model_kwargs", {})).num_features


def test_vit_tokens_and_map_agree(backbones):
    b = backbones["vit_tiny_patch16_224"]
    x = torch.randn(2, 3, 64, 64)
    tokens = b.forward_tokens(x)
    assert tokens.shape == (2, 1 + 16, b.num_features)
    # forward_tokens reproduces timm's forward_features exactly when nothing is masked.
    torch.testing.assert_close(tokens, b.forward_features(x))
    fmap = b.forward_map(x)
    # map cell (i, j) is patch token 1 + i*w + j
    torch.testing.assert_close(fmap[:, :, 1, 2], tokens[:, 1 + 1 * 4 + 2])
    # the pooled embedding is timm's pre-logits (CLS token for this model)
    torch.testing.assert_close(b(x), b.model.forward_head(tokens, pre_logits=True))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "beit_base_patch16_224", "swin_tiny_patch4_window7_224"])
def test_masked_patches_carry_the_mask_token(backbones, name):
    b = backbones[name]
    x = torch.randn(1, 3, 64, 64)
    h, w = b.patch_grid(64)
    token = torch.randn(b.embed_dim)
    mask = torch.zeros(1, h, w, dtype=torch.bool)
    mask[0, 0, 0] = True
    # The embedding of the masked patch is replaced: changing that patch's pixels changes nothing.
    x2 = x.clone()
    p = b.patch_size
    x2[..., :p, :p] = torch.randn(3, p, p)
    out1, out2 = b.forward_map(x, mask, token), b.forward_map(x2, mask, token)
    torch.testing.assert_close(out1, out2)
    # Without the mask the same pixel change does change the output.
    assert not torch.allclose(b.forward_map(x), b.forward_map(x2))
    # And the mask token itself matters. Another direction, not token + c: a pre-norm transformer with a final
    # LayerNorm cannot see a constant added to every channel, so that check passed only by rounding noise.
    other = token.flip(0) * 2.0
    assert (out1 - b.forward_map(x, mask, other)).abs().max() > 1e-3


def test_beit_pretraining_layout_and_public_attributes(backbones):
    b = backbones["beit_base_patch16_224"]
    m = b.model
    assert (b.name, b.family) == ("beit_base_patch16_224", "beit")
    assert b.num_features == b.embed_dim == 192 and b.patch_size == 16 and b.output_stride == 16
    assert b.patch_grid(64) == (4, 4) and b.num_prefix_tokens == 1
    assert m.pos_embed is None  # no absolute position embedding
    assert m.rel_pos_bias is not None  # one shared table ...
    assert all(block.attn.relative_position_bias_table is None for block in m.blocks)  # ... and none per block
    x = torch.randn(2, 3, 64, 64)
    tokens = b.forward_tokens(x)
    assert tokens.shape == (2, 1 + 16, 192)
    torch.testing.assert_close(b(x), tokens[:, 0])  # pooled = CLS token after the final norm
    torch.testing.assert_close(b.forward_map(x)[:, :, 2, 3], tokens[:, 1 + 2 * 4 + 3])


def test_beit_masked_forward_with_no_patch_masked_equals_the_plain_forward(backbones):
    b = backbones["beit_base_patch16_224"]
    x = torch.randn(2, 3, 64, 64)
    plain = b.model.forward_features(x)  # timm's own forward
    torch.testing.assert_close(b.forward_tokens(x), plain)
    nothing = torch.zeros(2, 4, 4, dtype=torch.bool)
    torch.testing.assert_close(b.forward_tokens(x, nothing, torch.randn(192)), plain)


def test_beit_masked_forward_replaces_exactly_the_masked_patch_embeddings(backbones):
    """Brute force: timm's own forward with the masked patch embeddings overwritten by the token."""
    b = backbones["beit_base_patch16_224"]
    x = torch.randn(2, 3, 64, 64)
    token = torch.randn(192)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 0, :3] = True
    mask[1, 2:, 1:3] = True

    def overwrite(_module, _inputs, embeddings):  # [B, N, D] patch embeddings
        out = embeddings.clone()
        out[mask.flatten(1)] = token
        return out

    handle = b.model.patch_embed.register_forward_hook(overwrite)
    try:
        expected = b.model.forward_features(x)
    finally:
        handle.remove()
    masked = b.forward_tokens(x, mask, token)
    torch.testing.assert_close(masked, expected)
    # Every token position changes (attention mixes all), but only through the masked embeddings:
    # new pixels under masked patches change nothing, new pixels under a visible patch change the output.
    assert not torch.allclose(masked, b.forward_tokens(x))
    x_masked_patch, x_visible_patch = x.clone(), x.clone()
    x_masked_patch[0, :, :16, :16] = torch.randn(3, 16, 16)  # patch (0, 0) of image 0 is masked
    x_visible_patch[0, :, 48:, 48:] = torch.randn(3, 16, 16)  # patch (3, 3) of image 0 is visible
    torch.testing.assert_close(b.forward_tokens(x_masked_patch, mask, token), masked)
    assert not torch.allclose(b.forward_tokens(x_visible_patch, mask, token)[0], masked[0])
    # Without absolute position embeddings a masked token still knows where it is (relative position bias):
    # its output differs between two masked positions.
    assert not torch.allclose(masked[0, 1], masked[0, 2])


def test_vit_masked_tokens_equal_a_forward_written_from_public_attributes(backbones):
    """The masked ViT forward against one written out by hand: patch embeddings with the masked ones overwritten
    by the token, CLS prepended, absolute position embeddings added, blocks, final norm (BEiT Eq. 1)."""
    b = backbones["vit_tiny_patch16_224"]
    m = b.model
    x, token = torch.randn(2, 3, 64, 64), torch.randn(192)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 1, :2] = True
    mask[1, 3, 3] = True
    with torch.no_grad():
        patches = m.patch_embed(x)  # [B, 16, D]
        patches[mask.flatten(1)] = token
        tokens = torch.cat([m.cls_token.expand(2, -1, -1), patches], dim=1) + m.pos_embed  # [B, 1+16, D]
        expected = m.norm(m.blocks(tokens))
    torch.testing.assert_close(b.forward_tokens(x, mask, token), expected)
    torch.testing.assert_close(b.forward_map(x, mask, token)[:, :, 1, 0], expected[:, 1 + 1 * 4 + 0])


def test_unmasked_maps_are_timms_last_stage_features(backbones):
    x = torch.randn(2, 3, 64, 64)
    resnet, swin = backbones["resnet18"], backbones["swin_tiny_patch4_window7_224"]
    torch.testing.assert_close(resnet.forward_map(x), resnet.model.forward_features(x))  # C5
    torch.testing.assert_close(swin.forward_map(x), swin.model.forward_features(x).permute(0, 3, 1, 2))


def test_mask_shape_mismatch_is_clear(backbones):
    b = backbones["vit_tiny_patch16_224"]
    with pytest.raises(ValueError, match="patch grid"):
        b.forward_tokens(torch.randn(1, 3, 64, 64), torch.zeros(1, 3, 3, dtype=torch.bool), torch.zeros(192))
    with pytest.raises(ValueError, match="ResNet"):
        backbones["resnet18"].forward_map(torch.randn(1, 3, 64, 64), torch.zeros(1, 2, 2, dtype=torch.bool))


@pytest.mark.parametrize("name", list(SMALL))
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    b = Backbone(name, **SMALL[name])
    head = MLPHead(b.num_features, [32], 16, last_norm=True)
    loss = head(b(torch.randn(4, 3, 64, 64))).pow(2).mean() + b.forward_map(torch.randn(4, 3, 64, 64)).mean()
    loss.backward()
    missing = [n for n, p in b.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_local_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    src = Backbone("resnet18")
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": src.model.state_dict()}, path)
    dst = Backbone("resnet18", pretrained=str(path))
    for (k, v), (k2, v2) in zip(src.model.state_dict().items(), dst.model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    with pytest.raises(ValueError, match="do not match"):
        Backbone("vit_tiny_patch16_224", pretrained=str(path), img_size=64)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        Backbone("resnet18", pretrained=str(tmp_path / "missing.pth"))


def test_unknown_or_unsupported_backbone():
    with pytest.raises(ValueError, match="not a timm model"):
        Backbone("no_such_net_42")
    with pytest.raises(ValueError, match="supports the timm ResNet"):
        Backbone("mobilenetv3_small_050")


