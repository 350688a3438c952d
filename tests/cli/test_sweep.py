"""wandb sweeps (``ssl_zoo.cli.sweep*``): every sweep file validates and its trial commands parse with the CLI,
commands render as the wandb agent renders them, the local runner's search and summary, a 2-trial sweep."""

import csv
import itertools
import json
import os
from pathlib import Path

import pytest
import yaml

from ssl_zoo.cli import sweep, sweep_config, sweep_local
from ssl_zoo.cli.sweep_config import SweepConfigError

ROOT = Path(__file__).resolve().parents[2]
SWEEP_DIR = ROOT / "experiments" / "sweeps"
SWEEPS = sorted(SWEEP_DIR.glob("*.yaml"))
IDS = [p.stem for p in SWEEPS]


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _first_params(config: dict) -> dict:
    suggestion = sweep_config.suggest_params(config, [], seed=0)
    return {key: spec["value"] for key, spec in suggestion.config.items()}


def _command_config(config: dict) -> Path:
    command = [str(c) for c in config["command"]]
    return ROOT / command[command.index("--config") + 1]


def test_there_are_sweeps_for_every_paper():
    names = {p.stem for p in SWEEPS}
    for stem in ("bam_ia_lambda_gamma", "hvp_mtl_alphas", "mpcl_lambda_epsilon_projectors", "mvp_loss_on"):
        assert stem in names and f"{stem}_demo" in names, f"missing experiments/sweeps/{stem}[_demo].yaml"


@pytest.mark.parametrize("path", SWEEPS, ids=IDS)
def test_sweep_file_validates(path):
    """wandb's schema, a metric, an args macro, existing program and --config (see validate_sweep)."""
    config = sweep_config.load_sweep(path)
    sweep_config.validate_sweep(config, path, workdir=ROOT)
    assert "ssl_zoo.eval.FinalKNNProbe" in " ".join(map(str, config["command"])), "no end-of-run probe"
    # The metric is the one FinalKNNProbe logs for the config's data: top-1 on class folders, mAP otherwise.
    data_class = yaml.safe_load(_command_config(config).read_text())["data"]["class_path"]
    single_label = data_class.endswith("ImageFolderDataModule")
    assert config["metric"] == {"name": "probe/knn_top1" if single_label else "probe/knn_mAP", "goal": "maximize"}


@pytest.mark.parametrize("path", [p for p in SWEEPS if not p.stem.endswith("_demo")], ids=lambda p: p.stem)
def test_demo_variant_sweeps_the_same_keys(path):
    paper, demo = sweep_config.load_sweep(path), sweep_config.load_sweep(path.with_name(f"{path.stem}_demo.yaml"))
    assert paper["parameters"].keys() == demo["parameters"].keys()
    assert paper["method"] == demo["method"]
    assert _command_config(demo).name.startswith("demo")
    assert not _command_config(paper).name.startswith("demo")


@pytest.mark.slow
@pytest.mark.parametrize("path", SWEEPS, ids=IDS)
def test_rendered_trial_parses_with_the_cli(path, monkeypatch):
    """A trial's rendered command parses with the LightningCLI and every swept value lands on its key."""
    monkeypatch.chdir(ROOT)
    config = sweep_config.load_sweep(path)
    params = _first_params(config)
    resolved = sweep_config.check_trial_parses(sweep_config.render_command(config, params))
    for key, value in params.items():
        got = _get(resolved, key)
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, key
    callbacks = [c["class_path"] for c in resolved["trainer"]["callbacks"]]
    assert "ssl_zoo.eval.FinalKNNProbe" in callbacks


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in SWEEPS if p.stem.endswith("_demo")], ids=lambda p: p.stem)
def test_demo_trial_instantiates(path, monkeypatch, tmp_path):
    """``main(args, run=False)`` builds the method with the swept values and the probe callback."""
    from ssl_zoo.cli import main
    from ssl_zoo.eval import FinalKNNProbe

    monkeypatch.chdir(ROOT)
    config = sweep_config.load_sweep(path)
    params = _first_params(config)
    subcommand, *args = sweep_config.cli_args(sweep_config.render_command(config, params))
    assert subcommand == "fit"
    cli = main([*args, "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"], run=False)
    for key, value in params.items():
        assert key.startswith("model.init_args.")
        assert cli.model.hparams[key.rsplit(".", 1)[1]] == pytest.approx(value)
    assert any(isinstance(c, FinalKNNProbe) for c in cli.trainer.callbacks)


