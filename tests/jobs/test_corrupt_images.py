"""A demo pre-training run on data with 5 % corrupt images completes and reports them."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_zoo.cli import main
from ssl_zoo.data.demo import make_demo_dataset

ROOT = Path(__file__).resolve().parents[2]


def jpeg_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buffer, "JPEG", quality=90
    )
    return buffer.getvalue()


#: One of each kind of broken file met in crawled data; "missing" is a listed file that is not on disk.
BAD_CONTENT = {
    "zero-byte": b"",
    "truncated": jpeg_bytes()[: len(jpeg_bytes()) // 2],
    "text": b"<html><body>404 Not Found</body></html>\n",
    "random": bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8)),
    "corrupt-header": b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
}


BAD_KINDS = [*BAD_CONTENT, "missing"]


def break_file(path: Path, kind: str) -> None:
    if kind == "missing":
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(BAD_CONTENT[kind])


def _metric_rows(path: Path, key: str) -> list[float]:
    with open(path, newline="") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


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
    assert _metric_rows(run_dir / "metrics.csv", "data/skipped_epoch") == [10.0]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    listed = dict(line.split("\t") for line in (run_dir / "bad_samples.txt").read_text().splitlines())
    assert set(listed) == {str(paths[p]) for p in bad_positions}
    assert all(reason for reason in listed.values())
