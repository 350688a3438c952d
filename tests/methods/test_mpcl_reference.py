"""The MPCL classes split by framework resolve and train as the flavour-switched class they replace.

``tests/fixtures/mpcl_reference.py`` recorded, with the former ``ssl_zoo.methods.MPCL`` (``flavour`` mocov2 / mocov3 /
barlowtwins): the settings every MPCL config chain resolved to (every pre-training row of
``experiments/mpcl/tables.yaml``, every config of ``experiments/{mpcl,mocov2,mocov3}``, the ablations on their base,
the shards overlay, the sweeps) and two training steps of tiny models of each flavour. Here the same chains are
resolved and the same steps run with :class:`MPCLMoCoV2`, :class:`MPCLMoCoV3` and :class:`MPCLBarlowTwins`, value by
value, through the fixture's explicit key map (class per flavour, renamed arguments, arguments a class now fixes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ssl_zoo.methods import MPCLBarlowTwins, MPCLMoCoV2, MPCLMoCoV3
from ssl_zoo.tables import load_manifest, resolve_chain, setting_value
from tests.fixtures.mpcl_reference import (
    CASES,
    COMMON,
    COUNT,
    batch,
    checksum,
    overlay_base,
)

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = json.loads((ROOT / "tests/fixtures/mpcl_resolved_settings.json").read_text())
STEPS = json.loads((ROOT / "tests/fixtures/mpcl_one_step_reference.json").read_text())
KEY_MAP = SETTINGS["key_map"]
CLASSES = {"mocov2": MPCLMoCoV2, "mocov3": MPCLMoCoV3, "barlowtwins": MPCLBarlowTwins}
UNUSED = "unused"


def _new_arguments(flavour: str, old: dict) -> dict:
    """The split class's arguments for the old flavour's ``old`` arguments: renamed ones renamed, the ones the class
    fixes checked against the value it fixes (the old flavour's effective value) and left out."""
    new = {}
    for key, value in old.items():
        fixed = KEY_MAP["fixed"][flavour]
        if key in fixed:
            assert fixed[key] == UNUSED or value in (None, fixed[key]), (key, value, fixed[key])
            continue
        new[KEY_MAP["renamed"].get(key, key)] = value
    return new


# ---------------------------------------------------------------------------------------------- settings
def test_the_recorded_chains_are_every_mpcl_chain_there_is():
    """Every pre-training row of the manifest and every config of the three folders was recorded (a new config
    without a reference would escape the comparison)."""
    manifest = load_manifest(ROOT / "experiments/mpcl/tables.yaml")
    rows = {f"{table.id}: {row.name}": " + ".join(row.pretrain) + ("" if not row.pretrain_args else " " +
                                                                   " ".join(row.pretrain_args))
            for table, row in manifest.rows() if row.pretrain}
    recorded = {row: key for key, chain in SETTINGS["chains"].items() for row in chain["rows"]}
    assert {r: k for r, k in recorded.items() if not r.startswith("sweep ")} == rows
    configs = {str(p.relative_to(ROOT)) for folder in ("mpcl", "mocov2", "mocov3")
               for p in (ROOT / "experiments" / folder).glob("*.yaml") if p.name != "tables.yaml"}
    assert configs <= set(SETTINGS["chains"])
    for overlay in (ROOT / "experiments/mpcl/ablations").glob("*.yaml"):
        assert f"{overlay_base(overlay)} + {overlay.relative_to(ROOT)}" in SETTINGS["chains"]


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(SETTINGS["chains"]))
def test_every_mpcl_chain_resolves_to_the_recorded_settings(key):
    old = SETTINGS["chains"][key]
    config = resolve_chain(old["configs"], old["args"], ROOT)
    model = config.pop("model")
    assert json.loads(json.dumps(config)) == old["config"]  # name, seed, trainer, data: untouched
    flavour = old["model_hparams"]["flavour"]
    assert model["class_path"] == KEY_MAP["class_path"][flavour]
    with torch.device("meta"):  # the constructor's checks, no memory
        built = CLASSES[flavour](**model["init_args"])
    new = json.loads(json.dumps(dict(built.hparams)))
    expected = _new_arguments(flavour, old["model_hparams"])
    expected[KEY_MAP["views_min_scale"]] = old["views_min_scale"]  # None meant the flavour's views' default
    assert new == expected
    scales = {view.transforms[0].scale for view in built.train_transform().transforms}
    assert scales == {(old["views_min_scale"], 1.0)}
    resolved = {**config, "model": model}
    assert setting_value(resolved, "global_batch") == old["global_batch"]
    batch_size = new["lr_batch_size"] or old["global_batch"]
    assert new["base_lr"] * batch_size / 256 == pytest.approx(old["peak_lr"], rel=1e-12)


