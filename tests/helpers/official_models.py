"""Small re-writings of the official model code behind the public checkpoint layouts, for tests only.

Each class computes what the named official file computes (same parameter names, so its ``state_dict`` has the
official keys), written compactly here because those repositories are not installable packages. Installed
official code is used as it is instead: torchvision (ResNets, ViT, which SimSiam and MoCo build on) and
open_clip (OpenAI CLIP). Sources:

* DINO: facebookresearch/dino ``vision_transformer.py`` (its own ViT: ``prepare_tokens``, norm, CLS output);
* MoCo v3: facebookresearch/moco-v3 ``vits.py`` (a timm ViT with a fixed 2-D sin-cos position embedding) and
  ``moco/builder.py`` (``MoCo_ViT``: the classifier replaced by a projector MLP, plus a predictor);
* MAE: facebookresearch/mae ``models_vit.py`` (a timm ViT; ``global_pool`` averages the patch tokens into
  ``fc_norm``, else the normed CLS token);
* BEiT / BEiT v2: microsoft/unilm ``beit/modeling_finetune.py`` and ``modeling_pretrain.py``, ``beit2/
  modeling_pretrain.py`` (q / v biases, layer scale ``gamma_1/2``, relative position bias shared or per block,
  BEiT v2's CLS-pretraining blocks ``cls_pt_layers``).
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import Tensor, nn
from torch.nn import functional as F

LN6 = partial(nn.LayerNorm, eps=1e-6)


# ---------------------------------------------------------------------------------------------- DINO
class DinoAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class DinoMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DinoBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = LN6(dim), DinoAttention(dim, num_heads)
        self.norm2, self.mlp = LN6(dim), DinoMlp(dim, 4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DinoPatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoViT(nn.Module):
    """DINO's ``VisionTransformer``: ``vit_small`` is width 384 with 6 heads, ``vit_base`` 768 with 12."""

    def __init__(self, img_size: int = 32, patch: int = 16, dim: int = 384, depth: int = 2, num_heads: int = 6):
        super().__init__()
        self.patch_embed = DinoPatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (img_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(DinoBlock(dim, num_heads) for _ in range(depth))
        self.norm = LN6(dim)
        self.head = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


class DinoHead(nn.Module):
    """DINO's projection head (its keys only matter: the converter drops them)."""

    def __init__(self, dim: int, out: int = 32) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Linear(16, 8))
        self.last_layer = nn.Linear(8, out, bias=False)


class MultiCropWrapper(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head


# ---------------------------------------------------------------------------------------------- MoCo v3
class VisionTransformerMoCo(TimmVisionTransformer):
    """moco-v3 ``vits.py``: timm's ViT with a fixed 2-D sin-cos position embedding (zero for the CLS token)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        h, w = self.patch_embed.grid_size
        grid_w, grid_h = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                                        indexing="ij")
        pos_dim = self.embed_dim // 4
        omega = 1.0 / (10000.0 ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim))
        out_w, out_h = grid_w.flatten()[:, None] * omega, grid_h.flatten()[:, None] * omega
        pos = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)[None]
        self.pos_embed = nn.Parameter(torch.cat([torch.zeros(1, 1, self.embed_dim), pos], dim=1), requires_grad=False)


def mocov3_vit_small(img_size: int = 32, depth: int = 2) -> VisionTransformerMoCo:
    """``vits.vit_small``: patch 16, width 384, **12 heads**, LayerNorm eps 1e-6 (depth shortened for tests)."""
    return VisionTransformerMoCo(img_size=img_size, patch_size=16, embed_dim=384, depth=depth, num_heads=12,
                                 mlp_ratio=4, qkv_bias=True, norm_layer=LN6, num_classes=384)


def mlp(dims: tuple[int, ...], last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's ``_build_mlp``: Linear + BN + ReLU, the last layer with an affine-free BN."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < len(dims) - 2:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


class MoCoV3(nn.Module):
    """moco-v3 ``builder.py``: base and momentum encoders with the classifier replaced by a projector."""

    def __init__(self, make_encoder, head_name: str, dim: int = 16) -> None:
        super().__init__()
        self.base_encoder, self.momentum_encoder = make_encoder(), make_encoder()
        for encoder in (self.base_encoder, self.momentum_encoder):
            hidden = getattr(encoder, head_name).weight.shape[1]
            setattr(encoder, head_name, mlp((hidden, 32, dim)))
        self.predictor = mlp((dim, 32, dim), last_bn=False)


# ---------------------------------------------------------------------------------------------- MAE
class MaeVisionTransformer(TimmVisionTransformer):
    """mae ``models_vit.py``: with ``global_pool`` the mean of the patch tokens goes through ``fc_norm`` (the
    final ``norm`` deleted), else the CLS token through ``norm``."""

    def __init__(self, global_pool: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mae_global_pool = global_pool
        if global_pool:
            self.fc_norm = kwargs["norm_layer"](kwargs["embed_dim"])
            del self.norm

    def features(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.fc_norm(x[:, 1:].mean(dim=1)) if self.mae_global_pool else self.norm(x)[:, 0]


def mae_vit_base(img_size: int = 32, depth: int = 1, global_pool: bool = False) -> MaeVisionTransformer:
    """``models_vit.vit_base_patch16``: width 768, 12 heads (depth shortened for tests)."""
    return MaeVisionTransformer(global_pool=global_pool, img_size=img_size, patch_size=16, embed_dim=768,
                                depth=depth, num_heads=12, mlp_ratio=4, qkv_bias=True, norm_layer=LN6)


# ---------------------------------------------------------------------------------------------- BEiT
def relative_position_index(window: tuple[int, int]) -> Tensor:
    """BEiT's index into its table: (2h-1)(2w-1) token-to-token offsets, then cls->token, token->cls, cls->cls."""
    h, w = window
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += h - 1
    rel[:, :, 1] += w - 1
    rel[:, :, 0] *= 2 * w - 1
    n = (2 * h - 1) * (2 * w - 1) + 3
    index = torch.zeros((h * w + 1,) * 2, dtype=rel.dtype)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:], index[0:, 0], index[0, 0] = n - 3, n - 2, n - 1
    return index


