"""The papers' table manifests (``ssl_zoo.tables.manifest``): every row's config chain resolves through the CLI
parser and runs the paper's settings; every row has the paper's numbers or is marked as an extension."""

import textwrap
from pathlib import Path

import pytest

from ssl_zoo.tables import (
    ManifestError,
    check_manifest,
    load_manifest,
    setting_value,
    unfilled_cells,
)

ROOT = Path(__file__).resolve().parents[2]
# The papers whose tables ssl_zoo reproduces (the simsiam / mocov2 / mocov3 baselines live in the manifest of
# the paper that reports them); any further experiments/<method>/tables.yaml is checked too.
PAPER_METHODS = ("bam_ia", "mpcl", "hvp_mtl", "mvp")
MANIFESTS = sorted({ROOT / "experiments" / m / "tables.yaml" for m in PAPER_METHODS}
                   | set((ROOT / "experiments").glob("*/tables.yaml")))
BAM_PAPER = "experiments/bam_ia/r50_coco_paper.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.parent.name)
def test_manifest_rows_resolve_with_the_papers_settings(manifest):
    """Every config exists, every chain parses, every stated setting holds, run names are unambiguous."""
    loaded = load_manifest(manifest)
    problems = check_manifest(loaded, ROOT)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.parent.name)
def test_every_row_has_the_papers_numbers_or_is_marked_as_an_extension(manifest):
    """Every printed cell is copied (no null), a row without paper numbers says why the project runs it, and no
    note leaves a number unread."""
    loaded = load_manifest(manifest)
    assert not unfilled_cells(loaded), unfilled_cells(loaded)
    for table, row in loaded.rows():
        assert (bool(row.paper) and all(isinstance(v, int | float) for v in row.paper.values())) != bool(row.extension), \
            (table.id, row.name)
    text = manifest.read_text().lower()
    for phrase in ("recalled", "not checked", "not transcribed", "could not be recovered", "left for later",
                   "fill them in", "fill it in"):
        assert phrase not in text, f"{manifest}: '{phrase}'"


# ---------------------------------------------------------------------- the tool itself
def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tables.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_unknown_row_key_names_file_table_and_row(tmp_path):
    path = _write(tmp_path, f"""
        paper: A paper
        tables:
          - id: Table 4
            caption: gamma
            rows:
              - name: gamma=0.2
                pretrain: [{BAM_PAPER}]
                paper: {{mAP: 61.3}}
                setings: {{trainer.max_epochs: 100}}
        """)
    with pytest.raises(ManifestError, match=r"tables.yaml: Table 4, row 'gamma=0.2': unknown key\(s\) \['setings'\]"):
        load_manifest(path)


def test_row_without_paper_numbers_is_rejected(tmp_path):
    path = _write(tmp_path, f"""
        paper: A paper
        tables:
          - id: Table 1
            rows:
              - name: ours
                pretrain: [{BAM_PAPER}]
        """)
    with pytest.raises(ManifestError, match="'paper' must give the number"):
        load_manifest(path)


def test_derived_settings():
    config = {
        "trainer": {"devices": 4, "num_nodes": 2, "accumulate_grad_batches": 3},
        "data": {"init_args": {"batch_size": 32}},
        "model": {"init_args": {"base_lr": 0.05, "lr_batch_size": None, "lam": 4.0}},
    }
    assert setting_value(config, "global_batch") == 4 * 2 * 32 * 3
    assert setting_value(config, "lr") == pytest.approx(0.05 * 768 / 256)
    config["model"]["init_args"].update(lr_batch_size=512, lr_reference=1024)
    assert setting_value(config, "lr") == pytest.approx(0.05 * 512 / 1024)
    assert setting_value(config, "model.init_args.lam") == 4.0
    with pytest.raises(KeyError):
        setting_value(config, "model.init_args.lamda")


def test_check_reports_a_setting_the_config_does_not_run(tmp_path):
    path = _write(tmp_path, f"""
        paper: A paper
        tables:
          - id: Table 1
            rows:
              - name: right
                pretrain: [{BAM_PAPER}]
                paper: {{mAP: 1}}
                settings: {{trainer.max_epochs: 200, model.init_args.lam: 4.0, global_batch: 128, lr: 0.1}}
              - name: wrong
                pretrain: [{BAM_PAPER}]
                pretrain_args: ["--trainer.max_epochs", "100"]
                run_name: bam_short
                paper: {{mAP: 1}}
                settings: {{trainer.max_epochs: 200, model.init_args.ia_loss: none}}
              - name: missing
                pretrain: [experiments/bam_ia/no_such.yaml]
                paper: {{mAP: 1}}
        """)
    problems = check_manifest(load_manifest(path), ROOT)
    assert len(problems) == 3, problems
    assert "row 'wrong': setting 'trainer.max_epochs' is 100" in problems[0]
    assert "setting 'model.init_args.ia_loss' is 'ia'" in problems[1]
    assert "no_such.yaml' does not exist" in problems[2]


def test_two_chains_sharing_a_run_name_are_reported(tmp_path):
    path = _write(tmp_path, f"""
        paper: A paper
        tables:
          - id: Table 1
            rows:
              - name: a
                pretrain: [{BAM_PAPER}]
                paper: {{mAP: 1}}
              - name: b
                pretrain: [{BAM_PAPER}]
                pretrain_args: ["--model.init_args.lam", "2"]
                paper: {{mAP: 1}}
        """)
    problems = check_manifest(load_manifest(path), ROOT)
    assert len(problems) == 1 and "run name 'bam_ia' is shared" in problems[0]


def test_a_row_is_paper_or_extension_and_cells_are_numbers(tmp_path):
    def manifest(row_keys: str) -> Path:
        return _write(tmp_path, "paper: A paper\ntables:\n  - id: Table 1\n    rows:\n      - name: r\n"
                      + "".join(f"        {line}\n" for line in row_keys.splitlines()))

    with pytest.raises(ManifestError, match="an 'extension' row is not in the paper"):
        load_manifest(manifest("paper: {mAP: 1}\nextension: ours"))
    with pytest.raises(ManifestError, match="paper cell 'mAP' must be the printed number, got '61.3'"):
        load_manifest(manifest("paper: {mAP: '61.3'}"))
    with pytest.raises(ManifestError, match="'extension' says why"):
        load_manifest(manifest("extension: ''"))
    # null: a cell not yet copied from the paper; the manifest loads and unfilled_cells names it
    loaded = load_manifest(manifest("paper: {mAP: null, CP: 70.1}"))
    assert unfilled_cells(loaded) == [f"{tmp_path / 'tables.yaml'}: Table 1, row 'r': mAP"]


