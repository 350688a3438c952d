"""lightly's peers in the quality benchmark (``benchmarks/peers.py``): each peer's loss against a brute-force
computation, its momentum update, its config against the recipe it shares with our method (the same backbone,
views, optimizer and schedule), its rows in the report, table and figure, and a tiny benchmark run that trains it.
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from benchmarks import quality
from benchmarks.peers import LightlyMoCoV2, LightlySimSiam
from benchmarks.quality_report import build_rows, draw_figures, markdown_table, peer_comparison, verdicts
from benchmarks.recipes import PEER, PEERS, architecture, architecture_key, peer_config, recipe
from ssl_zoo.cli import main as cli_main

TINY = {"backbone": "resnet18", "backbone_kwargs": {"model_kwargs": {"channels": [8, 16, 32, 64]}}, "img_size": 16}


def _tiny_moco(momentum: float = 0.9) -> LightlyMoCoV2:
    torch.manual_seed(0)
    return LightlyMoCoV2(**TINY, projector_hidden_dims=32, proj_dim=8, queue_size=16, temperature=0.2,
                         ema_momentum=momentum)


def _key_encoder(model: LightlyMoCoV2) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in [*model.backbone_momentum.named_parameters(),
                                               *model.projection_head_momentum.named_parameters()]}


def _query_encoder(model: LightlyMoCoV2) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in [*model.backbone.named_parameters(),
                                               *model.projection_head.named_parameters()]}


# ============================================================================ the steps
def test_moco_peer_loss_is_infonce_of_each_query_against_its_key_and_the_bank():
    """MoCo Eq. 1 by hand: -log exp(q.k+/tau) / (exp(q.k+/tau) + sum_bank exp(q.n/tau)), q the query encoder's
    projection of view 1, k the (just updated) key encoder's of view 0; the bank then holds the batch's keys."""
    model = _tiny_moco()
    bank = model.criterion.memory_bank.bank.clone()  # [16, 8] random unit vectors, the negatives of this step
    views = torch.randn(4, 2, 3, 16, 16)
    loss = model.training_step({"views": views}, 0)

    with torch.no_grad():  # BN in train mode: batch statistics, whatever order the key batch was shuffled into
        q = F.normalize(model.projection_head(model.backbone(views[:, 1])), dim=1)  # [4, 8]
        k = F.normalize(model.projection_head_momentum(model.backbone_momentum(views[:, 0])), dim=1)
    expected = 0.0
    for i in range(4):
        positive = torch.exp(q[i] @ k[i] / 0.2)
        negatives = torch.exp(bank @ q[i] / 0.2).sum()
        expected += -torch.log(positive / (positive + negatives)) / 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    stored = model.criterion.memory_bank.bank
    assert torch.allclose(stored[:4], k, atol=1e-6) and torch.equal(stored[4:], bank[4:])  # FIFO: oldest first


def test_moco_peer_key_encoder_follows_the_momentum_of_the_recipe():
    """theta_k <- m theta_k + (1 - m) theta_q once per step, before the keys are encoded (lightly's benchmark):
    checked over two steps with an optimiser step between them, at the recipe's constant m."""
    m = 0.9
    model = _tiny_moco(m)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    assert not any(p.requires_grad for p in model.backbone_momentum.parameters())
    for step in range(2):
        before, query = _key_encoder(model), _query_encoder(model)
        loss = model.training_step({"views": torch.randn(4, 2, 3, 16, 16)}, step)
        after = _key_encoder(model)
        for name in after:
            assert torch.allclose(after[name], m * before[name] + (1 - m) * query[name], atol=1e-6), name
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.allclose(after["model.conv1.weight"], _query_encoder(model)["model.conv1.weight"])


def test_simsiam_peer_loss_is_the_symmetric_negative_cosine_with_stop_gradient():
    """-(D(p1, z0) + D(p0, z1)) / 2 with the projections z as constants: the loss and every parameter's gradient
    equal the hand-written ones, and differ from the gradient without the stop-gradient."""
    torch.manual_seed(0)
    model = LightlySimSiam(**TINY, proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=8)
    views = torch.randn(6, 2, 3, 16, 16)
    loss = model.training_step({"views": views}, 0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    def by_hand(stop_gradient: bool) -> torch.Tensor:
        z0, z1 = (model.projection_head(model.backbone(views[:, i])) for i in (0, 1))
        p0, p1 = model.prediction_head(z0), model.prediction_head(z1)
        t0, t1 = (z0.detach(), z1.detach()) if stop_gradient else (z0, z1)
        return -0.5 * (F.cosine_similarity(p1, t0, dim=1).mean() + F.cosine_similarity(p0, t1, dim=1).mean())

    for stop_gradient in (True, False):
        model.zero_grad()
        expected = by_hand(stop_gradient)
        expected.backward()
        same = all(torch.allclose(grads[n], p.grad, atol=1e-6) for n, p in model.named_parameters())
        assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
        assert same is stop_gradient


# ============================================================================ the recipe they share with ours
@dataclass
class _StandInTrainer:
    """What ``configure_optimizers`` reads from a Trainer."""

    batch_size: int
    max_epochs: int
    estimated_stepping_batches: int = 1000
    world_size: int = 1
    accumulate_grad_batches: int = 1

    @property
    def datamodule(self) -> SimpleNamespace:
        return SimpleNamespace(batch_size=self.batch_size)


def _optimizer(model, cfg: dict):
    model._trainer = _StandInTrainer(cfg["data"]["init_args"]["batch_size"], cfg["trainer"]["max_epochs"])
    try:
        return model.configure_optimizers()
    finally:
        model._trainer = None


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(PEERS))
def test_peer_trains_on_its_methods_recipe_with_only_the_step_changed(method, demo_root, tmp_path):
    """The peer's config is the recipe with the model swapped; the CLI accepts it; the peer's backbone, views (same
    image, same seed: the same tensors), optimiser groups and per-step lr schedule are those of our method."""
    cfg, ours_cfg = peer_config(method), recipe(method)
    assert cfg["trainer"] == ours_cfg["trainer"] and cfg["data"] == ours_cfg["data"]
    assert cfg["model"]["class_path"] == PEERS[method][0]
    path = tmp_path / "peer.yaml"
    path.write_text(yaml.safe_dump(cfg))
    root = f"{demo_root}/folder" if cfg["data"]["class_path"].endswith("ImageFolderDataModule") else demo_root
    peer = cli_main(["--config", str(path), "--data.init_args.root", root, "--trainer.logger", "false"], run=False).model
    ours = cli_main(["--config", str(quality.ROOT / f"experiments/{method}/cpu.yaml"), "--trainer.logger", "false",
                     "--data.init_args.root", root], run=False).model
    assert type(peer).__name__ == PEERS[method][0].rsplit(".", 1)[1]
    assert {k: v.shape for k, v in peer.backbone.state_dict().items()} == \
        {k: v.shape for k, v in ours.backbone.state_dict().items()}

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    torch.manual_seed(3)
    ours_views = ours.train_transform()(image)["views"]
    torch.manual_seed(3)
    peer_views = peer.train_transform()(image)["views"]
    assert ours_views.shape == (2, 3, 32, 32) and torch.equal(ours_views, peer_views)

    if method == "mocov2":  # the contrast: temperature, negatives, key-encoder momentum (constant in MoCo v2)
        assert peer.criterion.temperature == ours.hparams.temperature == 0.2
        assert peer.criterion.memory_bank.bank.shape == ours.queues[0].keys.shape == (2048, 128)
        assert peer.hparams.ema_momentum == ours.hparams.ema_momentum == 0.99  # MoCo v2: constant momentum
    ours_opt, peer_opt = _optimizer(ours, ours_cfg), _optimizer(peer, cfg)
    assert type(ours_opt["optimizer"]) is type(peer_opt["optimizer"]) is torch.optim.SGD
    ours_groups, peer_groups = ours_opt["optimizer"].param_groups, peer_opt["optimizer"].param_groups
    assert len(ours_groups) == len(peer_groups)
    for a, b in zip(ours_groups, peer_groups, strict=True):
        assert (a["lr"], a["momentum"], a["weight_decay"]) == (b["lr"], b["momentum"], b["weight_decay"])
        assert sum(p.numel() for p in a["params"]) == sum(p.numel() for p in b["params"])  # the heads' sizes too
    ours_sched, peer_sched = ours_opt["lr_scheduler"], peer_opt["lr_scheduler"]
    assert ours_sched["interval"] == peer_sched["interval"] == "step"
    for step in (0, 1, 250, 999, 1000):
        assert [f(step) for f in ours_sched["scheduler"].lr_lambdas] == \
            [f(step) for f in peer_sched["scheduler"].lr_lambdas]


def test_peer_config_refuses_a_recipe_it_cannot_follow(monkeypatch):
    """A recipe setting the peer does not take, or one that makes our module another method, is an error."""
    original = recipe("mocov2")

    def edited(init: dict):
        return lambda method, config=None: {**original, "model": {**original["model"], "init_args": init}}

    init = original["model"]["init_args"]
    monkeypatch.setattr("benchmarks.recipes.recipe", edited({**init, "pcr": True}))
    with pytest.raises(ValueError, match="LightlyMoCoV2 has no setting pcr"):
        peer_config("mocov2")
    monkeypatch.setattr("benchmarks.recipes.recipe", edited({**init, "num_projectors": 4}))
    with pytest.raises(ValueError, match="num_projectors is not 1"):
        peer_config("mocov2")
    with pytest.raises(ValueError, match="lightly implements no peer of it"):
        peer_config("mpcl")


# ============================================================================ report, table, figure
def _state_with_peer() -> dict:
    arch = architecture_key(architecture("mocov2"))
    state = {key: {} for key in quality.STATE_KEYS}
    state["scores"] = {
        "mocov2": {s: {"knn_top1": v} for s, v in zip("012", (30.0, 32.0, 34.0), strict=True)},
        f"{PEER}/mocov2": {s: {"knn_top1": v} for s, v in zip("012", (33.0, 36.0, 39.0), strict=True)},
        f"random/{arch}": {s: {"knn_top1": 10.0} for s in "012"},
        f"supervised/{arch}": {s: {"knn_top1": 60.0} for s in "012"},
    }
    state["seconds"] = {"mocov2": {s: 100.0 for s in "012"}, f"{PEER}/mocov2": {s: 90.0 for s in "012"}}
    return state


def test_peer_rows_sit_beside_the_methods_in_rows_table_and_comparison():
    rows = build_rows(_state_with_peer(), ["mocov2"], [0, 1, 2])
    peer = next(r for r in rows if r["backbone"] == PEER)
    assert peer["values"] == [33.0, 36.0, 39.0] and peer["pretrain_s"] == [90.0, 90.0, 90.0]
    assert [v["method"] for v in verdicts(rows)] == ["mocov2"]  # the method's verdicts are its own rows only
    (peer_verdict,) = verdicts(rows, PEER)
    assert peer_verdict["gain"] == pytest.approx(26.0) and peer_verdict["passes"]
    # Ours 32 against lightly's 36 +- 3: 4 below, more than one std -> does not hold; 33.5 would.
    (comparison,) = peer_comparison(rows)
    assert comparison["difference"] == pytest.approx(-4.0) and comparison["peer_std"] == pytest.approx(3.0)
    assert not comparison["holds"]
    lines = markdown_table({"rows": rows}).splitlines()
    ours_line = lines.index("| mocov2 | knn_top1 | 10.0 ± 0.0 | 32.0 ± 2.0 | 60.0 ± 0.0 | +22.0 | yes | 100, 100, 100 |")
    assert lines[ours_line + 1] == "| mocov2 (lightly) | knn_top1 | 10.0 ± 0.0 | 36.0 ± 3.0 | 60.0 ± 0.0 | +26.0 | yes | 90, 90, 90 |"
    assert "| mocov2 | knn_top1 | 32.0 | 36.0 ± 3.0 | -4.0 | no |" in lines
    for row in rows:  # within one std (or above) holds
        if row["backbone"] == "pretrained":
            row["mean"] = 33.5
    assert peer_comparison(rows)[0]["holds"]


def _metrics_csv(run_dir: Path, values: list[tuple[int, float]]) -> str:
    run_dir.mkdir(parents=True)
    with (run_dir / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "val/knn_top1"])
        writer.writeheader()
        writer.writerows({"step": s, "val/knn_top1": v} for s, v in values)
    return str(run_dir)


