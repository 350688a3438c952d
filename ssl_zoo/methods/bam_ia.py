"""BAM + IA-CLoss: SimSiam for multi-label images, and the SimSiam baseline.

Paper: "Self-Supervised Contrastive Learning for Multi-Label Images" (Chen). Each image is split into four
overlapping, corner-anchored blocks (Block-wise Augmentation Module, §3.1); each block yields two views
(8 views per image). SimSiam's stop-gradient loss pulls the two views of a block together (L_sim), and the
image-aware contrastive loss (IA-CLoss, Eq. 1) pulls together all views of the same image and pushes away
views of other images in the global batch (L_ia):

    L_total = L_sim + lambda * L_ia                                                   (§3.2)

Eq. 1 writes its embeddings z_i without saying which head gives them, and prints no tau. Where the paper is
silent the defaults follow the authors' code (HHU-JialeChen/SSL, simsiam/builder.py): tau = 0.3, and L_ia is
the mean of two terms, one over [p1; z2] and one over [p2; z1] (each view's prediction beside the other
view's projection, no stop-gradient); ``ia_embeddings="projector"`` puts the projections [z1; z2] in instead.

With ``bam=False, ia_loss="none"`` this module *is* SimSiam (Chen & He 2021): two views of the whole image.
"""

from __future__ import annotations

from typing import Literal

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.utils.debug import std_of_l2_normalized
from lightning.pytorch import LightningModule
from torch import Tensor

from ssl_zoo.augment import BlockwiseAugmentation, shuffle_pairs
from ssl_zoo.augment.views import BlurKind
from ssl_zoo.losses import ImageAwareContrastiveLoss, SupConLoss
from ssl_zoo.models import Backbone, MLPHead, norm_layer_by_name
from ssl_zoo.models.acceleration import accelerate_backbones
from ssl_zoo.utils.optim import global_batch_size, scaled_lr, warmup_cosine_scheduler


