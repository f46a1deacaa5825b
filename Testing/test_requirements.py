"""One requirement list: UltramotionIGTLib/requirements.txt is what pip installs (pyproject.toml reads
it) and what the Slicer module checks, and the check compares versions.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest

from UltramotionIGTLib.requirements import PYTORCH_DISTRIBUTIONS, REQUIREMENTS, Unsatisfied, unsatisfied

tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml with tomllib")

REPO = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_pyproject_installs_the_librarys_list():
    data = pyproject()
    assert "dependencies" not in data["project"] and "dependencies" in data["project"]["dynamic"]
    assert data["tool"]["setuptools"]["dynamic"]["dependencies"] == {
        "file": ["UltramotionIGTLib/requirements.txt"]
    }
    assert "requirements.txt" in data["tool"]["setuptools"]["package-data"]["UltramotionIGTLib"]
    # the metadata pip wrote when it installed the project (make test) is that list
    from packaging.requirements import Requirement

    installed = [Requirement(r) for r in metadata.requires("ultramotion-igt") if "extra ==" not in r]
    assert {(r.name, r.specifier) for r in installed} == {
        (r.name, r.specifier) for r in map(Requirement, REQUIREMENTS)
    }, "reinstall the project (make test) after changing UltramotionIGTLib/requirements.txt"


def test_transformers_is_new_enough_for_d_fine():
    from packaging.requirements import Requirement

    (spec,) = [Requirement(r).specifier for r in REQUIREMENTS if Requirement(r).name == "transformers"]
    assert not spec.contains("4.51.3") and spec.contains("4.52.0"), (
        "DFineForObjectDetection: transformers>=4.52"
    )


def test_pytorch_distributions_are_in_the_list():
    from packaging.requirements import Requirement

    assert PYTORCH_DISTRIBUTIONS <= {Requirement(r).name for r in REQUIREMENTS}


def test_this_environment_meets_the_requirements():
    """The test environment is installed from pyproject.toml (make test), so nothing is unsatisfied."""
    assert unsatisfied() == []


def test_missing_and_outdated_packages_are_reported_with_their_versions():
    installed = metadata.version("packaging")
    assert unsatisfied([f"packaging>={installed}", f"packaging=={installed}"]) == []
    assert unsatisfied([f"packaging>{installed}"]) == [
        Unsatisfied(f"packaging>{installed}", "packaging", installed)
    ]
    (absent,) = unsatisfied(["ultramotion-igt-no-such-distribution>=1"])
    assert absent.installed is None
    assert absent.describe() == "ultramotion-igt-no-such-distribution>=1 (not installed)"
    (old,) = unsatisfied(["pytest>=9999"])
    assert old.describe() == f"pytest>=9999 ({metadata.version('pytest')} installed)"
    # names are compared normalised; markers that are false here are skipped
    assert unsatisfied(["Segment_Anything==1.0"]) == []
    assert unsatisfied(['ultramotion-igt-no-such-distribution; python_version < "3"']) == []


def test_invalid_requirement_strings_raise():
    from packaging.requirements import InvalidRequirement

    with pytest.raises(InvalidRequirement):
        unsatisfied(["not a requirement !!"])
