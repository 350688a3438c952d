"""The papers' table manifests: every row's config chain resolves through the CLI parser and runs the
paper's settings; the report prints commands and measured numbers."""

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from ssl_zoo.tables import (
    ManifestError,
    check_manifest,
    compare,
    load_manifest,
    main,
    measured_metrics,
    render_csv,
    render_json,
    render_markdown,
    row_commands,
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
GAMP_EVAL = "experiments/eval/gamp_coco_224.yaml"


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


@pytest.mark.slow
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.parent.name)
def test_manifest_rows_have_commands(manifest):
    loaded = load_manifest(manifest)
    for table, row in loaded.rows():
        commands = row_commands(row, ROOT)
        if row.pretrain:
            assert commands[0].startswith("python -m ssl_zoo fit --config "), (table.id, row.name)
        if row.eval:
            assert commands[-1].startswith("python -m ssl_zoo "), (table.id, row.name)


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


def _record(eval_run_dir: Path, metrics: dict, date: str) -> dict:
    return {"ckpt": None, "protocol": "multilabel_linear", "metrics": metrics, "date": date,
            "eval_run_dir": str(eval_run_dir)}


def test_report_fills_in_measured_numbers_and_marks_rows_not_run(tmp_path):
    path = _write(tmp_path, f"""
        paper: BAM paper
        tables:
          - id: Table 1
            caption: main results
            rows:
              - name: BAM+IA 200ep
                pretrain: [{BAM_PAPER}]
                eval: [{GAMP_EVAL}]
                paper: {{mAP: 61.3, CF1: 55.0}}
              - name: random init
                eval: [{GAMP_EVAL}]
                paper: {{mAP: 20.0}}
              - name: not run
                pretrain: [{BAM_PAPER}]
                pretrain_args: ["--trainer.max_epochs", "100"]
                run_name: bam_100
                eval: [{GAMP_EVAL}]
                paper: {{mAP: 59.0}}
        """)
    runs = tmp_path / "runs"
    eval_name = yaml.safe_load((ROOT / GAMP_EVAL).read_text())["name"]
    pre = runs / "bam_ia" / "20260101-000000"
    pre.mkdir(parents=True)
    records = [
        _record(runs / eval_name / "20260102-000000", {"mAP": 40.0, "CF1": 30.0}, "2026-01-02T00:00:00"),
        _record(runs / eval_name / "20260103-000000", {"mAP": 60.512, "CF1": 54.0}, "2026-01-03T00:00:00"),
        _record(runs / "some_other_eval" / "20260104-000000", {"mAP": 1.0}, "2026-01-04T00:00:00"),
    ]
    (pre / "eval.json").write_text(json.dumps(records))
    random_dir = runs / eval_name / "20260105-000000"
    random_dir.mkdir(parents=True)
    (random_dir / "eval.json").write_text(json.dumps([_record(random_dir, {"mAP": 21.5}, "2026-01-05T00:00:00")]))

    manifest = load_manifest(path)
    rows = [row for _, row in manifest.rows()]
    assert measured_metrics(rows[0], runs, ROOT) == {"mAP": 60.512, "CF1": 54.0}  # newest matching record
    assert measured_metrics(rows[1], runs, ROOT) == {"mAP": 21.5}
    assert measured_metrics(rows[2], runs, ROOT) == {}

    text = render_markdown(manifest, runs, ROOT)
    assert ("| row | mAP (paper) | mAP (ours) | mAP (diff) | CF1 (paper) | CF1 (ours) | CF1 (diff) | status |"
            in text)
    assert "| BAM+IA 200ep | 61.3 | 60.51 | -0.79 | 55 | 54 | -1 | measured |" in text
    assert "| random init | 20 | 21.5 | +1.5 |  |  |  | measured |" in text
    assert "| not run | 59 |  |  |  |  |  | not yet run |" in text
    assert f"python -m ssl_zoo fit --config {BAM_PAPER}\n" in text
    assert (f"python -m ssl_zoo fit --config {GAMP_EVAL} --model.init_args.ckpt "
            '"$(ls -td runs/bam_ia/*/ | head -1)checkpoints/last.ckpt"') in text
    assert f"--config {BAM_PAPER} --trainer.max_epochs 100 --name bam_100" in text


