"""Demo-scale MPCL ablation: 1 projector vs 4, 4 + PCR, 4 + PCR + PTB (paper Tables I-III in miniature).

Each variant pre-trains ``experiments/mpcl/demo.yaml`` (MPCL on MoCo v2, ResNet-18, 64 px) with only the
projector options changed, then is scored three ways on the demo validation images:

* the weighted kNN probe (``experiments/eval/knn_demo.yaml``, ``validate``: nothing trained);
* the linear probe on cached frozen features (``experiments/eval/linear_demo.yaml``);
* alignment and uniformity of the l2-normalised backbone features (Wang & Isola 2020, Eq. 4-5), the two
  figures of paper Table I: ``L_align = E ||f(x) - f(x+)||^2`` (alpha = 2; ``= 2 E[1 - cos]``, lower is better
  aligned) over two MoCo v2 views of each image, and ``L_uniform = log E_{x != y} exp(-2 ||f(x) - f(y)||^2)``
  (t = 2) over all pairs of distinct images (lower is more uniform). The random-init backbone is the baseline.

    python -m benchmarks.mpcl_ablation --json benchmarks/results/mpcl_ablation.json

Table I of a paper-scale run (a ResNet-50 checkpoint on the ImageNet-100 validation images, 224 px):

    python -m benchmarks.mpcl_ablation --score-checkpoint runs/<name>/<stamp>/checkpoints/last.ckpt \
        --val-root data/imagenet100/val --img-size 224 --align-images 5000

Writes the raw JSON after every stage; ``benchmarks/RESULTS.md`` quotes it with the command and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.demo_quality import ROOT, probe, read_curve, read_step_curve, run

# Variant name -> overrides of experiments/mpcl/demo.yaml. The 1-projector row is the MoCo v2 baseline.
VARIANTS: dict[str, list[str]] = {
    "1 projector (MoCo v2)": ["--model.init_args.num_projectors", "1",
                              "--model.init_args.pcr", "false", "--model.init_args.ptb", "false"],
    "4 projectors": ["--model.init_args.num_projectors", "4",
                     "--model.init_args.pcr", "false", "--model.init_args.ptb", "false"],
    "4 + PCR": ["--model.init_args.num_projectors", "4",
                "--model.init_args.pcr", "true", "--model.init_args.ptb", "false"],
    "4 + PCR + PTB": ["--model.init_args.num_projectors", "4",
                      "--model.init_args.pcr", "true", "--model.init_args.ptb", "true"],
}


def alignment(za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
    """Wang & Isola's ``L_align`` with alpha = 2: ``E ||f(x) - f(x+)||_2^2`` over positive pairs ``za[i], zb[i]``
    (unit vectors, so it lies in [0, 4] and equals ``2 E[1 - cos]``)."""
    return (za - zb).pow(2).sum(dim=1).mean()


def uniformity(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Wang & Isola's ``L_uniform = log E_{i != j} exp(-t ||z_i - z_j||^2)`` over distinct rows of ``z``."""
    sq_dist = torch.cdist(z, z).pow(2)  # [N, N]
    off_diagonal = ~torch.eye(len(z), dtype=torch.bool, device=z.device)
    return torch.log(torch.exp(-t * sq_dist[off_diagonal]).mean())


