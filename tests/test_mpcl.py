"""MPCL / MoCo v2 / MoCo v3: loss wiring against brute force, per-projector queues, PTB state, momentum
encoder, and every config under experiments/{mpcl,mocov2,mocov3}.

Models are tiny (2-block ViT-Tiny at 32 px = 4 patches, small heads) so the whole file runs in well under a
minute on 2 CPU cores. The 2-process DDP equivalence and the PTB all-reduce are in tests/test_distributed.py.
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ssl_zoo.methods import MPCL
from ssl_zoo.methods.mpcl import batch_shuffle, batch_unshuffle

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
TAU = 0.2
LAM = 0.01
EPS = 0.5


def _tiny(flavour: str = "mocov2", seed: int = 0, **kwargs) -> MPCL:
    args = dict(
        backbone="vit_tiny_patch16_224",
        backbone_kwargs={"img_size": 32, "model_kwargs": {"depth": 2}},  # 2 blocks: fast to build
        flavour=flavour,
        img_size=32,
        num_projectors=3,
        projector_hidden_dims=[16, 24, 32],
        proj_dim=8,
        pred_hidden_dim=16,
        queue_size=20,
        head_norm="layer" if flavour == "mocov3" else "none",
    )
    args.update(kwargs)
    torch.manual_seed(seed)
    return MPCL(**args)


def _batch(n: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"views": torch.randn(n, 2, 3, 32, 32, generator=g), "index": torch.arange(n)}


# ---------------------------------------------------------------------- brute-force references (float64)
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _lse(v: np.ndarray) -> float:
    top = v.max()
    return float(top + math.log(np.exp(v - top).sum()))


def _ref_queue_infonce(q: np.ndarray, k: np.ndarray, queue: np.ndarray) -> tuple[float, float]:
    """-log(exp(q.k+/t) / (exp(q.k+/t) + sum_j exp(q.n_j/t))), loop over queries."""
    q, k = _unit(q), _unit(k)
    losses, hits = [], 0
    for i in range(len(q)):
        logits = np.array([q[i] @ k[i]] + [q[i] @ n for n in queue]) / TAU
        losses.append(_lse(logits) - logits[0])
        hits += int(np.argmax(logits) == 0)
    return float(np.mean(losses)), hits / len(q)


def _ref_batch_infonce(q: np.ndarray, k: np.ndarray) -> tuple[float, float]:
    """MoCo v3: keys of the batch as negatives, cross-entropy times 2 * tau."""
    q, k = _unit(q), _unit(k)
    losses, hits = [], 0
    for i in range(len(q)):
        logits = np.array([q[i] @ k[j] for j in range(len(k))]) / TAU
        losses.append(_lse(logits) - logits[i])
        hits += int(np.argmax(logits) == i)
    return 2 * TAU * float(np.mean(losses)), hits / len(q)


def _ref_pcr(z: np.ndarray) -> np.ndarray:
    """Eq. 2: mean over samples of the mean cosine to the other projectors' outputs."""
    mp, b, _ = z.shape
    out = np.zeros(mp)
    for m in range(mp):
        for i in range(b):
            out[m] += sum(_unit(z[m, i]) @ _unit(z[o, i]) for o in range(mp) if o != m) / (mp - 1) / b
    return out


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


