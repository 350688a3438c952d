"""``BadSampleMonitor`` (``ssl_zoo.utils.bad_samples``): the epoch's count of skipped files is logged and the files
listed, also summed over DDP ranks."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch import nn

from ssl_zoo.data.datamodule import ImageFolderDataModule
from ssl_zoo.utils.bad_samples import BadSampleMonitor
from tests.data.images import pixels, save_solid


def colour_encoding(index: int) -> tuple[int, int, int]:
    """A colour that encodes ``index`` exactly (for ``index < 65536``)."""
    return (index % 256, index // 256, 77)


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


def break_file(path: Path, kind: str) -> None:
    if kind == "missing":
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(BAD_CONTENT[kind])


def pixel_views(image: Image.Image) -> dict[str, torch.Tensor]:
    """A view transform that keeps the identity of the image: its top-left pixel as a 1x1 view."""
    colour = torch.as_tensor(pixels(image)[0, 0])  # [3]
    return {"views": colour.view(1, 3, 1, 1).float()}


def labelled_tree(root: Path, n: int, bad: dict[int, str], num_classes: int = 4) -> list[tuple[Path, int, bool]]:
    """``root/<class>/<i>.png`` with image ``i`` of class ``i % num_classes`` coloured ``colour_encoding(i)``.

    ``bad`` maps image numbers to a kind of breakage. A class-per-folder dataset lists what is on disk, so
    "missing" files are written here and must be removed with :func:`remove_missing` after the dataset
    is built (a file deleted while a run goes on). Returns ``(path, label, is_bad)`` in ImageFolder order
    (class folder, then file name).
    """
    files = []
    for i in range(n):
        label = i % num_classes
        path = save_solid(root / f"c{label}" / f"{i:03d}.png", colour_encoding(i))
        if i in bad and bad[i] != "missing":
            break_file(path, bad[i])
        files.append((path, label, i in bad))
    return sorted(files)


def expected_walk(is_bad: list[bool], position: int) -> tuple[int, int]:
    """Brute force of the skip policy: (position actually read, bad files passed over) for a request."""
    j, skipped = position, 0
    while is_bad[j]:
        skipped += 1
        j = (j + 1) % len(is_bad)
    return j, skipped


class PixelModule(LightningModule):
    """The smallest module a Trainer accepts: a linear map of the 1x1 views (the data is what is tested)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x = batch["views"][:, 0, :, 0, 0] / 255.0  # [B, 3]
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _metric_rows(path: Path, key: str) -> list[float]:
    with open(path, newline="") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def _fit_with_monitor(root: Path, run_dir: Path, num_workers: int, **trainer_kwargs) -> None:
    datamodule = ImageFolderDataModule(root=str(root), train_dir="train", batch_size=5, num_workers=num_workers,
                                       on_bad_sample="skip", train_transform=pixel_views)
    trainer = Trainer(max_epochs=2, logger=CSVLogger(run_dir, name="", version=""), default_root_dir=run_dir,
                      callbacks=[BadSampleMonitor()], enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", **trainer_kwargs)
    trainer.fit(PixelModule(), datamodule=datamodule)


def _check_reported(run_dir: Path, files: list[tuple[Path, int, bool]], reference: int) -> None:
    assert _metric_rows(run_dir / "metrics.csv", "data/skipped_epoch") == [reference, reference]
    assert _metric_rows(run_dir / "metrics.csv", "data/skipped_total") == [reference, 2 * reference]
    lines = (run_dir / "bad_samples.txt").read_text().splitlines()
    listed = dict(line.split("\t") for line in lines)
    assert set(listed) == {str(p) for p, _, b in files if b}
    reasons = {Path(p).stem: reason for p, reason in listed.items()}
    assert reasons["003"] == "empty file (0 bytes)" and reasons["017"] == "not a recognised image format"


def test_bad_sample_monitor_logs_the_epoch_count_and_lists_the_files(tmp_path):
    bad = {3: "zero-byte", 4: "truncated", 17: "text", 22: "random"}
    files = labelled_tree(tmp_path / "tree" / "train", 40, bad=bad)
    is_bad = [b for _, _, b in files]
    reference = sum(expected_walk(is_bad, position)[1] for position in range(len(files)))
    _fit_with_monitor(tmp_path / "tree", tmp_path / "run", num_workers=2, devices=1)
    _check_reported(tmp_path / "run", files, reference)


@pytest.mark.slow
@pytest.mark.distributed
def test_bad_sample_monitor_sums_over_ddp_ranks(tmp_path):
    bad = {3: "zero-byte", 4: "truncated", 17: "text", 22: "random", 30: "corrupt-header"}
    files = labelled_tree(tmp_path / "tree" / "train", 40, bad=bad)
    is_bad = [b for _, _, b in files]
    reference = sum(expected_walk(is_bad, position)[1] for position in range(len(files)))
    # 40 images over 2 ranks: 20 each, no padding, so every position is drawn exactly once per epoch.
    _fit_with_monitor(tmp_path / "tree", tmp_path / "run", num_workers=0, devices=2, strategy="ddp_spawn")
    _check_reported(tmp_path / "run", files, reference)