@torch.no_grad()
def alignment_uniformity(ckpt: str | None, root: Path, img_size: int, max_images: int, seed: int = 0) -> dict:
    """``L_align`` (alpha 2) and ``L_uniform`` (t 2) of the backbone's pooled, l2-normalised features.

    The two views come from the MoCo v2 transform the demo pre-trains with, under a fixed seed, so every
    backbone sees the same pairs.
    """
    from ssl_zoo.augment.recipes import mocov2_transform
    from ssl_zoo.checkpoints import load_backbone
    from ssl_zoo.data.folder import ImageFolderDataset
    from ssl_zoo.models import Backbone

    backbone = load_backbone(ckpt) if ckpt else Backbone("resnet18", img_size=img_size)
    backbone.eval()
    dataset = ImageFolderDataset(str(root), transform=mocov2_transform(img_size))
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(dataset), generator=generator)[:max_images].tolist()
    torch.manual_seed(seed)
    feats_a, feats_b = [], []
    for start in range(0, len(indices), 128):
        views = [dataset[i][0] for i in indices[start:start + 128]]
        pairs = torch.stack([v["views"] for v in views])  # [n, 2, 3, S, S]
        xa, xb = pairs[:, 0], pairs[:, 1]
        feats_a.append(F.normalize(backbone(xa).float(), dim=1))
        feats_b.append(F.normalize(backbone(xb).float(), dim=1))
    za, zb = torch.cat(feats_a), torch.cat(feats_b)  # [N, D] each, unit norm
    return {"l_align": round(float(alignment(za, zb)), 4), "l_uni": round(float(uniformity(za)), 4),
            "num_images": len(za)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--pretrain-args", default="", help="extra CLI overrides for every pre-training run")
    parser.add_argument("--knn-config", default="experiments/eval/knn_demo.yaml")
    parser.add_argument("--linear-config", default="experiments/eval/linear_demo.yaml")
    parser.add_argument("--val-root", default="data/demo/folder/val")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--align-images", type=int, default=500)
    parser.add_argument("--out", default="benchmarks/runs/mpcl_ablation")
    parser.add_argument("--json", default="benchmarks/results/mpcl_ablation.json")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows already in --json (e.g. after an interrupted run) and add the variants given")
    parser.add_argument("--score-checkpoint", default=None, metavar="CKPT",
                        help="only print Table I's L_align / L_uniform of this checkpoint's backbone on --val-root")
    args = parser.parse_args()
    if args.score_checkpoint:
        print(json.dumps(alignment_uniformity(args.score_checkpoint, Path(args.val_root), args.img_size,
                                              args.align_images), indent=1))
        return

    out = ROOT / args.out / time.strftime("%Y%m%d-%H%M%S")
    report: dict = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "pretrain_config": "experiments/mpcl/demo.yaml",
        "pretrain_args": args.pretrain_args,
        "results": {},
    }
    path = ROOT / args.json
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.append and path.is_file():
        report["results"] = json.loads(path.read_text())["results"]

    def save() -> None:  # after every stage, so an interrupted run keeps what it measured
        path.write_text(json.dumps(report, indent=1))

    def score(ckpt: str | None, tag: str) -> dict:
        return {
            "knn": probe(ckpt, out / f"knn_{tag}", args.knn_config, [], subcommand="validate"),
            "linear": probe(ckpt, out / f"linear_{tag}", args.linear_config, []),
            "align_uniform": alignment_uniformity(ckpt, ROOT / args.val_root, args.img_size, args.align_images),
        }

    if "random init" not in report["results"]:
        report["results"]["random init"] = score(None, "random")
        save()
    for i, name in enumerate(args.variants):
        run_dir = out / f"variant{i}"
        seconds = run([sys.executable, "-m", "ssl_zoo", "fit", "--config", "experiments/mpcl/demo.yaml",
                       "--trainer.default_root_dir", str(run_dir), *VARIANTS[name], *args.pretrain_args.split()])
        metrics_csv = run_dir / "metrics.csv"
        entry = {
            "overrides": " ".join(VARIANTS[name]),
            "pretrain_wall_s": round(seconds, 1),
            "loss_epoch": read_curve(metrics_csv, "train/loss_epoch"),
            "loss_step": read_step_curve(metrics_csv, "train/loss_step"),
            "acc_epoch": read_curve(metrics_csv, "train/acc_epoch"),
        }
        entry.update(score(str(run_dir / "checkpoints" / "last.ckpt"), f"variant{i}"))
        report["results"][name] = entry
        save()

    summary = {
        name: {"knn": r["knn"].get("metrics"), "linear": r["linear"].get("metrics"), **r["align_uniform"]}
        for name, r in report["results"].items()
    }
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