# ---------------------------------------------------------------------- loss wiring
@pytest.mark.parametrize("flavour", ["mocov2", "mocov3"])
def test_training_step_equals_brute_force_eq4(flavour):
    model = _tiny(flavour)
    batch = _batch(4)
    x1, x2 = batch["views"][:, 0], batch["views"][:, 1]
    queues = [q.keys.clone() for q in model.queues] if flavour == "mocov2" else None
    with torch.no_grad():
        z1, z2 = model.project(x1), model.project(x2)
        p1, p2 = model.predict(z1), model.predict(z2)
        k1, k2 = model.keys(x1), model.keys(x2)
    loss = model.training_step(batch, 0)

    mp = z1.shape[0]
    losses = np.zeros(mp)
    accs = np.zeros(mp)
    for m in range(mp):
        if flavour == "mocov2":  # asymmetric, queue negatives
            losses[m], accs[m] = _ref_queue_infonce(_np(z1[m]), _np(k2[m]), _np(queues[m]))
        else:  # symmetric, the two directions summed
            l12, a12 = _ref_batch_infonce(_np(p1[m]), _np(k2[m]))
            l21, a21 = _ref_batch_infonce(_np(p2[m]), _np(k1[m]))
            losses[m], accs[m] = l12 + l21, (a12 + a21) / 2
    pcr = _ref_pcr(_np(z1)) if flavour == "mocov2" else (_ref_pcr(_np(z1)) + _ref_pcr(_np(z2))) / 2
    expected = np.mean(losses / mp + LAM * pcr)  # Eq. 4 with the first epoch's uniform weights 1/Mp
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(_np(model.ptb_correct), accs * 4, atol=1e-5)
    assert model.ptb_count.item() == 4


def test_single_projector_is_plain_moco_v2():
    model = _tiny("mocov2", num_projectors=1, projector_hidden_dims=16)
    batch = _batch(4)
    queue = model.queues[0].keys.clone()
    with torch.no_grad():
        z, k = model.project(batch["views"][:, 0]), model.keys(batch["views"][:, 1])
    loss = model.training_step(batch, 0)
    expected, _ = _ref_queue_infonce(_np(z[0]), _np(k[0]), _np(queue))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------- per-projector queues
def test_each_projector_queue_receives_only_its_own_keys():
    model = _tiny("mocov2", queue_size=10)
    before = [q.keys.clone() for q in model.queues]
    steps = [_batch(4, seed=s) for s in (1, 2, 3)]  # 12 keys: the third batch wraps around
    expected = []
    for batch in steps:
        with torch.no_grad():  # g^m_xi(f_xi(x2)) for every projector, normalised
            h = model.teacher_backbone(batch["views"][:, 1])
            expected.append(torch.stack([torch.nn.functional.normalize(g(h), dim=1)
                                         for g in model.teacher_projectors]))  # [Mp, 4, D]
        model.training_step(batch, 0)
    for m, queue in enumerate(model.queues):
        # Rows written in order 0..11 modulo 10: batch 1 -> 0-3, batch 2 -> 4-7, batch 3 -> 8, 9, 0, 1.
        torch.testing.assert_close(queue.keys[0:2], expected[2][m][2:4])
        torch.testing.assert_close(queue.keys[2:4], expected[0][m][2:4])
        torch.testing.assert_close(queue.keys[4:8], expected[1][m])
        torch.testing.assert_close(queue.keys[8:10], expected[2][m][0:2])
        assert queue.ptr.item() == 2
        for other in range(len(model.queues)):  # no other projector's keys anywhere in this queue
            if other != m:
                sims = queue.keys @ expected[1][other].T  # [10, 4]
                assert sims.max() < 1 - 1e-4
        assert not torch.equal(queue.keys, before[m])


# ---------------------------------------------------------------------- PTB (Eq. 3)
def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


