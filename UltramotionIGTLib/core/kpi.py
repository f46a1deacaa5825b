"""KPIs: per-stage timing without per-stage syncs, THE per-frame KPI record, sinks and one aggregator.

- `StageTimer` records CUDA events on the device (perf_counter on CPU) and reads them back lazily,
  after the frame's single device-to-host copy has completed: timing never adds a host sync.
- `FrameRecord` is the one record of a processed frame, used by the pipeline's callers (CLI, Slicer
  sessions, gateway) and read by the indicators; its JSON form (`format_kpi`) is a line of
  ``kpi.jsonl``. Stage names are those of `STAGES` (device work, in the order it runs) and
  `HOST_STAGES` (after the host copy).
- A `KpiSink` is where records go; only `JsonlKpiSink` (and `LoggingKpiSink`) serialise.
  `safe_log_kpi` keeps the seed pipeline's name and never raises.
- `KpiAggregator` is the one windowed aggregator: FPS and p50/p95/p99 per stage and end to end.
"""

from __future__ import annotations

import json
import logging
import math
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np

LOG = logging.getLogger(__name__)

#: Device stages of `Pipeline.process_frame`, in the order they run.
STAGES: tuple[str, ...] = (
    "prepare",
    "detector",
    "select",
    "sam_encoder",
    "sam_decoder",
    "weights",
    "track",
    "visibility",
)
#: Host-side stages after the frame's device-to-host copy: writing the result (MRML, file, network).
HOST_STAGES: tuple[str, ...] = ("mrml",)
#: Every known stage, in order; other names are kept and listed after these, in the order seen.
STAGE_ORDER: tuple[str, ...] = STAGES + HOST_STAGES

#: Percentiles reported by `KpiAggregator` (``p50``, ``p95``, ``p99``).
QUANTILES: tuple[int, ...] = (50, 95, 99)


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
        return value if math.isfinite(value) else None
    if isinstance(value, (np.floating,)):
        return _jsonable(float(value))
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)  # torch.device, dtype, Path ...


def ordered_stages(names: Iterable[str]) -> list[str]:
    """Stage names in `STAGE_ORDER`, unknown ones after, in their given order."""
    names = list(names)
    return [n for n in STAGE_ORDER if n in names] + [n for n in names if n not in STAGE_ORDER]


