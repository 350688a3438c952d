"""MPCL on MoCo v2: Mp projectors, each with its own momentum copy and its own queue of negatives.

Paper: "Retaining Diverse Information in Contrastive Learning through Multiple Projectors" (Zhu, Yu), §III, on
"the official MoCo code" (§IV-A). The query encoder f_theta feeds ``Mp`` projectors g^m_theta; the momentum encoder
f_xi with momentum copies g^m_xi gives the keys. Projector m contrasts its query with its key against the
negatives of its own queue (Eq. 1, each queue only ever receives its own projector's keys); PCR (Eq. 2) pushes the
projectors' outputs for one image apart; PTB (Eq. 3) weights each projector's loss by its accuracy over the last
completed epoch:

    L = (1/Mp) * sum_m ( w_m * L_m + lam * PCR_m )                                             (Eq. 4)

The constructor defaults are MoCo v2's ResNet-50 recipe (Chen et al. 2020, "Improved Baselines"; main_moco.py with
``--mlp --moco-t 0.2 --aug-plus --cos``): a 2048-128 MLP without BN, tau 0.2, 65,536 keys, momentum 0.999, shuffled
BN, SGD lr 0.03 x B / 256 with weight decay 1e-4 on every parameter and a cosine decay, crops of at least 20 %; and
the MPCL paper's: 4 projectors sharing the hidden layer (the layout of its parameter counts, Table III), PCR with
lambda 0.01, PTB with epsilon 0.5. With ``num_projectors=1`` this is MoCo v2 (PCR and PTB vanish).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from lightly.models.utils import batch_shuffle_distributed, batch_unshuffle_distributed
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from ssl_zoo.augment import TwoViewTransform, mocov2_transform
from ssl_zoo.augment.views import BlurKind
from ssl_zoo.losses import KeyQueue, MPCLLoss, moco_v2_info_nce
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
from ssl_zoo.models import Backbone, norm_layer_by_name
from ssl_zoo.models.acceleration import accelerate_backbones
from ssl_zoo.models.multi_projector import MultiProjector, ProjectorInit, count_parameters
from ssl_zoo.utils.distributed import world_size
from ssl_zoo.utils.ema import OncePerOptimizerStep
from ssl_zoo.utils.optim import global_batch_size, scaled_lr

__all__ = ["MPCLMoCoV2"]


class MPCLMoCoV2(LightningModule):
    """Multi-projector contrastive learning on MoCo v2; ``num_projectors=1`` is MoCo v2.

    Args:
        backbone: timm backbone name (ResNet-50 in the paper).
        backbone_kwargs: extra :class:`~ssl_zoo.models.Backbone` arguments (``img_size``, ``model_kwargs``...).
        img_size: side of both views (224).
        num_projectors: ``Mp >= 1`` (4 in the paper; 1 = MoCo v2).
        projector_hidden_dims: hidden width of the projectors (2048), one int for all or, with ``shared_hidden``
            off, one per projector (Tables I / VII, "Different").
        proj_dim: output width of every projector (128).
        head_norm: normalisation after the hidden layer: ``none`` (MoCo v2's MLP), ``batch`` or ``layer``.
        shared_hidden: the projectors share the hidden layer and each owns one output layer (the paper's parameter
            counts, Tables II-VI); ``False``: one whole MLP per projector.
        projector_dropout: Table II alternative: dropout in front of each projector's output layer, an independent
            mask per projector, on the query side only (the keys are targets). 0 = off.
        projector_init: Table II alternative: ``mixed`` alternates Kaiming and Xavier over the projectors
            (:data:`~ssl_zoo.models.multi_projector.MIXED_INITS`); ``default`` = PyTorch's.
        temperature: tau of every projector's InfoNCE (0.2).
        queue_size: keys in each projector's queue (65,536).
        ema_momentum: momentum of the key encoder (0.999), constant.
        shuffle_bn: shuffle the key encoder's input across ranks (MoCo §3.3); off: use ``trainer.sync_batchnorm``.
        pcr: add the projector contrastive regulariser (Eq. 2); needs ``num_projectors >= 2``.
        orthogonality: Table II alternative: the projectors' own weights pushed to be mutually orthogonal
            (:func:`~ssl_zoo.losses.mpcl.projector_weight_orthogonality`) in Eq. 4's regulariser slot, weight ``lam``.
        ptb: weight the projectors' losses by PTB (Eq. 3); ``False`` keeps ``w_m = 1``.
        ptb_scale: ``projectors`` (``w = Mp * softmax``, PTB re-weights at the PTB-off loss scale) or ``literal``
            (Eq. 3's softmax as printed, which divides the contrastive part by ``Mp``); :mod:`ssl_zoo.losses.ptb`.
        lam: lambda, the weight of the regulariser in Eq. 4 (0.01).
        epsilon: the softmax temperature of PTB in Eq. 3 (0.5).
        base_lr: SGD lr for a batch of 256 images; the lr is ``base_lr * lr_batch_size / 256`` (0.03).
        lr_batch_size: batch used for lr scaling; ``None`` = the global batch.
        momentum: SGD momentum (0.9).
        weight_decay: on every parameter, as MoCo (1e-4).
        warmup_epochs: linear lr warmup before the cosine decay (0: MoCo v2 has none).
        min_scale: lower bound of the views' RandomResizedCrop area fraction (0.2, MoCo v2's code).
        blur: the views' Gaussian blur (sigma in [0.1, 2.0] px): ``pil``, MoCo's filter, or ``kernel``, SimCLR's
            kernel of ~10 % of the view side (at 32 px a 3-tap kernel; see ``blur_step``).
        compile: ``torch.compile`` the backbone's blocks (:mod:`ssl_zoo.models.acceleration`); minutes on a CPU.
        channels_last: channels-last convolution weights and input images (faster bf16 ResNets on GPUs).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        backbone_kwargs: dict | None = None,
        img_size: int = 224,
        num_projectors: int = 4,
        projector_hidden_dims: int | list[int] = 2048,
        proj_dim: int = 128,
        head_norm: Literal["batch", "layer", "none"] = "none",
        shared_hidden: bool = True,
        projector_dropout: float = 0.0,
        projector_init: ProjectorInit = "default",
        temperature: float = 0.2,
        queue_size: int = 65536,
        ema_momentum: float = 0.999,
        shuffle_bn: bool = True,
        pcr: bool = True,
        orthogonality: bool = False,
        ptb: bool = True,
        ptb_scale: PTBScale = "projectors",
        lam: float = 0.01,
        epsilon: float = 0.5,
        base_lr: float = 0.03,
        lr_batch_size: int | None = None,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        warmup_epochs: int = 0,
        min_scale: float = 0.2,
        blur: BlurKind = "pil",
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        check_arguments(num_projectors=num_projectors, lam=lam, epsilon=epsilon, temperature=temperature,
                        queue_size=queue_size, ema_momentum=ema_momentum, min_scale=min_scale)
        widths = projector_widths(projector_hidden_dims, num_projectors, shared_hidden)
        self.save_hyperparameters()

        # f_theta and g^m_theta (§III-A): MoCo v2's 2-layer MLP per projector, the hidden layer shared or not.
        self.backbone = Backbone(backbone, **(backbone_kwargs or {}))
        self.projectors = MultiProjector(self.backbone.num_features, widths, depth=1, output_dim=proj_dim,
                                         norm_layer=norm_layer_by_name(head_norm), shared_hidden=shared_hidden,
                                         dropout=projector_dropout, init=projector_init)
        # f_xi and g^m_xi: momentum copies, no gradient; the keys are targets, so no dropout noise on them.
        self.teacher_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.teacher_projectors = copy.deepcopy(self.projectors).requires_grad_(False)
        self.teacher_projectors.dropout = 0.0
        # One queue of negatives per projector (Fig. 1, bank^m).
        self.queues = nn.ModuleList(KeyQueue(proj_dim, queue_size) for _ in range(num_projectors))
        self.mpcl_loss = MPCLLoss(num_projectors, lam=lam, pcr=pcr, orthogonality=orthogonality, ptb=ptb,
                                  epsilon=epsilon, ptb_scale=ptb_scale)
        self._ema_due = OncePerOptimizerStep()

    # ------------------------------------------------------------------ data hooks
    def min_batch_size(self) -> tuple[int, str]:
        """Smallest per-process batch and why (checked by the data module before training)."""
        if self.hparams.head_norm == "batch":  # BatchNorm cannot normalise a single sample
            return 2, "the projectors normalise with BatchNorm over the batch; or set model.init_args.head_norm: layer"
        return 1, ""

    def train_transform(self) -> TwoViewTransform:
        """One image -> MoCo v2's two views, ``{"views": [2, 3, S, S]}``."""
        return mocov2_transform(self.hparams.img_size, min_scale=self.hparams.min_scale, blur=self.hparams.blur)

    # ------------------------------------------------------------------ encoders
    def configure_model(self) -> None:
        """Lightning hook, run before the strategy wraps the model: the optional backbone speed-ups."""
        accelerate_backbones(self, compile=self.hparams.compile, channels_last=self.hparams.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        """Pooled backbone features ``[B, D]`` (what downstream evaluation uses)."""
        return self.backbone(x)

    @torch.no_grad()
    def keys(self, x: Tensor) -> Tensor:
        """Momentum keys g^m_xi(f_xi(x)) ``[Mp, B, proj_dim]``, with shuffled BN when configured.

        Shuffled BN (MoCo §3.3, lightly's port of MoCo's ``_batch_shuffle_ddp``): every rank encodes a random slice
        of the global batch, so a query and its positive key are not normalised with the same samples' statistics.
        On one process the batch statistics do not depend on the order: nothing is shuffled.
        """
        shuffle = self.hparams.shuffle_bn and world_size() > 1
        if shuffle:  # all_gather needs contiguous tensors under NCCL; views[:, 1] is strided
            x, unshuffle = batch_shuffle_distributed(x.contiguous())  # [B, 3, S, S], a slice of the global batch
        k = self.teacher_projectors(self.teacher_backbone(x)).transpose(0, 1)  # [B, Mp, proj_dim]
        if shuffle:
            k = batch_unshuffle_distributed(k.contiguous(), unshuffle)  # this rank's rows, original order
        return k.transpose(0, 1)  # [Mp, B, proj_dim]

    def num_query_parameters(self) -> int:
        """Trainable query-side parameters (backbone + projectors): what the paper's Table III counts (27.97 / 28.23 /
        28.75 / 29.80 M for 1 / 2 / 4 / 8 shared-hidden ResNet-50 projectors); no key encoder, no queues."""
        return count_parameters(self.backbone, self.projectors)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x1, x2 = batch["views"][:, 0], batch["views"][:, 1]  # [B, 3, S, S] each
        q = self.projectors(self.backbone(x1))  # [Mp, B, D], z^m = g^m_theta(f_theta(x))
        k = self.keys(x2)  # [Mp, B, D], no gradient
        # Eq. 1 per projector, against its own queue before this batch's keys join it.
        losses, accs = per_projector(moco_v2_info_nce, q, k, [queue.keys for queue in self.queues],
                                     temperature=self.hparams.temperature)  # [Mp], [Mp]
        for queue, keys in zip(self.queues, k, strict=True):  # each projector's keys into its own queue
            queue.enqueue(keys)
        # Eq. 2-4: PCR on the queries, this epoch's PTB weights.
        loss, stats = self.mpcl_loss(losses, accs, [q], x1.shape[0], self.projectors.distinct_weights())
        log_step(self, loss, stats, q[0], x1.shape[0])
        return loss

    def on_train_epoch_start(self) -> None:
        start_ptb_epoch(self.mpcl_loss.ptb, self.current_epoch)

    def on_train_epoch_end(self) -> None:
        end_ptb_epoch(self.mpcl_loss.ptb, self._trainer, self.current_epoch)

    # ------------------------------------------------------------------ momentum encoder
    def on_train_start(self) -> None:
        self._ema_due.start(self.global_step)  # the steps a resumed run already took are not new

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """The key encoder follows the query encoder after each optimiser step (MoCo Eq. 2), once per step under
        gradient accumulation. MoCo updates it just before the next batch's keys: the same sequence of weights."""
        if not self._ema_due(self.global_step):
            return
        update_key_encoder(self, self.hparams.ema_momentum)
        self.log("train/ema_momentum", self.hparams.ema_momentum, on_step=True, on_epoch=False, batch_size=1)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        lr = scaled_lr(hp.base_lr, hp.lr_batch_size or global_batch_size(self.trainer))
        params = [p for p in self.parameters() if p.requires_grad]  # not the key encoder
        optimizer = torch.optim.SGD(params, lr=lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        return lr_schedule(self, optimizer, hp.warmup_epochs)
