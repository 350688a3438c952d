"""Measured beside printed: each manifest row's commands, the numbers its runs measured, and the report.

``python -m ssl_zoo.tables MANIFEST [--runs runs/] [--format md|csv|json] [--out FILE] [--check]``. With
``--runs`` every paper cell gets the measured value (the newest ``eval.json`` record of the row's runs) and the
difference ours - paper; rows not run yet and the project's own extension rows are marked as such.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shlex
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ssl_zoo.tables.manifest import (
    Manifest,
    ManifestError,
    Row,
    Table,
    check_manifest,
    config_args,
    load_manifest,
    run_name,
)

__all__ = ["Comparison", "compare", "main", "measured_metrics", "render_csv", "render_json", "render_markdown",
           "row_commands"]

EXTENSION_MARK = "(extension)"


# ---------------------------------------------------------------------- commands
def _eval_subcommand(eval_chain: Sequence[str], root: str | Path) -> str:
    """``validate`` for the kNN protocol (nothing to train), ``fit`` for every other evaluation."""
    for config in eval_chain:
        if not (Path(root) / config).is_file():  # reported by --check; the command is still printed
            continue
        model = (yaml.safe_load((Path(root) / config).read_text()) or {}).get("model") or {}
        if str(model.get("class_path", "")).endswith("KNNProbe"):
            return "validate"
    return "fit"


def _quote(args: Iterable[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def row_commands(row: Row, root: str | Path = ".") -> list[str]:
    """The shell commands that reproduce the row: pre-training (if any), then each evaluation."""
    commands = []
    name = run_name(row, root)
    if row.pretrain:
        extra = [*row.pretrain_args, *(["--name", row.run_name] if row.run_name else [])]
        commands.append(f"python -m ssl_zoo fit {_quote(config_args(row.pretrain, extra))}")
    if row.eval:
        if row.pretrain:
            ckpt = f'"$(ls -td runs/{name}/*/ | head -1)checkpoints/last.ckpt"'
        elif row.checkpoint:
            ckpt = shlex.quote(row.checkpoint)
        else:
            ckpt = None  # a randomly initialised backbone
        ckpt_arg = f" --model.init_args.ckpt {ckpt}" if ckpt else ""
        commands.append(f"python -m ssl_zoo {_eval_subcommand(row.eval, root)} "
                        f"{_quote(config_args(row.eval, row.eval_args))}{ckpt_arg}")
    return commands


# ---------------------------------------------------------------------- measured numbers
def _eval_names(row: Row, root: str | Path) -> set[str]:
    names = set()
    for config in row.eval:
        if not (Path(root) / config).is_file():
            continue
        doc = yaml.safe_load((Path(root) / config).read_text()) or {}
        if doc.get("name"):
            names.add(str(doc["name"]))
    return names


def _records_for(row: Row, runs: Path, root: str | Path) -> list[dict[str, Any]]:
    """``eval.json`` records of the row's evaluation runs, oldest first."""
    from ssl_zoo.eval.results import RESULTS_FILE, read_eval_records, results_file_for

    if row.pretrain:
        name = run_name(row, root)
        files = sorted((runs / name).glob(f"*/{RESULTS_FILE}")) if name else []
    elif row.checkpoint and not row.checkpoint.startswith("<"):
        files = [results_file_for(row.checkpoint, runs)]
    else:  # random init: the record lives in the evaluation run's own directory
        files = sorted(f for n in _eval_names(row, root) for f in (runs / n).glob(f"*/{RESULTS_FILE}"))
    wanted = _eval_names(row, root)
    records = []
    for file in files:
        for record in read_eval_records(file):
            eval_dir = Path(record.get("eval_run_dir") or "")
            if not wanted or eval_dir.parent.name in wanted:
                records.append(record)
    return sorted(records, key=lambda r: str(r.get("date", "")))


def measured_metrics(row: Row, runs: str | Path, root: str | Path = ".",
                     metrics: Sequence[str] | None = None) -> dict[str, float]:
    """The newest measured value of each of ``metrics`` (default: the row's paper columns); empty when the
    row has not run."""
    wanted = list(row.paper) if metrics is None else list(metrics)
    found: dict[str, float] = {}
    for record in _records_for(row, Path(runs), root):
        values = record.get("metrics") or {}
        for key in wanted:
            for candidate in (key, f"val/{key}"):
                if values.get(candidate) is not None:
                    found[key] = values[candidate]
    return found


