"""The quality benchmark's results: rows over seeds, verdicts against random init, the Markdown table, the figures
and the merge of an earlier ``quality.json`` (:mod:`benchmarks.quality` measures, this module reports)."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from benchmarks.recipes import METHODS, PEER, architecture, architecture_key

PROBES = ("knn_top1", "linear_top1", "gamp_mAP")
MIN_SEEDS = 3  # a verdict needs the mean and spread of at least this many seeds on both sides


def summarise(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = statistics.fmean(values)
    return round(mean, 2), round(statistics.stdev(values), 2) if len(values) > 1 else 0.0


def build_rows(state: dict, methods: list[str], seeds: list[int]) -> list[dict]:
    """One row per (method, probe, backbone) over the seeds that have a value, in order (an interrupted run's
    rows hold fewer seeds; :func:`verdicts` passes none with fewer than :data:`MIN_SEEDS`). ``backbone`` is
    ``pretrained`` (the method's recipe), ``random``, ``supervised`` or ``peer_lightly`` (lightly's step on the
    same recipe, :mod:`benchmarks.peers`)."""
    rows = []
    for method in methods:
        arch = architecture_key(architecture(method))
        sources = {
            "pretrained": (state["scores"].get(method, {}), state["seconds"].get(method, {})),
            "random": (state["scores"].get(f"random/{arch}", {}), {}),
            "supervised": (state["scores"].get(f"supervised/{arch}", {}),
                           state["seconds"].get(f"supervised/{arch}", {})),
            PEER: (state["scores"].get(f"{PEER}/{method}", {}), state["seconds"].get(f"{PEER}/{method}", {})),
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


def verdicts(rows: list[dict], backbone: str = "pretrained") -> list[dict]:
    """Per (method, probe): the gain of the ``backbone`` rows (the recipe's, or lightly's peer) over random init and
    whether it clears 10 points and 3x the larger std."""
    out = []
    for row in rows:
        if row["backbone"] != backbone:
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


def peer_comparison(rows: list[dict]) -> list[dict]:
    """Per (method, probe) with a peer: our recipe's mean against lightly's on the same recipe; ``holds`` when ours
    is within the peer's standard deviation below its mean, or above it."""
    out = []
    for ours in (r for r in rows if r["backbone"] == "pretrained"):
        peer = next((r for r in rows if r["backbone"] == PEER and r["method"] == ours["method"]
                     and r["probe"] == ours["probe"]), None)
        if peer is None:
            continue
        out.append({"method": ours["method"], "probe": ours["probe"], "ours": ours["mean"], "peer": peer["mean"],
                    "peer_std": peer["std"], "difference": round(ours["mean"] - peer["mean"], 2),
                    "seeds": min(len(ours["values"]), len(peer["values"])),
                    "holds": ours["mean"] >= peer["mean"] - peer["std"]})
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
    # Each method's row, then lightly's peer on the same recipe (``<method> (lightly)``) right below it.
    peers = {(v["method"], v["probe"]): v for v in verdicts(rows, PEER)}
    for verdict in verdicts(rows):
        for backbone, v in (("pretrained", verdict), (PEER, peers.get((verdict["method"], verdict["probe"])))):
            if v is None:
                continue
            find = lambda kind, v=v: next((r for r in rows if r["method"] == v["method"]
                                           and r["probe"] == v["probe"] and r["backbone"] == kind), None)
            trained = find(backbone)
            run = v["method"] if backbone == "pretrained" else f"{PEER}/{v['method']}"
            seconds = ", ".join(f"{s:.0f}" for s in trained["pretrain_s"] if s is not None)
            limited = sorted(s for s, hit in report.get("stopped_at_time_limit", {}).get(run, {}).items()
                             if hit and (not report.get("seeds") or int(s) in report["seeds"]))
            if limited:  # trained fewer steps than the recipe: the wall-clock guard ended it, not the schedule
                seconds += f" (seed{'s' * (len(limited) > 1)} {', '.join(limited)} stopped at max_time)"
            passes = "yes" if v["passes"] else "no"
            if v["seeds"] < MIN_SEEDS:
                passes += f" ({v['seeds']} seed{'s' if v['seeds'] > 1 else ''})"
            name = v["method"] if backbone == "pretrained" else f"{v['method']} (lightly)"
            lines.append(f"| {name} | {v['probe']} | {fmt(find('random'))} | {fmt(trained)} | "
                         f"{fmt(find('supervised'))} | {v['gain']:+.1f} | {passes} | {seconds} |")
    # Baselines of a method that has no pre-trained row yet (``--baselines-only``, or an interrupted run).
    shown = {(v["method"], v["probe"]) for v in verdicts(rows)}
    for method, probe in dict.fromkeys((r["method"], r["probe"]) for r in rows if r["backbone"] in ("random",
                                                                                                  "supervised")):
        if (method, probe) in shown:
            continue
        find = lambda kind, m=method, p=probe: next((r for r in rows if r["method"] == m and r["probe"] == p
                                                     and r["backbone"] == kind), None)
        lines.append(f"| {method} | {probe} | {fmt(find('random'))} | — | {fmt(find('supervised'))} | — | — | |")
    # A ceiling the 10-minute guard stopped trained fewer epochs than its recipe: a low ceiling may be that.
    flags = report.get("stopped_at_time_limit", {})
    for key in dict.fromkeys(architecture_key(architecture(m)) for m in dict.fromkeys(r["method"] for r in rows)):
        limited = sorted(s for s, hit in flags.get(f"supervised/{key}", {}).items()
                         if hit and (not report.get("seeds") or int(s) in report["seeds"]))
        if limited:
            lines.append(f"\nSupervised ceiling of {key}: seed{'s' * (len(limited) > 1)} {', '.join(limited)} "
                         "stopped at max_time, before the end of its schedule.")
    comparison = peer_comparison(rows)
    if comparison:
        lines += ["", "| method | probe | ours | lightly | ours - lightly | within lightly's 1 std or above |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for c in comparison:
            seeds = f" ({c['seeds']} seed{'s' * (c['seeds'] > 1)})" if c["seeds"] < MIN_SEEDS else ""
            lines.append(f"| {c['method']} | {c['probe']} | {c['ours']:.1f} | {c['peer']:.1f} ± {c['peer_std']:.1f} | "
                         f"{c['difference']:+.1f} | {'yes' if c['holds'] else 'no'}{seeds} |")
    origins: dict[tuple, list[str]] = {}  # methods taken from earlier files (--merge), grouped by origin
    for method, origin in report.get("merged", {}).items():
        origins.setdefault((origin.get("measured"), origin.get("command"), origin.get("file")), []).append(method)
    for (measured, command, file), methods in origins.items():
        lines.append(f"\nRows of {', '.join(methods)}: measured {measured} (`{command}`), taken from {file}.")
    return "\n".join(lines)


def draw_figures(report: dict, state: dict, methods: list[str], figures: Path) -> list[Path]:
    """One PNG per method: its kNN monitor against the step (mean, min-max over seeds), lightly's peer on the same
    recipe likewise where it ran, random and supervised as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ssl_zoo.cli.plot import read_run, resolve_key

    def monitor_curves(name: str, key: str | None) -> list[dict]:  # one {step: value} per seed of run ``name``
        curves = []
        for _seed, run_dir in sorted(state["runs"].get(name, {}).items()):
            run = read_run(run_dir)
            column = resolve_key(key, run.curves) if key else None
            if column:
                curves.append(dict(run.curves[column]))
        return curves

    written = []
    for method in methods:
        key = state["monitor_keys"].get(method) or state["monitor_keys"].get(f"{PEER}/{method}")
        series = [(label, curves) for label, curves in (
            (f"{method} CPU recipe", monitor_curves(method, key)),
            ("lightly's step, same recipe", monitor_curves(f"{PEER}/{method}", key))) if curves]
        if not series:
            continue
        figure, axis = plt.subplots(figsize=(5.2, 3.4))
        for label, curves in series:
            steps = sorted(set().union(*curves))
            common = [s for s in steps if all(s in c for c in curves)]
            mean = [statistics.fmean(c[s] for c in curves) for s in common]
            line, = axis.plot(common, mean, marker="o", markersize=3, label=f"{label} (mean of {len(curves)} seeds)")
            axis.fill_between(common, [min(c[s] for c in curves) for s in common],
                              [max(c[s] for c in curves) for s in common], alpha=0.2, color=line.get_color())
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


#: What ``quality.json`` keeps per method besides its rows (keys of the runs it names: ``<method>``,
#: ``peer_lightly/<method>`` or ``<random|supervised>/<architecture>``), carried over with the rows by :func:`merge_report`.
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
    # A taken method comes with its own baselines, measured with its runs, and with its peer unless a peer was
    # measured here (``--peers-only``): that one stays and replaces the earlier file's.
    peers_here = {row["method"] for row in report["rows"] if row["backbone"] == PEER}

    def from_earlier(name: str) -> bool:
        """Whether run ``name`` (``<method>`` or ``peer_lightly/<method>``) takes the earlier file's rows and entries."""
        method = name.removeprefix(f"{PEER}/")
        return method in taken and (method == name or method not in peers_here)

    def run_name(row: dict) -> str:
        return f"{PEER}/{row['method']}" if row["backbone"] == PEER else row["method"]

    report["rows"] = ([row for row in report["rows"] if not from_earlier(run_name(row))]
                      + [row for row in old["rows"] if from_earlier(run_name(row))])
    report["rows"].sort(key=lambda row: METHODS.index(row["method"]) if row["method"] in METHODS else len(METHODS))
    report["verdicts"] = verdicts(report["rows"])
    report["peer_verdicts"] = verdicts(report["rows"], PEER)
    report["peer_comparison"] = peer_comparison(report["rows"])
    report["methods"] = [m for m in METHODS if m in set(report["methods"]) | set(taken)]
    origin = {"file": str(earlier), "measured": old.get("machine", {}).get("date"), "command": old.get("command")}
    merged = report.setdefault("merged", {})
    for method in taken:
        merged[method] = old.get("merged", {}).get(method, origin)
        report.setdefault("curves", {})[method] = old.get("curves", {}).get(method)
        peer = f"{PEER}/{method}"
        if peer in old.get("curves", {}) and from_earlier(peer):
            report["curves"][peer] = old["curves"][peer]
    # A taken method's entries (and its peer's, ``peer_lightly/<method>``) come with its rows; a baseline's
    # (``random/<arch>``, ``supervised/<arch>``) only where this report has none.
    for key in _PER_RUN_KEYS:
        entries = report.setdefault(key, {})
        for name, value in old.get(key, {}).items():
            if from_earlier(name):
                entries[name] = value
            elif "/" in name:
                entries.setdefault(name, value)
    return taken
