"""Public checkpoint layouts -> (layout, architecture, timm state dict): what another codebase's file holds.

Each codebase saves its backbone under its own prefixes, next to heads the evaluation leaves out, and builds
it with settings the tensors do not record. :func:`recognise` finds the layout from the key names, picks the
backbone (the student, or the momentum / EMA teacher where the layout has one), drops projectors,
predictors, queues and MIM decoders, renames the rest to timm's names and states the architecture as the
layout's official code builds it (:class:`~ssl_zoo.checkpoints.architecture.Architecture`):

==============  ======================================  ===============================  ============================
layout          what the file holds                     backbone taken from              architecture (official code)
==============  ======================================  ===============================  ============================
``simsiam``     ``state_dict``: ``module.encoder.*``,   ``encoder.*`` without ``fc.*``   torchvision ResNet (name from
                ``module.predictor.*``                                                   the blocks per stage)
``moco``        ``module.encoder_q.*``, ``encoder_k.*``  ``encoder_q.*`` (teacher:         torchvision ResNet
                ``queue`` (MoCo v1 / v2)                ``encoder_k.*``) without ``fc.*``
``mocov3``      ``module.base_encoder.*``,              ``base_encoder.*`` without        ResNet, or ``vits.py``: ViT-S
                ``momentum_encoder.*``, ``predictor.*`` ``fc.*`` / ``head.*``             /B 12 heads, L/H 16; token
``dino``        ``student`` / ``teacher``:              ``backbone.*`` without ``head.*`` ``vision_transformer.py``:
                ``backbone.*``, ``head.*``                                               ViT-Ti 3, S 6, B 12 heads
``mae``         ``model``: timm ViT keys, ``decoder_*``  all but the decoder              ``models_vit.py``: B 12, L/H
                ``mask_token``                                                           16 heads; token, or mean +
                                                                                         ``fc_norm`` (fine-tuned)
``beit``        ``model``: BEiT's names (``q_bias``,    all but ``lm_head`` /             unilm ``modeling_*``: B 12,
                ``gamma_1``, relative position tables)  ``mask_token`` / ``cls_pt_*``     L 16 heads; layer scale,
                (BEiT and BEiT v2)                      (BEiT v2's CLS decoder)           shared or per-block bias
``torchvision`` ``conv_proj``, ``encoder.layers.*``     renamed to timm's                 ViT-B 12, L/H 16 heads
``simmim``      ``model``: ``encoder.*`` (a ViT, BEiT's  ``encoder.*`` without             as ``beit`` (SimMIM's ViT is
                names), ``decoder.*``                   ``mask_token``                    BEiT's: 12 / 16 heads)
``openai_clip`` ``visual.*`` (or the tower alone):      renamed to timm's; ``proj`` (the  heads = width / 64,
                ``conv1``, ``transformer.resblocks``    joint-embedding projection)       QuickGELU, LayerNorm eps 1e-5
                                                        dropped                           before the blocks (ln_pre)
``timm``        timm keys (ResNet: torchvision's too)   as is                             ResNet: named; ViT: the user
                                                                                          names it (heads unknown)
==============  ======================================  ===============================  ============================

Any other file raises :class:`UnknownCheckpointLayout`, whose message lists the file's top-level keys and the
key prefixes of its tensors. ssl_zoo's own pre-training checkpoints (``backbone.model.*``, the architecture in
``hyper_parameters``) are read by :func:`ssl_zoo.checkpoints.load.read_backbone_weights` before this.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ssl_zoo.checkpoints.architecture import (
    Architecture,
    default_facts,
    describe_state_dict,
    resnet_name,
    vit_grid,
    vit_shape,
)

__all__ = ["Recognised", "UnknownCheckpointLayout", "beit_to_vit", "is_beit_named", "key_prefixes", "recognise"]

# (layout, student prefix, teacher prefix or None, head prefixes dropped from the backbone), checked in order.
_ENCODER_LAYOUTS: tuple[tuple[str, str, str | None, tuple[str, ...]], ...] = (
    ("moco", "encoder_q.", "encoder_k.", ("fc.",)),
    ("mocov3", "base_encoder.", "momentum_encoder.", ("fc.", "head.")),
    ("simsiam", "encoder.", None, ("fc.",)),
    ("dino", "backbone.", None, ("head.",)),
)
# Pre-training leftovers that are no part of the backbone (MAE decoder, BEiT / MAE mask token and MIM head,
# BEiT v2's CLS-pretraining decoder blocks).
_MIM_LEFTOVERS = ("decoder_", "mask_token", "lm_head.", "cls_pt_")
_KNOWN = ("SimSiam (state_dict: module.encoder.*), MoCo v1/v2 (module.encoder_q.*), MoCo v3 "
          "(module.base_encoder.*), DINO (student/teacher: backbone.*), MAE / BEiT / BEiT v2 ({'model': ...}), "
          "OpenAI CLIP (visual.*), timm and torchvision ResNet / ViT / Swin state dicts, ssl_zoo pre-training "
          "checkpoints (backbone.model.*)")

# Heads per width as each official model file defines its ViTs (other widths: not a model of that code).
_HEADS = {
    "mocov3": ({384: 12, 768: 12, 1024: 16, 1280: 16}, "moco-v3 vits.py"),
    "dino": ({192: 3, 384: 6, 768: 12}, "dino vision_transformer.py"),
    "mae": ({768: 12, 1024: 16, 1280: 16}, "mae models_vit.py"),
    "beit": ({768: 12, 1024: 16}, "unilm beit modeling_pretrain.py / modeling_finetune.py"),
    "simmim": ({768: 12, 1024: 16}, "SimMIM models/vision_transformer.py (BEiT's ViT)"),
    "torchvision": ({768: 12, 1024: 16, 1280: 16}, "torchvision vision_transformer.py vit_b/l/h"),
}
_MOCOV3_ARCH_HEADS = {"vit_small": 12, "vit_base": 12, "vit_large": 16, "vit_huge": 16}
_VIT_NAMES = {192: "vit_tiny", 384: "vit_small", 768: "vit_base", 1024: "vit_large", 1280: "vit_huge"}
_CLIP_NAMES = {(768, 16): "vit_base_patch16_clip_quickgelu_224", (768, 32): "vit_base_patch32_clip_quickgelu_224",
               (1024, 14): "vit_large_patch14_clip_quickgelu_224", (1280, 14): "vit_huge_patch14_clip_quickgelu_224"}


class UnknownCheckpointLayout(ValueError):
    """No known layout matches the file's keys; the message lists what the file holds."""


