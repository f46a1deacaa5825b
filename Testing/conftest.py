"""Shared pytest fixtures: real PLUS recordings, devices, temporary model folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


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
