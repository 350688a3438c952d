"""Backbones (a thin adapter over timm) and heads."""

from ssl_zoo.models.backbones import Backbone, load_state_dict_file
from ssl_zoo.models.heads import MLPHead, norm_layer_by_name

__all__ = ["Backbone", "MLPHead", "norm_layer_by_name", "load_state_dict_file"]