@dataclass(frozen=True)
class Recognised:
    """One backbone's weights under timm names, the layout and architecture they came from, which model of the
    file they are (``encoder``) and the key prefixes left out."""

    state_dict: dict[str, Tensor]
    layout: str
    architecture: Architecture
    encoder: str = "the whole file"
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
# OpenAI CLIP's visual tower (open_clip keeps the names) -> timm VisionTransformer: in_proj is q, k, v stacked
# like timm's qkv; the class and position embeddings gain timm's batch dimension.
_CLIP_RENAMES = (("conv1.", "patch_embed.proj."), ("ln_pre.", "norm_pre."), ("ln_post.", "norm."),
                 ("transformer.resblocks.", "blocks."), (".ln_1.", ".norm1."), (".ln_2.", ".norm2."),
                 (".attn.in_proj_weight", ".attn.qkv.weight"), (".attn.in_proj_bias", ".attn.qkv.bias"),
                 (".attn.out_proj.", ".attn.proj."), (".mlp.c_fc.", ".mlp.fc1."), (".mlp.c_proj.", ".mlp.fc2."))


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
            new = next((f"blocks.{layer}.{t}{rest[len(o):]}" for o, t in _TORCHVISION_VIT_BLOCK if rest.startswith(o)),
                       None)
        if new is None:
            unmapped.append(key)
        else:
            out[new] = value
    if unmapped:
        raise ValueError(f"checkpoint '{source}': torchvision ViT tensors without a timm counterpart: "
                         f"{', '.join(unmapped[:5])}")
    return out


def _from_openai_clip(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], set[str]]:
    """OpenAI CLIP's visual tower (``visual.*`` of a whole CLIP state dict, or the tower alone) -> timm names.
    The text tower and ``proj`` (the projection into the joint image-text space, a head) are dropped."""
    whole_clip = any(k.startswith("visual.") for k in state)
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")} if whole_clip else state
    dropped = {k.split(".")[0] + (".*" if "." in k else "") for k in state if not k.startswith("visual.")} \
        if whole_clip else set()
    out = {}
    for key, value in visual.items():
        if key == "proj":
            dropped.add("visual.proj")
            continue
        if key == "class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "positional_embedding":
            out["pos_embed"] = value.unsqueeze(0)
        else:
            for old, new in _CLIP_RENAMES:
                key = key.replace(old, new) if old.startswith(".") or key.startswith(old) else key
            out[key] = value
    return out, dropped


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
            "changing the model; leave model.backbone unset (the checkpoint's BEiT architecture), or load it into "
            "a timm BEiT backbone (e.g. beit_base_patch16_224 with the checkpoint's use_shared_rel_pos_bias / "
            "use_rel_pos_bias / use_abs_pos_emb)"
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


