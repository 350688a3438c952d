"""Query2Label decoder (HVP-MTL's multi-label head): its layout against a float64 brute force written from
Query2Label's ``lib/models/transformer.py`` (zero target, label embeddings added to the queries of every layer,
position code on the keys only, no self-attention among the queries), its defaults, and its cost: linear in the
number of labels by default, quadratic with the self-attention option (FLOPs counted at C, 2C and 4C)."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ssl_zoo.models.query2label import Query2LabelDecoder, sine_position_embedding_2d

SMALL = dict(dim=16, num_heads=2, ffn_dim=24, dropout=0.0)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _layer_norm(x: np.ndarray, norm) -> np.ndarray:
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + norm.eps) * _np(norm.weight) + _np(norm.bias)


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mha) -> np.ndarray:
    """nn.MultiheadAttention by hand: [Nq, d], [Nk, d], [Nk, d] -> [Nq, d] for one image."""
    d, heads = q.shape[-1], mha.num_heads
    wq, wk, wv = np.split(_np(mha.in_proj_weight), 3)
    bq, bk, bv = np.split(_np(mha.in_proj_bias), 3)
    qh, kh, vh = q @ wq.T + bq, k @ wk.T + bk, v @ wv.T + bv
    out = np.empty_like(qh)
    dh = d // heads
    for h in range(heads):
        s = slice(h * dh, (h + 1) * dh)
        logits = qh[:, s] @ kh[:, s].T / math.sqrt(dh)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        out[:, s] = (p / p.sum(-1, keepdims=True)) @ vh[:, s]
    return out @ _np(mha.out_proj.weight).T + _np(mha.out_proj.bias)


def _ffn(x: np.ndarray, ffn) -> np.ndarray:
    hidden = np.maximum(x @ _np(ffn.linear1.weight).T + _np(ffn.linear1.bias), 0.0)
    return hidden @ _np(ffn.linear2.weight).T + _np(ffn.linear2.bias)


def _reference_tokens(dec: Query2LabelDecoder, feature_map: torch.Tensor) -> np.ndarray:
    """Query2Label's post-norm forward, one image at a time (Transformer.forward, forward_post)."""
    b, _, h, w = feature_map.shape
    pos = _np(sine_position_embedding_2d(h, w, dec.dim))  # [HW, d]
    q0 = _np(dec.query_embed)  # [C, d]
    out = []
    for i in range(b):
        src = _np(feature_map[i]).reshape(dec.in_dim, h * w).T @ _np(dec.input_proj.weight).T + _np(dec.input_proj.bias)
        for enc in dec.encoder:  # q = k = src + pos, v = src; norm after each residual
            src = _layer_norm(src + _attention(src + pos, src + pos, src, enc.self_attn), enc.norm1)
            src = _layer_norm(src + _ffn(src, enc.ffn), enc.norm2)
        tgt = np.zeros_like(q0)
        for layer in dec.layers:
            if layer.self_attn is not None:
                tgt = _layer_norm(tgt + _attention(tgt + q0, tgt + q0, tgt, layer.self_attn), layer.norm1)
            tgt = _layer_norm(tgt + _attention(tgt + q0, src + pos, src, layer.cross_attn), layer.norm2)
            tgt = _layer_norm(tgt + _ffn(tgt, layer.ffn), layer.norm3)
        out.append(_layer_norm(tgt, dec.norm))
    return np.stack(out)  # [B, C, d]


@pytest.mark.parametrize("self_attention", [False, True])
def test_decoder_matches_query2label_brute_force(self_attention):
    torch.manual_seed(0)
    dec = Query2LabelDecoder(12, 5, self_attention=self_attention, **SMALL).double()
    x = torch.randn(2, 12, 2, 3, dtype=torch.float64)
    np.testing.assert_allclose(_np(dec.decode(x)), _reference_tokens(dec, x), rtol=1e-10, atol=1e-10)
    logits, tokens = dec(x)
    np.testing.assert_allclose(_np(logits), np.einsum("bcd,cd->bc", _np(tokens), _np(dec.classifier.weight))
                               + _np(dec.classifier.bias), rtol=1e-12, atol=1e-12)


def test_defaults_are_query2label_training_defaults():
    defaults = {k: p.default for k, p in inspect.signature(Query2LabelDecoder).parameters.items()
                if p.default is not inspect.Parameter.empty}
    # main_mlc.py: --hidden_dim 2048, --dec_layers 2, --enc_layers 1, --nheads 4, --dim_feedforward 8192,
    # --dropout 0.1, no --pre_norm, self-attention removed from every decoder layer.
    assert defaults == dict(dim=2048, num_layers=2, num_encoder_layers=1, num_heads=4, ffn_dim=8192, dropout=0.1,
                            norm_first=False, self_attention=False, input_proj=True, position_embedding=True,
                            classifier=True)
    with torch.device("meta"):
        dec = Query2LabelDecoder(1024, 7)
    assert all(layer.self_attn is None and layer.norm1 is None for layer in dec.layers)
    assert len(dec.encoder) == 1 and dec.encoder_norm is None and len(dec.layers) == 2
    assert dec.layers[0].ffn.linear1.out_features == 8192 and dec.layers[0].cross_attn.num_heads == 4


