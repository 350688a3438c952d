"""MVP: the frozen CLIP teacher's share of a training step, and the alignment loss curve of the demo run.

    python -m benchmarks.mvp_teacher_share --config experiments/mvp/demo.yaml --json benchmarks/results/mvp_teacher_share.json

Times, in one process on identical inputs (median of ``--repeats`` after a warm-up): the teacher's
target extraction alone, and a whole training step (teacher + masked student forward/backward + optimiser
step). The loss curve comes from a full ``fit`` of the same config (pass ``--fit``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from benchmarks.timing import median_time

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="experiments/mvp/demo.yaml")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model-args", default="{}",
                        help='JSON overriding the config\'s model init_args, e.g. \'{"backbone": "vit_base_patch16_224"}\'')
    parser.add_argument("--fit", action="store_true", help="also run the config's fit and record its loss curve")
    parser.add_argument("--json", default="benchmarks/results/mvp_teacher_share.json")
    args = parser.parse_args()

    from ssl_zoo.methods import MVP

    cfg = yaml.safe_load((ROOT / args.config).read_text())
    torch.manual_seed(0)
    model_args = {**cfg["model"]["init_args"], **json.loads(args.model_args)}
    model = MVP(**model_args)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    transform = model.train_transform()
    from PIL import Image

    images = sorted((ROOT / "data/demo/train2017").glob("*.jpg"))[: args.batch_size]
    items = [transform(Image.open(p).convert("RGB")) for p in images]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    batch["index"] = torch.arange(len(items))

    def teacher_only():
        model.teacher_backbone(model.teacher_input(batch))

    def full_step():
        optimizer.zero_grad(set_to_none=True)
        model.training_step(batch, 0).backward()
        optimizer.step()

    teacher_s = median_time(teacher_only, args.repeats)
    step_s = median_time(full_step, args.repeats)
    report = {
        "config": args.config,
        "model_args": json.loads(args.model_args),
        "batch_size": len(items),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "teacher_s": teacher_s,
        "step_s": step_s,
        "teacher_share": teacher_s / step_s,
        "images_per_s": len(items) / step_s,
    }
    if args.fit:
        run_dir = ROOT / "benchmarks/runs/mvp_teacher_share" / time.strftime("%Y%m%d-%H%M%S")
        subprocess.run([sys.executable, "-m", "ssl_zoo", "fit", "--config", args.config,
                        "--trainer.default_root_dir", str(run_dir)], cwd=ROOT, check=True,
                       env={**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")})
        import csv

        with (run_dir / "metrics.csv").open() as f:
            rows = list(csv.DictReader(f))
        report["loss_step"] = [(int(r["step"]), float(r["train/loss_step"])) for r in rows if r.get("train/loss_step")]
        report["loss_epoch"] = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    path = ROOT / args.json
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if not k.startswith("loss")}, indent=1))


if __name__ == "__main__":
    main()
