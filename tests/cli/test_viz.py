"""python -m ssl_zoo.cli.viz attention (MVP Figure 3): the CLS attention it draws against a brute-force
softmax(q . k / sqrt(d)) of the last block, for a timm ViT and a BEiT with a shared relative position bias, per
head and averaged over the heads (Figure 3's map)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ssl_zoo.cli.viz import HEADER, cls_attention, colorize, head_averaged_cls_attention, load_images, main
from ssl_zoo.models import Backbone

S = 32  # 2 x 2 patches of 16 px
BEIT = {"depth": 2, "embed_dim": 48, "num_heads": 3, "use_shared_rel_pos_bias": True, "use_rel_pos_bias": False,
        "global_pool": "token"}


def _vit(name: str = "vit_tiny_patch16_224", **model_kwargs) -> Backbone:
    torch.manual_seed(0)
    backbone = Backbone(name, img_size=S, model_kwargs=model_kwargs or {"depth": 2})
    if backbone.family == "beit":
        with torch.no_grad():
            backbone.model.rel_pos_bias.relative_position_bias_table.normal_()
            for block in backbone.model.blocks:  # timm starts these at zero: make k's bias matter too
                block.attn.q_bias.normal_()
                block.attn.v_bias.normal_()
    return backbone.eval()


def brute_force_cls_attention(backbone: Backbone, x: torch.Tensor) -> torch.Tensor:
    """softmax(q_cls . k / sqrt(d) [+ relative position bias]) of the last block from its weights: [B, H, h, w]."""
    model = backbone.model
    block = model.blocks[-1]
    seen = {}
    handle = block.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model.forward_features(x)
    handle.remove()
    attn = block.attn
    tokens = block.norm1(seen["x"])  # [B, T, D]
    heads = attn.num_heads
    b, t, d = tokens.shape
    weight = attn.qkv.weight  # [3D, D]
    if backbone.family == "beit":  # BEiT: q and v biases, no k bias
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    else:
        bias = attn.qkv.bias
    qkv = (tokens @ weight.T + bias).reshape(b, t, 3, heads, d // heads)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # [B, H, T, d]
    logits = q @ k.transpose(-1, -2) / (d // heads) ** 0.5  # [B, H, T, T]
    if backbone.family == "beit":
        logits = logits + model.rel_pos_bias()  # the table indexed by relative position, shared by the blocks
    weights = F.softmax(logits, dim=-1)
    grid = backbone.model.patch_embed.grid_size
    return weights[:, :, 0, backbone.num_prefix_tokens:].reshape(b, heads, *grid)


@pytest.mark.parametrize(("name", "kwargs"), [("vit_tiny_patch16_224", {"depth": 2}), ("beit_base_patch16_224", BEIT)])
def test_cls_attention_equals_brute_force(name, kwargs):
    backbone = _vit(name, **kwargs)
    x = torch.randn(3, 3, S, S)
    fused = backbone.model.blocks[-1].attn.fused_attn
    attention = cls_attention(backbone, x)
    assert backbone.model.blocks[-1].attn.fused_attn == fused  # the model is left as it was
    expected = brute_force_cls_attention(backbone, x)
    assert attention.shape == (3, backbone.model.blocks[-1].attn.num_heads, 2, 2)
    torch.testing.assert_close(attention, expected, rtol=1e-5, atol=1e-6)
    # The CLS row over all tokens sums to 1; over the patches alone it misses the CLS-to-CLS weight.
    assert (attention.flatten(2).sum(-1) < 1).all()
    # An earlier block is drawn on request.
    assert not torch.allclose(cls_attention(backbone, x, block=0), attention)
    backbone.train()  # drawn in eval mode, and the module's own mode is given back
    torch.testing.assert_close(cls_attention(backbone, x), attention)
    assert backbone.training and backbone.model.blocks[-1].training


def brute_force_head_mean_cls_attention(backbone: Backbone, x: torch.Tensor) -> torch.Tensor:
    """MVP Figure 3 from the weights of a plain timm ViT's last block, in float64, one head at a time:
    (1/H) sum_h softmax_j(q_cls^h . k_j^h / sqrt(d)) over all tokens j, kept at the patch tokens: [B, h, w]."""
    model = backbone.model
    block = model.blocks[-1]
    seen = {}
    handle = block.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model.forward_features(x)
    handle.remove()
    tokens = block.norm1(seen["x"]).double()  # [B, T, D]
    heads, (b, t, dim) = block.attn.num_heads, tokens.shape
    d = dim // heads
    weight, bias = block.attn.qkv.weight.double(), block.attn.qkv.bias.double()  # [3D, D], [3D]
    total = torch.zeros(b, t, dtype=torch.float64)
    for head in range(heads):
        rows = slice(head * d, (head + 1) * d)
        q_cls = tokens[:, 0] @ weight[rows].T + bias[rows]  # [B, d]: the CLS query of this head
        k = tokens @ weight[dim:][rows].T + bias[dim:][rows]  # [B, T, d]: its keys
        logits = torch.einsum("bd,btd->bt", q_cls, k) / d**0.5  # [B, T]
        exp = torch.exp(logits - logits.max(-1, keepdim=True).values)
        total += exp / exp.sum(-1, keepdim=True)  # the softmax over all T tokens, CLS included
    mean = total / heads
    return mean[:, backbone.num_prefix_tokens:].reshape(b, *model.patch_embed.grid_size)


def test_head_averaged_cls_attention_equals_brute_force_mean_over_heads():
    backbone = _vit(depth=2, num_heads=3)
    with torch.no_grad():
        for block in backbone.model.blocks:  # timm starts the qkv bias at zero: make it count
            block.attn.qkv.bias.normal_()
    x = torch.randn(3, 3, S, S)
    averaged = head_averaged_cls_attention(backbone, x)
    assert averaged.shape == (3, 2, 2) and averaged.dtype == torch.float32
    expected = brute_force_head_mean_cls_attention(backbone, x)
    torch.testing.assert_close(averaged.double(), expected, rtol=1e-5, atol=1e-6)
    per_head = cls_attention(backbone, x)
    assert not torch.allclose(per_head[:, 0], per_head[:, 1])  # the heads differ: the mean is a real average
    assert (averaged.flatten(1).sum(-1) < 1).all()  # the CLS-to-CLS weight is left out, as in each head's map
    assert not torch.allclose(head_averaged_cls_attention(backbone, x, block=0), averaged)


def _images(tmp_path, sizes=((48, 40), (40, 64))):
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(sizes):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _pretraining_checkpoint(path, backbone: Backbone, kwargs: dict) -> None:
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                "hyper_parameters": {"backbone": backbone.name,
                                     "backbone_kwargs": {"img_size": S, "model_kwargs": kwargs}}}, path)


@pytest.mark.parametrize(("name", "kwargs"), [("vit_tiny_patch16_224", {"depth": 2}), ("beit_base_patch16_224", BEIT)])
def test_attention_png_of_a_pretraining_checkpoint_draws_the_brute_force_attention(name, kwargs, tmp_path):
    backbone = _vit(name, **kwargs)
    ckpt = tmp_path / "last.ckpt"
    _pretraining_checkpoint(ckpt, backbone, kwargs)
    images = _images(tmp_path)
    out = tmp_path / "figs" / "grid.png"
    assert main(["attention", "--ckpt", str(ckpt), "--images", *map(str, images), "--out", str(out)]) == 0
    grid = np.asarray(Image.open(out).convert("RGB"))
    heads = backbone.model.blocks[-1].attn.num_heads
    cell = 112  # max(crop side, 112)
    assert grid.shape == (HEADER + 2 * cell, (1 + heads) * cell, 3)
    crops, batch = load_images(images, S)
    expected = colorize(brute_force_cls_attention(backbone, batch))  # [B, H, 2, 2, 3]
    for row in range(2):
        for head in range(heads):
            tile = grid[HEADER + row * cell : HEADER + (row + 1) * cell, (1 + head) * cell : (2 + head) * cell]
            # each patch is one flat square of its colour (nearest-neighbour enlargement)
            for i in range(2):
                for j in range(2):
                    square = tile[i * cell // 2 : (i + 1) * cell // 2, j * cell // 2 : (j + 1) * cell // 2]
                    assert np.abs(square.astype(int) - expected[row, head, i, j]).max() <= 1, (row, head, i, j)
    # the first column is the input crop
    first = Image.fromarray(grid[HEADER : HEADER + cell, :cell])
    assert np.abs(np.asarray(first, dtype=int) - np.asarray(crops[0].resize((cell, cell), Image.Resampling.BICUBIC),
                                                           dtype=int)).max() <= 1


def test_attention_png_of_a_plain_state_dict_and_a_folder(tmp_path):
    backbone = _vit()
    path = tmp_path / "vit.pth"
    torch.save(backbone.model.state_dict(), path)
    folder = tmp_path / "photos"
    folder.mkdir()
    _images(folder, sizes=((40, 40), (50, 36), (36, 50)))
    out = tmp_path / "attention.png"
    assert main(["attention", "--ckpt", str(path), "--backbone", "vit_tiny_patch16_224", "--img-size", str(S),
                 "--backbone-kwargs", '{"model_kwargs": {"depth": 2}}', "--images", str(folder),
                 "--out", str(out)]) == 0
    assert Image.open(out).size == ((1 + 3) * 112, HEADER + 3 * 112)


def test_average_heads_png_draws_one_brute_force_mean_map_per_image(tmp_path):
    backbone = _vit()
    ckpt = tmp_path / "last.ckpt"
    _pretraining_checkpoint(ckpt, backbone, {"depth": 2})
    images = _images(tmp_path)
    out = tmp_path / "figure3.png"
    assert main(["attention", "--ckpt", str(ckpt), "--images", *map(str, images), "--out", str(out),
                 "--average-heads"]) == 0
    grid = np.asarray(Image.open(out).convert("RGB"))
    cell = 112
    assert grid.shape == (HEADER + 2 * cell, 2 * cell, 3)  # the image, then one map
    _, batch = load_images(images, S)
    expected = colorize(brute_force_head_mean_cls_attention(backbone, batch))  # [B, 2, 2, 3]
    for row in range(2):
        tile = grid[HEADER + row * cell : HEADER + (row + 1) * cell, cell : 2 * cell]
        for i in range(2):
            for j in range(2):
                square = tile[i * cell // 2 : (i + 1) * cell // 2, j * cell // 2 : (j + 1) * cell // 2]
                assert np.abs(square.astype(int) - expected[row, i, j]).max() <= 1, (row, i, j)


def test_attention_errors_are_clear(tmp_path, capsys):
    resnet = Backbone("resnet18")
    with pytest.raises(ValueError, match="need a ViT or BEiT"):
        cls_attention(resnet, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="block 5 does not exist"):
        cls_attention(_vit(), torch.randn(1, 3, S, S), block=5)
    path = tmp_path / "vit.pth"
    torch.save(_vit().model.state_dict(), path)
    (tmp_path / "not_an_image.png").write_text("hello")
    assert main(["attention", "--ckpt", str(path), "--images", str(tmp_path / "missing.png")]) == 2
    assert "pass backbone=<timm name>" in capsys.readouterr().err
    assert main(["attention", "--ckpt", str(path), "--backbone", "vit_tiny_patch16_224", "--img-size", str(S),
                 "--backbone-kwargs", '{"model_kwargs": {"depth": 2}}', "--images",
                 str(tmp_path / "not_an_image.png")]) == 2
    assert "cannot read" in capsys.readouterr().err