def test_figure_draws_ours_and_the_peer_on_one_plot(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    state = _state_with_peer()
    state["runs"] = {"mocov2": {"0": _metrics_csv(tmp_path / "ours", [(10, 12.0), (20, 20.0)])},
                     f"{PEER}/mocov2": {"0": _metrics_csv(tmp_path / "peer", [(10, 14.0), (20, 25.0)])}}
    state["monitor_keys"] = {"mocov2": "val/knn_top1"}
    captured = {}
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda figure=None: (captured.setdefault("figure", figure), real_close(figure)))
    (path,) = draw_figures({}, state, ["mocov2"], tmp_path / "figures")
    assert path.name == "quality_mocov2.png" and path.read_bytes()[:4] == b"\x89PNG"
    lines = {line.get_label(): tuple(line.get_ydata()) for line in captured["figure"].axes[0].get_lines()}
    assert lines == {"mocov2 CPU recipe (mean of 1 seeds)": (12.0, 20.0),
                     "lightly's step, same recipe (mean of 1 seeds)": (14.0, 25.0)}


def test_merge_brings_a_taken_methods_peer_along(tmp_path):
    """An earlier report's method comes over with its peer's rows, curves and flags."""
    rows = build_rows(_state_with_peer(), ["mocov2"], [0, 1, 2])
    earlier = {"rows": rows, "machine": {"date": "d"}, "command": "c",
               "curves": {"mocov2": {"runs": {}}, f"{PEER}/mocov2": {"runs": {"0": "p"}}},
               "stopped_at_time_limit": {"mocov2": {"0": False}, f"{PEER}/mocov2": {"0": True}}}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))
    report = {"rows": [], "methods": []}
    assert quality.merge_report(report, path) == ["mocov2"]
    assert {r["backbone"] for r in report["rows"]} == {"pretrained", PEER, "random", "supervised"}
    assert report["curves"][f"{PEER}/mocov2"] == {"runs": {"0": "p"}}
    assert report["stopped_at_time_limit"][f"{PEER}/mocov2"] == {"0": True}
    assert report["peer_comparison"][0]["peer"] == pytest.approx(statistics.fmean([33.0, 36.0, 39.0]))


