"""MPCL on MoCo v3: Mp projectors, each followed by its own predictor, with in-batch negatives.

Paper: "Retaining Diverse Information in Contrastive Learning through Multiple Projectors" (Zhu, Yu), §III and
Table VII ("MoCo v3 (Visual Transformer)"). The query encoder f_theta feeds ``Mp`` projectors g^m_theta, each with
a predictor; the momentum encoder f_xi with momentum copies g^m_xi gives the keys. Projector m's prediction of one
view is contrasted with its key of the other view against the keys of the other images of the global batch
(Eq. 1 as MoCo v3 writes it, both directions summed); PCR (Eq. 2) pushes the projectors' outputs for one image
apart; PTB (Eq. 3) weights each projector's loss by its accuracy over the last completed epoch:

    L = (1/Mp) * sum_m ( w_m * L_m + lam * PCR_m )                                             (Eq. 4)

The constructor defaults are MoCo v3's ViT-B/16 recipe (Chen, Xie, He 2021, Table 11 / main_moco.py): 3-layer
4096-4096-256 BN projectors and 2-layer 4096 predictors, tau 0.2, the loss scaled by 2 tau, the key encoder's momentum
rising from 0.99 to 1 on a half cosine (``--moco-m-cos``), the ViT built as MoCo v3 builds it (fixed 2-D sin-cos
position embedding, its initialisation, frozen random patch projection; :mod:`ssl_zoo.models.moco_vit`), AdamW lr
1.5e-4 x B / 256 with weight decay 0.1 on every parameter, 40 warmup epochs, BYOL's views; and the MPCL paper's:
4 projectors sharing the hidden layers, PCR with lambda 0.01, PTB with epsilon 0.5. The heads' BatchNorm should see
the global batch, as in MoCo v3 (``trainer.sync_batchnorm``). With ``num_projectors=1`` this is MoCo v3.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from lightly.utils.scheduler import cosine_schedule
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from ssl_zoo.augment import TwoViewTransform, mocov3_transform
from ssl_zoo.augment.views import BlurKind
from ssl_zoo.losses import MPCLLoss, moco_v3_info_nce
from ssl_zoo.losses.ptb import PTBScale
from ssl_zoo.methods.mpcl.parts import (
    check_arguments,
    end_ptb_epoch,
    log_step,
    lr_schedule,
    per_projector,
    projector_widths,
    start_ptb_epoch,
    update_key_encoder,
)
from ssl_zoo.models import Backbone, MLPHead, norm_layer_by_name
from ssl_zoo.models.acceleration import accelerate_backbones
from ssl_zoo.models.moco_vit import init_moco_v3_vit
from ssl_zoo.models.multi_projector import MultiProjector, ProjectorInit, count_parameters
from ssl_zoo.utils.ema import OncePerOptimizerStep
from ssl_zoo.utils.optim import LARS, global_batch_size, scaled_lr

__all__ = ["MPCLMoCoV3"]


class MPCLMoCoV3(LightningModule):
    """Multi-projector contrastive learning on MoCo v3; ``num_projectors=1`` is MoCo v3.

    Args:
        backbone: timm backbone name (ViT-B/16 in the paper; MoCo v3's ResNet-50 recipe works too).
        backbone_kwargs: extra :class:`~ssl_zoo.models.Backbone` arguments (``img_size``, ``model_kwargs``...).
        img_size: side of both views (224).
        num_projectors: ``Mp >= 1`` (4 in the paper; 1 = MoCo v3).
        projector_hidden_dims: hidden width of the projectors (4096), one int for all or, with ``shared_hidden``
            off, one per projector (Table VII, "Diff.").
        proj_dim: output width of every projector and predictor (256).
        pred_hidden_dim: hidden width of the predictors (4096).
        head_norm: normalisation in the projectors and predictors: ``batch`` (MoCo v3), ``layer`` or ``none``.
        shared_hidden: the projectors share their hidden layers and each owns its output layer; ``False``: one
            whole MLP per projector.
        projector_dropout: Table II alternative: dropout in front of each projector's output layer, an independent
            mask per projector, on the query side only. 0 = off.
        projector_init: Table II alternative: ``mixed`` alternates Kaiming and Xavier over the projectors.
        temperature: tau of every projector's InfoNCE (0.2).
        ema_momentum: the key encoder's momentum at the start of its cosine ramp to 1 (0.99).
        freeze_patch_embed: keep a ViT's random patch projection fixed (MoCo v3 §4.2, for stability); ignored for
            other backbones.
        moco_vit_init: build a ViT as MoCo v3 does (fixed 2-D sin-cos position embedding, xavier-uniform with q/k/v
            split, its patch-projection init; :func:`~ssl_zoo.models.moco_vit.init_moco_v3_vit`); ignored for others.
        pcr: add the projector contrastive regulariser (Eq. 2), averaged over the two views' projections.
        orthogonality: Table II alternative: the projectors' own weights pushed to be mutually orthogonal, in
            Eq. 4's regulariser slot, weight ``lam``.
        ptb: weight the projectors' losses by PTB (Eq. 3); ``False`` keeps ``w_m = 1``.
        ptb_scale: ``projectors`` or ``literal``, see :mod:`ssl_zoo.losses.ptb`.
        lam: lambda, the weight of the regulariser in Eq. 4 (0.01).
        epsilon: the softmax temperature of PTB in Eq. 3 (0.5).
        optimizer: ``adamw`` (MoCo v3's ViT recipe), ``lars`` (its ResNet recipe) or ``sgd``.
        base_lr: lr for a batch of 256 images; the lr is ``base_lr * lr_batch_size / 256`` (1.5e-4).
        lr_batch_size: batch used for lr scaling; ``None`` = the global batch.
        momentum: SGD and LARS momentum (0.9).
        weight_decay: on every parameter (0.1); LARS leaves biases and norms out, as MoCo v3's.
        warmup_epochs: linear lr warmup before the cosine decay (40).
        min_scale: lower bound of the views' RandomResizedCrop area fraction (0.08, BYOL's views).
        blur: the views' Gaussian blur: ``pil``, the filter of the reference code, or ``kernel``, SimCLR's kernel.
        compile: ``torch.compile`` the backbone's blocks (:mod:`ssl_zoo.models.acceleration`); minutes on a CPU.
        channels_last: channels-last convolution weights and input images (faster bf16 ResNets on GPUs).
    """

    def __init__(
        self,
        backbone: str = "vit_base_patch16_224",
        backbone_kwargs: dict | None = None,
        img_size: int = 224,
        num_projectors: int = 4,
        projector_hidden_dims: int | list[int] = 4096,
        proj_dim: int = 256,
        pred_hidden_dim: int = 4096,
        head_norm: Literal["batch", "layer", "none"] = "batch",
        shared_hidden: bool = True,
        projector_dropout: float = 0.0,
        projector_init: ProjectorInit = "default",
        temperature: float = 0.2,
        ema_momentum: float = 0.99,
        freeze_patch_embed: bool = True,
        moco_vit_init: bool = True,
        pcr: bool = True,
        orthogonality: bool = False,
        ptb: bool = True,
        ptb_scale: PTBScale = "projectors",
        lam: float = 0.01,
        epsilon: float = 0.5,
        optimizer: Literal["adamw", "lars", "sgd"] = "adamw",
        base_lr: float = 1.5e-4,
        lr_batch_size: int | None = None,
        momentum: float = 0.9,
        weight_decay: float = 0.1,
        warmup_epochs: int = 40,
        min_scale: float = 0.08,
        blur: BlurKind = "pil",
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        check_arguments(num_projectors=num_projectors, lam=lam, epsilon=epsilon, temperature=temperature,
                        ema_momentum=ema_momentum, min_scale=min_scale)
        widths = projector_widths(projector_hidden_dims, num_projectors, shared_hidden)
        self.save_hyperparameters()

        # f_theta; a ViT as MoCo v3's vits.py builds it.
        self.backbone = Backbone(backbone, **(backbone_kwargs or {}))
        if self.backbone.family == "vit":
            if moco_vit_init:  # MoCo v3 §4.2 / vits.py: sin-cos positions, its init, (frozen) patch projection
                init_moco_v3_vit(self.backbone.model, freeze_patch_projection=freeze_patch_embed)
            if freeze_patch_embed:  # MoCo v3 §4.2: a fixed random patch projection avoids the instability spikes
                self.backbone.model.patch_embed.requires_grad_(False)
        # g^m_theta: MoCo v3's 3-layer MLP with BN (the output BN without affine), then a 2-layer predictor each.
        norm = norm_layer_by_name(head_norm)
        self.projectors = MultiProjector(self.backbone.num_features, widths, depth=2, output_dim=proj_dim,
                                         norm_layer=norm, last_norm=True, shared_hidden=shared_hidden,
                                         dropout=projector_dropout, init=projector_init)
        self.predictors = nn.ModuleList(MLPHead(proj_dim, [pred_hidden_dim], proj_dim, norm_layer=norm, last_norm=True)
                                        for _ in range(num_projectors))
        # f_xi and g^m_xi: momentum copies, no gradient; the keys are targets, so no dropout noise on them.
        self.teacher_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.teacher_projectors = copy.deepcopy(self.projectors).requires_grad_(False)
        self.teacher_projectors.dropout = 0.0
        self.mpcl_loss = MPCLLoss(num_projectors, lam=lam, pcr=pcr, orthogonality=orthogonality, ptb=ptb,
                                  epsilon=epsilon, ptb_scale=ptb_scale)
        self._total_steps: int | None = None
        self._ema_due = OncePerOptimizerStep()

    # ------------------------------------------------------------------ data hooks
    def min_batch_size(self) -> tuple[int, str]:
        """Smallest per-process batch and why (checked by the data module before training)."""
        if self.hparams.head_norm == "batch":  # BatchNorm cannot normalise a single sample
            return 2, "the projectors normalise with BatchNorm over the batch; or set model.init_args.head_norm: layer"
        return 1, ""

    def train_transform(self) -> TwoViewTransform:
        """One image -> MoCo v3's (BYOL's) two asymmetric views, ``{"views": [2, 3, S, S]}``."""
        return mocov3_transform(self.hparams.img_size, min_scale=self.hparams.min_scale, blur=self.hparams.blur)

    # ------------------------------------------------------------------ encoders
    def configure_model(self) -> None:
        """Lightning hook, run before the strategy wraps the model: the optional backbone speed-ups."""
        accelerate_backbones(self, compile=self.hparams.compile, channels_last=self.hparams.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        """Pooled backbone features ``[B, D]`` (what downstream evaluation uses)."""
        return self.backbone(x)

    def predict(self, z: Tensor) -> Tensor:
        """Each projector's predictor on its output: ``[Mp, B, proj_dim]`` -> queries ``[Mp, B, proj_dim]``."""
        return torch.stack([predictor(z_m) for predictor, z_m in zip(self.predictors, z, strict=True)])

    @torch.no_grad()
    def keys(self, x: Tensor) -> Tensor:
        """Momentum keys g^m_xi(f_xi(x)) ``[Mp, B, proj_dim]`` (no shuffled BN: MoCo v3 synchronises BN instead)."""
        return self.teacher_projectors(self.teacher_backbone(x))

    def num_query_parameters(self) -> int:
        """Trainable query-side parameters: backbone + projectors + predictors (no key encoder, nothing frozen)."""
        return count_parameters(self.backbone, self.projectors, self.predictors)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x1, x2 = batch["views"][:, 0], batch["views"][:, 1]  # [B, 3, S, S] each
        z1, k2 = self.projectors(self.backbone(x1)), self.keys(x2)  # [Mp, B, D] each; the keys without gradient
        z2, k1 = self.projectors(self.backbone(x2)), self.keys(x1)
        # Eq. 1 per projector both ways, negatives from the global batch; MoCo v3 sums the two directions (its
        # 2 tau scale assumes it), the accuracy is their mean.
        losses_12, accs_12 = per_projector(moco_v3_info_nce, self.predict(z1), k2, temperature=self.hparams.temperature)
        losses_21, accs_21 = per_projector(moco_v3_info_nce, self.predict(z2), k1, temperature=self.hparams.temperature)
        losses, accs = losses_12 + losses_21, (accs_12 + accs_21) / 2  # [Mp], [Mp]
        # Eq. 2-4: PCR on both views' projections (before the predictors), this epoch's PTB weights.
        loss, stats = self.mpcl_loss(losses, accs, [z1, z2], x1.shape[0], self.projectors.distinct_weights())
        log_step(self, loss, stats, z1[0], x1.shape[0])
        return loss

    def on_train_epoch_start(self) -> None:
        start_ptb_epoch(self.mpcl_loss.ptb, self.current_epoch)

    def on_train_epoch_end(self) -> None:
        end_ptb_epoch(self.mpcl_loss.ptb, self._trainer, self.current_epoch)

    # ------------------------------------------------------------------ momentum encoder
    def ema_momentum_at(self, step: int, total_steps: int) -> float:
        """MoCo v3's momentum after ``step`` of ``total_steps`` optimiser steps:
        ``m = 1 - (1 - m0) * (1 + cos(pi * step / total)) / 2``, reaching 1 at the last step."""
        # lightly's schedule reaches its end value at step max_steps - 1, MoCo v3's reaches 1 at step K: K + 1 steps.
        total = max(total_steps, 1)
        return cosine_schedule(min(step, total), total + 1, self.hparams.ema_momentum, 1.0)

    def on_train_start(self) -> None:
        self._total_steps = int(self.trainer.estimated_stepping_batches)
        self._ema_due.start(self.global_step)  # the steps a resumed run already took are not new

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """The key encoder follows the query encoder after each optimiser step (MoCo Eq. 2), once per step under
        gradient accumulation."""
        if not self._ema_due(self.global_step):
            return
        m = self.ema_momentum_at(self.global_step, self._total_steps if self._total_steps is not None else 1)
        update_key_encoder(self, m)
        self.log("train/ema_momentum", m, on_step=True, on_epoch=False, batch_size=1)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        lr = scaled_lr(hp.base_lr, hp.lr_batch_size or global_batch_size(self.trainer))
        # Neither the key encoder nor a ViT's fixed position embedding and frozen patch projection are trained.
        params = [p for p in self.parameters() if p.requires_grad]
        if hp.optimizer == "adamw":  # weight decay on every parameter, as MoCo v3
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=hp.weight_decay)
        elif hp.optimizer == "lars":  # MoCo v3's ResNet recipe; LARS leaves biases and norms (ndim 1) alone
            optimizer = LARS(params, lr=lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.SGD(params, lr=lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        return lr_schedule(self, optimizer, hp.warmup_epochs)
