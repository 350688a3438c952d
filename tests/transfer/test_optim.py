"""Dense transfer optimisation (``ssl_zoo.transfer.optim``): layer decay per block, weight decay of biases per
recipe, and the lr schedules of detectron2 and mmcv."""

import pytest

from ssl_zoo.transfer.detection import ObjectDetection
from ssl_zoo.transfer.optim import dense_param_groups, lr_multiplier
from ssl_zoo.transfer.pyramids import (
    dense_model_kwargs,
)
from ssl_zoo.transfer.segmentation import SemanticSegmentation

TINY_VIT = {"img_size": 64, "model_kwargs": {"depth": 4, **dense_model_kwargs("vit")}}


def _lr_and_weight_decay(module, groups) -> tuple[dict[str, float], dict[str, float]]:
    """{parameter name: lr} and {parameter name: weight decay} of optimiser groups; each parameter in one group."""
    name_of = {id(p): n for n, p in module.named_parameters()}
    lr_of, wd_of = {}, {}
    for group in groups:
        for param in group["params"]:
            name = name_of[id(param)]
            assert name not in lr_of, f"{name} in two groups"
            lr_of[name], wd_of[name] = group["lr"], group["weight_decay"]
    return lr_of, wd_of


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_vit_layer_decay_gives_each_block_its_lr(task):
    """BEiT / ViTDet: lr of block i = lr * d^(L - i) (ids 1..L), embeddings d^(L + 1), everything after the
    blocks (final norm, neck, heads) the full lr; no weight decay on norms, position embedding, class token."""
    decay, lr, depth = 0.5, 1.0, 4
    if task == "segmentation":
        module = SemanticSegmentation(backbone="vit_tiny_patch16_224", backbone_kwargs=TINY_VIT, num_classes=3,
                                      channels=16, aux_channels=8, layer_decay=decay)
    else:
        module = ObjectDetection(backbone="vit_tiny_patch16_224", backbone_kwargs=TINY_VIT, num_classes=3,
                                 with_masks=True, pyramid="simple_fpn", layer_decay=decay, fpn_channels=16,
                                 head_dim=16, fc_dim=32)
    groups = dense_param_groups(module, module.backbone, lr, weight_decay=0.05, layer_decay=decay,
                                decay_biases=False)
    lr_of, wd_of = _lr_and_weight_decay(module, groups)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(lr_of) == trainable
    checked_blocks = set()
    for name, value in lr_of.items():
        timm_name = name.split("backbone.model.", 1)[1] if "backbone.model." in name else None
        if timm_name and timm_name.startswith("blocks."):
            block = int(timm_name.split(".")[1])
            assert value == pytest.approx(lr * decay ** (depth - block)), name
            checked_blocks.add(block)
        elif timm_name and timm_name.startswith(("patch_embed.", "pos_embed", "cls_token")):
            assert value == pytest.approx(lr * decay ** (depth + 1)), name
        else:  # final norm, neck, heads
            assert value == pytest.approx(lr), name
        if name.endswith(("pos_embed", "cls_token", ".bias")) or ".norm" in name:
            assert wd_of[name] == 0.0, name
    assert checked_blocks == set(range(depth))
    assert any(v == 0.05 for v in wd_of.values())


def test_weight_decay_of_biases_follows_each_recipe():
    """detectron2 / mmdet (decay_biases): norms by module type go without weight decay, biases and BEiT's other
    1-D tensors (layer-scale gammas, q / v biases) take it. BEiT's segmentation recipe (decay_biases=False,
    ``len(param.shape) == 1 or name.endswith(".bias")``): no 1-D tensor does (timm's weight_decay_exclude_1d)."""
    beit = {"img_size": 64, "model_kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 2, "init_values": 0.1,
                                             **dense_model_kwargs("beit")}}
    module = SemanticSegmentation(backbone="beit_base_patch16_224", backbone_kwargs=beit, num_classes=3, channels=16,
                                  aux_channels=8)
    module.build_head(3)
    one_d = ("gamma_1", "gamma_2", "q_bias", "v_bias", "proj.bias")
    for decay_biases in (True, False):
        _, wd_of = _lr_and_weight_decay(module, dense_param_groups(module, module.backbone, 1.0, 0.05,
                                                                   decay_biases=decay_biases))
        block = {n: wd for n, wd in wd_of.items() if ".blocks.0." in n}
        assert {wd for n, wd in block.items() if n.endswith(one_d)} == {0.05 if decay_biases else 0.0}
        assert {wd for n, wd in block.items() if ".norm" in n} == {0.0}
        assert {wd for n, wd in block.items() if n.endswith("qkv.weight")} == {0.05}
        assert not any(v for n, v in wd_of.items() if n.endswith(("pos_embed", "cls_token", "bias_table")))


def test_resnet_neck_and_heads_sit_one_layer_after_the_last_block():
    """BEiT's numbering on a ResNet: stem 0, blocks 1..L, everything after the blocks (neck, heads) L + 1, so the
    last block already takes one decay step (the headless timm ResNet has no parameter of its own at L + 1)."""
    module = ObjectDetection(backbone="resnet18", num_classes=3, pyramid="fpn", layer_decay=0.5, fpn_channels=16,
                             head_dim=16, fc_dim=32)
    module.build_head(3)
    lr_of, _ = _lr_and_weight_decay(module, dense_param_groups(module, module.backbone, 1.0, 0.05, layer_decay=0.5))
    resnet = {n.split("backbone.model.", 1)[1]: v for n, v in lr_of.items() if "backbone.model." in n}
    assert resnet["layer4.1.conv1.weight"] == pytest.approx(0.5) and resnet["layer1.0.conv1.weight"] == 0.5 ** 8
    assert resnet["conv1.weight"] == 0.5 ** 9
    assert {v for n, v in lr_of.items() if "backbone.model." not in n} == {1.0}


def test_lr_schedules_follow_detectron2_and_mmcv():
    # detectron2 WarmupMultiStepLR: factor 0.001 -> 1 linearly over the warmup, x0.1 at each milestone.
    kwargs = dict(total_steps=900, schedule="multistep", warmup_steps=100, warmup_ratio=0.001,
                  milestones=(2 / 3, 8 / 9), gamma=0.1)
    assert lr_multiplier(0, **kwargs) == pytest.approx(0.001)
    assert lr_multiplier(50, **kwargs) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_multiplier(599, **kwargs) == pytest.approx(1.0)
    assert lr_multiplier(600, **kwargs) == pytest.approx(0.1)
    assert lr_multiplier(800, **kwargs) == pytest.approx(0.01)
    # mmcv poly (power 1, min 0) with linear warmup from 1e-6.
    poly = dict(total_steps=1000, schedule="poly", warmup_steps=10, warmup_ratio=1e-6, power=1.0)
    assert lr_multiplier(500, **poly) == pytest.approx(0.5)
    assert lr_multiplier(5, **poly) == pytest.approx((1 - 5 / 1000) * (1e-6 * 0.5 + 0.5))
