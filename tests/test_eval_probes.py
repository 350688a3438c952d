"""Checkpoint loading, LARS, eval.json records and the evaluation protocols run through the CLI."""

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import LightningModule, Trainer

from ssl_zoo.checkpoints import UnsafeCheckpointError, describe_state_dict, load_backbone
from ssl_zoo.cli import main
from ssl_zoo.data import ImageFolderDataModule
from ssl_zoo.eval.finetune import FineTune, layer_ids
from ssl_zoo.eval.knn import KNNMonitor
from ssl_zoo.eval.linear import LinearProbe
from ssl_zoo.eval.module import first_occurrences
from ssl_zoo.eval.results import append_eval_record, read_eval_records, results_file_for
from ssl_zoo.eval.transforms import SingleView, center_crop_transform, finetune_train_transform
from ssl_zoo.models import Backbone
from ssl_zoo.utils.optim import LARS

ROOT = Path(__file__).resolve().parents[1]
EVAL_CONFIGS = sorted((ROOT / "experiments" / "eval").glob("*.yaml"))
TINY_VIT = {"img_size": 32, "model_kwargs": {"depth": 2}}  # a 2-block ViT-Ti keeps the tests fast
TINY_BEIT = {"depth": 2, "embed_dim": 192, "num_heads": 3}  # BEiT model_kwargs of the same size


# --------------------------------------------------------------------------------------------- fixtures
def _random_backbone(name: str, seed: int, **kwargs) -> Backbone:
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
    student = _random_backbone(name, 0, **(backbone_kwargs or {}))
    state = {f"backbone.{k}": v for k, v in student.state_dict().items()}
    state["projector.0.weight"] = torch.randn(4, student.num_features)
    other = None
    if teacher:
        other = _random_backbone(name, 1, **(backbone_kwargs or {}))
        state.update({f"teacher_backbone.{k}": v for k, v in other.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 3, "global_step": 30, "state_dict": state,
                "hyper_parameters": {"backbone": name, "backbone_kwargs": backbone_kwargs, "lam": 4.0}}, path)
    return student, other