# ---------------------------------------------------------------------------------------------- one step
def _close(got: list[float], expected: list[float], numel: int, rtol: float, what: str, floor: float = 0.0) -> None:
    """Checksums [sum, sum of squares, weighted sum] equal within ``rtol`` of the tensor's magnitude (an error of
    ``rtol`` per element moves a sum by at most ``rtol * sqrt(numel * sum of squares)``). ``floor`` is the
    smallest per-element magnitude the comparison resolves: a gradient whose entries are float32 round-off of the
    model's gradient scale (e.g. a bias the loss barely reaches) is compared at that scale, not at its own."""
    sumsq = max(expected[1], floor * floor * numel, 0.0)
    scale = math.sqrt(numel * sumsq) + 1e-30
    assert abs(got[1] - expected[1]) <= 2 * rtol * sumsq + 1e-30, (what, got[1], expected[1])
    for g, e in (got[0], expected[0]), (got[2], expected[2]):
        assert abs(g - e) <= rtol * scale, (what, g, e)


def _rms(checksums: dict[str, list[float]], numels: dict[str, int]) -> float:
    """Root mean square of every element of several tensors, from their checksums."""
    return math.sqrt(sum(c[1] for c in checksums.values()) / max(sum(numels.values()), 1))


# The fixtures are float32 computations in one summation order. Before any update (step 0) another order (other
# threads, other kernels) moves a loss by a few float32 epsilons; the first update (lr 0.1) carries those
# differences into the weights, so step 1 is compared at a looser, still-small tolerance: a refactor that changes
# what is computed (a swapped view, a missing term, another enqueue order) moves these numbers by far more.
STEP_RTOL = (1e-5, 1e-3)
# The state after both updates (queues, key encoder, BatchNorm statistics of tiny batches) carries two rounds of it.
STATE_RTOL = 1e-2


def _build(name: str):
    case = dict(CASES[name])
    flavour = case.pop("flavour")
    torch.manual_seed(0)
    return CLASSES[flavour](**COMMON, **_new_arguments(flavour, case)), flavour


