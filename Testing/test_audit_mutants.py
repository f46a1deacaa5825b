"""Every hidden sync injected into a copy of the library fails the runtime gate (mutation test).

The constructs, the copies and both gates are in `Testing/audit_mutants.py`; the README's table of
what each audit catches is that module's output, and this test checks the table against a fresh run.
"""

from __future__ import annotations

import re

import audit_mutants
import pytest

README = audit_mutants.REPO / "README.md"


@pytest.fixture(scope="module")
def measured():
    return audit_mutants.measure()


def test_mutants_cover_every_kind_of_place():
    names = [m.name for m in audit_mutants.MUTANTS]
    assert len(set(names)) == len(names) >= 15
    constructs = {m.construct for m in audit_mutants.MUTANTS}
    assert len(constructs) == len(names)
    places = " ".join(m.where for m in audit_mutants.MUTANTS)
    for place in ("pipeline", "helper module", "tracker", "KPI code", "declared block"):
        assert place in places, place


def test_unmutated_copy_passes_both_gates(measured):
    control = measured["control"]
    assert control["rc"] == 0, control["stderr"]
    assert control["static_critical"] == []


def test_runtime_gate_fails_on_every_mutant_naming_its_line(measured):
    for name, result in measured["mutants"].items():
        assert result["runtime_rc"] == 1, (name, result)
        assert result["runtime_names_it"], (name, result["marked"], result["runtime_lines"])


def test_readme_table_is_what_was_measured(measured):
    table = audit_mutants.markdown(measured)
    text = README.read_text()
    for row in table.splitlines():
        if row.startswith("| ") and not row.startswith("| Injected"):
            assert row in text, f"README table differs from the measurement: {row}"
    summary = re.search(r"Runtime gate: fails on \d+ of \d+; static lint: catches \d+ of \d+\.", table).group(
        0
    )
    assert summary in text
