"""Every method's demo config runs a fast_dev_run through the command line."""

from pathlib import Path

import pytest
import yaml

from ssl_zoo.cli import main
from tests.helpers.experiment_configs import DEMO_CONFIGS


def _data_root(config: Path, demo_root: str) -> str:
    """The tiny demo set in the format the config reads (folder configs read its class-per-folder view)."""
    data = yaml.safe_load(config.read_text())["data"]
    return f"{demo_root}/folder" if data["class_path"].endswith("ImageFolderDataModule") else demo_root


def _fast_dev_run(config: Path, demo_root: str, tmp_path: Path, *extra: str):
    return main(["fit", "--config", str(config), "--trainer.fast_dev_run", "1",
                 "--data.init_args.root", _data_root(config, demo_root), "--data.init_args.num_workers", "0",
                 "--data.init_args.batch_size", "4", "--trainer.default_root_dir", str(tmp_path), *extra])


@pytest.mark.slow
@pytest.mark.parametrize("config", DEMO_CONFIGS, ids=lambda p: p.parent.name)
def test_demo_config_fast_dev_run(config, demo_root, tmp_path):
    cli = _fast_dev_run(config, demo_root, tmp_path)
    loss = cli.trainer.callback_metrics["train/loss"]
    assert loss.isfinite()