@dataclass
class FrameRecord:
    """The KPIs of one processed frame (``event: "frame"`` in ``kpi.jsonl``). None = not measured.

    frame: index of the frame in its stream (arrival number live, item number in a recording).
    stage_ms: milliseconds per stage (`STAGES`, then `HOST_STAGES`), CUDA-event or perf_counter time.
    targets: valid targets in the result. visibility: confirmed tracks per visibility state
    (``{"visible": n, "relocalizing": n, "lost": n}``; None when the stage is off). device: ``"cpu"``,
    ``"cuda:0"``... path: ``"gpu_resident"``
    (the core pipeline) or ``"legacy"`` (the in-house habits kept for comparison). tensor_devices:
    the device of each result before the host copy (boxes, masks, weights, track ids).
    timestamp: acquisition time of the frame in seconds, on the sender's clock when it has one.
    wall_ms: this process's time from taking the frame to its result written (perf_counter).
    latency_ms / latency_reference: end-to-end latency and where it starts (``"acquisition"``: the
    sender's timestamp, possibly clock-aligned; ``"arrival"``: when the frame reached this process).
    queue_ms: time the frame waited between arrival and the start of processing.
    host_syncs / declared_hops: undeclared and declared device-to-host syncs of this frame, from the
    runtime transfer audit when it is on. frames_received / frames_processed / frames_dropped: the
    stream's counters after this frame (sessions, gateway). index_value: the sequence item's index
    value (replay). intensity: the intensity window the frame went through
    (`core.intensity.IntensityWindow.to_dict`: rule, window, pixel type). extra: anything else, kept
    as given (JSON-able values).
    """

    frame: int
    stage_ms: dict[str, float] = field(default_factory=dict)
    targets: int | None = None
    visibility: dict[str, int] | None = None
    device: str | None = None
    path: str | None = None
    tensor_devices: dict[str, str] | None = None
    timestamp: float | None = None
    wall_ms: float | None = None
    latency_ms: float | None = None
    latency_reference: str | None = None
    queue_ms: float | None = None
    host_syncs: float | None = None
    declared_hops: float | None = None
    frames_received: int | None = None
    frames_processed: int | None = None
    frames_dropped: int | None = None
    index_value: str | None = None
    intensity: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    event = "frame"

    @classmethod
    def from_result(cls, result: Any, **values: Any) -> FrameRecord:
        """The record of a `HostResult` (frame index, stage times, targets, visibility counts, device,
        path) plus ``values``: fields by name, anything else into ``extra``."""
        counts = getattr(result, "state_counts", None)
        base: dict[str, Any] = {
            "frame": int(result.frame_index),
            "stage_ms": {str(k): float(v) for k, v in (result.stage_ms or {}).items()},
            "targets": len(result),
            "visibility": counts() if counts is not None else None,
            "device": getattr(result, "device", None),
            "path": getattr(result, "path", None),
            "tensor_devices": getattr(result, "tensor_devices", None) or None,
            "timestamp": result.timestamp,
            "intensity": getattr(result, "intensity", None),
        }
        known = {f.name for f in fields(cls)}
        extra = dict(values.pop("extra", None) or {})
        extra.update({k: values.pop(k) for k in list(values) if k not in known})
        base.update(values)
        return cls(**base, extra=extra)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FrameRecord:
        """Inverse of `to_dict` (a parsed ``kpi.jsonl`` line); unknown keys go to ``extra``."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        extra = dict(values.pop("extra", None) or {})
        extra.update({k: v for k, v in data.items() if k not in known and k != "event"})
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """``{"event": "frame", ...}``: the stages in order, unmeasured (None) fields left out, and the
        ``extra`` keys at the top level (where `from_dict` puts them back)."""
        out: dict[str, Any] = {"event": self.event}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "stage_ms":
                value = {name: value[name] for name in ordered_stages(value)}
            if value is not None and f.name != "extra":
                out[f.name] = value
        # any field name, set or not: from_dict would read such a key back as the field
        clash = sorted(set(self.extra) & ({f.name for f in fields(self)} | {"event"}))
        if clash:
            raise ValueError(f"FrameRecord.extra must not repeat a field: {clash}")
        out.update(self.extra)
        return out

    def end_to_end_ms(self) -> float | None:
        """The frame's end-to-end time: ``latency_ms``, else ``wall_ms``, else the sum of its stages."""
        for value in (self.latency_ms, self.wall_ms):
            if value is not None and math.isfinite(value):
                return float(value)
        return float(sum(self.stage_ms.values())) if self.stage_ms else None


def as_record(record: FrameRecord | Mapping[str, Any] | str) -> FrameRecord | dict[str, Any]:
    """A `FrameRecord` for a frame record in any form (object, mapping, JSON line); other events as dicts."""
    if isinstance(record, FrameRecord):
        return record
    data = json.loads(record) if isinstance(record, str) else dict(record)
    if data.get("event", "frame") == "frame":
        return FrameRecord.from_dict(data)
    return data


def format_kpi(record: FrameRecord | Mapping[str, Any]) -> str:
    """One KPI record as a compact JSON line (``event`` first): floats at full precision (NaN and
    infinities as null), devices, dtypes and paths as strings."""
    data = _jsonable(record.to_dict() if isinstance(record, FrameRecord) else dict(record))
    ordered = {"event": data.pop("event", "kpi")}
    ordered.update(data)
    return json.dumps(ordered, separators=(",", ":"))


