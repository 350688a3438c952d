"""Checkpoints -> backbones, in one trip: the room evaluation, transfer, export and the teachers load through.

:mod:`~ssl_zoo.checkpoints.layouts` recognises a file's layout (ssl_zoo's own, SimSiam, MoCo, DINO, MAE, BEiT,
OpenAI CLIP, timm, torchvision) and states its architecture
(:mod:`~ssl_zoo.checkpoints.architecture`: what the tensors cannot say, e.g. attention heads);
:mod:`~ssl_zoo.checkpoints.load` builds the backbone and loads it strictly;
``python -m ssl_zoo.checkpoints.convert IN OUT`` writes a published checkpoint as an ssl_zoo one.
"""

from ssl_zoo.checkpoints.architecture import Architecture, describe_state_dict
from ssl_zoo.checkpoints.layouts import Recognised, UnknownCheckpointLayout, recognise
from ssl_zoo.checkpoints.load import (
    STUDENT_PREFIX,
    TEACHER_PREFIX,
    BackboneWeights,
    backbone_from_weights,
    backbone_kwargs_of,
    load_backbone,
    merge_backbone_kwargs,
    read_backbone_weights,
)
from ssl_zoo.utils.safe_load import NotACheckpointError, UnsafeCheckpointError, read_checkpoint

__all__ = ["STUDENT_PREFIX", "TEACHER_PREFIX", "Architecture", "BackboneWeights", "NotACheckpointError", "Recognised",
           "UnknownCheckpointLayout", "UnsafeCheckpointError", "backbone_from_weights", "backbone_kwargs_of",
           "describe_state_dict", "load_backbone", "merge_backbone_kwargs", "read_backbone_weights", "read_checkpoint",
           "recognise"]
