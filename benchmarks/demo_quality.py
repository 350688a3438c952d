"""Demo-scale quality check: pre-train on the built-in demo data, then probe against a random-init backbone.

For each method: ``python -m ssl_zoo fit --config experiments/<method>/demo.yaml`` (its demo config,
unchanged unless ``--pretrain-args`` adds overrides), then the GAMP multi-label probe
(``experiments/eval/gamp_demo.yaml``) on the resulting checkpoint; the same probe on a randomly
initialised backbone is the baseline. Loss curves are read back from the runs' ``metrics.csv``.

    python -m benchmarks.demo_quality --methods bam_ia simsiam --json benchmarks/results/demo_quality.json

Writes the raw JSON; ``benchmarks/RESULTS.md`` quotes it with the command and machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> float:
    """Run a command from the repo root, streaming its output; return its wall time in seconds."""
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")})
    return time.perf_counter() - start


def read_curve(metrics_csv: Path, key: str) -> list[float]:
    """Per-epoch values of ``key`` (e.g. ``train/loss_sim_epoch``) from a Lightning CSV log."""
    if not metrics_csv.is_file():
        return []
    with metrics_csv.open() as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def read_step_curve(metrics_csv: Path, key: str) -> list[tuple[int, float]]:
    with metrics_csv.open() as f:
        return [(int(row["step"]), float(row[key])) for row in csv.DictReader(f) if row.get(key)]


def probe(ckpt: str | None, out_dir: Path, probe_config: str, extra: list[str]) -> dict:
    """Run the probe config on ``ckpt`` (None = random init); return the last record it wrote."""
    cmd = [sys.executable, "-m", "ssl_zoo", "fit", "--config", probe_config,
           "--trainer.default_root_dir", str(out_dir), *extra]
    if ckpt:
        cmd += ["--model.init_args.ckpt", ckpt]
    seconds = run(cmd)
    results = Path(ckpt).resolve().parents[1] / "eval.json" if ckpt else out_dir / "eval.json"
    record = json.loads(results.read_text())[-1]
    record["wall_s"] = round(seconds, 1)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["bam_ia", "simsiam"])
    parser.add_argument("--probe-config", default="experiments/eval/gamp_demo.yaml")
    parser.add_argument("--pretrain-args", default="", help="extra CLI overrides for every pre-training run")
    parser.add_argument("--probe-args", default="", help="extra CLI overrides for every probe run")
    parser.add_argument("--curve-key", default="train/loss_sim", help="loss term whose curve is recorded")
    parser.add_argument("--out", default="benchmarks/runs/demo_quality")
    parser.add_argument("--json", default="benchmarks/results/demo_quality.json")
    args = parser.parse_args()

    out = ROOT / args.out / time.strftime("%Y%m%d-%H%M%S")
    probe_extra = args.probe_args.split()
    report: dict = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "probe_config": args.probe_config,
        "pretrain_args": args.pretrain_args,
        "results": {},
    }
    import torch

    report["torch"] = torch.__version__
    path = ROOT / args.json
    path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every stage, so an interrupted run keeps what it measured
        path.write_text(json.dumps(report, indent=1))

    report["results"]["random_init"] = {"probe": probe(None, out / "probe_random", args.probe_config, probe_extra)}
    save()
    for method in args.methods:
        run_dir = out / method
        seconds = run([sys.executable, "-m", "ssl_zoo", "fit", "--config", f"experiments/{method}/demo.yaml",
                       "--trainer.default_root_dir", str(run_dir), *args.pretrain_args.split()])
        metrics_csv = run_dir / "metrics.csv"
        entry = {
            "pretrain_wall_s": round(seconds, 1),
            "loss_epoch": read_curve(metrics_csv, "train/loss_epoch"),
            f"{args.curve_key}_epoch": read_curve(metrics_csv, f"{args.curve_key}_epoch"),
            f"{args.curve_key}_step": read_step_curve(metrics_csv, f"{args.curve_key}_step"),
        }
        entry["probe"] = probe(str(run_dir / "checkpoints" / "last.ckpt"), out / f"probe_{method}",
                               args.probe_config, probe_extra)
        report["results"][method] = entry
        save()

    print(json.dumps({k: v["probe"].get("metrics") for k, v in report["results"].items()}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
