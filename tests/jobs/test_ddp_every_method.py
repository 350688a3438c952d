"""DDP equivalence of every method, and the scale settings of every paper config.

Each method runs one training step in 2 gloo processes on CPU, each holding half of a batch inside
``DistributedDataParallel`` (per-rank batch b), and must reproduce the loss (mean over ranks, what a
synced log shows) and the parameter gradients (DDP's average) of one process on the concatenated
batch 2b, from the same seed and the same views. Covered: BAM+IA-CLoss, SimSiam, MPCL on MoCo v2
(per-projector queues, shuffled BN), on MoCo v3 (global in-batch negatives) and on Barlow Twins (global-batch
standardisation and cross-correlation, gathered with gradients; in-batch retrieval accuracy), MVP, HVP-MTL
(global Sinkhorn). All models are tiny (2-block ViT-Tiny at 32 px) and all ranks run in a single spawn.

BatchNorm computes per-process statistics, so a split batch cannot match one process unless it is
synchronised; ``SyncBatchNorm`` has no CPU kernel, so the heads here use LayerNorm (or no norm, MoCo
v2's own projector) and the backbone is a ViT. Everything that crosses ranks is still exercised.

Where the cross-rank pieces are tested on their own: each loss's file in ``tests/losses/`` holds its 2-process
test (the IA-CLoss / SupCon gather, the MoCo v3 global negatives, the MoCo key-queue gather, the Sinkhorn
all-reduce), ``tests/utils/test_distributed.py`` the bare collectives; PTB's all-reduce (tests/losses/test_ptb.py on its own) and shuffled BN
(MPCLMoCoV2) are tested here inside the MPCL methods.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from ssl_zoo.methods import BAMIA, HVPMTL, MVP, MPCLBarlowTwins, MPCLMoCoV2, MPCLMoCoV3
from ssl_zoo.models import Backbone
from ssl_zoo.utils import distributed as D
from tests.helpers.ddp_utils import ddp_average_step, named_gradients, run_distributed

WORLD = 2
B_LOCAL = 2  # images per rank; one process sees WORLD * B_LOCAL
S = 32  # view side: a 2 x 2 grid of 16 px patches
TINY_VIT = dict(backbone="vit_tiny_patch16_224", backbone_kwargs={"img_size": S, "model_kwargs": {"depth": 2}},
                img_size=S)
# A 2-block, 64-wide open_clip vision tower with 16 px patches as MVP's frozen teacher; the text tower is a stub.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": S, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def _no_log(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``LightningModule.log`` outside a Trainer."""


def _seeded(cls: type[nn.Module], **kwargs: Any) -> nn.Module:
    torch.manual_seed(0)  # every rank and the single process build identical weights (and queues)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MVP's random-teacher warning is expected here
        model = cls(**kwargs)
    model.log = _no_log
    return model


# ---------------------------------------------------------------------- one tiny model and batch per method
def _bam_ia() -> nn.Module:
    return _seeded(BAMIA, **TINY_VIT, proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=8, head_norm="layer")


def _simsiam() -> nn.Module:
    return _seeded(BAMIA, **TINY_VIT, proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=8, head_norm="layer",
                   bam=False, ia_loss="none")


MPCL_CLASSES = (MPCLMoCoV2, MPCLMoCoV3, MPCLBarlowTwins)


def _mpcl(cls: type[nn.Module]) -> nn.Module:
    heads = dict(num_projectors=3, projector_hidden_dims=[16, 24, 32], shared_hidden=False, proj_dim=8)
    if cls is MPCLMoCoV2:  # MoCo v2's BN-free MLP
        return _seeded(cls, **TINY_VIT, **heads, queue_size=20, head_norm="none")
    if cls is MPCLMoCoV3:
        # MoCo v3's ViT init starts the class token at ~1e-6 with a zero position: the first LayerNorm then sees a ~0
        # vector and scales float round-off by 1/sqrt(eps) = 1000 in that token's gradient. The init has its own
        # test (tests/methods/test_mpcl.py); here it would only blur the comparison.
        return _seeded(cls, **TINY_VIT, **heads, pred_hidden_dim=16, head_norm="layer", moco_vit_init=False)
    return _seeded(cls, **TINY_VIT, **heads, head_norm="layer")


