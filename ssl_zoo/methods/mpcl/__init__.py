"""MPCL (Zhu, Yu: "Retaining Diverse Information in Contrastive Learning through Multiple Projectors"), one method
per framework the paper adapts it to: :class:`MPCLMoCoV2` (per-projector queues), :class:`MPCLMoCoV3` (in-batch
negatives, a predictor per projector) and :class:`MPCLBarlowTwins`. Each composes the same parts: the projectors
(:class:`~ssl_zoo.models.multi_projector.MultiProjector`), Eq. 2-4 (:class:`~ssl_zoo.losses.mpcl.MPCLLoss`) with
PTB's state (:class:`~ssl_zoo.losses.ptb.ProjectorTrainingBalance`) and :mod:`ssl_zoo.methods.mpcl.parts`. With one
projector each is its framework's baseline.
"""

from ssl_zoo.methods.mpcl.barlow_twins import MPCLBarlowTwins
from ssl_zoo.methods.mpcl.moco_v2 import MPCLMoCoV2
from ssl_zoo.methods.mpcl.moco_v3 import MPCLMoCoV3

__all__ = ["MPCLBarlowTwins", "MPCLMoCoV2", "MPCLMoCoV3"]