def _new_key(old_key: str) -> str:
    return KEY_MAP["state_dict"].get(old_key, old_key)


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_training_steps_match_the_flavour_class(name):
    """Same weights at construction, same loss, logs and gradients over two steps (queues, key encoder and PTB
    moving in between), same state after them, same views, optimiser and lr schedule."""
    reference = STEPS["cases"][name]
    model, flavour = _build(name)
    state = model.state_dict()
    assert {_new_key(k) for k in reference["init"]} == set(state)
    for key, expected in reference["init"].items():  # the same draws in the same order: bitwise up to the sums
        _close(checksum(state[_new_key(key)]), expected, state[_new_key(key)].numel(), 1e-12, key)

    ptb = model.mpcl_loss.ptb  # PTB weights from a finished epoch, so that Eq. 4's weights are not all 1
    ptb.update(torch.tensor(STEPS["accuracy"][: ptb.weight.shape[0]]) / COUNT, COUNT)
    ptb.close_epoch()
    torch.testing.assert_close(ptb.loss_weights(), torch.tensor(reference["loss_weights"]), rtol=1e-6, atol=0)

    logged: dict[str, float] = {}
    model.log = lambda name, value, *args, **kwargs: logged.__setitem__(name, float(value.detach() if torch.is_tensor(value) else value))
    params = dict(model.named_parameters())
    for step, seed in enumerate((1, 2)):
        expected = reference["steps"][step]
        logged.clear()
        loss = model.training_step(batch(seed), 0)
        loss.backward()
        rtol = STEP_RTOL[step]
        assert loss.item() == pytest.approx(expected["loss"], rel=rtol), step
        assert logged.keys() == expected["logged"].keys()
        for key, value in expected["logged"].items():
            assert logged[key] == pytest.approx(value, rel=rtol, abs=rtol), (step, key)  # losses, cosines, accuracies: O(1)
        grads = {n: p.grad for n, p in params.items() if p.grad is not None}
        assert grads.keys() == expected["grads"].keys()
        floor = 1e-3 * _rms(expected["grads"], {n: g.numel() for n, g in grads.items()})
        for n, g in grads.items():
            _close(checksum(g), expected["grads"][n], g.numel(), 10 * rtol, f"step {step}: {n}", floor)
        with torch.no_grad():
            for p in grads:
                params[p].sub_(0.1 * params[p].grad)
                params[p].grad = None
        logged.clear()
        model._total_steps = 10
        model.on_train_batch_end(None, None, 0)
        assert logged == pytest.approx(expected["logged_after_step"])

    state = model.state_dict()
    numels = {key: state[_new_key(key)].numel() for key in reference["state"]}
    floor = 1e-3 * _rms(reference["state"], numels)
    for key, expected in reference["state"].items():  # queues, key encoder, BN statistics, PTB counts
        _close(checksum(state[_new_key(key)]), expected, numels[key], STATE_RTOL, key, floor)
    assert ptb.correct.tolist() == pytest.approx(reference["ptb"]["correct"], abs=1e-5)
    assert ptb.count.item() == reference["ptb"]["count"]
    assert list(model.min_batch_size()) == reference["min_batch_size"]
    assert repr(model.train_transform()) == reference["train_transform"]
    assert model.num_query_parameters() == reference["num_query_parameters"]
    _check_optimiser(model, flavour, reference["optimizer"])


def _check_optimiser(model, flavour: str, expected: dict) -> None:
    model._trainer = SimpleNamespace(estimated_stepping_batches=1000, max_epochs=100, world_size=1,
                                     accumulate_grad_batches=1, datamodule=SimpleNamespace(batch_size=512))
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert type(optimizer).__name__ == expected["class"] and config["lr_scheduler"]["interval"] == expected["interval"]
    groups = [{"numel": sum(p.numel() for p in g["params"]), "tensors": len(g["params"]),
               **{k: v for k, v in g.items() if k != "params" and isinstance(v, int | float | bool | str)}}
              for g in optimizer.param_groups]
    lrs = expected["lrs"]
    old_groups = expected["groups"]
    if flavour == "mocov3" and expected["class"] == "LARS":
        # The flavour class split MoCo v3's LARS parameters in two groups at the same lr, the second (biases and
        # norms) at weight decay 0; MoCo v3's main_moco.py passes one group, and LARS takes neither the weight decay
        # nor the trust ratio of ndim-1 parameters whatever their group says: the same updates.
        assert [g["lr"] for g in old_groups] == [old_groups[0]["lr"]] * 2 and old_groups[1]["weight_decay"] == 0.0
        merged = dict(old_groups[0], numel=sum(g["numel"] for g in old_groups),
                      tensors=sum(g["tensors"] for g in old_groups))
        old_groups = [merged]
        lrs = [[step, values[:1]] for step, values in lrs]
    assert len(groups) == len(old_groups)
    for group, old_group in zip(groups, old_groups, strict=True):
        assert group.keys() == old_group.keys()
        for key, value in old_group.items():
            assert group[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value), key
    for step in range(1000):
        recorded = [values for s, values in lrs if s == step]
        if recorded:
            assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(recorded[0], rel=1e-12), step
        optimizer.step()
        scheduler.step()
