"""The library's run-time requirements, and which of them this Python environment does not meet.

`REQUIREMENTS` is read from ``requirements.txt`` beside this file: the one list, which pip also
installs from (``pyproject.toml`` declares its dependencies dynamic, from that file). It is read from
the package and not from installed package metadata (``importlib.metadata.requires``) because the
3D Slicer extension ships the library as plain files beside its module: there is no installed
distribution to ask there, and where there is one it may describe another copy than the one running
(a development checkout on ``PYTHONPATH`` over an editable install).

Imports no torch and nothing heavy: the Slicer module checks its dependencies with it before it
imports anything else of the library. ``packaging`` (a dependency, and part of 3D Slicer's Python)
is imported only when `unsatisfied` runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

REQUIREMENTS_FILE = Path(__file__).with_name("requirements.txt")


def read_requirements(path: Path = REQUIREMENTS_FILE) -> tuple[str, ...]:
    """The PEP 508 lines of a requirements file (comments and blank lines dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return tuple(line for line in lines if line)


#: The library's run-time requirements (``requirements.txt``), in file order.
REQUIREMENTS: tuple[str, ...] = read_requirements()

#: Distributions that 3D Slicer gets from its PyTorch extension (``PyTorchUtils``), never from pip:
#: the right wheel depends on the GPU driver, which the extension knows how to pick.
PYTORCH_DISTRIBUTIONS = frozenset({"torch", "torchvision"})


@dataclass(frozen=True)
class Unsatisfied:
    """One requirement this environment does not meet.

    ``requirement``: the PEP 508 string as listed (e.g. ``"transformers>=4.52"``); ``name``: its
    distribution name, normalised (lower case, ``-`` for ``_``/``.``); ``installed``: the installed
    version, or None when the distribution is not installed at all.
    """

    requirement: str
    name: str
    installed: str | None

    def describe(self) -> str:
        """``"transformers>=4.52 (4.50.0 installed)"`` or ``"pynrrd>=1.0 (not installed)"``."""
        found = "not installed" if self.installed is None else f"{self.installed} installed"
        return f"{self.requirement} ({found})"


def unsatisfied(requirements: Iterable[str] = REQUIREMENTS) -> list[Unsatisfied]:
    """The requirements (PEP 508 strings) that the running Python does not satisfy, in list order.

    A requirement is unsatisfied when its distribution is not installed
    (``importlib.metadata.version`` raises ``PackageNotFoundError``) or when the installed version
    is outside its specifier (PEP 440 comparison by ``packaging``; pre-releases and local versions
    such as ``2.14.1+cu128`` count as their release). Requirements whose environment marker is
    false here are skipped. Raises ``packaging.requirements.InvalidRequirement`` for a string that
    is not PEP 508.
    """
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    missing = []
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            missing.append(Unsatisfied(text, name, None))
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            missing.append(Unsatisfied(text, name, installed))
    return missing
