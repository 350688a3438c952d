"""Learning curves (``python -m ssl_zoo.cli.plot`` and the ``curves.png`` callback): the values drawn are the
values logged, read from hand-written CSVs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from PIL import Image

from ssl_zoo.cli import main as cli_main
from ssl_zoo.cli.plot import CurvesPlot, default_keys, plot_runs, read_run, resolve_key
from ssl_zoo.cli.plot import main as plot_main

ROOT = Path(__file__).resolve().parents[2]


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir: Path, rows: list[dict], name: str | None = None) -> Path:
    """A Lightning-style metrics.csv (empty cells where a row does not log a key) and a config.yaml."""
    run_dir.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for row in rows for k in row})
    with (run_dir / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    if name:
        (run_dir / "config.yaml").write_text(yaml.safe_dump({"name": name}))
    return run_dir


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


ROWS_A = [
    {"epoch": 0, "step": 4, "train/loss_sim_step": 0.5, "train/loss_step": 1.0, "train/images_per_s": 10},
    {"epoch": 0, "step": 9, "train/loss_sim_step": 0.25, "train/loss_step": 0.75, "train/images_per_s": 11},
    {"epoch": 0, "step": 9, "train/loss_sim_epoch": 0.4, "train/loss_epoch": 0.9, "val/knn_top1": 20.0},
]


def test_read_run_keeps_each_column_as_a_step_curve(tmp_path):
    run = read_run(write_metrics(tmp_path / "a", ROWS_A, name="bam_ia_cpu"))
    assert run.label == "bam_ia_cpu/a"
    assert run.curves["train/loss_sim_step"] == [(4, 0.5), (9, 0.25)]
    assert run.curves["train/loss_sim_epoch"] == [(9, 0.4)]
    assert run.curves["val/knn_top1"] == [(9, 20.0)]
    assert "step" not in run.curves


def test_keys_resolve_to_step_values_first_and_bookkeeping_is_left_out(tmp_path):
    run = read_run(write_metrics(tmp_path / "a", ROWS_A))
    assert resolve_key("train/loss_sim", run.curves) == "train/loss_sim_step"
    assert resolve_key("train/loss_sim_epoch", run.curves) == "train/loss_sim_epoch"
    assert resolve_key("val/knn_top1", run.curves) == "val/knn_top1"
    assert resolve_key("train/nothing", run.curves) is None
    # Each metric once (per-step and epoch columns share a panel), throughput and epoch counter left out.
    assert default_keys([run]) == ["train/loss_sim", "train/loss", "val/knn_top1"]


def test_plot_command_overlays_runs_bam_fig4(tmp_path, capsys):
    """BAM's Fig. 4 (L_sim with and without BAM) is one command."""
    bam = write_metrics(tmp_path / "bam", ROWS_A, name="bam_ia")
    simsiam = write_metrics(tmp_path / "simsiam", [{"step": 4, "train/loss_sim_step": 0.6},
                                                   {"step": 9, "train/loss_sim_step": 0.5}], name="simsiam")
    out = tmp_path / "fig4.png"
    assert plot_main([str(bam), str(simsiam), "--keys", "train/loss_sim", "--out", str(out)]) == 0
    assert is_png(out) and "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a key no run logged
        plot_main([str(bam), "--keys", "train/unknown", "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit):  # not a run directory
        plot_main([str(tmp_path / "missing"), "--out", str(tmp_path / "y.png")])
    with pytest.raises(SystemExit):  # labels must match the runs
        plot_main([str(bam), str(simsiam), "--labels", "one", "--out", str(tmp_path / "z.png")])


def test_plot_draws_one_line_per_run_with_the_logged_values(tmp_path, monkeypatch):
    """The figure's lines hold exactly the CSV values (read back from matplotlib's artists)."""
    import matplotlib.pyplot as plt

    runs = [read_run(write_metrics(tmp_path / n, rows)) for n, rows in
            (("a", ROWS_A), ("b", [{"step": 1, "train/loss_sim_step": 0.9}, {"step": 3, "train/loss_sim_step": 0.1}]))]
    captured = {}
    real_close = plt.close

    def keep_figure(figure=None):
        captured["figure"] = figure
        return real_close(figure)

    monkeypatch.setattr(plt, "close", keep_figure)
    out = plot_runs(runs, ["train/loss_sim", "val/knn_top1"], tmp_path / "f.png")
    assert is_png(out)
    axes = [a for a in captured["figure"].axes if a.get_visible()]
    assert [a.get_title() for a in axes] == ["train/loss_sim", "val/knn_top1"]
    lines = {tuple(line.get_xdata()): tuple(line.get_ydata()) for line in axes[0].get_lines()}
    assert lines == {(4, 9): (0.5, 0.25), (1, 3): (0.9, 0.1)}
    assert [tuple(line.get_ydata()) for line in axes[1].get_lines()] == [(20.0,)]


@pytest.mark.slow
def test_every_fit_writes_curves_png(demo_root, tmp_path):
    run_dir = tmp_path / "run"
    cli_main(["fit", "--config", str(ROOT / "experiments/simsiam/demo.yaml"), "--trainer.max_epochs", "1",
              "--trainer.limit_train_batches", "2", "--trainer.log_every_n_steps", "1",
              "--data.init_args.root", demo_root, "--data.init_args.num_workers", "0",
              "--data.init_args.batch_size", "8", "--trainer.default_root_dir", str(run_dir)])
    assert is_png(run_dir / "curves.png")
    with Image.open(run_dir / "curves.png") as image:
        assert image.size[0] > 300 and image.size[1] > 200
    # The monitor ran (multi-label COCO view: mAP) and its value is in the CSV the figure was drawn from.
    assert "val/knn_mAP" in read_run(run_dir).curves


def test_curves_callback_is_silent_without_a_csv_logger(tmp_path):
    class FakeTrainer:
        is_global_zero = True
        loggers: list = []
        default_root_dir = str(tmp_path)

    CurvesPlot().on_fit_end(FakeTrainer(), None)
    assert not (tmp_path / "curves.png").exists()
