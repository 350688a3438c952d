"""The quality benchmark's results: rows over seeds, verdicts against random init, the Markdown table, the figures
and the merge of an earlier ``quality.json`` (:mod:`benchmarks.quality` measures, this module reports)."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from benchmarks.recipes import METHODS, architecture, architecture_key

PROBES = ("knn_top1", "linear_top1", "gamp_mAP")
MIN_SEEDS = 3  # a verdict needs the mean and spread of at least this many seeds on both sides


def summarise(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = statistics.fmean(values)
    return round(mean, 2), round(statistics.stdev(values), 2) if len(values) > 1 else 0.0


def build_rows(state: dict, methods: list[str], seeds: list[int]) -> list[dict]:
    """One row per (method, probe, backbone) over the seeds that have a value, in order (an interrupted run's
    rows hold fewer seeds; :func:`verdicts` passes none with fewer than :data:`MIN_SEEDS`)."""
    rows = []
    for method in methods:
        arch = architecture_key(architecture(method))
        sources = {
            "pretrained": (state["scores"].get(method, {}), state["seconds"].get(method, {})),
            "random": (state["scores"].get(f"random/{arch}", {}), {}),
            "supervised": (state["scores"].get(f"supervised/{arch}", {}),
                           state["seconds"].get(f"supervised/{arch}", {})),
        }
        for probe in PROBES:
            for backbone, (scores, seconds) in sources.items():
                done = [s for s in seeds if scores.get(str(s), {}).get(probe) is not None]
                if not done:
                    continue
                values = [scores[str(s)][probe] for s in done]
                mean, std = summarise(values)
                rows.append({"method": method, "probe": probe, "backbone": backbone, "mean": mean, "std": std,
                             "values": values,
                             "pretrain_s": [seconds.get(str(s)) for s in done] if seconds else []})
    return rows


def verdicts(rows: list[dict]) -> list[dict]:
    """Per (method, probe): the gain over random init and whether it clears 10 points and 3x the larger std."""
    out = []
    for row in rows:
        if row["backbone"] != "pretrained":
            continue
        random = next((r for r in rows if r["backbone"] == "random" and r["method"] == row["method"]
                       and r["probe"] == row["probe"]), None)
        if random is None:
            continue
        gain = row["mean"] - random["mean"]
        bar = max(10.0, 3 * max(row["std"], random["std"]))
        seeds = min(len(row["values"]), len(random["values"]))
        out.append({"method": row["method"], "probe": row["probe"], "gain": round(gain, 2),
                    "bar": round(bar, 2), "seeds": seeds,
                    "passes": seeds >= MIN_SEEDS and gain >= 10.0 and gain > 3 * max(row["std"], random["std"]),
                    "max_pretrain_s": max((s for s in row["pretrain_s"] if s is not None), default=None)})
    return out


def markdown_table(report: dict) -> str:
    rows = report["rows"]
    lines = ["| method | probe | random init | CPU recipe | supervised | gain | passes | pretrain s (per seed) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    def fmt(row: dict | None) -> str:
        if row is None:
            return "—"
        seeds = len(row["values"])
        return f"{row['mean']:.1f} ± {row['std']:.1f}" + (f" ({seeds} seed{'s' * (seeds > 1)})" if seeds < MIN_SEEDS
                                                            else "")
    for verdict in verdicts(rows):
        find = lambda kind, v=verdict: next((r for r in rows if r["method"] == v["method"]
                                             and r["probe"] == v["probe"] and r["backbone"] == kind), None)
        pretrained = find("pretrained")
        seconds = ", ".join(f"{s:.0f}" for s in pretrained["pretrain_s"] if s is not None)
        limited = sorted(s for s, hit in report.get("stopped_at_time_limit", {}).get(verdict["method"], {}).items()
                         if hit and (not report.get("seeds") or int(s) in report["seeds"]))
        if limited:  # trained fewer steps than the recipe: the wall-clock guard ended it, not the schedule
            seconds += f" (seed{'s' * (len(limited) > 1)} {', '.join(limited)} stopped at max_time)"
        passes = "yes" if verdict["passes"] else "no"
        if verdict["seeds"] < MIN_SEEDS:
            passes += f" ({verdict['seeds']} seed{'s' if verdict['seeds'] > 1 else ''})"
        lines.append(f"| {verdict['method']} | {verdict['probe']} | {fmt(find('random'))} | {fmt(pretrained)} | "
                     f"{fmt(find('supervised'))} | {verdict['gain']:+.1f} | {passes} | {seconds} |")
    origins: dict[tuple, list[str]] = {}  # methods taken from earlier files (--merge), grouped by origin
    for method, origin in report.get("merged", {}).items():
        origins.setdefault((origin.get("measured"), origin.get("command"), origin.get("file")), []).append(method)
    for (measured, command, file), methods in origins.items():
        lines.append(f"\nRows of {', '.join(methods)}: measured {measured} (`{command}`), taken from {file}.")
    return "\n".join(lines)


def draw_figures(report: dict, state: dict, methods: list[str], figures: Path) -> list[Path]:
    """One PNG per method: its kNN monitor against the step (mean, min-max over seeds), random and supervised
    as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ssl_zoo.plot import read_run, resolve_key

    written = []
    for method in methods:
        curves = []
        key = state["monitor_keys"].get(method)
        for _seed, run_dir in sorted(state["runs"].get(method, {}).items()):
            run = read_run(run_dir)
            column = resolve_key(key, run.curves) if key else None
            if column:
                curves.append(dict(run.curves[column]))
        if not curves:
            continue
        steps = sorted(set().union(*curves))
        figure, axis = plt.subplots(figsize=(5.2, 3.4))
        common = [s for s in steps if all(s in c for c in curves)]
        mean = [statistics.fmean(c[s] for c in curves) for s in common]
        axis.plot(common, mean, marker="o", markersize=3, label=f"{method} CPU recipe (mean of {len(curves)} seeds)")
        axis.fill_between(common, [min(c[s] for c in curves) for s in common],
                          [max(c[s] for c in curves) for s in common], alpha=0.2)
        arch = architecture_key(architecture(method))
        for kind, style in (("random", ":"), ("supervised", "--")):
            values = [v for v in state["monitor_lines"].get(f"{kind}/{arch}/{method}", {}).values() if v is not None]
            if values:
                axis.axhline(statistics.fmean(values), linestyle=style, color="grey" if kind == "random" else "black",
                             label=f"{kind} ({statistics.fmean(values):.1f})")
        axis.set_xlabel("pre-training step")
        axis.set_ylabel(key)
        axis.set_title(f"{method}: kNN monitor during pre-training\n{arch}", fontsize=8)  # long keys: own line
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        figure.tight_layout()
        out = figures / f"quality_{method}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, dpi=110)
        plt.close(figure)
        written.append(out)
    return written


