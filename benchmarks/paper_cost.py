"""Paper-scale cost of every paper config, on the CPU, before a GPU-hour is spent.

    python -m benchmarks.paper_cost              # every config the manifests name -> results/paper_cost.json
    python -m benchmarks.paper_cost experiments/mvp/vitb16_in1k_300ep.yaml --no-checks --no-hvp   # one config
    python -m benchmarks.paper_cost experiments/mpcl/r50_in100_mocov2.yaml+experiments/mpcl/ablations/ptb_off.yaml
    python -m benchmarks.paper_cost --table      # the Markdown of results/paper_cost.json
    python -m benchmarks.paper_cost --markdown benchmarks/results/paper_cost.md   # the same, into a file
    python -m benchmarks.paper_cost --summary    # one row per config family, with the totals

For each config (chains joined by ``+``; default: every ``pretrain`` chain of ``experiments/*/tables.yaml`` and
every evaluation / transfer chain those rows score with), resolved as the CLI resolves it
(``ssl_zoo.tables.resolve_chain``):

* FLOPs of one training step of one GPU, at the config's own per-GPU batch, image size and views, counted on
  the real LightningModule (``training_step`` + backward) over fake tensors and split into student forward,
  student backward, teachers, heads and losses (:mod:`benchmarks.paper_cost_step`, which says how);
* memory of one GPU: weights, gradients, optimiser state, activations (the live storages of the step at its
  peak, bf16 autocast for ``bf16-mixed`` configs) and DDP's gradient buckets, against 40 and 80 GB;
* the schedule: optimiser steps from ``max_steps`` or epochs x the training-set size of the dataset the config
  names (:data:`benchmarks.paper_cost_refs.DATASETS`) over the global batch, and its wall time and GPU-hours on
  an A100 and an H100 at the MFU that NVIDIA's published ResNet-50 training throughput gives
  (:func:`assumed_mfu`; no GPU measurement of ``benchmarks.step_overhead`` exists yet);
* checks of that projection against published training costs (:data:`benchmarks.paper_cost_refs.CHECKS`);
* HVP-MTL's Query2Label head at C = 11,166 labels beside its Swin-B / ViT-B encoder, with the decoder's
  label self-attention (the layout before the fix) and without it (Query2Label's layout, the default).

How a config becomes a step (detection included, whose proposal stage depends on values): see
:mod:`benchmarks.paper_cost_jobs`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from typing import Any

import torch

from benchmarks.paper_cost_jobs import GIB, Job, load_job, manifest_chains, measure
from benchmarks.paper_cost_refs import CHECKS, GPUS, MFU_FALLBACK, MFU_SOURCE, MFU_SOURCE_TEXT, PROJECTED
from benchmarks.paper_cost_step import build_on_meta, fake_mode, measure_step, quiet, to_fake
from benchmarks.timing import ROOT, environment, write_json

CUDA_CONTEXT_GIB = 1.0  # CUDA context + cuBLAS / cuDNN workspaces, not seen by the fake step
RESULTS = "benchmarks/results/paper_cost.json"


# ---------------------------------------------------------------------- projection
def resnet50_train_flops_per_image() -> float:
    """FLOPs of one ResNet-50 training step per 224 px image, counted as every step here is."""
    import timm

    mode = fake_mode()
    model = to_fake(build_on_meta(lambda: timm.create_model("resnet50", num_classes=1000)), mode)
    with mode:
        x = torch.empty(2, 3, 224, 224)
    cost = measure_step(model, [x], lambda: model(x).float().mean(), None, mode, {"student": [model]})
    return cost.total_flops / 2


def assumed_mfu(resnet50_flops: float) -> dict[str, dict[str, float]]:
    """MFU by GPU and precision: NVIDIA's published ResNet-50 throughput x its FLOPs / the GPU's peak."""
    mfu: dict[str, dict[str, float]] = {}
    for (gpu, precision), images_per_s in MFU_SOURCE.items():
        mfu.setdefault(gpu, {})[precision] = images_per_s * resnet50_flops / (GPUS[gpu].peak_tflops(precision) * 1e12)
    for gpu, like in MFU_FALLBACK.items():
        mfu[gpu] = dict(mfu[like])
    return mfu


def step_flops(cost: dict[str, Any], leave_out: tuple[str, ...] = ()) -> int:
    return sum(v["forward"] + v["backward"] for part, v in cost["flops"].items() if part not in leave_out)


def project(job: Job, cost: dict[str, Any], mfu: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Wall time and GPU-hours of the whole schedule on each projected GPU, and whether a step fits."""
    flops = step_flops(cost)
    out: dict[str, Any] = {"micro_steps": job.micro_steps(), "optimizer_steps": job.optimizer_steps()}
    for key in PROJECTED:
        gpu, precision = GPUS[key], job.step_precision
        seconds = flops / (gpu.peak_tflops(precision) * 1e12 * mfu[key][precision])
        hours = job.micro_steps() * seconds / 3600
        out[key] = {"step_s": seconds, "wall_h": hours, "gpu_h": hours * job.world, "mfu": mfu[key][precision]}
    total_gib = cost["memory"]["total"] / GIB + CUDA_CONTEXT_GIB
    out["fits"] = {f"{gib} GB": total_gib <= gib for gib in (40, 80)}
    return out


