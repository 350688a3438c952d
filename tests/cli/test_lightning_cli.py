"""The command line (``ssl_zoo.cli.lightning_cli``): every experiment config parses (no stale keys), run directories,
wandb's mode, CPU threads, and the run ``--resume`` continues."""

import contextlib
import io
import os
from pathlib import Path

import pytest
import torch
import yaml

from ssl_zoo.cli import main
from ssl_zoo.cli.errors import ConfigError
from ssl_zoo.cli.lightning_cli import apply_cpu_threads, apply_resume, wandb_mode
from tests.helpers.experiment_configs import CLI_CONFIGS, DEMO_CONFIGS, NON_CLI_FILES

ROOT = Path(__file__).resolve().parents[2]


def test_there_are_configs():
    assert DEMO_CONFIGS, "no experiments/<method>/demo.yaml found"


def _is_overlay(config: Path) -> bool:
    """An overlay states only what it changes and is applied on top of a full config: an ablation (no ``data``)
    or a data-source overlay in ``experiments/shards/`` (no ``model``)."""
    return not {"model", "data"} <= set(yaml.safe_load(config.read_text()) or {})


def _base_of(overlay: Path) -> Path:
    """The method's first paper config: ``experiments/<m>/ablations/x.yaml`` and ``experiments/shards/<m>.yaml``
    -> ``experiments/<m>/<paper>.yaml``."""
    method_dir = ROOT / "experiments" / overlay.stem if overlay.parent.name == "shards" else overlay.parent.parent
    return next(p for p in sorted(method_dir.glob("*.yaml"))
                if not p.name.startswith(("demo", "cpu")) and p.name not in NON_CLI_FILES)


@pytest.mark.slow
@pytest.mark.parametrize("config", CLI_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "experiments")))
def test_config_parses(config):
    """Parsing validates every key against the typed constructors: a stale or misspelt key fails here."""
    configs = ["--config", str(_base_of(config)), "--config", str(config)] if _is_overlay(config) else [
        "--config", str(config)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["fit", *configs, "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(out.getvalue())
    assert resolved["model"]["class_path"].startswith("ssl_zoo.")
    assert resolved["seed_everything"] is not None


@pytest.mark.slow
def test_fit_writes_run_directory(demo_root, tmp_path):
    """A short real fit leaves the resolved config, last + best checkpoints and the CSV metrics."""
    run_dir = tmp_path / "run"
    main(["fit", "--config", str(ROOT / "experiments/simsiam/demo.yaml"), "--trainer.max_epochs", "1",
          "--trainer.limit_train_batches", "2", "--trainer.log_every_n_steps", "1", "--data.init_args.root", demo_root,
          "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "8",
          "--trainer.default_root_dir", str(run_dir)])
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "checkpoints").glob("best-*.ckpt"))
    metrics = (run_dir / "metrics.csv").read_text()
    assert "train/loss_epoch" in metrics and "train/images_per_s" in metrics


def test_run_dir_defaults_to_runs_name_stamp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["--config", str(ROOT / "experiments/simsiam/demo.yaml"), "--trainer.logger", "false"], run=False)
    run_dir = Path(cli.trainer.default_root_dir)
    assert run_dir.parent == Path("runs/simsiam")
    assert len(run_dir.name) == len("20260101-120000")


def test_wandb_mode_offline_without_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


@pytest.fixture
def restore_threads():

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cpu_threads_set_torch_threads_on_cpu_runs_only(monkeypatch, restore_threads):

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    assert not apply_cpu_threads(0, {"accelerator": "cpu"}) and torch.get_num_threads() == 2  # 0: torch's default
    assert not apply_cpu_threads(1, {"accelerator": "gpu", "devices": 1}) and torch.get_num_threads() == 2
    assert apply_cpu_threads(1, {"accelerator": "cpu", "devices": 1}) and torch.get_num_threads() == 1
    assert "OMP_NUM_THREADS" not in os.environ  # one process: nothing to pass on
    torch.set_num_threads(2)
    auto = {"accelerator": "auto", "devices": 1}
    assert apply_cpu_threads(1, auto) == (not torch.cuda.is_available())
    # The processes of a multi-process CPU run (ddp_spawn) start with the environment's count.
    monkeypatch.setattr(os, "environ", {**os.environ})
    assert apply_cpu_threads(1, {"accelerator": "cpu", "devices": 2}) and os.environ["OMP_NUM_THREADS"] == "1"
    # A count the user set in the environment wins.
    torch.set_num_threads(2)
    os.environ["OMP_NUM_THREADS"] = "2"
    assert not apply_cpu_threads(1, {"accelerator": "cpu"}) and torch.get_num_threads() == 2
    with pytest.raises(ConfigError, match="cpu_threads: must be >= 0"):
        apply_cpu_threads(-1, {"accelerator": "cpu"})


def _fit_config(tmp_path, **overrides) -> dict:
    return {"ckpt_path": None, "trainer": {"default_root_dir": None}, "run_root": str(tmp_path), "name": "mpcl",
            "resume": True, **overrides}


def test_resume_picks_the_newest_run_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("SSL_ZOO_RUN_STAMP", raising=False)
    for stamp in ("20250101-000000", "20250301-000000"):
        (tmp_path / "mpcl" / stamp / "checkpoints").mkdir(parents=True)
        (tmp_path / "mpcl" / stamp / "checkpoints" / "last.ckpt").write_bytes(b"x")
    cfg = _fit_config(tmp_path)
    apply_resume(cfg)
    newest = tmp_path / "mpcl" / "20250301-000000"
    assert cfg["ckpt_path"] == str(newest / "checkpoints" / "last.ckpt")
    assert cfg["trainer"]["default_root_dir"] == str(newest)  # the run continues in its own directory

    monkeypatch.setenv("SSL_ZOO_RUN_STAMP", "20250101-000000")  # a launcher pinned the run
    cfg = _fit_config(tmp_path)
    apply_resume(cfg)
    assert cfg["trainer"]["default_root_dir"] == str(tmp_path / "mpcl" / "20250101-000000")

    with pytest.raises(ValueError, match="either --resume or --ckpt_path"):
        apply_resume(_fit_config(tmp_path, ckpt_path="x.ckpt"))


def test_resume_without_a_run_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("SSL_ZOO_RUN_STAMP", raising=False)
    with pytest.raises(FileNotFoundError, match=r"--resume: no checkpoint .*mpcl.*last\.ckpt for run name 'mpcl'"):
        apply_resume(_fit_config(tmp_path))
    cfg = _fit_config(tmp_path, resume="auto")  # auto: a fresh run instead
    apply_resume(cfg)
    assert cfg["ckpt_path"] is None and cfg["trainer"]["default_root_dir"] is None
