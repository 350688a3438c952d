"""MVP: masked image modelling with the features of a frozen CLIP image encoder as targets.

Paper: "MVP: Multimodality-guided Visual Pre-training" (Wei et al., ECCV 2022). BEiT-style pre-training in
which the regression targets are not dVAE codes but the tokens of CLIP's image encoder, a model trained to
align images with text, so the student inherits multimodal semantics:

* the image is colour-jittered and cropped once; the student ViT sees it with ~40% of its patches (up to 75
  of 14 x 14) replaced by a learnable mask token (BEiT block-wise masking), the frozen CLIP ViT-B/16 sees it
  unmasked;
* one fully-connected layer maps every student output token into CLIP's feature space (§3.4);
* the loss is the negative token-wise cosine similarity, CLS token included (Eq. 9).

With ``teacher="timm"`` the guidance is a uni-modal timm ViT (e.g. DINO), the ablation of Table 5.

The student is BEiT's ViT in the paper configs (timm ``beit_base_patch16_224`` / ``beit_large_patch16_224``
with one relative position bias shared by all blocks and no absolute position embedding, as BEiT pre-trains
it); any timm ViT works. Pre-training details MVP inherits from BEiT (its paper and ``run_beit_pretraining.py``)
are the constructor defaults: colour jitter 0.4, BEiT's own block-wise mask sampler, AdamW betas (0.9, 0.98),
a cosine schedule down to ``min_lr`` 1e-5.
"""

from __future__ import annotations

from typing import Literal

import torch
from lightly.utils.debug import std_of_l2_normalized
from lightning.pytorch import LightningModule
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn

from ssl_zoo.augment import MVPTransform
from ssl_zoo.losses import mvp_alignment_loss
from ssl_zoo.models import Backbone
from ssl_zoo.models.acceleration import accelerate_backbones
from ssl_zoo.models.backbones import TOKEN_FAMILIES
from ssl_zoo.models.teachers import build_teacher
from ssl_zoo.utils.optim import NO_WEIGHT_DECAY, global_batch_size, scaled_lr, warmup_cosine_scheduler


