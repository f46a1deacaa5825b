"""On-screen indicators: every piece of text the Slicer module shows about the running pipeline.

The text lives here, in Qt-free library code, so that it is tested. The module only copies the
strings and colours into widgets:

- `format_kpi_panel` -> the multi-line KPI panel (device, FPS, latency p50/p95 per stage, dropped
  frames, host syncs per frame, GPU memory, age of the mask on screen and the frame it came from,
  tracked targets per visibility state);
- `status_light` -> the status light (GPU-resident / CPU / legacy path, plus idle and error):
  an enum, a colour and a tooltip;
- `format_corner_annotation` -> one short line for the slice view's corner annotation.

Input is a `KpiSnapshot`: a plain dataclass of what is shown, made by `build_snapshot` from the
session's `KpiAggregator` (frame records) and its counters. No torch import at module scope:
snapshots hold plain Python numbers.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from UltramotionIGTLib.core.kpi import KpiAggregator, ordered_stages

#: Shown where a value was not measured (yet). ASCII so it renders in every font.
MISSING = "n/a"

#: The visibility states in panel order (the keys of `FrameRecord.visibility`).
VISIBILITY_STATES: tuple[str, ...] = ("visible", "relocalizing", "lost")

#: Short stage labels for the one-line corner annotation and narrow panels.
STAGE_LABELS: dict[str, str] = {
    "prepare": "prep",
    "detector": "det",
    "select": "sel",
    "track": "trk",
    "sam_encoder": "enc",
    "sam_decoder": "dec",
    "weights": "wts",
    "visibility": "vis",
    "to_host": "d2h",
    "mrml": "mrml",
    "end_to_end": "e2e",
}


@dataclass
class KpiSnapshot:
    """What the indicators show at one moment. Plain Python values; None means "not measured".

    Times are milliseconds, memory is MiB. ``stage_latency_ms`` maps a stage name to
    ``{"p50": ms, "p95": ms, ...}`` (the format of `UltramotionIGTLib.core.kpi.KpiAggregator.stage_ms()`);
    ``end_to_end_ms`` has the same form for the whole frame, measured from the frame's acquisition
    time where the sender provides one, else from its arrival (``latency_reference`` says which).
    ``path`` is ``"gpu_resident"`` or ``"legacy"`` (as in the pipeline's KPI records).
    ``visibility``: confirmed tracks per visibility state of the last frame (``{"visible": n,
    "relocalizing": n, "lost": n}``), None when not measured.
    """

    device: str | None = None
    device_name: str | None = None
    path: str | None = None
    running: bool = False
    error: str | None = None
    fps: float | None = None
    stage_latency_ms: dict[str, dict[str, float | None]] = field(default_factory=dict)
    end_to_end_ms: dict[str, float | None] = field(default_factory=dict)
    latency_reference: str | None = None
    frames_received: int = 0
    frames_processed: int = 0
    frames_dropped: int = 0
    host_syncs_per_frame: float | None = None
    gpu_memory_allocated_mb: float | None = None
    gpu_memory_reserved_mb: float | None = None
    gpu_memory_total_mb: float | None = None
    mask_frame_index: int | None = None
    mask_age_ms: float | None = None
    latest_frame_index: int | None = None
    targets: int | None = None
    visibility: dict[str, int] | None = None
    status_message: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KpiSnapshot:
        """Build from a mapping, ignoring keys this dataclass does not know (forward compatible)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def device_type(self) -> str | None:
        """``"cuda"``, ``"cpu"``, ... from ``device`` (``"cuda:0"`` -> ``"cuda"``)."""
        if not self.device:
            return None
        return str(self.device).split(":", 1)[0].strip().lower()

    @property
    def frames_behind(self) -> int | None:
        """How many frames newer than the one the mask on screen came from have arrived."""
        if self.latest_frame_index is None or self.mask_frame_index is None:
            return None
        return max(0, int(self.latest_frame_index) - int(self.mask_frame_index))


# -- number formatting -------------------------------------------------------------------------------


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def format_ms(value: Any) -> str:
    """Milliseconds with sensible precision: ``0.42 ms``, ``12.3 ms``, ``1234 ms``; ``n/a`` if missing."""
    ms = _finite(value)
    if ms is None:
        return MISSING
    if abs(ms) < 10:
        return f"{ms:.2f} ms"
    if abs(ms) < 100:
        return f"{ms:.1f} ms"
    return f"{ms:.0f} ms"


def format_mib(value: Any) -> str:
    """MiB as ``512 MiB`` or ``12.3 GiB``; ``n/a`` if missing."""
    mib = _finite(value)
    if mib is None:
        return MISSING
    if abs(mib) >= 1024:
        return f"{mib / 1024:.1f} GiB"
    return f"{mib:.0f} MiB"


def format_fps(value: Any) -> str:
    fps = _finite(value)
    return MISSING if fps is None else f"{fps:.1f} fps"


def _p(stats: Mapping[str, Any] | None, key: str) -> float | None:
    return _finite(stats.get(key)) if stats else None


# -- status light ------------------------------------------------------------------------------------


class PathState(enum.Enum):
    """Which processing path the frames take (what the status light shows)."""

    IDLE = "idle"
    GPU_RESIDENT = "gpu_resident"
    CPU = "cpu"
    LEGACY = "legacy"
    ERROR = "error"


#: Colour per state, as ``#RRGGBB`` (usable in a Qt style sheet and in vtk after `hex_to_rgb`).
PATH_COLORS: dict[PathState, str] = {
    PathState.IDLE: "#8a8a8a",
    PathState.GPU_RESIDENT: "#2eb82e",
    PathState.CPU: "#e6b800",
    PathState.LEGACY: "#e67300",
    PathState.ERROR: "#d62929",
}

PATH_LABELS: dict[PathState, str] = {
    PathState.IDLE: "Idle",
    PathState.GPU_RESIDENT: "GPU-resident",
    PathState.CPU: "CPU",
    PathState.LEGACY: "Legacy path",
    PathState.ERROR: "Error",
}


@dataclass(frozen=True)
class StatusLight:
    """The status light: state, colour (``#RRGGBB``), a short label and a tooltip saying why."""

    state: PathState
    color: str
    label: str
    tooltip: str

    @property
    def rgb(self) -> tuple[float, float, float]:
        return hex_to_rgb(self.color)

    def style_sheet(self) -> str:
        """A Qt style sheet that draws a round light in ``color`` (for a small QLabel)."""
        return f"background-color: {self.color}; border-radius: 7px; border: 1px solid #404040;"


def hex_to_rgb(color: str) -> tuple[float, float, float]:
    """``#RRGGBB`` -> (r, g, b) in 0..1."""
    text = color.lstrip("#")
    if len(text) != 6:
        raise ValueError(f"colour must be #RRGGBB, got {color!r}")
    return tuple(int(text[i : i + 2], 16) / 255.0 for i in (0, 2, 4))  # type: ignore[return-value]


def classify_path(snapshot: KpiSnapshot) -> PathState:
    """The path state of a snapshot: error > idle > legacy > GPU-resident / CPU by device type."""
    if snapshot.error:
        return PathState.ERROR
    if not snapshot.running or not snapshot.device:
        return PathState.IDLE
    if snapshot.path == "legacy":
        return PathState.LEGACY
    if snapshot.device_type == "cuda":
        return PathState.GPU_RESIDENT
    return PathState.CPU


def status_light(snapshot: KpiSnapshot) -> StatusLight:
    """The status light for a snapshot, with a tooltip that says what it means and what to do."""
    state = classify_path(snapshot)
    device = snapshot.device or MISSING
    if snapshot.device_name:
        device = f"{device} ({snapshot.device_name})"
    if state is PathState.ERROR:
        tooltip = f"Processing stopped: {snapshot.error}"
    elif state is PathState.IDLE:
        tooltip = "Not running. Press Start (live) or Apply (one frame)."
        if snapshot.status_message:
            tooltip += f"\nLast status: {snapshot.status_message}"
    elif state is PathState.LEGACY:
        tooltip = (
            f"Legacy path on {device}: frames, boxes or masks hop to the host inside the frame loop "
            "(gpu_resident=False or sam_as_numpy=True). Kept for comparison; it is slower. "
            "Turn the legacy options off to return to the GPU-resident path."
        )
    elif state is PathState.GPU_RESIDENT:
        tooltip = (
            f"GPU-resident on {device}: one host-to-device copy of the frame and one device-to-host "
            "copy of the results per frame."
        )
    else:
        tooltip = (
            f"Running on the CPU ({device}): correct but slow. For real-time speed choose a CUDA "
            "device (needs an NVIDIA GPU and a CUDA build of PyTorch); 'Check environment' says "
            "what is missing."
        )
    syncs = _finite(snapshot.host_syncs_per_frame)
    if state in (PathState.GPU_RESIDENT, PathState.LEGACY) and syncs is not None:
        tooltip += f"\nMeasured host syncs per frame: {syncs:.1f}"
    return StatusLight(state=state, color=PATH_COLORS[state], label=PATH_LABELS[state], tooltip=tooltip)


# -- panel and corner text ---------------------------------------------------------------------------


def _mask_text(snapshot: KpiSnapshot) -> str:
    if snapshot.mask_frame_index is None:
        return "none yet"
    text = f"frame #{int(snapshot.mask_frame_index)}, age {format_ms(snapshot.mask_age_ms)}"
    behind = snapshot.frames_behind
    if behind:
        text += f", {behind} frame{'s' if behind != 1 else ''} behind"
    return text


def _gpu_memory_text(snapshot: KpiSnapshot) -> str:
    if snapshot.device_type != "cuda":
        return MISSING + " (not on a GPU)" if snapshot.device else MISSING
    alloc = _finite(snapshot.gpu_memory_allocated_mb)
    if alloc is None:
        return MISSING
    text = f"{format_mib(alloc)} allocated"
    if _finite(snapshot.gpu_memory_reserved_mb) is not None:
        text += f", {format_mib(snapshot.gpu_memory_reserved_mb)} reserved"
    if _finite(snapshot.gpu_memory_total_mb) is not None:
        text += f" of {format_mib(snapshot.gpu_memory_total_mb)}"
    return text


def _drop_text(snapshot: KpiSnapshot) -> str:
    dropped = int(snapshot.frames_dropped)
    received = int(snapshot.frames_received)
    if received > 0:
        return f"{dropped} of {received} received ({100.0 * dropped / received:.1f} %)"
    return str(dropped)


def format_kpi_panel(snapshot: KpiSnapshot) -> str:
    """The KPI panel as plain multi-line text (meant for a monospace QLabel).

    Lines: status, device, FPS, end-to-end latency, one line per stage (p50 / p95), frames
    processed and dropped, host syncs per frame, GPU memory, the mask on screen (source frame and
    age), and the status message when there is one.
    """
    light = status_light(snapshot)
    device = snapshot.device or MISSING
    if snapshot.device_name:
        device = f"{device} ({snapshot.device_name})"
    rows: list[tuple[str, str]] = [
        ("Status", light.label),
        ("Device", device),
        ("FPS", format_fps(snapshot.fps)),
    ]
    e2e = snapshot.end_to_end_ms
    e2e_text = f"p50 {format_ms(_p(e2e, 'p50'))} / p95 {format_ms(_p(e2e, 'p95'))}"
    if snapshot.latency_reference:
        e2e_text += f" (from {snapshot.latency_reference})"
    rows.append(("Latency", e2e_text))
    stages = ordered_stages(snapshot.stage_latency_ms)
    label_width = max([len(s) for s in stages] + [0])
    for name in stages:
        stats = snapshot.stage_latency_ms[name]
        rows.append(
            (
                f"  {name:<{label_width}}",
                f"p50 {format_ms(_p(stats, 'p50')):>9} / p95 {format_ms(_p(stats, 'p95')):>9}",
            )
        )
    rows += [
        ("Frames", f"{int(snapshot.frames_processed)} processed"),
        ("Dropped", _drop_text(snapshot)),
        (
            "Host syncs",
            MISSING
            if _finite(snapshot.host_syncs_per_frame) is None
            else f"{float(snapshot.host_syncs_per_frame):.1f} per frame",
        ),
        ("GPU memory", _gpu_memory_text(snapshot)),
        ("Mask shown", _mask_text(snapshot)),
    ]
    if snapshot.targets is not None:
        rows.append(("Targets", str(int(snapshot.targets))))
    if snapshot.visibility is not None:
        rows.append(("Visibility", format_visibility(snapshot.visibility)))
    if snapshot.error:
        rows.append(("Error", snapshot.error))
    elif snapshot.status_message:
        rows.append(("Message", snapshot.status_message))
    width = max(len(key) for key, _ in rows if not key.startswith("  "))
    lines = []
    for key, value in rows:
        if key.startswith("  "):
            lines.append(f"{key}  {value}")
        else:
            lines.append(f"{key + ':':<{width + 1}} {value}")
    return "\n".join(lines)


def format_visibility(counts: Mapping[str, Any]) -> str:
    """Tracked targets per visibility state: ``2 visible, 1 relocalizing, 0 lost``."""
    return ", ".join(f"{int(counts.get(name, 0) or 0)} {name}" for name in VISIBILITY_STATES)


def format_corner_annotation(snapshot: KpiSnapshot) -> str:
    """One short line for a slice view corner: ``GPU | 31.2 fps | e2e 24.1 ms | drop 3 | mask #120 33.0 ms``."""
    light = status_light(snapshot)
    if light.state is PathState.ERROR:
        return f"UltramotionIGT stopped: {snapshot.error}"
    if light.state is PathState.IDLE:
        return "UltramotionIGT idle"
    short = {PathState.GPU_RESIDENT: "GPU", PathState.CPU: "CPU", PathState.LEGACY: "LEGACY"}[light.state]
    parts = [short, format_fps(snapshot.fps)]
    p50 = _p(snapshot.end_to_end_ms, "p50")
    if p50 is not None:
        parts.append(f"e2e {format_ms(p50)}")
    parts.append(f"drop {int(snapshot.frames_dropped)}")
    if snapshot.mask_frame_index is not None:
        parts.append(f"mask #{int(snapshot.mask_frame_index)} {format_ms(snapshot.mask_age_ms)}")
    return " | ".join(parts)


# -- building snapshots ------------------------------------------------------------------------------


def build_snapshot(
    kpi: KpiAggregator,
    *,
    running: bool,
    frames_received: int | None = None,
    frames_dropped: int = 0,
    status_message: str = "",
    error: str | None = None,
    device: str | None = None,
    device_name: str | None = None,
    path: str | None = None,
    **gpu_memory: float | None,
) -> KpiSnapshot:
    """What the indicators show now, from a session's aggregator and counters.

    The mask on screen is the last record's frame; its age is the time since that record arrived.
    ``device`` / ``path`` default to the last record's. ``gpu_memory``: the keys of `gpu_memory_mb`.
    """
    last = kpi.last
    return KpiSnapshot(
        device=device or (last.device if last else None),
        device_name=device_name,
        path=path or (last.path if last else None),
        running=running,
        error=error,
        fps=kpi.fps(),
        stage_latency_ms=kpi.stage_ms(),
        end_to_end_ms=kpi.end_to_end_ms() if kpi.frames else {},
        latency_reference=last.latency_reference if last else None,
        frames_received=kpi.frames if frames_received is None else int(frames_received),
        frames_processed=kpi.frames,
        frames_dropped=int(frames_dropped),
        host_syncs_per_frame=kpi.host_syncs_per_frame(),
        gpu_memory_allocated_mb=gpu_memory.get("gpu_memory_allocated_mb"),
        gpu_memory_reserved_mb=gpu_memory.get("gpu_memory_reserved_mb"),
        gpu_memory_total_mb=gpu_memory.get("gpu_memory_total_mb"),
        mask_frame_index=last.frame if last else None,
        mask_age_ms=kpi.age_ms(),
        latest_frame_index=(int(frames_received) - 1 if frames_received else (last.frame if last else None)),
        targets=last.targets if last else None,
        visibility=last.visibility if last else None,
        status_message=status_message,
    )


def gpu_memory_mb(device: Any) -> dict[str, float | None]:
    """GPU memory of ``device`` in MiB (allocated, reserved, total); all None off CUDA.

    Reads allocator counters only (no device sync). Imports torch lazily.
    """
    out: dict[str, float | None] = {
        "gpu_memory_allocated_mb": None,
        "gpu_memory_reserved_mb": None,
        "gpu_memory_total_mb": None,
    }
    if device is None or not str(device).startswith("cuda"):
        return out
    import torch

    dev = torch.device(device)
    mib = 1024.0 * 1024.0
    out["gpu_memory_allocated_mb"] = torch.cuda.memory_allocated(dev) / mib
    out["gpu_memory_reserved_mb"] = torch.cuda.memory_reserved(dev) / mib
    out["gpu_memory_total_mb"] = torch.cuda.get_device_properties(dev).total_memory / mib
    return out