def test_ptb_weights_follow_previous_epoch_accuracy_and_survive_resume():
    model = _tiny("mocov2")
    np.testing.assert_allclose(_np(model.loss_weights()), np.full(3, 1 / 3))  # uniform in epoch 0

    # Epoch 0: two steps of 8 queries with unequal accuracies.
    model.record_accuracy(torch.tensor([8.0, 4.0, 2.0]), 8)
    model.record_accuracy(torch.tensor([6.0, 4.0, 0.0]), 8)
    np.testing.assert_allclose(_np(model.loss_weights()), np.full(3, 1 / 3))  # unchanged mid-epoch
    model.on_train_epoch_end()
    acc0 = np.array([14, 8, 2]) / 16
    w1 = _softmax((1 - acc0) / EPS)
    np.testing.assert_allclose(_np(model.loss_weights()), w1, rtol=1e-6)
    assert model.loss_weights()[2] > model.loss_weights()[1] > model.loss_weights()[0]  # worst gets most
    np.testing.assert_allclose(_np(model.ptb_last_acc), acc0, rtol=1e-6)
    assert model.ptb_count.item() == 0 and model.ptb_correct.abs().sum().item() == 0

    # Epoch 1: only its own accuracies decide the weights of epoch 2 (half an epoch, then resume).
    model.record_accuracy(torch.tensor([1.0, 3.0, 4.0]), 4)
    state = model.state_dict()
    resumed = _tiny("mocov2", seed=123)  # different init: everything must come from the state dict
    resumed.load_state_dict(state)
    np.testing.assert_allclose(_np(resumed.loss_weights()), w1, rtol=1e-6)
    batch = _batch(4)
    torch.testing.assert_close(resumed.training_step(batch, 0), model.training_step(batch, 0))
    uniform = _tiny("mocov2", seed=123)
    uniform.load_state_dict({k: v for k, v in state.items() if k != "ptb_weight"}, strict=False)
    assert not torch.allclose(uniform.training_step(batch, 0), model.training_step(batch, 0))

    # The training steps above added their accuracies; close epoch 1 on the resumed model.
    extra_correct = resumed.ptb_correct - torch.tensor([1.0, 3.0, 4.0])
    resumed.on_train_epoch_end()
    acc1 = (np.array([1.0, 3.0, 4.0]) + _np(extra_correct)) / 8
    np.testing.assert_allclose(_np(resumed.loss_weights()), _softmax((1 - acc1) / EPS), rtol=1e-6)


def test_ptb_off_keeps_uniform_weights_and_epoch_without_batches_keeps_weights():
    model = _tiny("mocov2", ptb=False)
    model.record_accuracy(torch.tensor([4.0, 0.0, 2.0]), 4)
    model.on_train_epoch_end()
    np.testing.assert_allclose(_np(model.loss_weights()), np.full(3, 1 / 3))
    np.testing.assert_allclose(_np(model.ptb_last_acc), [1.0, 0.0, 0.5])  # still tracked for the logs
    on = _tiny("mocov2")
    on.record_accuracy(torch.tensor([4.0, 0.0, 2.0]), 4)
    on.on_train_epoch_end()
    w = on.loss_weights().clone()
    on.on_train_epoch_end()  # nothing recorded: keep the weights
    torch.testing.assert_close(on.loss_weights(), w)


# ---------------------------------------------------------------------- momentum encoder
@pytest.mark.parametrize("flavour", ["mocov2", "mocov3"])
def test_teacher_gets_no_gradient_and_follows_ema(flavour):
    model = _tiny(flavour)
    loss = model.training_step(_batch(4), 0)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in [*model.teacher_backbone.named_parameters(), *model.teacher_projectors.named_parameters()]:
        assert not p.requires_grad and p.grad is None, name
    student = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student)
    if flavour == "mocov3":  # MoCo v3's frozen random patch projection
        assert all(not p.requires_grad for p in model.backbone.model.patch_embed.parameters())

    teacher_before = [p.clone() for p in model.teacher_projectors.parameters()]
    torch.optim.SGD(student, lr=0.5).step()
    model._total_steps = 10
    model.on_train_batch_end(None, None, 0)  # global_step 0 without a trainer
    m = 0.999 if flavour == "mocov2" else 0.99
    for t_old, t_new, s in zip(teacher_before, model.teacher_projectors.parameters(),
                               model.projectors.parameters(), strict=True):
        torch.testing.assert_close(t_new, m * t_old + (1 - m) * s)
    assert not torch.equal(teacher_before[0], next(model.teacher_projectors.parameters()))


