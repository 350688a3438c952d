"""Public checkpoint layouts -> the timm keys of an ssl_zoo backbone: the one converter evaluation loads through.

The baselines of the papers' tables are published checkpoints of other codebases (BAM+IA-CLoss's SimIN and
MoCoIN rows: SimSiam's and MoCo v2's ImageNet weights). Each codebase saves its backbone under its own
prefixes, next to heads the evaluation must leave out. :func:`convert_checkpoint` recognises the layout from
the key names, picks the backbone (the student, or the momentum / EMA teacher where the layout has one),
drops projectors, predictors, queues and MIM decoders, and renames the rest to timm's names:

=====================  ===============================================  ===================================
layout                 what the file holds                              backbone taken from
=====================  ===============================================  ===================================
``simsiam``            ``state_dict``: ``module.encoder.*`` (a          ``encoder.*`` without ``fc.*`` (the
                       torchvision ResNet), ``module.predictor.*``      projector MLP; SimSiam ``main_lincls``)
``moco``               ``state_dict``: ``module.encoder_q.*``,          ``encoder_q.*`` without ``fc.*``;
                       ``module.encoder_k.*``, ``module.queue`` (MoCo   teacher: ``encoder_k.*``
                       v1 / v2)
``mocov3``             ``state_dict``: ``module.base_encoder.*``,       ``base_encoder.*`` without ``fc.*``
                       ``module.momentum_encoder.*``,                   (ResNet) / ``head.*`` (ViT);
                       ``module.predictor.*``                           teacher: ``momentum_encoder.*``
``dino``               ``student`` / ``teacher`` dicts with             ``backbone.*`` of ``student`` (or of
                       ``backbone.*`` and ``head.*`` (the student       ``teacher``: DINO's own evaluations
                       DDP-prefixed ``module.``)                        use the teacher, ``teacher=True``)
``mae``                ``model``: timm ViT keys, plus ``decoder_*`` /   everything but the decoder
                       ``mask_token`` in full pre-training files
``beit``               ``model``: BEiT's names (``attn.q_bias`` /       kept (they are timm ``Beit``'s);
                       ``attn.v_bias``, ``gamma_1`` / ``gamma_2``,      into a ``VisionTransformer``:
                       relative position tables), ``mask_token``,       ``qkv.bias = [q_bias, 0, v_bias]``,
                       ``lm_head.*``                                    ``gamma_i`` -> ``ls{i}.gamma``
``torchvision``        torchvision ``VisionTransformer`` keys           renamed to timm's (the inverse of
                       (``conv_proj``, ``encoder.layers.*``)            ``python -m ssl_zoo.export --to
                                                                        torchvision``), ``heads.*`` dropped
``timm``               timm keys (ResNet: torchvision's names too),     as is; a classifier the backbone
                       optionally in ``state_dict`` / ``model`` /       lacks is dropped by ``load_backbone``
                       ``module`` and with a DDP ``module.`` prefix
=====================  ===============================================  ===================================

BEiT checkpoints with relative position bias tables load into a timm ``Beit`` backbone; into a timm
``VisionTransformer`` (which has none) they raise an error that says so. Any other file raises :class:`UnknownCheckpointLayout`, whose message lists
the file's top-level keys and the key prefixes of its tensors, so the layout can be added here.
ssl_zoo's own pre-training checkpoints are read by :func:`ssl_zoo.eval.checkpoint.read_backbone_weights`
before this converter is asked.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ConvertedCheckpoint", "UnknownCheckpointLayout", "beit_to_vit", "convert_checkpoint", "is_beit_named", "key_prefixes",
]

# (layout, student prefix, teacher prefix or None, head prefixes dropped from the backbone), checked in order.
_ENCODER_LAYOUTS: tuple[tuple[str, str, str | None, tuple[str, ...]], ...] = (
    ("moco", "encoder_q.", "encoder_k.", ("fc.",)),
    ("mocov3", "base_encoder.", "momentum_encoder.", ("fc.", "head.")),
    ("simsiam", "encoder.", None, ("fc.",)),
    ("dino", "backbone.", None, ("head.",)),
)
# Pre-training leftovers that are no part of the backbone (MAE decoder, BEiT / MAE mask token and MIM head).
_MIM_LEFTOVERS = ("decoder_", "mask_token", "lm_head.")
_KNOWN = ("SimSiam (state_dict: module.encoder.*), MoCo v1/v2 (module.encoder_q.*), MoCo v3 "
          "(module.base_encoder.*), DINO (student/teacher: backbone.*), MAE / BEiT ({'model': ...}), timm and "
          "torchvision ResNet / ViT / Swin state dicts, ssl_zoo pre-training checkpoints (backbone.model.*)")


class UnknownCheckpointLayout(ValueError):
    """No known layout matches the file's keys; the message lists what the file holds."""


