"""Curves of logged metrics against the step, for one run or several overlaid.

``python -m ssl_zoo.cli.plot RUN_DIR [RUN_DIR ...] [--keys KEY ...] [--labels NAME ...] [--out fig.png]``

Each run directory holds the ``metrics.csv`` of Lightning's CSV logger (every ssl_zoo run writes one). Every key
gets its own panel with one line per run, so runs of different methods or settings compare directly. BAM's
Fig. 4 (SimSiam's L_sim with and without the block-wise augmentation) is one command::

    python -m ssl_zoo.cli.plot runs/bam_ia/<stamp> runs/simsiam/<stamp> --keys train/loss_sim --out fig4.png

A key names a logged metric with or without Lightning's ``_step`` / ``_epoch`` suffix: ``train/loss`` plots the
per-step values (``train/loss_step``) when the run logged them, else the epoch means. Without ``--keys`` every
loss term and monitor metric of the runs is drawn (bookkeeping columns such as throughput and lr are left out).

:class:`CurvesPlot`, a callback the CLI adds to every run, writes ``curves.png`` into the run directory when
``fit`` ends.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["CurvesPlot", "RunCurves", "default_keys", "main", "plot_runs", "read_run", "resolve_key"]

METRICS_FILE = "metrics.csv"
CURVES_FILE = "curves.png"
_STEP_SUFFIX, _EPOCH_SUFFIX = "_step", "_epoch"
#: Columns that describe the run's speed or schedule rather than what it learns.
_BOOKKEEPING = ("epoch", "step", "train/images_per_s", "data/skipped_epoch", "data/skipped_total",
                "train/nonfinite_skips")


@dataclass
class RunCurves:
    """The logged metrics of one run: ``curves[key] = [(step, value), ...]`` in logging order."""

    label: str
    path: Path
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def _run_label(run_dir: Path) -> str:
    """``<name>/<stamp>`` from the run's resolved ``config.yaml`` (its ``name`` key), else the folder names."""
    config = run_dir / "config.yaml"
    name = None
    if config.is_file():
        try:
            import yaml

            name = (yaml.safe_load(config.read_text()) or {}).get("name")
        except Exception:  # an unreadable config only costs the label
            name = None
    return f"{name or run_dir.parent.name}/{run_dir.name}"


def read_run(path: str | os.PathLike, label: str | None = None) -> RunCurves:
    """Read ``metrics.csv`` of a run directory (or the CSV file itself) into step curves.

    Raises:
        FileNotFoundError: no ``metrics.csv`` there (the message names the path looked at).
    """
    path = Path(path)
    csv_path = path if path.suffix == ".csv" else path / METRICS_FILE
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: no metrics file; give a run directory written by `python -m ssl_zoo "
                                f"fit` (it holds {METRICS_FILE}) or the CSV file itself")
    run_dir = csv_path.parent
    run = RunCurves(label or _run_label(run_dir), run_dir)
    with csv_path.open(newline="") as f:
        for row in csv.DictReader(f):
            try:
                step = int(float(row.get("step") or 0))
            except ValueError:
                continue
            for key, text in row.items():
                if key in ("step", None) or text in ("", None):
                    continue
                try:
                    value = float(text)
                except ValueError:
                    continue
                if math.isfinite(value):
                    run.curves.setdefault(key, []).append((step, value))
    return run


def resolve_key(key: str, columns: Sequence[str] | set[str]) -> str | None:
    """The column that plots ``key``: itself, else its per-step values, else its epoch means."""
    for candidate in (key, key + _STEP_SUFFIX, key + _EPOCH_SUFFIX):
        if candidate in columns:
            return candidate
    return None


def _base_name(column: str) -> str:
    for suffix in (_STEP_SUFFIX, _EPOCH_SUFFIX):
        if column.endswith(suffix):
            return column[: -len(suffix)]
    return column