# ============================================================================ a tiny benchmark run
@pytest.mark.slow
def test_a_benchmark_run_of_mocov2_trains_and_reports_its_peer(demo_root, tmp_path, monkeypatch):
    """``--methods mocov2`` trains lightly's peer on the same recipe beside ours and reports its rows (one step per
    run, in this process: the bookkeeping, not the quality)."""
    shorter = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--data.init_args.batch_size", "8",
               "--data.init_args.num_workers", "0"]
    configs = []

    def in_process(cmd: list[str], log: Path) -> tuple[float, float]:  # `python -m ssl_zoo fit ...`, here
        assert cmd[1:4] == ["-m", "ssl_zoo", "fit"]
        configs.append(cmd[cmd.index("--config") + 1])
        cli_main([*cmd[3:], *shorter])
        return 1.0, 1.0

    monkeypatch.chdir(quality.ROOT)
    monkeypatch.setattr(quality, "run_command", in_process)
    monkeypatch.setattr(quality, "PROBE_EPOCHS", 1)
    out, work, root = tmp_path / "quality.json", tmp_path / "work", f"{demo_root}/folder"  # single-label probes
    assert quality.main(["--root", root, "--methods", "mocov2", "--seeds", "0", "--work", str(work),
                         "--out", str(out), "--figures", str(tmp_path / "figures")]) == 0
    peer_yaml = work / PEER / "mocov2" / "cpu.yaml"
    assert configs == ["experiments/mocov2/cpu.yaml", quality.SUPERVISED_CONFIG, str(peer_yaml)]
    assert yaml.safe_load(peer_yaml.read_text()) == peer_config("mocov2")
    report = json.loads(out.read_text())
    peer_rows = [r for r in report["rows"] if r["backbone"] == PEER]
    assert {(r["method"], r["probe"]) for r in peer_rows} == {("mocov2", "knn_top1"), ("mocov2", "linear_top1")}
    assert all(0.0 <= r["mean"] <= 100.0 for r in peer_rows)
    assert {c["probe"] for c in report["peer_comparison"]} == {"knn_top1", "linear_top1"}
    assert report["curves"][f"{PEER}/mocov2"]["runs"] == {"0": str(work / PEER / "mocov2" / "seed0")}
    assert "| mocov2 (lightly) | knn_top1 |" in quality.markdown_table(report)
    # --no-peers trains no peer: the same work folder, every run reused, the peer's config never written
    monkeypatch.setattr(quality, "write_peer_config", lambda *a: pytest.fail("--no-peers wrote a peer config"))
    assert quality.main(["--root", root, "--methods", "mocov2", "--seeds", "0", "--work", str(work),
                         "--out", str(out), "--figures", "", "--no-peers"]) == 0
    assert len(configs) == 3


