"""tools/mutation_check.py plants known bugs by exact source edits: every edit must still apply (once), or the
mutation check would silently test nothing. (Running the mutants themselves is not part of the suite.)"""
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("_mutation_check", ROOT / "tools" / "mutation_check.py")
mc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mc)


@pytest.mark.parametrize("name", list(mc.MUTANTS))
def test_mutant_applies_exactly_once(name):
    _, file, old, new, tests = mc.MUTANTS[name]
    assert old != new
    assert (ROOT / file).read_text().count(old) == 1
    assert all((ROOT / t).is_file() for t in tests)
