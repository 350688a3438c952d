"""Markdown tables of a ``benchmarks.paper_cost`` report, rendered from its JSON without recomputing anything:
``python -m benchmarks.paper_cost --table`` (every table), ``--markdown OUT`` (the same, written to a file) and
``--summary`` (one row per config family, the totals of the pre-training and the evaluation / transfer chains)."""

from __future__ import annotations

from typing import Any

GIB = 2**30


def _tf(flops: float) -> str:
    return f"{flops / 1e12:.2f}" if flops >= 5e9 or flops == 0 else f"{flops / 1e12:.1e}"


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f}"


def _hours(h: float) -> str:
    return f"{h:,.0f}" if h >= 10 else f"{h:.1f}"


def config_table(report: dict[str, Any]) -> str:
    """One row per paper config: FLOPs per GPU step by part, memory per GPU by part, fits, GPU-hours."""
    lines = [
        "| config | GPUs x batch | student fwd | student bwd | teacher | heads | losses | total | weights | grads "
        "| optimizer | activations | step peak | 40 GB | 80 GB | optimizer steps | A100 h | A100 GPU-h | H100 GPU-h |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
        "| --- |",
    ]
    for r in report["rows"]:
        f, m = r["flops"], r["memory"]
        total = sum(v["forward"] + v["backward"] for v in f.values())
        grads = m["all_gradients"] + m["ddp_buckets"]
        batch = f"{r['gpus']} x {r['batch_per_gpu']}" + (f" x {r['accumulate']} acc." if r["accumulate"] > 1 else "")
        lines.append(
            f"| {r['config']} | {batch} | {_tf(f['student']['forward'])} | {_tf(f['student']['backward'])} "
            f"| {_tf(f['teacher']['forward'] + f['teacher']['backward'])} "
            f"| {_tf(f['heads']['forward'] + f['heads']['backward'])} "
            f"| {_tf(f['losses']['forward'] + f['losses']['backward'])} | {_tf(total)} | {_gib(m['weights'])} "
            f"| {_gib(grads)} | {_gib(m['optimizer'])} | {_gib(m['activations'])} | {_gib(m['total'])} "
            f"| {'yes' if r['fits']['40 GB'] else '**no**'} | {'yes' if r['fits']['80 GB'] else '**no**'} "
            f"| {r['optimizer_steps']:,} | {_hours(r['A100-80GB']['wall_h'])} | {_hours(r['A100-80GB']['gpu_h'])} "
            f"| {_hours(r['H100']['gpu_h'])} |")
    return "\n".join(lines)


def family(row: dict[str, Any]) -> str:
    """A row's config family: the folder of the first config of its chain (``mpcl``, ``eval``, ``transfer``...)."""
    return row["config"].split("/", 1)[0]


def _span(values: list[float], fmt) -> str:
    low, high = fmt(min(values)), fmt(max(values))
    return low if low == high else f"{low}-{high}"


def _summary_line(name: str, rows: list[dict[str, Any]]) -> str:
    flops = [sum(v["forward"] + v["backward"] for v in r["flops"].values()) for r in rows]
    peaks = [r["memory"]["total"] for r in rows]
    fit40 = sum(r["fits"]["40 GB"] for r in rows)
    fit80 = sum(r["fits"]["80 GB"] for r in rows)
    a100 = sum(r["A100-80GB"]["gpu_h"] for r in rows)
    h100 = sum(r["H100"]["gpu_h"] for r in rows)
    return (f"| {name} | {len(rows)} | {_span(flops, _tf)} | {_span(peaks, _gib)} | {fit40} of {len(rows)} "
            f"| {fit80} of {len(rows)} | {_hours(a100)} | {_hours(h100)} |")


