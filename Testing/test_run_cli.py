"""`ultramotion-igt run` end to end on a real PLUS recording with real-format random-weight models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from UltramotionIGTLib.core.detector import write_random_detector
from UltramotionIGTLib.core.sam import write_random_sam_checkpoint
from UltramotionIGTLib.io import read_segmentation_sequence, read_sequence


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    det = write_random_detector(root / "detector", seed=0)
    sam = write_random_sam_checkpoint(root / "sam" / "sam_vit_t_demo.safetensors", seed=0)
    return Path(det), Path(sam)


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "UltramotionIGTLib", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )


def _model_args(models: tuple[Path, Path]) -> list[str]:
    return ["--detector", str(models[0]), "--sam", str(models[1]), "--device", "cpu"]


def test_run_spine_phantom_end_to_end(plus_dir, models, tmp_path):
    src = plus_dir / "SpinePhantomFreehand.igs.mha"
    out = tmp_path / "out"
    proc = _cli(
        "run",
        "--input",
        str(src),
        "--out",
        str(out),
        "--score-threshold",
        "0",
        "--quiet",
        "--sync-audit",
        *_model_args(models),
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("segmentation.seq.nrrd", "kpi.jsonl", "summary.json", "overlay.png"):
        assert (out / name).is_file(), name
    seq = read_sequence(src)
    seg = read_segmentation_sequence(out / "segmentation.seq.nrrd")
    assert seg.labelmaps.shape == (seq.n_frames, *seq.frame_shape)
    np.testing.assert_allclose(seg.ijk_to_ras(), seq.ijk_to_ras(), atol=1e-9)
    assert seg.labelmaps.any(), "threshold 0 with 8 prompts per frame must label something"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_in"] == summary["frames_out"] == seq.n_frames == 21
    assert summary["dropped"] == 0 and summary["device"] == "cpu"
    assert summary["declared_hops_per_frame"] > 0
    for stage in ("detector", "sam_encoder", "sam_decoder", "end_to_end"):
        assert summary["latency_ms"][stage]["p50"] > 0
    records = [json.loads(line) for line in (out / "kpi.jsonl").read_text().splitlines()]
    frames = [r for r in records if r["event"] == "frame"]
    assert [r["frame"] for r in frames] == list(range(21))
    assert all(r["tensor_devices"]["masks"] == "cpu" for r in frames)
    # the GPU-resident path: only declared hops; the first frame of a new size also uploads SAM's
    # size-dependent tables (built on the host once per frame size, declared)
    assert all(r["host_syncs"] == 0 and r["budget_overruns"] == 0 for r in frames)
    assert frames[0]["uploads"] > frames[1]["uploads"] == 1  # tables once, then the frame only
    assert frames[0]["declared_hops"] > frames[1]["declared_hops"]
    assert summary["host_syncs_per_frame"] == 0
    names = {s["name"] for s in summary["segments"]}
    assert names and all(n.split("-")[0] in ("vessel", "needle", "bone") for n in names)
    # visibility: counts per state in every KPI record, each segment's states over the frames
    assert all(set(r["visibility"]) == {"visible", "relocalizing", "lost"} for r in frames)
    assert summary["latency_ms"]["visibility"]["p50"] > 0
    timeline = summary["visibility"]
    assert set(timeline) <= names | {n.split("-")[0] for n in names} and timeline
    for runs in timeline.values():
        assert all(
            first <= last and state in ("VISIBLE", "RELOCALIZING", "LOST") for first, last, state in runs
        )


def test_sequence_poses_use_a_calibrated_image_transform_in_millimetres():
    from UltramotionIGTLib.io import UltrasoundSequence
    from UltramotionIGTLib.tools.run import sequence_poses

    frames = np.zeros((3, 4, 5), np.uint8)
    probe = np.repeat(np.eye(4)[None], 3, axis=0)
    probe[:, 0, 3] = [0.0, 1.0, 2.0]
    image_to_probe = np.repeat(np.diag([0.2, 0.3, 1.0, 1.0])[None], 3, axis=0)  # pixels -> mm
    plain = UltrasoundSequence(frames=frames, spacing=(0.2, 0.3, 1.0), transforms={"ProbeToTracker": probe})
    assert sequence_poses(plain) is None  # a probe pose alone does not place the image
    calibrated = UltrasoundSequence(
        frames=frames,
        spacing=(0.2, 0.3, 1.0),
        transforms={"ProbeToTracker": probe, "ImageToProbe": image_to_probe},
        transform_status={"ProbeToTracker": np.array([True, False, True])},
    )
    poses = sequence_poses(calibrated)
    assert poses[1] is None  # transform status not OK
    np.testing.assert_allclose(poses[2], probe[2])  # image mm -> pixels -> mm: the probe pose itself


def test_run_legacy_path_counts_host_syncs(plus_dir, models, tmp_path):
    out = tmp_path / "legacy"
    proc = _cli(
        "run",
        "--input",
        str(plus_dir / "SpinePhantomFreehand.igs.mha"),
        "--out",
        str(out),
        "--max-frames",
        "3",
        "--legacy",
        "--score-threshold",
        "0",
        "--quiet",
        "--sync-audit",
        *_model_args(models),
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_out"] == 3 and summary["path"] == "legacy"
    assert summary["host_syncs_per_frame"] > 0


@pytest.mark.parametrize(
    "case, expected",
    [
        ("rf", "RF_I_LINE_Q_LINE"),
        ("truncated", "truncated.igs.mha"),
        ("missing", "missing.igs.mha"),
        ("cuda", "CUDA is not available"),
    ],
)
def test_bad_input_one_clear_message_nonzero_exit(case, expected, plus_dir, models, tmp_path):
    import torch

    src = plus_dir / "SpinePhantomFreehand.igs.mha"
    extra: list[str] = []
    if case == "rf":
        src = plus_dir / "UltrasonixLinearRfData.igs.mha"
    elif case == "truncated":
        data = (plus_dir / "SpinePhantomFreehand.igs.mha").read_bytes()
        src = tmp_path / "truncated.igs.mha"
        src.write_bytes(data[: len(data) // 2])
    elif case == "missing":
        src = tmp_path / "missing.igs.mha"
    elif case == "cuda":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        extra = ["--device", "cuda"]
    args = ["run", "--input", str(src), "--out", str(tmp_path / "o"), "--quiet", *_model_args(models), *extra]
    proc = _cli(*args)
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "o" / "summary.json").exists()


def test_corrupt_checkpoint_is_a_clear_error(plus_dir, models, tmp_path):
    bad = tmp_path / "sam.safetensors"
    bad.write_bytes(models[1].read_bytes()[:1000])
    proc = _cli(
        "run",
        "--input",
        str(plus_dir / "SpinePhantomFreehand.igs.mha"),
        "--out",
        str(tmp_path / "o"),
        "--detector",
        str(models[0]),
        "--sam",
        str(bad),
        "--device",
        "cpu",
        "--quiet",
    )
    assert proc.returncode == 2 and "sam.safetensors" in proc.stderr and "Traceback" not in proc.stderr


def test_without_sync_audit_no_host_sync_fields(plus_dir, models, tmp_path):
    """The sync audit is opt-in: without --sync-audit no audit runs and no record carries its fields."""
    out = tmp_path / "plain"
    proc = _cli(
        "run",
        "--input",
        str(plus_dir / "SpinePhantomFreehand.igs.mha"),
        "--out",
        str(out),
        "--max-frames",
        "2",
        "--quiet",
        *_model_args(models),
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_out"] == 2
    records = [json.loads(line) for line in (out / "kpi.jsonl").read_text().splitlines()]
    frames = [r for r in records if r["event"] == "frame"]
    assert [r["frame"] for r in frames] == [0, 1]
    for record in [summary, *records]:
        assert not {"host_syncs", "declared_hops", "host_syncs_per_frame", "declared_hops_per_frame"} & set(
            record
        ), record


def test_help_and_unknown_command():
    assert _cli("--help").returncode == 0
    proc = _cli("no-such-command")
    assert proc.returncode == 2 and "invalid choice: 'no-such-command'" in proc.stderr
