"""``python -m ssl_zoo {fit,validate,test} --config experiments/<method>/demo.yaml [--key value ...]``.

``python -m ssl_zoo --help`` (or no arguments) lists the methods, the configs of each and the jobs, read
from ``experiments/`` (without importing torch, so it answers at once); ``python -m ssl_zoo fit --help``
lists every option of a run. A mistake ends in one ``error:`` line and exit status 2
(``SSL_ZOO_DEBUG=1`` shows the traceback), see :func:`ssl_zoo.cli.run`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

#: Folders of ``experiments/`` that hold no run configs.
NOT_RUN_CONFIGS = ("sweeps", "launch")


def experiments_dir() -> Path | None:
    """``experiments/`` of the working directory (a checkout), else the one next to the package."""
    for candidate in (Path.cwd() / "experiments", Path(__file__).resolve().parents[1] / "experiments"):
        if candidate.is_dir():
            return candidate
    return None


def _class_of(config: Path) -> str:
    match = re.search(r"^model:\s*\n\s+class_path:\s*([\w.]+)", config.read_text(errors="ignore"), re.M)
    return match.group(1) if match else "?"


def _subcommand_of(config: Path) -> str:
    """The subcommand a config's header comment runs it with (``python -m ssl_zoo validate ...``), else fit."""
    match = re.search(r"python -m ssl_zoo (fit|validate|test)\b", config.read_text(errors="ignore"))
    return match.group(1) if match else "fit"


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
    lines += ["", f"methods ({rel(experiments)}/<method>/; make pretrain METHOD=<method> runs its demo.yaml):"]
    width = max((len(m.name) for m in methods), default=0)
    for method in methods:
        configs = " ".join(p.name for p in sorted(method.glob("*.yaml")))
        overlays = sorted((method / "ablations").glob("*.yaml"))
        more = f" + ablations/ ({len(overlays)} overlays)" if overlays else ""
        lines.append(f"  {method.name:<{width}}  {_class_of(method / 'demo.yaml').rsplit('.', 1)[-1]}: {configs}{more}")

    targets = _make_targets(experiments.parent)
    jobs: list[tuple[str, str, str, list[str]]] = [
        ("pretrain", f"python -m ssl_zoo fit --config {rel(experiments)}/<method>/<config>.yaml",
         "make pretrain METHOD=<method> [CONFIG=...]", [])]
    for folder in sorted(p for p in experiments.iterdir() if p.is_dir()):
        if folder in methods or folder.name in NOT_RUN_CONFIGS:
            continue
        groups: dict[str, list[Path]] = {}
        for config in sorted(folder.glob("*.yaml")):
            groups.setdefault(config.stem.split("_")[0], []).append(config)
        for name, configs in groups.items():
            first = next((c for c in configs if "demo" in c.stem), configs[0])
            command = f"python -m ssl_zoo {_subcommand_of(first)} --config {rel(first)}"
            if "eval" in folder.name or "ckpt" in first.read_text(errors="ignore"):
                command += " --model.init_args.ckpt CKPT"
            make = f"make {name} CKPT=..." if name in targets else ""
            jobs.append((name, command, make, [c.name for c in configs]))
    jobs.append(("sweep", f"python -m ssl_zoo.sweep {rel(experiments)}/sweeps/<file>.yaml [--local]",
                 "make sweep SWEEP=...", []))
    jobs.append(("export", "python -m ssl_zoo.export --ckpt CKPT --to timm|torchvision|detectron2 --out FILE",
                 "", []))
    lines += ["", "jobs (CKPT: a checkpoint, e.g. runs/<method>/<stamp>/checkpoints/last.ckpt):"]
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
