"""MPCL on MoCo v2 / MoCo v3 / Barlow Twins (MPCLMoCoV2, MPCLMoCoV3, MPCLBarlowTwins): loss wiring against brute
force, per-projector queues, the shared-hidden projector layout and the paper's parameter counts, PTB's loss scale
and its epoch boundary, the Table II alternatives, MoCo v3's ViT construction, and every config under
experiments/{mpcl,mocov2,mocov3}. PTB's state on its own: tests/losses/test_ptb.py; the settings and steps of the former
flavour-switched class: tests/methods/test_mpcl_reference.py.

Models are tiny (2-block ViT-Tiny at 32 px = 4 patches, small heads) so the whole file runs in about a minute
on 2 CPU cores. The 2-process DDP equivalence and the PTB all-reduce are in tests/jobs/test_ddp_every_method.py.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import io
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightly.utils.scheduler import cosine_schedule
from lightning.pytorch import Callback, Trainer

from ssl_zoo.cli import main
from ssl_zoo.methods import MPCLBarlowTwins, MPCLMoCoV2, MPCLMoCoV3
from ssl_zoo.utils.loop_progress import lightning_private_batches_done

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "experiments"
TAU = 0.2
LAM = 0.01
EPS = 0.5
CLASSES = {"mocov2": MPCLMoCoV2, "mocov3": MPCLMoCoV3, "barlowtwins": MPCLBarlowTwins}
MPCLModel = MPCLMoCoV2 | MPCLMoCoV3 | MPCLBarlowTwins


def _tiny(framework: str = "mocov2", seed: int = 0, **kwargs) -> MPCLModel:
    args = dict(
        backbone="vit_tiny_patch16_224",
        backbone_kwargs={"img_size": 32, "model_kwargs": {"depth": 2}},  # 2 blocks: fast to build
        img_size=32,
        num_projectors=3,
        projector_hidden_dims=[16, 24, 32],
        shared_hidden=False,
        proj_dim=8,
        head_norm="none" if framework == "mocov2" else "layer",
        **({"queue_size": 20} if framework == "mocov2" else {}),
        **({"pred_hidden_dim": 16} if framework == "mocov3" else {}),
    )
    args.update(kwargs)
    torch.manual_seed(seed)
    return CLASSES[framework](**args)


def _project(model: MPCLModel, x: torch.Tensor) -> torch.Tensor:
    return model.projectors(model.backbone(x))  # [Mp, B, D]


def _record(model: MPCLModel, correct: list[float], count: int) -> None:
    """Add ``correct`` right queries of each projector out of ``count`` to PTB's epoch."""
    model.mpcl_loss.ptb.update(torch.tensor(correct) / count, count)


def _weights(model: MPCLModel) -> torch.Tensor:
    return model.mpcl_loss.ptb.loss_weights()


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


def _ref_weight_orthogonality(weights: list[np.ndarray]) -> np.ndarray:
    """Table II alternative: for projector m, the mean over the other projectors l of the mean squared cosine
    between every row of W_m and every row of W_l, loop by loop."""
    mp = len(weights)
    out = np.zeros(mp)
    for m in range(mp):
        for o in range(mp):
            if o == m:
                continue
            cos2 = [(_unit(a) @ _unit(b)) ** 2 for a in weights[m] for b in weights[o]]
            out[m] += np.mean(cos2) / (mp - 1)
    return out


def _ref_barlow_twins(za: np.ndarray, zb: np.ndarray, lam: float = 0.0051) -> float:
    """Barlow Twins Eq. 1, element by element: C_ij = sum_b a_bi b_bj / N on batch-standardised embeddings."""
    n, d = za.shape

    def standardise(z):
        return (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5)  # biased variance, BatchNorm's eps

    a, b = standardise(za), standardise(zb)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(a[k, i] * b[k, j] for k in range(n)) / n
            loss += (1 - c_ij) ** 2 if i == j else lam * c_ij**2
    return loss


def _ref_retrieval(za: np.ndarray, zb: np.ndarray) -> float:
    a, b = _unit(za), _unit(zb)
    return float(np.mean([np.argmax([a[i] @ b[j] for j in range(len(b))]) == i for i in range(len(a))]))