# ---------------------------------------------------------------------------------------------- architectures
def _with_defaults(name: str, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``model_kwargs`` without the values ``name`` already builds (so a config shows only what differs)."""
    defaults = default_facts(name)
    return {k: v for k, v in model_kwargs.items() if defaults.get(k, object()) != v}


def _vit_architecture(state: Mapping[str, Tensor], layout: str, arch_hint: str | None = None) -> Architecture:
    """The ViT / BEiT of a layout's official code, from the shapes and the layout's own rules."""
    width, depth, patch = vit_shape(state)
    grid = vit_grid(state)
    kwargs: dict[str, Any] = {"img_size": grid * patch} if grid else {}
    size = f"ViT (width {width}, {depth} blocks, patch {patch})"
    if layout == "openai_clip":  # OpenAI CLIP model.py: heads = width // 64; QuickGELU; ln_pre; eps 1e-5
        facts = {"num_heads": width // 64, "norm_eps": 1e-5, "act": "QuickGELU", "pre_norm": True,
                 "global_pool": "token"}
        name = _CLIP_NAMES.get((width, patch))
        described = f"the visual tower of an OpenAI CLIP {size} (OpenAI CLIP model.py, as open_clip builds it)"
        if name is None:
            return Architecture(None, kwargs, facts, described)
        model_kwargs = _with_defaults(name, {"depth": depth, "num_heads": facts["num_heads"]})
        return Architecture(name, {**kwargs, "model_kwargs": model_kwargs} if model_kwargs else kwargs, facts,
                            described)
    heads_by_width, official = _HEADS.get(layout, ({}, ""))
    heads = heads_by_width.get(width)
    if layout == "mocov3" and arch_hint in _MOCOV3_ARCH_HEADS:
        heads = _MOCOV3_ARCH_HEADS[arch_hint]
    if heads is None:  # a bare timm dict, or a width the official code does not define: the user names it
        return Architecture(None, kwargs, {}, f"{describe_state_dict(state)} in the {layout} layout")
    pooled_mean = "fc_norm.weight" in state
    facts = {"num_heads": heads, "norm_eps": 1e-6, "act": "GELU", "pre_norm": False,
             "global_pool": "avg" if pooled_mean else "token"}
    described = f"a {layout} {size} with {heads} heads ({official})"
    if layout in ("beit", "simmim") and is_beit_named(state):
        name = {768: "beit_base_patch16_224", 1024: "beit_large_patch16_224"}[width]
        shared = "rel_pos_bias.relative_position_bias_table" in state
        model_kwargs = {
            "depth": depth, "patch_size": patch, "use_abs_pos_emb": "pos_embed" in state,
            "use_shared_rel_pos_bias": shared,
            "use_rel_pos_bias": any(re.fullmatch(r"blocks\.\d+\.attn\.relative_position_bias_table", k) for k in state),
            # layer scale: the value is loaded, only its presence matters (BEiT's --layer_scale_init_value)
            "init_values": 0.1 if any(k.endswith(".gamma_1") for k in state) else None,
            "global_pool": facts["global_pool"],
        }
        return Architecture(name, {**kwargs, "model_kwargs": _with_beit_defaults(name, model_kwargs)}, facts, described)
    name = _timm_vit_name(_VIT_NAMES[width], patch)
    model_kwargs = _with_defaults(name, {"num_heads": heads, "global_pool": facts["global_pool"]})
    model_kwargs.update(_shape_kwargs(name, depth, patch))
    return Architecture(name, {**kwargs, "model_kwargs": model_kwargs} if model_kwargs else kwargs, facts, described)


def _timm_vit_name(base: str, patch: int) -> str:
    """The timm ViT of this width with this patch size if timm has one, else the width's usual one."""
    import timm

    return next(n for n in (f"{base}_patch{patch}_224", f"{base}_patch16_224", f"{base}_patch14_224") if timm.is_model(n))


def _shape_kwargs(name: str, depth: int, patch: int) -> dict[str, Any]:
    """``depth`` / ``patch_size`` where they differ from what the timm name builds."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0) if timm.is_model(name) else None
    out = {}
    if model is None or len(model.blocks) != depth:
        out["depth"] = depth
    if model is None or model.patch_embed.patch_size[0] != patch:
        out["patch_size"] = patch
    return out


def _with_beit_defaults(name: str, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """BEiT keys that differ from timm's ``beit_*`` defaults (depth 12 / 24, patch 16, per-block bias, avg)."""
    shape = _shape_kwargs(name, model_kwargs["depth"], model_kwargs["patch_size"])
    keep = {k: v for k, v in model_kwargs.items() if k not in ("depth", "patch_size")}
    return {**keep, **shape}


def _architecture(state: Mapping[str, Tensor], layout: str, arch_hint: str | None) -> Architecture:
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in state):
        name = resnet_name(state)
        return Architecture(name, {}, {}, f"a {layout} {name or describe_state_dict(state)} (torchvision ResNet)")
    if vit_shape(state) is not None:
        return _vit_architecture(state, layout, arch_hint)
    return Architecture(None, {}, {}, f"a {layout} {describe_state_dict(state)}")