class RelativePositionBias(nn.Module):
    def __init__(self, window: tuple[int, int], num_heads: int) -> None:
        super().__init__()
        self.window = window
        self.relative_position_bias_table = nn.Parameter(
            torch.randn((2 * window[0] - 1) * (2 * window[1] - 1) + 3, num_heads) * 0.1)
        self.register_buffer("relative_position_index", relative_position_index(window))

    def forward(self) -> Tensor:
        n = self.window[0] * self.window[1] + 1
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous()


class BeitAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: tuple[int, int] | None) -> None:
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(dim) * 0.1), nn.Parameter(torch.randn(dim) * 0.1)
        self.rel = RelativePositionBias(window, num_heads) if window else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rel_pos_bias: Tensor | None = None) -> Tensor:
        b, n, _ = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.rel is not None:
            attn = attn + self.rel().unsqueeze(0)
        if rel_pos_bias is not None:
            attn = attn + rel_pos_bias
        return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1))


class BeitBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: tuple[int, int] | None, init_values: float) -> None:
        super().__init__()
        self.norm1, self.attn = LN6(dim), BeitAttention(dim, num_heads, window)
        self.norm2, self.mlp = LN6(dim), DinoMlp(dim, 4 * dim)
        self.gamma_1 = nn.Parameter(init_values * torch.ones(dim) + torch.randn(dim) * 0.01)
        self.gamma_2 = nn.Parameter(init_values * torch.ones(dim) + torch.randn(dim) * 0.01)

    def forward(self, x: Tensor, rel_pos_bias: Tensor | None = None) -> Tensor:
        x = x + self.gamma_1 * self.attn(self.norm1(x), rel_pos_bias=rel_pos_bias)
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class BeitViT(nn.Module):
    """BEiT's ViT. ``pretraining=True``: ``modeling_pretrain.VisionTransformerForMaskedImageModeling`` (one shared
    relative position table, no absolute embedding, ``mask_token``, ``norm``, ``lm_head``; ``cls_pt_layers`` adds
    BEiT v2's CLS-pretraining blocks); else ``modeling_finetune.VisionTransformer`` (one table per block, mean
    pooling into ``fc_norm``, a classifier)."""

    def __init__(self, img_size: int = 32, dim: int = 768, depth: int = 1, num_heads: int = 12,
                 pretraining: bool = True, cls_pt_layers: int = 0, init_values: float = 0.1) -> None:
        super().__init__()
        window = (img_size // 16, img_size // 16)
        self.pretraining = pretraining
        self.patch_embed = DinoPatchEmbed(16, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = None
        self.rel_pos_bias = RelativePositionBias(window, num_heads) if pretraining else None
        per_block = None if pretraining else window
        self.blocks = nn.ModuleList(BeitBlock(dim, num_heads, per_block, init_values) for _ in range(depth))
        if pretraining:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.norm = LN6(dim)
            self.lm_head = nn.Linear(dim, 64)
            if cls_pt_layers:
                self.cls_pt_layers = nn.ModuleList(BeitBlock(dim, num_heads, None, init_values)
                                                   for _ in range(cls_pt_layers))
        else:
            self.fc_norm = LN6(dim)
            self.head = nn.Linear(dim, 10)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pre-training: every token after ``norm`` ``[B, 1+N, D]``; fine-tuning: ``fc_norm`` of the patch mean."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        shared = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for block in self.blocks:
            x = block(x, rel_pos_bias=shared)
        return self.norm(x) if self.pretraining else self.fc_norm(x[:, 1:].mean(1))


def beit_state_dict(model: BeitViT) -> dict[str, Tensor]:
    """The keys BEiT's code saves: the per-block table directly under ``attn.`` (``attn.rel.*`` here)."""
    return {k.replace("attn.rel.", "attn."): v for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- saved files
IMG = 32  # a 2 x 2 patch grid keeps every model small; the 768-wide ones have one block


def seeded_images(seed: int = 0, size: int = IMG) -> Tensor:
    """Two seeded random images ``[2, 3, size, size]``."""
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_features_close(ours: Tensor, theirs: Tensor) -> None:
    """Our features against the official forward pass, to 1e-5."""
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def ddp_state_dict(state: dict) -> dict:
    """What ``DistributedDataParallel(model).state_dict()`` saves: every key under ``module.``."""
    return {f"module.{k}": v for k, v in state.items()}


def timm_pre_logits(model: nn.Module, x: Tensor) -> Tensor:
    """A timm model's features before its classifier, in eval mode."""
    model.eval()
    return model.forward_head(model.forward_features(x), pre_logits=True)


def mocov3_vit_small_file(tmp_path) -> tuple[MoCoV3, str]:
    """A MoCo v3 ViT-S saved as moco-v3's ``main_moco.py`` saves it (DDP keys), in ``tmp_path``; and its path."""
    torch.manual_seed(1)
    model = MoCoV3(mocov3_vit_small, "head")
    path = tmp_path / "vit-s-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": ddp_state_dict(model.state_dict()), "optimizer": {},
                "scaler": {}}, path)
    return model, str(path)
