"""``make bench``: every benchmark in turn; each writes its raw JSON under benchmarks/results/."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = [
    ["-m", "benchmarks.demo_quality", "--methods", "bam_ia", "simsiam"],
    ["-m", "benchmarks.demo_quality", "--methods", "hvp_mtl", "--curve-keys", "train/loss_mcls", "train/loss_cl",
     "train/loss_mim", "train/loss_mom", "--probe-configs", "experiments/eval/gamp_demo.yaml",
     "experiments/eval/linear_demo.yaml", "--probe-args=--model.init_args.backbone vit_tiny_patch16_224",
     "--pretrain-args=--trainer.max_epochs 4 --trainer.limit_train_batches 30",
     "--json", "benchmarks/results/hvp_mtl_quality.json"],
    ["-m", "benchmarks.mpcl_ablation"],
    ["-m", "benchmarks.mvp_teacher_share", "--fit"],
    ["-m", "benchmarks.step_overhead", "--method", "all"],
    ["-m", "benchmarks.data_pipeline"],
    ["-m", "benchmarks.component_costs"],
    ["-m", "benchmarks.paper_cost"],
]


def main() -> None:
    for args in BENCHMARKS:
        print("+ python", " ".join(args), flush=True)
        subprocess.run([sys.executable, *args], check=True)


if __name__ == "__main__":
    main()