class KpiSink(Protocol):
    """Where KPI records go: `FrameRecord`s and event mappings (``{"event": "start", ...}``).

    One interface for the CLI (files), tests (memory), Slicer (the aggregator behind the panel) and
    logging. Only the sinks that write text serialise.
    """

    def write(self, record: FrameRecord | Mapping[str, Any]) -> None: ...


class JsonlKpiSink:
    """Appends one JSON line per record to a file (line-buffered, so a crash loses nothing written)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("w", encoding="utf-8", buffering=1)

    def write(self, record: FrameRecord | Mapping[str, Any]) -> None:
        self._fh.write(format_kpi(record) + "\n")

    def close(self) -> None:
        self._fh.close()


class MemoryKpiSink:
    """Keeps the records in memory, as given (tests)."""

    def __init__(self) -> None:
        self.items: list[FrameRecord | Mapping[str, Any]] = []

    def write(self, record: FrameRecord | Mapping[str, Any]) -> None:
        self.items.append(record)

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every record as the dict its JSON line would parse to."""
        return [json.loads(format_kpi(r)) for r in self.items]


class LoggingKpiSink:
    """Logs each record as its JSON line."""

    def __init__(self, logger: logging.Logger | None = None, level: int = logging.INFO) -> None:
        self.logger = logger or LOG
        self.level = level

    def write(self, record: FrameRecord | Mapping[str, Any]) -> None:
        self.logger.log(self.level, format_kpi(record))