def test_table_names_a_supervised_ceiling_stopped_by_the_guard():
    """A ceiling near chance may be a run the 10-minute guard ended early: the table says which seeds."""
    rows = build_rows(_state_with_peer(), ["mocov2"], [0, 1, 2])
    key = architecture_key(architecture("mocov2"))
    report = {"rows": rows, "stopped_at_time_limit": {f"supervised/{key}": {"0": True, "1": False, "2": True}}}
    assert f"Supervised ceiling of {key}: seeds 0, 2 stopped at max_time" in markdown_table(report)
    assert "Supervised ceiling" not in markdown_table({"rows": rows})


# ============================================================================ ours and lightly's: one step apart?
def _recipe_models(method: str):
    from ssl_zoo.methods import BAMIA, MPCLMoCoV2

    torch.manual_seed(0)
    ours = {"mocov2": MPCLMoCoV2, "simsiam": BAMIA}[method](**recipe(method)["model"]["init_args"])
    peer_class = {"mocov2": LightlyMoCoV2, "simsiam": LightlySimSiam}[method]
    return ours, peer_class(**peer_config(method)["model"]["init_args"])


def _backbone_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.backbone.named_parameters()}


def _assert_same_grads(ours: dict, peer: dict) -> None:
    assert ours.keys() == peer.keys()
    for name in ours:
        scale = ours[name].abs().max().item() + 1e-12
        assert torch.allclose(ours[name], peer[name], atol=1e-4 * scale, rtol=1e-3), name


