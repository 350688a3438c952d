"""MPCL: multi-projector contrastive learning on MoCo v2, MoCo v3 and Barlow Twins, and their baselines.

Paper: "Retaining Diverse Information in Contrastive Learning through Multiple Projectors" (Zhu, Yu).
One backbone f_theta feeds ``Mp`` projectors g^m_theta; a momentum backbone f_xi with momentum copies
g^m_xi produces the keys. Each projector has its own contrastive loss (Eq. 1) and top-1 accuracy; a
projector contrastive regulariser (PCR, Eq. 2) pushes the projectors' outputs for the same sample apart;
performance-based training balance (PTB, Eq. 3) weights projector ``m``'s loss by a softmax over
``(1 - acc_m) / epsilon`` of the previous epoch's accuracies:

    L = (1/Mp) * sum_m ( w_m * L_m + lam * PCR_m )                                          (Eq. 4)

Loss scale (our reading, ``ptb_scale``): without PTB, ``w_m = 1`` and Eq. 4 is the mean over projectors;
with PTB, ``w_m = Mp * softmax((1 - acc) / epsilon)_m`` so that balancing re-weights the projectors without
dividing the loss by ``Mp`` (equal accuracies give exactly the PTB-off loss); ``ptb_scale: literal`` uses
the bare softmax of Eq. 3. PTB's accuracies are those of the last *completed* epoch: an epoch cut short
(``max_steps``, a stop request) leaves the weights and its partial counts untouched, so a resumed run
finishes that epoch and only then re-weights.

Projector layout (``shared_hidden``): the paper's parameter counts (ResNet-50 + projectors = 27.97 / 28.23 /
28.75 / 29.80 M for 1 / 2 / 4 / 8 projectors) are those of projectors *sharing* the 2048-wide hidden layer,
each owning one Linear(2048 -> 128): 23,508,032 (ResNet-50 without its classifier) + 4,196,352 (the shared
Linear(2048 -> 2048) with bias) + Mp x 262,272 (Linear(2048 -> 128) with bias). Counted are the trainable
query-side parameters, not the momentum encoder, the queues or a classifier (:meth:`MPCL.num_query_parameters`).
Separate MLPs would give 27.97 / 32.43 / 41.34 / 59.18 M. The "Different" hidden-width rows (Tables I, VII)
use separate MLPs (``shared_hidden: false``), one width per projector; "Same" is the shared layout without PCR
and PTB (Table I's "Same" and Table II's "MPH" print the same run).

``flavour`` picks the framework:

* ``mocov2`` (He et al. 2020, Chen et al. 2020): 2-layer MLP projectors without BN, one negative queue
  of 65,536 keys *per projector*, tau 0.2, constant momentum 0.999, shuffled BN for the key encoder,
  SGD lr 0.03 * B / 256 with cosine decay.
* ``mocov3`` (Chen, Xie, He 2021, ViT recipe): 3-layer BN projectors + a 2-layer predictor per projector,
  negatives from the global batch, symmetric loss scaled by 2 * tau, momentum cosine from 0.99 to 1,
  AdamW lr 1.5e-4 * B / 256, weight decay 0.1, 40 warmup epochs, and the ViT built as MoCo v3 builds it
  (fixed 2-D sin-cos position embedding, its initialisation, frozen random patch projection;
  :mod:`ssl_zoo.models.moco_vit`).
* ``barlowtwins`` (Zbontar et al. 2021, paper Table VII): no momentum encoder; 3-layer projectors
  8192-8192-8192 with BN, the Barlow Twins loss per projector (lambda 0.0051), LARS lr 0.2 * B / 256 (biases
  and norms 0.0048 * B / 256), weight decay 1e-6, 10 warmup epochs, cosine to 1/1000 (the defaults of the
  official main.py, with which its README trains the released model; :class:`~ssl_zoo.utils.optim.LARS`).
  PTB needs an accuracy, which Barlow Twins has not: our reading is the in-batch top-1 retrieval z1 -> z2
  (each first view's projection retrieves, by cosine similarity, its own second view among the global batch).

With ``num_projectors=1`` the module *is* the plain baseline (PCR is undefined for one projector and PTB's
weight of one projector is 1).

Table II alternatives to PCR (options, all off by default): ``projector_dropout`` (dropout in front of each
projector's output layer, an independent mask per projector, query side only), ``projector_init: mixed``
(Kaiming and Xavier, alternating over the projectors) and ``orthogonality`` (the projectors' weights constrained
to be mutually orthogonal, :func:`~ssl_zoo.losses.mpcl.projector_weight_orthogonality`, in Eq. 4's regulariser
slot, weight ``lam``).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from lightly.models.utils import batch_shuffle_distributed, batch_unshuffle_distributed, update_momentum
from lightly.utils.debug import std_of_l2_normalized
from lightly.utils.scheduler import cosine_schedule
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from ssl_zoo.augment import TwoViewTransform, mocov2_transform, mocov3_transform
from ssl_zoo.augment.views import BlurKind
from ssl_zoo.losses import (
    KeyQueue,
    moco_v2_info_nce,
    moco_v3_info_nce,
    mpcl_total_loss,
    projector_contrastive_regularization,
    ptb_weights,
)
from ssl_zoo.losses.barlow_twins import barlow_twins_loss, in_batch_retrieval_accuracy
from ssl_zoo.losses.mpcl import projector_weight_orthogonality
from ssl_zoo.models import Backbone, MLPHead
from ssl_zoo.models.acceleration import accelerate_backbones
from ssl_zoo.models.heads import NORM_LAYERS, norm_layer_by_name
from ssl_zoo.models.moco_vit import init_moco_v3_vit
from ssl_zoo.models.multi_projector import MultiProjector, count_parameters
from ssl_zoo.utils.distributed import all_reduce_sum, world_size
from ssl_zoo.utils.ema import OncePerOptimizerStep
from ssl_zoo.utils.loop_progress import lightning_private_batches_done
from ssl_zoo.utils.optim import (
    LARS,
    global_batch_size,
    scaled_lr,
    warmup_cosine_scheduler,
)

__all__ = ["MPCL"]

Flavour = Literal["mocov2", "mocov3", "barlowtwins"]
MOCO_FLAVOURS = ("mocov2", "mocov3")

# The paper's settings of each flavour; an argument left at ``None`` takes the value of its flavour.
FLAVOUR_DEFAULTS: dict[str, dict[str, Any]] = {
    "mocov2": {  # MoCo v2, ResNet-50 (Chen et al. 2020, "Improved Baselines")
        "projector_hidden_dims": 2048,
        "proj_dim": 128,
        "head_norm": "none",
        "symmetric": False,
        "ema_momentum": 0.999,
        "ema_cosine": False,
        "shuffle_bn": True,
        "freeze_patch_embed": False,
        "moco_vit_init": False,
        "optimizer": "sgd",
        "base_lr": 0.03,
        "weight_decay": 1e-4,
        "warmup_epochs": 0,
        "bias_lr_scale": 1.0,
        "final_lr_ratio": 0.0,
    },
    "mocov3": {  # MoCo v3, ViT-B/16 (Chen, Xie, He 2021, Table 11 / main_moco.py ViT recipe)
        "projector_hidden_dims": 4096,
        "proj_dim": 256,
        "head_norm": "batch",
        "symmetric": True,
        "ema_momentum": 0.99,
        "ema_cosine": True,
        "shuffle_bn": False,
        "freeze_patch_embed": True,
        "moco_vit_init": True,
        "optimizer": "adamw",
        "base_lr": 1.5e-4,
        "weight_decay": 0.1,
        "warmup_epochs": 40,
        "bias_lr_scale": 1.0,
        "final_lr_ratio": 0.0,
    },
    "barlowtwins": {  # Barlow Twins, ResNet-50 (Zbontar et al. 2021, §4 / the official main.py)
        "projector_hidden_dims": 8192,
        "proj_dim": 8192,
        "head_norm": "batch",
        "symmetric": False,  # unused: the Barlow Twins loss is symmetric in its two views by itself
        "shuffle_bn": False,
        "freeze_patch_embed": False,
        "moco_vit_init": False,
        "optimizer": "lars",
        "base_lr": 0.2,
        "weight_decay": 1e-6,  # main.py's --weight-decay default
        "warmup_epochs": 10,
        "bias_lr_scale": 0.0048 / 0.2,
        "final_lr_ratio": 0.001,
    },
}


class MPCL(LightningModule):
    """Multi-projector contrastive learning (MPCL) on MoCo v2 / MoCo v3 / Barlow Twins; one projector = the baseline.

    Arguments left at ``None`` take the paper's value for ``flavour`` (see ``FLAVOUR_DEFAULTS``); the
    resolved values are stored in ``self.hparams`` (and so in checkpoints).

    Args:
        backbone: timm backbone name (ResNet-50 for MoCo v2 / Barlow Twins, ViT-B/16 for MoCo v3 in the paper).
        backbone_kwargs: extra :class:`~ssl_zoo.models.Backbone` arguments (``img_size``...).
        flavour: framework, ``mocov2`` (queue), ``mocov3`` (global in-batch negatives) or ``barlowtwins``.
        img_size: side of both views (224 in the paper).
        num_projectors: ``Mp >= 1``, number of projectors (4 in the paper; 1 = the baseline).
        projector_hidden_dims: hidden width of the projectors, one int for all or, with ``shared_hidden``
            off, a list with one width per projector (Tables I / VII, "Different"). mocov2: 2048,
            mocov3: 4096, barlowtwins: 8192.
        proj_dim: output width of every projector (mocov2: 128, mocov3: 256, barlowtwins: 8192).
        pred_hidden_dim: hidden width of the MoCo v3 predictors (4096); unused by the other flavours.
        head_norm: normalisation in the heads, ``batch`` (BN), ``layer`` (LayerNorm, BN-free) or ``none``.
            mocov2: ``none`` (MoCo v2's MLP has no BN), mocov3 and barlowtwins: ``batch``.
        shared_hidden: the projectors share their hidden layers and each owns one output layer (the layout of
            the paper's parameter counts, Tables II-VI); ``False``: one whole MLP per projector.
        projector_dropout: Table II alternative: dropout probability in front of each projector's output
            layer, an independent mask per projector, on the query side only (the momentum keys are the
            targets and stay deterministic). 0 = off.
        projector_init: Table II alternative: ``mixed`` initialises projector ``m`` with Kaiming (even ``m``) or
            Xavier (odd ``m``), ``MIXED_INITS`` of :mod:`ssl_zoo.models.multi_projector`; ``default`` = PyTorch's.
        temperature: tau of every InfoNCE loss (0.2 for both MoCo flavours).
        queue_size: keys in each projector's negative queue (65,536); mocov2 only.
        symmetric: contrast both (view 1 -> view 2) and (view 2 -> view 1). mocov2: ``False`` (MoCo v2
            code; the two directions are averaged when on), mocov3: ``True`` (the two terms are summed,
            as in MoCo v3's code). Unused by barlowtwins.
        pcr: add the projector contrastive regulariser (Eq. 2); needs ``num_projectors >= 2``.
        orthogonality: Table II alternative: add the orthogonality constraint between the projectors' weights
            (:func:`~ssl_zoo.losses.mpcl.projector_weight_orthogonality` of
            :meth:`~ssl_zoo.models.multi_projector.MultiProjector.distinct_weights`) in Eq. 4's regulariser slot,
            weight ``lam``.
        ptb: weight the projectors' losses by PTB (Eq. 3); ``False`` keeps ``w_m = 1``.
        ptb_scale: ``projectors`` (``w = Mp * softmax``, re-weighting at the PTB-off loss scale) or
            ``literal`` (``w = softmax`` of Eq. 3 as printed, which divides the contrastive part by ``Mp``).
        lam: lambda, the weight of PCR in Eq. 4 (0.01).
        epsilon: the softmax temperature of PTB in Eq. 3 (0.5).
        bt_lambda: weight of Barlow Twins' redundancy-reduction term (0.0051); barlowtwins only.
        ema_momentum: momentum of the key encoder (mocov2: 0.999; mocov3: 0.99, the cosine start).
        ema_cosine: ramp the momentum from ``ema_momentum`` to 1 with a half cosine over training
            (MoCo v3 ``--moco-m-cos``). mocov2: ``False``, mocov3: ``True``.
        shuffle_bn: shuffle the key encoder's input across ranks (MoCo v2's shuffled BN). Use
            ``trainer.sync_batchnorm`` instead when it is off. mocov2: ``True``, otherwise ``False``.
        freeze_patch_embed: keep a ViT's random patch projection fixed (MoCo v3 §4.2 "random patch
            projection", for stability). mocov3: ``True``, otherwise ``False``; ignored for non-ViTs.
        moco_vit_init: build a ViT as MoCo v3 does (fixed 2-D sin-cos position embedding, xavier-uniform with
            q/k/v split, its patch-projection init; :func:`~ssl_zoo.models.moco_vit.init_moco_v3_vit`).
            mocov3: ``True``, otherwise ``False``; ignored for non-ViTs.
        optimizer: ``sgd`` (MoCo v2), ``adamw`` (MoCo v3 ViT) or ``lars`` (MoCo v3 ResNet, Barlow Twins).
        base_lr: lr for a batch of 256 images; the lr is ``base_lr * lr_batch_size / 256``
            (mocov2: 0.03, mocov3: 1.5e-4, barlowtwins: 0.2).
        lr_batch_size: batch used for lr scaling; ``None`` = the global batch.
        weight_decay: mocov2: 1e-4 (on every parameter, as MoCo), mocov3: 0.1 (AdamW on every
            parameter, as MoCo v3), barlowtwins: 1e-6 (Barlow Twins' main.py; LARS excludes biases and norms).
        sgd_momentum: momentum of SGD and LARS (0.9).
        warmup_epochs: linear lr warmup before the cosine decay (mocov2: 0, mocov3: 40, barlowtwins: 10).
        bias_lr_scale: LARS only: lr of the biases and norms relative to the weights' (barlowtwins:
            0.0048 / 0.2; 1 otherwise).
        final_lr_ratio: the cosine decays to ``final_lr_ratio`` x the peak lr (barlowtwins: 0.001; else 0).
        compile: ``torch.compile`` the backbone's blocks (regional compilation, see
            :mod:`ssl_zoo.models.acceleration`); off by default, compiling takes minutes on a CPU.
        channels_last: channels-last convolution weights and input images (faster bf16 ResNets on GPUs).
        min_scale: lower bound of the views' RandomResizedCrop area fraction; ``None`` = the flavour's
            reference (mocov2: 0.2 as MoCo v2's code, mocov3 / barlowtwins: 0.08 as BYOL's views).
        blur: the views' Gaussian blur (sigma in [0.1, 2.0] px): ``pil``, the filter of MoCo's code with no
            kernel bound, or ``kernel``, SimCLR's kernel of ~10 % of the view side, which keeps the blur in
            proportion to small views (at 32 px a 3-tap kernel; see ``blur_step``).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        backbone_kwargs: dict | None = None,
        flavour: Flavour = "mocov2",
        img_size: int = 224,
        num_projectors: int = 4,
        projector_hidden_dims: int | list[int] | None = None,
        proj_dim: int | None = None,
        pred_hidden_dim: int = 4096,
        head_norm: Literal["batch", "layer", "none"] | None = None,
        shared_hidden: bool = True,
        projector_dropout: float = 0.0,
        projector_init: Literal["default", "mixed"] = "default",
        temperature: float = 0.2,
        queue_size: int = 65536,
        symmetric: bool | None = None,
        pcr: bool = True,
        orthogonality: bool = False,
        ptb: bool = True,
        ptb_scale: Literal["projectors", "literal"] = "projectors",
        lam: float = 0.01,
        epsilon: float = 0.5,
        bt_lambda: float = 0.0051,
        ema_momentum: float | None = None,
        ema_cosine: bool | None = None,
        shuffle_bn: bool | None = None,
        freeze_patch_embed: bool | None = None,
        moco_vit_init: bool | None = None,
        optimizer: Literal["sgd", "adamw", "lars"] | None = None,
        base_lr: float | None = None,
        lr_batch_size: int | None = None,
        weight_decay: float | None = None,
        sgd_momentum: float = 0.9,
        warmup_epochs: int | None = None,
        bias_lr_scale: float | None = None,
        final_lr_ratio: float | None = None,
        compile: bool = False,
        channels_last: bool = False,
        min_scale: float | None = None,
        blur: BlurKind = "pil",
    ) -> None:
        super().__init__()
        if flavour not in FLAVOUR_DEFAULTS:
            raise ValueError(f"model.flavour must be one of {sorted(FLAVOUR_DEFAULTS)}, got '{flavour}'")
        if num_projectors < 1:
            raise ValueError(f"model.num_projectors must be >= 1, got {num_projectors}")
        if min_scale is not None and not 0.0 < min_scale <= 1.0:
            raise ValueError(f"model.min_scale must lie in (0, 1], got {min_scale}")
        if temperature <= 0:
            raise ValueError(f"model.temperature must be > 0, got {temperature}")
        if lam < 0:
            raise ValueError(f"model.lam must be >= 0, got {lam}")
        if epsilon <= 0:
            raise ValueError(f"model.epsilon must be > 0, got {epsilon}")
        if queue_size < 1:
            raise ValueError(f"model.queue_size must be >= 1, got {queue_size}")
        if ptb_scale not in ("projectors", "literal"):
            raise ValueError(f"model.ptb_scale must be 'projectors' or 'literal', got '{ptb_scale}'")
        if bt_lambda < 0:
            raise ValueError(f"model.bt_lambda must be >= 0, got {bt_lambda}")
        self.save_hyperparameters()
        # Fill the flavour's paper values into the arguments left at None (stored resolved).
        for key, value in FLAVOUR_DEFAULTS[flavour].items():
            if self.hparams[key] is None:
                self.hparams[key] = value
        hp = self.hparams
        if hp.head_norm not in NORM_LAYERS:
            raise ValueError(f"model.head_norm must be 'batch', 'layer' or 'none', got '{hp.head_norm}'")
        if hp.optimizer not in ("sgd", "adamw", "lars"):
            raise ValueError(f"model.optimizer must be 'sgd', 'adamw' or 'lars', got '{hp.optimizer}'")
        if flavour in MOCO_FLAVOURS and not 0.0 <= hp.ema_momentum <= 1.0:
            raise ValueError(f"model.ema_momentum must lie in [0, 1], got {hp.ema_momentum}")
        hidden = hp.projector_hidden_dims
        hidden = [hidden] * num_projectors if isinstance(hidden, int) else list(hidden)
        if len(hidden) != num_projectors or any(h < 1 for h in hidden):
            raise ValueError(
                f"model.projector_hidden_dims must be one positive int or a list of {num_projectors} "
                f"(num_projectors) positive ints, got {hp.projector_hidden_dims}"
            )
        if shared_hidden and len(set(hidden)) > 1:
            raise ValueError(
                f"model.projector_hidden_dims {hp.projector_hidden_dims} gives the projectors different hidden "
                "widths, but model.shared_hidden is true (one shared hidden layer); set model.init_args.shared_hidden: "
                "false for separate MLPs"
            )

        # f_theta (MPCL §3.1); the backbone / teacher_backbone names are what export and evaluation look for.
        self.backbone = Backbone(backbone, **(backbone_kwargs or {}))
        if self.backbone.family == "vit":
            if hp.moco_vit_init:  # MoCo v3 §4.2 / vits.py: sin-cos positions, its init, (frozen) patch projection
                init_moco_v3_vit(self.backbone.model, freeze_patch_projection=hp.freeze_patch_embed)
            if hp.freeze_patch_embed:
                # MoCo v3 §4.2: a fixed random patch projection avoids the training instability spikes.
                self.backbone.model.patch_embed.requires_grad_(False)
        d = self.backbone.num_features
        norm = norm_layer_by_name(hp.head_norm)
        # g^m_theta, m = 1..Mp: 2-layer MLPs (MoCo v2: one hidden layer) or 3-layer MLPs (MoCo v3, Barlow Twins),
        # the hidden layers shared or per projector.
        self.projectors = MultiProjector(
            d, hidden, depth=1 if flavour == "mocov2" else 2, output_dim=hp.proj_dim, norm_layer=norm,
            last_norm=flavour == "mocov3", shared_hidden=shared_hidden,
            output_bias=False if flavour == "barlowtwins" else None,  # Barlow Twins' last Linear has no bias
            dropout=projector_dropout, init=projector_init,
        )
        # MoCo v3 puts a predictor after the query-side projector; here each projector has its own.
        self.predictors = (
            nn.ModuleList(
                MLPHead(hp.proj_dim, [pred_hidden_dim], hp.proj_dim, norm_layer=norm, last_norm=True)
                for _ in range(num_projectors)
            )
            if flavour == "mocov3"
            else None
        )
        if flavour in MOCO_FLAVOURS:
            self.teacher_backbone = copy.deepcopy(self.backbone).requires_grad_(False)  # f_xi
            self.teacher_projectors = copy.deepcopy(self.projectors).requires_grad_(False)  # g^m_xi
            self.teacher_projectors.dropout = 0.0  # the keys are targets: no dropout noise on them
        else:  # Barlow Twins: both views go through f_theta and g^m_theta
            self.teacher_backbone = None
            self.teacher_projectors = None
        # MoCo v2: one queue of negatives per projector; each only ever receives its own keys.
        self.queues = (
            nn.ModuleList(KeyQueue(hp.proj_dim, queue_size) for _ in range(num_projectors))
            if flavour == "mocov2"
            else None
        )

        # PTB state (Eq. 3), buffers so that checkpoints carry it and a resumed run continues with it.
        # The accumulators hold sums over *all* ranks (reduced every step), so they agree across ranks
        # and DDP's buffer broadcast from rank 0 cannot corrupt them. ptb_weight is Eq. 3's softmax (sums to 1).
        self.register_buffer("ptb_weight", torch.full((num_projectors,), 1.0 / num_projectors))
        self.register_buffer("ptb_last_acc", torch.zeros(num_projectors))  # acc_m of the previous epoch
        self.register_buffer("ptb_correct", torch.zeros(num_projectors))  # correct queries this epoch
        self.register_buffer("ptb_count", torch.zeros(()))  # queries this epoch (per projector)
        self._total_steps: int | None = None
        self._ema_due = OncePerOptimizerStep()

    # ------------------------------------------------------------------ data hooks
    def min_batch_size(self) -> tuple[int, str]:
        """Smallest per-process batch and why (checked by the data module before training)."""
        if self.hparams.head_norm == "batch":  # BatchNorm cannot normalise a single sample
            return 2, ("the projectors normalise with BatchNorm over the batch; "
                       "or set model.init_args.head_norm: layer")
        if self.hparams.flavour == "barlowtwins":
            return 2, "the Barlow Twins loss standardises the embeddings over the batch"
        return 1, ""

    def train_transform(self) -> TwoViewTransform:
        """One image -> two views, ``{"views": [2, 3, S, S]}``: MoCo v2's, or BYOL's (MoCo v3, Barlow Twins)."""
        make = mocov2_transform if self.hparams.flavour == "mocov2" else mocov3_transform
        options = {"blur": self.hparams.blur}
        if self.hparams.min_scale is not None:
            options["min_scale"] = self.hparams.min_scale
        return make(self.hparams.img_size, **options)

    # ------------------------------------------------------------------ encoders
    def configure_model(self) -> None:
        """Lightning hook, run before the strategy wraps the model: the optional backbone speed-ups."""
        accelerate_backbones(self, compile=self.hparams.compile, channels_last=self.hparams.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        """Pooled backbone features ``[B, D]`` (what downstream evaluation uses)."""
        return self.backbone(x)

    def project(self, x: Tensor) -> Tensor:
        """Student projector outputs z^m = g^m_theta(f_theta(x)), stacked ``[Mp, B, proj_dim]``."""
        return self.projectors(self.backbone(x))  # [Mp, B, proj_dim]

    def predict(self, z: Tensor) -> Tensor:
        """Queries: MoCo v3 predictor outputs ``[Mp, B, proj_dim]``; otherwise ``z`` itself."""
        if self.predictors is None:
            return z
        return torch.stack([p(z_m) for p, z_m in zip(self.predictors, z, strict=True)])

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
        """Trainable parameters of the query side: backbone + projectors (+ MoCo v3 predictors).

        The counting that reproduces the paper's ResNet-50 + projector sizes (27.97 / 28.23 / 28.75 / 29.80 M
        for 1 / 2 / 4 / 8 shared-hidden MoCo v2 projectors): no momentum encoder, no queue, no classifier,
        nothing frozen (a MoCo v3 ViT's fixed position embedding and patch projection are left out).
        """
        return count_parameters(*(m for m in (self.backbone, self.projectors, self.predictors) if m is not None))

    # ------------------------------------------------------------------ losses
    def contrast(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Per-projector InfoNCE (Eq. 1) and top-1 accuracy: ``q, k [Mp, B, D]`` -> ``[Mp]``, ``[Mp]``.

        MoCo v2: negatives from projector m's own queue; MoCo v3: the other keys of the global batch.
        """
        losses, accs = [], []
        for m in range(q.shape[0]):
            if self.queues is None:
                loss, acc = moco_v3_info_nce(q[m], k[m], self.hparams.temperature)
            else:
                loss, acc = moco_v2_info_nce(q[m], k[m], self.queues[m].keys, self.hparams.temperature)
            losses.append(loss)
            accs.append(acc)
        return torch.stack(losses), torch.stack(accs)

    def barlow_twins(self, z1: Tensor, z2: Tensor) -> tuple[Tensor, Tensor]:
        """Per-projector Barlow Twins loss and in-batch retrieval accuracy z1 -> z2: ``[Mp]``, ``[Mp]``."""
        losses = [barlow_twins_loss(a, b, self.hparams.bt_lambda) for a, b in zip(z1, z2, strict=True)]
        accs = [in_batch_retrieval_accuracy(a, b) for a, b in zip(z1, z2, strict=True)]
        return torch.stack(losses), torch.stack(accs)

    def regularizer(self, zs: list[Tensor]) -> dict[str, Tensor]:
        """Eq. 2 (PCR), averaged over the views' projections ``zs`` (each ``[Mp, B, D]``, before any predictor),
        and / or the Table II weight-orthogonality alternative; ``{}`` with one projector, where both are undefined."""
        hp, terms = self.hparams, {}
        if zs[0].shape[0] < 2:
            return terms
        if hp.pcr:
            terms["pcr"] = torch.stack([projector_contrastive_regularization(z) for z in zs]).mean(dim=0)
        if hp.orthogonality:
            terms["orthogonality"] = projector_weight_orthogonality(self.projectors.distinct_weights())  # [Mp]
        return terms

    def loss_weights(self) -> Tensor:
        """w_m of Eq. 4: 1 without PTB; with PTB, ``Mp * softmax`` of the last completed epoch's accuracies
        (``ptb_scale: literal``: the bare softmax), which is 1 (``1/Mp``) for every projector before the first."""
        hp = self.hparams
        if not hp.ptb:
            return torch.ones_like(self.ptb_weight)
        if hp.ptb_scale == "literal":
            return self.ptb_weight
        return self.ptb_weight * self.ptb_weight.shape[0]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        hp = self.hparams
        views = batch["views"]  # [B, 2, 3, S, S]
        x1, x2 = views[:, 0], views[:, 1]  # [B, 3, S, S] each
        b = views.shape[0]

        z1 = self.project(x1)  # [Mp, B, D], z^m = g^m_theta(f_theta(x)) (§3.1)
        zs = [z1]
        if hp.flavour == "barlowtwins":  # both views through the same network, one loss per projector
            z2 = self.project(x2)
            zs.append(z2)
            losses, accs = self.barlow_twins(z1, z2)  # [Mp], [Mp]
        else:
            k2 = self.keys(x2)  # [Mp, B, D], keys k^m = g^m_xi(f_xi(x')), no gradient
            # Eq. 1 for every projector (computed against the queue *before* this batch is enqueued).
            losses, accs = self.contrast(self.predict(z1), k2)  # [Mp], [Mp]
            if hp.symmetric:
                z2, k1 = self.project(x2), self.keys(x1)
                zs.append(z2)
                losses_21, accs_21 = self.contrast(self.predict(z2), k1)
                # MoCo v3 sums the two directions (its 2*tau scale assumes it); MoCo v2 variants average.
                losses = losses + losses_21 if hp.flavour == "mocov3" else (losses + losses_21) / 2
                accs = (accs + accs_21) / 2
            if self.queues is not None:  # each projector's own keys into its own queue (gathered inside)
                for m, queue in enumerate(self.queues):
                    queue.enqueue(k2[m] if not hp.symmetric else torch.cat([k2[m], k1[m]]))

        # Eq. 2 on the projector outputs (before the MoCo v3 predictor): one value per projector.
        terms = self.regularizer(zs)
        reg = sum(terms.values()) if terms else torch.zeros_like(losses)  # [Mp]

        # Eq. 4 with this epoch's PTB weights (constants).
        loss = mpcl_total_loss(losses, reg, self.loss_weights(), lam=hp.lam)

        self._record(losses, terms, accs, b)
        self.log("train/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=b)
        # Collapse indicator: std of the l2-normalised embedding, ~1/sqrt(D) when healthy, 0 when collapsed.
        self.log("train/z_std", std_of_l2_normalized(z1[0].detach()), on_epoch=True, batch_size=b)
        return loss

    @torch.no_grad()
    def _record(self, losses: Tensor, terms: dict[str, Tensor], accs: Tensor, batch_size: int) -> None:
        """Reduce this step's per-projector statistics over ranks (one all-reduce), feed PTB, log them."""
        mp = losses.shape[0]
        names = ["pcr", "orthogonality"]
        regs = [terms.get(name, torch.zeros_like(losses)).detach().float() for name in names]
        n = torch.tensor([float(batch_size)], device=losses.device)
        stats = torch.cat([losses.detach().float(), *regs, accs.detach().float()]) * n
        stats = all_reduce_sum(torch.cat([stats, n]))  # [4*Mp + 1]: sums over the global batch
        total = stats[-1]
        blocks = stats[:-1].view(2 + len(names), mp)  # loss, pcr, orthogonality, correct
        g_loss, g_correct = blocks[0] / total, blocks[-1]
        self.record_accuracy(g_correct, total)
        g_acc = g_correct / total
        weights = self.loss_weights()
        for m in range(mp):  # already global values: no further sync needed
            self.log(f"train/proj{m}/loss", g_loss[m], on_epoch=True, batch_size=batch_size)
            self.log(f"train/proj{m}/acc", g_acc[m], on_epoch=True, batch_size=batch_size)
            self.log(f"train/proj{m}/weight", weights[m], on_epoch=True, batch_size=batch_size)
            for i, name in enumerate(names, start=1):
                if name in terms:
                    self.log(f"train/proj{m}/{name}", blocks[i][m] / total, on_epoch=True, batch_size=batch_size)
        self.log("train/loss_contrastive", g_loss.mean(), on_epoch=True, batch_size=batch_size)
        for i, name in enumerate(names, start=1):
            if name in terms or name == "pcr":  # train/pcr is logged (0 when off), as the demo curves expect
                self.log(f"train/{name}", (blocks[i] / total).mean(), on_epoch=True, batch_size=batch_size)
        self.log("train/acc", g_acc.mean(), prog_bar=True, on_epoch=True, batch_size=batch_size)

    # ------------------------------------------------------------------ PTB (Eq. 3)
    @torch.no_grad()
    def record_accuracy(self, correct: Tensor, count: Tensor | float) -> None:
        """Add global-batch counts to this epoch's accuracy: ``correct [Mp]`` queries out of ``count``.

        Both must already be summed over ranks (the training step does it), so every rank holds the
        same running totals.
        """
        self.ptb_correct += correct.to(self.ptb_correct)
        self.ptb_count += torch.as_tensor(count).to(self.ptb_count)

    def _epoch_completed(self) -> bool:
        """Whether the training epoch now ending ran over all its batches (Lightning's own test for an epoch's
        end, ``_num_ready_batches_reached``). False when ``max_steps`` or a stop request cut it short; True
        outside a Trainer, where the caller closes the epoch by hand."""
        trainer = self._trainer
        if trainer is None:
            return True
        return trainer.is_last_batch or lightning_private_batches_done(trainer) >= trainer.num_training_batches

    def on_train_epoch_start(self) -> None:
        """A fresh epoch starts its own counts. Counts left over here come from an epoch that was cut short and
        is not being continued (Lightning calls this hook for a new epoch, not for one resumed mid-way, whose
        checkpointed counts the resumed run completes): they are dropped rather than mixed into this epoch."""
        if self.ptb_count.item() > 0:
            rank_zero_info(f"MPCL: dropping the PTB counts of an unfinished epoch ({int(self.ptb_count.item())} "
                           f"queries) at the start of epoch {self.current_epoch}")
            self.ptb_correct.zero_()
            self.ptb_count.zero_()

    def on_train_epoch_end(self) -> None:
        """Close a completed epoch: acc_m = mean top-1 accuracy over it; the next epoch's weights = Eq. 3 (acc).

        An epoch cut short (``max_steps`` reached mid-epoch, a stop request) changes nothing: its partial counts
        stay in the buffers (and checkpoints), so a run resumed from it completes that epoch and only then
        updates the weights, from the whole epoch's accuracies.
        """
        if self.ptb_count.item() <= 0:
            return
        if not self._epoch_completed():
            rank_zero_info(f"MPCL: epoch {self.current_epoch} ended before its last batch; the PTB weights keep "
                           "the last completed epoch's accuracies")
            return
        acc = (self.ptb_correct / self.ptb_count).clamp_(0.0, 1.0)  # [Mp], guards float round-off
        self.ptb_last_acc.copy_(acc)
        if self.hparams.ptb:
            self.ptb_weight.copy_(ptb_weights(acc, self.hparams.epsilon))
        self.ptb_correct.zero_()
        self.ptb_count.zero_()

    # ------------------------------------------------------------------ momentum encoder
    def ema_momentum_at(self, step: int, total_steps: int) -> float:
        """Key-encoder momentum after ``step`` optimiser steps: constant (MoCo v2) or the MoCo v3 cosine
        ``m = 1 - (1 - m0) * (1 + cos(pi * step / total)) / 2``."""
        if not self.hparams.ema_cosine:
            return self.hparams.ema_momentum
        # lightly's schedule reaches its end value at step max_steps - 1, MoCo v3's reaches 1 at step K: K + 1 steps.
        total = max(total_steps, 1)
        return cosine_schedule(min(step, total), total + 1, self.hparams.ema_momentum, 1.0)

    def on_train_start(self) -> None:
        self._total_steps = int(self.trainer.estimated_stepping_batches)
        self._ema_due.start(self.global_step)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """theta_xi <- m * theta_xi + (1 - m) * theta_theta after each optimiser step (MoCo Eq. 2).

        MoCo updates the key encoder just before computing the keys of the next batch; updating right
        after the optimiser step is the same sequence of weights. With gradient accumulation, the micro-batches
        that did not step leave the student unchanged and do not move the teacher. Barlow Twins has no key encoder.
        """
        if self.teacher_backbone is None or not self._ema_due(self.global_step):
            return
        total = self._total_steps if self._total_steps is not None else 1
        m = self.ema_momentum_at(self.global_step, total)
        # Parameters only (MoCo's _momentum_update_key_encoder): the key encoder's BatchNorm statistics are its
        # own, computed in its train-mode forward.
        update_momentum(self.backbone, self.teacher_backbone, m)
        update_momentum(self.projectors, self.teacher_projectors, m)
        self.log("train/ema_momentum", m, on_step=True, on_epoch=False, batch_size=1)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        lr = scaled_lr(hp.base_lr, hp.lr_batch_size or global_batch_size(self.trainer))
        # The momentum encoder, the fixed position embedding and the frozen patch projection need no gradient.
        params = [p for p in self.parameters() if p.requires_grad]
        if hp.optimizer == "sgd":  # MoCo v2: weight decay on every parameter
            optimizer = torch.optim.SGD(params, lr=lr, momentum=hp.sgd_momentum, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adamw":  # MoCo v3 ViT: AdamW, weight decay on every parameter
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=hp.weight_decay)
        else:  # MoCo v3 ResNet, Barlow Twins: LARS; biases and norms (ndim 1) get neither weight decay nor LARS scaling
            # Barlow Twins main.py's groups, split by ndim whatever the weight decay: [weights, biases and norms],
            # the latter at 0.0048 instead of 0.2 per 256 images
            groups = [{"params": [p for p in params if p.ndim > 1]},
                      {"params": [p for p in params if p.ndim <= 1], "lr": lr * hp.bias_lr_scale, "weight_decay": 0.0}]
            optimizer = LARS(groups, lr=lr, momentum=hp.sgd_momentum, weight_decay=hp.weight_decay)
        total = self.trainer.estimated_stepping_batches
        warmup = int(hp.warmup_epochs * total / max(self.trainer.max_epochs or 1, 1))
        scheduler = warmup_cosine_scheduler(optimizer, total, warmup, final_ratio=hp.final_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