#: ``<random|supervised>/<architecture>``), carried over with the rows by :func:`merge_report`.
_PER_RUN_KEYS = ("teachers", "pretrain_cpu_s_and_load", "stopped_at_time_limit")


def merge_report(report: dict, earlier: str | os.PathLike) -> list[str]:
    """Add to ``report`` the methods that an earlier ``quality.json`` measured and ``report`` did not (no row of
    that method's pre-trained runs here): their rows (their baselines' included), curves, teachers, times and
    time-limit flags, each method's origin under ``report["merged"]`` (the file, its measurement date and command;
    a method the earlier file had itself merged keeps its first origin). A method measured in both keeps this report's rows: a rerun of some methods
    (e.g. after their recipe changed) replaces only those. Returns the methods taken over."""
    path = Path(earlier)
    if not path.is_file():
        raise FileNotFoundError(f"--merge {earlier}: no such file (an earlier quality.json)")
    old = json.loads(path.read_text())
    if "rows" not in old:
        raise ValueError(f"--merge {earlier}: not a quality.json (no 'rows' key)")
    # Measured here: a method with rows of its own pre-trained runs. Baseline rows alone do not count: random
    # init and the ceiling are shared by every recipe of an architecture, so a rerun of one ResNet method
    # writes baseline rows for all the others.
    measured = {row["method"] for row in report["rows"] if row["backbone"] == "pretrained"}
    taken = [m for m in dict.fromkeys(row["method"] for row in old["rows"]) if m not in measured]
    if not taken:
        return []
    # A taken method comes with its own baselines, measured with its runs.
    report["rows"] = ([row for row in report["rows"] if row["method"] not in taken]
                      + [row for row in old["rows"] if row["method"] in taken])
    report["rows"].sort(key=lambda row: METHODS.index(row["method"]) if row["method"] in METHODS else len(METHODS))
    report["verdicts"] = verdicts(report["rows"])
    report["methods"] = [m for m in METHODS if m in set(report["methods"]) | set(taken)]
    origin = {"file": str(earlier), "measured": old.get("machine", {}).get("date"), "command": old.get("command")}
    merged = report.setdefault("merged", {})
    for method in taken:
        merged[method] = old.get("merged", {}).get(method, origin)
        report.setdefault("curves", {})[method] = old.get("curves", {}).get(method)
    # A taken method's entries come with its rows; a baseline's (``random/<arch>``, ``supervised/<arch>``) only
    # where this report has none.
    for key in _PER_RUN_KEYS:
        entries = report.setdefault(key, {})
        for name, value in old.get(key, {}).items():
            if name in taken:
                entries[name] = value
            elif "/" in name:
                entries.setdefault(name, value)
    return taken
