"""``describe_state_dict`` (``ssl_zoo.checkpoints.architecture``): the architecture a state dict holds."""

from ssl_zoo.checkpoints import describe_state_dict
from ssl_zoo.models import Backbone
from tests.helpers.pretraining_checkpoints import BEIT_PRETRAIN, TINY_VIT


def test_describe_state_dict_guesses_architectures():
    assert describe_state_dict(Backbone("resnet50").model.state_dict()) == "resnet50"
    vit = describe_state_dict(Backbone("vit_tiny_patch16_224", **TINY_VIT).model.state_dict())
    assert "embed dim 192, 2 blocks, patch 16" in vit


def test_describe_state_dict_recognises_beit():
    shared = Backbone("beit_base_patch16_224", img_size=32, model_kwargs=BEIT_PRETRAIN).model.state_dict()
    assert describe_state_dict(shared).startswith("a BEiT (embed dim 192, 2 blocks, patch 16, shared")