def test_command_line_prints_markdown_and_checks(tmp_path, capsys):
    path = _write(tmp_path, f"""
        paper: BAM paper
        tables:
          - id: Table 4
            caption: overlap
            rows:
              - name: gamma=0.2
                pretrain: [{BAM_PAPER}]
                eval: [{GAMP_EVAL}]
                paper: {{mAP: 61.3}}
                settings: {{model.init_args.overlap: 0.2}}
        """)
    experiments = tmp_path / "experiments"
    experiments.symlink_to(ROOT / "experiments")  # paths in the manifest are relative to the repository root
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "## Table 4: overlap" in out and "| gamma=0.2 | 61.3 |" in out
    assert main([str(path), "--check"]) == 0
    (tmp_path / "bad.yaml").write_text("paper: x\n")
    assert main([str(tmp_path / "bad.yaml")]) == 2
    assert "needs 'paper: <title>' and a non-empty 'tables:' list" in capsys.readouterr().err


def test_extension_rows_are_marked_and_compared_on_the_tables_metrics(tmp_path):
    """A row the paper does not print carries 'extension: <why>', no paper numbers, and is marked in every
    rendering; measured numbers still show under the table's columns."""
    path = _write(tmp_path, f"""
        paper: BAM paper
        tables:
          - id: Table 1
            rows:
              - name: BAM 200
                pretrain: [{BAM_PAPER}]
                eval: [{GAMP_EVAL}]
                paper: {{mAP: 61.3, OF1: 66.0}}
              - name: random init
                eval: [{GAMP_EVAL}]
                extension: the floor every pre-training row is measured against
        """)
    runs = tmp_path / "runs"
    eval_name = yaml.safe_load((ROOT / GAMP_EVAL).read_text())["name"]
    random_dir = runs / eval_name / "20260105-000000"
    random_dir.mkdir(parents=True)
    (random_dir / "eval.json").write_text(json.dumps([_record(random_dir, {"mAP": 21.5}, "2026-01-05T00:00:00")]))
    manifest = load_manifest(path)
    rows = {c.row: c for c in compare(manifest, runs, ROOT)}
    assert rows["random init"].extension.startswith("the floor")
    assert rows["random init"].cells == {"mAP": (None, 21.5, None), "OF1": (None, None, None)}
    assert rows["random init"].status == "measured"
    assert rows["BAM 200"].status == "not yet run"
    text = render_markdown(manifest, runs, ROOT)
    assert "| random init (extension) |  | 21.5 |  |  |  |  | measured |" in text
    assert "(extension): a row the paper does not print, run by this project: random init: the floor" in text
    csv_lines = render_csv(manifest, runs, ROOT).splitlines()
    assert csv_lines[0] == "table,row,extension,metric,paper,ours,diff,status"
    assert "Table 1,random init,yes,mAP,,21.5,,measured" in csv_lines
    assert "Table 1,BAM 200,,OF1,66.0,,,not yet run" in csv_lines
    doc = json.loads(render_json(manifest, runs, ROOT))
    assert doc["rows"][1]["extension"] and doc["rows"][1]["cells"]["mAP"] == {"paper": None, "ours": 21.5,
                                                                              "diff": None}
    assert doc["rows"][0]["commands"][0].startswith("python -m ssl_zoo fit --config")


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


def test_command_line_writes_csv_and_json_reports(tmp_path, capsys):
    path = _write(tmp_path, f"""
        paper: BAM paper
        tables:
          - id: Table 4
            rows:
              - name: gamma=0.2
                pretrain: [{BAM_PAPER}]
                eval: [{GAMP_EVAL}]
                paper: {{mAP: 61.3}}
        """)
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    runs = tmp_path / "runs"
    runs.mkdir()
    assert main([str(path), "--runs", str(runs), "--format", "csv", "--out", str(tmp_path / "r.csv")]) == 0
    assert (tmp_path / "r.csv").read_text().splitlines()[1] == "Table 4,gamma=0.2,,mAP,61.3,,,not yet run"
    assert main([str(path), str(path), "--format", "json"]) == 0
    assert [d["rows"][0]["row"] for d in json.loads(capsys.readouterr().out)] == ["gamma=0.2", "gamma=0.2"]
