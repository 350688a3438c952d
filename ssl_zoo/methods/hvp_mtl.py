"""HVP-MTL: heuristic vision pre-training with supervised and self-supervised multi-task learning.

Paper: "Heuristic Vision Pre-Training with Self-Supervised and Supervised Multi-Task Learning" (Qian, 2023).
One encoder (Swin-B or ViT-B) is trained on Tencent ML-Images by four heads at once (§3):

* multi-label classification (L_mcls, Eq. 1): a Query2Label decoder whose C label embeddings Q0 query the
  encoder's last feature map F0 (projected to ``d``), a group-wise linear classifier, and the weighted
  asymmetric loss;
* online clustering (L_cl, Eq. 2-3): SwAV's projection MLP + K L2-normalised prototypes, equipartitioned
  codes from Sinkhorn-Knopp over the global batch, and the swapped prediction loss between the two views,
  ``l(f_t, q_s) + l(f_s, q_t)``: the sum of both terms as Eq. 2 writes it (SwAV's code takes their mean);
* masked image modelling (L_mim, Eq. 4): SimMIM, a learnable mask token in place of masked patch embeddings,
  a 1x1 convolution + PixelShuffle decoder and the L1 loss on the masked pixels;
* momentum distillation (L_mom, Eq. 6): an EMA teacher of encoder + projection + decoder; the cosine
  similarities S(g, Q0) between an image embedding g and the label embeddings are softmax-normalised and
  matched between student and teacher with a symmetric KL divergence, ``(KL(S, S') + KL(S', S)) / 2``.

    L = a1 * L_mcls + a2 * L_cl + a3 * L_mim + a4 * L_mom,   a = (0.001, 0.02, 1.0, 10.0)     (Eq. 7)

An ``alpha_* = 0`` removes that task entirely: its head is not built, its loss not computed (the paper's
leave-one-out ablation, Table 5).

Which view feeds which head (``HVPTransform`` gives two augmented views and one mask, §3.1):

* view 0 with the mask -> encoder -> MIM decoder (L_mim);
* views 0 and 1 unmasked, encoded together in one pass -> mean-pooled F0 -> clustering (L_cl, swapped);
* view 1 unmasked (the same features, not encoded again) -> Query2Label decoder -> L_mcls, and the student
  side of L_mom; the teacher encodes the same view 1 (momentum distillation compares predictions on one
  input, as in ALBEF). Without clustering only view 1 is encoded unmasked.

Choices the paper leaves open (options of the constructor):

* g, the image embedding of S(g, Q0): the mean of the decoder's C output tokens (``distill_embedding=
  "decoder_mean"``), or the mean of the decoder's memory, the projected and encoded image tokens
  (``"memory_mean"``);
* the softmax temperature of S (``distill_temperature``): Eq. 6 writes none, so 1.0 (S is a cosine in
  [-1, 1], so the softmax is soft; 0.1 would spread it over a logit range of 20, an option for other
  readings);
* the pooling of F0 before the clustering MLP: the spatial mean (Swin's own head pools the same way; for
  ViT the mean of the patch tokens);
* the teacher runs in eval mode (no dropout / stochastic depth in its targets).

SwAV details the paper inherits with its clustering task (§3.2): the prototypes are frozen for the first
``freeze_prototypes_niters`` optimiser steps (SwAV's default 313: their gradient is dropped before the
optimiser step, the forward pass is unchanged), and ``train/sinkhorn_clamped`` logs the fraction of
``scores / epsilon`` entries that the ``T_max`` clamp (``sinkhorn_clamp_max``) cuts.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightly.models.utils import update_momentum
from lightly.utils.debug import std_of_l2_normalized
from lightning.pytorch import LightningModule
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn

from ssl_zoo.augment import HVPTransform
from ssl_zoo.losses import (
    SwappedPredictionLoss,
    WeightedAsymmetricLoss,
    masked_l1_loss,
    sinkhorn_clamped_fraction,
    sinkhorn_knopp,
    symmetric_kl_divergence,
)
from ssl_zoo.losses.precision import float32_math
from ssl_zoo.models import Backbone, MLPHead, norm_layer_by_name
from ssl_zoo.models.acceleration import accelerate_backbones
from ssl_zoo.models.query2label import Query2LabelDecoder
from ssl_zoo.utils.ema import OncePerOptimizerStep
from ssl_zoo.utils.optim import NO_WEIGHT_DECAY, global_batch_size, scaled_lr, warmup_cosine_scheduler

__all__ = ["HVPMTL", "label_similarity"]

TASKS = ("mcls", "cl", "mim", "mom")


@float32_math
def label_similarity(g: Tensor, label_embeddings: Tensor) -> Tensor:
    """S(g, Q0) of HVP-MTL Eq. 6: cosine similarity of each image embedding with each label embedding.

    Args:
        g: ``[B, d]`` image embeddings.
        label_embeddings: ``[C, d]``, the decoder's label queries Q0.

    Returns:
        ``[B, C]`` float32 cosines in ``[-1, 1]``; computed in float32 also under bf16 autocast, since
        they are divided by the distillation temperature before the softmax of Eq. 6.
    """
    return F.normalize(g.float(), dim=-1) @ F.normalize(label_embeddings.float(), dim=-1).T  # [B, C]


class HVPMTL(LightningModule):
    """Multi-label classification + clustering + SimMIM + momentum distillation on one encoder (Eq. 7).

    Args:
        backbone: timm Swin or ViT (``swin_base_patch4_window7_224`` in the paper; ViT-B in Tables 1 and 5,
            Swin-T/S in Table 6). ResNets work only with ``alpha_mim=0`` (no patch embedding to mask).
        backbone_kwargs: extra :class:`~ssl_zoo.models.Backbone` arguments; ``img_size`` must equal
            ``img_size`` below (``model_kwargs: {window_size: ...}`` for small Swin inputs).
        num_classes: C, labels of the multi-label data (11,166 for Tencent ML-Images).
        img_size: side of both views (224).
        alpha_mcls, alpha_cl, alpha_mim, alpha_mom: a1..a4 of Eq. 7 (0.001, 0.02, 1.0, 10.0); 0 removes the task.
        decoder_dim, decoder_layers, decoder_encoder_layers, decoder_heads, decoder_ffn_dim, decoder_dropout,
            decoder_norm_first, decoder_self_attention, decoder_input_proj, decoder_position_embedding: the
            Query2Label head (:class:`~ssl_zoo.models.query2label.Query2LabelDecoder`, where each default's source
            is written): Query2Label's training defaults, d = 2048, 2 decoder and 1 encoder layers, 4 heads,
            feed-forward 8192, dropout 0.1, post-norm, no self-attention among the label queries (cost linear in
            C), sine position code on the keys; plus the linear projection d0 -> d that §3.2 adds.
        asl_eta, asl_gamma_pos, asl_gamma_neg: eta, gamma+, gamma- of the weighted asymmetric loss (Eq. 1).
        num_prototypes: K, clustering prototypes (3000).
        cluster_hidden_dim, cluster_dim: SwAV projection MLP d0 -> 2048 -> 128.
        head_norm: normalisation in the projection MLP: ``batch`` (SwAV), ``layer`` or ``none``.
        cluster_temperature: tau of the swapped prediction (Eq. 2-3, 0.1).
        sinkhorn_epsilon, sinkhorn_iterations, sinkhorn_clamp_max: Sinkhorn-Knopp settings (0.05, 3, 10).
        freeze_prototypes_niters: optimiser steps during which the prototypes receive no update (SwAV's
            default 313, its first epoch at batch 4096; SwAV's batch-256 and batch-2048 scripts use 5005);
            0 trains them from the first step.
        mask_patch_size, mask_ratio: SimMIM masking (32 px patches, 60%).
        ema_momentum: m of the teacher update ``theta_t <- m * theta_t + (1 - m) * theta_s`` (0.995).
        distill_temperature: softmax temperature of S(g, Q0) in Eq. 6 (the equation has none: 1.0).
        distill_embedding: g of Eq. 6, ``decoder_mean`` or ``memory_mean`` (see the module docstring).
        randaugment, color_jitter, rotation, min_scale: view augmentation (§3.1), see
            :class:`~ssl_zoo.augment.HVPTransform`.
        base_lr: AdamW peak lr for a batch of ``lr_reference`` images, scaled linearly (1e-4 at 1024).
        lr_reference: the batch ``base_lr`` is given for (1024).
        lr_batch_size: batch used for scaling; ``None`` = the global batch.
        weight_decay: 0.05, not applied to norms, biases and tokens.
        betas: AdamW betas.
        warmup_epochs: linear warmup to the peak lr (5), then cosine decay.
        final_lr_ratio: lr at the end of the cosine as a fraction of the peak (1e-3: 1e-4 -> 1e-7).
        compile: ``torch.compile`` the backbone's blocks (regional compilation, see
            :mod:`ssl_zoo.models.acceleration`); off by default, compiling takes minutes on a CPU.
        channels_last: channels-last convolution weights and input images (faster bf16 ResNets on GPUs).
    """

    def __init__(
        self,
        backbone: str = "swin_base_patch4_window7_224",
        backbone_kwargs: dict | None = None,
        num_classes: int = 11166,
        img_size: int = 224,
        alpha_mcls: float = 0.001,
        alpha_cl: float = 0.02,
        alpha_mim: float = 1.0,
        alpha_mom: float = 10.0,
        decoder_dim: int = 2048,
        decoder_layers: int = 2,
        decoder_encoder_layers: int = 1,
        decoder_heads: int = 4,
        decoder_ffn_dim: int = 8192,
        decoder_dropout: float = 0.1,
        decoder_norm_first: bool = False,
        decoder_self_attention: bool = False,
        decoder_input_proj: bool = True,
        decoder_position_embedding: bool = True,
        asl_eta: float = 10.0,
        asl_gamma_pos: float = 4.0,
        asl_gamma_neg: float = 1.0,
        num_prototypes: int = 3000,
        cluster_hidden_dim: int = 2048,
        cluster_dim: int = 128,
        head_norm: Literal["batch", "layer", "none"] = "batch",
        cluster_temperature: float = 0.1,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        sinkhorn_clamp_max: float | None = 10.0,
        freeze_prototypes_niters: int = 313,
        mask_patch_size: int = 32,
        mask_ratio: float = 0.6,
        ema_momentum: float = 0.995,
        distill_temperature: float = 1.0,
        distill_embedding: Literal["decoder_mean", "memory_mean"] = "decoder_mean",
        randaugment: str | None = "rand-m9-mstd0.5-inc1",
        color_jitter: float = 0.4,
        rotation: float = 10.0,
        min_scale: float = 0.08,
        base_lr: float = 1e-4,
        lr_reference: int = 1024,
        lr_batch_size: int | None = None,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: int = 5,
        final_lr_ratio: float = 1e-3,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        alphas = {"mcls": alpha_mcls, "cl": alpha_cl, "mim": alpha_mim, "mom": alpha_mom}
        for task, value in alphas.items():
            if value < 0:
                raise ValueError(f"model.alpha_{task} must be >= 0 (0 removes the task), got {value}")
        if not any(alphas.values()):
            raise ValueError("at least one of model.alpha_mcls, alpha_cl, alpha_mim, alpha_mom must be > 0")
        if num_classes < 1:
            raise ValueError(f"model.num_classes must be >= 1, got {num_classes}")
        if num_prototypes < 1:
            raise ValueError(f"model.num_prototypes must be >= 1, got {num_prototypes}")
        if freeze_prototypes_niters < 0:
            raise ValueError(f"model.freeze_prototypes_niters must be >= 0, got {freeze_prototypes_niters}")
        if not 0.0 <= ema_momentum <= 1.0:
            raise ValueError(f"model.ema_momentum must lie in [0, 1], got {ema_momentum}")
        if distill_temperature <= 0:
            raise ValueError(f"model.distill_temperature must be > 0, got {distill_temperature}")
        if distill_embedding not in ("decoder_mean", "memory_mean"):
            raise ValueError(
                f"model.distill_embedding must be 'decoder_mean' or 'memory_mean', got '{distill_embedding}'"
            )
        self.save_hyperparameters()
        self.alphas = alphas

        # Encoder: F0 = the last stage's map [B, d0, H, W].
        self.backbone = Backbone(backbone, **(backbone_kwargs or {}))
        self._check_img_size(img_size)
        d0 = self.backbone.num_features

        # Multi-label head (Eq. 1): input projection d0 -> d + Query2Label's encoder and label-query decoder +
        # group-wise classifier. Distillation (Eq. 6) needs the decoder and the label embeddings Q0 even without
        # L_mcls.
        self.decoder = None
        if alpha_mcls > 0 or alpha_mom > 0:
            self.decoder = Query2LabelDecoder(
                d0, num_classes, dim=decoder_dim, num_layers=decoder_layers,
                num_encoder_layers=decoder_encoder_layers, num_heads=decoder_heads, ffn_dim=decoder_ffn_dim,
                dropout=decoder_dropout, norm_first=decoder_norm_first, self_attention=decoder_self_attention,
                input_proj=decoder_input_proj, position_embedding=decoder_position_embedding,
                classifier=alpha_mcls > 0,
            )
        self.asl = WeightedAsymmetricLoss(asl_eta, asl_gamma_pos, asl_gamma_neg) if alpha_mcls > 0 else None

        # Clustering head (Eq. 2-3): projection MLP -> L2 norm -> K prototypes (SwAV).
        self.cluster_projector = self.prototypes = self.swapped_prediction = None
        if alpha_cl > 0:
            self.cluster_projector = MLPHead(d0, [cluster_hidden_dim], cluster_dim,
                                             norm_layer=norm_layer_by_name(head_norm))
            self.prototypes = nn.Linear(cluster_dim, num_prototypes, bias=False)
            self.swapped_prediction = SwappedPredictionLoss(cluster_temperature)

        # MIM head (Eq. 4, SimMIM): mask token in the patch embedding space + 1x1 conv + PixelShuffle.
        self.mask_token = self.mim_decoder = None
        if alpha_mim > 0:
            if self.backbone.family == "resnet":
                raise ValueError(f"masked image modelling needs a ViT or Swin backbone, got '{backbone}'; "
                                 f"set model.alpha_mim: 0 to train a ResNet without L_mim")
            self.mask_token = nn.Parameter(torch.zeros(self.backbone.embed_dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)  # SimMIM's initialisation
            stride = self.backbone.output_stride
            self.mim_decoder = nn.Sequential(
                nn.Conv2d(d0, stride**2 * 3, kernel_size=1),  # one RGB patch of stride x stride per cell
                nn.PixelShuffle(stride),  # [B, 3*s^2, H, W] -> [B, 3, H*s, W*s]
            )

        # Momentum teacher: EMA of encoder + projection + decoder, never back-propagated.
        self.teacher_backbone = self.teacher_decoder = None
        if alpha_mom > 0:
            self.teacher_backbone = copy.deepcopy(self.backbone).requires_grad_(False).eval()
            self.teacher_decoder = copy.deepcopy(self.decoder).requires_grad_(False).eval()
        self._ema_due = OncePerOptimizerStep()

    def _check_img_size(self, img_size: int) -> None:
        if self.backbone.family == "resnet":
            return
        built = self.backbone.model.patch_embed.img_size
        built = tuple(built) if isinstance(built, tuple | list) else (built, built)
        if built != (img_size, img_size):
            raise ValueError(
                f"model.img_size={img_size} but the backbone '{self.backbone.name}' is built for {built[0]} px: "
                f"set model.backbone_kwargs.img_size: {img_size}"
            )

    # ------------------------------------------------------------------ data hook
    def train_transform(self) -> HVPTransform:
        """One image -> two augmented views ``[2, 3, S, S]`` and a SimMIM mask for view 0 (§3.1)."""
        hp = self.hparams
        # A ResNet (alpha_mim = 0) has no patch grid; its mask is drawn on the mask-patch grid and never used.
        patch = self.backbone.patch_size if self.backbone.family != "resnet" else hp.mask_patch_size
        return HVPTransform(size=hp.img_size, model_patch_size=patch, mask_patch_size=hp.mask_patch_size,
                            mask_ratio=hp.mask_ratio, randaugment=hp.randaugment, color_jitter=hp.color_jitter,
                            rotation=hp.rotation, min_scale=hp.min_scale)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.decoder is None or datamodule is None:
            return
        try:
            data_classes = int(datamodule.num_classes)
        except (AttributeError, NotImplementedError, TypeError):
            return
        if data_classes != self.hparams.num_classes:
            raise ValueError(f"model.num_classes={self.hparams.num_classes} but the data has {data_classes} "
                             f"classes: set model.init_args.num_classes: {data_classes}")

    def configure_model(self) -> None:
        """Lightning hook, run before the strategy wraps the model: the optional backbone speed-ups."""
        accelerate_backbones(self, compile=self.hparams.compile, channels_last=self.hparams.channels_last)

    # ------------------------------------------------------------------ student / teacher pieces
    def forward(self, x: Tensor) -> Tensor:
        """Pooled encoder features ``[B, D]`` (what downstream evaluation uses)."""
        return self.backbone(x)

    def normalize_prototypes(self) -> None:
        """Project the prototypes back onto the unit sphere (SwAV: once per step, before the forward)."""
        with torch.no_grad():
            w = self.prototypes.weight  # [K, cluster_dim]
            w.copy_(F.normalize(w, dim=1))

    def image_embedding(self, decoder: Query2LabelDecoder, feature_map: Tensor, tokens: Tensor | None) -> Tensor:
        """g of Eq. 6, ``[B, d]``: mean of the decoder's class tokens or of its memory (the encoded image tokens)."""
        if self.hparams.distill_embedding == "decoder_mean":
            return tokens.mean(dim=1)  # [B, C, d] -> [B, d]
        return decoder.memory(feature_map).mean(dim=1)  # [B, H*W, d] -> [B, d]

    @torch.no_grad()
    def teacher_similarity(self, x: Tensor) -> Tensor:
        """Teacher S(g_t, Q0_t) ``[B, C]`` on unmasked images ``x``."""
        f = self.teacher_backbone.forward_map(x)  # [B, d0, H, W]
        tokens = self.teacher_decoder.decode(f) if self.hparams.distill_embedding == "decoder_mean" else None
        g = self.image_embedding(self.teacher_decoder, f, tokens)  # [B, d]
        return label_similarity(g, self.teacher_decoder.query_embed)  # [B, C]

    def pixel_mask(self, mask: Tensor) -> Tensor:
        """Patch-grid mask ``[B, h, w]`` -> pixel mask ``[B, 1, S, S]`` (1 = masked pixel)."""
        p = self.backbone.patch_size
        return mask.repeat_interleave(p, dim=1).repeat_interleave(p, dim=2).unsqueeze(1)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        views = batch["views"]  # [B, 2, 3, S, S]
        x0, x1 = views[:, 0], views[:, 1]  # [B, 3, S, S] each
        batch_size = views.shape[0]
        losses: dict[str, Tensor] = {}

        # L_mim (Eq. 4): view 0 with masked patch embeddings -> F0 -> pixels; L1 on the masked pixels of the
        # normalised input (SimMIM's target).
        if self.mim_decoder is not None:
            mask = batch["mask"].bool()  # [B, h, w] on the patch-embedding grid
            f_masked = self.backbone.forward_map(x0, mask, self.mask_token)  # [B, d0, H, W]
            recon = self.mim_decoder(f_masked)  # [B, 3, S, S]
            losses["mim"] = masked_l1_loss(recon, x0, self.pixel_mask(mask))

        # Unmasked encoder pass: both views for clustering, view 1 alone otherwise.
        f1 = pooled = None
        if self.prototypes is not None:
            f = self.backbone.forward_map(torch.cat([x0, x1]))  # [2B, d0, H, W]
            f1 = f[batch_size:]  # [B, d0, H, W], view 1
            pooled = f.mean(dim=(2, 3))  # [2B, d0]
        elif self.decoder is not None:
            f1 = self.backbone.forward_map(x1)  # [B, d0, H, W]

        # L_cl (Eq. 2-3): prototype scores of each view; codes by Sinkhorn-Knopp over the global batch;
        # each view predicts the other's codes.
        if self.prototypes is not None:
            self.normalize_prototypes()
            z = F.normalize(self.cluster_projector(pooled), dim=1)  # [2B, cluster_dim]
            scores = self.prototypes(z)  # [2B, K], cosines with the unit prototypes
            s0, s1 = scores.chunk(2)  # [B, K] each
            hp = self.hparams
            q0, q1 = (sinkhorn_knopp(s.detach(), hp.sinkhorn_epsilon, hp.sinkhorn_iterations, hp.sinkhorn_clamp_max)
                      for s in (s0, s1))  # [B, K] each, no gradient
            losses["cl"] = self.swapped_prediction(s0, s1, q0, q1)  # Eq. 2: l(f_0, q_1) + l(f_1, q_0)
            self.log("train/cluster_z_std", std_of_l2_normalized(z.detach()), on_epoch=True, batch_size=batch_size)
            # Share of the [2B, K] entries that the T_max clamp cut before exp (equal batches on every rank,
            # so the mean over ranks is the global share).
            clamped = sinkhorn_clamped_fraction(scores.detach(), hp.sinkhorn_epsilon, hp.sinkhorn_clamp_max)
            self.log("train/sinkhorn_clamped", clamped, on_epoch=True, sync_dist=True, batch_size=batch_size)

        # L_mcls (Eq. 1) and L_mom (Eq. 6) on view 1.
        if self.decoder is not None:
            logits, tokens = self.decoder(f1)  # [B, C] (None without L_mcls), [B, C, d]
            if logits is not None:
                target = batch["target"]  # [B, C] multi-hot (or confidences)
                if target.shape != logits.shape:
                    raise ValueError(f"batch['target'] has shape {tuple(target.shape)}, expected multi-hot "
                                     f"[B, {self.hparams.num_classes}] (model.num_classes)")
                losses["mcls"] = self.asl(logits, target)
            if self.teacher_decoder is not None:
                g = self.image_embedding(self.decoder, f1, tokens)  # [B, d]
                s_student = label_similarity(g, self.decoder.query_embed)  # [B, C]
                s_teacher = self.teacher_similarity(x1)  # [B, C]
                # Eq. 6: (KL(p_s || p_t) + KL(p_t || p_s)) / 2 of p = softmax(S / T), T = 1 unless set.
                losses["mom"] = symmetric_kl_divergence(s_student, s_teacher, self.hparams.distill_temperature)
            if pooled is None:
                pooled = f1.mean(dim=(2, 3))  # [B, d0]

        # Eq. 7: weighted sum of the tasks that are switched on.
        loss = sum(self.alphas[task] * value for task, value in losses.items())
        for task, value in losses.items():
            self.log(f"train/loss_{task}", value, on_epoch=True, sync_dist=True, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=batch_size)
        # Collapse indicator on the pooled encoder features: ~1/sqrt(d) when healthy, 0 when collapsed.
        if pooled is None:
            pooled = f_masked.mean(dim=(2, 3))  # MIM only
        self.log("train/z_std", std_of_l2_normalized(pooled.detach().float()), on_epoch=True,
                 batch_size=batch_size)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """SwAV's prototype freezing: for the first ``freeze_prototypes_niters`` optimiser steps the prototypes'
        gradient is dropped (``grad = None``, as SwAV's training loop does), so the optimiser leaves them
        untouched (no update, no weight decay, no moment estimates); the forward pass is unchanged."""
        if self.prototypes is not None and self.global_step < self.hparams.freeze_prototypes_niters:
            self.prototypes.weight.grad = None

    # ------------------------------------------------------------------ momentum teacher
    def train(self, mode: bool = True) -> HVPMTL:
        """The teacher always runs in eval mode: its targets carry no dropout or stochastic depth."""
        super().train(mode)
        for teacher in (self.teacher_backbone, self.teacher_decoder):
            if teacher is not None:
                teacher.eval()
        return self

    @torch.no_grad()
    def update_teacher(self) -> None:
        """theta_t <- m * theta_t + (1 - m) * theta_s for encoder, projection and decoder (teacher of L_mom).

        The teacher runs in eval mode, so its BatchNorm layers (a ResNet encoder; ViT and Swin have none) never
        compute statistics of their own, unlike MoCo's train-mode key encoder: they take the student's.
        """
        if self.teacher_backbone is None:
            return
        m = self.hparams.ema_momentum
        for teacher, student in ((self.teacher_backbone, self.backbone), (self.teacher_decoder, self.decoder)):
            update_momentum(student, teacher, m)
            for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
                t.copy_(s)

    def on_train_start(self) -> None:
        self._ema_due.start(self.global_step)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._ema_due(self.global_step):  # once per optimiser step, also under gradient accumulation
            self.update_teacher()

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        lr = scaled_lr(hp.base_lr, hp.lr_batch_size or global_batch_size(self.trainer), reference=hp.lr_reference)
        # AdamW, no weight decay on norms, biases and tokens; the teacher (requires_grad=False) is skipped.
        groups = param_groups_weight_decay(self, hp.weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY)
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(hp.betas))
        total = self.trainer.estimated_stepping_batches
        warmup = int(hp.warmup_epochs * total / max(self.trainer.max_epochs or 1, 1))
        scheduler = warmup_cosine_scheduler(optimizer, total, warmup, final_ratio=hp.final_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
