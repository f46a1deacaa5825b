"""Static transfer audit: exact counts on hand-written fixtures, severities, reports and the CLI gate.

The fixtures in ``Testing/fixtures/audit/`` are small Python files written for this test; every
line that must be found carries an ``# expect: CATEGORY ...`` comment, and `EXPECTED` below is the
same information counted by hand per file and category.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from UltramotionIGTLib.tools import cli
from UltramotionIGTLib.tools.audit.report import static_json, static_markdown
from UltramotionIGTLib.tools.audit.static import CATEGORIES, DEFAULT_ENTRIES, scan_paths

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "audit"
ENTRY = "fixture_pipeline.py:FixturePipeline.process_frame"
LEGACY = "fixture_pipeline.py:FixturePipeline._legacy_path"  # named, as the library's not-hot list does

#: file -> category -> count, counted by hand from the fixture files
EXPECTED: dict[str, dict[str, int]] = {
    "fixture_hops.py": {
        "cpu": 4,
        "numpy": 3,
        "item": 2,
        "tolist": 1,
        "to_cpu": 9,
        "np_array": 2,
        "detach": 2,
    },
    "fixture_syncs.py": {
        "scalar_cast": 5,
        "item": 2,
        "tensor_condition": 9,
        "nonzero": 4,
        "masked_select": 2,
        "unique": 2,
        "repeat_interleave": 2,
        "bool_mask_index": 7,
        "format_tensor": 6,
        "detach": 1,
    },
    "fixture_roundtrip.py": {
        "cpu": 3,
        "numpy": 2,
        "tolist": 1,
        "round_trip": 4,
        "scalar_cast": 1,
        "detach": 1,
    },
    "fixture_pipeline.py": {"cpu": 2, "numpy": 1, "item": 1, "format_tensor": 1},
    "fixture_helpers.py": {"tensor_condition": 1, "tolist": 2, "bool_mask_index": 1, "item": 1},
    "training/fixture_train_loop.py": {"item": 1, "format_tensor": 1, "detach": 1},
    "fixture_kinds.py": {
        "tolist": 1,
        "scalar_cast": 2,
        "cpu": 1,
        "tensor_condition": 3,
        "bool_mask_index": 3,
        "numpy": 1,
    },
}

#: the hot path from FixturePipeline.process_frame: (file, function, category), by hand
EXPECTED_CRITICAL = {
    ("fixture_pipeline.py", "shared_math", "item"),
    ("fixture_helpers.py", "Tracker.assign", "tensor_condition"),
    ("fixture_helpers.py", "Tracker._empty", "tolist"),
    ("fixture_helpers.py", "postprocess", "bool_mask_index"),
}


@pytest.fixture(scope="module")
def result():
    return scan_paths([FIXTURES], root=FIXTURES, entries=[ENTRY], not_hot=[LEGACY])


def _line_of(rel: str, text: str) -> int:
    """1-based line of the (unique) fixture line containing ``text``."""
    lines = (FIXTURES / rel).read_text().splitlines()
    hits = [i for i, line in enumerate(lines, 1) if text in line]
    assert len(hits) == 1, f"{text!r} found {len(hits)} times in {rel}"
    return hits[0]


def _at(result, rel: str, text: str) -> Counter:
    line = _line_of(rel, text)
    return Counter(f.category for f in result.findings if f.file == rel and f.line == line)


def test_fixtures_are_not_tests_and_not_project_code():
    files = sorted(FIXTURES.rglob("*.py"))
    assert {p.relative_to(FIXTURES).as_posix() for p in files} == set(EXPECTED)
    for path in files:
        assert not path.name.startswith("test_") and path.name != "conftest.py"
        head = path.read_text().splitlines()[:2]
        assert head == ["# ruff: noqa", "# fmt: off"], path


def test_exact_counts_per_file_and_category(result):
    assert result.parse_errors == []
    assert result.files_scanned == len(EXPECTED)
    got: dict[str, dict[str, int]] = {}
    for f in result.findings:
        got.setdefault(f.file, Counter())[f.category] += 1
    assert {k: dict(v) for k, v in got.items()} == EXPECTED


def test_findings_sit_on_the_expected_lines(result):
    expected = Counter()
    for path in sorted(FIXTURES.rglob("*.py")):
        rel = path.relative_to(FIXTURES).as_posix()
        for number, line in enumerate(path.read_text().splitlines(), 1):
            match = re.search(r"# expect: (.+)$", line)
            if match:
                for category in match.group(1).split():
                    assert category in CATEGORIES, category
                    expected[(rel, number, category)] += 1
    got = Counter((f.file, f.line, f.category) for f in result.findings)
    assert got == expected
    # the table above and the comments agree
    per_file = Counter()
    for (rel, _, category), n in expected.items():
        per_file[(rel, category)] += n
    assert per_file == Counter({(rel, c): n for rel, cats in EXPECTED.items() for c, n in cats.items()})


def test_tricky_spellings(result):
    hops = "fixture_hops.py"
    assert _at(result, hops, 'f = t.to(device="cpu")') == Counter(to_cpu=1)
    assert _at(result, hops, "g = t.to(torch.device('cpu'))") == Counter(to_cpu=1)
    assert _at(result, hops, 'h = t.to("cpu", non_blocking=True)') == Counter(to_cpu=1)
    assert _at(result, hops, "j = t.to(CPU)") == Counter(to_cpu=1)  # module-level torch.device("cpu")
    assert _at(result, hops, "k = t.to(host, torch.float64)") == Counter(to_cpu=1)  # local "cpu"
    assert _at(result, hops, "x = t.detach().cpu().numpy()") == Counter(cpu=1, numpy=1, detach=1)
    assert _at(result, hops, "arr3 = np.asarray(t.cpu())") == Counter(cpu=1)
    for not_a_hop in (
        "y = x.tolist()",
        "z = t.to(device)",
        "w = t.to(torch.float32)",
        "q = t.cuda()",
        "arr4 = np.asarray([1, 2, 3])",
        "u = np.unique(arr)",
        "lst = arr.tolist()",
    ):
        assert _at(result, hops, not_a_hop) == Counter(), not_a_hop
    syncs = "fixture_syncs.py"
    assert _at(result, syncs, "if (t > 0).any():") == Counter(tensor_condition=1)
    assert _at(result, syncs, "a = t[t > 0]") == Counter(bool_mask_index=1)
    assert _at(result, syncs, "b = int(t.sum())") == Counter(scalar_cast=1)
    assert _at(result, syncs, 'msg = f"value {t} and shape {t.shape}"') == Counter(format_tensor=1)
    assert _at(result, syncs, "g = torch.unique(t)") == Counter(unique=1)
    assert _at(result, syncs, "i = t.repeat_interleave(r)") == Counter(repeat_interleave=1)
    assert _at(result, syncs, "f = float(t.mean().item())") == Counter(item=1)  # float of a Python number
    for no_sync in (
        "j = t.repeat_interleave(r, output_size=8)",
        "k = t.repeat_interleave(2)",
        "e = int(t.shape[0])",
        "if t.shape[0] > 0:",
        "if t is None:",
        "e = t[idx]",
        "d = torch.where(t > 0, t, 0)",
        'print("shape", t.shape)',
    ):
        assert _at(result, syncs, no_sync) == Counter(), no_sync
    rt = "fixture_roundtrip.py"
    assert _at(result, rt, "back = t.cpu().to(device)") == Counter(cpu=1, round_trip=1)
    assert _at(result, rt, "up = torch.from_numpy(scaled).to(device)") == Counter(round_trip=1)
    assert _at(result, rt, "ok = torch.from_numpy(fresh).to(device)") == Counter()


def test_detach_is_not_a_transfer(result):
    detach = [f for f in result.findings if f.category == "detach"]
    assert len(detach) == sum(cats.get("detach", 0) for cats in EXPECTED.values())
    assert all(f.severity == "info" and f.kind == "not_transfer" for f in detach)
    assert all(f.category != "detach" for f in result.transfers)
    assert result.to_dict()["totals"]["findings"] == len(result.findings) - len(detach)


def test_severity_from_the_call_graph(result):
    critical = {(f.file, f.function, f.category) for f in result.critical()}
    assert critical == EXPECTED_CRITICAL
    hot = set(result.hot_functions)
    assert "fixture_pipeline.py:FixturePipeline.process_frame" in hot
    assert "fixture_helpers.py:Tracker.assign" in hot  # through self.tracker = Tracker()
    assert "fixture_helpers.py:postprocess" in hot  # through "from fixture_helpers import postprocess"
    assert "fixture_helpers.py:Tracker.unused" not in hot
    assert "fixture_pipeline.py:FixturePipeline._legacy_path" not in hot  # named in not_hot
    by_function = {(f.file, f.function, f.category): f.severity for f in result.findings}
    assert by_function[("fixture_pipeline.py", "cold_helper", "cpu")] == "medium"
    assert by_function[("fixture_pipeline.py", "FixturePipeline._legacy_path", "numpy")] == "medium"
    assert by_function[("fixture_helpers.py", "not_called", "item")] == "medium"
    assert by_function[("training/fixture_train_loop.py", "train_step", "item")] == "minor"
    declared = [f for f in result.findings if f.declared]
    assert {(f.line, f.category) for f in declared} == {
        (_line_of("fixture_roundtrip.py", "host = t.cpu().numpy()"), "cpu"),
        (_line_of("fixture_roundtrip.py", "host = t.cpu().numpy()"), "numpy"),
        (_line_of("fixture_roundtrip.py", "n = int(t.sum())"), "scalar_cast"),
    }
    assert all(f.severity == "declared" and f.declared_reason == "fixture.to_host" for f in declared)


def test_hot_path_globs_and_not_hot():
    with_glob = scan_paths(
        [FIXTURES], root=FIXTURES, entries=[ENTRY], hot_path=["*:cold_helper"], not_hot=[LEGACY]
    )
    critical = {(f.function, f.category) for f in with_glob.critical()}
    assert ("cold_helper", "cpu") in critical and len(critical) == len(EXPECTED_CRITICAL) + 1
    glob_only = scan_paths([FIXTURES], root=FIXTURES, entries=[], hot_path=["fixture_helpers.py:Tracker.*"])
    assert {(f.function, f.category) for f in glob_only.critical()} == {
        ("Tracker.assign", "tensor_condition"),
        ("Tracker._empty", "tolist"),
        ("Tracker.unused", "tolist"),
    }
    no_cold = scan_paths([FIXTURES], root=FIXTURES, entries=[ENTRY], not_hot=())
    legacy = {f.category for f in no_cold.critical() if f.function == "FixturePipeline._legacy_path"}
    assert legacy == {"cpu", "numpy"}
    # no name pattern exempts a function: only the explicit list does (the default names library functions)
    by_default = scan_paths([FIXTURES], root=FIXTURES, entries=[ENTRY])
    assert "fixture_pipeline.py:FixturePipeline._legacy_path" in by_default.hot_functions


def test_missing_entry_marks_nothing_hot():
    res = scan_paths([FIXTURES], root=FIXTURES)  # default entries: UltramotionIGTLib/core/...
    assert res.unresolved_entries == list(DEFAULT_ENTRIES)
    assert res.hot_functions == [] and res.critical() == []
    assert "Entry not found" in static_markdown(res)


def test_markdown_report_has_the_seed_sections(result):
    text = static_markdown(result, generated="2026-01-01")
    for heading in (
        "# GPU->CPU transfer audit (static)",
        "## Totals",
        "## By severity",
        "## By category",
        "## By file (top",
        "## Critical findings (4)",
        "## Declared hops (3)",
    ):
        assert heading in text, heading
    total = sum(n for cats in EXPECTED.values() for c, n in cats.items() if c != "detach")
    assert f"**Findings (hops + syncs + round trips):** {total}" in text
    detach = sum(cats.get("detach", 0) for cats in EXPECTED.values())
    assert f"| `.detach()` | not a transfer | {detach} |" in text
    for f in result.critical():
        assert f"`{f.file}:{f.line}`" in text and f.code.split("#")[0].strip() in text
    assert "| critical | 4 |" in text


def test_json_report_one_object_per_finding(result):
    data = json.loads(static_json(result))
    assert len(data["findings"]) == len(result.findings)
    keys = {"file", "line", "col", "function", "category", "severity", "code", "hot_path", "declared"}
    assert all(keys <= set(obj) for obj in data["findings"])
    assert data["by_category"] == {c: sum(cats.get(c, 0) for cats in EXPECTED.values()) for c in CATEGORIES}
    assert data["by_severity"]["critical"] == len(EXPECTED_CRITICAL)
    assert data["totals"]["critical"] == len(EXPECTED_CRITICAL)
    assert data["totals"]["declared"] == 3
    assert all(obj["hot_path"] for obj in data["findings"] if obj["severity"] == "critical")


def test_cli_gate_fails_on_critical(capsys, tmp_path):
    argv = [
        str(FIXTURES),
        "--root",
        str(FIXTURES),
        "--entry",
        ENTRY,
        "--not-hot",
        LEGACY,
        "--fail-on",
        "critical",
    ]
    assert cli.main(["audit", *argv]) == 1
    err = capsys.readouterr().err
    assert "4 finding(s)" in err
    for rel, func, _ in EXPECTED_CRITICAL:
        assert f"in {func}:" in err and rel in err
    assert f"fixture_pipeline.py:{_line_of('fixture_pipeline.py', 'return t.sum().item()')}:" in err
    # training code alone holds no per-frame entry point: a gate that checked nothing does not pass
    out = tmp_path / "audit.json"
    argv = [
        str(FIXTURES / "training"),
        "--root",
        str(FIXTURES),
        "--fail-on",
        "critical",
        "--format",
        "json",
        "-o",
        str(out),
    ]
    assert cli.main(["audit", *argv]) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after "audit: report written to ..."
    assert error.startswith("ultramotion-igt audit: error:") and "per-frame entry point not found" in error
    data = json.loads(out.read_text())  # the report is still written, for the reader
    assert data["by_severity"]["minor"] == 2 and data["files_scanned"] == 1
    assert data["hot_path_functions"] == []


def test_cli_missing_path_is_a_user_error(capsys):
    assert cli.main(["audit", "does_not_exist/"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ultramotion-igt audit: error:") and "does_not_exist" in err
    assert len(err.strip().splitlines()) == 1, err


def test_kinds_the_lint_once_missed():
    """Keyword arguments (and calls made in them), tuple unpacking from annotated and documented
    returns, masks typed only ``Tensor``, setattr attributes, and more than one per-frame entry."""
    entries = [ENTRY, "fixture_kinds.py:keywords", "fixture_kinds.py:Packet.to_host"]
    res = scan_paths([FIXTURES], root=FIXTURES, entries=entries, not_hot=[LEGACY])
    kinds = "fixture_kinds.py"
    assert _at(res, kinds, "a = Out(n=int(t.sum()))") == Counter(scalar_cast=1)
    assert _at(res, kinds, "b = Out(host=t.cpu())") == Counter(cpu=1)
    assert _at(res, kinds, "if valid.any():") == Counter(tensor_condition=1)
    assert _at(res, kinds, "if kept.max() > 0:") == Counter(tensor_condition=1)
    assert _at(res, kinds, "return boxes[valid]") == Counter(bool_mask_index=1)
    assert _at(res, kinds, "a = boxes[valid]") == Counter(bool_mask_index=1)
    assert _at(res, kinds, "if self.alive.any():") == Counter(tensor_condition=1)
    assert _at(res, kinds, "n = int(self.count.sum())") == Counter(scalar_cast=1)
    for clean in ("b = boxes[order]", "c = boxes[idx]", "c = Out(n=called_in_a_keyword(t))"):
        assert _at(res, kinds, clean) == Counter(), clean
    critical = {(f.function, f.category) for f in res.critical() if f.file == kinds}
    # the call made inside a keyword argument is followed into the hot path; to_host is an entry
    assert critical == {
        ("keywords", "scalar_cast"),
        ("keywords", "cpu"),
        ("called_in_a_keyword", "tolist"),
        ("Packet.to_host", "numpy"),
    }


def test_library_entries_and_not_hot_list_resolve():
    """The default entries (frame loop, one frame, host copy) and every not-hot name exist."""
    from UltramotionIGTLib.tools.audit.static import DEFAULT_NOT_HOT

    lib = Path(__file__).resolve().parents[1] / "UltramotionIGTLib"
    res = scan_paths([lib], root=lib.parent)
    assert res.unresolved_entries == []
    assert set(DEFAULT_ENTRIES) <= set(res.hot_functions)
    names = {f"{rel}:{q}" for rel, q in (h.split(":", 1) for h in res.hot_functions)}
    assert "UltramotionIGTLib/core/tracking.py:Tracker.update" in names
    assert res.unmatched_not_hot == []  # every not-hot name is a function of the library
    hot = set(res.hot_functions)
    for entry in DEFAULT_NOT_HOT:
        assert entry not in hot, entry
