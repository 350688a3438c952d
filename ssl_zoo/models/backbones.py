"""One small adapter over timm backbones (ResNet, ViT, BEiT, Swin).

Every method needs some of three views of a backbone's output:

* ``forward(x)``        pooled embedding ``[B, D]`` (timm ``forward_head(pre_logits=True)``);
* ``forward_tokens(x)`` the token sequence ``[B, 1+N, D]`` with CLS first (ViT and BEiT);
* ``forward_map(x)``    the last-stage spatial feature map ``[B, D, H, W]`` (every family).

ViT, BEiT and Swin also accept a patch mask and a mask token: the embeddings of masked patches are replaced
by the token before the transformer blocks, as BEiT (MVP) and SimMIM (HVP-MTL) do.

BEiT (timm ``beit_base_patch16_224`` / ``beit_large_patch16_224``, family ``beit``) is a ViT with relative
position biases in attention instead of (or beside) absolute position embeddings. BEiT pre-training (and MVP,
which follows it) shares one relative position bias table across all blocks and has no absolute position
embedding: ``model_kwargs: {use_shared_rel_pos_bias: true, use_rel_pos_bias: false, use_abs_pos_emb: false,
global_pool: token}`` (the last key keeps the final LayerNorm on every token, as BEiT's pre-training model
does; timm's default ``avg`` pooling is BEiT's fine-tuning head). timm's defaults for these names are BEiT's
fine-tuning layout: one relative position bias table per block and mean pooling with ``fc_norm``.

Only timm's public API and documented module attributes are used. Nothing is ever downloaded:
``pretrained`` is ``None`` or a local checkpoint path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import timm
from torch import Tensor, nn

from ssl_zoo.utils.safe_load import read_checkpoint

Family = Literal["resnet", "vit", "beit", "swin"]
#: Families whose output is a token sequence with a CLS token first (``forward_tokens``).
TOKEN_FAMILIES: tuple[str, ...] = ("vit", "beit")

# The architectures the project is tested with; any timm model of these four families works.
SUPPORTED_EXAMPLES = (
    "resnet18",
    "resnet50",
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "vit_large_patch16_224",
    "beit_base_patch16_224",
    "beit_large_patch16_224",
    "swin_tiny_patch4_window7_224",
    "swin_small_patch4_window7_224",
    "swin_base_patch4_window7_224",
)


def _family_of(model: nn.Module) -> Family | None:
    from timm.models.beit import Beit
    from timm.models.resnet import ResNet
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, ResNet):
        return "resnet"
    if isinstance(model, VisionTransformer):
        return "vit"
    if isinstance(model, Beit):
        return "beit"
    if isinstance(model, SwinTransformer):
        return "swin"
    return None


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from a local ``.pt/.pth/.ckpt`` or ``.safetensors`` file, without running code.

    Checkpoints that wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"checkpoint file '{path}' does not exist (ssl_zoo never downloads weights: give a local path)"
        )
    obj: Any = read_checkpoint(path)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    return obj


class Backbone(nn.Module):
    """A timm model without classifier plus the three feature views the methods need.

    Args:
        name: timm model name, e.g. ``resnet50``, ``vit_base_patch16_224``, ``swin_base_patch4_window7_224``.
        pretrained: ``None`` (random init) or the path of a local state dict of the timm model.
        img_size: input resolution for ViT/Swin (position embeddings / windows are built for it).
        drop_path_rate: stochastic depth (ViT/Swin/ResNet all accept it in timm).
        model_kwargs: any further ``timm.create_model`` keyword (e.g. ``window_size`` for small Swin inputs).
    """

    def __init__(
        self,
        name: str = "resnet50",
        pretrained: str | None = None,
        img_size: int | None = None,
        drop_path_rate: float = 0.0,
        model_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        kwargs = dict(model_kwargs or {})
        # ResNets take any input size and timm's ResNet constructor has no img_size (any name of timm's
        # resnet module: resnet50, seresnet50, resnext50_32x4d, test_resnet ...).
        if img_size is not None and not timm.models.is_model_in_modules(name, ["resnet"]):
            kwargs["img_size"] = img_size
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        try:
            self.model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        except RuntimeError as err:  # timm raises RuntimeError for unknown names
            raise ValueError(
                f"backbone '{name}' is not a timm model ({err}); examples: {', '.join(SUPPORTED_EXAMPLES)}"
            ) from err
        family = _family_of(self.model)
        if family is None:
            raise ValueError(
                f"backbone '{name}' is a {type(self.model).__name__}; the adapter supports the timm ResNet, "
                f"VisionTransformer, Beit and SwinTransformer families ({', '.join(SUPPORTED_EXAMPLES)})"
            )
        self.name = name
        self.family: Family = family
        self.num_features: int = self.model.num_features
        if pretrained:
            missing, unexpected = self.model.load_state_dict(load_state_dict_file(pretrained), strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"weights in '{pretrained}' do not match backbone '{name}': "
                    f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                    f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
                )

    # ------------------------------------------------------------------ geometry
    @property
    def embed_dim(self) -> int:
        """Width of the patch embeddings (where a mask token lives): ViT/BEiT ``D``, Swin first-stage width."""
        if self.family in ("vit", "beit", "swin"):
            return self.model.embed_dim
        raise ValueError(f"backbone '{self.name}' ({self.family}) has no patch embedding to mask")

    @property
    def patch_size(self) -> int:
        """Input pixels per side of one patch embedding (ViT/BEiT 16, Swin 4); ResNets have none."""
        if self.family in ("vit", "beit", "swin"):
            ps = self.model.patch_embed.patch_size
            return int(ps[0] if isinstance(ps, tuple | list) else ps)
        raise ValueError(f"backbone '{self.name}' ({self.family}) has no patch embedding")

    @property
    def output_stride(self) -> int:
        """Input pixels per side of one cell of ``forward_map``'s output."""
        if self.family in TOKEN_FAMILIES:
            return self.patch_size
        return 32  # ResNet C5 and Swin stage 4 both downsample by 32

    def patch_grid(self, img_size: int) -> tuple[int, int]:
        """The patch-embedding grid ``(h, w)`` for a square input of ``img_size`` pixels."""
        p = self.patch_size
        if img_size % p:
            raise ValueError(f"input size {img_size} is not a multiple of {self.name}'s patch size {p}")
        return img_size // p, img_size // p

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.model, "num_prefix_tokens", 0)) if self.family in TOKEN_FAMILIES else 0

    # ------------------------------------------------------------------ forwards
    def forward(self, x: Tensor) -> Tensor:
        """Pooled embedding ``[B, num_features]``."""
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def forward_features(self, x: Tensor) -> Tensor:
        """timm's unpooled features (ResNet ``[B,C,H,W]``, ViT ``[B,1+N,D]``, Swin ``[B,H,W,C]``)."""
        return self.model.forward_features(x)

    @staticmethod
    def _apply_mask(x: Tensor, mask: Tensor | None, mask_token: Tensor | None) -> Tensor:
        """Replace masked patch embeddings by the mask token (BEiT Eq. 1, SimMIM §3.1).

        ``x``: ``[B, N, D]`` or ``[B, H, W, D]``; ``mask``: ``[B, N]`` or ``[B, H, W]`` (True = masked).
        """
        if mask is None:
            return x
        if mask_token is None:
            raise ValueError("a mask was given without a mask token")
        if mask.shape != x.shape[:-1]:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not match the patch grid {tuple(x.shape[:-1])}"
            )
        w = mask.unsqueeze(-1).to(x.dtype)
        return x * (1.0 - w) + mask_token.to(x.dtype).reshape(1, *([1] * (x.dim() - 2)), -1) * w

    @contextmanager
    def _masked_patch_embeddings(self, mask: Tensor | None, mask_token: Tensor | None) -> Iterator[None]:
        """Inside the ``with`` block, timm's patch embedding hands the masked patches' embeddings over as the
        mask token, so timm's own forward (position embeddings, blocks, final norm) runs on the masked input.

        ``mask``: ``Bool[B, h, w]`` or ``Bool[B, N]`` over the patch grid; ``None`` masks nothing.
        """
        if mask is None:
            yield
            return
        if self.family == "resnet":
            raise ValueError(f"masked inputs need a ViT or Swin backbone, '{self.name}' is a ResNet")

        def replace(_module: nn.Module, _inputs: Any, embeddings: Tensor) -> Tensor:
            # ViT/BEiT embeddings are [B, N, D], Swin's channels-last [B, h, w, C]
            grid_mask = mask.flatten(1) if embeddings.dim() == 3 else mask
            return self._apply_mask(embeddings, grid_mask, mask_token)

        handle = self.model.patch_embed.register_forward_hook(replace)
        try:
            yield
        finally:
            handle.remove()

    def forward_tokens(self, x: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None) -> Tensor:
        """ViT / BEiT token sequence ``[B, 1+N, D]`` (CLS first, after the final norm): timm's ``forward_features``.

        ``mask``: ``Bool[B, h, w]`` or ``Bool[B, N]`` over the patch grid; masked patch embeddings are
        replaced by ``mask_token`` (``[D]``) before position embeddings are added, as in BEiT.
        """
        if self.family not in TOKEN_FAMILIES:
            raise ValueError(f"forward_tokens needs a ViT or BEiT backbone, '{self.name}' is a {self.family}")
        with self._masked_patch_embeddings(mask, mask_token):
            return self.model.forward_features(x)

    def forward_map(self, x: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None) -> Tensor:
        """Last-stage spatial feature map ``[B, C, H, W]`` for every family: timm's ``forward_intermediates``.

        ResNet: C5. ViT/BEiT: patch tokens after the final norm on the patch grid. Swin: stage-4 output after
        the final norm. ``mask`` (ViT/BEiT/Swin): ``Bool[B, h, w]`` over the patch-embedding grid.
        """
        with self._masked_patch_embeddings(mask, mask_token):
            (feature_map,) = self.model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
        return feature_map
