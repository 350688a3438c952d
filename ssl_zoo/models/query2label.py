"""Query2Label multi-label decoder (Liu et al. 2021), the classification head of HVP-MTL (Eq. 1).

C learnable label embeddings ``Q0 [C, d]`` are the queries of a standard transformer decoder whose memory is
the backbone's last feature map projected to ``d`` channels; every query pools the image regions relevant to
its class by cross-attention. The ``C`` output tokens ``h [B, C, d]`` are classified one by one by a
group-wise linear layer, ``logit_c = <h_c, w_c> + b_c``.

Cost note: the decoder's self-attention is quadratic and its feed-forward linear in ``C``. With the 11,166
classes of Tencent ML-Images, ``d = 512`` and two layers, the head costs several times the Swin-B encoder per
image; PyTorch's fused attention (``need_weights=False``, used by ``nn.TransformerDecoderLayer``) keeps its
memory linear in ``C`` on GPUs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["GroupWiseLinear", "Query2LabelDecoder", "sine_position_embedding_2d"]


class GroupWiseLinear(nn.Module):
    """One linear classifier per class applied to that class's token: ``logit_c = <h_c, w_c> + b_c``.

    Args:
        num_classes: ``C``.
        dim: ``d``, the width of each class token.
        bias: learn ``b [C]``.
    """

    def __init__(self, num_classes: int, dim: int, bias: bool = True) -> None:
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be >= 1, got {num_classes} and {dim}")
        self.num_classes = num_classes
        self.dim = dim
        self.weight = nn.Parameter(torch.empty(num_classes, dim))  # [C, d]
        self.bias = nn.Parameter(torch.empty(num_classes)) if bias else None  # [C]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The fan-in initialisation of nn.Linear, applied per class.
        bound = 1.0 / math.sqrt(self.dim)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, h: Tensor) -> Tensor:
        """``h: [B, C, d]`` -> logits ``[B, C]``."""
        if h.shape[-2:] != self.weight.shape:
            raise ValueError(f"expected class tokens [B, {self.num_classes}, {self.dim}], got {tuple(h.shape)}")
        logits = (h * self.weight).sum(dim=-1)  # [B, C]
        return logits + self.bias if self.bias is not None else logits

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, bias={self.bias is not None}"


def sine_position_embedding_2d(height: int, width: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 2-D sine/cosine position code ``[height * width, dim]`` in row-major order, as DETR uses.

    Half of the channels encode the row, half the column; coordinates are normalised to ``(0, 2*pi]`` so the
    code does not depend on the resolution of the feature map.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sine position code needs dim divisible by 4, got {dim}")
    scale = 2.0 * math.pi
    ys = (torch.arange(1, height + 1, dtype=torch.float32) / height) * scale  # [H]
    xs = (torch.arange(1, width + 1, dtype=torch.float32) / width) * scale  # [W]
    quarter = dim // 4
    freqs = temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # [d/4]
    pos_y = ys[:, None] / freqs  # [H, d/4]
    pos_x = xs[:, None] / freqs  # [W, d/4]
    code_y = torch.cat([pos_y.sin(), pos_y.cos()], dim=1)  # [H, d/2]
    code_x = torch.cat([pos_x.sin(), pos_x.cos()], dim=1)  # [W, d/2]
    grid = torch.cat(
        [code_y[:, None, :].expand(height, width, -1), code_x[None, :, :].expand(height, width, -1)], dim=-1
    )  # [H, W, d]
    return grid.reshape(height * width, dim)


class Query2LabelDecoder(nn.Module):
    """Input projection + label-query transformer decoder + group-wise linear classifier (Query2Label).

    ``feature_map [B, d0, H, W]`` -> memory ``[B, H*W, d]`` (linear projection, plus a fixed 2-D sine position
    code) -> ``nn.TransformerDecoder`` with the label embeddings ``Q0 [C, d]`` as target -> class tokens
    ``h [B, C, d]`` -> logits ``[B, C]``.

    Departure from Query2Label: DETR/Q2L add the position code to the attention keys only; ``nn.Transformer``
    has no such hook, so it is added to the memory (keys and values), as in ViT-style absolute embeddings.

    Args:
        in_dim: ``d0``, channels of the backbone feature map.
        num_classes: ``C``, number of label queries.
        dim: ``d``, width of the decoder.
        num_layers: decoder layers (2).
        num_heads: attention heads; must divide ``dim``.
        ffn_dim: hidden width of each layer's feed-forward block.
        dropout: dropout inside the decoder layers.
        position_embedding: add the 2-D sine position code to the memory.
        classifier: build the group-wise linear classifier; ``False`` when only the class tokens are needed
            (HVP-MTL's distillation without the multi-label loss).
        norm_first: pre-norm decoder layers (post-norm, as in DETR/Q2L, by default).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        dim: int = 512,
        num_layers: int = 2,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        position_embedding: bool = True,
        classifier: bool = True,
        norm_first: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if position_embedding and dim % 4:
            raise ValueError(f"dim must be divisible by 4 for the 2-D sine position code, got {dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.in_dim = in_dim
        self.num_classes = num_classes
        self.dim = dim
        self.position_embedding = position_embedding

        self.input_proj = nn.Linear(in_dim, dim)  # F0 -> d (Q2L's 1x1 convolution)
        self.query_embed = nn.Parameter(torch.empty(num_classes, dim))  # Q0: one learnable query per label
        nn.init.normal_(self.query_embed, std=1.0)  # nn.Embedding's initialisation, as in Q2L
        layer = nn.TransformerDecoderLayer(
            dim, num_heads, dim_feedforward=ffn_dim, dropout=dropout, batch_first=True, norm_first=norm_first
        )
        self.decoder = nn.TransformerDecoder(layer, num_layers, norm=nn.LayerNorm(dim))
        self.classifier = GroupWiseLinear(num_classes, dim) if classifier else None

    def memory(self, feature_map: Tensor) -> Tensor:
        """Backbone map ``[B, d0, H, W]`` -> decoder memory ``[B, H*W, d]``."""
        if feature_map.ndim != 4 or feature_map.shape[1] != self.in_dim:
            raise ValueError(f"expected a feature map [B, {self.in_dim}, H, W], got {tuple(feature_map.shape)}")
        _, _, h, w = feature_map.shape
        tokens = self.input_proj(feature_map.flatten(2).transpose(1, 2))  # [B, H*W, d]
        if self.position_embedding:
            pos = sine_position_embedding_2d(h, w, self.dim).to(tokens)  # [H*W, d]
            tokens = tokens + pos
        return tokens

    def decode(self, feature_map: Tensor) -> Tensor:
        """Class tokens ``h [B, C, d]``: every label query attends to the projected feature map."""
        memory = self.memory(feature_map)  # [B, H*W, d]
        queries = self.query_embed.unsqueeze(0).expand(memory.shape[0], -1, -1)  # [B, C, d]
        return self.decoder(queries, memory)  # [B, C, d]

    def forward(self, feature_map: Tensor) -> tuple[Tensor | None, Tensor]:
        """``feature_map [B, d0, H, W]`` -> (logits ``[B, C]`` or ``None`` without classifier, tokens ``[B, C, d]``)."""
        h = self.decode(feature_map)  # [B, C, d]
        logits = self.classifier(h) if self.classifier is not None else None
        return logits, h