# The decoder's target starts at zero, so in the first layer whatever reads the target alone sees zeros and gets
# no gradient: in pre-norm layers the scale of the norm before the cross-attention; with self-attention, its
# values are W_v 0 + b_v = 0 (nn.MultiheadAttention starts its biases at zero), so its projections and the
# norm after it (why Query2Label removes the first self-attention too). Every other parameter is trained.
@pytest.mark.parametrize(("kwargs", "zero_input"), [
    ({}, []),
    ({"num_encoder_layers": 0}, []),
    ({"norm_first": True}, ["layers.0.norm2.weight"]),
    ({"self_attention": True}, ["layers.0.self_attn.in_proj_weight", "layers.0.self_attn.out_proj.weight",
                                "layers.0.norm1.weight"]),
])
def test_shapes_and_every_parameter_trained(kwargs, zero_input):
    torch.manual_seed(0)
    dec = Query2LabelDecoder(12, 5, **SMALL, **kwargs)
    logits, tokens = dec(torch.randn(3, 12, 2, 3))
    assert logits.shape == (3, 5) and tokens.shape == (3, 5, 16)
    (logits.sum() + tokens.square().mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in dec.parameters())
    assert [n for n, p in dec.named_parameters() if not p.grad.abs().sum() > 0] == zero_input
    # Images are decoded independently (no batch statistics): permuting the batch permutes the outputs.
    x = torch.randn(2, 12, 2, 2)
    torch.testing.assert_close(dec(x.flip(0))[0], dec(x)[0].flip(0))


def test_options_and_errors():
    assert Query2LabelDecoder(12, 5, **SMALL, classifier=False)(torch.randn(1, 12, 2, 2))[0] is None
    same = Query2LabelDecoder(16, 5, **SMALL, input_proj=False)  # Query2Label's default: no projection
    assert isinstance(same.input_proj, torch.nn.Identity)
    with pytest.raises(ValueError, match="input_proj=False"):
        Query2LabelDecoder(12, 5, **SMALL, input_proj=False)
    with pytest.raises(ValueError, match="num_heads"):
        Query2LabelDecoder(12, 5, dim=16, num_heads=3)
    with pytest.raises(ValueError, match=r"\[B, 12, H, W\]"):
        Query2LabelDecoder(12, 5, **SMALL)(torch.randn(1, 11, 2, 2))


def _flops(num_classes: int, batch: int, **kwargs) -> int:
    torch.manual_seed(0)
    dec = Query2LabelDecoder(8, num_classes, dropout=0.0, **kwargs)
    x = torch.randn(batch, 8, 3, 3)
    # The math attention backend runs attention as matrix products, which the counter sees (the fused CPU
    # kernels are not counted).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        dec(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("self_attention", [False, True])
def test_head_cost_is_linear_in_labels_and_quadratic_with_self_attention(self_attention):
    c, batch, dim, layers = 8, 2, 16, 2
    f1, f2, f4 = (_flops(n, batch, dim=dim, num_heads=2, ffn_dim=32, num_layers=layers,
                         self_attention=self_attention) for n in (c, 2 * c, 4 * c))
    step1, step2 = f2 - f1, f4 - f2  # the cost of labels c+1..2c and of 2c+1..4c
    assert step1 > 0
    # F(C) = a + b C + k C^2 gives step2 - 2 step1 = 6 k c^2; k = the C x C attention of every layer: two
    # [C, d] x [d, C]-sized products (scores, weighted values) per image, 2 FLOPs per multiply-add.
    k = layers * batch * 2 * 2 * dim if self_attention else 0
    assert step2 - 2 * step1 == 6 * k * c**2
    if not self_attention:  # equal increments per label, a constant cost per label query
        assert step2 / (2 * c) == pytest.approx(step1 / c, abs=1e-9)


def test_sine_position_code_is_detrs():
    h, w, d = 3, 4, 8
    code = sine_position_embedding_2d(h, w, d).view(h, w, d)
    half = d // 2
    for i in range(h):
        for j in range(w):
            y, x = (i + 1) / (h + 1e-6) * 2 * math.pi, (j + 1) / (w + 1e-6) * 2 * math.pi
            expected = []
            for coord in (y, x):  # row half, then column half; pairs (sin, cos) of one frequency
                for k in range(half // 2):
                    f = 10000.0 ** (2 * k / half)
                    expected += [math.sin(coord / f), math.cos(coord / f)]
            np.testing.assert_allclose(code[i, j].numpy(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sine_position_embedding_2d(2, 2, 6)