# ---------------------------------------------------------------------------------------------- entry point
def _is_openai_clip(state: Mapping[str, Tensor]) -> bool:
    return "visual.conv1.weight" in state or ("conv1.weight" in state and "class_embedding" in state)


def recognise(obj: Mapping[str, Any], source: str = "checkpoint", teacher: bool = False) -> Recognised:
    """The backbone weights of a public checkpoint (the loaded top-level dict) under timm names, with the
    layout and the architecture its official code builds.

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
    encoder = "the whole file"
    if _is_state(obj.get("student")) and _is_state(obj.get("teacher")):  # DINO's training checkpoint
        found = _tensors(obj["teacher" if teacher else "student"])
        state = _strip_common(found, "module.")
        layout, has_teacher = "dino", True
        encoder = f"{'teacher' if teacher else 'student'}: backbone.*"
        if any(k.startswith("backbone.") for k in state):
            state, dropped = _take(state, "backbone.", ("head.",))
    else:
        wrapped = next((obj[w] for w in ("state_dict", "model", "module") if _is_state(obj.get(w))), obj)
        found = _tensors(wrapped)
        if not found:
            raise _unknown(obj, found, source, " (no tensors at the top level nor under state_dict / model / module)")
        state = _strip_common(found, "module.")
        layout, has_teacher = "timm", False
        if _is_openai_clip(state):
            layout = "openai_clip"
        elif not _looks_like_backbone(state) and "conv_proj.weight" not in state:
            for name, student, teacher_prefix, heads in _ENCODER_LAYOUTS:
                if any(k.startswith(student) for k in state):
                    layout, has_teacher = name, teacher_prefix is not None
                    prefix = teacher_prefix if teacher and teacher_prefix else student
                    encoder = f"{'teacher' if teacher and teacher_prefix else 'student'}: {prefix}*"
                    state, dropped = _take(state, prefix, heads)
                    if name == "simsiam" and "patch_embed.proj.weight" in state:
                        layout = "simmim"  # SimMIM saves its ViT as encoder.* next to its decoder.*
                    break
        elif "mask_token" in state or any(k.startswith("decoder_") for k in state):
            layout = "mae"  # a full MAE pre-training file: encoder + decoder
    if teacher and not has_teacher:
        raise ValueError(
            f"a teacher backbone was requested but '{source}' is a {layout} checkpoint, not an ssl_zoo pre-training "
            "checkpoint, and holds one model only (no momentum / EMA teacher): evaluate with teacher=False"
        )
    if layout == "openai_clip":
        weights, clip_dropped = _from_openai_clip(state)
        dropped |= clip_dropped
    elif "conv_proj.weight" in state and any(k.startswith("encoder.layers.") for k in state):
        weights, layout = _from_torchvision_vit(state, source), "torchvision"
    else:
        weights = state
        if is_beit_named(weights) and layout in ("timm", "mae"):
            layout = "beit"  # BEiT's names are timm Beit's: kept, so that relative position biases reach a Beit
    leftovers = {k for k in weights if k.startswith(_MIM_LEFTOVERS)}
    dropped |= {k.split(".")[0] + (".*" if "." in k else "") for k in leftovers}
    weights = {k: v for k, v in weights.items() if k not in leftovers and not k.endswith("relative_position_index")}
    if not _looks_like_backbone(weights):
        why = f" (its {layout} backbone part holds no ResNet / ViT / Swin keys)" if layout != "timm" else ""
        raise _unknown(obj, found, source, why)
    arch_hint = obj.get("arch") if isinstance(obj.get("arch"), str) else None
    if layout == "mocov3" and arch_hint and arch_hint.startswith("vit_conv"):
        raise ValueError(f"checkpoint '{source}' is a MoCo v3 {arch_hint} (a convolutional stem, moco-v3 vits.py), "
                         "which timm's ViTs do not build; use a MoCo v3 vit_small / vit_base checkpoint")
    return Recognised(weights, layout, _architecture(weights, layout, arch_hint), encoder, tuple(sorted(dropped)))
