"""What the multi-label probe reads: GAMP against its two halves and the backbone's own pooled embedding.

``make bench-quality`` scores every backbone with the GAMP probe (BAM+IA-CLoss §3.3: ``(GAP + GMP) / 2`` of the
last feature map, then BN + linear). On 32 px images a ResNet-18's last map is 1 x 1, so its GAP, GMP and GAMP
are one vector; a ViT/4's is its 8 x 8 patch tokens, and max pooling over them can find an object that the
average dilutes. This probes the frozen backbones of a finished ``benchmarks.quality`` work folder on the
multi-label view with the same probe and four poolings -- ``backbone`` (the pooled embedding: the CLS token of the
ViTs, GAP for ResNets), ``gap``, ``gmp`` and ``gamp`` -- for random init, each method's run and the supervised
ceiling of each architecture::

    python -m benchmarks.quality_pooling [--root data/demo] [--work benchmarks/runs/quality] [--seeds 0]
                                         [--methods mocov3 mvp ...] [--out benchmarks/results/quality_pooling.json]

Runs missing from ``--work`` are skipped (listed in the output); nothing is trained here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import quality

POOLINGS = ("backbone", "gap", "gmp", "gamp")


def backbones_to_probe(methods: list[str], work: Path, seed: int) -> tuple[list[tuple[str, dict, object]], list[str]]:
    """``(name, arch, loader)`` per backbone -- random init and the supervised ceiling of each architecture, then
    each method's run -- and the names of the finished runs that are missing."""
    found, missing, keys = [], [], {}
    for method in methods:
        arch = quality.architecture(method)
        keys.setdefault(quality.architecture_key(arch), arch)
    for key, arch in keys.items():
        found.append((f"random/{key}", arch, lambda arch=arch: quality.random_backbone(arch, seed)))
        ckpt = work / "supervised" / key / f"seed{seed}" / "checkpoints" / "last.ckpt"
        if ckpt.is_file():
            found.append((f"supervised/{key}", arch, lambda c=ckpt, a=arch: quality.load_student(str(c), a)))
        else:
            missing.append(f"supervised/{key}")
    for method in methods:
        arch = quality.architecture(method)
        ckpt = work / method / f"seed{seed}" / "checkpoints" / "last.ckpt"
        if ckpt.is_file():
            found.append((method, arch, lambda c=ckpt, a=arch: quality.load_student(str(c), a)))
        else:
            missing.append(method)
    return found, missing


def markdown_table(report: dict) -> str:
    lines = ["| model | seed | " + " | ".join(POOLINGS) + " |", "| --- | --- |" + " --- |" * len(POOLINGS)]
    for row in report["rows"]:
        lines.append(f"| {row['model']} | {row['seed']} | " + " | ".join(f"{row[p]:.1f}" for p in POOLINGS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/demo", help="data root with a COCO-format multi-label view")
    parser.add_argument("--work", default="benchmarks/runs/quality", help="a benchmarks.quality work folder")
    parser.add_argument("--methods", nargs="+", default=list(quality.METHODS), choices=quality.METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", default="benchmarks/results/quality_pooling.json")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(int(quality.child_env()["OMP_NUM_THREADS"]))
    views = quality.find_views(args.root)
    if not views.coco:
        raise SystemExit(f"error: --root {args.root} has no COCO-format multi-label view (annotations/)")
    work = quality.ROOT / args.work
    rows, skipped = [], []
    for seed in args.seeds:
        found, missing = backbones_to_probe(args.methods, work, seed)
        skipped += [f"{name} (seed {seed})" for name in missing]
        for name, arch, load in found:
            backbone = load()
            row = {"model": name, "seed": seed}
            for pooling in POOLINGS:
                row[pooling] = round(float(quality.multilabel_probe_map(
                    backbone, arch, views.coco, pooling, seed,
                    work / "pooling" / name.replace("/", "_") / f"seed{seed}" / pooling)), 2)
            rows.append(row)
            print(row, flush=True)
    report = {"rows": rows, "skipped": skipped, "root": args.root, "work": args.work,
              "machine": quality.machine_info(), "command": "python -m benchmarks.quality_pooling " + " ".join(
                  sys.argv[1:] if argv is None else argv)}
    out = quality.ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown_table(report))
    if skipped:
        print("skipped (no finished run under --work): " + ", ".join(skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
