"""The on-screen indicator text (KPI panel, status light, corner annotation), `KpiAggregator` and
`build_snapshot`."""

from __future__ import annotations

import re

import numpy as np
import pytest

from UltramotionIGTLib.core.kpi import FrameRecord, KpiAggregator, format_kpi
from UltramotionIGTLib.slicer.indicators import (
    MISSING,
    PATH_COLORS,
    KpiSnapshot,
    PathState,
    build_snapshot,
    classify_path,
    format_corner_annotation,
    format_kpi_panel,
    format_ms,
    gpu_memory_mb,
    hex_to_rgb,
    ordered_stages,
    status_light,
)


def _running(**kw) -> KpiSnapshot:
    base = dict(device="cuda:0", device_name="NVIDIA H100", path="gpu_resident", running=True)
    base.update(kw)
    return KpiSnapshot(**base)


def _panel_dict(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if not line.startswith("  ") and ":" in line:
            key, value = line.split(":", 1)
            out[key.strip()] = value.strip()
    return out


class FakeClock:
    """A settable monotonic clock (time is an input of KpiAggregator, not a thing being mocked)."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize(
    ("kw", "state"),
    [
        (dict(), PathState.GPU_RESIDENT),
        (dict(device="cpu", device_name=None), PathState.CPU),
        (dict(path="legacy"), PathState.LEGACY),
        (dict(device="cpu", path="legacy"), PathState.LEGACY),
        (dict(running=False), PathState.IDLE),
        (dict(device=None), PathState.IDLE),
        (dict(error="input volume was deleted"), PathState.ERROR),
    ],
)
def test_status_light_states(kw, state):
    snap = _running(**kw)
    light = status_light(snap)
    assert classify_path(snap) is state
    assert light.state is state
    assert light.color == PATH_COLORS[state]
    assert re.fullmatch(r"#[0-9a-f]{6}", light.color)
    assert all(0.0 <= c <= 1.0 for c in light.rgb)
    assert light.color in light.style_sheet()
    assert light.label and light.tooltip


def test_status_light_colours_are_distinct_and_tooltips_say_what_to_do():
    assert len(set(PATH_COLORS.values())) == len(PathState)
    assert "cuda:0 (NVIDIA H100)" in status_light(_running()).tooltip
    cpu = status_light(_running(device="cpu", device_name=None)).tooltip
    assert "CUDA" in cpu and "Check environment" in cpu
    legacy = status_light(_running(path="legacy")).tooltip
    assert "gpu_resident=False" in legacy
    err = status_light(_running(error="geometry changed")).tooltip
    assert "geometry changed" in err
    syncs = status_light(_running(host_syncs_per_frame=2.0)).tooltip
    assert "2.0" in syncs


def test_hex_to_rgb():
    assert hex_to_rgb("#ff8000") == (1.0, 128 / 255, 0.0)
    with pytest.raises(ValueError, match="RRGGBB"):
        hex_to_rgb("#fff")


def test_format_ms_precision():
    assert format_ms(None) == MISSING
    assert format_ms(float("nan")) == MISSING
    assert format_ms(0.4213) == "0.42 ms"
    assert format_ms(12.34) == "12.3 ms"
    assert format_ms(1234.4) == "1234 ms"


def test_panel_shows_every_kpi():
    stats = KpiAggregator(window=None)
    rng = np.random.default_rng(0)
    det = rng.uniform(5, 9, size=50)
    dec = rng.uniform(1, 2, size=50)
    for i, (a, b) in enumerate(zip(det, dec, strict=True)):
        stats.add(FrameRecord(frame=i, stage_ms={"sam_decoder": b, "detector": a, "my_custom_stage": 0.5}))
    snap = _running(
        fps=31.25,
        stage_latency_ms=stats.stage_ms(),
        end_to_end_ms={"p50": 24.0, "p95": 31.5},
        latency_reference="acquisition",
        frames_received=200,
        frames_processed=150,
        frames_dropped=50,
        host_syncs_per_frame=1.0,
        gpu_memory_allocated_mb=512.0,
        gpu_memory_reserved_mb=1024.0,
        gpu_memory_total_mb=81559.0,
        mask_frame_index=120,
        mask_age_ms=33.0,
        latest_frame_index=123,
        targets=3,
        visibility={"visible": 2, "relocalizing": 1, "lost": 0},
    )
    text = format_kpi_panel(snap)
    rows = _panel_dict(text)
    assert rows["Status"] == "GPU-resident"
    assert rows["Device"] == "cuda:0 (NVIDIA H100)"
    assert rows["FPS"] == "31.2 fps"
    assert rows["Latency"] == "p50 24.0 ms / p95 31.5 ms (from acquisition)"
    assert rows["Frames"] == "150 processed"
    assert rows["Dropped"] == "50 of 200 received (25.0 %)"
    assert rows["Host syncs"] == "1.0 per frame"
    assert rows["GPU memory"] == "512 MiB allocated, 1.0 GiB reserved of 79.6 GiB"
    assert rows["Mask shown"] == "frame #120, age 33.0 ms, 3 frames behind"
    assert rows["Targets"] == "3"
    assert rows["Visibility"] == "2 visible, 1 relocalizing, 0 lost"
    # per-stage lines: pipeline order first, unknown stages after; values are the real percentiles
    stage_lines = [line for line in text.splitlines() if line.startswith("  ")]
    assert [line.split()[0] for line in stage_lines] == ["detector", "sam_decoder", "my_custom_stage"]
    det_line = stage_lines[0]
    assert format_ms(np.percentile(det, 50)) in det_line
    assert format_ms(np.percentile(det, 95)) in det_line


def test_panel_when_nothing_measured_yet():
    text = format_kpi_panel(KpiSnapshot())
    rows = _panel_dict(text)
    assert rows["Status"] == "Idle"
    assert rows["Device"] == MISSING
    assert rows["FPS"] == MISSING
    assert rows["Dropped"] == "0"
    assert rows["Host syncs"] == MISSING
    assert rows["Mask shown"] == "none yet"
    assert rows["GPU memory"] == MISSING


def test_panel_cpu_memory_and_messages():
    rows = _panel_dict(format_kpi_panel(_running(device="cpu", status_message="waiting for frames")))
    assert rows["GPU memory"] == f"{MISSING} (not on a GPU)"
    assert rows["Message"] == "waiting for frames"
    rows = _panel_dict(format_kpi_panel(_running(error="input node deleted", status_message="x")))
    assert rows["Error"] == "input node deleted"
    assert "Message" not in rows


def test_corner_annotation_is_one_short_line():
    snap = _running(
        fps=30.0,
        end_to_end_ms={"p50": 24.06, "p95": 40.0},
        frames_dropped=3,
        mask_frame_index=120,
        mask_age_ms=33.0,
    )
    line = format_corner_annotation(snap)
    assert "\n" not in line and len(line) <= 80
    assert line == "GPU | 30.0 fps | e2e 24.1 ms | drop 3 | mask #120 33.0 ms"
    assert format_corner_annotation(_running(device="cpu")).startswith("CPU | ")
    assert format_corner_annotation(_running(path="legacy")).startswith("LEGACY | ")
    assert format_corner_annotation(KpiSnapshot()) == "UltramotionIGT idle"
    assert "deleted" in format_corner_annotation(_running(error="input deleted"))


def test_ordered_stages():
    assert ordered_stages({"zzz": {}, "sam_decoder": {}, "prepare": {}}) == ["prepare", "sam_decoder", "zzz"]


def test_snapshot_dict_round_trip_ignores_unknown_keys():
    snap = _running(fps=12.0, frames_dropped=4)
    data = snap.to_dict()
    data["some_future_field"] = 1
    assert KpiSnapshot.from_dict(data) == snap
    assert snap.device_type == "cuda"
    assert KpiSnapshot(device="cpu").device_type == "cpu"
    assert KpiSnapshot(mask_frame_index=5, latest_frame_index=3).frames_behind == 0


def test_aggregator_and_snapshot_from_frame_records():
    """KpiAggregator reads frame records (objects, or JSON lines made with the real `format_kpi`)."""
    clock = FakeClock()
    kpi = KpiAggregator(window=10, clock=clock)
    period = 0.04
    walls = []
    for i in range(15):
        clock.t += period
        wall = 20.0 + i
        walls.append(wall)
        record = FrameRecord(
            frame=i,
            device="cpu",
            path="gpu_resident",
            targets=i % 3,
            visibility={"visible": i % 3, "relocalizing": 1, "lost": 0},
            stage_ms={"sam_decoder": 2.0, "detector": 10.0 + i},
            wall_ms=wall,
        )
        kpi.write(format_kpi(record) if i % 2 else record)
    kpi.write(format_kpi({"event": "summary", "frame": 999}))  # other events are ignored
    clock.t += 0.010
    snap = build_snapshot(kpi, running=True, frames_received=17, frames_dropped=2)
    assert snap.frames_processed == 15 == kpi.frames
    assert snap.frames_received == 17 and snap.frames_dropped == 2
    assert snap.fps == pytest.approx(1.0 / period)
    assert snap.mask_frame_index == 14
    assert snap.frames_behind == 2
    assert snap.mask_age_ms == pytest.approx(10.0)
    assert snap.targets == 14 % 3
    assert snap.visibility == {"visible": 14 % 3, "relocalizing": 1, "lost": 0}  # the last frame's
    last10 = np.array(walls[-10:])
    assert snap.end_to_end_ms["p50"] == pytest.approx(np.percentile(last10, 50))
    assert snap.end_to_end_ms["p95"] == pytest.approx(np.percentile(last10, 95))
    assert snap.end_to_end_ms["p99"] == pytest.approx(np.percentile(last10, 99))
    det = np.array([10.0 + i for i in range(5, 15)])
    assert snap.stage_latency_ms["detector"]["p95"] == pytest.approx(np.percentile(det, 95))
    assert list(snap.stage_latency_ms) == ["detector", "sam_decoder"]  # the order the stages run in
    assert snap.host_syncs_per_frame is None
    assert classify_path(snap) is PathState.CPU
    assert format_corner_annotation(snap).startswith("CPU | 25.0 fps")


def test_aggregator_prefers_acquisition_latency_and_reads_syncs():
    kpi = KpiAggregator(window=4, clock=FakeClock())
    kpi.write(
        {"frame": 0, "latency_ms": 50.0, "wall_ms": 20.0, "host_syncs": 1, "latency_reference": "acquisition"}
    )
    kpi.write({"frame": 1, "latency_ms": 70.0, "wall_ms": 20.0, "host_syncs": 3})
    snap = build_snapshot(kpi, running=True)
    assert snap.end_to_end_ms["p50"] == pytest.approx(60.0)
    assert snap.host_syncs_per_frame == pytest.approx(2.0)
    assert snap.latency_reference is None  # the last record did not say
    assert snap.fps is None  # the clock did not move: no rate can be measured
    assert snap.frames_received == 2
    with pytest.raises(ValueError):
        KpiAggregator(window=1)


def test_unbounded_aggregator_keeps_every_frame():
    kpi = KpiAggregator(window=None)
    for i in range(1000):
        kpi.add(FrameRecord(frame=i, stage_ms={"detector": float(i)}))
    assert kpi.frames == 1000
    assert kpi.stage_ms()["detector"]["p50"] == pytest.approx(np.percentile(np.arange(1000.0), 50))
    assert kpi.summary()["stage_ms"]["detector"]["p99"] == pytest.approx(np.percentile(np.arange(1000.0), 99))


def test_frame_record_json_round_trip():
    record = FrameRecord(frame=3, stage_ms={"track": 1.0, "detector": 2.0}, targets=2, extra={"note": "x"})
    line = format_kpi(record)
    assert line.startswith('{"event":"frame","frame":3,"stage_ms":{"detector":2.0,"track":1.0}')
    data = __import__("json").loads(line)
    assert data["note"] == "x" and "extra" not in data  # extra keys sit at the top level of the line
    assert FrameRecord.from_dict(data) == record
    with pytest.raises(ValueError, match="must not repeat a field"):
        FrameRecord(frame=1, extra={"targets": 3}).to_dict()


def test_gpu_memory_off_cuda_is_not_measured():
    assert set(gpu_memory_mb("cpu").values()) == {None}
    assert set(gpu_memory_mb(None).values()) == {None}


@pytest.mark.gpu
def test_gpu_memory_on_cuda():
    import torch

    x = torch.zeros(64, 1024, 1024, device="cuda")  # 256 MiB
    mem = gpu_memory_mb("cuda:0")
    assert mem["gpu_memory_allocated_mb"] >= 256
    assert mem["gpu_memory_reserved_mb"] >= mem["gpu_memory_allocated_mb"]
    assert mem["gpu_memory_total_mb"] > mem["gpu_memory_reserved_mb"]
    del x