# ---------------------------------------------------------------------- loss wiring
CASES = {
    "mocov2_separate": ("mocov2", {}),
    "mocov2_shared_pcr_orthogonality": ("mocov2", {"shared_hidden": True, "projector_hidden_dims": 16,
                                                   "orthogonality": True}),
    "mocov3_separate": ("mocov3", {}),
    "mocov3_shared": ("mocov3", {"shared_hidden": True, "projector_hidden_dims": 16}),
    "barlowtwins_shared": ("barlowtwins", {"shared_hidden": True, "projector_hidden_dims": 16}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_training_step_equals_brute_force_eq4(case):
    framework, kwargs = CASES[case]
    model = _tiny(framework, **kwargs)
    batch = _batch(4)
    x1, x2 = batch["views"][:, 0], batch["views"][:, 1]
    queues = [q.keys.clone() for q in model.queues] if framework == "mocov2" else None
    with torch.no_grad():
        z1, z2 = _project(model, x1), _project(model, x2)
        if framework == "mocov3":
            p1, p2 = model.predict(z1), model.predict(z2)
        if framework != "barlowtwins":
            k1, k2 = model.keys(x1), model.keys(x2)
    loss = model.training_step(batch, 0)

    mp = z1.shape[0]
    losses = np.zeros(mp)
    accs = np.zeros(mp)
    for m in range(mp):
        if framework == "mocov2":  # asymmetric, queue negatives
            losses[m], accs[m] = _ref_queue_infonce(_np(z1[m]), _np(k2[m]), _np(queues[m]))
        elif framework == "mocov3":  # symmetric, the two directions summed
            l12, a12 = _ref_batch_infonce(_np(p1[m]), _np(k2[m]))
            l21, a21 = _ref_batch_infonce(_np(p2[m]), _np(k1[m]))
            losses[m], accs[m] = l12 + l21, (a12 + a21) / 2
        else:  # Barlow Twins per projector, accuracy = in-batch retrieval z1 -> z2
            losses[m], accs[m] = _ref_barlow_twins(_np(z1[m]), _np(z2[m])), _ref_retrieval(_np(z1[m]), _np(z2[m]))
    views = [z1] if framework == "mocov2" else [z1, z2]
    reg = np.mean([_ref_pcr(_np(z)) for z in views], axis=0)
    if kwargs.get("orthogonality"):  # on the projectors' own output layers (shared hidden layer)
        reg = reg + _ref_weight_orthogonality([_np(out[0].weight) for out in model.projectors.outputs])
    expected = np.mean(1.0 * losses + LAM * reg)  # Eq. 4; before any completed epoch w_m = 1 (PTB on)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(_np(model.mpcl_loss.ptb.correct), accs * 4, atol=1e-5)
    assert model.mpcl_loss.ptb.count.item() == 4


def test_single_projector_is_plain_moco_v2():
    model = _tiny("mocov2", num_projectors=1, projector_hidden_dims=16)
    batch = _batch(4)
    queue = model.queues[0].keys.clone()
    with torch.no_grad():
        z, k = _project(model, batch["views"][:, 0]), model.keys(batch["views"][:, 1])
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
            expected.append(torch.nn.functional.normalize(model.teacher_projectors(h), dim=2))  # [Mp, 4, D]
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


# ---------------------------------------------------------------------- projector layout (paper Table III)
# ResNet-50 + projectors as printed, for 1 / 2 / 4 / 8 projectors (millions of parameters).
PAPER_PARAMS_M = {1: 27.97, 2: 28.23, 4: 28.75, 8: 29.80}


@pytest.mark.parametrize("num_projectors", list(PAPER_PARAMS_M))
def test_shared_hidden_layout_reproduces_the_papers_parameter_counts(num_projectors):
    """Trainable query side (ResNet-50 without classifier + projectors), built on the meta device."""
    with torch.device("meta"):
        shared = MPCLMoCoV2("resnet50", num_projectors=num_projectors, shared_hidden=True)
        separate = MPCLMoCoV2("resnet50", num_projectors=num_projectors, shared_hidden=False)
    millions = shared.num_query_parameters() / 1e6
    assert abs(millions - PAPER_PARAMS_M[num_projectors]) <= 0.01, millions
    # the counting, term by term: trunk + shared Linear(2048, 2048) + Mp x Linear(2048, 128), biases included
    assert shared.num_query_parameters() == 23_508_032 + 2048 * 2048 + 2048 + num_projectors * (2048 * 128 + 128)
    # the teacher, the queues and the predictors-free MoCo v2 heads add nothing to the count
    assert shared.num_query_parameters() == sum(p.numel() for n, p in shared.named_parameters()
                                                if not n.startswith("teacher_"))
    if num_projectors > 1:  # separate MLPs cannot be the paper's layout
        assert abs(separate.num_query_parameters() / 1e6 - PAPER_PARAMS_M[num_projectors]) > 1.0


def test_shared_hidden_projectors_share_the_hidden_layer_and_own_the_output_layer():
    model = _tiny("mocov2", shared_hidden=True, projector_hidden_dims=16)
    assert len(model.projectors.hidden) == 1 and len(model.projectors.outputs) == 3
    h = torch.randn(5, model.backbone.num_features)
    z = model.projectors(h)  # [3, 5, 8]
    hidden = model.projectors.hidden[0](h)
    for m, out in enumerate(model.projectors.outputs):  # g^m = W_m ReLU(W h + b) + b_m
        torch.testing.assert_close(z[m], out(hidden))
    z.sum().backward()
    shared_w = model.projectors.hidden[0][0].weight
    assert shared_w.grad is not None and shared_w.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="shared_hidden: false"):
        _tiny("mocov2", shared_hidden=True, projector_hidden_dims=[16, 24, 32])


# ---------------------------------------------------------------------- PTB (Eq. 3) and the loss scale (Eq. 4)
def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


def test_ptb_weights_follow_previous_epoch_accuracy_and_survive_resume():
    model = _tiny("mocov2")
    ptb = model.mpcl_loss.ptb
    np.testing.assert_allclose(_np(_weights(model)), np.ones(3))  # w_m = 1 before a completed epoch

    # Epoch 0: two steps of 8 queries with unequal accuracies.
    _record(model, [8.0, 4.0, 2.0], 8)
    _record(model, [6.0, 4.0, 0.0], 8)
    np.testing.assert_allclose(_np(_weights(model)), np.ones(3))  # unchanged mid-epoch
    model.on_train_epoch_end()
    acc0 = np.array([14, 8, 2]) / 16
    w1 = 3 * _softmax((1 - acc0) / EPS)  # Mp * softmax: re-weighting at the PTB-off scale
    np.testing.assert_allclose(_np(_weights(model)), w1, rtol=1e-6)
    np.testing.assert_allclose(_np(ptb.weight), w1 / 3, rtol=1e-6)  # the buffer is Eq. 3's softmax
    assert _weights(model)[2] > _weights(model)[1] > _weights(model)[0]  # worst gets most
    np.testing.assert_allclose(_np(ptb.last_acc), acc0, rtol=1e-6)
    assert ptb.count.item() == 0 and ptb.correct.abs().sum().item() == 0

    # Epoch 1: only its own accuracies decide the weights of epoch 2 (half an epoch, then resume).
    _record(model, [1.0, 3.0, 4.0], 4)
    state = model.state_dict()
    resumed = _tiny("mocov2", seed=123)  # different init: everything must come from the state dict
    resumed.load_state_dict(state)
    np.testing.assert_allclose(_np(_weights(resumed)), w1, rtol=1e-6)
    batch = _batch(4)
    torch.testing.assert_close(resumed.training_step(batch, 0), model.training_step(batch, 0))
    uniform = _tiny("mocov2", seed=123)
    uniform.load_state_dict({k: v for k, v in state.items() if k != "mpcl_loss.ptb.weight"}, strict=False)
    assert not torch.allclose(uniform.training_step(batch, 0), model.training_step(batch, 0))

    # The training steps above added their accuracies; close epoch 1 on the resumed model.
    extra_correct = resumed.mpcl_loss.ptb.correct - torch.tensor([1.0, 3.0, 4.0])
    resumed.on_train_epoch_end()
    acc1 = (np.array([1.0, 3.0, 4.0]) + _np(extra_correct)) / 8
    np.testing.assert_allclose(_np(_weights(resumed)), 3 * _softmax((1 - acc1) / EPS), rtol=1e-6)


@pytest.mark.parametrize("num_projectors", [2, 3, 4])
def test_equal_accuracies_with_ptb_give_exactly_the_ptb_off_loss(num_projectors):
    batch = _batch(4)

    def loss_after_an_epoch(**kwargs) -> tuple[torch.Tensor, MPCLMoCoV2]:
        model = _tiny("mocov2", num_projectors=num_projectors, projector_hidden_dims=16, shared_hidden=True,
                      backbone="test_resnet", backbone_kwargs={}, **kwargs)  # the backbone does not matter here
        _record(model, [3.0] * num_projectors, 7)  # every projector 3/7 right
        model.on_train_epoch_end()
        return model.training_step(batch, 0), model

    off, _ = loss_after_an_epoch(ptb=False)
    on, _ = loss_after_an_epoch(ptb=True)
    assert torch.equal(on, off)  # bitwise: w_m = Mp * softmax(equal accuracies) = 1
    # Eq. 3 taken literally (bare softmax, 1/Mp each) divides the contrastive part by Mp (seen with lam = 0)
    literal, model = loss_after_an_epoch(ptb=True, ptb_scale="literal", lam=0.0)
    np.testing.assert_allclose(_np(_weights(model)), np.full(num_projectors, 1 / num_projectors), rtol=1e-6)
    off_no_pcr, _ = loss_after_an_epoch(ptb=False, lam=0.0)
    assert literal.item() == pytest.approx(off_no_pcr.item() / num_projectors, rel=1e-6)


def test_ptb_off_keeps_unit_weights_and_epoch_without_batches_keeps_weights():
    model = _tiny("mocov2", ptb=False)
    _record(model, [4.0, 0.0, 2.0], 4)
    model.on_train_epoch_end()
    np.testing.assert_allclose(_np(_weights(model)), np.ones(3))
    np.testing.assert_allclose(_np(model.mpcl_loss.ptb.last_acc), [1.0, 0.0, 0.5])  # still tracked for the logs
    on = _tiny("mocov2")
    _record(on, [4.0, 0.0, 2.0], 4)
    on.on_train_epoch_end()
    w = _weights(on).clone()
    on.on_train_epoch_end()  # nothing recorded: keep the weights
    torch.testing.assert_close(_weights(on), w)


class _EpochEndSpy(Callback):
    """Records the PTB counters as each epoch ends, before the module's hook consumes them."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # callbacks run before the module's hook
        ptb = pl_module.mpcl_loss.ptb
        self.seen.append({"correct": ptb.correct.clone(), "count": ptb.count.clone(),
                          "processed": lightning_private_batches_done(trainer)})


@pytest.mark.slow
def test_ptb_updates_only_after_a_completed_epoch(demo_root, tmp_path):
    """max_steps cuts epoch 1 short: the weights keep epoch 0's accuracies; the partial counts stay for a run
    that continues that epoch, and a fresh epoch drops them instead of mixing them in."""
    from ssl_zoo.data import ImageFolderDataModule

    torch.manual_seed(0)
    model = MPCLMoCoV2(backbone="test_resnet", img_size=32, num_projectors=2, projector_hidden_dims=16, proj_dim=8,
                 queue_size=16)
    spy = _EpochEndSpy()
    data = ImageFolderDataModule(root=f"{demo_root}/folder", batch_size=8, num_workers=0)
    steps = sum(1 for p in (Path(demo_root) / "folder" / "train").rglob("*") if p.is_file()) // 8  # per epoch
    Trainer(max_steps=steps + 2, max_epochs=-1, logger=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, default_root_dir=str(tmp_path), callbacks=[spy]).fit(model, datamodule=data)
    assert [s["processed"] for s in spy.seen] == [steps, 2]  # epoch 0 complete, epoch 1 cut after 2 batches
    acc0 = _np(spy.seen[0]["correct"] / spy.seen[0]["count"])
    ptb = model.mpcl_loss.ptb
    np.testing.assert_allclose(_np(ptb.last_acc), acc0, rtol=1e-6)
    np.testing.assert_allclose(_np(_weights(model)), 2 * _softmax((1 - acc0) / EPS), rtol=1e-5)
    partial = _np(spy.seen[1]["correct"] / spy.seen[1]["count"])
    assert not np.allclose(partial, acc0)  # the partial epoch's accuracies would have given other weights
    # the cut epoch's counts (2 batches of 8) are kept, not turned into weights ...
    assert ptb.count.item() == 16
    torch.testing.assert_close(ptb.correct, spy.seen[1]["correct"])
    # ... and a new epoch starts from zero rather than mixing them into its own accuracy
    weights = _weights(model).clone()
    model.on_train_epoch_start()
    assert ptb.count.item() == 0 and not ptb.correct.any()
    torch.testing.assert_close(_weights(model), weights)


# ---------------------------------------------------------------------- Table II alternatives
def test_projector_dropout_draws_one_mask_per_projector_on_the_query_side_only():
    model = _tiny("mocov2", shared_hidden=True, projector_hidden_dims=64, projector_dropout=0.5)
    with torch.no_grad():  # identical output layers: only the dropout masks can make the projectors differ
        for out in model.projectors.outputs[1:]:
            out.load_state_dict(model.projectors.outputs[0].state_dict())
        model.teacher_projectors.load_state_dict(model.projectors.state_dict())
    h = torch.randn(6, model.backbone.num_features)
    z = model.projectors(h)  # training mode
    assert not torch.allclose(z[0], z[1]) and not torch.allclose(z[1], z[2])
    model.projectors.eval()
    z_eval = model.projectors(h)
    torch.testing.assert_close(z_eval[0], z_eval[1])
    model.projectors.train()
    keys = model.teacher_projectors(h)  # momentum copy: no dropout, even in training mode
    assert model.teacher_projectors.training
    torch.testing.assert_close(keys, z_eval)


def test_mixed_initialisation_is_kaiming_and_xavier_alternating():
    """Table II 'Mix Init.': "Kaiming [29] and Xavier [30]" in the forms their papers propose, projector by projector."""
    from ssl_zoo.models.multi_projector import MIXED_INITS, MultiProjector

    assert MIXED_INITS == ("kaiming_normal", "xavier_uniform")
    fan_in, fan_out = 512, 256
    torch.manual_seed(0)
    heads = MultiProjector(64, [fan_in] * 4, depth=1, output_dim=fan_out, init="mixed")
    for m, out in enumerate(heads.outputs):
        w = out[0].weight.detach().double()  # [fan_out, fan_in]
        assert torch.equal(out[0].bias, torch.zeros(fan_out))
        if m % 2 == 0:  # He et al. 2015: N(0, 2 / fan_in); a Gaussian puts 0.27 % of entries beyond 3 std
            std = math.sqrt(2 / fan_in)
            assert w.mean().abs() < 0.01 * std and w.std().item() == pytest.approx(std, rel=0.01)
            assert (w.abs() > 3 * std).double().mean().item() == pytest.approx(0.0027, abs=0.001)
        else:  # Glorot & Bengio 2010: U(+-sqrt(6 / (fan_in + fan_out))), std = bound / sqrt(3)
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert w.abs().max() <= bound and w.abs().max() > 0.999 * bound
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)
    shared = heads.hidden[0][0].weight  # the shared hidden layer keeps PyTorch's U(+-1/sqrt(fan_in))
    assert shared.abs().max() <= 1 / math.sqrt(64)
    # separate MLPs: every layer of projector m takes its scheme
    separate = MultiProjector(64, [fan_in] * 2, depth=1, output_dim=fan_out, shared_hidden=False, init="mixed")
    assert separate.hidden[0][0].weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.02)
    xavier_bound = math.sqrt(6 / (64 + fan_in))
    assert 0.999 * xavier_bound < separate.hidden[1][0].weight.abs().max() <= xavier_bound
    default = MultiProjector(64, [fan_in] * 4, depth=1, output_dim=fan_out)
    assert all(out[0].weight.abs().max() <= 1 / math.sqrt(fan_in) for out in default.outputs)


def test_weight_orthogonality_is_zero_for_orthogonal_projectors_and_equals_brute_force():
    """Table II 'Orth.': the projectors' weights constrained to be mutually orthogonal."""
    from ssl_zoo.losses.mpcl import projector_weight_orthogonality

    g = torch.Generator().manual_seed(5)
    # rows of one orthogonal matrix, split between 3 projectors (4 + 3 + 5 rows of width 12): exactly 0
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    rows = q.T * (torch.rand(12, 1, generator=g, dtype=torch.float64) + 0.5)  # row norms do not matter
    orthogonal = [rows[:4], rows[4:7], rows[7:]]
    torch.testing.assert_close(projector_weight_orthogonality(orthogonal), torch.zeros(3), atol=1e-6, rtol=0)
    # within one projector the rows need not be orthogonal: only pairs across projectors count
    skewed = [orthogonal[0] + orthogonal[0][:1], orthogonal[1], orthogonal[2]]
    torch.testing.assert_close(projector_weight_orthogonality(skewed), torch.zeros(3), atol=1e-6, rtol=0)
    # random weights: positive, and equal to the loop over every pair of rows
    weights = [torch.randn(d, 12, generator=g) for d in (4, 3, 5)]
    got = projector_weight_orthogonality(weights)
    assert (got > 0.01).all()
    np.testing.assert_allclose(_np(got), _ref_weight_orthogonality([_np(w) for w in weights]), rtol=1e-5)
    # two projectors reading one direction (whatever the sign and scale): 1, the largest value
    parallel = [weights[0][:1].repeat(2, 1), -3 * weights[0][:1]]
    torch.testing.assert_close(projector_weight_orthogonality(parallel), torch.ones(2))
    with pytest.raises(ValueError, match="one input width"):
        projector_weight_orthogonality([torch.randn(2, 3), torch.randn(2, 4)])
    with pytest.raises(ValueError, match="Mp >= 2"):
        projector_weight_orthogonality([torch.randn(2, 3)])


def test_orthogonality_reads_each_projectors_own_layer_and_trains_it():
    """Shared hidden layer: the output layers; separate MLPs: each first hidden layer (both read the common input)."""
    shared = _tiny("mocov2", shared_hidden=True, projector_hidden_dims=16, orthogonality=True, pcr=False)
    weights = shared.projectors.distinct_weights()
    assert all(w is out[0].weight for w, out in zip(weights, shared.projectors.outputs, strict=True))
    separate = _tiny("mocov2", orthogonality=True, pcr=False)  # widths 16, 24, 32 reading the backbone feature
    weights = separate.projectors.distinct_weights()
    d = separate.backbone.num_features
    assert [tuple(w.shape) for w in weights] == [(16, d), (24, d), (32, d)]
    assert all(w is stack[0].weight for w, stack in zip(weights, separate.projectors.hidden, strict=True))
    terms = shared.mpcl_loss.regularizers([torch.randn(3, 4, 8)], shared.projectors.distinct_weights())
    assert set(terms) == {"orthogonality"}
    terms["orthogonality"].sum().backward()
    assert all(out[0].weight.grad.abs().sum() > 0 for out in shared.projectors.outputs)
    assert shared.projectors.hidden[0][0].weight.grad is None  # the shared layer is not constrained


def test_barlow_twins_optimiser_is_the_projects_lars_with_main_py_groups():
    """Barlow Twins' main.py: LARS, lr 0.2 x B / 256 for the weights, 0.0048 x B / 256 for biases and BN."""
    from types import SimpleNamespace

    from ssl_zoo.utils.optim import LARS

    model = _tiny("barlowtwins", shared_hidden=True, projector_hidden_dims=16, head_norm="batch", lr_batch_size=1024)
    model._trainer = SimpleNamespace(estimated_stepping_batches=1000, max_epochs=100)  # 10 steps per epoch
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert type(optimizer) is LARS
    weights, others = optimizer.param_groups
    # main.py's split by ndim (biases and BN parameters apart; the tiny ViT's tokens, ndim 3, are weights)
    assert all(p.ndim > 1 for p in weights["params"])
    assert {id(p) for p in model.parameters() if p.ndim <= 1} <= {id(p) for p in others["params"]}
    assert len(weights["params"]) + len(others["params"]) == sum(1 for p in model.parameters() if p.requires_grad)
    assert (weights["weight_decay"], others["weight_decay"]) == (1e-6, 0.0)
    assert scheduler.base_lrs == pytest.approx([0.2 * 1024 / 256, 0.0048 * 1024 / 256])
    # 10 warmup epochs = 100 steps, then cosine to 1/1000 of the peak
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.8 / 100, 0.0192 / 100])
    # The split holds whatever the weight decay; timm's param_groups_weight_decay (the AdamW recipes' groups) puts
    # every parameter into one group at weight decay 0, where it could not carry the biases' own lr.
    from timm.optim import param_groups_weight_decay

    assert len(param_groups_weight_decay(model, 0.0)) == 1
    model.hparams.weight_decay = 0.0
    weights, others = model.configure_optimizers()["optimizer"].param_groups
    assert (weights["initial_lr"], others["initial_lr"]) == pytest.approx((0.2 * 1024 / 256, 0.0048 * 1024 / 256))


