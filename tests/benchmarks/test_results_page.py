"""What a reader meets first stays short and dated only by git: benchmarks/RESULTS.md fits a page budget and
shows figures that exist; config comments say what a setting is, never when it was tuned."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
MAX_RESULTS_LINES = 350
DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")
COMMENT = re.compile(r"(?:^|\s)#(.*)$")  # a YAML comment starts a line or follows whitespace


def comment_dates(yaml_text: str) -> list[str]:
    """Every YYYY-MM-DD inside the comments of a YAML text (values are left alone)."""
    found = []
    for line in yaml_text.splitlines():
        comment = COMMENT.search(line)
        if comment:
            found += DATE.findall(comment.group(1))
    return found


def test_results_page_fits_its_line_budget():
    lines = RESULTS.read_text().splitlines()
    assert len(lines) <= MAX_RESULTS_LINES, (
        f"benchmarks/RESULTS.md has {len(lines)} lines (at most {MAX_RESULTS_LINES}): keep per benchmark what it "
        "measures, the command, the table and a short reading; the history of trials belongs in git")


def test_results_page_figures_exist():
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", RESULTS.read_text())
    assert figures, "RESULTS.md shows no figure"
    missing = [f for f in figures if not (RESULTS.parent / f).is_file()]
    assert not missing, f"RESULTS.md links figures that do not exist: {missing}"


def test_comment_dates_finds_dates_in_comments_only():
    text = 'name: run_2026-11-30\nlr: 0.3   # tuned on 2026-11-30 evening\n# since 2026-12-01\nx: "#a"\n'
    assert comment_dates(text) == ["2026-11-30", "2026-12-01"]


def test_config_comments_carry_no_dates():
    dated = {}
    for path in sorted((ROOT / "experiments").rglob("*.yaml")):
        found = comment_dates(path.read_text())
        if found:
            dated[str(path.relative_to(ROOT))] = found
    assert not dated, (
        f"config comments carry dates {dated}: say what a setting is and which paper line it follows; "
        "when and how it was tuned belongs in git history")