def test_our_moco_v2_step_is_lightlys_on_the_same_weights_bank_and_batch():
    """The recipe's MPCL (MoCo v2, one projector) and lightly's step, given the same weights, the same negatives
    and the same batch, give the same loss, the same backbone gradients and the same keys in the queue: whatever
    separates their rows is the seeds, not the method."""
    ours, peer = _recipe_models("mocov2")
    peer.backbone.load_state_dict(ours.backbone.state_dict())
    hidden, output = ours.projectors.hidden[0][0], ours.projectors.outputs[0][0]  # Linear-ReLU-Linear
    with torch.no_grad():
        for mine, theirs in ((hidden, peer.projection_head.layers[0]), (output, peer.projection_head.layers[2])):
            theirs.weight.copy_(mine.weight)
            theirs.bias.copy_(mine.bias)
        peer.backbone_momentum.load_state_dict(peer.backbone.state_dict())  # key encoder = query encoder at step 0
        peer.projection_head_momentum.load_state_dict(peer.projection_head.state_dict())
        peer.criterion.memory_bank.bank.copy_(ours.queues[0].keys)
    views = torch.randn(16, 2, 3, 32, 32)
    loss_ours = ours.training_step({"views": views}, 0)
    loss_peer = peer.training_step({"views": views.flip(1)}, 0)  # lightly's query is views[:, 1], ours views[:, 0]
    assert loss_ours.item() == pytest.approx(loss_peer.item(), rel=1e-5)
    loss_ours.backward()
    loss_peer.backward()
    _assert_same_grads(_backbone_grads(ours), _backbone_grads(peer))
    assert torch.allclose(ours.queues[0].keys[:16], peer.criterion.memory_bank.bank[:16], atol=1e-5)


def test_our_simsiam_step_is_lightlys_on_the_same_weights_and_batch():
    """The recipe's BAMIA without blocks and IA-CLoss (SimSiam) and lightly's step, given the same weights and the
    same batch: the same loss and backbone gradients (ours shuffles the pairs, which neither BN nor the mean sees)."""
    ours, peer = _recipe_models("simsiam")
    peer.backbone.load_state_dict(ours.backbone.state_dict())
    peer.projection_head.layers.load_state_dict(ours.projector.state_dict())
    peer.prediction_head.layers.load_state_dict(ours.predictor.state_dict())
    views = torch.randn(16, 2, 3, 32, 32)
    batch = {"views": views, "block_ids": torch.zeros(16, 2, dtype=torch.long), "index": torch.arange(16)}
    loss_ours = ours.training_step(batch, 0)
    loss_peer = peer.training_step({"views": views}, 0)
    assert loss_ours.item() == pytest.approx(loss_peer.item(), abs=1e-5)
    loss_ours.backward()
    loss_peer.backward()
    _assert_same_grads(_backbone_grads(ours), _backbone_grads(peer))