def test_table_i_alignment_is_wang_and_isola_with_alpha_2():
    from benchmarks.mpcl_ablation import alignment, uniformity

    g = torch.Generator().manual_seed(0)
    za = torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=1)
    zb = torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=1)
    brute = np.mean([np.sum((_np(za[i]) - _np(zb[i])) ** 2) for i in range(6)])  # E ||f(x) - f(x+)||^2
    assert alignment(za, zb).item() == pytest.approx(brute, rel=1e-6)
    assert alignment(za, -za).item() == pytest.approx(4.0)  # antipodal positives: 4, not half of it
    pairs = [np.exp(-2 * np.sum((_np(za[i]) - _np(za[j])) ** 2)) for i in range(6) for j in range(6) if i != j]
    assert uniformity(za).item() == pytest.approx(np.log(np.mean(pairs)), rel=1e-5)


# ---------------------------------------------------------------------- MoCo v3's ViT (vits.py)
def _ref_sincos(h: int, w: int, dim: int) -> np.ndarray:
    """MoCo v3's table, element by element: token n = i * h + j of meshgrid(grid_w, grid_h) has coords (i, j)."""
    quarter = dim // 4
    out = np.zeros((h * w, dim))
    for n in range(h * w):
        a, b = n // h, n % h
        for k in range(quarter):
            omega = 1.0 / 10000 ** (k / quarter)
            out[n, k], out[n, quarter + k] = math.sin(a * omega), math.cos(a * omega)
            out[n, 2 * quarter + k], out[n, 3 * quarter + k] = math.sin(b * omega), math.cos(b * omega)
    return out


