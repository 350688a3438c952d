"""Frozen guidance models that turn an image into per-token regression targets (MVP; Table 5 compares them).

Both teachers map an image batch ``[B, 3, S, S]`` to ``[B, 1+N, D]`` targets: the CLS token first, then
the ``N = (S/p)^2`` patch tokens in raster order, so target ``m`` and a student token ``m`` look at the
same patch when both ViTs share the patch grid.

* :class:`CLIPTeacher` -- the vision tower of an open_clip model (MVP's default guidance: the image
  encoder of CLIP ViT-B/16). Targets are the tokens after the tower's final LayerNorm (``ln_post``) and,
  by default, its projection ``proj`` into the joint image-text space, applied to *every* token.
  open_clip's own ``forward`` applies ``proj`` to the pooled CLS token only (patch tokens come back
  unprojected), so the pass is written out here.
* :class:`TimmTeacher` -- any timm ViT loaded from a local checkpoint (e.g. DINO ViT-B/16), the
  uni-modal guidance of the paper's Table 5. Targets are its tokens after the final norm.

Teachers hold no trainable parameter, stay in eval mode whatever ``train()`` says, and run under
``torch.inference_mode`` (bf16 autocast on GPU). They never import Lightning.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ssl_zoo.augment import NORMALIZATIONS
from ssl_zoo.models.backbones import TOKEN_FAMILIES, Backbone
from ssl_zoo.utils.distributed import rank

__all__ = ["CLIPTeacher", "FrozenTeacher", "TimmTeacher", "build_teacher"]

log = logging.getLogger(__name__)

Normalization = Literal["clip", "imagenet"]


def _warn_random_init(what: str) -> None:
    """Say loudly, once per process and in the rank-zero log, that the guidance model is untrained."""
    message = (
        f"{what} is RANDOMLY INITIALISED: no pretrained weights were given, so the regression targets carry "
        "no semantic information. This is only meant for smoke tests and demos; pass a pretrained tag or a "
        "local checkpoint path for real pre-training."
    )
    warnings.warn(message, UserWarning, stacklevel=3)
    if rank() == 0:
        log.warning(message)


class FrozenTeacher(nn.Module):
    """Common behaviour of the guidance models: frozen, always in eval mode, inference-mode forward.

    Subclasses implement :meth:`extract` (``[B, 3, S, S]`` -> ``[B, 1+N, D]``) and set ``image_size``,
    ``patch_size``, ``out_dim``, ``input_normalization`` and ``pretrained``.
    """

    image_size: int
    patch_size: int
    out_dim: int
    input_normalization: Normalization
    pretrained: str | None

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Stay in eval mode: dropout, patch dropout and drop path of the teacher must never be active."""
        return super().train(False)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid ``(h, w)`` of the teacher's input."""
        return self.image_size // self.patch_size, self.image_size // self.patch_size

    def extract(self, images: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        """Targets ``[B, 1+N, D]`` without autograd history (bf16 on GPU, float32 on CPU).

        The result is cloned out of inference mode so that the loss may save it for the student's
        backward pass (inference tensors cannot be saved by autograd).
        """
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.is_cuda):
            targets = self.extract(images)
        return targets.clone()