# ---------------------------------------------------------------------- the comparison
@dataclass(frozen=True)
class Comparison:
    """One row of a table, printed beside measured: ``cells[metric] = (paper, ours, ours - paper)``."""

    table: str
    row: str
    extension: str | None
    status: str
    cells: dict[str, tuple[float | None, float | None, float | None]] = field(default_factory=dict)
    note: str | None = None
    commands: list[str] = field(default_factory=list)


def _status(row: Row, got: dict[str, float], measured: bool) -> str:
    if not measured:
        return ""
    if not row.eval:
        return "no evaluation config"
    if not got:
        return "not yet run"
    missing = [m for m in row.paper if m not in got]
    return f"partly measured (no {', '.join(missing)})" if missing else "measured"


def _table_metrics(table: Table) -> list[str]:
    metrics: list[str] = []
    for row in table.rows:
        metrics += [m for m in row.paper if m not in metrics]
    return metrics


def compare(manifest: Manifest, runs: str | Path | None = None, root: str | Path = ".") -> list[Comparison]:
    """Every row of every table: its paper numbers, the measured ones (with ``runs``) and their difference.

    An extension row is compared on its table's metrics (it has no paper numbers, only measured ones)."""
    out = []
    for table in manifest.tables:
        table_metrics = _table_metrics(table)
        for row in table.rows:
            metrics = list(row.paper) if row.paper else table_metrics
            got = measured_metrics(row, runs, root, metrics) if runs is not None else {}
            cells = {}
            for m in metrics:
                paper, ours = row.paper.get(m), got.get(m)
                diff = ours - paper if paper is not None and ours is not None else None
                cells[m] = (paper, ours, diff)
            status = _status(row, got, runs is not None)
            if row.extension and runs is not None and row.eval and got:
                status = "measured"
            out.append(Comparison(table=table.id, row=row.name, extension=row.extension, status=status,
                                  cells=cells, note=row.note, commands=row_commands(row, root)))
    return out


# ---------------------------------------------------------------------- renderings
def _fmt(value: Any, signed: bool = False) -> str:
    """A number as a table shows it: two decimals at most, trailing zeros dropped; ``signed`` adds the sign."""
    if value is None:
        return ""
    if abs(value) >= 1000:
        return f"{value:+.0f}" if signed else f"{value:.0f}"
    text = f"{value:+.2f}" if signed else f"{value:.2f}"
    text = text.rstrip("0").rstrip(".")
    return "0" if text in ("+0", "-0") else text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _row_label(c: Comparison) -> str:
    return f"{c.row} {EXTENSION_MARK}" if c.extension else c.row


def render_markdown(manifest: Manifest, runs: str | Path | None = None, root: str | Path = ".") -> str:
    """Every table of the manifest as Markdown: paper numbers (with ``runs``: ours and the difference
    ours - paper, and a status), then the commands of each row."""
    comparisons = compare(manifest, runs, root)
    measured = runs is not None
    lines = [f"# {manifest.paper}", ""]
    if manifest.note:
        lines += [manifest.note.strip(), ""]
    for table in manifest.tables:
        rows = [c for c in comparisons if c.table == table.id]
        metrics = _table_metrics(table)
        header = ["row"]
        for m in metrics:
            header += [f"{m} (paper)"] + ([f"{m} (ours)", f"{m} (diff)"] if measured else [])
        if measured:
            header.append("status")
        lines += [f"## {table.id}: {table.caption}".rstrip(": "), ""]
        if table.note:
            lines += [table.note.strip(), ""]
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for c in rows:
            cells = [_cell(_row_label(c))]
            for m in metrics:
                paper, ours, diff = c.cells.get(m, (None, None, None))
                cells.append(_fmt(paper))
                if measured:
                    cells += [_fmt(ours), _fmt(diff, signed=True)]
            if measured:
                cells.append(c.status)
            lines.append("| " + " | ".join(cells) + " |")
        if any(c.extension for c in rows):
            lines += ["", f"{EXTENSION_MARK}: a row the paper does not print, run by this project: "
                      + "; ".join(f"{c.row}: {c.extension.strip()}" for c in rows if c.extension)]
        lines += ["", "Commands:", ""]
        for c in rows:
            lines.append(f"- **{_cell(_row_label(c))}**" + (f" ({c.note.strip()})" if c.note else ""))
            if c.commands:
                lines += ["  ```bash", *[f"  {command}" for command in c.commands], "  ```"]
            else:
                lines.append("  (numbers from the paper only: no runnable configuration)")
        lines.append("")
    return "\n".join(lines)


