"""Costs of the parts a step is made of, next to lightly's equivalents, and peak memory per method.

    python -m benchmarks.component_costs --json benchmarks/results/component_costs.json

* ``sinkhorn_knopp`` (HVP-MTL §3.2): codes for ``--sinkhorn-batch`` x ``--prototypes`` scores (1024 x 3000,
  3 iterations, SwAV's sizes); reference: ``lightly.loss.swav_loss.sinkhorn``.
* ``ia_closs`` (BAM Eq. 1): forward + backward at ``--ia-views`` embeddings of ``--ia-dim`` (8 views x 256
  images, the paper's 2048-d projector); reference: lightly's ``NTXentLoss`` (SimCLR) on the same
  embeddings as two halves.
* ``queue_enqueue`` (MoCo §3.2): ``KeyQueue.enqueue`` of ``--queue-batch`` keys into a 65,536 x 128 queue;
  reference: lightly's ``MemoryBankModule`` update.
* ``moco_v2_loss_with_queue``: MoCo v2 InfoNCE against that queue, forward + backward, then the enqueue --
  what MPCL runs per projector; reference: lightly's ``NTXentLoss(memory_bank_size=...)``, which reads and
  updates its bank in the same call.
* ``mvp_teacher_share``: the frozen CLIP teacher's share of MVP's step (the definitions of
  ``benchmarks.mvp_teacher_share``: teacher target extraction / module training step), demo config unless
  ``--mvp-model-args`` says otherwise.
* ``peak_memory``: each method's demo step in a fresh subprocess: on CPU the resident set before the steps
  and its peak during them (``VmRSS`` / ``VmHWM`` of ``/proc/self/status``, the peak reset through
  ``/proc/self/clear_refs`` just before the steps; torch allocations are invisible to ``tracemalloc``, and
  ``getrusage``'s ``ru_maxrss`` survives fork + exec, so a child would report its parent's peak), on a GPU
  ``torch.cuda.max_memory_allocated``.

Every time is the median of ``--repeats`` calls after a warm-up, on ``--device`` in one process; each part and
its reference are timed alternately and ``vs_reference`` is the median of the per-pair ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.timing import ROOT, environment, paired_medians, synchronizer, write_json


def _component(name: str, what: str, ours: Callable[[], Any], reference_name: str, reference: Callable[[], Any],
               repeats: int, device: torch.device) -> dict[str, Any]:
    """ssl_zoo's part and lightly's equivalent timed alternately (``vs_reference``: median per-pair ratio)."""
    seconds, reference_s, ratio = paired_medians(ours, reference, repeats, sync=synchronizer(device))
    return {"name": name, "what": what, "seconds": seconds,
            "reference": {"name": reference_name, "seconds": reference_s}, "vs_reference": ratio}


def sinkhorn_cost(batch: int, prototypes: int, repeats: int, device: torch.device) -> dict[str, Any]:
    from lightly.loss.swav_loss import sinkhorn

    from ssl_zoo.losses import sinkhorn_knopp

    g = torch.Generator().manual_seed(0)
    scores = F.normalize(torch.randn(batch, 128, generator=g), dim=1) @ F.normalize(
        torch.randn(prototypes, 128, generator=g), dim=1).T  # [B, K] cosines, as the prototype layer gives
    scores = scores.to(device)
    return _component("sinkhorn_knopp", f"[{batch}, {prototypes}] scores, 3 iterations, eps 0.05",
                      lambda: sinkhorn_knopp(scores, epsilon=0.05, iterations=3),
                      "lightly.loss.swav_loss.sinkhorn", lambda: sinkhorn(scores, iterations=3, epsilon=0.05),
                      repeats, device)


def ia_closs_cost(views: int, dim: int, views_per_image: int, repeats: int, device: torch.device) -> dict[str, Any]:
    from lightly.loss import NTXentLoss

    from ssl_zoo.losses import ImageAwareContrastiveLoss

    g = torch.Generator().manual_seed(0)
    z = torch.randn(views, dim, generator=g).to(device).requires_grad_(True)
    image_ids = torch.arange(views // views_per_image).repeat_interleave(views_per_image).to(device)  # [N]
    ia, ntxent = ImageAwareContrastiveLoss(temperature=0.1), NTXentLoss(temperature=0.1)
    half = views // 2

    def ours() -> None:
        z.grad = None
        ia(z, image_ids).backward()

    def ref() -> None:
        z.grad = None
        ntxent(z[:half], z[half:]).backward()

    return _component("ia_closs", f"forward + backward, N={views} views ({views_per_image} per image), D={dim}",
                      ours, "lightly NTXentLoss on the same N (two halves)", ref, repeats, device)


def queue_costs(size: int, dim: int, batch: int, repeats: int, device: torch.device) -> list[dict[str, Any]]:
    from lightly.loss import NTXentLoss
    from lightly.models.modules.memory_bank import MemoryBankModule

    from ssl_zoo.losses import KeyQueue, moco_v2_info_nce

    g = torch.Generator().manual_seed(0)
    keys = F.normalize(torch.randn(batch, dim, generator=g), dim=1).to(device)
    q = torch.randn(batch, dim, generator=g).to(device).requires_grad_(True)
    queue = KeyQueue(dim, size).to(device)
    bank = MemoryBankModule(size=(size, dim)).to(device)
    bank(keys, update=True)  # lightly allocates its bank lazily on the first call
    ntxent = NTXentLoss(temperature=0.2, memory_bank_size=(size, dim)).to(device)

    def ours_loss() -> None:
        q.grad = None
        loss, _ = moco_v2_info_nce(q, keys, queue.keys, temperature=0.2)
        queue.enqueue(keys)  # before backward, as in MPCL's training_step
        loss.backward()

    def ref_loss() -> None:
        q.grad = None
        ntxent(q, keys).backward()

    shape = f"{batch} keys of {dim} into {size}"
    return [
        _component("queue_enqueue", shape, lambda: queue.enqueue(keys), "lightly MemoryBankModule update",
                   lambda: bank(keys, update=True), repeats, device),
        _component("moco_v2_loss_with_queue", f"InfoNCE forward + backward + enqueue, {shape}", ours_loss,
                   "lightly NTXentLoss with memory bank", ref_loss, repeats, device),
    ]


def mvp_teacher_share(model_args: dict, batch_size: int | None, repeats: int, device: torch.device,
                      demo_root: str | None = None, precision: str = "32") -> dict[str, Any]:
    """Teacher target extraction over the module training step, as ``benchmarks.mvp_teacher_share`` defines it."""
    import warnings

    from benchmarks.step_overhead import load_method, method_optimizer, module_step_fn

    model, batch, n = load_method("mvp", model_args, batch_size, demo_root=demo_root)
    model.to(device).train()
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    sync = synchronizer(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() without a Trainer
        step = module_step_fn(model, batch, method_optimizer(model, n), device, precision)
        teacher_s, step_s, share = paired_medians(lambda: model.teacher_backbone(model.teacher_input(batch)), step,
                                                  repeats, sync=sync)
    return {"model_args": model_args, "batch_size": n, "precision": precision, "teacher_s": teacher_s, "step_s": step_s,
            "teacher_share": share}


# ---------------------------------------------------------------------- peak memory, one subprocess per method
def _status_mib(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _rss_mib() -> float:
    """The current resident set (``ru_maxrss`` where /proc is missing: an upper bound)."""
    current = _status_mib("VmRSS")
    return current if current is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mib() -> float:
    """Peak resident set of this process's own address space since start or the last :func:`reset_peak_rss`.

    ``VmHWM`` rather than ``ru_maxrss``: the latter is preserved across ``execve``, so in a fresh subprocess
    it starts at the parent's peak.
    """
    peak = _status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident set (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_child(method: str, batch_size: int | None, steps: int, device: torch.device,
                      demo_root: str | None = None, precision: str = "32") -> dict[str, Any]:
    """Runs in a fresh process: build ``method`` and its batch, run ``steps`` module steps, report the peaks."""
    import warnings

    from benchmarks.step_overhead import PEERS, load_method, load_peer, method_optimizer, module_step_fn

    torch.set_num_threads(1)
    rss_import = _rss_mib()
    if method in PEERS:
        model, batch, n, _ = load_peer(method, batch_size=batch_size, demo_root=demo_root)
    else:
        model, batch, n = load_method(method, batch_size=batch_size, demo_root=demo_root)
    model.to(device).train()
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    optimizer = method_optimizer(model, n)
    peak_built = peak_rss_mib()
    reset = reset_peak_rss()
    rss_built = _rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    allocated_built = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = module_step_fn(model, batch, optimizer, device, precision)
        for _ in range(steps):
            step()
    report = {"method": method, "batch_size": n, "device": str(device), "precision": precision,
              "rss_after_import_mib": rss_import, "peak_rss_while_building_mib": peak_built,
              "rss_before_steps_mib": rss_built, "peak_rss_mib": peak_rss_mib(), "peak_reset_before_steps": reset}
    report["step_rss_increase_mib"] = report["peak_rss_mib"] - rss_built
    if device.type == "cuda":
        report["cuda_allocated_before_steps_mib"] = allocated_built / 2**20
        report["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return report


def peak_memory(methods: list[str], batch_size: int | None, steps: int, device: str,
                demo_root: str | None = None, precision: str = "32") -> list[dict[str, Any]]:
    results = []
    for method in methods:
        cmd = [sys.executable, "-m", "benchmarks.component_costs", "--peak-memory-child", method,
               "--memory-steps", str(steps), "--device", device, "--precision", precision]
        if batch_size is not None:
            cmd += ["--batch-size", str(batch_size)]
        if demo_root is not None:
            cmd += ["--demo-root", str(demo_root)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"peak-memory run of '{method}' failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def markdown_tables(report: dict[str, Any]) -> str:
    """Components next to their references, the MVP teacher share, and peak memory, as Markdown."""
    lines = ["| component | setting | ssl_zoo (ms) | reference | reference (ms) | ssl_zoo / reference |",
             "| --- | --- | --- | --- | --- | --- |"]
    for c in report["components"]:
        lines.append(f"| {c['name']} | {c['what']} | {c['seconds'] * 1e3:.2f} | {c['reference']['name']} "
                     f"| {c['reference']['seconds'] * 1e3:.2f} | {c['vs_reference']:.2f} |")
    share = report.get("mvp_teacher_share")
    if share:
        lines += ["", f"MVP teacher share: {share['teacher_s'] * 1e3:.1f} ms of a {share['step_s'] * 1e3:.1f} ms step "
                  f"= {share['teacher_share']:.1%} (batch {share['batch_size']}, model args {share['model_args']})."]
    if report.get("peak_memory"):
        cuda = "cuda_peak_allocated_mib" in report["peak_memory"][0]
        lines += ["", "| method | batch | peak RSS (MiB) | RSS before the steps (MiB) | growth during the steps (MiB) |"
                  + (" CUDA peak allocated (MiB) |" if cuda else ""),
                  "| --- | --- | --- | --- | --- |" + (" --- |" if cuda else "")]
        for m in report["peak_memory"]:
            lines.append(f"| {m['method']} | {m['batch_size']} | {m['peak_rss_mib']:.0f} | {m['rss_before_steps_mib']:.0f} "
                         f"| {m['step_rss_increase_mib']:.0f} |" + (f" {m['cuda_peak_allocated_mib']:.0f} |" if cuda else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks.step_overhead import METHODS, PEERS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sinkhorn-batch", type=int, default=1024)
    parser.add_argument("--prototypes", type=int, default=3000)
    parser.add_argument("--ia-views", type=int, default=8 * 256)
    parser.add_argument("--ia-views-per-image", type=int, default=8)
    parser.add_argument("--ia-dim", type=int, default=2048)
    parser.add_argument("--queue-size", type=int, default=65536)
    parser.add_argument("--queue-dim", type=int, default=128)
    parser.add_argument("--queue-batch", type=int, default=256)
    parser.add_argument("--mvp-model-args", default="{}", help="JSON overriding experiments/mvp/demo.yaml's model")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per step for the teacher share and peak memory (default: each demo config's)")
    parser.add_argument("--memory-methods", nargs="*", default=[*METHODS, *PEERS])
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32", choices=["32", "bf16"],
                        help="autocast of the MVP step and the peak-memory steps (the components run in float32)")
    parser.add_argument("--demo-root", default=None, help="the demo dataset, if not at data/demo")
    parser.add_argument("--peak-memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default="benchmarks/results/component_costs.json")
    parser.add_argument("--table", action="store_true", help="print the Markdown tables of --json and exit")
    args = parser.parse_args(argv)
    if args.table:
        report = json.loads((ROOT / args.json).read_text())
        print(markdown_tables(report))
        return report
    device = torch.device(args.device)

    if args.peak_memory_child:  # internal: one method per fresh process
        print(json.dumps(peak_memory_child(args.peak_memory_child, args.batch_size, args.memory_steps, device,
                                           args.demo_root, args.precision)))
        return {}
    if args.ia_views % args.ia_views_per_image or args.ia_views % 2:
        parser.error("--ia-views must be even and a multiple of --ia-views-per-image")
    try:
        mvp_args = json.loads(args.mvp_model_args)
    except json.JSONDecodeError as err:
        parser.error(f"--mvp-model-args is not valid JSON ({err})")

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    report: dict[str, Any] = {
        "command": "python -m benchmarks.component_costs " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": environment(device),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "peak_memory_child")},
        "components": [],
    }
    measurements: list[Callable[[], list[dict[str, Any]]]] = [
        lambda: [sinkhorn_cost(args.sinkhorn_batch, args.prototypes, args.repeats, device)],
        lambda: [ia_closs_cost(args.ia_views, args.ia_dim, args.ia_views_per_image, args.repeats, device)],
        lambda: queue_costs(args.queue_size, args.queue_dim, args.queue_batch, args.repeats, device),
    ]
    for run in measurements:
        for component in run():
            report["components"].append(component)
            print(f"{component['name']:26s} {component['seconds'] * 1e3:9.2f} ms   "
                  f"{component['reference']['name']}: {component['reference']['seconds'] * 1e3:9.2f} ms", flush=True)
        write_json(args.json, report)
    report["mvp_teacher_share"] = mvp_teacher_share(mvp_args, args.batch_size, args.repeats, device,
                                                    args.demo_root, args.precision)
    print(f"mvp teacher share {report['mvp_teacher_share']['teacher_share']:.1%}", flush=True)
    write_json(args.json, report)
    report["peak_memory"] = peak_memory(args.memory_methods, args.batch_size, args.memory_steps, args.device,
                                        args.demo_root, args.precision)
    for row in report["peak_memory"]:
        print(f"{row['method']:16s} peak RSS {row['peak_rss_mib']:8.0f} MiB "
              f"(+{row['step_rss_increase_mib']:.0f} MiB during the steps)", flush=True)
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