class CLIPTeacher(FrozenTeacher):
    """The vision tower of an open_clip model, frozen: MVP's multimodal guidance.

    Target of token ``i`` (CLS first, then the patches):

        t_i = LN_post(h_i) @ W_proj        (project_targets=True, the joint image-text space)
        t_i = LN_post(h_i)                 (project_targets=False, the tower's width)

    where ``h`` is the output of the last transformer block. For the CLS token ``t_0`` equals open_clip's
    image embedding ``encode_image``; the same LayerNorm and projection are applied to every patch token,
    so all ``1+N`` targets live in the space CLIP aligns with text (the choice this project makes for
    MVP's token-wise targets; ``project_targets=False`` gives the pre-projection alternative).

    Args:
        model_name: open_clip architecture (``ViT-B-16`` in the paper, whatever the student's size).
        pretrained: an open_clip pretrained tag (``openai``, ``laion2b_s34b_b88k``...; downloaded and cached
            by open_clip) or the path of a local open_clip checkpoint (full CLIP state dict). ``None`` builds
            a randomly initialised tower and warns.
        image_size: input side; the position embeddings are resized to it when it differs from the
            architecture's (``None`` keeps the architecture's).
        model_cfg: overrides of open_clip's model config (top-level keys ``embed_dim``, ``vision_cfg``,
            ``text_cfg``, ``quick_gelu``...), e.g. a tiny tower for demos and tests.
        project_targets: apply ``proj`` (True, default) or stop after ``ln_post`` (False).
        input_normalization: the statistics the incoming images were normalised with (``clip`` from
            :class:`~ssl_zoo.augment.MVPTransform`). When the checkpoint was trained with other statistics,
            inputs are re-normalised to the tower's own mean/std.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-16",
        pretrained: str | None = None,
        image_size: int | None = None,
        model_cfg: dict | None = None,
        project_targets: bool = True,
        input_normalization: Normalization = "clip",
    ) -> None:
        super().__init__()
        import open_clip
        from open_clip.transformer import VisionTransformer

        if input_normalization not in NORMALIZATIONS:
            raise ValueError(f"input_normalization must be 'clip' or 'imagenet', got '{input_normalization}'")
        kwargs = dict(model_cfg or {})
        if image_size is not None and "vision_cfg" in kwargs:
            # open_clip applies these overrides after `force_image_size`, so the size goes in here too.
            kwargs["vision_cfg"] = {**kwargs["vision_cfg"], "image_size": image_size}
        is_file = bool(pretrained) and os.path.isfile(os.fspath(pretrained))
        tag_cfg = {} if (not pretrained or is_file) else open_clip.get_pretrained_cfg(model_name, pretrained)
        if pretrained and not is_file and not tag_cfg:
            raise ValueError(
                f"teacher pretrained='{pretrained}' is neither a local file nor an open_clip tag of "
                f"'{model_name}' (tags: {open_clip.list_pretrained_tags_by_model(model_name)})"
            )
        clip = open_clip.create_model(
            model_name,
            pretrained=pretrained or None,
            force_image_size=image_size,
            # The tags record the activation they were trained with (OpenAI's CLIP uses QuickGELU).
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
            # open_clip moves the model to `device` (default "cpu"); the default device keeps a model built
            # under `torch.device("meta")` on meta (benchmarks.paper_cost sizes paper configs that way).
            device=torch.get_default_device(),
            **kwargs,
        )
        visual = clip.visual
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
            raise ValueError(
                f"open_clip model '{model_name}' has a {type(visual).__name__} vision tower"
                f"{' with attentional pooling' if getattr(visual, 'attn_pool', None) is not None else ''}; "
                "MVP needs per-patch tokens of a plain open_clip VisionTransformer (ViT-B-16, ViT-L-14, ...)"
            )
        if visual.proj is None and project_targets:
            raise ValueError(
                f"open_clip model '{model_name}' has no image projection: set project_targets=False"
            )
        self.visual = visual  # the text tower is dropped with `clip`
        self.model_name = model_name
        self.pretrained = pretrained or None
        self.project_targets = project_targets
        self.input_normalization = input_normalization
        self.image_size = int(visual.image_size[0])
        self.patch_size = int(visual.patch_size[0])
        if visual.image_size[0] != visual.image_size[1] or visual.patch_size[0] != visual.patch_size[1]:
            raise ValueError(f"open_clip model '{model_name}' must take square images with square patches")
        width = visual.conv1.out_channels
        self.out_dim = int(visual.proj.shape[1]) if project_targets else int(width)

        # Affine map from the pipeline's normalisation to the tower's own: x' = x * scale + shift.
        in_mean, in_std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATIONS[input_normalization])
        pp = getattr(visual, "preprocess_cfg", None) or {}
        own_mean = torch.tensor(pp.get("mean", open_clip.OPENAI_DATASET_MEAN), dtype=torch.float32).view(1, 3, 1, 1)
        own_std = torch.tensor(pp.get("std", open_clip.OPENAI_DATASET_STD), dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("input_scale", in_std / own_std, persistent=False)
        self.register_buffer("input_shift", (in_mean - own_mean) / own_std, persistent=False)
        self.freeze()
        if not pretrained:
            _warn_random_init(f"The CLIP teacher '{model_name}'")

    def extract(self, images: Tensor) -> Tensor:
        """``[B, 3, S, S]`` -> ``[B, 1+N, D]``: CLS and patch tokens after ``ln_post`` (and ``proj``)."""
        v = self.visual
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"the CLIP teacher takes {self.image_size}x{self.image_size} images, "
                f"got {tuple(images.shape[-2:])}"
            )
        x = images * self.input_scale + self.input_shift  # no-op for CLIP-normalised inputs
        x = v.conv1(x.to(v.conv1.weight.dtype))  # [B, W, h, w]
        x = x.flatten(2).transpose(1, 2)  # [B, N, W], raster order like timm's patch_embed
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, W]
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # [B, 1+N, W]
        x = v.ln_pre(v.patch_dropout(x))  # patch dropout is the identity in eval mode
        x = v.transformer(x)  # [B, 1+N, W]
        x = v.ln_post(x)  # final LayerNorm on every token, not only the pooled one
        if self.project_targets:
            x = x @ v.proj  # [B, 1+N, D] joint image-text space
        return x


class TimmTeacher(FrozenTeacher):
    """A timm ViT as uni-modal guidance (MVP Table 5, e.g. DINO ViT-B/16): tokens after the final norm.

    Args:
        name: timm ViT name (``vit_base_patch16_224`` for DINO ViT-B/16).
        pretrained: path of a local state dict of that timm model; ``None`` builds a random one and warns.
        image_size: input side (position embeddings are built for it).
        input_normalization: statistics the model was trained with; the method feeds it the matching view
            (DINO and supervised timm ViTs use ImageNet statistics).
        backbone_kwargs: further :class:`~ssl_zoo.models.Backbone` arguments.
    """

    def __init__(
        self,
        name: str = "vit_base_patch16_224",
        pretrained: str | None = None,
        image_size: int | None = None,
        input_normalization: Normalization = "imagenet",
        backbone_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if input_normalization not in NORMALIZATIONS:
            raise ValueError(f"input_normalization must be 'clip' or 'imagenet', got '{input_normalization}'")
        self.backbone = Backbone(name, pretrained=pretrained, img_size=image_size, **(backbone_kwargs or {}))
        if self.backbone.family not in TOKEN_FAMILIES:
            raise ValueError(f"the timm teacher must be a ViT or BEiT, '{name}' is a {self.backbone.family}")
        if getattr(self.backbone.model, "cls_token", None) is None:
            raise ValueError(f"the timm teacher '{name}' has no CLS token, which MVP's targets need")
        self.pretrained = pretrained or None
        self.input_normalization = input_normalization
        self.patch_size = self.backbone.patch_size
        img = self.backbone.model.patch_embed.img_size
        self.image_size = int(img[0] if isinstance(img, Sequence) else img)
        self.out_dim = self.backbone.num_features
        self.freeze()
        if not pretrained:
            _warn_random_init(f"The timm teacher '{name}'")

    def extract(self, images: Tensor) -> Tensor:
        tokens = self.backbone.forward_tokens(images)  # [B, P+N, D] after the final norm
        p = self.backbone.num_prefix_tokens
        return torch.cat([tokens[:, :1], tokens[:, p:]], dim=1)  # CLS + patches (register tokens dropped)


def build_teacher(
    kind: Literal["clip", "timm"],
    name: str,
    pretrained: str | None = None,
    image_size: int | None = None,
    project_targets: bool = True,
    kwargs: dict | None = None,
) -> FrozenTeacher:
    """``clip`` -> :class:`CLIPTeacher` (``kwargs`` = open_clip ``model_cfg`` overrides), ``timm`` ->
    :class:`TimmTeacher` (``kwargs`` = :class:`~ssl_zoo.models.Backbone` arguments)."""
    if kind == "clip":
        return CLIPTeacher(name, pretrained, image_size=image_size, model_cfg=kwargs,
                           project_targets=project_targets)
    if kind == "timm":
        if not project_targets:
            warnings.warn("project_targets=False has no effect with a timm teacher (it has no projection)",
                          stacklevel=2)
        return TimmTeacher(name, pretrained, image_size=image_size, backbone_kwargs=kwargs)
    raise ValueError(f"teacher must be 'clip' or 'timm', got '{kind}'")
