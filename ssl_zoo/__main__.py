"""``python -m ssl_zoo {fit,validate,test} --config experiments/<method>/demo.yaml [--key value ...]``.

``python -m ssl_zoo --help`` (or no arguments) lists the methods, the configs of each and the jobs (the
evaluation and transfer jobs with their configs, grouped by the model class each config names), read
from ``experiments/`` (without importing torch, so it answers at once); ``python -m ssl_zoo fit --help``
lists every option of a run. A mistake ends in one ``error:`` line and exit status 2
(``SSL_ZOO_DEBUG=1`` shows the traceback), see :func:`ssl_zoo.cli.run`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

#: The job (``make`` target) of each evaluation / transfer model class and the subcommand that runs it.
JOB_OF_CLASS = {
    "LinearProbe": ("linear", "fit"),
    "MultiLabelLinearProbe": ("gamp", "fit"),
    "FineTune": ("finetune", "fit"),
    "KNNProbe": ("knn", "validate"),
    "ObjectDetection": ("detect", "fit"),
    "SemanticSegmentation": ("segment", "fit"),
}
#: Folders of ``experiments/`` with the configs of those jobs.
JOB_FOLDERS = ("eval", "transfer")


def experiments_dir() -> Path | None:
    """``experiments/`` of the working directory (a checkout), else the one next to the package."""
    for candidate in (Path.cwd() / "experiments", Path(__file__).resolve().parents[1] / "experiments"):
        if candidate.is_dir():
            return candidate
    return None


def _class_of(config: Path) -> str:
    """The model class a config names (the last part of ``model: class_path:``), ``?`` when it names none."""
    match = re.search(r"^model:\s*\n(?:\s*#.*\n)*\s+class_path:\s*([\w.]+)", config.read_text(errors="ignore"), re.M)
    return match.group(1).rsplit(".", 1)[-1] if match else "?"


def _make_targets(root: Path) -> set[str]:
    makefile = root / "Makefile"
    if not makefile.is_file():
        return set()
    return set(re.findall(r"^([a-z][\w-]*):", makefile.read_text(errors="ignore"), re.M))


def catalogue(experiments: Path | None = None) -> str:
    """The text of ``python -m ssl_zoo --help``."""
    experiments = experiments or experiments_dir()
    lines = [
        "usage: python -m ssl_zoo {fit,validate,test} --config CONFIG [--section.key VALUE ...]",
        "       python -m ssl_zoo fit --help                          every option of a run",
        "       python -m ssl_zoo fit --config CONFIG --print_config  the resolved configuration",
    ]
    if experiments is None:
        return "\n".join([*lines, "", "(no experiments/ folder found: run from the repository root)"])
    shown = experiments.parent if experiments.parent == Path.cwd() else None

    def rel(path: Path) -> str:
        return str(path.relative_to(shown)) if shown else str(path)

    methods = sorted(p.parent for p in experiments.glob("*/demo.yaml"))
    lines += ["", f"methods ({rel(experiments)}/<method>/; make pretrain METHOD=<method> runs its demo.yaml, minutes "
                  "on a CPU; cpu.yaml: a CPU recipe that learns visibly; the others: paper configs for GPUs):"]
    width = max((len(m.name) for m in methods), default=0)
    for method in methods:
        configs = " ".join(p.name for p in sorted(method.glob("*.yaml")) if p.name != "tables.yaml")
        counts = {folder.name: len(list(folder.glob("*.yaml"))) for folder in sorted(method.iterdir()) if folder.is_dir()}
        overlays = "".join(f" + {name}/ ({n} overlay{'s' if n > 1 else ''})" for name, n in counts.items() if n)
        tables = "; paper tables: tables.yaml" if (method / "tables.yaml").is_file() else ""
        classes = ", ".join(sorted({_class_of(p) for p in method.glob("*.yaml") if p.name != "tables.yaml"} - {"?"}))
        lines.append(f"  {method.name:<{width}}  {classes}: {configs}{overlays}{tables}")
    lines.append(f"  {'':<{width}}  overlays go after their base config: --config BASE.yaml --config OVERLAY.yaml")
    if (experiments / "shards").is_dir():
        lines.append(f"  {'':<{width}}  streaming shards: --config {rel(experiments)}/shards/<method>.yaml after the "
                     "method's config (make demo-shards: the demo set as shards)")

    targets = _make_targets(experiments.parent)
    jobs: list[tuple[str, str, str, list[str]]] = [
        ("pretrain", f"python -m ssl_zoo fit --config {rel(experiments)}/<method>/<config>.yaml",
         "make pretrain METHOD=<method> [CONFIG=...]", [])]
    groups: dict[str, list[Path]] = {}
    for folder in JOB_FOLDERS:
        for config in sorted((experiments / folder).glob("*.yaml")):
            job = JOB_OF_CLASS.get(_class_of(config))
            if job:
                groups.setdefault(job[0], []).append(config)
    for job, subcommand in JOB_OF_CLASS.values():
        configs = groups.get(job)
        if not configs or any(j == job for j, *_ in jobs):
            continue
        first = next((c for c in configs if c.stem == f"{job}_demo"), configs[0])
        command = f"python -m ssl_zoo {subcommand} --config {rel(first)} --model.init_args.ckpt CKPT"
        make = f"make {job} CKPT=..." if job in targets else ""
        jobs.append((job, command, make, [c.name for c in configs]))
    jobs += [
        ("sweep", f"python -m ssl_zoo.cli.sweep {rel(experiments)}/sweeps/<file>.yaml [--local]", "make sweep SWEEP=..."
         if "sweep" in targets else "", []),
        ("export", "python -m ssl_zoo.cli.export --ckpt CKPT --to timm|torchvision|detectron2 --out FILE", "", []),
        ("convert", "python -m ssl_zoo.checkpoints.convert IN.pth OUT.pth (a published checkpoint -> CKPT)", "", []),
        ("tables", f"python -m ssl_zoo.tables {rel(experiments)}/<method>/tables.yaml [--runs runs/ [--format md|csv|json]] [--check]",
         "", []),
        ("plot", "python -m ssl_zoo.cli.plot RUN_DIR [RUN_DIR ...] [--keys train/loss_sim] [--out fig.png]", "", []),
        ("viz", "python -m ssl_zoo.cli.viz attention --ckpt CKPT --images IMG ... [--out grid.png]", "", []),
    ]
    lines += ["", "jobs (CKPT: a checkpoint of any method, e.g. runs/<method>/<stamp>/checkpoints/last.ckpt; the "
                  "backbone, its settings and the input size come from it; CONFIG=<file> picks another config):"]
    width = max(len(name) for name, *_ in jobs)
    for name, command, make, configs in jobs:
        lines.append(f"  {name:<{width}}  {command}" + (f"   ({make})" if make else ""))
        if configs:
            lines.append(f"  {'':<{width}}    configs: {' '.join(configs)}")
    lines += ["", "A mistake ends in one 'error:' line and exit status 2; SSL_ZOO_DEBUG=1 shows the traceback."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``argv`` (default: the command line) -> exit status."""
    words = sys.argv[1:] if argv is None else argv
    if not words or words[0] in ("-h", "--help"):
        print(catalogue())
        return 0
    from ssl_zoo.cli import run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
