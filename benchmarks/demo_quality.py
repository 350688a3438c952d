"""Demo-scale quality check: pre-train on the built-in demo data, then probe against a random-init backbone.

For each method: ``python -m ssl_zoo fit --config experiments/<method>/demo.yaml`` (its demo config,
unchanged unless ``--pretrain-args`` adds overrides), then the GAMP multi-label probe
(``experiments/eval/gamp_demo.yaml``) on the resulting checkpoint; the same probe on a randomly
initialised backbone is the baseline. Loss curves are read back from the runs' ``metrics.csv``.

    python -m benchmarks.demo_quality --methods bam_ia simsiam --json benchmarks/results/demo_quality.json
    python -m benchmarks.demo_quality --methods hvp_mtl --curve-keys train/loss_mcls train/loss_cl train/loss_mim \\
        train/loss_mom --probe-configs experiments/eval/gamp_demo.yaml experiments/eval/linear_demo.yaml \\
        --probe-args='--model.init_args.backbone vit_tiny_patch16_224' --json benchmarks/results/hvp_mtl_quality.json

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


def probe(ckpt: str | None, out_dir: Path, probe_config: str, extra: list[str], subcommand: str = "fit") -> dict:
    """Run the probe config on ``ckpt`` (None = random init: a ResNet-18 at 64 px unless ``extra`` names
    another backbone or size); return the last record it wrote.

    ``subcommand`` is ``fit`` for trained probes (linear, GAMP) and ``validate`` for the kNN probe.
    """
    cmd = [sys.executable, "-m", "ssl_zoo", subcommand, "--config", probe_config,
           "--trainer.default_root_dir", str(out_dir), *extra]
    if ckpt:
        cmd += ["--model.init_args.ckpt", ckpt]
    else:
        # The demo probe configs take the backbone and input size from the checkpoint; the baseline names them
        # (as `make linear` without CKPT does): the demo pre-training configs' ResNet-18 at 64 px by default.
        given = " ".join(extra)
        for key, default in (("backbone", "resnet18"), ("img_size", "64")):
            if f"--model.init_args.{key}" not in given:
                cmd += [f"--model.init_args.{key}", default]
    seconds = run(cmd)
    results = Path(ckpt).resolve().parents[1] / "eval.json" if ckpt else out_dir / "eval.json"
    record = json.loads(results.read_text())[-1]
    record["wall_s"] = round(seconds, 1)
    return record


def probe_name(config: str) -> str:
    """``experiments/eval/gamp_demo.yaml`` -> ``gamp_demo``."""
    return Path(config).stem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["bam_ia", "simsiam"])
    parser.add_argument("--probe-configs", nargs="+", default=["experiments/eval/gamp_demo.yaml"],
                        help="evaluation configs run on every checkpoint and on the random-init baseline")
    parser.add_argument("--pretrain-args", default="", help="extra CLI overrides for every pre-training run")
    parser.add_argument("--probe-args", default="", help="extra CLI overrides for every probe run")
    parser.add_argument("--curve-keys", nargs="+", default=["train/loss_sim"],
                        help="logged loss terms whose per-step and per-epoch curves are recorded")
    parser.add_argument("--out", default="benchmarks/runs/demo_quality")
    parser.add_argument("--json", default="benchmarks/results/demo_quality.json")
    args = parser.parse_args()

    out = ROOT / args.out / time.strftime("%Y%m%d-%H%M%S")
    probe_extra = args.probe_args.split()
    report: dict = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "probe_configs": args.probe_configs,
        "probe_args": args.probe_args,
        "pretrain_args": args.pretrain_args,
        "results": {},
    }
    import torch

    report["torch"] = torch.__version__
    path = ROOT / args.json
    path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every stage, so an interrupted run keeps what it measured
        path.write_text(json.dumps(report, indent=1))

    def probes(ckpt: str | None, tag: str) -> dict:
        return {probe_name(config): probe(ckpt, out / f"{probe_name(config)}_{tag}", config, probe_extra)
                for config in args.probe_configs}

    report["results"]["random_init"] = {"probes": probes(None, "random")}
    save()
    for method in args.methods:
        run_dir = out / method
        seconds = run([sys.executable, "-m", "ssl_zoo", "fit", "--config", f"experiments/{method}/demo.yaml",
                       "--trainer.default_root_dir", str(run_dir), *args.pretrain_args.split()])
        metrics_csv = run_dir / "metrics.csv"
        entry: dict = {"pretrain_wall_s": round(seconds, 1), "loss_epoch": read_curve(metrics_csv, "train/loss_epoch")}
        for key in args.curve_keys:
            entry[f"{key}_epoch"] = read_curve(metrics_csv, f"{key}_epoch")
            entry[f"{key}_step"] = read_step_curve(metrics_csv, f"{key}_step")
        entry["probes"] = probes(str(run_dir / "checkpoints" / "last.ckpt"), method)
        report["results"][method] = entry
        save()

    summary = {k: {name: rec.get("metrics") for name, rec in v["probes"].items()} for k, v in report["results"].items()}
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