def test_mocov3_vit_is_built_as_moco_v3_builds_it():
    model = _tiny("mocov3", backbone_kwargs={"img_size": 48, "model_kwargs": {"depth": 2}}, img_size=48)
    vit = model.backbone.model
    d = vit.embed_dim
    pos = vit.pos_embed.detach()[0]  # [1 + 9, D]: class token, then the 3 x 3 grid
    assert torch.equal(pos[0], torch.zeros(d))
    np.testing.assert_allclose(_np(pos[1:]), _ref_sincos(3, 3, d), atol=1e-6)
    assert not vit.pos_embed.requires_grad
    for name, module in vit.named_modules():
        if isinstance(module, torch.nn.Linear):
            fan_out, fan_in = module.weight.shape
            fan_out = fan_out // 3 if "qkv" in name else fan_out  # q, k, v initialised as three matrices
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert 0.9 * bound < module.weight.abs().max() <= bound, name
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
    proj = vit.patch_embed.proj
    bound = math.sqrt(6 / (3 * 16 * 16 + d))
    assert 0.9 * bound < proj.weight.abs().max() <= bound and not proj.bias.any()
    assert not proj.weight.requires_grad and not proj.bias.requires_grad  # frozen random patch projection
    assert vit.cls_token.abs().max() < 1e-4
    # the teacher starts identical; neither the fixed table nor the frozen projection is optimised
    assert torch.equal(model.teacher_backbone.model.pos_embed, vit.pos_embed)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert id(vit.pos_embed) not in trainable and id(proj.weight) not in trainable
    model.training_step({"views": torch.randn(4, 2, 3, 48, 48), "index": torch.arange(4)}, 0).backward()
    assert vit.pos_embed.grad is None and proj.weight.grad is None
    assert vit.blocks[0].attn.qkv.weight.grad is not None
    # MoCo v2 and Barlow Twins leave a ViT as timm builds it
    v2 = _tiny("mocov2")
    assert v2.backbone.model.pos_embed.requires_grad and v2.backbone.model.patch_embed.proj.weight.requires_grad


