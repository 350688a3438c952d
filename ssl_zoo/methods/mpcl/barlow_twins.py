"""MPCL on Barlow Twins: Mp projectors on one ResNet, the Barlow Twins loss per projector.

Paper: "Retaining Diverse Information in Contrastive Learning through Multiple Projectors" (Zhu, Yu), Table VII
("Barlow Twins (ResNet)"). Both views go through the same backbone f_theta and ``Mp`` projectors g^m_theta (Barlow
Twins has no momentum encoder); each projector has its own Barlow Twins loss (Zbontar et al. 2021, Eq. 1, on the
global batch: :mod:`ssl_zoo.losses.barlow_twins`); PCR (Eq. 2) pushes the projectors' outputs for one image apart;
PTB (Eq. 3) weights each projector's loss by its accuracy over the last completed epoch:

    L = (1/Mp) * sum_m ( w_m * L_m + lam * PCR_m )                                             (Eq. 4)

PTB needs an accuracy, which Barlow Twins has not: our reading is the in-batch top-1 retrieval z1 -> z2 (each first
view's projection retrieves, by cosine similarity, its own second view among the global batch).

The constructor defaults are Barlow Twins' ResNet-50 recipe (the official main.py, with which its README trains the
released model): 3-layer 8192-8192-8192 projectors with BN and a bias-free last layer, lambda 0.0051, LARS with
lr 0.2 x B / 256 for the weights and 0.0048 x B / 256 for the biases and BN parameters (which take neither weight
decay nor the trust ratio), weight decay 1e-6, 10 warmup epochs, a cosine down to 1/1000 of the peak, BYOL's views;
and the MPCL paper's: 4 projectors sharing the hidden layers, PCR with lambda 0.01, PTB with epsilon 0.5. main.py
converts the model to SyncBatchNorm: set ``trainer.sync_batchnorm``. With ``num_projectors=1`` this is Barlow Twins.
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch import LightningModule
from torch import Tensor

from ssl_zoo.augment import TwoViewTransform, mocov3_transform
from ssl_zoo.augment.views import BlurKind
from ssl_zoo.losses import MPCLLoss
from ssl_zoo.losses.barlow_twins import barlow_twins_loss, in_batch_retrieval_accuracy
from ssl_zoo.losses.ptb import PTBScale
from ssl_zoo.methods.mpcl.parts import (
    check_arguments,
    end_ptb_epoch,
    log_step,
    lr_schedule,
    per_projector,
    projector_widths,
    start_ptb_epoch,
)
from ssl_zoo.models import Backbone, norm_layer_by_name
from ssl_zoo.models.acceleration import accelerate_backbones
from ssl_zoo.models.multi_projector import MultiProjector, ProjectorInit, count_parameters
from ssl_zoo.utils.optim import LARS, global_batch_size, scaled_lr

__all__ = ["MPCLBarlowTwins"]


def barlow_twins_with_accuracy(z_a: Tensor, z_b: Tensor, lambda_offdiag: float) -> tuple[Tensor, Tensor]:
    """One projector's Barlow Twins loss and its in-batch retrieval accuracy z_a -> z_b (PTB's accuracy)."""
    return barlow_twins_loss(z_a, z_b, lambda_offdiag), in_batch_retrieval_accuracy(z_a, z_b)


class MPCLBarlowTwins(LightningModule):
    """Multi-projector contrastive learning on Barlow Twins; ``num_projectors=1`` is Barlow Twins.

    Args:
        backbone: timm backbone name (ResNet-50 in the paper).
        backbone_kwargs: extra :class:`~ssl_zoo.models.Backbone` arguments (``img_size``, ``model_kwargs``...).
        img_size: side of both views (224).
        num_projectors: ``Mp >= 1`` (4 in the paper; 1 = Barlow Twins).
        projector_hidden_dims: hidden width of the projectors (8192), one int for all or, with ``shared_hidden``
            off, one per projector.
        proj_dim: output width of every projector (8192).
        head_norm: normalisation after the hidden layers: ``batch`` (Barlow Twins), ``layer`` or ``none``.
        shared_hidden: the projectors share their hidden layers and each owns its output layer; ``False``: one
            whole MLP per projector.
        projector_dropout: Table II alternative: dropout in front of each projector's output layer, an independent
            mask per projector. 0 = off.
        projector_init: Table II alternative: ``mixed`` alternates Kaiming and Xavier over the projectors.
        lambda_offdiag: weight of Barlow Twins' redundancy-reduction term (0.0051).
        pcr: add the projector contrastive regulariser (Eq. 2), averaged over the two views' projections.
        orthogonality: Table II alternative: the projectors' own weights pushed to be mutually orthogonal, in
            Eq. 4's regulariser slot, weight ``lam``.
        ptb: weight the projectors' losses by PTB (Eq. 3); ``False`` keeps ``w_m = 1``.
        ptb_scale: ``projectors`` or ``literal``, see :mod:`ssl_zoo.losses.ptb`.
        lam: lambda, the weight of the regulariser in Eq. 4 (0.01).
        epsilon: the softmax temperature of PTB in Eq. 3 (0.5).
        base_lr: LARS lr of the weights for a batch of 256 images (main.py ``--learning-rate-weights`` 0.2); the lr
            is ``base_lr * lr_batch_size / 256``.
        bias_lr_scale: lr of the biases and norm parameters relative to the weights' (``--learning-rate-biases``
            0.0048 = 0.024 x 0.2).
        lr_batch_size: batch used for lr scaling; ``None`` = the global batch.
        momentum: LARS momentum (0.9).
        weight_decay: LARS weight decay of the weights (main.py ``--weight-decay`` 1e-6).
        warmup_epochs: linear lr warmup before the cosine decay (10).
        final_lr_ratio: the cosine decays to this fraction of the peak lr (0.001).
        min_scale: lower bound of the views' RandomResizedCrop area fraction (0.08, BYOL's views).
        blur: the views' Gaussian blur: ``pil``, the filter of the reference code, or ``kernel``, SimCLR's kernel.
        compile: ``torch.compile`` the backbone's blocks (:mod:`ssl_zoo.models.acceleration`); minutes on a CPU.
        channels_last: channels-last convolution weights and input images (faster bf16 ResNets on GPUs).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        backbone_kwargs: dict | None = None,
        img_size: int = 224,
        num_projectors: int = 4,
        projector_hidden_dims: int | list[int] = 8192,
        proj_dim: int = 8192,
        head_norm: Literal["batch", "layer", "none"] = "batch",
        shared_hidden: bool = True,
        projector_dropout: float = 0.0,
        projector_init: ProjectorInit = "default",
        lambda_offdiag: float = 0.0051,
        pcr: bool = True,
        orthogonality: bool = False,
        ptb: bool = True,
        ptb_scale: PTBScale = "projectors",
        lam: float = 0.01,
        epsilon: float = 0.5,
        base_lr: float = 0.2,
        bias_lr_scale: float = 0.024,
        lr_batch_size: int | None = None,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        warmup_epochs: int = 10,
        final_lr_ratio: float = 0.001,
        min_scale: float = 0.08,
        blur: BlurKind = "pil",
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        check_arguments(num_projectors=num_projectors, lam=lam, epsilon=epsilon, lambda_offdiag=lambda_offdiag,
                        min_scale=min_scale)
        widths = projector_widths(projector_hidden_dims, num_projectors, shared_hidden)
        self.save_hyperparameters()

        # f_theta and g^m_theta: Barlow Twins' 3-layer MLP per projector (the last Linear without bias).
        self.backbone = Backbone(backbone, **(backbone_kwargs or {}))
        self.projectors = MultiProjector(self.backbone.num_features, widths, depth=2, output_dim=proj_dim,
                                         norm_layer=norm_layer_by_name(head_norm), shared_hidden=shared_hidden,
                                         output_bias=False, dropout=projector_dropout, init=projector_init)
        self.mpcl_loss = MPCLLoss(num_projectors, lam=lam, pcr=pcr, orthogonality=orthogonality, ptb=ptb,
                                  epsilon=epsilon, ptb_scale=ptb_scale)

    # ------------------------------------------------------------------ data hooks
    def min_batch_size(self) -> tuple[int, str]:
        """Smallest per-process batch and why (checked by the data module before training)."""
        if self.hparams.head_norm == "batch":  # BatchNorm cannot normalise a single sample
            return 2, "the projectors normalise with BatchNorm over the batch; or set model.init_args.head_norm: layer"
        return 2, "the Barlow Twins loss standardises the embeddings over the batch"

    def train_transform(self) -> TwoViewTransform:
        """One image -> BYOL's two asymmetric views (as Barlow Twins'), ``{"views": [2, 3, S, S]}``."""
        return mocov3_transform(self.hparams.img_size, min_scale=self.hparams.min_scale, blur=self.hparams.blur)

    # ------------------------------------------------------------------ encoders
    def configure_model(self) -> None:
        """Lightning hook, run before the strategy wraps the model: the optional backbone speed-ups."""
        accelerate_backbones(self, compile=self.hparams.compile, channels_last=self.hparams.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        """Pooled backbone features ``[B, D]`` (what downstream evaluation uses)."""
        return self.backbone(x)

    def num_query_parameters(self) -> int:
        """Trainable parameters: backbone + projectors."""
        return count_parameters(self.backbone, self.projectors)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x1, x2 = batch["views"][:, 0], batch["views"][:, 1]  # [B, 3, S, S] each
        z1 = self.projectors(self.backbone(x1))  # [Mp, B, D]
        z2 = self.projectors(self.backbone(x2))
        # Barlow Twins' loss per projector on the global batch; PTB's accuracy: in-batch retrieval z1 -> z2.
        losses, accs = per_projector(barlow_twins_with_accuracy, z1, z2,
                                     lambda_offdiag=self.hparams.lambda_offdiag)  # [Mp], [Mp]
        # Eq. 2-4: PCR on both views' projections, this epoch's PTB weights.
        loss, stats = self.mpcl_loss(losses, accs, [z1, z2], x1.shape[0], self.projectors.distinct_weights())
        log_step(self, loss, stats, z1[0], x1.shape[0])
        return loss

    def on_train_epoch_start(self) -> None:
        start_ptb_epoch(self.mpcl_loss.ptb, self.current_epoch)

    def on_train_epoch_end(self) -> None:
        end_ptb_epoch(self.mpcl_loss.ptb, self._trainer, self.current_epoch)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        lr = scaled_lr(hp.base_lr, hp.lr_batch_size or global_batch_size(self.trainer))
        params = [p for p in self.parameters() if p.requires_grad]
        # main.py's two groups, split by ndim whatever the weight decay: the weights, and the biases and norm
        # parameters at their own lr without weight decay (LARS gives neither of them the trust ratio).
        groups = [{"params": [p for p in params if p.ndim > 1]},
                  {"params": [p for p in params if p.ndim <= 1], "lr": lr * hp.bias_lr_scale, "weight_decay": 0.0}]
        optimizer = LARS(groups, lr=lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        return lr_schedule(self, optimizer, hp.warmup_epochs, hp.final_lr_ratio)