def summary_table(report: dict[str, Any]) -> str:
    """One row per config family (:func:`family`), then the pre-training chains, the evaluation / transfer chains
    and all of them: TFLOP of one GPU's step and the step's peak GiB per GPU (ranges), how many fit 40 / 80 GB,
    and the GPU-hours of their whole schedules summed."""
    lines = ["| family | chains | TFLOP / GPU step | step peak (GiB / GPU) | fit 40 GB | fit 80 GB | A100 GPU-h "
             "| H100 GPU-h |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    families: dict[str, list[dict[str, Any]]] = {}
    for r in report["rows"]:
        families.setdefault(family(r), []).append(r)
    # Pre-training families first, then the evaluation and transfer folders, each group by name.
    order = sorted(families.items(), key=lambda kv: (any(r["role"] != "pretrain" for r in kv[1]), kv[0]))
    lines += [_summary_line(name, rows) for name, rows in order]
    pretrain = [r for r in report["rows"] if r["role"] == "pretrain"]
    others = [r for r in report["rows"] if r["role"] != "pretrain"]
    for name, rows in (("**pre-training chains**", pretrain), ("**evaluation / transfer chains**", others),
                       ("**all**", report["rows"])):
        if rows:
            lines.append(_summary_line(name, rows))
    return "\n".join(lines)


def checks_table(report: dict[str, Any]) -> str:
    lines = ["| reference | GPUs | published | projected at the assumed MFU | projected / published | MFU implied "
             "| memory published / ours (GB / GiB) | source |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in report["checks"]:
        memory = (f"{c['memory_published_gb']:.1f} / {c['memory_step_gib']:.1f}" if "memory_published_gb" in c
                  else "")
        lines.append(
            f"| {c['name']} | {c['gpus']} {c['gpu']} {c['precision']} | {c['published']:g} {c['unit']} "
            f"| {c['projected']:.3g} {c['unit']} (MFU {c['mfu']:.0%}) | {c['ratio']:.2f}"
            f"{'' if c['within_2x'] else ' **outside 2x**'} | {c['implied_mfu']:.0%} | {memory} | {c['source']} |")
    return "\n".join(lines)


def hvp_table(report: dict[str, Any]) -> str:
    lines = ["| config | decoder self-attention | FLOPs / step (TFLOP) | encoders (TFLOP) | label decoders (TFLOP) "
             "| decoders' share | activations: encoders / decoders / all (GiB) | step peak (GiB) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for h in report["hvp_head"]:
        lines.append(
            f"| {h['config'].removeprefix('experiments/')} | {'yes (before)' if h['decoder_self_attention'] else 'no'} "
            f"| {_tf(h['flops_step'])} | {_tf(h['flops_encoders'])} | {_tf(h['flops_label_decoders'])} "
            f"| {h['decoder_flops_share']:.1%} | {_gib(h['activations_encoders'])} / "
            f"{_gib(h['activations_label_decoders'])} / {_gib(h['activations'])} | {_gib(h['memory_total'])} |")
    return "\n".join(lines)


def mfu_line(report: dict[str, Any]) -> str:
    a = report["assumptions"]
    parts = [f"{gpu} {precision}: {value:.1%}" for gpu, by in a["mfu"].items() for precision, value in by.items()]
    return (f"Assumed MFU ({a['mfu_source']}; ResNet-50 training step {a['resnet50_train_flops_per_image'] / 1e9:.1f} "
            f"GFLOP per image as counted here): " + ", ".join(parts) + f". H100: {a['mfu_h100']}.")


def gpu_lines(report: dict[str, Any]) -> str:
    found = report.get("gpu_measurement")
    if not found:
        return ("Measured on a GPU: nothing yet (no `benchmarks.step_overhead --device cuda` result under "
                "benchmarks/results); the projections rest on the assumed MFU alone.")
    return "Measured on a GPU (`benchmarks.step_overhead`): " + "; ".join(
        f"{g['method']} batch {g['batch_size']} on {g['device']} ({g['precision']}): MFU "
        f"{'n/a' if g['mfu'] is None else format(g['mfu'], '.1%')}, step {g['step_s'] * 1e3:.0f} ms" for g in found)


def markdown(report: dict[str, Any]) -> str:
    out = [summary_table(report), "", config_table(report), "", mfu_line(report), "", gpu_lines(report)]
    if report.get("checks"):
        out += ["", checks_table(report)]
    if report.get("hvp_head"):
        out += ["", hvp_table(report)]
    return "\n".join(out)
