"""``eval.json`` records (``ssl_zoo.eval.results``): where they go, earlier records kept, concurrent appends."""

import json

import torch

from ssl_zoo.eval.results import append_eval_record, read_eval_records, results_file_for


def test_results_file_location(tmp_path):
    ckpt = tmp_path / "runs" / "bam_ia" / "20260101-000000" / "checkpoints" / "last.ckpt"
    assert results_file_for(ckpt, "x") == (ckpt.parent.parent / "eval.json").resolve()
    plain = tmp_path / "weights" / "resnet50.pth"
    assert results_file_for(plain, "x") == (plain.parent / "eval.json").resolve()
    assert results_file_for(None, tmp_path / "eval_run") == tmp_path / "eval_run" / "eval.json"


def test_append_eval_record_keeps_earlier_records(tmp_path):
    path = tmp_path / "run" / "eval.json"
    append_eval_record(path, {"protocol": "a", "metrics": {"mAP": float("nan")}})
    append_eval_record(path, {"protocol": "b", "metrics": {"top1": torch.tensor(12.5)}})
    records = json.loads(path.read_text())
    assert [r["protocol"] for r in records] == ["a", "b"]
    assert records[0]["metrics"]["mAP"] is None and records[1]["metrics"]["top1"] == 12.5
    assert read_eval_records(path) == records


def test_concurrent_appends_lose_no_record(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "eval.json"
    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(lambda i: append_eval_record(path, {"i": i}), range(30)))
    assert sorted(r["i"] for r in read_eval_records(path)) == list(range(30))
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no lock or temporary files left