# ---------------------------------------------------------------------- momentum encoder
@pytest.mark.parametrize("framework", ["mocov2", "mocov3"])
def test_teacher_gets_no_gradient_and_follows_ema(framework):
    model = _tiny(framework)
    loss = model.training_step(_batch(4), 0)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in [*model.teacher_backbone.named_parameters(), *model.teacher_projectors.named_parameters()]:
        assert not p.requires_grad and p.grad is None, name
    student = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student)
    if framework == "mocov3":  # MoCo v3's frozen random patch projection
        assert all(not p.requires_grad for p in model.backbone.model.patch_embed.parameters())

    teacher_before = [p.clone() for p in model.teacher_projectors.parameters()]
    torch.optim.SGD(student, lr=0.5).step()
    model._total_steps = 10
    model.on_train_batch_end(None, None, 0)  # global_step 0 without a trainer
    m = 0.999 if framework == "mocov2" else 0.99
    for t_old, t_new, s in zip(teacher_before, model.teacher_projectors.parameters(),
                               model.projectors.parameters(), strict=True):
        torch.testing.assert_close(t_new, m * t_old + (1 - m) * s)
    assert not torch.equal(teacher_before[0], next(model.teacher_projectors.parameters()))


def test_barlow_twins_has_no_momentum_encoder_and_trains_every_projector():
    model = _tiny("barlowtwins", shared_hidden=True, projector_hidden_dims=16)
    assert not any(hasattr(model, name) for name in ("teacher_backbone", "queues", "predictors"))
    assert all(out[0].bias is None for out in model.projectors.outputs)  # Barlow Twins' bias-free last layer
    loss = model.training_step(_batch(4), 0)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    hp = model.hparams
    assert (hp.base_lr, hp.weight_decay, hp.warmup_epochs) == (0.2, 1e-6, 10)  # main.py
    assert hp.bias_lr_scale == pytest.approx(0.0048 / 0.2) and hp.final_lr_ratio == 0.001


