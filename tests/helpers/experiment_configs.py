"""The experiment configs the command line runs, found on disk once for the tests that parse or run them."""

from __future__ import annotations

from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"

NON_CLI_DIRS = {"sweeps", "launch"}  # wandb sweep files and launcher templates are checked elsewhere


NON_CLI_FILES = {"tables.yaml"}  # paper table manifests, checked by tests/tables/test_manifest.py


#: Every config under ``experiments/`` that ``python -m ssl_zoo`` reads (full configs and overlays), sorted.
CLI_CONFIGS = sorted(p for p in EXPERIMENTS.rglob("*.yaml")
                     if not NON_CLI_DIRS & set(p.relative_to(EXPERIMENTS).parts) and p.name not in NON_CLI_FILES)


#: Every pre-training method's ``experiments/<method>/demo.yaml``.
DEMO_CONFIGS = [p for p in CLI_CONFIGS if p.name == "demo.yaml" and p.parent.name != "eval"]