def test_mocov3_momentum_is_cosine_from_099_to_1():
    model = _tiny("mocov3")
    assert model.ema_momentum_at(0, 100) == pytest.approx(0.99)
    assert model.ema_momentum_at(50, 100) == pytest.approx(0.995)
    assert model.ema_momentum_at(100, 100) == pytest.approx(1.0)
    assert model.ema_momentum_at(25, 100) == pytest.approx(1 - 0.01 * (1 + math.cos(math.pi / 4)) / 2)
    v2 = _tiny("mocov2")
    assert v2.ema_momentum_at(0, 100) == v2.ema_momentum_at(70, 100) == 0.999


def test_flavour_defaults_and_argument_errors():
    v2, v3 = _tiny("mocov2", head_norm=None), _tiny("mocov3", head_norm=None)
    assert (v2.hparams.optimizer, v2.hparams.base_lr, v2.hparams.weight_decay) == ("sgd", 0.03, 1e-4)
    assert (v3.hparams.optimizer, v3.hparams.base_lr, v3.hparams.weight_decay) == ("adamw", 1.5e-4, 0.1)
    assert v2.hparams.shuffle_bn and not v3.hparams.shuffle_bn and v3.hparams.warmup_epochs == 40
    assert v2.predictors is None and len(v3.predictors) == 3 and v3.queues is None
    # "different hidden dims": projector m really has width projector_hidden_dims[m]
    assert [p[0].out_features for p in v2.projectors] == [16, 24, 32]
    assert [p[0].out_features for p in v3.projectors] == [16, 24, 32]  # 3-layer: two hidden layers
    assert [type(layer).__name__ for layer in v3.projectors[0]].count("Linear") == 3
    with pytest.raises(ValueError, match="projector_hidden_dims"):
        _tiny(projector_hidden_dims=[16, 16])
    with pytest.raises(ValueError, match="num_projectors"):
        _tiny(num_projectors=0)
    with pytest.raises(ValueError, match="epsilon"):
        _tiny(epsilon=0.0)
    with pytest.raises(ValueError, match="flavour"):
        _tiny(flavour="simclr")


def test_batch_shuffle_is_identity_on_one_process():
    x = torch.randn(5, 3)
    shuffled, unshuffle = batch_shuffle(x)
    assert unshuffle is None and torch.equal(shuffled, x) and torch.equal(batch_unshuffle(x, None), x)


# ---------------------------------------------------------------------- configs
# One fast_dev_run per config family (MPCL, MoCo v2, MoCo v3); every other config is parsed.
DEMO_CONFIGS = ["mpcl/demo.yaml", "mocov2/demo.yaml", "mocov3/demo.yaml"]
OTHER_DEMO_CONFIGS = ["mpcl/demo_mocov3.yaml"]
PAPER_CONFIGS = ["mpcl/r50_in100_mocov2.yaml", "mpcl/r50_in1k_mocov2.yaml", "mpcl/vitb_in100_mocov3.yaml",
                 "mocov2/r50_in100.yaml", "mocov3/vitb_in100.yaml"]
ABLATIONS = sorted(p.name for p in (EXPERIMENTS / "mpcl" / "ablations").glob("*.yaml"))


def test_every_config_is_listed():
    found = {str(p.relative_to(EXPERIMENTS)) for d in ("mpcl", "mocov2", "mocov3")
             for p in (EXPERIMENTS / d).glob("*.yaml")}
    assert found == set(DEMO_CONFIGS + OTHER_DEMO_CONFIGS + PAPER_CONFIGS)
    assert len(ABLATIONS) >= 7