def test_mocov3_momentum_is_cosine_from_099_to_1():
    model = _tiny("mocov3")
    assert model.ema_momentum_at(0, 100) == pytest.approx(0.99)
    assert model.ema_momentum_at(50, 100) == pytest.approx(0.995)
    assert model.ema_momentum_at(100, 100) == pytest.approx(1.0)
    assert model.ema_momentum_at(25, 100) == pytest.approx(1 - 0.01 * (1 + math.cos(math.pi / 4)) / 2)
    total = 100
    values = [model.ema_momentum_at(k, total) for k in range(total + 1)]
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))
    for k in (10, 33, 77, total - 1):  # MoCo v3: m = 1 - (1 - m0) * (1 + cos(pi k / K)) / 2
        assert values[k] == pytest.approx(1 - 0.01 * (1 + math.cos(math.pi * k / total)) / 2, abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # lightly warns past max_steps: a longer run holds 1 silently
        assert model.ema_momentum_at(total + 50, total) == 1.0
    assert model.ema_momentum_at(0, 0) == 0.99  # no trainer: one step
    # lightly's schedule on its own reaches the end one step early (step / (max_steps - 1)): hence K + 1 steps.
    assert cosine_schedule(total - 1, total, 0.99, 1.0) == 1.0 != values[total - 1]



def test_paper_defaults_and_argument_errors():
    v2 = _tiny("mocov2", head_norm="none")
    v3 = _tiny("mocov3", head_norm="batch")
    assert (v2.hparams.base_lr, v2.hparams.weight_decay, v2.hparams.ema_momentum) == (0.03, 1e-4, 0.999)
    assert (v3.hparams.optimizer, v3.hparams.base_lr, v3.hparams.weight_decay) == ("adamw", 1.5e-4, 0.1)
    assert v2.hparams.shuffle_bn and v3.hparams.warmup_epochs == 40 and v3.hparams.moco_vit_init
    assert not hasattr(v2, "predictors") and len(v3.predictors) == 3 and not hasattr(v3, "queues")
    defaults = {name: {key: p.default for key, p in inspect.signature(cls).parameters.items()}
                for name, cls in CLASSES.items()}
    assert {name: (d["projector_hidden_dims"], d["proj_dim"], d["head_norm"], d["min_scale"])
            for name, d in defaults.items()} == {"mocov2": (2048, 128, "none", 0.2), "mocov3": (4096, 256, "batch", 0.08),
                                                 "barlowtwins": (8192, 8192, "batch", 0.08)}
    assert {d["backbone"] for d in defaults.values()} == {"resnet50", "vit_base_patch16_224"}
    # "different hidden dims": projector m really has width projector_hidden_dims[m]
    assert [stack[0].out_features for stack in v2.projectors.hidden] == [16, 24, 32]
    assert [stack[0].out_features for stack in v3.projectors.hidden] == [16, 24, 32]
    # 3-layer: two hidden linears, then the output linear
    assert [type(layer).__name__ for layer in v3.projectors.hidden[0]].count("Linear") == 2
    assert all(d["shared_hidden"] is True for d in defaults.values())  # the paper's layout
    with pytest.raises(ValueError, match="projector_hidden_dims"):
        _tiny(projector_hidden_dims=[16, 16])
    with pytest.raises(ValueError, match="num_projectors"):
        _tiny(num_projectors=0)
    with pytest.raises(ValueError, match="ema_momentum"):
        _tiny(ema_momentum=1.5)
    with pytest.raises(ValueError, match="epsilon"):
        _tiny(epsilon=0.0)
    with pytest.raises(ValueError, match="model.temperature must be > 0"):
        _tiny("mocov3", temperature=0.0)
    with pytest.raises(ValueError, match="scale must be 'projectors' or 'literal'"):
        _tiny(ptb_scale="sum")


def test_shuffled_bn_leaves_one_process_alone():
    """MoCo's shuffled BN acts across processes only: on one, the key encoder sees the batch as it is and no
    permutation is drawn (the 2-process shuffle is checked in tests/jobs/test_ddp_every_method.py)."""
    model = _tiny("mocov2")
    assert model.hparams.shuffle_bn
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model.teacher_projectors(model.teacher_backbone(x))  # [Mp, 4, D]
    rng = torch.get_rng_state()
    torch.testing.assert_close(model.keys(x), expected)
    assert torch.equal(torch.get_rng_state(), rng)


# ---------------------------------------------------------------------- configs
# One fast_dev_run per config family (MPCL, MoCo v2, MoCo v3); every other config is parsed.
DEMO_CONFIGS = ["mpcl/demo.yaml", "mocov2/demo.yaml", "mocov3/demo.yaml"]
OTHER_DEMO_CONFIGS = ["mpcl/demo_mocov3.yaml"]
# paper config -> (global batch, epochs, peak lr) as the paper ran it
PAPER_CONFIGS = {
    "mpcl/r50_in100_mocov2.yaml": (128, 200, 0.03 * 128 / 256),
    "mocov2/r50_in100.yaml": (128, 200, 0.03 * 128 / 256),
    "mpcl/r50_in1k_mocov2.yaml": (256, 200, 0.03),
    "mocov2/r50_in1k.yaml": (256, 200, 0.03),
    "mpcl/vitb_in100_mocov3.yaml": (4096, 300, 1.5e-4 * 4096 / 256),
    "mocov3/vitb_in100.yaml": (4096, 300, 1.5e-4 * 4096 / 256),
    "mpcl/r50_in100_mpcl_barlowtwins.yaml": (1024, 300, 0.2 * 1024 / 256),
}
ABLATIONS = sorted(p.name for p in (EXPERIMENTS / "mpcl" / "ablations").glob("*.yaml"))


def test_every_config_is_listed():
    found = {str(p.relative_to(EXPERIMENTS)) for d in ("mpcl", "mocov2", "mocov3")
             for p in (EXPERIMENTS / d).glob("*.yaml")
             if p.name != "tables.yaml" and not p.name.startswith("cpu")}  # CPU recipes: tests/benchmarks/test_quality.py
    assert found == set(DEMO_CONFIGS + OTHER_DEMO_CONFIGS + list(PAPER_CONFIGS))
    assert len(ABLATIONS) >= 14


@pytest.mark.parametrize("config", DEMO_CONFIGS)
def test_demo_config_fast_dev_run(config, demo_root, tmp_path, monkeypatch):

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
    assert model.mpcl_loss.ptb.count.item() == 0
    np.testing.assert_allclose(_np(model.mpcl_loss.ptb.last_acc), acc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(_weights(model)), mp * _softmax((1 - acc) / EPS), rtol=1e-5)


@pytest.mark.parametrize("config", OTHER_DEMO_CONFIGS)
def test_other_demo_configs_parse(config):
    cfg = _parse(EXPERIMENTS / config)
    assert _build_on_meta(cfg).hparams.num_projectors == 4
    assert cfg["data"]["init_args"]["root"] == "data/demo/folder"


def _parse(*configs: Path) -> dict:
    """Parse with the CLI exactly as `fit` would (no run), returning the resolved config (a fresh copy)."""
    return copy.deepcopy(_parse_cached(tuple(str(c) for c in configs)))


@functools.cache
def _parse_cached(configs: tuple[str, ...]) -> dict:

    args = ["fit"] + [a for c in configs for a in ("--config", c)] + ["--print_config"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(buf.getvalue())


def _build_on_meta(cfg: dict) -> MPCLModel:
    """Instantiate the configured model without allocating memory (checks the constructor's validation)."""
    cls = {f"ssl_zoo.methods.{c.__name__}": c for c in CLASSES.values()}[cfg["model"]["class_path"]]
    with torch.device("meta"):
        return cls(**cfg["model"]["init_args"])


@pytest.mark.slow
@pytest.mark.parametrize("config", list(PAPER_CONFIGS))
def test_paper_configs_parse(config):
    cfg = _parse(EXPERIMENTS / config)
    model = _build_on_meta(cfg)
    trainer = cfg["trainer"]
    assert trainer["strategy"] == "ddp" and trainer["precision"] == "bf16-mixed"
    global_batch = cfg["data"]["init_args"]["batch_size"] * trainer["devices"] * trainer["num_nodes"]
    batch, epochs, lr = PAPER_CONFIGS[config]
    assert (global_batch, trainer["max_epochs"]) == (batch, epochs)
    assert model.hparams.base_lr * global_batch / 256 == pytest.approx(lr)
    if isinstance(model, MPCLMoCoV2):
        assert model.hparams.shuffle_bn and len(model.queues[0].keys) == 65536
    else:
        assert trainer["sync_batchnorm"]
    if isinstance(model, MPCLMoCoV3):
        assert model.hparams.warmup_epochs == 40 and model.hparams.moco_vit_init
    assert model.hparams.num_projectors == (1 if config.startswith("moco") else 4)
    assert model.hparams.shared_hidden


def _overlay_base(overlay: Path) -> Path:
    """The paper config an overlay names in its usage line (``--config experiments/mpcl/<base>.yaml``)."""
    line = next(line for line in overlay.read_text().splitlines() if "python -m ssl_zoo fit --config" in line)
    return ROOT / line.split("--config ")[1].split()[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", ABLATIONS)
def test_ablation_overlays_parse_on_their_base(name):
    overlay = EXPERIMENTS / "mpcl" / "ablations" / name
    base = _overlay_base(overlay)
    cfg = _parse(base, overlay)
    model = _build_on_meta(cfg)
    ablation = yaml.safe_load(overlay.read_text())
    for key, value in ablation.get("model", {}).get("init_args", {}).items():  # batch_2048.yaml: trainer keys only
        assert model.hparams[key] == value, (name, key)
    assert cfg["name"] == ablation["name"]
    assert cfg["model"]["init_args"]["backbone"] == _parse(base)["model"]["init_args"]["backbone"]
    if name.startswith("hidden_"):  # Tables I / VII 'Different': separate MLPs, no PCR, no PTB
        assert not model.hparams.shared_hidden and not model.hparams.pcr and not model.hparams.ptb
        assert name.endswith({MPCLMoCoV2: "mocov2.yaml", MPCLMoCoV3: "mocov3.yaml"}[type(model)])
        assert len(set(model.hparams.projector_hidden_dims)) == 4
    if name.startswith("projectors_"):  # Table III: Top-1 column without PTB, '+PTB' column with
        assert model.hparams.shared_hidden and model.hparams.ptb == name.endswith("_ptb.yaml")


@pytest.mark.parametrize("framework, min_scale, expected", [
    ("mocov2", None, 0.2), ("mocov3", None, 0.08), ("barlowtwins", None, 0.08), ("mocov2", 0.5, 0.5),
    ("mocov3", 0.35, 0.35)])
def test_min_scale_sets_both_views_crop(framework, min_scale, expected):
    """``min_scale`` (by default the framework's reference) is the lower area bound of both views' crops."""
    views = _tiny(framework, **({} if min_scale is None else {"min_scale": min_scale})).train_transform()
    scales = [view.transforms[0].scale for view in views.transforms]
    assert scales == [(expected, 1.0), (expected, 1.0)]
    with pytest.raises(ValueError, match="model.min_scale must lie in"):
        _tiny(framework, min_scale=0.0)


@pytest.mark.parametrize("framework", ["mocov2", "mocov3"])
def test_blur_option_reaches_every_view(framework):
    """``blur`` picks the views' Gaussian blur: the reference code's PIL filter by default, SimCLR's ~10 % kernel
    (3 taps at 32 px) with ``kernel``; both views change, nothing else in them does."""
    import torchvision.transforms as T

    from ssl_zoo.augment import PILGaussianBlur, SeparableGaussianBlur

    def blurs(model):
        return [step.transforms[0] for view in model.train_transform().transforms for step in view.transforms
                if isinstance(step, T.RandomApply) and isinstance(step.transforms[0], T.GaussianBlur)]

    reference, kernel = blurs(_tiny(framework)), blurs(_tiny(framework, blur="kernel"))
    assert len(reference) == len(kernel) == 2
    assert all(type(b) is PILGaussianBlur for b in reference)
    assert all(type(b) is SeparableGaussianBlur and tuple(b.kernel_size) == (3, 3) for b in kernel)
    assert [b.sigma for b in kernel] == [b.sigma for b in reference] == [(0.1, 2.0)] * 2


@pytest.mark.parametrize("framework, head_norm, minimum", [
    ("MPCLMoCoV2", None, 1), ("MPCLMoCoV3", None, 2), ("MPCLMoCoV3", "layer", 1), ("MPCLBarlowTwins", "layer", 2)])
def test_mpcl_min_batch_size_follows_its_head_norm(framework, head_norm, minimum):
    import ssl_zoo.methods

    options = {} if head_norm is None else {"head_norm": head_norm}  # None: the framework's default
    model = getattr(ssl_zoo.methods, framework)("resnet18", img_size=32, num_projectors=2, projector_hidden_dims=8,
                                                proj_dim=8, **options)
    assert model.min_batch_size()[0] == minimum
