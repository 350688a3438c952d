"""The tables report (``ssl_zoo.tables.report``): the commands of every row, measured numbers filled in, rows not
run marked, extension rows compared on the table's metrics, Markdown / CSV / JSON output."""

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from ssl_zoo.tables import (
    compare,
    load_manifest,
    main,
    measured_metrics,
    render_csv,
    render_json,
    render_markdown,
    row_commands,
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
def test_manifest_rows_have_commands(manifest):
    loaded = load_manifest(manifest)
    for table, row in loaded.rows():
        commands = row_commands(row, ROOT)
        if row.pretrain:
            assert commands[0].startswith("python -m ssl_zoo fit --config "), (table.id, row.name)
        if row.eval:
            assert commands[-1].startswith("python -m ssl_zoo "), (table.id, row.name)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tables.yaml"
    path.write_text(textwrap.dedent(text))
    return path


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
