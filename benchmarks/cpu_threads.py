"""Threads of a CPU run: torch's default (one intra-op thread per core) against ``cpu_threads: 1``, on the
command users run.

    python -m benchmarks.cpu_threads [--configs experiments/simsiam/cpu.yaml ...] [--batches 40] [--repeats 2]
                                     [--json benchmarks/results/cpu_threads.json] [--args OVERRIDES ...]

For every config (default: each method's ``demo.yaml`` and every ``cpu*.yaml``), ``--repeats`` times and in
alternating order, ``python -m ssl_zoo fit --config C --trainer.max_epochs 1 --trainer.limit_train_batches N``
once with ``--cpu_threads 0`` (torch's default) and once with ``--cpu_threads 1``, with ``OMP_NUM_THREADS`` unset:
the whole path, JPEG files -> the config's DataLoader workers -> the training step, kNN monitor included.
Reported per config and setting: the median of the logged ``train/images_per_s`` (after the first logged value)
and the command's wall time (start-up and the epoch-end kNN monitor included), medians over the repeats. The
two settings of a repeat run back to back, so a machine that slows down for a while slows both.

MVP's CPU recipe needs its teacher: the supervised ViT of ``benchmarks/runs/quality`` (seed 0) when the quality
benchmark has trained it, exported as it does; otherwise the recipe is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks import quality
from ssl_zoo.cli.plot import read_run

ROOT = quality.ROOT


def default_configs() -> list[str]:
    demos = [f"experiments/{m}/demo.yaml" for m in quality.METHODS]
    recipes = [str(p.relative_to(ROOT)) for m in quality.METHODS
               for p in sorted((ROOT / "experiments" / m).glob("cpu*.yaml"))]
    return demos + recipes


def mvp_teacher_args(config: str) -> list[str] | None:
    """``--model.init_args.teacher_pretrained`` for MVP's CPU recipe (None: no teacher here; [] for any other)."""
    if not (config.startswith("experiments/mvp/") and "cpu" in Path(config).stem):
        return []
    run_dir = quality.supervised_run_dir(quality.architecture("mvp"), ROOT / quality.WORK, seed=0)
    if not (run_dir / "checkpoints" / "last.ckpt").is_file():
        return None
    exported = quality.export_teacher(run_dir)
    return ["--model.init_args.teacher_pretrained", str(exported)]


def images_per_s(run_dir: Path) -> float | None:
    """Median of the logged ``train/images_per_s`` after its first value (the first steps start the workers)."""
    rates = [value for _, value in read_run(run_dir).curves.get("train/images_per_s", [])]
    return statistics.median(rates[1:]) if len(rates) > 1 else None


def one_run(config: str, threads: int, batches: int, extra: list[str], work: Path) -> dict:
    """One timed ``python -m ssl_zoo fit`` at ``--cpu_threads threads``, ``OMP_NUM_THREADS`` unset."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"t{threads}-", dir=work))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["WANDB_MODE"] = "disabled"
    cmd = [sys.executable, "-m", "ssl_zoo", "fit", "--config", config, "--trainer.max_epochs", "1",
           "--trainer.limit_train_batches", str(batches), "--trainer.default_root_dir", str(run_dir),
           "--cpu_threads", str(threads), *extra]
    wall, _ = quality.run_command(cmd, run_dir.with_suffix(".log"), env=env)
    return {"wall_s": round(wall, 2), "images_per_s": images_per_s(run_dir)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=None)
    parser.add_argument("--batches", type=int, default=40, help="training batches per run (one epoch)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default="benchmarks/results/cpu_threads.json")
    parser.add_argument("--args", nargs=argparse.REMAINDER, default=[],
                        help="CLI overrides for every run (last option: takes the rest of the line)")
    args = parser.parse_args(argv)
    configs = args.configs or default_configs()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cpu_threads-") as tmp:
        work = Path(tmp)
        for config in configs:
            teacher = mvp_teacher_args(config)
            if teacher is None:
                print(f"{config}: skipped (no supervised ViT in benchmarks/runs/quality to export as its teacher)")
                continue
            extra = teacher + args.args
            runs: dict[int, list[dict]] = {0: [], 1: []}
            for repeat in range(args.repeats):
                for threads in ((0, 1) if repeat % 2 == 0 else (1, 0)):
                    runs[threads].append(one_run(config, threads, args.batches, extra, work))
            summary = {}
            for threads, each in runs.items():
                rates = [r["images_per_s"] for r in each if r["images_per_s"] is not None]
                summary[f"threads{threads}"] = {
                    "images_per_s": round(statistics.median(rates), 1) if rates else None,
                    "wall_s": round(statistics.median(r["wall_s"] for r in each), 1), "runs": each}
            default, one = summary["threads0"]["images_per_s"], summary["threads1"]["images_per_s"]
            summary["speedup"] = round(one / default, 2) if default and one else None
            results[config] = summary
            print(f"{config}: default {default} img/s, {summary['threads0']['wall_s']} s; cpu_threads 1 {one} img/s, "
                  f"{summary['threads1']['wall_s']} s; x{summary['speedup']}", flush=True)
    report = {"batches": args.batches, "repeats": args.repeats, "overrides": args.args,
              "machine": quality.machine_info(), "configs": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
