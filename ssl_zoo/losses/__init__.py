"""Losses of the four methods: small ``nn.Module`` wrappers around module-level pure functions.

Every loss accepts float32 or bfloat16 inputs and computes in float32, also under ``torch.autocast``
(``precision: bf16-mixed``; see :mod:`ssl_zoo.losses.precision`). Losses that need the global batch
(:class:`ImageAwareContrastiveLoss`, :class:`SupConLoss`, :func:`sinkhorn_knopp`,
:func:`moco_v3_info_nce`, :class:`KeyQueue`) gather across ranks themselves and do nothing extra on
one process.
"""

from ssl_zoo.losses.asl import WeightedAsymmetricLoss, weighted_asymmetric_loss
from ssl_zoo.losses.distill import SymmetricKLDivergence, symmetric_kl_divergence
from ssl_zoo.losses.ia_closs import (
    ImageAwareContrastiveLoss,
    SupConLoss,
    image_aware_contrastive_loss,
    supervised_contrastive_loss,
)
from ssl_zoo.losses.mim import masked_l1_loss
from ssl_zoo.losses.moco import KeyQueue, moco_v2_info_nce, moco_v3_info_nce
from ssl_zoo.losses.mpcl import MPCLLoss, mpcl_total_loss, projector_contrastive_regularization
from ssl_zoo.losses.mvp import mvp_alignment_loss
from ssl_zoo.losses.ptb import ProjectorTrainingBalance, ptb_weights
from ssl_zoo.losses.sinkhorn import (
    SwappedPredictionLoss,
    sinkhorn_clamped_fraction,
    sinkhorn_knopp,
    swapped_prediction_loss,
)

__all__ = [
    "ImageAwareContrastiveLoss",
    "KeyQueue",
    "MPCLLoss",
    "ProjectorTrainingBalance",
    "SupConLoss",
    "SwappedPredictionLoss",
    "SymmetricKLDivergence",
    "WeightedAsymmetricLoss",
    "image_aware_contrastive_loss",
    "masked_l1_loss",
    "moco_v2_info_nce",
    "moco_v3_info_nce",
    "mpcl_total_loss",
    "mvp_alignment_loss",
    "projector_contrastive_regularization",
    "ptb_weights",
    "sinkhorn_clamped_fraction",
    "sinkhorn_knopp",
    "supervised_contrastive_loss",
    "swapped_prediction_loss",
    "symmetric_kl_divergence",
    "weighted_asymmetric_loss",
]
