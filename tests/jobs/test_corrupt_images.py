"""A demo pre-training run on data with 5 % corrupt images completes and reports them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssl_zoo.cli import main
from ssl_zoo.data.demo import make_demo_dataset
from tests.data.images import BAD_KINDS, break_file
from tests.helpers.tiny_trainer import logged_values

ROOT = Path(__file__).resolve().parents[2]


SIMSIAM = str(ROOT / "experiments/simsiam/demo.yaml")


def _demo_images(target: Path, count: int) -> list[Path]:
    """A ``count``-image demo set (COCO layout, the built-in generator) in ``target``; training paths in id order."""
    make_demo_dataset(target, num_train=count, num_val=8, size=64, seed=0)
    data = json.loads((target / "annotations" / "instances_train2017.json").read_text())
    return [target / "train2017" / image["file_name"] for image in sorted(data["images"], key=lambda im: im["id"])]


@pytest.mark.slow
def test_demo_pretraining_with_5_percent_corrupt_images_completes_and_reports_them(tmp_path):
    paths = _demo_images(tmp_path / "data", 200)
    bad_positions = range(7, 200, 20)  # 10 files, none adjacent: each is passed over once per epoch
    kinds = BAD_KINDS * 2
    for position, kind in zip(bad_positions, kinds, strict=False):
        break_file(paths[position], kind)
    run_dir = tmp_path / "run"
    main(["fit", "--config", SIMSIAM, "--trainer.default_root_dir", str(run_dir), "--trainer.logger", "true",
          "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1.0", "--trainer.log_every_n_steps", "4",
          "--data.init_args.root", str(tmp_path / "data"), "--data.init_args.batch_size", "25",
          "--data.init_args.num_workers", "2", "--data.init_args.on_bad_sample", "skip",
          "--model.init_args.img_size", "32", "--model.init_args.proj_hidden_dim", "128",
          "--model.init_args.proj_dim", "128", "--model.init_args.pred_hidden_dim", "32"])
    # 200 images / 25 = 8 steps: every image, the bad ones included, is drawn once in the epoch.
    assert logged_values(run_dir / "metrics.csv", "data/skipped_epoch") == [10.0]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    listed = dict(line.split("\t") for line in (run_dir / "bad_samples.txt").read_text().splitlines())
    assert set(listed) == {str(paths[p]) for p in bad_positions}
    assert all(reason for reason in listed.values())
