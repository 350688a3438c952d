"""The planted bugs of ``benchmarks/mutants.py`` still target today's code and today's test files: each mutant's
text occurs exactly once in its module, and the test files it runs first exist (a stale path would make
``make mutants`` fail, not test nothing)."""

import pytest

from benchmarks.mutants import MUTANTS, ROOT, first_files


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_mutant_applies_once_and_names_existing_first_files(mutant):
    assert (ROOT / mutant.file).read_text().count(mutant.find) == 1, mutant.file
    assert all(path.startswith("tests/") for path in first_files(mutant, ROOT))
