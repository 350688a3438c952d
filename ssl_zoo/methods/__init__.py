"""One LightningModule per method, each composed from the shared parts; chosen by ``class_path`` in YAML."""

from ssl_zoo.methods.bam_ia import BAMIA
from ssl_zoo.methods.hvp_mtl import HVPMTL
from ssl_zoo.methods.mpcl import MPCLBarlowTwins, MPCLMoCoV2, MPCLMoCoV3
from ssl_zoo.methods.mvp import MVP

__all__ = ["BAMIA", "HVPMTL", "MPCLBarlowTwins", "MPCLMoCoV2", "MPCLMoCoV3", "MVP"]
