"""Tiny backbones and checkpoints laid out as our pre-training methods save them, for the tests that load,
fine-tune or evaluate from a pre-training checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from ssl_zoo.models import Backbone

TINY_VIT = {"img_size": 32, "model_kwargs": {"depth": 2}}  # a 2-block ViT-Ti keeps the tests fast


TINY_BEIT = {"depth": 2, "embed_dim": 192, "num_heads": 3}  # BEiT model_kwargs of the same size


# BEiT as BEiT (and MVP) pre-train it: one relative position bias shared by the blocks, no absolute position
# embedding, CLS token after the final norm; 2 blocks of width 192 keep it small.
BEIT_PRETRAIN = {**TINY_BEIT, "use_shared_rel_pos_bias": True, "use_rel_pos_bias": False,
                 "use_abs_pos_emb": False, "global_pool": "token"}


def random_backbone(name: str, seed: int, **kwargs) -> Backbone:
    """A seeded ``Backbone(name, **kwargs)`` whose BN running means are random too (not their defaults)."""
    torch.manual_seed(seed)
    model = Backbone(name, **kwargs)
    with torch.no_grad():  # make BN statistics differ from their defaults too
        for buffer_name, buffer in model.named_buffers():
            if buffer_name.endswith("running_mean"):
                buffer.normal_()
    return model


def make_pretraining_checkpoint(path: Path, name: str = "resnet18", teacher: bool = True,
                                backbone_kwargs: dict | None = None) -> tuple[Backbone, Backbone | None]:
    """A checkpoint laid out as the pre-training methods save it (Lightning dict, prefixed modules)."""
    student = random_backbone(name, 0, **(backbone_kwargs or {}))
    state = {f"backbone.{k}": v for k, v in student.state_dict().items()}
    state["projector.0.weight"] = torch.randn(4, student.num_features)
    other = None
    if teacher:
        other = random_backbone(name, 1, **(backbone_kwargs or {}))
        state.update({f"teacher_backbone.{k}": v for k, v in other.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 3, "global_step": 30, "state_dict": state,
                "hyper_parameters": {"backbone": name, "backbone_kwargs": backbone_kwargs, "lam": 4.0}}, path)
    return student, other


def make_beit_pretraining_checkpoint(path: Path) -> Backbone:
    """An MVP-style checkpoint of a tiny BEiT (shared relative position bias with non-zero entries)."""
    torch.manual_seed(0)
    student = Backbone("beit_base_patch16_224", img_size=32, model_kwargs=BEIT_PRETRAIN)
    with torch.no_grad():
        student.model.rel_pos_bias.relative_position_bias_table.normal_()
        student.model.norm.weight.uniform_(0.5, 1.5)  # a trained final norm, which fine-tuning must drop
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in student.state_dict().items()},
                "hyper_parameters": {"backbone": "beit_base_patch16_224",
                                     "backbone_kwargs": {"img_size": 32, "model_kwargs": BEIT_PRETRAIN}}}, path)
    return student


def assert_same_weights(a: Backbone, b: Backbone) -> None:
    """The two backbones' timm models hold the same keys with bitwise equal tensors."""
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
