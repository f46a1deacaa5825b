"""One requirement list: the library's `REQUIREMENTS` is pyproject.toml's, and the check compares versions.

The Slicer module checks and installs its dependencies from `UltramotionIGTLib.requirements`
(shipped beside it in the extension, where no package metadata exists), so that list must be the
one pip installs from.
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


def test_the_library_list_is_pyprojects_dependencies():
    assert list(REQUIREMENTS) == pyproject()["project"]["dependencies"], (
        "UltramotionIGTLib/requirements.py REQUIREMENTS must equal [project] dependencies in "
        "pyproject.toml, string for string: change both"
    )


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