def test_render_command_matches_the_wandb_agent(monkeypatch, tmp_path):
    """The same command list as ``wandb_agent.Agent._command_run`` builds for the process it starts."""
    from wandb import wandb_agent

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    monkeypatch.setenv("WANDB_RUN_ID", "unset")
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", "unset")
    monkeypatch.setenv("SSL_ZOO_SWEEP_TEST", "from-env")
    command = ["${env}", "${interpreter}", "${program}", "fit", "--tag=${envvar:SSL_ZOO_SWEEP_TEST}", "${args}",
               "${args_no_hyphens}", "${args_no_equals}", "${args_no_boolean_flags}", "${args_json}",
               "${args_json_file}", "${args_override_hydra}", "${not_a_macro}"]
    params = {"model.init_args.lam": 0.5, "model.init_args.loss_on": "masked", "model.init_args.bam": False,
              "data.init_args.batch_size": 8}
    captured = {}

    class RecordingProcess:
        def __init__(self, command=None, env=None, **kwargs):
            captured["command"] = command

    monkeypatch.setattr(wandb_agent, "AgentProcess", RecordingProcess)
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id="sw1")
    agent._sweep_command = list(command)
    agent._command_run({"run_id": "r1", "program": "ssl_zoo/__main__.py",
                        "args": {k: {"value": v} for k, v in params.items()}})
    json_file = os.path.join(str(tmp_path), "wandb", "sweep-sw1", "config-r1.json")
    ours = sweep_config.render_command({"command": command, "program": "ssl_zoo/__main__.py"}, params,
                                args_json_file=json_file)
    assert ours == captured["command"]
    assert "--model.init_args.lam=0.5" in ours and "--tag=from-env" in ours


def test_params_file_is_what_wandb_init_reads(tmp_path):
    """The trial's params file, read back by the loader ``wandb.init`` applies to ``WANDB_SWEEP_PARAM_PATH``."""
    from wandb.sdk.lib import config_util

    params = {"model.init_args.lam": 0.5, "model.init_args.loss_on": "masked", "model.init_args.bam": False,
              "data.init_args.batch_size": 8, "model.init_args.note": "é, no ascii"}
    path = tmp_path / "trial-000.params.yaml"
    sweep_config.write_params_file(path, params)
    assert config_util.dict_from_config_file(str(path), must_exist=True) == params


def _valid_config() -> dict:
    return sweep_config.load_sweep(SWEEP_DIR / "mvp_loss_on_demo.yaml")


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda c: c.update(method="grids"), "grids"),
    (lambda c: c["command"].remove("${args}"), "no ${args}"),
    (lambda c: c["command"].append("${argz}"), "${argz}"),
    (lambda c: c.update(run_cap=0), "run_cap"),
    (lambda c: c.pop("metric"), "metric"),
    (lambda c: c["command"].__setitem__(c["command"].index("--config") + 1, "experiments/mvp/nope.yaml"),
     "nope.yaml"),
    (lambda c: c.update(program="ssl_zoo/nope.py"), "nope.py"),
], ids=["method", "no-args-macro", "unknown-macro", "run_cap", "no-metric", "missing-config", "missing-program"])
def test_validate_rejects_broken_files(mutate, message):
    config = _valid_config()
    mutate(config)
    with pytest.raises(SweepConfigError) as err:
        sweep_config.validate_sweep(config, "broken.yaml", workdir=ROOT)
    assert message in str(err.value) and "broken.yaml" in str(err.value)


def test_misspelt_parameter_is_rejected_by_the_cli(monkeypatch):
    monkeypatch.chdir(ROOT)
    config = _valid_config()
    with pytest.raises(SweepConfigError, match="no_such_option"):
        sweep_config.check_trial_parses(sweep_config.render_command(config, {"model.init_args.no_such_option": 1}))


def test_command_line_errors_name_the_file(capsys, tmp_path):
    assert sweep.main([str(tmp_path / "nope.yaml"), "--local"]) == 2
    assert "nope.yaml' not found" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({**_valid_config(), "method": "grids"}))
    assert sweep.main([str(broken), "--local"]) == 2
    assert "broken.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main([str(SWEEP_DIR / "mvp_loss_on_demo.yaml"), "--count", "0"])


def test_grid_suggestions_cover_the_product_once():
    config = sweep_config.load_sweep(SWEEP_DIR / "bam_ia_lambda_gamma.yaml")
    previous, seen = [], []
    while (suggestion := sweep_config.suggest_params(config, previous, seed=len(previous))) is not None:
        previous.append(suggestion)
        seen.append((suggestion.config["model.init_args.lam"]["value"],
                     suggestion.config["model.init_args.overlap"]["value"]))
    space = config["parameters"]
    expected = itertools.product(space["model.init_args.lam"]["values"], space["model.init_args.overlap"]["values"])
    assert sorted(seen) == sorted(expected)