class MVP(LightningModule):
    """Multimodality-guided visual pre-training: a masked ViT regresses frozen CLIP tokens.

    Args:
        backbone: timm ViT or BEiT of the student (ViT-B/16 and ViT-L/16 in the paper; the paper configs use
            timm's BEiT models, see the module docstring).
        backbone_kwargs: extra :class:`~ssl_zoo.models.Backbone` arguments: ``img_size``, ``drop_path_rate``
            (BEiT's stochastic depth 0.1) and ``model_kwargs`` (layer scale ``init_values``, BEiT's shared
            relative position bias...).
        img_size: crop side of the student and the teacher (224).
        num_masking_patches: patches masked per image (75 of 196 at 224 px, BEiT block-wise masking); at most
            this many with ``mask_sampling="beit"``, exactly this many with ``"exact"``.
        min_num_patches: smallest masked rectangle in patches (16).
        mask_sampling: ``beit`` (BEiT's own sampler, :class:`~ssl_zoo.augment.BEiTMaskGenerator`: the last
            rectangles may be smaller than ``min_num_patches`` and it gives up after 10 failed draws, so a
            mask may hold a few patches less) or ``exact`` (:class:`~ssl_zoo.augment.BlockwiseMaskGenerator`,
            exactly ``num_masking_patches``). The paper says "block-wise masking as BEiT" without more; the
            default follows BEiT's code.
        min_scale: lower bound of the crop's area fraction (0.08, BEiT).
        color_jitter: ColorJitter strength (brightness, contrast, saturation) applied to the image before
            the crop (0.4: BEiT's pre-training hyperparameters and BEiT v2's ``--color_jitter`` default; BEiT
            v1's public ``datasets.py`` applies none, which ``0`` reproduces).
        teacher: ``clip`` (open_clip vision tower, the paper) or ``timm`` (a timm ViT, Table 5).
        teacher_name: open_clip architecture (``ViT-B-16`` whatever the student's size, as in the paper) or
            timm model name.
        teacher_pretrained: open_clip tag (``openai``, ``laion2b_s34b_b88k``...) or a local checkpoint path;
            ``None`` builds a random teacher and warns (demos and tests only).
        teacher_kwargs: open_clip model-config overrides (``clip``) or Backbone arguments (``timm``).
        project_targets: CLIP targets after ``ln_post`` and ``proj`` (True: the joint image-text space) or
            after ``ln_post`` only (False: the tower's width).
        loss_on: ``all`` tokens (Eq. 9 as printed) or the CLS token plus the ``masked`` patches only.
        base_lr: AdamW lr for a batch of ``lr_reference`` images, scaled linearly (1.5e-3 at 2048).
        lr_reference: the batch ``base_lr`` is given for (2048).
        lr_batch_size: batch used for scaling; ``None`` = the global batch.
        weight_decay: 0.05, not applied to norms, biases, tokens and position embeddings.
        betas: AdamW betas (0.9, 0.98).
        warmup_epochs: linear warmup before the cosine decay (10).
        warmup_lr: lr of the first warmup step, rising linearly to the peak (BEiT's ``--warmup_lr`` 1e-6;
            BEiT's pre-training script declares it but does not pass it to its scheduler, so its code warms
            up from 0, which ``0`` reproduces).
        min_lr: lr the cosine decays to (BEiT's ``--min_lr`` 1e-5; absolute, not scaled with the batch; with a
            tiny batch whose scaled peak lr is below it the cosine rises to it, as BEiT's scheduler does).
        compile: ``torch.compile`` the backbone's blocks (regional compilation, see
            :mod:`ssl_zoo.models.acceleration`); off by default, compiling takes minutes on a CPU.
        channels_last: channels-last convolution weights and input images (faster bf16 ResNets on GPUs).
    """

    def __init__(
        self,
        backbone: str = "vit_base_patch16_224",
        backbone_kwargs: dict | None = None,
        img_size: int = 224,
        num_masking_patches: int = 75,
        min_num_patches: int = 16,
        mask_sampling: Literal["beit", "exact"] = "beit",
        min_scale: float = 0.08,
        color_jitter: float = 0.4,
        teacher: Literal["clip", "timm"] = "clip",
        teacher_name: str = "ViT-B-16",
        teacher_pretrained: str | None = None,
        teacher_kwargs: dict | None = None,
        project_targets: bool = True,
        loss_on: Literal["all", "masked"] = "all",
        base_lr: float = 1.5e-3,
        lr_reference: int = 2048,
        lr_batch_size: int | None = None,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_epochs: int = 10,
        warmup_lr: float = 1e-6,
        min_lr: float = 1e-5,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if loss_on not in ("all", "masked"):
            raise ValueError(f"model.loss_on must be 'all' or 'masked', got '{loss_on}'")
        if teacher not in ("clip", "timm"):
            raise ValueError(f"model.teacher must be 'clip' or 'timm', got '{teacher}'")
        if mask_sampling not in ("beit", "exact"):
            raise ValueError(f"model.mask_sampling must be 'beit' or 'exact', got '{mask_sampling}'")
        if warmup_lr < 0 or min_lr < 0:
            raise ValueError(f"model.warmup_lr and model.min_lr must be >= 0, got {warmup_lr} and {min_lr}")
        self.save_hyperparameters()

        # Student: ViT whose masked patch embeddings are replaced by a learnable token (BEiT Eq. 1).
        self.backbone = Backbone(backbone, **(backbone_kwargs or {}))
        if self.backbone.family not in TOKEN_FAMILIES or getattr(self.backbone.model, "cls_token", None) is None:
            raise ValueError(f"MVP's student must be a timm ViT or BEiT with a CLS token, got '{backbone}'")
        student_grid = self.backbone.patch_grid(img_size)
        self.mask_token = nn.Parameter(torch.zeros(self.backbone.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)  # BEiT's initialisation

        # Teacher: frozen guidance model on the same, unmasked crop.
        self.teacher_backbone = build_teacher(teacher, teacher_name, teacher_pretrained, image_size=img_size,
                                              project_targets=project_targets, kwargs=teacher_kwargs)
        teacher_grid, teacher_patch = self.teacher_backbone.grid_size, self.teacher_backbone.patch_size
        if teacher_grid != student_grid:
            raise ValueError(
                f"patch grids differ: at img_size={img_size} the student '{backbone}' sees "
                f"{student_grid[0]}x{student_grid[1]} patches of {self.backbone.patch_size} px, the teacher "
                f"'{teacher_name}' {teacher_grid[0]}x{teacher_grid[1]} patches of {teacher_patch} px; token m"
                " of both must see the same patch, so give the student and the teacher the same patch size"
                " (e.g. ViT-B-16 with a */16 student)"
            )

        # Prediction head: one fully-connected layer into the teacher's feature space (§3.4).
        self.head = nn.Linear(self.backbone.num_features, self.teacher_backbone.out_dim)

    # ------------------------------------------------------------------ data hook
    def train_transform(self) -> MVPTransform:
        """One crop -> student view (ImageNet statistics), teacher view (CLIP statistics), block-wise mask."""
        hp = self.hparams
        return MVPTransform(size=hp.img_size, patch_size=self.backbone.patch_size,
                            num_masking_patches=hp.num_masking_patches, min_num_patches=hp.min_num_patches,
                            min_scale=hp.min_scale, color_jitter=hp.color_jitter, mask_sampling=hp.mask_sampling)

    # ------------------------------------------------------------------ training
    def configure_model(self) -> None:
        """Lightning hook, run before the strategy wraps the model: the optional backbone speed-ups."""
        accelerate_backbones(self, compile=self.hparams.compile, channels_last=self.hparams.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        """Pooled student features ``[B, D]`` (what downstream evaluation uses)."""
        return self.backbone(x)

    def predict_tokens(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Student predictions ``[B, 1+N, D_teacher]`` (CLS first) for images ``x`` with patch ``mask``."""
        tokens = self.backbone.forward_tokens(x, mask, self.mask_token)  # [B, P+N, D]
        p = self.backbone.num_prefix_tokens
        tokens = torch.cat([tokens[:, :1], tokens[:, p:]], dim=1)  # [B, 1+N, D], register tokens dropped
        return self.head(tokens)  # [B, 1+N, D_teacher]

    def teacher_input(self, batch: dict[str, Tensor]) -> Tensor:
        """The unmasked crop normalised the way the teacher was trained: ``[B, 3, S, S]``."""
        if self.teacher_backbone.input_normalization == "clip":
            return batch["teacher_views"][:, 0]
        return batch["views"][:, 0]  # same pixels, ImageNet statistics (DINO / supervised timm teachers)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x = batch["views"][:, 0]  # [B, 3, S, S] student view, ImageNet-normalised
        mask = batch["mask"].flatten(1).bool()  # [B, N], True = masked patch
        batch_size = x.shape[0]

        target = self.teacher_backbone(self.teacher_input(batch))  # [B, 1+N, D_t], no autograd history
        pred = self.predict_tokens(x, mask)  # [B, 1+N, D_t]

        # Eq. 9: negative cosine similarity averaged over the CLS token and the (masked) patch tokens.
        loss = mvp_alignment_loss(pred, target, mask if self.hparams.loss_on == "masked" else None)

        self.log("train/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=batch_size)
        with torch.no_grad():
            cls_cos = torch.cosine_similarity(pred[:, 0].float(), target[:, 0].float(), dim=-1).mean()
            patch_cos = torch.cosine_similarity(pred[:, 1:].float(), target[:, 1:].float(), dim=-1)  # [B, N]
        self.log("train/cos_cls", cls_cos, on_epoch=True, sync_dist=True, batch_size=batch_size)
        # Mean over the masked patches of the batch. BEiT's sampler may (on tiny grids) give up before
        # masking anything, so an empty selection logs 0 rather than NaN on that rank.
        cos_masked = (patch_cos * mask).sum() / mask.sum().clamp(min=1)
        self.log("train/cos_masked", cos_masked, on_epoch=True, sync_dist=True, batch_size=batch_size)
        # Collapse indicator on the student's CLS prediction: ~1/sqrt(d) when healthy, 0 when collapsed.
        self.log("train/z_std", std_of_l2_normalized(pred[:, 0].detach().float()), on_epoch=True,
                 batch_size=batch_size)
        return loss

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        batch = hp.lr_batch_size or global_batch_size(self.trainer)
        lr = scaled_lr(hp.base_lr, batch, reference=hp.lr_reference)  # 1.5e-3 x batch / 2048
        # The frozen teacher has requires_grad=False and is skipped by timm's param_groups_weight_decay.
        groups = param_groups_weight_decay(self, hp.weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY)
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(hp.betas))
        total = self.trainer.estimated_stepping_batches
        warmup = int(hp.warmup_epochs * total / max(self.trainer.max_epochs or 1, 1))
        # BEiT's cosine_scheduler: linspace(warmup_lr, lr) over the warmup steps, then cosine down to min_lr.
        scheduler = warmup_cosine_scheduler(optimizer, total, warmup, final_ratio=hp.min_lr / lr,
                                            start_ratio=hp.warmup_lr / lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