@dataclass(frozen=True)
class ConvertedCheckpoint:
    """One backbone's weights under timm names, the layout they came from and the key prefixes left out."""

    state_dict: dict[str, Tensor]
    layout: str
    dropped: tuple[str, ...] = ()


def key_prefixes(keys: Iterable[str]) -> list[str]:
    """``prefix (count)`` for each key prefix: the first dotted component, or the first two after ``module.``."""
    counts: Counter[str] = Counter()
    for key in keys:
        parts = key.split(".")
        depth = 2 if parts[0] == "module" and len(parts) > 1 else 1
        prefix = ".".join(parts[:depth])
        counts[prefix + (".*" if len(parts) > depth else "")] += 1
    return [f"{prefix} ({n})" for prefix, n in sorted(counts.items())]


def _is_state(value: Any) -> bool:
    return isinstance(value, Mapping) and any(isinstance(v, Tensor) for v in value.values())


def _tensors(state: Mapping[str, Any]) -> dict[str, Tensor]:
    return {str(k): v for k, v in state.items() if isinstance(v, Tensor)}


def _strip_common(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Remove ``prefix`` when every key carries it (``module.`` of a DistributedDataParallel wrapper)."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _take(state: Mapping[str, Tensor], prefix: str, heads: tuple[str, ...]) -> tuple[dict[str, Tensor], set[str]]:
    """The keys under ``prefix`` (stripped), without those under ``heads``; plus the dropped prefixes."""
    taken, dropped = {}, set()
    for key, value in state.items():
        if not key.startswith(prefix):
            dropped.add(key.split(".")[0] + ".*" if "." in key else key)
            continue
        rest = key[len(prefix):]
        head = next((h for h in heads if rest.startswith(h)), None)
        if head is not None:
            dropped.add(prefix + head + "*")
        else:
            taken[rest] = value
    return taken, dropped


def _looks_like_backbone(state: Mapping[str, Tensor]) -> bool:
    """A timm ResNet (torchvision names), ViT or Swin: the families ssl_zoo's :class:`Backbone` builds."""
    return "patch_embed.proj.weight" in state or any(k.startswith("layer1.") for k in state)


def _unknown(obj: Mapping[str, Any], state: Mapping[str, Tensor], source: str, why: str = "") -> UnknownCheckpointLayout:
    top = [f"{k}{' (tensors)' if _is_state(v) else ''}" for k, v in obj.items()][:12]
    return UnknownCheckpointLayout(
        f"checkpoint '{source}': unknown weight layout{why}. Top-level keys: {', '.join(top) or 'none'}; "
        f"tensor key prefixes: {', '.join(key_prefixes(state)[:16]) or 'none'}. Known layouts: {_KNOWN}"
    )


# ---------------------------------------------------------------------------------------------- renaming
_TORCHVISION_VIT_TOP = {"class_token": "cls_token", "encoder.pos_embedding": "pos_embed",
                        "conv_proj.weight": "patch_embed.proj.weight", "conv_proj.bias": "patch_embed.proj.bias",
                        "encoder.ln.weight": "norm.weight", "encoder.ln.bias": "norm.bias"}
_TORCHVISION_VIT_BLOCK = (("ln_1.", "norm1."), ("ln_2.", "norm2."),
                          ("self_attention.in_proj_weight", "attn.qkv.weight"),
                          ("self_attention.in_proj_bias", "attn.qkv.bias"),
                          ("self_attention.out_proj.", "attn.proj."),
                          ("mlp.0.", "mlp.fc1."), ("mlp.3.", "mlp.fc2."),
                          ("mlp.linear_1.", "mlp.fc1."), ("mlp.linear_2.", "mlp.fc2."))  # torchvision < 0.13 names


def _from_torchvision_vit(state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """torchvision ``VisionTransformer`` names -> timm's (same tensors: in_proj is q, k, v stacked like qkv)."""
    out, unmapped = {}, []
    for key, value in state.items():
        if key.startswith("heads."):
            continue  # the classifier
        if key in _TORCHVISION_VIT_TOP:
            out[_TORCHVISION_VIT_TOP[key]] = value
            continue
        match = re.fullmatch(r"encoder\.layers\.encoder_layer_(\d+)\.(.+)", key)
        new = None
        if match:
            layer, rest = match.groups()
            for old, timm_name in _TORCHVISION_VIT_BLOCK:
                if rest.startswith(old):
                    new = f"blocks.{layer}.{timm_name}{rest[len(old):]}"
                    break
        if new is None:
            unmapped.append(key)
        else:
            out[new] = value
    if unmapped:
        raise ValueError(f"checkpoint '{source}': torchvision ViT tensors without a timm counterpart: "
                         f"{', '.join(unmapped[:5])}")
    return out


def is_beit_named(state: Mapping[str, Tensor]) -> bool:
    """Whether the tensors carry BEiT's (and timm ``Beit``'s) names rather than timm ``VisionTransformer``'s."""
    return any(k.endswith((".q_bias", ".gamma_1")) or k.startswith(("lm_head.", "rel_pos_bias.")) for k in state)


def beit_to_vit(state: Mapping[str, Tensor], source: str = "checkpoint") -> dict[str, Tensor]:
    """BEiT's ViT names (timm ``Beit``'s too) -> timm ``VisionTransformer`` names (unilm
    ``beit/modeling_finetune.py`` vs timm ``vision_transformer.py``), for loading a BEiT-style checkpoint into a
    plain ViT backbone.

    Raises:
        ValueError: the checkpoint has relative position bias tables, which a ``VisionTransformer`` lacks.
    """
    tables = [k for k in state if k.endswith("relative_position_bias_table")]
    if tables:
        raise ValueError(
            f"checkpoint '{source}' is a BEiT ViT with relative position bias ({tables[0]}): timm's "
            "VisionTransformer has no relative position bias, so these weights cannot be loaded into it without "
            "changing the model; load it into a timm BEiT backbone (e.g. backbone=beit_base_patch16_224 with the "
            "checkpoint's use_shared_rel_pos_bias / use_rel_pos_bias / use_abs_pos_emb), or use a checkpoint "
            "pre-trained with absolute position embeddings (BEiT's --abs_pos_emb)"
        )
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith("relative_position_index"):
            continue
        if key.endswith(".attn.q_bias"):
            block = key[: -len(".attn.q_bias")]
            v_bias = state[f"{block}.attn.v_bias"]
            # BEiT learns biases for q and v only; the key bias is fixed at zero (BEiT Attention.forward).
            out[f"{block}.attn.qkv.bias"] = torch.cat([value, torch.zeros_like(v_bias), v_bias])
        elif key.endswith(".attn.v_bias"):
            continue
        elif re.search(r"\.gamma_[12]$", key):
            out[f"{key[:-len('.gamma_1')]}.ls{key[-1]}.gamma"] = value  # layer scale
        else:
            out[key] = value
    return out


def _to_timm(state: dict[str, Tensor], source: str) -> tuple[dict[str, Tensor], str | None]:
    """timm names for a backbone's tensors, and the layout they were renamed from (None: already timm)."""
    if "conv_proj.weight" in state and any(k.startswith("encoder.layers.") for k in state):
        return _from_torchvision_vit(state, source), "torchvision"
    if is_beit_named(state):
        # BEiT's names are timm ``Beit``'s: kept, so that relative position biases reach a BEiT backbone;
        # load_backbone renames them (beit_to_vit) when the backbone is a plain VisionTransformer.
        return state, "beit"
    return state, None


# ---------------------------------------------------------------------------------------------- entry point
def convert_checkpoint(obj: Mapping[str, Any], source: str = "checkpoint", teacher: bool = False) -> ConvertedCheckpoint:
    """The backbone weights of a public checkpoint (the loaded top-level dict) under timm names.

    Args:
        obj: what ``torch.load`` returned for the file (see the module docstring for the layouts).
        source: the file's name, for messages.
        teacher: take the momentum / EMA teacher (MoCo ``encoder_k``, MoCo v3 ``momentum_encoder``, DINO
            ``teacher``) instead of the student.

    Raises:
        UnknownCheckpointLayout: no known layout matches; the message lists the top-level keys and the
            tensor key prefixes it found.
        ValueError: a teacher is requested from a layout with one model only, or the weights cannot become a
            timm backbone.
    """
    dropped: set[str] = set()
    if _is_state(obj.get("student")) and _is_state(obj.get("teacher")):  # DINO's training checkpoint
        found = _tensors(obj["teacher" if teacher else "student"])
        state = _strip_common(found, "module.")
        layout, has_teacher = "dino", True
        if any(k.startswith("backbone.") for k in state):
            state, dropped = _take(state, "backbone.", ("head.",))
    else:
        wrapped = next((obj[w] for w in ("state_dict", "model", "module") if _is_state(obj.get(w))), obj)
        found = _tensors(wrapped)
        if not found:
            raise _unknown(obj, found, source, " (no tensors at the top level nor under state_dict / model / module)")
        state = _strip_common(found, "module.")
        layout, has_teacher = "timm", False
        if not _looks_like_backbone(state) and "conv_proj.weight" not in state:
            for name, student, teacher_prefix, heads in _ENCODER_LAYOUTS:
                if any(k.startswith(student) for k in state):
                    layout, has_teacher = name, teacher_prefix is not None
                    prefix = teacher_prefix if teacher and teacher_prefix else student
                    state, dropped = _take(state, prefix, heads)
                    break
        elif "mask_token" in state or any(k.startswith("decoder_") for k in state):
            layout = "mae"  # a full MAE pre-training file: encoder + decoder
    if teacher and not has_teacher:
        raise ValueError(
            f"a teacher backbone was requested but '{source}' is a {layout} checkpoint, not an ssl_zoo pre-training "
            "checkpoint, and holds one model only (no momentum / EMA teacher): evaluate with teacher=False"
        )
    weights, renamed_from = _to_timm(state, source)
    leftovers = {k for k in weights if k.startswith(_MIM_LEFTOVERS)}
    dropped |= {k.split(".")[0] + (".*" if "." in k else "") for k in leftovers}
    weights = {k: v for k, v in weights.items() if k not in leftovers}
    if not _looks_like_backbone(weights):
        why = f" (its {layout} backbone part holds no ResNet / ViT / Swin keys)" if layout != "timm" else ""
        raise _unknown(obj, found, source, why)
    if renamed_from and layout in ("timm", "mae"):
        layout = renamed_from
    return ConvertedCheckpoint(weights, layout, tuple(sorted(dropped)))