CSV_COLUMNS = ("table", "row", "extension", "metric", "paper", "ours", "diff", "status")


def render_csv(manifest: Manifest, runs: str | Path | None = None, root: str | Path = ".") -> str:
    """One line per (table, row, metric): paper, ours, diff (ours - paper) and the row's status."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for c in compare(manifest, runs, root):
        for metric, (paper, ours, diff) in c.cells.items():
            writer.writerow([c.table, c.row, "yes" if c.extension else "", metric,
                             *("" if v is None else v for v in (paper, ours, diff)), c.status])
    return buffer.getvalue()


def render_json(manifest: Manifest, runs: str | Path | None = None, root: str | Path = ".") -> str:
    """The comparison as JSON: a list of rows, each with its cells as ``{metric: {paper, ours, diff}}``."""
    rows = []
    for c in compare(manifest, runs, root):
        record = asdict(c)
        record["cells"] = {m: dict(zip(("paper", "ours", "diff"), v, strict=True)) for m, v in c.cells.items()}
        rows.append(record)
    return json.dumps({"paper": manifest.paper, "manifest": str(manifest.path), "rows": rows}, indent=2)


RENDERERS = {"md": render_markdown, "csv": render_csv, "json": render_json}


# ---------------------------------------------------------------------- command line
def _repo_root(manifest_path: Path) -> Path:
    """The directory holding ``experiments/`` (manifest paths are relative to it)."""
    for parent in manifest_path.resolve().parents:
        if (parent / "experiments").is_dir():
            return parent
    return Path.cwd()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ssl_zoo.tables",
        description="Print a paper's tables (experiments/<method>/tables.yaml) with the command of every row, "
                    "and with --runs the measured numbers beside the printed ones.")
    parser.add_argument("manifests", nargs="+", type=Path, help="tables.yaml file(s)")
    parser.add_argument("--runs", type=Path, default=None,
                        help="run root (e.g. runs/): measured numbers from the runs' eval.json, and ours - paper")
    parser.add_argument("--format", choices=sorted(RENDERERS), default="md",
                        help="md (default): tables and commands; csv: one line per row and metric; json")
    parser.add_argument("--out", type=Path, default=None, help="write the report to this file instead of stdout")
    parser.add_argument("--check", action="store_true",
                        help="resolve every row's configs through the CLI parser and verify its settings")
    args = parser.parse_args(argv)
    status, reports = 0, []
    for path in args.manifests:
        try:
            manifest = load_manifest(path)
        except ManifestError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        root = _repo_root(path)
        if args.check:
            problems = check_manifest(manifest, root)
            for problem in problems:
                print(f"error: {problem}", file=sys.stderr)
            status = status or (1 if problems else 0)
            rows = sum(len(t.rows) for t in manifest.tables)
            print(f"{path}: {len(manifest.tables)} tables, {rows} rows, {len(problems)} problem(s)", file=sys.stderr)
            continue
        reports.append(RENDERERS[args.format](manifest, args.runs, root))
    if reports:
        if args.format == "csv":  # one header for every manifest
            text = reports[0] + "".join(r.split("\n", 1)[1] for r in reports[1:])
        elif args.format == "json":
            text = reports[0] if len(reports) == 1 else "[\n" + ",\n".join(reports) + "\n]"
        else:
            text = "\n".join(reports)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text if text.endswith("\n") else text + "\n")
            print(f"wrote {args.out}", file=sys.stderr)
        else:
            print(text)
    return status
