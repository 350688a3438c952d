"""The papers' tables as runnable recipes: ``experiments/<method>/tables.yaml`` manifests.

A manifest lists every numeric table (and figure) of a method's paper, row by row, with the config chain
that pre-trains the row, the evaluation configs that score it, the numbers the paper printed, and the
settings the paper used, which a test checks against the resolved config chain::

    paper: <title>
    tables:
      - id: Table 4
        caption: <the paper's caption, shortened>
        rows:
          - name: gamma=0.3
            pretrain: [experiments/bam_ia/r50_coco_paper.yaml, experiments/bam_ia/ablations/overlap_0.3.yaml]
            eval: [experiments/eval/gamp_coco_224.yaml]
            paper: {mAP: 61.3}
            settings: {trainer.max_epochs: 100, model.init_args.ia_loss: none, global_batch: 128}

Optional row keys: ``pretrain_args`` / ``eval_args`` (extra command-line overrides, lists of strings),
``eval_settings`` (settings checked on the resolved evaluation chain), ``checkpoint`` (a published
checkpoint evaluated instead of pre-training here, e.g. SimSiam's ImageNet weights: a path or a
``<placeholder>``), ``run_name`` (the pre-training run's name when the chain's own ``name`` is shared),
``note`` (a reading of the paper worth recording next to the row). A row with neither ``pretrain`` nor
``checkpoint`` evaluates a randomly initialised backbone.

Special ``settings`` keys, derived from the resolved config:

* ``global_batch`` = ``trainer.devices`` x ``trainer.num_nodes`` x ``data.init_args.batch_size`` x
  ``trainer.accumulate_grad_batches`` (images per optimiser step);
* ``lr`` = ``model.init_args.base_lr`` x (``lr_batch_size`` or ``global_batch``) / (``lr_reference`` or 256),
  the peak learning rate the method's linear scaling rule gives.

``python -m ssl_zoo.tables experiments/bam_ia/tables.yaml`` prints every table as Markdown with the exact
commands of each row; ``--runs runs/`` fills in the numbers measured by those commands (from the run
directories' ``eval.json``) beside the paper's and marks the rows not yet run; ``--check`` resolves every
row's config chain through the CLI parser and verifies its ``settings`` (what ``tests/test_tables.py`` does).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import shlex
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Manifest", "Row", "Table", "check_manifest", "load_manifest", "main", "render_markdown",
           "resolve_chain", "setting_value"]

ROW_KEYS = {"name", "pretrain", "eval", "paper", "settings", "pretrain_args", "eval_args", "eval_settings",
            "checkpoint", "run_name", "note"}
TABLE_KEYS = {"id", "caption", "rows", "note"}
MANIFEST_KEYS = {"paper", "tables", "note"}
DERIVED_SETTINGS = ("global_batch", "lr")


class ManifestError(ValueError):
    """A malformed manifest; the message names the file and the table / row at fault."""


@dataclass(frozen=True)
class Row:
    name: str
    pretrain: tuple[str, ...] = ()
    eval: tuple[str, ...] = ()
    paper: Mapping[str, Any] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    pretrain_args: tuple[str, ...] = ()
    eval_args: tuple[str, ...] = ()
    eval_settings: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    run_name: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class Table:
    id: str
    caption: str
    rows: tuple[Row, ...]
    note: str | None = None


@dataclass(frozen=True)
class Manifest:
    path: Path
    paper: str
    tables: tuple[Table, ...]
    note: str | None = None

    def rows(self) -> Iterable[tuple[Table, Row]]:
        for table in self.tables:
            for row in table.rows:
                yield table, row


# ---------------------------------------------------------------------- loading
def _string_list(value: Any, where: str, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ManifestError(f"{where}: '{key}' must be a list of strings, got {value!r}")
    return tuple(value)


def _mapping(value: Any, where: str, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: '{key}' must be a mapping, got {value!r}")
    return {str(k): v for k, v in value.items()}


def _unknown_keys(entry: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a ``tables.yaml``; errors name the file, the table and the row at fault."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"manifest '{path}' does not exist") from None
    except yaml.YAMLError as err:
        raise ManifestError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{path}: expected a mapping with 'paper' and 'tables'")
    _unknown_keys(doc, MANIFEST_KEYS, str(path))
    if not isinstance(doc.get("paper"), str) or not isinstance(doc.get("tables"), list) or not doc["tables"]:
        raise ManifestError(f"{path}: needs 'paper: <title>' and a non-empty 'tables:' list")
    tables, seen_ids = [], set()
    for t_index, t in enumerate(doc["tables"]):
        where_t = f"{path}: tables[{t_index}]"
        if not isinstance(t, dict) or not isinstance(t.get("id"), str) or not isinstance(t.get("rows"), list):
            raise ManifestError(f"{where_t}: needs 'id: <Table N>', 'caption' and a 'rows:' list")
        _unknown_keys(t, TABLE_KEYS, where_t)
        where_t = f"{path}: {t['id']}"
        if t["id"] in seen_ids:
            raise ManifestError(f"{where_t}: table id given twice")
        seen_ids.add(t["id"])
        if not t["rows"]:
            raise ManifestError(f"{where_t}: has no rows")
        rows, seen_rows = [], set()
        for r_index, r in enumerate(t["rows"]):
            if not isinstance(r, dict) or not isinstance(r.get("name"), str | int | float):
                raise ManifestError(f"{where_t}: rows[{r_index}] needs a 'name'")
            where = f"{where_t}, row '{r['name']}'"
            _unknown_keys(r, ROW_KEYS, where)
            if str(r["name"]) in seen_rows:
                raise ManifestError(f"{where}: row name given twice in this table")
            seen_rows.add(str(r["name"]))
            row = Row(
                name=str(r["name"]),
                pretrain=_string_list(r.get("pretrain"), where, "pretrain"),
                eval=_string_list(r.get("eval"), where, "eval"),
                paper=_mapping(r.get("paper"), where, "paper"),
                settings=_mapping(r.get("settings"), where, "settings"),
                pretrain_args=_string_list(r.get("pretrain_args"), where, "pretrain_args"),
                eval_args=_string_list(r.get("eval_args"), where, "eval_args"),
                eval_settings=_mapping(r.get("eval_settings"), where, "eval_settings"),
                checkpoint=r.get("checkpoint"),
                run_name=r.get("run_name"),
                note=r.get("note"),
            )
            if not row.paper:
                raise ManifestError(f"{where}: 'paper' must give the number(s) the paper printed")
            if row.pretrain and row.checkpoint:
                raise ManifestError(f"{where}: give 'pretrain' or 'checkpoint', not both")
            if row.settings and not row.pretrain:
                raise ManifestError(f"{where}: 'settings' are checked on the pre-training chain, which is empty")
            if row.eval_settings and not row.eval:
                raise ManifestError(f"{where}: 'eval_settings' given without 'eval' configs")
            rows.append(row)
        tables.append(Table(id=t["id"], caption=str(t.get("caption", "")), rows=tuple(rows), note=t.get("note")))
    return Manifest(path=path, paper=doc["paper"], tables=tuple(tables), note=doc.get("note"))


# ---------------------------------------------------------------------- resolving config chains
def _config_args(configs: Sequence[str], args: Sequence[str]) -> list[str]:
    return [item for config in configs for item in ("--config", config)] + list(args)


@functools.cache
def _resolve_cached(configs: tuple[str, ...], args: tuple[str, ...], root: str) -> str:
    from ssl_zoo.cli import main

    paths = [str(Path(root) / c) for c in configs]
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LightningCLI warns that the caller's own sys.argv is ignored
            main(["fit", *_config_args(paths, args), "--print_config"])
    except SystemExit as exit_info:
        if exit_info.code not in (0, None):
            raise ManifestError(f"config chain {list(configs)} {list(args)} does not parse:\n"
                                f"{err.getvalue().strip()}") from None
    return out.getvalue()


def resolve_chain(configs: Sequence[str], args: Sequence[str] = (), root: str | Path = ".") -> dict[str, Any]:
    """The fully resolved config of ``--config c1 --config c2 ... args`` as the CLI parser builds it."""
    missing = [c for c in configs if not (Path(root) / c).is_file()]
    if missing:
        raise ManifestError(f"config file(s) {missing} do not exist")
    return yaml.safe_load(_resolve_cached(tuple(configs), tuple(args), str(Path(root).resolve())))


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def _global_batch(config: Mapping[str, Any]) -> int:
    trainer = config["trainer"]
    devices = trainer.get("devices")
    if not isinstance(devices, int):
        if isinstance(devices, list):
            devices = len(devices)
        elif isinstance(devices, str) and devices.isdigit():
            devices = int(devices)
        else:
            raise KeyError(f"trainer.devices is {devices!r}; a paper config states the number of devices")
    nodes = trainer.get("num_nodes") or 1
    accumulate = trainer.get("accumulate_grad_batches") or 1
    return devices * nodes * int(_lookup(config, "data.init_args.batch_size")) * accumulate


def setting_value(config: Mapping[str, Any], key: str) -> Any:
    """A setting of the resolved config: a dotted key (``model.init_args.lam``) or a derived one
    (``global_batch``, ``lr``; see the module docstring). Raises ``KeyError`` naming what is missing."""
    if key == "global_batch":
        return _global_batch(config)
    if key == "lr":
        init = _lookup(config, "model.init_args")
        if init.get("base_lr") is None:
            raise KeyError("model.init_args.base_lr is not set in the resolved config (state it to check 'lr')")
        batch = init.get("lr_batch_size") or _global_batch(config)
        return init["base_lr"] * batch / (init.get("lr_reference") or 256)
    return _lookup(config, key)


def _same(expected: Any, actual: Any) -> bool:
    if isinstance(expected, bool) or isinstance(actual, bool):
        return expected is actual or expected == actual and type(expected) is type(actual)
    if isinstance(expected, int | float) and isinstance(actual, int | float):
        return abs(expected - actual) <= 1e-9 * max(1.0, abs(expected))
    if isinstance(expected, list | tuple) and isinstance(actual, list | tuple):
        return len(expected) == len(actual) and all(_same(e, a) for e, a in zip(expected, actual, strict=True))
    if isinstance(expected, Mapping) and isinstance(actual, Mapping):
        return all(k in actual and _same(v, actual[k]) for k, v in expected.items())
    return expected == actual


def _check_settings(config: Mapping[str, Any], settings: Mapping[str, Any], where: str) -> list[str]:
    problems = []
    for key, expected in settings.items():
        try:
            actual = setting_value(config, key)
        except KeyError as err:
            problems.append(f"{where}: setting '{key}' not found in the resolved config ({err.args[0]})")
            continue
        if not _same(expected, actual):
            problems.append(f"{where}: setting '{key}' is {actual!r} in the resolved config, the paper used "
                            f"{expected!r}")
    return problems


def run_name(row: Row, root: str | Path = ".") -> str | None:
    """The name of the row's pre-training run (``runs/<name>/<stamp>/``): ``run_name`` or the chain's ``name``."""
    if row.run_name:
        return row.run_name
    if not row.pretrain:
        return None
    return resolve_chain(row.pretrain, row.pretrain_args, root).get("name")


def check_manifest(manifest: Manifest, root: str | Path = ".") -> list[str]:
    """Every problem of a manifest: missing configs, chains that do not parse, settings that do not hold,
    two different pre-training chains sharing one run name. Empty when the manifest is sound."""
    problems: list[str] = []
    chains_by_name: dict[str, tuple] = {}
    for table, row in manifest.rows():
        where = f"{manifest.path}: {table.id}, row '{row.name}'"
        for config in (*row.pretrain, *row.eval):
            if not (Path(root) / config).is_file():
                problems.append(f"{where}: config '{config}' does not exist")
        if any(not (Path(root) / c).is_file() for c in (*row.pretrain, *row.eval)):
            continue
        try:
            if row.pretrain:
                resolved = resolve_chain(row.pretrain, row.pretrain_args, root)
                problems += _check_settings(resolved, row.settings, where)
                name = row.run_name or resolved.get("name")
                chain = (row.pretrain, row.pretrain_args)
                if chains_by_name.setdefault(name, chain) != chain:
                    problems.append(f"{where}: run name '{name}' is shared with another pre-training chain "
                                    f"{list(chains_by_name[name][0])}; give the overlay its own 'name' "
                                    "(or the row a 'run_name')")
            if row.eval:
                resolved_eval = resolve_chain(row.eval, row.eval_args, root)
                problems += _check_settings(resolved_eval, row.eval_settings, f"{where} (eval)")
        except ManifestError as err:
            problems.append(f"{where}: {err}")
    return problems


# ---------------------------------------------------------------------- commands and measured numbers
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
        commands.append(f"python -m ssl_zoo fit {_quote(_config_args(row.pretrain, extra))}")
    if row.eval:
        if row.pretrain:
            ckpt = f'"$(ls -td runs/{name}/*/ | head -1)checkpoints/last.ckpt"'
        elif row.checkpoint:
            ckpt = shlex.quote(row.checkpoint)
        else:
            ckpt = None  # a randomly initialised backbone
        ckpt_arg = f" --model.init_args.ckpt {ckpt}" if ckpt else ""
        commands.append(f"python -m ssl_zoo {_eval_subcommand(row.eval, root)} "
                        f"{_quote(_config_args(row.eval, row.eval_args))}{ckpt_arg}")
    return commands


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


def measured_metrics(row: Row, runs: str | Path, root: str | Path = ".") -> dict[str, float]:
    """The newest measured value of each of the row's paper metrics (empty when the row has not run)."""
    found: dict[str, float] = {}
    for record in _records_for(row, Path(runs), root):
        metrics = record.get("metrics") or {}
        for key in row.paper:
            for candidate in (key, f"val/{key}"):
                if metrics.get(candidate) is not None:
                    found[key] = metrics[candidate]
    return found


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(manifest: Manifest, runs: str | Path | None = None, root: str | Path = ".") -> str:
    """Every table of the manifest as Markdown: paper numbers (and measured ones with ``runs``), then the
    commands of each row."""
    lines = [f"# {manifest.paper}", ""]
    if manifest.note:
        lines += [manifest.note.strip(), ""]
    for table in manifest.tables:
        metrics: list[str] = []
        for row in table.rows:
            metrics += [m for m in row.paper if m not in metrics]
        header = ["row"]
        for m in metrics:
            header += [f"{m} (paper)"] + ([f"{m} (ours)"] if runs is not None else [])
        if runs is not None:
            header.append("status")
        lines += [f"## {table.id}: {table.caption}".rstrip(": "), ""]
        if table.note:
            lines += [table.note.strip(), ""]
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for row in table.rows:
            got = measured_metrics(row, runs, root) if runs is not None else {}
            cells = [_cell(row.name)]
            for m in metrics:
                cells.append(_cell(_fmt(row.paper.get(m))))
                if runs is not None:
                    cells.append(_fmt(got.get(m)))
            if runs is not None:
                if not row.eval:
                    status = "no evaluation config"
                else:
                    status = "measured" if got else "not yet run"
                cells.append(status)
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Commands:", ""]
        for row in table.rows:
            commands = row_commands(row, root)
            lines.append(f"- **{_cell(row.name)}**" + (f" ({row.note.strip()})" if row.note else ""))
            if commands:
                lines += ["  ```bash", *[f"  {c}" for c in commands], "  ```"]
            else:
                lines.append("  (numbers from the paper only: no runnable configuration)")
        lines.append("")
    return "\n".join(lines)


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
        description="Print a paper's tables (experiments/<method>/tables.yaml) with the command of every row.")
    parser.add_argument("manifests", nargs="+", type=Path, help="tables.yaml file(s)")
    parser.add_argument("--runs", type=Path, default=None,
                        help="run root (e.g. runs/): fill in measured numbers from the runs' eval.json")
    parser.add_argument("--check", action="store_true",
                        help="resolve every row's configs through the CLI parser and verify its settings")
    parser.add_argument("--json", action="store_true", help="print the rows with commands as JSON instead")
    args = parser.parse_args(argv)
    status = 0
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
        if args.json:
            out = [{"table": t.id, "row": r.name, "paper": dict(r.paper), "commands": row_commands(r, root),
                    **({"measured": measured_metrics(r, args.runs, root)} if args.runs else {})}
                   for t, r in manifest.rows()]
            print(json.dumps(out, indent=2))
        else:
            print(render_markdown(manifest, args.runs, root))
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