def assert_same_weights(a: Backbone, b: Backbone) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# --------------------------------------------------------------------------------------------- checkpoints
def test_load_backbone_student_and_teacher(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    student, teacher = make_pretraining_checkpoint(ckpt)
    loaded_student = load_backbone(ckpt)
    loaded_teacher = load_backbone(ckpt, teacher=True)
    assert loaded_student.name == "resnet18"
    assert_same_weights(loaded_student, student)
    assert_same_weights(loaded_teacher, teacher)
    assert not torch.equal(loaded_student.model.conv1.weight, loaded_teacher.model.conv1.weight)
    assert_same_weights(load_backbone(ckpt, backbone="resnet18"), student)  # same name given explicitly


def test_architecture_mismatch_names_both(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    make_pretraining_checkpoint(ckpt, teacher=False)
    with pytest.raises(ValueError, match=r"'resnet18'.*'resnet34'"):
        load_backbone(ckpt, backbone="resnet34")
    plain = tmp_path / "plain.pth"
    torch.save(_random_backbone("resnet18", 0).model.state_dict(), plain)
    with pytest.raises(ValueError, match=r"resnet18.*'resnet50'") as info:
        load_backbone(plain, backbone="resnet50")
    assert "missing" in str(info.value) and "shape" in str(info.value)


def test_changed_backbone_kwargs_report_tensor_shapes(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    make_pretraining_checkpoint(ckpt, name="vit_tiny_patch16_224", teacher=False,
                                backbone_kwargs=TINY_VIT)
    with pytest.raises(ValueError, match=r"architecture mismatch.*vit_tiny_patch16_224.*patch_embed.proj.weight"):
        load_backbone(ckpt, backbone_kwargs={"model_kwargs": {"patch_size": 8}})


def test_teacher_requested_but_absent(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    make_pretraining_checkpoint(ckpt, teacher=False)
    with pytest.raises(ValueError, match="no teacher backbone"):
        load_backbone(ckpt, teacher=True)
    plain = tmp_path / "plain.pth"
    torch.save(_random_backbone("resnet18", 0).model.state_dict(), plain)
    with pytest.raises(ValueError, match="not an ssl_zoo pre-training checkpoint"):
        load_backbone(plain, backbone="resnet18", teacher=True)


def test_plain_timm_state_dict_with_head_and_ddp_prefix(tmp_path):
    import timm

    torch.manual_seed(0)
    with_head = timm.create_model("resnet18", num_classes=10)
    path = tmp_path / "timm.pth"
    torch.save({"model": {f"module.{k}": v for k, v in with_head.state_dict().items()}}, path)
    loaded = load_backbone(path, backbone="resnet18")
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, with_head.state_dict()[k]), k
    # A torchvision-width ResNet states its architecture in its tensors (blocks per stage, bottlenecks): no name.
    unnamed = load_backbone(path)
    assert unnamed.name == "resnet18"
    for k, v in unnamed.model.state_dict().items():
        assert torch.equal(v, with_head.state_dict()[k]), k
    # A bare ViT does not (its attention heads are not in the shapes): the backbone must be named.
    vit = tmp_path / "vit.pth"
    torch.save(Backbone("vit_tiny_patch16_224", **TINY_VIT).model.state_dict(), vit)
    with pytest.raises(ValueError, match="pass backbone=<timm name>") as info:
        load_backbone(vit)
    assert "embed dim 192, 2 blocks" in str(info.value)  # the guess from the tensors' names and shapes


def test_describe_state_dict_guesses_architectures():
    assert describe_state_dict(Backbone("resnet50").model.state_dict()) == "resnet50"
    vit = describe_state_dict(Backbone("vit_tiny_patch16_224", **TINY_VIT).model.state_dict())
    assert "embed dim 192, 2 blocks, patch 16" in vit


def test_vit_position_embeddings_resampled_to_a_new_resolution(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    student, _ = make_pretraining_checkpoint(ckpt, name="vit_tiny_patch16_224", teacher=False,
                                             backbone_kwargs=TINY_VIT)
    with pytest.warns(UserWarning, match="resampled"):
        loaded = load_backbone(ckpt, backbone_kwargs={"img_size": 64})
    assert loaded.model.pos_embed.shape == (1, 1 + 16, 192)
    torch.testing.assert_close(loaded.model.pos_embed[:, :1], student.model.pos_embed[:, :1])  # CLS kept
    assert torch.equal(loaded.model.blocks[0].attn.qkv.weight, student.model.blocks[0].attn.qkv.weight)
    assert loaded(torch.randn(1, 3, 64, 64)).shape == (1, 192)


# --------------------------------------------------------------------------------------------- BEiT fine-tuning
BEIT_PRETRAIN = {**TINY_BEIT, "use_shared_rel_pos_bias": True, "use_rel_pos_bias": False,
                 "use_abs_pos_emb": False, "global_pool": "token"}  # BEiT / MVP pre-training layout
BEIT_FINETUNE = {"model_kwargs": {"use_shared_rel_pos_bias": False, "use_rel_pos_bias": True}}


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


def test_beit_mean_pooling_head_loads_a_pretraining_checkpoint(tmp_path):
    ckpt = tmp_path / "mvp" / "last.ckpt"
    student = make_beit_pretraining_checkpoint(ckpt)
    model = FineTune(ckpt=str(ckpt), num_classes=5, img_size=32, use_mean_pooling=True,
                     backbone_kwargs=BEIT_FINETUNE).eval()
    vit, pre = model.backbone.model, student.model
    assert isinstance(vit.norm, torch.nn.Identity) and isinstance(vit.fc_norm, torch.nn.LayerNorm)
    assert torch.equal(vit.fc_norm.weight, torch.ones(192)) and torch.equal(vit.fc_norm.bias, torch.zeros(192))
    assert vit.rel_pos_bias is None  # BEiT fine-tuning: one table per block, each the pre-trained shared one
    shared = pre.rel_pos_bias.relative_position_bias_table
    for block in vit.blocks:
        assert torch.equal(block.attn.relative_position_bias_table, shared)
    fresh_or_copied = {"fc_norm.weight", "fc_norm.bias"} | {
        f"blocks.{i}.attn.relative_position_bias_table" for i in range(len(vit.blocks))}
    pre_state = pre.state_dict()
    for key, value in vit.state_dict().items():  # everything else, layer scale included, is the checkpoint's
        if key not in fresh_or_copied:
            assert torch.equal(value, pre_state[key]), key
    # Brute force: the pre-training model's tokens before its final norm, patch tokens averaged, a fresh
    # LayerNorm (eps 1e-6, BEiT's), then the linear head.
    x = torch.randn(3, 3, 32, 32)
    seen = {}
    handle = pre.norm.register_forward_pre_hook(lambda _m, args: seen.setdefault("tokens", args[0]))
    with torch.no_grad():
        pre.eval().forward_features(x)
        handle.remove()
        pooled = torch.nn.functional.layer_norm(seen["tokens"][:, 1:].mean(1), (192,), eps=1e-6)
        torch.testing.assert_close(model(x), model.head(pooled), rtol=1e-5, atol=1e-5)


def test_beit_state_dict_saved_by_beits_own_code_loads(tmp_path):
    """BEiT's code saves the relative_position_index buffers (timm recomputes them): they are dropped."""
    ckpt = tmp_path / "mvp" / "last.ckpt"
    student = make_beit_pretraining_checkpoint(ckpt)
    state = dict(student.model.state_dict())
    state["rel_pos_bias.relative_position_index"] = student.model.rel_pos_bias.relative_position_index.clone()
    plain = tmp_path / "beit.pth"
    torch.save({"model": state}, plain)
    kwargs = {"img_size": 32, "model_kwargs": {**BEIT_PRETRAIN, **BEIT_FINETUNE["model_kwargs"]}}
    model = FineTune(ckpt=str(plain), backbone="beit_base_patch16_224", backbone_kwargs=kwargs, num_classes=3,
                     img_size=32, use_mean_pooling=True)
    table = student.model.rel_pos_bias.relative_position_bias_table
    assert torch.equal(model.backbone.model.blocks[1].attn.relative_position_bias_table, table)
    state["rel_pos_bias.relative_position_index"] += 1  # a wrong index would be recomputed too, never loaded
    torch.save({"model": state}, plain)
    again = FineTune(ckpt=str(plain), backbone="beit_base_patch16_224", backbone_kwargs=kwargs, num_classes=3,
                     img_size=32, use_mean_pooling=True)
    assert torch.equal(again.backbone.model.blocks[0].attn.relative_position_index,
                       model.backbone.model.blocks[0].attn.relative_position_index)


def test_mean_pooling_head_on_a_vit_and_its_errors(tmp_path):
    ckpt = tmp_path / "vit.ckpt"
    student, _ = make_pretraining_checkpoint(ckpt, name="vit_tiny_patch16_224", teacher=False,
                                             backbone_kwargs={**TINY_VIT, "model_kwargs": {"depth": 2, "init_values": 0.1}})
    model = FineTune(ckpt=str(ckpt), num_classes=3, img_size=32, use_mean_pooling=True)
    vit = model.backbone.model
    assert isinstance(vit.norm, torch.nn.Identity) and vit.global_pool == "avg"
    # the recorded model_kwargs (layer scale) survive the head option's model_kwargs
    assert torch.equal(vit.blocks[0].ls1.gamma, student.model.blocks[0].ls1.gamma)
    with pytest.raises(ValueError, match="use_mean_pooling needs model.pooling 'backbone'"):
        FineTune(backbone="vit_tiny_patch16_224", backbone_kwargs=TINY_VIT, use_mean_pooling=True, pooling="gap")
    with pytest.raises(ValueError, match="fc_norm"):
        FineTune(backbone="resnet18", use_mean_pooling=True)


def test_merge_backbone_kwargs_merges_model_kwargs_key_by_key():
    from ssl_zoo.checkpoints import merge_backbone_kwargs

    recorded = {"img_size": 224, "drop_path_rate": 0.1, "model_kwargs": {"init_values": 0.1, "global_pool": "token"}}
    merged = merge_backbone_kwargs(recorded, {"img_size": 32, "model_kwargs": {"global_pool": "avg"}})
    assert merged == {"img_size": 32, "drop_path_rate": 0.1,
                      "model_kwargs": {"init_values": 0.1, "global_pool": "avg"}}
    assert merge_backbone_kwargs(recorded, None) == recorded and recorded["model_kwargs"]["global_pool"] == "token"


def test_describe_state_dict_recognises_beit():
    shared = Backbone("beit_base_patch16_224", img_size=32, model_kwargs=BEIT_PRETRAIN).model.state_dict()
    assert describe_state_dict(shared).startswith("a BEiT (embed dim 192, 2 blocks, patch 16, shared")


def test_bicubic_evaluation_resize_is_pils_bicubic_then_centre_crop():
    from PIL import Image as PILImage

    from ssl_zoo.data.datamodule import eval_transform

    rng = np.random.default_rng(0)
    image = PILImage.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    out = center_crop_transform(32, interpolation="bicubic")(image)
    short = int(round(32 / 0.875))  # 37: BEiT's int(224 / (224 / 256)) at 224 px
    long = int(short * 70 / 50)  # torchvision (and so BEiT) truncates the long side
    resized = np.asarray(image.resize((long, short), PILImage.Resampling.BICUBIC), dtype=np.float32)
    top, left = int(round((short - 32) / 2)), int(round((resized.shape[1] - 32) / 2))
    crop = torch.from_numpy(resized[top : top + 32, left : left + 32] / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    torch.testing.assert_close(out, (crop - mean) / std, rtol=0, atol=1e-5)
    bilinear = center_crop_transform(32)(image)
    torch.testing.assert_close(bilinear, eval_transform(32)(image))  # the default is unchanged
    assert not torch.allclose(out, bilinear)
    model = FineTune(backbone="resnet18", num_classes=3, img_size=32, val_interpolation="bicubic")
    model.hparams.multilabel = False
    torch.testing.assert_close(model.val_transform()(image)["views"][0], out)
    with pytest.raises(ValueError, match="val_interpolation"):
        FineTune(backbone="resnet18", val_interpolation="lanczos")


@pytest.mark.slow
def test_beit_finetune_config_fast_dev_run_from_a_pretraining_checkpoint(demo_root, tmp_path):
    ckpt = tmp_path / "mvp" / "20260101-000000" / "checkpoints" / "last.ckpt"
    make_beit_pretraining_checkpoint(ckpt)
    config = ROOT / "experiments" / "eval" / "finetune_vitb_mvp.yaml"
    cli = main(["fit", *_cli_args(config, demo_root, tmp_path / "eval", "--model.init_args.ckpt", str(ckpt),
                                  "--trainer.fast_dev_run", "1")])
    vit = cli.model.backbone.model
    assert isinstance(vit.fc_norm, torch.nn.LayerNorm) and isinstance(vit.norm, torch.nn.Identity)
    assert vit.rel_pos_bias is None and vit.blocks[0].attn.relative_position_bias_table is not None
    assert cli.trainer.callback_metrics["train/loss"].isfinite()
    assert "val/top1" in cli.trainer.callback_metrics


class _Payload:
    """Pickles into a call of ``exec`` that would create a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    state = {f"backbone.{k}": v for k, v in Backbone("resnet18").state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"backbone": "resnet18"}, "x": _Payload(marker)}, ckpt)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_backbone(ckpt)
    assert not marker.exists()
    # The payload is real: an unrestricted unpickler does run it.
    torch.load(ckpt, weights_only=False)
    assert marker.read_text() == "pwned"


# --------------------------------------------------------------------------------------------- LARS
def test_lars_step_matches_hand_computation():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(torch.randn(3))
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.01)
    w0, b0 = w.detach().clone(), b.detach().clone()
    gw, gb = torch.randn(3, 4), torch.randn(3)
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    d = gw + 0.1 * w0
    d = d * (0.01 * w0.norm() / d.norm())
    torch.testing.assert_close(w.detach(), w0 - 0.5 * d)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb)  # 1-D: plain SGD, no decay, no trust ratio
    # second step: momentum buffer v = 0.9 v + d
    w1 = w.detach().clone()
    w.grad = gw.clone()
    opt.step()
    d2 = gw + 0.1 * w1
    d2 = d2 * (0.01 * w1.norm() / d2.norm())
    torch.testing.assert_close(w.detach(), w1 - 0.5 * (0.9 * d + d2))


def test_lars_matches_the_official_update_on_hand_computed_steps():
    """MoCo v3 / Barlow Twins LARS: d = g + wd * p, trust ratio eta * ||p|| / ||g + wd * p|| on matrices; a bias
    takes neither (numbers worked out by hand; lightly's ||g|| + wd * ||p|| would give ratio 0.01 x 5 / 4.49)."""
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = LARS([w, b], lr=0.5, weight_decay=0.2, momentum=0.9, trust_coefficient=0.01)
    gw, gb = torch.tensor([[3.4, -0.8]], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64)
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    # d = [3.4, -0.8] + 0.2 x [3, 4] = [4, 0], ||d|| = 4; ratio 0.01 x 5 / 4 = 0.0125; step 0.5 x [0.05, 0]
    torch.testing.assert_close(w.detach(), torch.tensor([[2.975, 4.0]], dtype=torch.float64))
    torch.testing.assert_close(b.detach(), torch.tensor([0.75, -2.25], dtype=torch.float64))  # b - 0.5 g
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    # w: d2 = [3.4 + 0.595, -0.8 + 0.8] = [3.995, 0], ratio 0.01 ||w1|| / 3.995, v = 0.9 [0.05, 0] + d2 x ratio
    ratio = 0.01 * math.sqrt(2.975**2 + 4.0**2) / 3.995
    expected = torch.tensor([[2.975 - 0.5 * (0.9 * 0.05 + 3.995 * ratio), 4.0]], dtype=torch.float64)
    torch.testing.assert_close(w.detach(), expected)
    # b: v = 0.9 x 0.5 + 0.5 = 0.95, b - 0.5 x 0.95
    torch.testing.assert_close(b.detach(), torch.tensor([0.275, -2.725], dtype=torch.float64))


def test_lars_is_the_one_the_methods_and_probes_use():
    """One LARS for the project, in the utilities room; the linear probe and MPCL (Barlow Twins, MoCo v3) import it."""
    import ssl_zoo.eval.linear
    import ssl_zoo.methods.mpcl.barlow_twins
    import ssl_zoo.methods.mpcl.moco_v3
    import ssl_zoo.utils.optim

    assert ssl_zoo.eval.linear.LARS is ssl_zoo.utils.optim.LARS is LARS
    assert ssl_zoo.methods.mpcl.barlow_twins.LARS is ssl_zoo.methods.mpcl.moco_v3.LARS is LARS
    assert ssl_zoo.eval.LARS is LARS


def test_lars_scales_even_without_weight_decay():
    """Linear probes use weight decay 0: the trust ratio must still apply (lightly's LARS skips it)."""
    w = torch.nn.Parameter(torch.ones(2, 2))
    opt = LARS([w], lr=1.0, weight_decay=0.0, momentum=0.0, trust_coefficient=0.001)
    w.grad = torch.full((2, 2), 100.0)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.ones(2, 2) - 0.001 * 0.5 * 2)  # |w| = 2, step = 0.001*|w|


# --------------------------------------------------------------------------------------------- eval.json
def test_results_file_location(tmp_path):
    ckpt = tmp_path / "runs" / "bam_ia" / "20260101-000000" / "checkpoints" / "last.ckpt"
    assert results_file_for(ckpt, "x") == (ckpt.parent.parent / "eval.json").resolve()
    plain = tmp_path / "weights" / "resnet50.pth"
    assert results_file_for(plain, "x") == (plain.parent / "eval.json").resolve()
    assert results_file_for(None, tmp_path / "eval_run") == tmp_path / "eval_run" / "eval.json"


def test_append_eval_record_keeps_earlier_records(tmp_path):
    path = tmp_path / "run" / "eval.json"
    append_eval_record(path, {"protocol": "a", "metrics": {"mAP": float("nan")}})
    append_eval_record(path, {"protocol": "b", "metrics": {"top1": torch.tensor(12.5)}})
    records = json.loads(path.read_text())
    assert [r["protocol"] for r in records] == ["a", "b"]
    assert records[0]["metrics"]["mAP"] is None and records[1]["metrics"]["top1"] == 12.5
    assert read_eval_records(path) == records


def test_concurrent_appends_lose_no_record(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "eval.json"
    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(lambda i: append_eval_record(path, {"i": i}), range(30)))
    assert sorted(r["i"] for r in read_eval_records(path)) == list(range(30))
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no lock or temporary files left


# --------------------------------------------------------------------------------------------- modules
def test_first_occurrences_drops_padded_duplicates():
    # two processes' shards of a 5-sample split, the second padded with sample 0 again
    index = torch.tensor([0, 2, 4, 1, 3, 0])
    keep = first_occurrences(index)
    assert keep.tolist() == [0, 3, 1, 4, 2]
    assert index[keep].tolist() == [0, 1, 2, 3, 4]


def test_finetune_randaugment_survives_zero_bit_posterize():
    from PIL import Image
    from timm.data.auto_augment import RandAugment

    transform = finetune_train_transform(32, "rand-m9-mstd0.5-inc1", 0.25)
    ops = [op for t in transform.transforms if isinstance(t, RandAugment) for op in t.ops
           if op.name.startswith("Posterize")]
    assert ops
    op = ops[0]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # the maximum magnitude keeps 0 bits
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    assert op(image).getextrema() == ((0, 0), (0, 0), (0, 0))
    op.magnitude = 5  # 4 - int(5 / 10 * 4) = 2 bits: 200 -> 192, 100 -> 64, 50 -> 0
    assert op(image).getpixel((0, 0)) == (192, 64, 0)


def test_finetune_layer_decay_follows_beit():
    """lr scale of ViT layer l is decay^(L + 1 - l): patch embedding l = 0, block i l = i + 1, head L + 1."""
    model = FineTune(backbone="vit_tiny_patch16_224", backbone_kwargs={"model_kwargs": {"depth": 3}}, img_size=32,
                     num_classes=5, layer_decay=0.5)
    groups = model.param_groups(lr=1.0)
    scale_of = {}
    for group in groups:
        for p in group["params"]:
            scale_of[id(p)] = (group["lr_scale"], group["lr"], group["weight_decay"])
    vit = model.backbone.model
    depth = len(vit.blocks)
    assert scale_of[id(vit.patch_embed.proj.weight)][0] == pytest.approx(0.5 ** (depth + 1))
    for i in (0, depth - 1):
        scale, lr, wd = scale_of[id(vit.blocks[i].mlp.fc1.weight)]
        assert scale == pytest.approx(0.5 ** (depth - i)) and lr == pytest.approx(scale) and wd == 0.05
        assert scale_of[id(vit.blocks[i].norm1.weight)][2] == 0.0  # no decay on norms
    assert scale_of[id(vit.norm.weight)][0] == 1.0  # the final norm sits with the head, as in BEiT / MAE
    assert scale_of[id(model.head.weight)] == (1.0, 1.0, 0.05)
    assert scale_of[id(model.head.bias)][2] == 0.0
    assert scale_of[id(vit.pos_embed)][2] == 0.0 and scale_of[id(vit.cls_token)][2] == 0.0
    assert len(scale_of) == sum(1 for _ in model.parameters())  # every parameter is optimised once


# ------------------------------------------------------------------------ semi-supervised (MPCL Table V)
@pytest.mark.parametrize("pct", [1, 10])
def test_semisup_configs_follow_barlow_twins_evaluate(pct):
    """MPCL's footnote 2: Barlow Twins' evaluate.py (README: --epochs 20 --lr-backbone 0.005 --lr-classifier 0.5
    --weight-decay 0; batch 256, SGD momentum 0.9, CosineAnnealingLR over the epochs), same values for 1 % and 10 %."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "experiments" / "eval" / f"semisup_in1k_r50_{pct}pct.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    cfg = yaml.safe_load(buf.getvalue())
    init = cfg["model"]["init_args"]
    assert cfg["trainer"]["max_epochs"] == 20
    assert cfg["trainer"]["devices"] * cfg["data"]["init_args"]["batch_size"] == 256
    assert cfg["data"]["init_args"]["train_subset"] == f"{pct}percent.txt"
    assert (init["optimizer"], init["momentum"], init["nesterov"], init["weight_decay"]) == ("sgd", 0.9, False, 0.0)
    assert (init["base_lr"], init["head_base_lr"], init["lr_batch_size"]) == (0.005, 0.5, 256)
    assert (init["lr_interval"], init["warmup_epochs"], init["min_lr_ratio"]) == ("epoch", 0, 0.0)
    assert init["head_init_std"] == 0.01 and init["label_smoothing"] == 0.0 and init["mixup"] == init["cutmix"] == 0.0
    assert init["auto_augment"] is None and init["color_jitter"] is None and init["re_prob"] == 0.0


def test_semisup_optimiser_has_two_lrs_and_a_per_epoch_cosine():
    """The head at --lr-classifier, the backbone at --lr-backbone, both following CosineAnnealingLR(opt, 20)."""
    from types import SimpleNamespace

    model = FineTune(backbone="resnet18", num_classes=5, img_size=32, optimizer="sgd", nesterov=False, base_lr=0.005,
                     head_base_lr=0.5, lr_batch_size=256, weight_decay=0.0, layer_decay=1.0, warmup_epochs=0,
                     min_lr_ratio=0.0, lr_interval="epoch")
    model._trainer = SimpleNamespace(max_epochs=20, estimated_stepping_batches=20 * 7)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "epoch"
    assert isinstance(optimizer, torch.optim.SGD) and not optimizer.defaults["nesterov"]
    head = {id(p) for p in model.head.parameters()}
    lrs = {}
    for group in optimizer.param_groups:
        assert group["weight_decay"] == 0.0
        for p in group["params"]:
            lrs[id(p)] = group["lr"]
    assert len(lrs) == sum(1 for _ in model.parameters())
    assert {lrs[i] for i in head} == {0.5} and {v for i, v in lrs.items() if i not in head} == {0.005}
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)],
                                                                           lr=1.0), 20)
    for _ in range(20):  # one scheduler step per epoch, as evaluate.py's scheduler.step()
        factor = reference.get_last_lr()[0]
        assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx([0.005 * factor, 0.5 * factor])
        optimizer.step()
        scheduler.step()
        reference.optimizer.step()
        reference.step()
    with pytest.raises(ValueError, match="model.lr_interval"):
        FineTune(backbone="resnet18", lr_interval="iteration")


def _simmim_swin_layer(name: str, depths: list[int]) -> int:
    """SimMIM's optimizer.get_swin_layer on timm parameter names (timm's layers.{i}.downsample is SimMIM's
    layers.{i-1}.downsample: the patch merging that ends stage i - 1)."""
    parts = name.split(".")
    if name.startswith("patch_embed"):
        return 0
    if parts[0] == "layers" and parts[2] == "downsample":
        return sum(depths[: int(parts[1])])
    if parts[0] == "layers" and parts[2] == "blocks":
        return sum(depths[: int(parts[1])]) + int(parts[3]) + 1
    return sum(depths) + 1  # final norm and head


def test_finetune_layer_decay_follows_simmim_for_swin():
    """Swin layer ids as SimMIM fine-tunes them: l = 0 patch embedding, blocks counted across stages, patch
    merging with the block before it, L + 1 the final norm and head; lr scale decay^(L + 1 - l)."""
    depths = [1, 2, 1, 1]
    model = FineTune(backbone="swin_tiny_patch4_window7_224", img_size=32, num_classes=5, layer_decay=0.5,
                     backbone_kwargs={"model_kwargs": {"depths": depths, "embed_dim": 24, "num_heads": [1, 1, 1, 1],
                                                       "window_size": 1}})
    swin = model.backbone.model
    ids = layer_ids(swin)
    assert any("downsample" in n for n in ids)
    for name, _ in swin.named_parameters():
        assert ids[name] == _simmim_swin_layer(name, depths), name
    scale_of = {id(p): g["lr_scale"] for g in model.param_groups(lr=1.0) for p in g["params"]}
    top = sum(depths) + 1
    for name, param in swin.named_parameters():
        assert scale_of[id(param)] == pytest.approx(0.5 ** (top - _simmim_swin_layer(name, depths))), name
    assert scale_of[id(model.head.weight)] == 1.0


def test_layer_ids_depart_from_timms_matcher_only_where_beit_and_simmim_do():
    """timm's ``group_matcher`` (what ``param_groups_layer_decay`` numbers by) merges the final norm into the last
    block (BEiT / MAE: L + 1, with the head) and numbers Swin's patch merging with the next stage's first block
    (SimMIM: with the block before it). Everything else, ResNet and mean-pooled BEiT included, is timm's."""
    import timm
    from timm.models import group_parameters

    swin = {"img_size": 32, "depths": [1, 2, 1, 1], "embed_dim": 24, "num_heads": [1, 1, 1, 1], "window_size": 1}
    expected = {
        "vit_tiny_patch16_224": ({"depth": 3, "img_size": 32}, {"norm.weight": +1, "norm.bias": +1}),
        "beit_base_patch16_224": ({"depth": 2, "embed_dim": 96, "num_heads": 3, "img_size": 32}, {}),
        "resnet18": ({}, {}),
        "swin_tiny_patch4_window7_224": (swin, {"norm.weight": +1, "norm.bias": +1,
                                                **{f"layers.{i}.downsample.{p}": -1 for i in (1, 2, 3)
                                                   for p in ("norm.weight", "norm.bias", "reduction.weight")}}),
    }
    for name, (kwargs, moved) in expected.items():
        model = timm.create_model(name, num_classes=5, **kwargs)
        timm_ids = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
        ours = layer_ids(model)
        assert {n: ours[n] - timm_ids[n] for n in ours if ours[n] != timm_ids[n]} == moved, name


def test_finetune_resnet_head_sits_one_layer_after_the_last_block():
    """The headless ResNet's ids stop at its last block (L); the fine-tuning head is L + 1 (BEiT's numbering), so
    the last block already takes one decay step."""
    model = FineTune(backbone="resnet18", img_size=32, num_classes=5, layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in model.param_groups(lr=1.0) for p in g["params"]}
    resnet = model.backbone.model
    assert scale_of[id(model.head.weight)] == 1.0
    assert scale_of[id(resnet.layer4[1].conv1.weight)] == 0.5 and scale_of[id(resnet.conv1.weight)] == 0.5 ** 9


def test_probe_requires_a_backbone_without_checkpoint():
    with pytest.raises(ValueError, match="model.backbone"):
        LinearProbe()
    with pytest.raises(ValueError, match="model.pooling"):
        LinearProbe(backbone="resnet18", pooling="avg")


def _three_bands(width: int = 96, height: int = 32):
    """A wide image: a red band on the left quarter, blue on the right quarter, green between."""
    from PIL import Image

    pixels = torch.zeros(height, width, 3, dtype=torch.uint8)
    pixels[:, : width // 4, 0] = 255
    pixels[:, width // 4 : 3 * width // 4, 1] = 255
    pixels[:, 3 * width // 4 :, 2] = 255
    return Image.fromarray(pixels.numpy())


def _colours(view: torch.Tensor) -> list[int]:
    """The dominant channel (0 red, 1 green, 2 blue) of each column of a normalised view ``[1, 3, S, S]``."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    image = view[0] * std + mean  # [3, S, S] in [0, 1]
    return image.mean(dim=1).argmax(dim=0).tolist()  # [S]


def test_multilabel_probe_crops():
    """Squash keeps the whole image (both side bands), the centre crop cuts them away, RandomResizedCrop
    trains on random parts of the image, squash training only flips the whole image."""
    from ssl_zoo.eval.linear import MultiLabelLinearProbe

    image = _three_bands()
    squash = MultiLabelLinearProbe(backbone="resnet18", img_size=32)
    columns = _colours(squash.val_transform()(image)["views"])
    assert columns[0] == 0 and columns[-1] == 2 and columns[16] == 1

    cropped = MultiLabelLinearProbe(backbone="resnet18", img_size=32, val_crop="center_crop",
                                    train_crop="random_resized_crop")
    view = cropped.val_transform()(image)["views"]
    assert view.shape == (1, 3, 32, 32)
    assert set(_colours(view)) == {1}  # 96x32 -> short side 37 (111x37) -> the middle 32 columns: green only

    torch.manual_seed(0)
    whole = [_colours(squash.train_transform()(image)["views"]) for _ in range(8)]
    assert all(c in (columns, columns[::-1]) for c in whole)
    crops = [_colours(cropped.train_transform()(image)["views"]) for _ in range(8)]
    assert any(c not in (columns, columns[::-1]) for c in crops)
    with pytest.raises(ValueError, match="model.train_crop"):
        MultiLabelLinearProbe(backbone="resnet18", train_crop="center_crop")


def test_linear_probe_refuses_multilabel_data(demo_root, tmp_path):
    with pytest.raises(ValueError, match="MultiLabelLinearProbe"):
        main(["fit", "--config", str(ROOT / "experiments/eval/linear_demo.yaml"), "--trainer.fast_dev_run", "1",
              "--model.init_args.backbone", "resnet18", "--model.init_args.img_size", "32",
              "--data", "ssl_zoo.data.CocoDataModule", "--data.init_args.root", demo_root,
              "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
              "--trainer.default_root_dir", str(tmp_path)])


# --------------------------------------------------------------------------------------------- CLI runs
def _data_root(config: dict, demo_root: str) -> str:
    return os.path.join(demo_root, "folder") if "ImageFolder" in config["data"]["class_path"] else demo_root


def _cli_args(config_path: Path, demo_root: str, tmp_path: Path, *extra: str) -> list[str]:
    config = yaml.safe_load(config_path.read_text())
    init = config["model"]["init_args"]
    name = str(init.get("backbone", ""))
    beit, vit = "beit" in name, "vit" in name
    tiny = "beit_base_patch16_224" if beit else "vit_tiny_patch16_224" if vit else "resnet18"
    args = ["--config", str(config_path), "--data.init_args.root", _data_root(config, demo_root),
            "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.num_nodes", "1", "--trainer.strategy", "auto",
            "--trainer.precision", "32-true",
            "--trainer.accumulate_grad_batches", "1", "--trainer.enable_progress_bar", "false",
            "--model.init_args.backbone", tiny, "--model.init_args.img_size", "32"]
    if beit:  # a 2-block, 192-wide BEiT in the config's layout
        model_kwargs = {**((init.get("backbone_kwargs") or {}).get("model_kwargs") or {}), **TINY_BEIT}
        args += ["--model.init_args.backbone_kwargs", json.dumps({"model_kwargs": model_kwargs})]
    elif vit:
        args += ["--model.init_args.backbone_kwargs", json.dumps({"model_kwargs": TINY_VIT["model_kwargs"]})]
    if config["data"]["init_args"].get("train_subset"):  # ImageNet's subset lists; tests/test_subset_list.py
        args += ["--data.init_args.train_subset", "null"]
    return [*args, *extra]


def _subcommand(config_path: Path) -> str:
    return "validate" if "KNNProbe" in config_path.read_text() else "fit"


def test_eval_configs_exist():
    names = {p.name for p in EVAL_CONFIGS}
    assert {"linear_demo.yaml", "gamp_demo.yaml", "finetune_demo.yaml", "linear_mocov2.yaml",
            "linear_mae_mvp.yaml", "gamp_coco_224.yaml", "gamp_coco_448.yaml", "finetune_vitb_mvp.yaml",
            "finetune_swinb_hvp_simmim.yaml", "finetune_swins_hvp_simmim.yaml", "finetune_swint_hvp_simmim.yaml",
            "finetune_vitb_hvp_simmim.yaml"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("config", EVAL_CONFIGS, ids=lambda p: p.stem)
def test_eval_config_fast_dev_run(config, demo_root, tmp_path):
    cli = main([_subcommand(config), *_cli_args(config, demo_root, tmp_path, "--trainer.fast_dev_run", "1")])
    metrics = cli.trainer.callback_metrics
    assert "val/top1" in metrics or "val/mAP" in metrics
    if _subcommand(config) == "fit":
        assert metrics["train/loss"].isfinite()
    assert not (tmp_path / "eval.json").exists()  # debug runs are not results


def _fit_on_training_split(config: Path, demo_root: str, ckpt: Path, tmp_path: Path, *extra: str):
    """Fit, validating on the training split: the probe must be able to fit the features it is given."""
    config_dict = yaml.safe_load(config.read_text())
    if "ImageFolder" in config_dict["data"]["class_path"]:
        same_split = ["--data.init_args.val_dir", "train"]
    else:
        same_split = ["--data.init_args.val_images", "train2017",
                      "--data.init_args.val_ann", "annotations/instances_train2017.json"]
    args = _cli_args(config, demo_root, tmp_path / "eval_run", "--model.init_args.ckpt", str(ckpt),
                     "--model.init_args.img_size", "64", "--data.init_args.batch_size", "16",
                     "--trainer.logger", "false", *same_split, *extra)
    return main(["fit", *args])


@pytest.mark.slow
@pytest.mark.parametrize(("config", "metric", "chance"), [("linear_demo", "top1", 100 / 10),
                                                          ("gamp_demo", "mAP", None)])
def test_probe_fits_demo_data_above_chance_and_records_it(config, metric, chance, demo_root, tmp_path):
    ckpt = tmp_path / "pretrain" / "20260101-000000" / "checkpoints" / "last.ckpt"
    make_pretraining_checkpoint(ckpt, teacher=False)
    cli = _fit_on_training_split(ROOT / "experiments" / "eval" / f"{config}.yaml", demo_root, ckpt, tmp_path,
                                 "--trainer.max_epochs", "10", "--data.init_args.batch_size", "8")
    probe = cli.model
    if chance is None:  # mAP of a random ranking = the mean positive rate of the classes
        targets = torch.stack([t for _, t in cli.datamodule.labelled_dataset("train")])
        chance = 100 * targets.mean(0)[targets.sum(0) > 0].mean().item()
    assert probe.last_val_metrics[metric] > chance + 25, (probe.last_val_metrics, chance)

    records = read_eval_records(ckpt.parent.parent / "eval.json")
    assert len(records) == 1
    record = records[0]
    assert record["ckpt"] == str(ckpt.resolve()) and record["backbone"] == "resnet18"
    assert record["protocol"] == probe.protocol and record["epoch"] == 9
    assert record["metrics"][metric] == pytest.approx(probe.last_val_metrics[metric])
    assert record["settings"]["cache_features"] is True and record["date"]


@pytest.mark.slow
def test_cached_features_are_the_backbone_features_by_index(demo_root, tmp_path):
    cli = main(["fit", *_cli_args(ROOT / "experiments/eval/gamp_demo.yaml", demo_root, tmp_path,
                                  "--trainer.fast_dev_run", "1")])
    probe = cli.model
    dataset = cli.datamodule.labelled_dataset("train", transform=probe.eval_image_transform())
    for i in (0, 5, len(dataset) - 1):
        image, _ = dataset[i]
        with torch.no_grad():
            want = probe.backbone.forward_map(image[None])
        want = (want.mean(dim=(2, 3)) + want.amax(dim=(2, 3))) / 2
        torch.testing.assert_close(probe._cache["train"][i : i + 1], want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_frozen_backbone_is_unchanged_by_probe_training(demo_root, tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    student, _ = make_pretraining_checkpoint(ckpt, teacher=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = main(["fit", *_cli_args(ROOT / "experiments/eval/linear_demo.yaml", demo_root, tmp_path / "e",
                                      "--model.init_args.ckpt", str(ckpt), "--model.init_args.cache_features",
                                      "false", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1",
                                      "--trainer.logger", "false")])
    probe = cli.model
    assert not probe.backbone.training and probe.head.training
    assert_same_weights(probe.backbone, student)  # weights and BN running statistics untouched
    assert all(not p.requires_grad for p in probe.backbone.parameters())


class _TinyPretraining(LightningModule):
    """The minimum a pre-training method has for the kNN monitor: a ``.backbone`` and a view transform."""

    def __init__(self):
        super().__init__()
        self.backbone = Backbone("resnet18")

    def train_transform(self):
        return SingleView(center_crop_transform(32))

    def training_step(self, batch, batch_idx):
        return self.backbone(batch["views"][:, 0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.slow
def test_knn_monitor_logs_knn_accuracy(demo_root, tmp_path):
    datamodule = ImageFolderDataModule(root=os.path.join(demo_root, "folder"), batch_size=8, num_workers=0)
    trainer = Trainer(max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, default_root_dir=tmp_path, accelerator="cpu",
                      callbacks=[KNNMonitor(img_size=32, k=5)])
    module = _TinyPretraining()
    trainer.fit(module, datamodule=datamodule)
    assert "val/knn_top5" in trainer.callback_metrics

    # Brute force on the backbone as the monitor saw it (lr 0: only BN statistics moved, before the vote):
    # centre-cropped 32 px features, each query's 5 most cosine-similar bank images vote with exp(s / 0.07).
    module.backbone.eval()
    features = {}
    for split in ("train", "val"):
        dataset = datamodule.labelled_dataset(split, transform=center_crop_transform(32))
        with torch.no_grad():
            features[split] = [(module.backbone(image[None])[0], int(target)) for image, target in dataset]
    hits = 0
    for query, target in features["val"]:
        sims = sorted(((float(torch.cosine_similarity(query, f, dim=0)), label) for f, label in features["train"]),
                      reverse=True)[:5]
        votes = {}
        for sim, label in sims:
            votes[label] = votes.get(label, 0.0) + math.exp(sim / 0.07)
        hits += max(votes, key=votes.get) == target
    expected = 100.0 * hits / len(features["val"])
    assert float(trainer.callback_metrics["val/knn_top1"]) == pytest.approx(expected, abs=1e-3)
