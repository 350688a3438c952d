"""The command line: every experiment config parses (no stale keys), demo configs run, run directories."""

import contextlib
import io
import os
from pathlib import Path

import pytest
import yaml

from ssl_zoo.cli import main
from ssl_zoo.cli.errors import ConfigError
from ssl_zoo.cli.lightning_cli import apply_cpu_threads, wandb_mode

ROOT = Path(__file__).resolve().parents[2]
NON_CLI_DIRS = {"sweeps", "launch"}  # wandb sweep files and launcher templates are checked elsewhere
NON_CLI_FILES = {"tables.yaml"}  # paper table manifests, checked by tests/test_tables.py
CONFIGS = sorted(p for p in (ROOT / "experiments").rglob("*.yaml")
                 if not NON_CLI_DIRS & set(p.relative_to(ROOT / "experiments").parts) and p.name not in NON_CLI_FILES)
DEMOS = [p for p in CONFIGS if p.name == "demo.yaml" and p.parent.name != "eval"]


def test_there_are_configs():
    assert DEMOS, "no experiments/<method>/demo.yaml found"


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
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "experiments")))
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


def _data_root(config: Path, demo_root: str) -> str:
    """The tiny demo set in the format the config reads (folder configs read its class-per-folder view)."""
    data = yaml.safe_load(config.read_text())["data"]
    return f"{demo_root}/folder" if data["class_path"].endswith("ImageFolderDataModule") else demo_root


def _fast_dev_run(config: Path, demo_root: str, tmp_path: Path, *extra: str):
    return main(["fit", "--config", str(config), "--trainer.fast_dev_run", "1",
                 "--data.init_args.root", _data_root(config, demo_root), "--data.init_args.num_workers", "0",
                 "--data.init_args.batch_size", "4", "--trainer.default_root_dir", str(tmp_path), *extra])


@pytest.mark.slow
@pytest.mark.parametrize("config", DEMOS, ids=lambda p: p.parent.name)
def test_demo_config_fast_dev_run(config, demo_root, tmp_path):
    cli = _fast_dev_run(config, demo_root, tmp_path)
    loss = cli.trainer.callback_metrics["train/loss"]
    assert loss.isfinite()


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


def test_run_summary_says_when_max_time_stopped_the_schedule(tmp_path):
    """A fit that trainer.max_time ends before max_epochs is named in the summary (epoch and step reached); one
    that ran its schedule within the limit is not."""
    import time

    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    from ssl_zoo.cli.run_summary import format_run_summary

    class SlowBatches(Callback):
        """Sleeps after every batch from global step ``from_step`` on, so that max_time runs out there."""

        def __init__(self, seconds, from_step=0):
            self.seconds, self.from_step = seconds, from_step

        def on_train_batch_end(self, trainer, *args, **kwargs):
            if trainer.global_step >= self.from_step:
                time.sleep(self.seconds)

    def fit(max_time, callbacks, max_epochs=50):
        trainer = Trainer(max_epochs=max_epochs, max_time=max_time, limit_train_batches=3, limit_val_batches=0,
                          logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path)
        trainer.fit(BoringModel())
        return trainer

    cut = fit({"seconds": 1}, [SlowBatches(0.1)])
    assert 0 < cut.global_step < 50 * 3
    summary = format_run_summary(cut, BoringModel(), "fit")
    (line,) = [row for row in summary.splitlines() if row.startswith("stopped")]
    # BoringModel takes one optimizer step per batch: the epoch reached and its batches follow from the steps.
    epoch = -(-cut.global_step // 3)  # ceil
    batches_done = cut.global_step - 3 * (epoch - 1)
    assert "trainer.max_time" in line
    assert f"in epoch {epoch} of 50, after {batches_done} of its 3 batches (step {cut.global_step})" in line

    # Cut short in its last epoch (the time runs out after its first batch, step 4 of 6): the schedule did not
    # finish either, though Lightning counts that epoch done.
    last = fit({"seconds": 2}, [SlowBatches(2.5, from_step=4)], max_epochs=2)
    assert 3 < last.global_step < 6 and last.current_epoch == 2
    assert f"in epoch 2 of 2, after {last.global_step - 3} of its 3 batches" in format_run_summary(
        last, BoringModel(), "fit")
    complete = fit({"minutes": 5}, [])
    assert complete.current_epoch == 50
    assert "stopped" not in format_run_summary(complete, BoringModel(), "fit")


@pytest.fixture
def restore_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cpu_threads_set_torch_threads_on_cpu_runs_only(monkeypatch, restore_threads):
    import torch

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