class FanoutKpiSink:
    """Gives every record to several sinks (e.g. a JSON-lines file and an aggregator)."""

    def __init__(self, *sinks: KpiSink | None) -> None:
        self.sinks = [s for s in sinks if s is not None]

    def write(self, record: FrameRecord | Mapping[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)


def safe_log_kpi(record: FrameRecord | Mapping[str, Any], sink: KpiSink | None = None) -> bool:
    """Give ``record`` to ``sink`` (default: the logging module); never raises (KPI logging must not
    break the frame loop). Returns success."""
    try:
        (sink or LoggingKpiSink()).write(record)
        return True
    except Exception as exc:  # noqa: BLE001 - by contract: logging failures are reported, not raised
        LOG.warning("KPI record dropped: %s", exc)
        return False


class _Series:
    """The last ``window`` values of one quantity (all of them when ``window`` is None, as float32)."""

    def __init__(self, window: int | None) -> None:
        self.values: deque[float] | array = deque(maxlen=window) if window else array("f")

    def add(self, value: float) -> None:
        self.values.append(value)

    def percentiles(self, qs: Iterable[int] = QUANTILES) -> dict[str, float | None]:
        arr = np.asarray(self.values, dtype=np.float64)
        return {f"p{int(q)}": (float(np.percentile(arr, q)) if arr.size else None) for q in qs}

    def mean(self) -> float | None:
        return float(np.mean(np.asarray(self.values, dtype=np.float64))) if len(self.values) else None


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class KpiAggregator:
    """The one aggregator of frame records: FPS and p50/p95/p99 per stage and end to end.

    A `KpiSink`: give it `FrameRecord`s (or their dicts / JSON lines; other events are ignored).
    ``window``: frames kept for percentiles and FPS (None: every frame of the run, 4 bytes per value
    and quantity, for run summaries). ``clock``: seconds, monotonic (an input, so tests can set it).
    End to end is each record's `FrameRecord.end_to_end_ms`.
    """

    def __init__(self, window: int | None = 120, clock: Callable[[], float] = time.monotonic) -> None:
        if window is not None and window < 2:
            raise ValueError(f"window must be >= 2 frames (or None: all), got {window}")
        self.window = window
        self.clock = clock
        self.frames = 0
        self.last: FrameRecord | None = None
        self.last_done_at: float | None = None
        self._stages: dict[str, _Series] = {}
        self._end_to_end = _Series(window)
        self._syncs = _Series(window)
        self._declared = _Series(window)
        self._done_at: deque[float] = deque(maxlen=window or 120)

    def write(self, record: FrameRecord | Mapping[str, Any] | str) -> None:
        record = as_record(record)
        if not isinstance(record, FrameRecord):
            return
        now = self.clock()
        self.frames += 1
        self.last = record
        self.last_done_at = now
        self._done_at.append(now)
        for name, ms in record.stage_ms.items():
            value = _finite(ms)
            if value is not None:
                self._stages.setdefault(name, _Series(self.window)).add(value)
        e2e = record.end_to_end_ms()
        if e2e is not None:
            self._end_to_end.add(e2e)
        for series, value in ((self._syncs, record.host_syncs), (self._declared, record.declared_hops)):
            value = _finite(value)
            if value is not None:
                series.add(value)

    add = write

    def fps(self) -> float | None:
        """Frames finished per second over the last (up to 120, or ``window``) frames; None before two."""
        if len(self._done_at) < 2:
            return None
        span = self._done_at[-1] - self._done_at[0]
        return (len(self._done_at) - 1) / span if span > 0 else None

    def stage_ms(self, qs: Iterable[int] = QUANTILES) -> dict[str, dict[str, float | None]]:
        """{stage: {"p50": ms, "p95": ms, "p99": ms}} in stage order."""
        return {name: self._stages[name].percentiles(qs) for name in ordered_stages(self._stages)}

    def end_to_end_ms(self, qs: Iterable[int] = QUANTILES) -> dict[str, float | None]:
        return self._end_to_end.percentiles(qs)

    def host_syncs_per_frame(self) -> float | None:
        """Mean undeclared host syncs per frame (None when no record carried a count)."""
        return self._syncs.mean()

    def declared_hops_per_frame(self) -> float | None:
        return self._declared.mean()

    def age_ms(self) -> float | None:
        """Milliseconds since the last record arrived (the age of the result on screen)."""
        return None if self.last_done_at is None else (self.clock() - self.last_done_at) * 1000.0

    def summary(self) -> dict[str, Any]:
        """Plain values for summaries (``summary.json``, end-of-session events)."""
        return {
            "frames": self.frames,
            "stage_ms": self.stage_ms(),
            "end_to_end_ms": self.end_to_end_ms(),
            "host_syncs_per_frame": self.host_syncs_per_frame(),
            "declared_hops_per_frame": self.declared_hops_per_frame(),
        }


#: Acquisition timestamps within this many seconds of the arrival time are taken to be on the same
#: (Unix) clock; others are on the sender's own clock (PLUS) and are offset-corrected.
SAME_CLOCK_TOLERANCE_S = 5.0


class SenderClock:
    """Start of a frame's end-to-end latency interval: the sender's acquisition timestamp, aligned to
    the local clock (used by the Slicer live session and the gateway, one rule).

    A timestamp within `SAME_CLOCK_TOLERANCE_S` of the arrival time is on the same (Unix) clock;
    otherwise the sender has its own clock and the smallest arrival - timestamp offset seen so far
    aligns it (the least-delayed frame's offset: network and queue delays only add).
    """

    def __init__(self) -> None:
        self._offset: float | None = None

    def reference(self, timestamp: float | None, arrival: float) -> tuple[float, str]:
        """(start time in local Unix seconds, its name) for a frame acquired at ``timestamp``
        (sender's seconds; None, non-finite or <= 0: unknown) that arrived at ``arrival``."""
        if timestamp is None or not math.isfinite(timestamp) or timestamp <= 0:
            return arrival, "arrival"
        offset = arrival - timestamp
        if abs(offset) <= SAME_CLOCK_TOLERANCE_S:
            return timestamp, "acquisition"
        self._offset = offset if self._offset is None else min(self._offset, offset)
        return timestamp + self._offset, "acquisition (sender clock, aligned)"
