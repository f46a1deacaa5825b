"""Shared pytest fixtures: real PLUS recordings, devices, temporary model folders, host-hop counts
(`host_hops`, built on the runtime transfer audit), and the guard that fails a test which leaves one of
torch's process-wide settings changed."""

from __future__ import annotations

import importlib.util
import os
from collections import Counter
from collections.abc import Callable, Iterator
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


# ------------------------------------------------------------------ torch's process-wide settings

HAS_TORCH = importlib.util.find_spec("torch") is not None


def _torch_global_settings() -> dict[str, tuple[Callable[[], Any], Callable[[Any], None] | None]]:
    """name -> (getter, setter or None) of every torch setting that holds for the whole process and
    that library code or a test could change: threads, determinism, grad/inference mode, default
    dtype and device, anomaly detection, autocast, cuDNN and matmul precision flags, SDPA kernels,
    the CUDA sync debug mode (read only once CUDA is initialised: reading it would initialise CUDA).
    """
    import torch

    cudnn, matmul, cuda = torch.backends.cudnn, torch.backends.cuda.matmul, torch.backends.cuda

    def attribute(obj: Any, name: str) -> tuple[Callable[[], Any], Callable[[Any], None]]:
        return (lambda: getattr(obj, name)), (lambda value: setattr(obj, name, value))

    settings: dict[str, tuple[Callable[[], Any], Callable[[Any], None] | None]] = {
        "torch.get_num_threads()": (torch.get_num_threads, torch.set_num_threads),
        "torch.get_num_interop_threads()": (torch.get_num_interop_threads, None),
        "torch.are_deterministic_algorithms_enabled() / warn_only": (
            lambda: (
                torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
            ),
            lambda value: torch.use_deterministic_algorithms(value[0], warn_only=value[1]),
        ),
        "torch.utils.deterministic.fill_uninitialized_memory": attribute(
            torch.utils.deterministic, "fill_uninitialized_memory"
        ),
        "torch.is_grad_enabled()": (torch.is_grad_enabled, torch.set_grad_enabled),
        "torch.is_inference_mode_enabled()": (torch.is_inference_mode_enabled, None),
        "torch.get_default_dtype()": (torch.get_default_dtype, torch.set_default_dtype),
        "torch.get_default_device()": (torch.get_default_device, torch.set_default_device),
        "torch.is_anomaly_enabled() / check_nan": (
            lambda: (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
            lambda value: torch.set_anomaly_enabled(*value),
        ),
        "torch.is_autocast_enabled('cpu')": (lambda: torch.is_autocast_enabled("cpu"), None),
        "torch.is_autocast_enabled('cuda')": (lambda: torch.is_autocast_enabled("cuda"), None),
        "torch.backends.cudnn.enabled": attribute(cudnn, "enabled"),
        "torch.backends.cudnn.benchmark": attribute(cudnn, "benchmark"),
        "torch.backends.cudnn.deterministic": attribute(cudnn, "deterministic"),
        "torch.backends.cudnn.allow_tf32": attribute(cudnn, "allow_tf32"),
        "torch.backends.cuda.matmul.allow_tf32": attribute(matmul, "allow_tf32"),
        "torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction": attribute(
            matmul, "allow_fp16_reduced_precision_reduction"
        ),
        "torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction": attribute(
            matmul, "allow_bf16_reduced_precision_reduction"
        ),
        "torch.get_float32_matmul_precision()": (
            torch.get_float32_matmul_precision,
            torch.set_float32_matmul_precision,
        ),
        "torch.backends.mkldnn.enabled": attribute(torch.backends.mkldnn, "enabled"),
        "torch.backends.cuda.flash_sdp_enabled()": (cuda.flash_sdp_enabled, cuda.enable_flash_sdp),
        "torch.backends.cuda.mem_efficient_sdp_enabled()": (
            cuda.mem_efficient_sdp_enabled,
            cuda.enable_mem_efficient_sdp,
        ),
        "torch.backends.cuda.math_sdp_enabled()": (cuda.math_sdp_enabled, cuda.enable_math_sdp),
        "torch.backends.cuda.cudnn_sdp_enabled()": (cuda.cudnn_sdp_enabled, cuda.enable_cudnn_sdp),
        "torch.cuda.get_sync_debug_mode()": (
            lambda: torch.cuda.get_sync_debug_mode() if torch.cuda.is_initialized() else 0,
            torch.cuda.set_sync_debug_mode,
        ),
    }
    for owner, label in ((matmul, "torch.backends.cuda.matmul"), (cudnn, "torch.backends.cudnn")):
        if hasattr(owner, "fp32_precision"):  # torch >= 2.9: the successor of allow_tf32
            settings[f"{label}.fp32_precision"] = attribute(owner, "fp32_precision")
    return settings


def _read_settings(settings: dict[str, tuple[Callable[[], Any], Any]]) -> dict[str, Any]:
    return {name: get() for name, (get, _) in settings.items()}


def _check_settings(
    before: dict[str, Any], settings: dict[str, tuple[Callable[[], Any], Any]], who: str
) -> None:
    """Fail naming every setting that differs from ``before``, after putting back those that can be."""
    after = _read_settings(settings)
    changed = {name: (before[name], after[name]) for name in before if after[name] != before[name]}
    for name in changed:
        setter = settings[name][1]
        if setter is not None:
            setter(before[name])  # so that one leak does not fail every later test
    if changed:
        lines = "; ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in changed.items())
        pytest.fail(f"{who} changed torch's process-wide settings and did not restore them: {lines}")


@pytest.fixture(autouse=True)
def torch_settings_restored(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test (at teardown, after its own fixtures) that leaves a `_torch_global_settings` entry
    changed; the setting is put back first."""
    if not HAS_TORCH:
        yield
        return
    settings = _torch_global_settings()
    before = _read_settings(settings)
    yield
    _check_settings(before, settings, request.node.nodeid)


@pytest.fixture(scope="session", autouse=True)
def torch_settings_restored_by_session_fixtures() -> Iterator[None]:
    """The same check over the whole run: catches module- and session-scoped fixtures, whose setup
    and teardown fall outside the per-test check."""
    if not HAS_TORCH:
        yield
        return
    settings = _torch_global_settings()
    before = _read_settings(settings)
    yield
    _check_settings(before, settings, "a module- or session-scoped fixture")


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


@pytest.fixture(scope="session")
def random_models(tmp_path_factory) -> tuple[Path, Path]:
    """(detector folder, SAM .safetensors): small random-weight models in the real formats, written once."""
    from UltramotionIGTLib.core.detector import write_random_detector
    from UltramotionIGTLib.core.sam import write_random_sam_checkpoint

    root = tmp_path_factory.mktemp("random-models")
    det = write_random_detector(root / "detector", seed=0)
    sam = write_random_sam_checkpoint(root / "sam" / "sam_vit_t_demo.safetensors", seed=0)
    return Path(det), Path(sam)
