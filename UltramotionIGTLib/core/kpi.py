"""KPIs: per-stage timing without per-stage syncs, JSON-lines records, and summaries.

`StageTimer` records CUDA events on the device (perf_counter on CPU) and reads them back lazily,
after the frame's single device-to-host copy has completed: timing never adds a host sync.
`format_kpi` / `safe_log_kpi` keep the seed pipeline's names; a `KpiSink` is where records go
(a JSON-lines file, memory, the logging module or the Slicer KPI panel).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

LOG = logging.getLogger("UltramotionIGTLib.core.kpi")


class StageTimer:
    """Per-stage wall time for one frame.

    On CUDA, ``stage()`` records a start and an end event on the current stream and returns at once;
    ``elapsed_ms()`` waits only for the last event (call it after the frame's results were copied to
    the host, when that wait costs nothing). On CPU it uses ``time.perf_counter``.
    """

    def __init__(self, device: Any = "cpu") -> None:
        import torch

        self._torch = torch
        self.device = torch.device(device)
        self._use_cuda = self.device.type == "cuda"
        self._marks: list[tuple[str, Any, Any]] = []
        self._resolved: dict[str, float] | None = None

    def _now(self) -> Any:
        if self._use_cuda:
            event = self._torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @contextmanager
    def stage(self, name: str):
        """Time the enclosed block as stage ``name`` (names may repeat; times add up)."""
        start = self._now()
        try:
            yield
        finally:
            self._marks.append((name, start, self._now()))
            self._resolved = None

    def elapsed_ms(self) -> dict[str, float]:
        """Milliseconds per stage, in first-seen order. Waits for the last CUDA event only."""
        if self._resolved is None:
            out: dict[str, float] = {}
            if self._use_cuda and self._marks:
                self._marks[-1][2].synchronize()
            for name, start, end in self._marks:
                ms = start.elapsed_time(end) if self._use_cuda else (end - start) * 1000.0
                out[name] = out.get(name, 0.0) + float(ms)
            self._resolved = out
        return dict(self._resolved)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else None
    if isinstance(value, (np.floating,)):
        return _jsonable(float(value))
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)  # torch.device, dtype, Path ...


def format_kpi(record: Mapping[str, Any]) -> str:
    """One KPI record as a compact JSON line (``event`` first). Devices and paths become strings."""
    data = _jsonable(dict(record))
    ordered = {"event": data.pop("event", "kpi")}
    ordered.update(data)
    return json.dumps(ordered, separators=(",", ":"))


class KpiSink(Protocol):
    """Where KPI records go. One interface for the CLI (files), tests (memory) and Slicer (panel)."""

    def write(self, line: str) -> None: ...


class JsonlKpiSink:
    """Appends one JSON line per record to a file (line-buffered, so a crash loses nothing written)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("w", encoding="utf-8", buffering=1)

    def write(self, line: str) -> None:
        self._fh.write(line + "\n")

    def close(self) -> None:
        self._fh.close()


class MemoryKpiSink:
    """Keeps records in memory (tests, the Slicer panel)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, line: str) -> None:
        self.lines.append(line)

    @property
    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]


class LoggingKpiSink:
    def __init__(self, logger: logging.Logger | None = None, level: int = logging.INFO) -> None:
        self.logger = logger or LOG
        self.level = level

    def write(self, line: str) -> None:
        self.logger.log(self.level, line)


def safe_log_kpi(line: str | Mapping[str, Any], sink: KpiSink | None = None) -> bool:
    """Write a KPI line; never raises (KPI logging must not break the frame loop). Returns success."""
    try:
        text = line if isinstance(line, str) else format_kpi(line)
        (sink or LoggingKpiSink()).write(text)
        return True
    except Exception as exc:  # noqa: BLE001 - by contract: logging failures are reported, not raised
        LOG.warning("KPI record dropped: %s", exc)
        return False


def percentiles(values: Iterable[float], qs: Iterable[float] = (50, 95)) -> dict[str, float | None]:
    arr = np.asarray(list(values), dtype=np.float64)
    return {f"p{int(q)}": (float(np.percentile(arr, q)) if arr.size else None) for q in qs}


class LatencyStats:
    """Collects per-stage latencies over many frames; p50/p95 per stage for summaries and the panel."""

    def __init__(self, window: int | None = None) -> None:
        self.window = window
        self._values: dict[str, list[float]] = {}

    def add(self, stage_ms: Mapping[str, float]) -> None:
        for name, ms in stage_ms.items():
            values = self._values.setdefault(name, [])
            values.append(float(ms))
            if self.window is not None and len(values) > self.window:
                del values[0 : len(values) - self.window]

    def summary(self) -> dict[str, dict[str, float | None]]:
        return {name: percentiles(values) for name, values in self._values.items()}
