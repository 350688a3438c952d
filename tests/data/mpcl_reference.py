"""Record what the MPCL configs resolve to and what one training step computes, as reference fixtures.

Written against the flavour-switched ``ssl_zoo.methods.MPCL`` (one class for MoCo v2, MoCo v3 and Barlow Twins)
before it was split into one method per framework; ``tests/test_mpcl_reference.py`` resolves the same configs and
runs the same steps with the split classes and compares them value by value. To reproduce the fixtures, check out
the last commit that has ``ssl_zoo/methods/mpcl.py`` and run, from the repository root:

    OMP_NUM_THREADS=1 python tests/data/mpcl_reference.py

It writes ``tests/data/mpcl_resolved_settings.json`` (every pre-training chain of ``experiments/mpcl/tables.yaml``,
every config under ``experiments/{mpcl,mocov2,mocov3}``, the ablation overlays on their base, the shards overlay and
the MPCL sweeps: the resolved config outside the model, the model's effective arguments, the views' crop scale, the
global batch and the peak lr) and ``tests/data/mpcl_one_step_reference.json`` (tiny models of each flavour: weight
checksums at construction, two training steps with their losses, logged values and gradient checksums, the state
after them, the optimiser and lr schedule, the views).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ssl_zoo.tables import load_manifest, resolve_chain, setting_value  # noqa: E402

EXPERIMENTS = ROOT / "experiments"
SETTINGS_FILE = Path(__file__).with_name("mpcl_resolved_settings.json")
STEP_FILE = Path(__file__).with_name("mpcl_one_step_reference.json")


# ---------------------------------------------------------------------------------------------- the chains
def overlay_base(overlay: Path) -> str:
    """The config an overlay names in its usage line (``python -m ssl_zoo fit --config <base> --config ...``)."""
    line = next(line for line in overlay.read_text().splitlines() if "python -m ssl_zoo fit --config" in line)
    return line.split("--config ")[1].split()[0]


def mpcl_chains() -> dict[str, dict[str, Any]]:
    """Every config chain that builds an MPCL model: ``{id: {"configs": [...], "args": [...], "rows": [...]}}``."""
    chains: dict[str, dict[str, Any]] = {}

    def add(configs: list[str], args: list[str] = (), row: str | None = None) -> None:
        key = " + ".join(configs) + ("" if not args else " " + " ".join(args))
        entry = chains.setdefault(key, {"configs": list(configs), "args": list(args), "rows": []})
        if row:
            entry["rows"].append(row)

    manifest = load_manifest(EXPERIMENTS / "mpcl" / "tables.yaml")
    for table, row in manifest.rows():
        if row.pretrain:
            add(list(row.pretrain), list(row.pretrain_args), f"{table.id}: {row.name}")
    for folder in ("mpcl", "mocov2", "mocov3"):
        for path in sorted((EXPERIMENTS / folder).glob("*.yaml")):
            if path.name != "tables.yaml":
                add([str(path.relative_to(ROOT))])
    for overlay in sorted((EXPERIMENTS / "mpcl" / "ablations").glob("*.yaml")):
        add([overlay_base(overlay), str(overlay.relative_to(ROOT))])
    shards = EXPERIMENTS / "shards" / "mpcl.yaml"
    add([overlay_base(shards), str(shards.relative_to(ROOT))])
    for sweep in sorted((EXPERIMENTS / "sweeps").glob("mpcl_*.yaml")):
        spec = yaml.safe_load(sweep.read_text())
        command = spec["command"]
        configs = [command[i + 1] for i, item in enumerate(command) if item == "--config"]
        args = []
        for key, values in spec["parameters"].items():  # one trial's overrides: the first value of each
            value = values["values"][0] if "values" in values else values["min"]
            args += [f"--{key}", str(value)]
        add(configs, args, f"sweep {sweep.name}")
    return chains


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def resolved_settings() -> dict[str, Any]:
    from ssl_zoo.methods import MPCL

    out = {}
    for key, chain in mpcl_chains().items():
        config = resolve_chain(chain["configs"], chain["args"], ROOT)
        model = config.pop("model")
        assert model["class_path"] == "ssl_zoo.methods.MPCL", key
        with torch.device("meta"):
            built = MPCL(**model["init_args"])
        hparams = dict(built.hparams)
        scales = {view.transforms[0].scale for view in built.train_transform().transforms}
        assert len(scales) == 1, key
        base_lr = hparams["base_lr"]
        batch = hparams["lr_batch_size"] or setting_value({**config, "model": model}, "global_batch")
        out[key] = _jsonable({
            "rows": chain["rows"],
            "configs": chain["configs"],
            "args": chain["args"],
            "config": config,
            "model_class_path": model["class_path"],
            "model_init_args": model["init_args"],
            "model_hparams": hparams,
            "views_min_scale": next(iter(scales))[0],
            "global_batch": setting_value({**config, "model": model}, "global_batch"),
            "peak_lr": base_lr * batch / 256,
        })
    return out


# ---------------------------------------------------------------------------------------------- one step
#: Tiny models of each flavour, built with ``torch.manual_seed(0)``; every case also sets PTB weights from a
#: finished epoch (ACCURACY correct out of COUNT queries) so that Eq. 4's weights are not all 1.
CASES: dict[str, dict[str, Any]] = {
    "mocov2_shared_orthogonality": dict(flavour="mocov2", backbone="test_resnet", num_projectors=3,
                                        projector_hidden_dims=16, proj_dim=8, queue_size=20, orthogonality=True),
    "mocov2_separate_literal": dict(flavour="mocov2", backbone="test_resnet", num_projectors=3,
                                    projector_hidden_dims=[16, 24, 32], shared_hidden=False, proj_dim=8,
                                    queue_size=6, ptb_scale="literal", lam=0.5, head_norm="layer"),
    "mocov2_single": dict(flavour="mocov2", backbone="test_resnet", num_projectors=1, projector_hidden_dims=16,
                          proj_dim=8, queue_size=20),
    "mocov3_vit": dict(flavour="mocov3", backbone="vit_tiny_patch16_224",
                       backbone_kwargs={"img_size": 32, "model_kwargs": {"depth": 2}}, num_projectors=3,
                       projector_hidden_dims=16, proj_dim=8, pred_hidden_dim=16),
    "mocov3_resnet_sgd": dict(flavour="mocov3", backbone="test_resnet", num_projectors=2,
                              projector_hidden_dims=[16, 24], shared_hidden=False, proj_dim=8, pred_hidden_dim=16,
                              optimizer="sgd", base_lr=0.03, weight_decay=1e-4, warmup_epochs=2, min_scale=0.2,
                              freeze_patch_embed=False, moco_vit_init=False, ptb=False),
    "mocov3_resnet_lars": dict(flavour="mocov3", backbone="test_resnet", num_projectors=2, projector_hidden_dims=16,
                               proj_dim=8, pred_hidden_dim=16, optimizer="lars", head_norm="layer"),
    "barlowtwins_shared": dict(flavour="barlowtwins", backbone="test_resnet", num_projectors=3,
                               projector_hidden_dims=16, proj_dim=8),
    "barlowtwins_single": dict(flavour="barlowtwins", backbone="test_resnet", num_projectors=1,
                               projector_hidden_dims=16, proj_dim=8, pcr=False, ptb=False),
}
COMMON = dict(img_size=32)
BATCH = 4
ACCURACY = [6.0, 3.0, 1.0]
COUNT = 8


def checksum(t: torch.Tensor) -> list[float]:
    """[sum, sum of squares, sum of t * sin(1 + index)] in float64: any change in any element moves it."""
    x = t.detach().double().flatten().cpu()
    weights = torch.sin(torch.arange(1, x.numel() + 1, dtype=torch.float64))
    return [float(x.sum()), float((x * x).sum()), float((x * weights).sum())]


def batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"views": torch.randn(BATCH, 2, 3, 32, 32, generator=g), "index": torch.arange(BATCH)}


def _logged(model) -> dict[str, float]:
    logged: dict[str, float] = {}

    def log(name, value, *args, **kwargs):
        logged[name] = float(value)

    model.log = log
    return logged


def one_step_reference() -> dict[str, Any]:
    from ssl_zoo.methods import MPCL

    out: dict[str, Any] = {}
    for name, case in CASES.items():
        torch.manual_seed(0)
        model = MPCL(**COMMON, **case)
        record: dict[str, Any] = {"init": {k: checksum(v) for k, v in model.state_dict().items()}}
        mp = model.hparams.num_projectors
        model.record_accuracy(torch.tensor(ACCURACY[:mp]), COUNT)
        model.on_train_epoch_end()  # no trainer: the epoch is closed by hand
        record["loss_weights"] = model.loss_weights().tolist()
        logged = _logged(model)
        steps = []
        for seed in (1, 2):
            logged.clear()
            loss = model.training_step(batch(seed), 0)
            loss.backward()
            grads = {n: checksum(p.grad) for n, p in model.named_parameters() if p.grad is not None}
            steps.append({"loss": float(loss), "logged": dict(logged), "grads": grads})
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p.sub_(0.1 * p.grad)
                        p.grad = None
            logged.clear()
            model._total_steps = 10
            model.on_train_batch_end(None, None, 0)  # the EMA update after the optimiser step (no trainer)
            steps[-1]["logged_after_step"] = dict(logged)
        record["steps"] = steps
        record["state"] = {k: checksum(v) for k, v in model.state_dict().items()}
        record["ptb"] = {"correct": model.ptb_correct.tolist(), "count": float(model.ptb_count),
                         "last_acc": model.ptb_last_acc.tolist(), "weight": model.ptb_weight.tolist()}
        record["min_batch_size"] = list(model.min_batch_size())
        record["train_transform"] = repr(model.train_transform())
        record["num_query_parameters"] = model.num_query_parameters()
        # The optimiser and the lr schedule: 100 epochs of 10 steps, a global batch of 512.
        model._trainer = SimpleNamespace(estimated_stepping_batches=1000, max_epochs=100, world_size=1,
                                         accumulate_grad_batches=1, datamodule=SimpleNamespace(batch_size=512))
        config = model.configure_optimizers()
        optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
        groups = []
        for group in optimizer.param_groups:
            groups.append({
                "numel": sum(p.numel() for p in group["params"]),
                "tensors": len(group["params"]),
                **{k: v for k, v in group.items() if k != "params" and isinstance(v, int | float | bool | str)},
            })
        lrs = []
        for step in range(1000):
            if step in (0, 1, 99, 100, 101, 500, 998, 999):
                lrs.append([step, [g["lr"] for g in optimizer.param_groups]])
            optimizer.step()
            scheduler.step()
        record["optimizer"] = {"class": type(optimizer).__name__, "groups": groups, "lrs": lrs,
                               "interval": config["lr_scheduler"]["interval"]}
        out[name] = {"case": _jsonable({**COMMON, **case}), **_jsonable(record)}
    return out


def main() -> None:
    torch.use_deterministic_algorithms(True)
    settings = resolved_settings()
    SETTINGS_FILE.write_text(json.dumps({
        "note": __doc__.strip(),
        "chains": settings,
    }, indent=1, sort_keys=True) + "\n")
    steps = one_step_reference()
    STEP_FILE.write_text(json.dumps({"note": __doc__.strip(), "batch": BATCH, "accuracy": ACCURACY,
                                     "count": COUNT, "cases": steps}, sort_keys=True) + "\n")
    print(f"{len(settings)} chains -> {SETTINGS_FILE}; {len(steps)} cases -> {STEP_FILE}")


if __name__ == "__main__":
    main()