@pytest.mark.parametrize("config", DEMO_CONFIGS)
def test_demo_config_fast_dev_run(config, demo_root, tmp_path, monkeypatch):
    from ssl_zoo.cli import main

    monkeypatch.setenv("WANDB_MODE", "disabled")
    args = ["fit", "--config", str(EXPERIMENTS / config), "--trainer.fast_dev_run", "1",
            "--trainer.accelerator", "cpu", "--run_root", str(tmp_path),
            "--data.init_args.root", str(Path(demo_root) / "folder"),
            "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "8"]
    if yaml.safe_load((EXPERIMENTS / config).read_text())["model"]["init_args"]["backbone"].startswith("vit"):
        # Same model family with 2 of the 12 blocks: the wiring is what is tested, CPU time is scarce.
        args += ["--model.init_args.backbone_kwargs", '{"img_size": 64, "model_kwargs": {"depth": 2}}']
    cli = main(args)
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss_epoch"])
    model = cli.model
    mp = model.hparams.num_projectors
    acc = np.array([metrics[f"train/proj{m}/acc_epoch"].item() for m in range(mp)])
    assert ((acc >= 0) & (acc <= 1)).all()
    assert "train/z_std_epoch" in metrics
    # The epoch-end hook closed the (one-batch) epoch: its accuracies now set the PTB weights.
    assert model.ptb_count.item() == 0
    np.testing.assert_allclose(_np(model.ptb_last_acc), acc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(model.loss_weights()), _softmax((1 - acc) / EPS), rtol=1e-5)


@pytest.mark.parametrize("config", OTHER_DEMO_CONFIGS)
def test_other_demo_configs_parse(config):
    cfg = _parse(EXPERIMENTS / config)
    assert _build_on_meta(cfg).hparams.num_projectors == 4
    assert cfg["data"]["init_args"]["root"] == "data/demo/folder"


def _parse(*configs: Path) -> dict:
    """Parse with the CLI exactly as `fit` would (no run), returning the resolved config."""
    from ssl_zoo.cli import main

    args = ["fit"] + [a for c in configs for a in ("--config", str(c))] + ["--print_config"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(buf.getvalue())


def _build_on_meta(cfg: dict) -> MPCL:
    """Instantiate the configured model without allocating memory (checks the constructor's validation)."""
    assert cfg["model"]["class_path"] == "ssl_zoo.methods.MPCL"
    with torch.device("meta"):
        return MPCL(**cfg["model"]["init_args"])


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_paper_configs_parse(config):
    cfg = _parse(EXPERIMENTS / config)
    model = _build_on_meta(cfg)
    assert cfg["trainer"]["strategy"] == "ddp" and cfg["trainer"]["precision"] == "bf16-mixed"
    global_batch = cfg["data"]["init_args"]["batch_size"] * cfg["trainer"]["devices"]
    if model.hparams.flavour == "mocov2":
        assert global_batch == 256 and cfg["trainer"]["max_epochs"] == 200
        assert model.hparams.shuffle_bn and len(model.queues[0].keys) == 65536
    else:
        assert global_batch == 1024 and cfg["trainer"]["max_epochs"] == 300
        assert cfg["trainer"]["sync_batchnorm"] and model.hparams.warmup_epochs == 40
    assert model.hparams.num_projectors == (1 if config.startswith("moco") else 4)


@pytest.mark.parametrize("base", ["mpcl/r50_in100_mocov2.yaml"])  # the overlays are flavour-independent
def test_ablation_overlays_parse(base):
    base_backbone = _parse(EXPERIMENTS / base)["model"]["init_args"]["backbone"]
    for name in ABLATIONS:
        cfg = _parse(EXPERIMENTS / base, EXPERIMENTS / "mpcl" / "ablations" / name)
        model = _build_on_meta(cfg)
        ablation = yaml.safe_load((EXPERIMENTS / "mpcl" / "ablations" / name).read_text())
        for key, value in ablation["model"]["init_args"].items():
            assert model.hparams[key] == value, (name, key)
        assert cfg["name"] == ablation["name"]
        assert cfg["model"]["init_args"]["backbone"] == base_backbone