def test_random_suggestions_are_seeded_and_in_bounds():
    config = sweep_config.load_sweep(SWEEP_DIR / "hvp_mtl_alphas.yaml")
    draws = [_first_params(config) for _ in range(2)]
    assert draws[0] == draws[1]
    assert sweep_config.suggest_params(config, [], seed=1).config != sweep_config.suggest_params(config, [], seed=0).config
    for seed in range(20):
        params = {k: v["value"] for k, v in sweep_config.suggest_params(config, [], seed=seed).config.items()}
        for key, value in params.items():
            spec = config["parameters"][key]
            assert spec["min"] <= value <= spec["max"], key


def test_random_search_needs_a_count():
    with pytest.raises(SweepConfigError, match="--count"):
        sweep_local._trial_count({"method": "random"}, None, "x.yaml")
    assert sweep_local._trial_count({"method": "random", "run_cap": 3}, None, "x.yaml") == 3
    assert sweep_local._trial_count({"method": "random", "run_cap": 3}, 5, "x.yaml") == 5
    assert sweep_local._trial_count({"method": "grid"}, None, "x.yaml") is None


def test_read_last_metric_takes_the_last_logged_value(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,probe/knn_top1,step,train/loss\n0,,1,2.5\n,12.5,2,\n1,,3,2.0\n,25.0,4,\n2,,5,1.0\n")
    assert sweep_local.read_last_metric(path, "probe/knn_top1") == 25.0
    assert sweep_local.read_last_metric(path, "train/loss") == 1.0
    assert sweep_local.read_last_metric(path, "probe/knn_mAP") is None
    assert sweep_local.read_last_metric(tmp_path / "missing.csv", "train/loss") is None


@pytest.mark.parametrize("goal", ["maximize", "minimize"])
def test_summary_is_sorted_by_the_metric_failures_last(tmp_path, goal):
    results = [sweep_local.TrialResult(i, {"model.init_args.lam": lam}, status, value, 1.0, f"r{i}", f"r{i}/trial.log")
               for i, (lam, status, value) in enumerate([(1, "finished", 3.0), (2, "failed", None),
                                                          (4, "finished", 7.0), (8, "finished", 5.0)])]
    sweep_local.write_summary(results, tmp_path, "probe/knn_top1", goal, {"name": "t"})
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    values = [float(r["probe/knn_top1"]) for r in rows[:3]]
    assert values == sorted(values, reverse=goal == "maximize")
    assert rows[-1]["status"] == "failed"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [t["trial"] for t in summary["trials"]] == [int(r["trial"]) for r in rows]
    table = sweep_local.format_summary(results, "probe/knn_top1", goal).splitlines()
    assert table[0].split()[:3] == ["trial", "model.init_args.lam", "probe/knn_top1"]
    assert table[2].split()[0] == ("002" if goal == "maximize" else "000")


# ------------------------------------------------------------------------------------------- FinalKNNProbe


# ------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_two_trial_local_demo_sweep(demo_root, tmp_path, monkeypatch):
    """mvp_loss_on_demo.yaml locally: both grid points train, log the probe and an offline wandb run each."""
    monkeypatch.chdir(ROOT)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    out = tmp_path / "sweep"
    tiny = [f"--data.init_args.root={demo_root}/folder", "--data.init_args.num_workers=0",
            "--data.init_args.batch_size=8", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
            "--trainer.log_every_n_steps=1"]
    results = sweep_local.run_local(SWEEP_DIR / "mvp_loss_on_demo.yaml", out_dir=out, extra_args=tiny, quiet=True)

    assert len(results) == 2, "the grid has two points"
    assert sorted(r.params["model.init_args.loss_on"] for r in results) == ["all", "masked"]
    for r in results:
        assert r.status == "finished", Path(r.log_file).read_text()[-3000:]
        run_dir = Path(r.run_dir)
        assert run_dir.parent == out.resolve()
        params_file = yaml.safe_load(run_dir.with_name(f"{run_dir.name}.params.yaml").read_text())
        assert params_file["model.init_args.loss_on"] == {"value": r.params["model.init_args.loss_on"]}
        resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert resolved["model"]["init_args"]["loss_on"] == r.params["model.init_args.loss_on"]
        assert 0.0 <= r.metric <= 100.0
        assert r.metric == sweep_local.read_last_metric(run_dir / "metrics.csv", "probe/knn_top1")
        assert len(r.wandb_runs) == 1 and Path(r.wandb_runs[0]).name.startswith("offline-run-")
        assert list(Path(r.wandb_runs[0]).glob("run-*.wandb")), "the offline run holds no log"
    summary = json.loads((out / "summary.json").read_text())
    metrics = [t["metric"] for t in summary["trials"]]
    assert metrics == sorted(metrics, reverse=True)
    assert summary["metric"] == {"name": "probe/knn_top1", "goal": "maximize"}
    assert len(list(csv.DictReader((out / "summary.csv").open()))) == 2
