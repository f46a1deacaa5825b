"""Shared pytest fixtures: real PLUS recordings, devices, temporary model folders, host-hop counts."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTING_DIR = Path(__file__).resolve().parent


def plus_data_dir() -> Path:
    """Where the real PLUS recordings are: $ULTRAMOTION_PLUS_DATA, else ../shared/data/plus."""
    env = os.environ.get("ULTRAMOTION_PLUS_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "plus"


@pytest.fixture(scope="session")
def plus_dir() -> Path:
    path = plus_data_dir()
    if not (path / "SpinePhantomFreehand.igs.mha").is_file():
        pytest.skip(
            f"PLUS recordings not found at {path}: set ULTRAMOTION_PLUS_DATA or fetch them "
            "(see Resources/SampleData/plus_recordings.json)"
        )
    return path


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    import importlib.util

    has_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        has_cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs CUDA; none on this machine")
    skip_slow = pytest.mark.skip(reason="slow: opt in with --runslow")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)


class HostHops:
    """What the runtime transfer audit counted inside one ``host_hops()`` block.

    ``undeclared``: category -> count of undeclared or over-budget events (host syncs, device-to-host
    copies, blocking uploads); ``declared``: declaration reason -> count within budget; ``events``:
    every `HopEvent`, with its origin ``file:line``.
    """

    def __init__(self, audit: Any) -> None:
        self.audit = audit

    @property
    def events(self) -> list[Any]:
        return list(self.audit.events)

    @property
    def undeclared(self) -> Counter:
        return Counter(e.category for e in self.audit.events if e.counts_against)

    @property
    def declared(self) -> Counter:
        return Counter(e.declared for e in self.audit.events if e.declared is not None and not e.over_budget)

    def __repr__(self) -> str:
        rows = [f"{e.origin}: {e.category} ({e.op}), declared={e.declared!r}" for e in self.audit.events]
        return "HostHops([" + "; ".join(rows) + "])"


@pytest.fixture
def host_hops():
    """``with host_hops(*device_tensors) as hops:`` counts, on this thread, what the block would sync,
    copy to the host or upload on a GPU: the runtime transfer audit (`RuntimeTransferAudit`), on the
    CPU with its emulated placement. ``device_tensors``: inputs the test made from numpy, to be taken
    as device tensors (tensors made by torch before the block already are)."""
    from UltramotionIGTLib.tools.audit.runtime import RuntimeTransferAudit

    @contextmanager
    def count(*device_tensors: Any, device: str = "cpu") -> Iterator[HostHops]:
        with RuntimeTransferAudit(device, our_roots=[TESTING_DIR]) as audit:
            audit.assume_on_device(*device_tensors)
            with audit.frame(0):
                yield HostHops(audit)

    return count