def default_keys(runs: Sequence[RunCurves]) -> list[str]:
    """Every learning metric of the runs (loss terms, monitors, probes), each once, in first-seen order.

    A metric logged per step and per epoch appears once (its base name, plotted per step); columns about speed
    or the schedule (throughput, skipped samples, lr) are left out.
    """
    keys: list[str] = []
    for run in runs:
        for column in run.curves:
            if column in _BOOKKEEPING or column.startswith(("lr-", "lr_")):
                continue
            base = _base_name(column)
            if base not in keys:
                keys.append(base)
    return keys


def plot_runs(runs: Sequence[RunCurves], keys: Sequence[str] | None = None, out: str | os.PathLike = CURVES_FILE,
              title: str | None = None) -> Path:
    """Draw one panel per key, one line per run, against the step; write the figure to ``out`` (PNG, PDF...).

    Raises:
        ValueError: no run logged any of ``keys`` (the message lists the keys the runs have).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    keys = list(keys) if keys else default_keys(runs)
    panels = [key for key in keys if any(resolve_key(key, run.curves) for run in runs)]
    if not panels:
        available = ", ".join(default_keys(runs)) or "none"
        raise ValueError(f"none of the keys {', '.join(keys) or '(none)'} was logged by these runs; "
                         f"logged: {available}")
    missing = [key for key in keys if key not in panels]
    if missing:
        warnings.warn(f"not logged by any run, left out: {', '.join(missing)}", stacklevel=2)
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.2 * rows), squeeze=False)
    for panel, key in zip(axes.flat, panels, strict=False):
        for run in runs:
            column = resolve_key(key, run.curves)
            if column is None:
                continue
            steps, values = zip(*run.curves[column], strict=True)
            # A few points (epoch means, monitor evaluations) are easier to read with markers.
            panel.plot(steps, values, marker="o" if len(values) <= 30 else None, markersize=3,
                       linewidth=1.2, label=run.label)
        panel.set_title(key, fontsize=10)
        panel.set_xlabel("step")
        panel.grid(alpha=0.3)
        if len(runs) > 1:
            panel.legend(fontsize=7)
    for panel in list(axes.flat)[len(panels):]:
        panel.set_visible(False)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


class CurvesPlot(Callback):
    """Writes ``curves.png`` (every logged loss term and monitor metric against the step) into the run directory
    when ``fit`` ends; rank zero only. It reads the CSV logger's ``metrics.csv``, so a run without one (e.g.
    ``fast_dev_run``, ``trainer.logger: false``) gets no figure, and a plotting failure only warns.

    Args:
        filename: figure name inside the run directory.
        keys: metrics to draw (see :func:`plot_runs`); ``None`` = all of them.
    """

    def __init__(self, filename: str = CURVES_FILE, keys: list[str] | None = None) -> None:
        self.filename = filename
        self.keys = keys

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from lightning.pytorch.loggers import CSVLogger

        csv_loggers = [logger for logger in trainer.loggers if isinstance(logger, CSVLogger)]
        if not csv_loggers:
            return
        logger = csv_loggers[0]
        logger.save()  # flush the rows logged since the last save
        metrics = Path(logger.experiment.metrics_file_path)
        if not metrics.is_file():
            return
        run_dir = Path(trainer.default_root_dir)
        try:
            run = read_run(metrics, label=_run_label(run_dir))
            if not default_keys([run]):
                return
            plot_runs([run], self.keys, run_dir / self.filename, title=run.label)
        except Exception as error:  # a figure must never fail the run it illustrates
            warnings.warn(f"{self.filename} not written ({type(error).__name__}: {error})", stacklevel=2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssl_zoo.cli.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (holding metrics.csv) or metrics.csv files")
    parser.add_argument("--keys", nargs="+", default=None,
                        help="metrics to plot, e.g. train/loss_sim knn/top1 (default: every loss and monitor)")
    parser.add_argument("--labels", nargs="+", default=None, help="legend names, one per run (default: name/stamp)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--out", default=CURVES_FILE, help=f"output figure (default: {CURVES_FILE})")
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        parser.error(f"--labels: give one per run ({len(args.runs)} runs, {len(args.labels)} labels)")
    labels = args.labels or [None] * len(args.runs)
    try:
        runs = [read_run(path, label) for path, label in zip(args.runs, labels, strict=True)]
        out = plot_runs(runs, args.keys, args.out, args.title)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