def _mvp() -> nn.Module:
    return _seeded(MVP, **TINY_VIT, num_masking_patches=2, min_num_patches=1, teacher_kwargs=TINY_CLIP)


def _hvp_mtl() -> nn.Module:
    model = _seeded(HVPMTL, **TINY_VIT, num_classes=5, decoder_dim=16, decoder_heads=2, decoder_ffn_dim=32,
                    decoder_dropout=0.0, num_prototypes=7, cluster_hidden_dim=16, cluster_dim=8,
                    head_norm="layer", mask_patch_size=16,
                    alpha_mcls=0.3, alpha_cl=0.7, alpha_mim=1.3, alpha_mom=2.0)  # every term visible
    # At initialisation the EMA teacher equals the student and L_mom vanishes; move it so the term counts.
    with torch.no_grad():
        for p in [*model.teacher_backbone.parameters(), *model.teacher_decoder.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    return model


def _views(g: torch.Generator, n: int, views: int) -> torch.Tensor:
    return torch.randn(n, views, 3, S, S, generator=g)


def _patch_mask(g: torch.Generator, n: int, masked: int) -> torch.Tensor:
    return torch.stack([torch.randperm(4, generator=g) < masked for _ in range(n)]).view(n, 2, 2)


def global_batch(method: str) -> dict[str, torch.Tensor]:
    """The global batch (WORLD * B_LOCAL images) in the layout of the method's transform and collate."""
    g = torch.Generator().manual_seed(1)
    n = WORLD * B_LOCAL
    index = torch.arange(n) + 100  # dataset indices: IA-CLoss's image ids
    if method in ("bam_ia", "simsiam"):
        v = 8 if method == "bam_ia" else 2  # 4 blocks x 2 views, or SimSiam's 2 views
        return {"views": _views(g, n, v), "index": index,
                "block_ids": torch.arange(v // 2).repeat_interleave(2).expand(n, -1).clone()}
    if method.startswith("mpcl"):
        return {"views": _views(g, n, 2), "index": index}
    if method == "mvp":
        return {"views": _views(g, n, 1), "teacher_views": _views(g, n, 1), "mask": _patch_mask(g, n, 2),
                "index": index}
    return {"views": _views(g, n, 2), "mask": _patch_mask(g, n, 3), "index": index,
            "target": (torch.rand(n, 5, generator=g) < 0.4).float()}


METHODS: dict[str, Callable[[], nn.Module]] = {
    "bam_ia": _bam_ia,
    "simsiam": _simsiam,
    "mpcl_mocov2": lambda: _mpcl(MPCLMoCoV2),
    "mpcl_mocov3": lambda: _mpcl(MPCLMoCoV3),
    "mpcl_barlowtwins": lambda: _mpcl(MPCLBarlowTwins),
    "mvp": _mvp,
    "hvp_mtl": _hvp_mtl,
}


def _mpcl_state(model: nn.Module) -> dict[str, Any]:
    """Queues and PTB statistics after the step, then the PTB weights once the epoch is closed."""
    ptb = model.mpcl_loss.ptb
    state = {"ptb_correct": ptb.correct.clone(), "ptb_count": ptb.count.clone()}
    if isinstance(model, MPCLMoCoV2):
        state["queues"] = [q.keys.clone() for q in model.queues]
    model.on_train_epoch_end()  # acc_m of the epoch -> w_m of Eq. 3
    state["ptb_last_acc"] = ptb.last_acc.clone()
    state["ptb_weight"] = ptb.weight.clone()
    return state


class _KeyEncoderSpy(nn.Module):
    """Stands in for MPCLMoCoV2's key encoder: records what it encodes and returns it as one projector's keys."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return x.unsqueeze(0)  # [1, B, ...]: Mp = 1


# ---------------------------------------------------------------------- the runs
def _per_rank(rank: int, world_size: int, batches: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method, build in METHODS.items():
        model = build()
        out[method] = ddp_average_step(model, batches[method], rank, world_size)
        if isinstance(model, MPCL_CLASSES):
            out[method].update(_mpcl_state(model))
    # Sensitivity control: IA-CLoss without its gather sees only the local batch and must differ.
    model = _bam_ia()
    model.contrastive_loss.gather_distributed = False
    out["bam_ia_without_gather"] = ddp_average_step(model, batches["bam_ia"], rank, world_size)
    # Shuffled BN in MPCLMoCoV2.keys: the key encoder of each rank sees a slice of one permutation of the global
    # batch; the keys come back in each rank's own order. A strided input, as views[:, 1] is.
    model = METHODS["mpcl_mocov2"]()
    model.teacher_backbone, model.teacher_projectors = _KeyEncoderSpy(), nn.Identity()
    x = torch.arange(world_size * 4 * 2, dtype=torch.float32).reshape(-1, 2, 1)[rank * 4 : (rank + 1) * 4, 1]
    keys = model.keys(x)  # [1, 4, 1]
    out["shuffle"] = {"x": x, "all": D.gather_no_grad(model.teacher_backbone.inputs[0]), "unshuffled": keys[0]}
    return out


def _single_process(batches: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method, build in METHODS.items():
        model = build()
        loss = model.training_step(batches[method], 0)
        loss.backward()
        out[method] = {"loss": loss.detach(), "grads": named_gradients(model)}
        if isinstance(model, MPCL_CLASSES):
            out[method].update(_mpcl_state(model))
    return out


@pytest.fixture(scope="module")
def results() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    batches = {method: global_batch(method) for method in METHODS}
    per_rank = run_distributed(_per_rank, world_size=WORLD, batches=batches)
    return per_rank, _single_process(batches)


# ---------------------------------------------------------------------- equivalence
@pytest.mark.distributed
@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_match_one_process_on_the_concatenated_batch(results, method):
    per_rank, single = results
    ref = single[method]
    assert torch.isfinite(ref["loss"])
    assert any(g.abs().sum() > 0 for g in ref["grads"].values())
    for rank, got in enumerate(per_rank):
        torch.testing.assert_close(got[method]["loss"], ref["loss"], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, r=rank: f"rank {r} loss: {m}")
        assert got[method]["grads"].keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            # atol grows with the tensor's largest gradient once that passes 0.2: float32 round-off is relative to
            # it (Barlow Twins' gradients reach ~40 here, through a standardisation over 4 samples), and single
            # elements near zero are compared against that scale. A missing gather changes gradients by O(1).
            atol = max(1e-6, 5e-6 * g.abs().max().item())
            torch.testing.assert_close(got[method]["grads"][name], g, rtol=1e-4, atol=atol,
                                       msg=lambda m, n=name, r=rank: f"rank {r} grad of {n}: {m}")


@pytest.mark.distributed
def test_the_comparison_detects_a_missing_gather(results):
    per_rank, single = results
    local_only = per_rank[0]["bam_ia_without_gather"]["loss"]
    assert abs(local_only.item() - single["bam_ia"]["loss"].item()) > 1e-3


@pytest.mark.distributed
def test_mocov2_queues_hold_the_keys_of_both_ranks_in_rank_order(results):
    per_rank, single = results
    for got in per_rank:
        for q_got, q_ref in zip(got["mpcl_mocov2"]["queues"], single["mpcl_mocov2"]["queues"], strict=True):
            torch.testing.assert_close(q_got, q_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["mpcl_mocov2", "mpcl_mocov3", "mpcl_barlowtwins"])
def test_ptb_statistics_are_all_reduced_and_weights_agree_across_ranks(results, method):
    per_rank, single = results
    ref = single[method]
    for got in per_rank:
        assert got[method]["ptb_count"].item() == WORLD * B_LOCAL  # queries of the global batch
        torch.testing.assert_close(got[method]["ptb_correct"], ref["ptb_correct"])
        torch.testing.assert_close(got[method]["ptb_last_acc"], ref["ptb_last_acc"])
        torch.testing.assert_close(got[method]["ptb_weight"], ref["ptb_weight"])
    torch.testing.assert_close(ref["ptb_weight"].sum(), torch.tensor(1.0))


@pytest.mark.distributed
def test_shuffled_bn_permutes_the_global_batch_and_unshuffles(results):
    per_rank, _ = results
    shuffled = [r["shuffle"] for r in per_rank]
    assert sorted(shuffled[0]["all"].flatten().tolist()) == list(range(1, WORLD * 4 * 2, 2))
    assert not torch.equal(shuffled[0]["all"].flatten(), torch.arange(1.0, WORLD * 4 * 2, 2))  # seeded: not the identity
    torch.testing.assert_close(shuffled[0]["all"], shuffled[1]["all"])  # one permutation for all ranks
    for s in shuffled:
        torch.testing.assert_close(s["unshuffled"], s["x"])


# ---------------------------------------------------------------------- paper configs
ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "experiments"
PRETRAINING_DIRS = ("bam_ia", "simsiam", "mocov2", "mocov3", "mpcl", "mvp", "hvp_mtl")
# Full paper configs (a trainer and a data section); overlays inherit them from the config they are laid on.
PAPER_CONFIGS = sorted(p for d in PRETRAINING_DIRS for p in (EXPERIMENTS / d).rglob("*.yaml")
                       if not p.name.startswith(("demo", "cpu")) and p.name != "tables.yaml"
                       and {"trainer", "data"} <= set(yaml.safe_load(p.read_text()) or {}))


def test_paper_configs_are_found():
    assert len(PAPER_CONFIGS) >= 14


def _batchnorm_and_shuffled_bn(model_cfg: dict) -> tuple[bool, bool]:
    """Whether the configured model normalises with BatchNorm and whether it shuffles BN (MoCo v2).

    Built on the meta device: the structure without memory.
    """
    init, name = model_cfg.get("init_args") or {}, model_cfg["class_path"].rsplit(".", 1)[1]
    with torch.device("meta"):
        if name == "MVP":  # only the student trains; the frozen CLIP teacher would be fetched to be built
            model = Backbone(init["backbone"], **(init.get("backbone_kwargs") or {}))
            shuffle_bn = False
        else:
            model = {c.__name__: c for c in (BAMIA, HVPMTL, *MPCL_CLASSES)}[name](**init)
            shuffle_bn = bool(model.hparams.get("shuffle_bn", False))
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()), shuffle_bn


@pytest.mark.slow
@pytest.mark.parametrize("config", PAPER_CONFIGS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_paper_configs_state_the_scale_settings(config):
    """DDP over ``devices x num_nodes`` processes, bf16 autocast, explicit accumulation, and SyncBN exactly
    where BatchNorm statistics matter (not with MoCo's shuffled BN, which SyncBN would defeat)."""
    cfg = yaml.safe_load(config.read_text())
    trainer = cfg["trainer"]
    for key in ("strategy", "precision", "devices", "num_nodes", "accumulate_grad_batches", "sync_batchnorm"):
        assert key in trainer, f"{config.relative_to(ROOT)}: trainer.{key} is not stated"
    assert trainer["strategy"] == "ddp" and trainer["precision"] == "bf16-mixed"
    assert trainer["devices"] >= 1 and trainer["num_nodes"] >= 1 and trainer["accumulate_grad_batches"] == 1
    has_batchnorm, shuffle_bn = _batchnorm_and_shuffled_bn(cfg["model"])
    expected = has_batchnorm and not shuffle_bn
    assert trainer["sync_batchnorm"] is expected, (
        f"{config.relative_to(ROOT)}: trainer.sync_batchnorm should be {expected}"
    )
