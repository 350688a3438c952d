"""Linear probes (``ssl_zoo.eval.linear``): argument checks and the single-label probe refusing multi-label data."""

from pathlib import Path

import pytest

from ssl_zoo.cli import main
from ssl_zoo.eval.linear import LinearProbe

ROOT = Path(__file__).resolve().parents[2]


def test_probe_requires_a_backbone_without_checkpoint():
    with pytest.raises(ValueError, match="model.backbone"):
        LinearProbe()
    with pytest.raises(ValueError, match="model.pooling"):
        LinearProbe(backbone="resnet18", pooling="avg")


def test_linear_probe_refuses_multilabel_data(demo_root, tmp_path):
    with pytest.raises(ValueError, match="MultiLabelLinearProbe"):
        main(["fit", "--config", str(ROOT / "experiments/eval/linear_demo.yaml"), "--trainer.fast_dev_run", "1",
              "--model.init_args.backbone", "resnet18", "--model.init_args.img_size", "32",
              "--data", "ssl_zoo.data.CocoDataModule", "--data.init_args.root", demo_root,
              "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
              "--trainer.default_root_dir", str(tmp_path)])