class BAMIA(LightningModule):
    """SimSiam + Block-wise Augmentation + Image-Aware Contrastive Loss.

    Args:
        backbone: timm backbone name (ResNet-50 in the paper; any family of the adapter works).
        backbone_kwargs: extra :class:`~ssl_zoo.models.Backbone` arguments (``img_size``, ``model_kwargs``...).
        img_size: side of every view (224 in the paper).
        proj_hidden_dim, proj_dim: SimSiam projector 2048-2048-2048 with BN (output BN without affine).
        pred_hidden_dim: SimSiam predictor bottleneck 2048-512-2048.
        head_norm: normalisation in the heads: ``batch`` (the paper), ``layer`` or ``none`` (batch-size
            independent heads, e.g. to check DDP equivalence without SyncBN).
        bam: four-block augmentation (8 views per image); ``False`` gives SimSiam's two whole-image views.
        overlap: gamma, the extra fraction of width/height each block covers beyond one half, in [0, 0.5].
        min_scale: lower bound of RandomResizedCrop's scale (0.2 in the paper, Table 5 varies it).
        blur: the views' Gaussian blur (p=0.5, sigma in [0.1, 2.0] px): ``pil``, the filter of SimSiam's code
            with no kernel bound, or ``kernel``, SimCLR's kernel of ~10 % of the view side, which keeps the
            blur in proportion to small views (at 32 px a 3-tap kernel; see ``blur_step``).
        ia_loss: ``ia`` (IA-CLoss, Eq. 1), ``supcon`` (the paper's SUP ablation: SupCon with image ids as
            labels) or ``none``.
        ia_embeddings: the embeddings Eq. 1 compares: ``cross`` (the authors' code: the mean of L_ia over
            [p1; z2] and over [p2; z1]) or ``projector`` (one L_ia over the projections [z1; z2]).
        lam: lambda, the weight of L_ia (4 in the paper).
        temperature: tau of the contrastive loss (0.3, the authors' code; the paper prints none).
        base_lr: SGD lr for a batch of 256 images; the lr is ``base_lr * lr_batch_size / 256``.
        lr_batch_size: batch used for lr scaling; ``None`` = the global batch. The paper trains BAM with
            batch 128 but the lr of batch 512 (set 512 in the paper config).
        momentum, weight_decay: SGD settings (0.9, 1e-4).
        fix_predictor_lr: keep the predictor at the initial lr while the rest decays (SimSiam §4.2).
        warmup_epochs: linear warmup before the cosine decay (0 in the papers).
        compile: ``torch.compile`` the backbone's blocks (regional compilation, see
            :mod:`ssl_zoo.models.acceleration`); off by default, compiling takes minutes on a CPU.
        channels_last: channels-last convolution weights and input images (faster bf16 ResNets on GPUs).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        backbone_kwargs: dict | None = None,
        img_size: int = 224,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 2048,
        pred_hidden_dim: int = 512,
        head_norm: Literal["batch", "layer", "none"] = "batch",
        bam: bool = True,
        overlap: float = 0.2,
        min_scale: float = 0.2,
        blur: BlurKind = "pil",
        ia_loss: Literal["ia", "supcon", "none"] = "ia",
        ia_embeddings: Literal["cross", "projector"] = "cross",
        lam: float = 4.0,
        temperature: float = 0.3,
        base_lr: float = 0.05,
        lr_batch_size: int | None = None,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        fix_predictor_lr: bool = True,
        warmup_epochs: int = 0,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= overlap <= 0.5:
            raise ValueError(f"model.overlap (gamma) must lie in [0, 0.5], got {overlap}")
        if ia_loss not in ("ia", "supcon", "none"):
            raise ValueError(f"model.ia_loss must be 'ia', 'supcon' or 'none', got '{ia_loss}'")
        if ia_embeddings not in ("cross", "projector"):
            raise ValueError(f"model.ia_embeddings must be 'cross' or 'projector', got '{ia_embeddings}'")
        self.save_hyperparameters()

        self.backbone = Backbone(backbone, **(backbone_kwargs or {}))
        d = self.backbone.num_features
        norm = norm_layer_by_name(head_norm)
        self.projector = MLPHead(d, [proj_hidden_dim, proj_hidden_dim], proj_dim, norm_layer=norm, last_norm=True)
        self.predictor = MLPHead(proj_dim, [pred_hidden_dim], proj_dim, norm_layer=norm)
        self.similarity_loss = NegativeCosineSimilarity()
        self.contrastive_loss = {
            "ia": ImageAwareContrastiveLoss(temperature=temperature),
            "supcon": SupConLoss(temperature=temperature),
            "none": None,
        }[ia_loss]

    # ------------------------------------------------------------------ data hooks
    def min_batch_size(self) -> tuple[int, str]:
        """Smallest per-process batch and why (checked by the data module before training)."""
        # The heads see P = B * V/2 pairs per forward: 4B with BAM, only B for SimSiam's two views, and
        # BatchNorm cannot normalise a single sample.
        if self.hparams.head_norm == "batch" and not self.hparams.bam:
            return 2, ("the projector and predictor normalise with BatchNorm over the batch; "
                       "or set model.init_args.head_norm: layer")
        return 1, ""

    def train_transform(self) -> BlockwiseAugmentation:
        """One image -> 8 views (4 blocks x 2) with BAM, or SimSiam's 2 views without."""
        return BlockwiseAugmentation(size=self.hparams.img_size, overlap=self.hparams.overlap,
                                     min_scale=self.hparams.min_scale, bam=self.hparams.bam,
                                     blur=self.hparams.blur)

    # ------------------------------------------------------------------ training
    def configure_model(self) -> None:
        """Lightning hook, run before the strategy wraps the model: the optional backbone speed-ups."""
        accelerate_backbones(self, compile=self.hparams.compile, channels_last=self.hparams.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        """Pooled backbone features ``[B, D]`` (what downstream evaluation uses)."""
        return self.backbone(x)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        # Views: [B, V, 3, S, S] with V = 8 (BAM) or 2 (SimSiam); pairs are the two views of one block.
        x1, x2, row, _block = shuffle_pairs(batch["views"], batch["block_ids"])  # [P, 3, S, S] x2, P = B*V/2
        image_ids = batch["index"][row]  # dataset index: unique per image across all ranks

        # Encode and project each view batch separately, as SimSiam does (BN statistics per view).
        z1 = self.projector(self.backbone(x1))  # [P, proj_dim]
        z2 = self.projector(self.backbone(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)

        # L_sim: symmetric negative cosine with stop-gradient on the target branch (SimSiam Eq. 3-4).
        # Cosines in float32: under bf16 autocast the heads return bfloat16 (8-bit mantissa).
        p1, p2, z1, z2 = p1.float(), p2.float(), z1.float(), z2.float()
        loss_sim = 0.5 * (self.similarity_loss(p1, z2.detach()) + self.similarity_loss(p2, z1.detach()))
        loss = loss_sim
        batch_size = batch["views"].shape[0]
        if self.contrastive_loss is not None:
            loss_ia = self.image_aware_term(p1, p2, z1, z2, image_ids)
            loss = loss_sim + self.hparams.lam * loss_ia  # Eq. 3
            self.log("train/loss_ia", loss_ia, on_epoch=True, sync_dist=True, batch_size=batch_size)

        self.log("train/loss_sim", loss_sim, on_epoch=True, sync_dist=True, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=batch_size)
        # Collapse indicator: std of the l2-normalised embedding, ~1/sqrt(d) when healthy, 0 when collapsed.
        self.log("train/z_std", std_of_l2_normalized(z1.detach()), on_epoch=True, batch_size=batch_size)
        return loss

    def image_aware_term(self, p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor, image_ids: Tensor) -> Tensor:
        """L_ia (Eq. 1) over every view of the global batch; ``p*, z*: [P, proj_dim]``, ``image_ids: [P]``."""
        ids = torch.cat([image_ids, image_ids])  # [2P]: both views of a pair come from one image
        if self.hparams.ia_embeddings == "projector":
            return self.contrastive_loss(torch.cat([z1, z2]), ids)  # [2P, proj_dim]
        # The authors' code (HHU-JialeChen/SSL simsiam/builder.py): two terms, each over one view's predictions
        # and the other view's projections ([2P, proj_dim]), averaged; the projections keep their gradient.
        return 0.5 * (self.contrastive_loss(torch.cat([p1, z2]), ids)
                      + self.contrastive_loss(torch.cat([p2, z1]), ids))

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        lr = scaled_lr(hp.base_lr, hp.lr_batch_size or global_batch_size(self.trainer))
        groups = [
            {"params": [*self.backbone.parameters(), *self.projector.parameters()], "name": "encoder"},
            {"params": list(self.predictor.parameters()), "name": "predictor"},
        ]
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        total = self.trainer.estimated_stepping_batches
        warmup = int(hp.warmup_epochs * total / max(self.trainer.max_epochs or 1, 1))
        scheduler = warmup_cosine_scheduler(optimizer, total, warmup,
                                            constant_groups=(1,) if hp.fix_predictor_lr else ())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
