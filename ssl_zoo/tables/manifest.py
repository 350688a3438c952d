"""The manifest format: ``experiments/<method>/tables.yaml``, the papers' tables as runnable recipes.

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
``note`` (a reading of the paper worth recording next to the row), ``extension`` (why the project runs a row
the paper does not print: such a row has no ``paper`` numbers and is marked as the project's own in every
rendering). A row with neither ``pretrain`` nor ``checkpoint`` evaluates a randomly initialised backbone.

``paper`` cells are the numbers as printed (a number each); a column the paper leaves blank for a row is left
out of that row's mapping. ``null`` marks a cell not yet copied from the paper: the manifest still loads (so
its rows can run), and :func:`unfilled_cells` lists every such cell (``tests/tables/test_manifest.py`` requires none).

Special ``settings`` keys, derived from the resolved config:

* ``global_batch`` = ``trainer.devices`` x ``trainer.num_nodes`` x ``data.init_args.batch_size`` x
  ``trainer.accumulate_grad_batches`` (images per optimiser step);
* ``lr`` = ``model.init_args.base_lr`` x (``lr_batch_size`` or ``global_batch``) / (``lr_reference`` or 256),
  the peak learning rate the method's linear scaling rule gives.

``python -m ssl_zoo.tables experiments/bam_ia/tables.yaml`` prints every table as Markdown with the exact
commands of each row; ``--runs runs/`` puts the numbers measured by those commands (from the run
directories' ``eval.json``) beside the paper's, with their difference (ours - paper), and marks the rows not
yet run; ``--format csv|json`` writes the same comparison for a report; ``--check`` resolves every row's
config chain through the CLI parser and verifies its ``settings`` (what ``tests/tables/test_manifest.py`` does).
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Manifest", "ManifestError", "Row", "Table", "check_manifest", "load_manifest", "config_args",
           "resolve_chain", "run_name", "setting_value", "unfilled_cells"]

ROW_KEYS = {"name", "pretrain", "eval", "paper", "settings", "pretrain_args", "eval_args", "eval_settings",
            "checkpoint", "run_name", "note", "extension"}
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
    extension: str | None = None


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
                extension=r.get("extension"),
            )
            if row.extension is not None:
                if not isinstance(row.extension, str) or not row.extension.strip():
                    raise ManifestError(f"{where}: 'extension' says why the project runs a row the paper does "
                                        "not print (a sentence)")
                if row.paper:
                    raise ManifestError(f"{where}: an 'extension' row is not in the paper, so it has no 'paper' "
                                        "numbers; drop one of the two")
            elif not row.paper:
                raise ManifestError(f"{where}: 'paper' must give the number(s) the paper printed (or mark the "
                                    "row 'extension: <why>' when the paper does not print it)")
            for metric, value in row.paper.items():
                if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                    raise ManifestError(f"{where}: paper cell '{metric}' must be the printed number, got {value!r}")
            if row.pretrain and row.checkpoint:
                raise ManifestError(f"{where}: give 'pretrain' or 'checkpoint', not both")
            if row.settings and not row.pretrain:
                raise ManifestError(f"{where}: 'settings' are checked on the pre-training chain, which is empty")
            if row.eval_settings and not row.eval:
                raise ManifestError(f"{where}: 'eval_settings' given without 'eval' configs")
            rows.append(row)
        tables.append(Table(id=t["id"], caption=str(t.get("caption", "")), rows=tuple(rows), note=t.get("note")))
    return Manifest(path=path, paper=doc["paper"], tables=tuple(tables), note=doc.get("note"))


def unfilled_cells(manifest: Manifest) -> list[str]:
    """Every ``paper`` cell still ``null`` (not yet copied from the paper), as '<file>: <table>, row: metric'."""
    return [f"{manifest.path}: {table.id}, row '{row.name}': {metric}"
            for table, row in manifest.rows() for metric, value in row.paper.items() if value is None]


# ---------------------------------------------------------------------- resolving config chains
def config_args(configs: Sequence[str], args: Sequence[str]) -> list[str]:
    """``--config c1 --config c2 ... args``: the command-line form of a config chain."""
    return [item for config in configs for item in ("--config", config)] + list(args)


@functools.cache
def _resolve_cached(configs: tuple[str, ...], args: tuple[str, ...], root: str) -> str:
    from ssl_zoo.cli import main

    paths = [str(Path(root) / c) for c in configs]
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LightningCLI warns that the caller's own sys.argv is ignored
            main(["fit", *config_args(paths, args), "--print_config"])
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
