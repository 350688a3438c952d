"""Query2Label multi-label decoder (Liu et al. 2021), the classification head of HVP-MTL (§3.2, Eq. 1).

The backbone's last feature map ``F0 [B, d0, H, W]`` is projected to ``d`` channels (the linear projection
HVP-MTL §3.2 adds), refined by a transformer encoder over its ``H*W`` tokens, and read by ``C`` learnable
label embeddings ``Q0 [C, d]`` through the cross-attention of a transformer decoder. Each of the ``C`` output
tokens ``h [B, C, d]`` is classified by its own linear classifier, ``logit_c = <h_c, w_c> + b_c``.

The layout is Query2Label's (SlongLiu/query2labels ``lib/models/transformer.py``, ``lib/models/query2label.py``,
``lib/models/position_encoding.py``), which is DETR's transformer with the decoder's self-attention removed:

* the decoder starts from a zero target and adds ``Q0`` to its queries in every layer (DETR's ``query_pos``);
* the fixed 2-D sine position code is added to the keys of the encoder's self-attention and of the decoder's
  cross-attention, never to the values (DETR's ``pos``);
* post-norm layers with ReLU feed-forward blocks; the encoder has no final norm in post-norm mode, the decoder
  always ends in one LayerNorm;
* every weight matrix of the encoder and decoder layers is Xavier-uniform initialised, ``Q0`` is N(0, 1)
  (``nn.Embedding``).

Cost: without self-attention the label queries never meet each other, so everything the decoder does per
query (query and output projections, attention over the ``H*W`` memory tokens, feed-forward block) is done
once per label: the decoder's cost grows linearly in ``C``. With ``self_attention=True`` (DETR's decoder,
Query2Label's ``--keep_first_self_attn_dec --keep_other_self_attn_dec``) the ``C x C`` attention of every
layer adds a term quadratic in ``C``. With Query2Label's training defaults (``d = 2048``, feed-forward 8192,
two decoder layers) and Tencent ML-Images' ``C = 11,166`` labels, the linear decoder costs about
``2 * 11166 * 4.2e7 ~ 9e11`` multiply-adds per image, some sixty times a Swin-B forward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GroupWiseLinear", "Query2LabelDecoder", "Query2LabelDecoderLayer", "Query2LabelEncoderLayer",
           "sine_position_embedding_2d"]


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
        # U(-1/sqrt(d), 1/sqrt(d)) for weights and biases, as Query2Label's GroupWiseLinear.reset_parameters.
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
    """Fixed 2-D sine position code ``[height * width, dim]`` in row-major order, DETR's ``PositionEmbeddingSine``
    with ``normalize=True`` as Query2Label builds it (``num_pos_feats = dim / 2``).

    The first ``dim / 2`` channels encode the row, the last ``dim / 2`` the column; within each half, channel pair
    ``(2k, 2k + 1)`` is ``(sin, cos)`` of the coordinate divided by ``temperature^(4k / dim)``. Coordinates
    ``1..n`` are normalised to ``(0, 2*pi]`` (divided by ``n + 1e-6``), so the code does not depend on the
    resolution of the feature map.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sine position code needs dim divisible by 4, got {dim}")
    eps, scale, half = 1e-6, 2.0 * math.pi, dim // 2
    ys = torch.arange(1, height + 1, dtype=torch.float32) / (height + eps) * scale  # [H]
    xs = torch.arange(1, width + 1, dtype=torch.float32) / (width + eps) * scale  # [W]
    freqs = temperature ** (2 * (torch.arange(half) // 2).float() / half)  # [d/2], each frequency twice

    def code(coords: Tensor) -> Tensor:  # [n] -> [n, d/2]: sin, cos, sin, cos, ...
        angles = coords[:, None] / freqs  # [n, d/2]
        return torch.stack([angles[:, 0::2].sin(), angles[:, 1::2].cos()], dim=-1).flatten(1)

    code_y, code_x = code(ys), code(xs)  # [H, d/2], [W, d/2]
    grid = torch.cat(
        [code_y[:, None, :].expand(height, width, -1), code_x[None, :, :].expand(height, width, -1)], dim=-1
    )  # [H, W, d]
    return grid.reshape(height * width, dim)


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class _FeedForward(nn.Module):
    """``linear2(dropout(relu(linear1(x))))``: the feed-forward block of DETR / Query2Label layers."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class Query2LabelEncoderLayer(nn.Module):
    """Self-attention over the image tokens (position code on queries and keys) + feed-forward, post- or pre-norm
    (Query2Label's ``TransformerEncoderLayer``)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, norm_first: bool) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.ffn = _FeedForward(dim, ffn_dim, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def _attend(self, x: Tensor, pos: Tensor | None) -> Tensor:
        q = k = _with_pos(x, pos)
        return self.dropout1(self.self_attn(q, k, x, need_weights=False)[0])

    def forward(self, src: Tensor, pos: Tensor | None = None) -> Tensor:
        """``src [B, N, d]`` -> ``[B, N, d]``; ``pos [N, d]`` is added to queries and keys only."""
        if self.norm_first:
            src = src + self._attend(self.norm1(src), pos)
            return src + self.dropout2(self.ffn(self.norm2(src)))
        src = self.norm1(src + self._attend(src, pos))
        return self.norm2(src + self.dropout2(self.ffn(src)))


class Query2LabelDecoderLayer(nn.Module):
    """Cross-attention of the label queries to the memory + feed-forward, with an optional self-attention among
    the queries before them (Query2Label's ``TransformerDecoderLayer``; ``self_attention=False`` is its
    ``omit_selfattn``, the layer with ``self_attn``, ``norm1`` and ``dropout1`` deleted)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, norm_first: bool,
                 self_attention: bool) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = self.norm1 = self.dropout1 = None
        if self_attention:
            self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
            self.norm1, self.dropout1 = nn.LayerNorm(dim), nn.Dropout(dropout)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.ffn = _FeedForward(dim, ffn_dim, dropout)
        self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout)

    def _self(self, tgt: Tensor, query_pos: Tensor) -> Tensor:  # [B, C, d]: the C x C attention
        q = k = tgt + query_pos
        return self.dropout1(self.self_attn(q, k, tgt, need_weights=False)[0])

    def _cross(self, tgt: Tensor, memory: Tensor, memory_keys: Tensor, query_pos: Tensor) -> Tensor:
        return self.dropout2(self.cross_attn(tgt + query_pos, memory_keys, memory, need_weights=False)[0])

    def forward(self, tgt: Tensor, memory: Tensor, query_pos: Tensor, memory_keys: Tensor | None = None) -> Tensor:
        """``tgt [B, C, d]``, ``memory [B, N, d]``, ``query_pos [B, C, d]`` (the label embeddings Q0),
        ``memory_keys``: the memory with its position code (``memory`` itself without one) -> ``[B, C, d]``."""
        keys = memory if memory_keys is None else memory_keys
        if self.norm_first:
            if self.self_attn is not None:
                tgt = tgt + self._self(self.norm1(tgt), query_pos)
            tgt = tgt + self._cross(self.norm2(tgt), memory, keys, query_pos)
            return tgt + self.dropout3(self.ffn(self.norm3(tgt)))
        if self.self_attn is not None:
            tgt = self.norm1(tgt + self._self(tgt, query_pos))
        tgt = self.norm2(tgt + self._cross(tgt, memory, keys, query_pos))
        return self.norm3(tgt + self.dropout3(self.ffn(tgt)))


class Query2LabelDecoder(nn.Module):
    """Input projection + transformer encoder + label-query decoder + group-wise linear classifier (Query2Label).

    ``feature_map [B, d0, H, W]`` -> projected tokens ``[B, H*W, d]`` -> encoder (:meth:`memory`) -> decoder with
    the label embeddings ``Q0 [C, d]`` as query positions over a zero target (:meth:`decode`, class tokens
    ``h [B, C, d]``) -> logits ``[B, C]``.

    Defaults are Query2Label's training defaults (``main_mlc.py`` of SlongLiu/query2labels, the arguments its
    README's COCO commands pass too; ``q2l_infer.py``'s smaller ``hidden_dim`` 128 / ``dim_feedforward`` 256 are
    placeholders replaced by each released model's config file):

    Args:
        in_dim: ``d0``, channels of the backbone feature map.
        num_classes: ``C``, number of label queries (``--num_class``).
        dim: ``d``, width of the transformer (``--hidden_dim`` 2048).
        num_layers: decoder layers (``--dec_layers`` 2).
        num_encoder_layers: encoder layers over the image tokens (``--enc_layers`` 1); 0 feeds the projected
            tokens to the decoder directly.
        num_heads: attention heads (``--nheads`` 4); must divide ``dim``.
        ffn_dim: hidden width of each layer's feed-forward block (``--dim_feedforward`` 8192).
        dropout: dropout in attention, feed-forward and residual branches (``--dropout`` 0.1).
        norm_first: pre-norm layers (``--pre_norm``, off: post-norm as DETR; the encoder then ends in a
            LayerNorm too, as ``build_transformer`` sets ``encoder_norm``).
        self_attention: self-attention among the label queries in every decoder layer. Off by default:
            Query2Label removes it from every layer (``rm_self_attn_dec`` and ``rm_first_self_attn`` default to
            true, ``--keep_first_self_attn_dec`` / ``--keep_other_self_attn_dec`` unset); on gives DETR's decoder,
            whose cost is quadratic in ``C``.
        input_proj: project ``d0 -> d`` by a linear layer (Query2Label's 1x1 convolution ``--keep_input_proj``;
            HVP-MTL §3.2 adds it: "a linear projection layer to project the features from dimension d_0 to d").
            ``False`` is Query2Label's own default, the identity, which needs ``in_dim == dim``.
        position_embedding: add the 2-D sine code to the attention keys (``--position_embedding sine``).
        classifier: build the group-wise linear classifier; ``False`` when only the class tokens are needed
            (HVP-MTL's distillation without the multi-label loss).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        dim: int = 2048,
        num_layers: int = 2,
        num_encoder_layers: int = 1,
        num_heads: int = 4,
        ffn_dim: int = 8192,
        dropout: float = 0.1,
        norm_first: bool = False,
        self_attention: bool = False,
        input_proj: bool = True,
        position_embedding: bool = True,
        classifier: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if num_layers < 1 or num_encoder_layers < 0:
            raise ValueError(f"num_layers must be >= 1 and num_encoder_layers >= 0, got {num_layers} and "
                             f"{num_encoder_layers}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if position_embedding and dim % 4:
            raise ValueError(f"dim must be divisible by 4 for the 2-D sine position code, got {dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if not input_proj and in_dim != dim:
            raise ValueError(f"input_proj=False feeds the feature map as it is, so its {in_dim} channels must equal "
                             f"dim={dim}; keep the projection or set dim to {in_dim}")
        self.in_dim = in_dim
        self.num_classes = num_classes
        self.dim = dim
        self.position_embedding = position_embedding

        self.input_proj = nn.Linear(in_dim, dim) if input_proj else nn.Identity()  # F0 -> F (a 1x1 conv)
        self.encoder = nn.ModuleList(
            Query2LabelEncoderLayer(dim, num_heads, ffn_dim, dropout, norm_first) for _ in range(num_encoder_layers)
        )
        self.encoder_norm = nn.LayerNorm(dim) if norm_first and num_encoder_layers else None
        self.layers = nn.ModuleList(
            Query2LabelDecoderLayer(dim, num_heads, ffn_dim, dropout, norm_first, self_attention)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)
        # Query2Label's Transformer._reset_parameters: Xavier-uniform for every matrix of its layers.
        for p in [*self.encoder.parameters(), *self.layers.parameters()]:
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.query_embed = nn.Parameter(torch.empty(num_classes, dim))  # Q0: one learnable query per label
        nn.init.normal_(self.query_embed, std=1.0)  # nn.Embedding's initialisation, as in Query2Label
        self.classifier = GroupWiseLinear(num_classes, dim) if classifier else None

    def encode(self, feature_map: Tensor) -> tuple[Tensor, Tensor | None]:
        """Backbone map ``[B, d0, H, W]`` -> memory ``[B, H*W, d]`` and its position code ``[H*W, d]`` (or None)."""
        if feature_map.ndim != 4 or feature_map.shape[1] != self.in_dim:
            raise ValueError(f"expected a feature map [B, {self.in_dim}, H, W], got {tuple(feature_map.shape)}")
        _, _, h, w = feature_map.shape
        x = self.input_proj(feature_map.flatten(2).transpose(1, 2))  # [B, H*W, d]
        pos = sine_position_embedding_2d(h, w, self.dim).to(x) if self.position_embedding else None  # [H*W, d]
        for layer in self.encoder:
            x = layer(x, pos)
        if self.encoder_norm is not None:
            x = self.encoder_norm(x)
        return x, pos

    def memory(self, feature_map: Tensor) -> Tensor:
        """The decoder's memory ``[B, H*W, d]``: the projected feature map after the encoder."""
        return self.encode(feature_map)[0]

    def decode(self, feature_map: Tensor) -> Tensor:
        """Class tokens ``h [B, C, d]``: every label query attends to the encoded feature map."""
        memory, pos = self.encode(feature_map)  # [B, H*W, d], [H*W, d]
        memory_keys = _with_pos(memory, pos)  # keys carry the position code, values do not
        query_pos = self.query_embed.unsqueeze(0).expand(memory.shape[0], -1, -1)  # [B, C, d]
        tgt = torch.zeros_like(query_pos)  # DETR / Query2Label: the content starts at zero
        for layer in self.layers:
            tgt = layer(tgt, memory, query_pos, memory_keys)
        return self.norm(tgt)  # [B, C, d]

    def forward(self, feature_map: Tensor) -> tuple[Tensor | None, Tensor]:
        """``feature_map [B, d0, H, W]`` -> (logits ``[B, C]`` or ``None`` without classifier, tokens ``[B, C, d]``)."""
        h = self.decode(feature_map)  # [B, C, d]
        logits = self.classifier(h) if self.classifier is not None else None
        return logits, h