def run_checks(costs: dict[str, dict[str, Any]], mfu: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """The projection of each published reference at the assumed MFU, and the MFU its published time implies."""
    results = []
    for check in CHECKS:
        job = load_job(check.chain, check.args)
        if job.signature() not in costs:
            costs[job.signature()] = measure(job)
        cost = costs[job.signature()]
        per_image = step_flops(cost, check.leave_out) / job.batch_size
        peak = GPUS[check.gpu].peak_tflops(check.precision) * 1e12
        rate = mfu[check.gpu][check.precision]
        row = {"name": check.name, "config": job.label, "source": check.source, "note": check.note,
               "gpu": check.gpu, "precision": check.precision, "gpus": check.gpus, "mfu": rate}
        if check.hours is not None:
            work = per_image * check.images * check.epochs / check.gpus
            row.update(published=check.hours, unit="h", projected=work / (peak * rate) / 3600)
            row["implied_mfu"] = work / (peak * check.hours * 3600)
        else:
            work = per_image * job.batch_size  # the reference's per-GPU batch is the config's (2 images)
            row.update(published=check.seconds_per_step, unit="s/iter", projected=work / (peak * rate))
            row["implied_mfu"] = work / (peak * check.seconds_per_step)
        row["ratio"] = row["projected"] / row["published"]
        row["within_2x"] = 0.5 <= row["ratio"] <= 2.0
        if check.memory_gb is not None:
            row["memory_published_gb"] = check.memory_gb
            row["memory_step_gib"] = cost["memory"]["total"] / GIB  # as max_memory_allocated: DDP buckets too
        results.append(row)
    return results


def hvp_head(costs: dict[str, dict[str, Any]], configs: tuple[str, ...]) -> list[dict[str, Any]]:
    """HVP-MTL's Query2Label decoders (student + EMA teacher) beside the encoders (student + EMA teacher), with
    the decoder's self-attention among the C label queries (the layout before the fix) and without (the default)."""
    rows = []
    for config in configs:
        for self_attention in (True, False):
            args = ("--model.init_args.decoder_self_attention", str(self_attention).lower())
            job = load_job((config,), args)
            key = job.signature()
            if key not in costs:
                costs[key] = measure(job)
            cost = costs[key]
            flops = {p: v["forward"] + v["backward"] for p, v in cost["flops_by_part"].items()}
            total = sum(flops.values())
            encoders = flops.get("student", 0) + flops.get("teacher", 0)
            decoders = flops.get("label_decoder", 0) + flops.get("teacher_decoder", 0)
            activations = cost["activations_by_part"]
            rows.append({
                "config": config, "decoder_self_attention": self_attention, "batch_size": job.batch_size,
                "classes": job.dataset.classes, "flops_step": total, "flops_encoders": encoders,
                "flops_label_decoders": decoders, "decoder_flops_share": decoders / total,
                "activations_encoders": activations.get("student", 0) + activations.get("teacher", 0),
                "activations_label_decoders": activations.get("label_decoder", 0) + activations.get(
                    "teacher_decoder", 0),
                "activations": cost["memory"]["activations"], "memory_total": cost["memory"]["total"]})
            print(f"hvp head {config} self_attention={self_attention}: decoders {decoders / total:.1%} of "
                  f"{total / 1e12:.1f} TFLOP, step memory {cost['memory']['total'] / GIB:.1f} GiB", flush=True)
    return rows


def gpu_measurements() -> list[dict[str, Any]] | None:
    """Every GPU result of ``benchmarks.step_overhead --device cuda`` under ``benchmarks/results`` (measured MFU
    beside the assumed one); None when there is none (so far every run was on the CPU)."""
    found = []
    for path in sorted((ROOT / "benchmarks" / "results").glob("step_overhead*.json")):
        report = json.loads(path.read_text())
        device = report.get("environment", {}).get("device", "cpu")
        if device == "cpu":
            continue
        for r in report.get("results", []):
            found.append({"file": path.name, "device": device, "precision": report["settings"].get("precision"),
                          "method": r["method"], "batch_size": r["batch_size"], "model_args": r["model_args"],
                          "mfu": r.get("mfu"), "step_s": r["step_s"]})
    return found or None


# ---------------------------------------------------------------------- report
def save(json_path: str | None, report: dict) -> None:
    if json_path is not None:  # after every config: a long run keeps what it measured
        write_json(json_path, report)


def run(chains, json_path: str | None, checks: bool = True, hvp: bool = True, argv: list[str] | None = None) -> dict:
    start = time.perf_counter()
    with quiet():
        r50 = resnet50_train_flops_per_image()
    mfu = assumed_mfu(r50)
    report: dict[str, Any] = {
        "command": "python -m benchmarks.paper_cost " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": environment(torch.device("cpu")),
        "gpu_measurement": gpu_measurements(),
        "assumptions": {"mfu": mfu, "mfu_source": MFU_SOURCE_TEXT, "resnet50_train_flops_per_image": r50,
                        "cuda_context_gib": CUDA_CONTEXT_GIB, "mfu_h100": "the A100's (no published H100 figure)"},
        "rows": [], "checks": [], "hvp_head": []}
    costs: dict[str, dict[str, Any]] = {}
    for chain, args, role in chains:
        job = load_job(chain, args, role)
        key = job.signature()
        shared = key in costs
        if not shared:
            costs[key] = measure(job)
        cost = copy.deepcopy(costs[key])
        row = {"config": job.label, "role": role, "model": job.model["class_path"].rsplit(".", 1)[-1],
               "dataset": job.dataset.name, "train_images": job.train_images, "gpus": job.world,
               "batch_per_gpu": job.batch_size, "accumulate": job.accumulate, "precision": job.precision,
               "shared_measurement": shared, **cost, **project(job, cost, mfu)}
        report["rows"].append(row)
        print(f"{job.label:80s} {step_flops(cost) / 1e12:8.2f} TFLOP/step {cost['memory']['total'] / GIB:6.1f} GiB "
              f"{row['A100-80GB']['gpu_h']:9.0f} A100-h{' (shared step)' if shared else ''}", flush=True)
        save(json_path, report)
    if checks:
        report["checks"] = run_checks(costs, mfu)
        save(json_path, report)
    if hvp:
        report["hvp_head"] = hvp_head(costs, ("experiments/hvp_mtl/swinb_tencentml_30ep.yaml",
                                              "experiments/hvp_mtl/vitb_tencentml_30ep.yaml"))
    report["elapsed_s"] = time.perf_counter() - start
    save(json_path, report)
    return report


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.paper_cost_table import markdown, summary_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", help="config chains (c1.yaml+c2.yaml); default: every manifest chain")
    parser.add_argument("--json", default=None,
                        help=f"where the report goes (default: {RESULTS} for the run over every paper config; "
                             "nothing for named configs)")
    parser.add_argument("--no-checks", action="store_true", help="skip the published-cost checks")
    parser.add_argument("--no-hvp", action="store_true", help="skip the HVP-MTL head comparison")
    parser.add_argument("--table", action="store_true", help="print the Markdown of --json and exit")
    parser.add_argument("--markdown", metavar="OUT", default=None,
                        help="write the Markdown of --json to OUT and exit (rendered from the JSON, nothing measured)")
    parser.add_argument("--summary", action="store_true",
                        help="print one row per config family of --json, with the totals, and exit")
    args = parser.parse_args(argv)
    if args.table or args.markdown or args.summary:
        report = json.loads((ROOT / (args.json or RESULTS)).read_text())
        if args.markdown:
            (ROOT / args.markdown).write_text(markdown(report) + "\n")
        if args.table:
            print(markdown(report))
        if args.summary:
            print(summary_table(report))
        return report
    chains = ([(tuple(c.split("+")), (), "pretrain") for c in args.configs] if args.configs else manifest_chains())
    for chain, _, _ in chains:
        missing = [c for c in chain if not (ROOT / c).is_file()]
        if missing:
            parser.error(f"config file(s) {missing} do not exist")
    json_path = args.json or (None if args.configs else RESULTS)
    report = run(chains, json_path, checks=not args.no_checks, hvp=not args.no_hvp, argv=argv)
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
