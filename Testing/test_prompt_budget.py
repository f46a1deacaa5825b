"""Cost follows detections, not classes: an 80-class detector makes the same K SAM prompts as a 2-class one.

The 80-class model is the hub's D-FINE S COCO config (random weights, saved the way the hub stores it);
it runs end to end through ``ultramotion-igt run`` on a real PLUS recording, and the pipeline stays
free of host syncs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_dfine_hub_configs import HUB_CONFIGS, _write_hub_like_folder

from UltramotionIGTLib.core.detector import DFineDetector, write_random_detector
from UltramotionIGTLib.core.packet import CLASS_NAMES
from UltramotionIGTLib.core.pipeline import Pipeline, PipelineConfig
from UltramotionIGTLib.core.sam import SamSegmenter, write_random_sam_checkpoint
from UltramotionIGTLib.errors import SettingsError
from UltramotionIGTLib.tools.audit.runtime import RuntimeTransferAudit


@pytest.fixture(scope="module")
def coco_s(tmp_path_factory) -> Path:
    return _write_hub_like_folder(HUB_CONFIGS["dfine-s-coco"], tmp_path_factory.mktemp("coco") / "s", seed=5)


@pytest.fixture(scope="module")
def sam_file(tmp_path_factory) -> Path:
    return write_random_sam_checkpoint(tmp_path_factory.mktemp("sam") / "sam_vit_t_demo.safetensors", seed=0)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "UltramotionIGTLib", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.mark.plus
def test_run_80_class_dfine_s_on_a_plus_recording(coco_s, sam_file, plus_dir, tmp_path):
    out = tmp_path / "out"
    src = plus_dir / "SpinePhantomFreehand.igs.mha"
    proc = _cli(
        "run",
        "--input",
        str(src),
        "--out",
        str(out),
        "--max-frames",
        "3",
        "--score-threshold",
        "0",
        "--max-prompts",
        "6",
        "--max-targets",
        "0",
        "--detector",
        str(coco_s),
        "--sam",
        str(sam_file),
        "--device",
        "cpu",
        "--quiet",
        "--sync-audit",
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_in"] == summary["frames_out"] == 3
    assert summary["host_syncs_per_frame"] == 0.0
    frames = [json.loads(line) for line in (out / "kpi.jsonl").read_text().splitlines()]
    frames = [r for r in frames if r["event"] == "frame"]
    # threshold 0: every slot of the budget is a prompt, none more, whatever the 80 classes
    assert [r["targets"] for r in frames] == [6, 6, 6]
    names = {s["name"].rsplit("-", 1)[0] for s in summary["segments"]}
    assert names and names <= {f"label_{i}" for i in range(80)}


def test_80_classes_make_the_2_class_prompt_shapes_without_host_syncs(sam_file, tmp_path):
    """The same small D-FINE with 2 and 80 classes: K = max_prompts slots, the tracker runs, no sync."""
    from UltramotionIGTLib.tools.demo import demo_sequence

    frame = demo_sequence(1)[0].frames[0]
    segmenter = SamSegmenter.from_checkpoint(sam_file, device="cpu")
    shapes = {}
    for num_classes in (2, 80):
        names = [f"c{i}" for i in range(num_classes)]
        folder = write_random_detector(tmp_path / f"det{num_classes}", class_names=names, seed=1)
        detector = DFineDetector.from_pretrained(folder, device="cpu")
        pipeline = Pipeline(
            detector, segmenter, PipelineConfig(device="cpu", score_threshold=0.0, nms_iou=1.0)
        )
        pipeline.process_frame(frame, 0).to_host()  # warm-up
        with RuntimeTransferAudit("cpu", cuda_profiler=False) as audit:
            for i in range(1, 3):
                with audit.frame(i):
                    packet = pipeline.process_frame(frame, i)
                    result = packet.to_host()
        assert audit.result.syncs_per_frame == 0.0
        shapes[num_classes] = (tuple(packet.boxes.shape), tuple(packet.masks.shape))
        # threshold 0, no NMS: every class gives min(4, its detections) prompts, 8 in all at most
        per_class = torch.bincount(detector.run_inference_torch(frame).labels, minlength=num_classes)
        expected = min(8, int(per_class.clamp(max=4).sum()))
        assert int(packet.valid.sum()) == len(result) == expected > 0
        counts = torch.bincount(packet.labels[packet.valid], minlength=num_classes)
        assert torch.equal(counts, torch.minimum(counts, per_class.clamp(max=4)))
        assert bool((packet.track_ids[packet.valid] >= 0).any())  # confirmed after two frames
    assert shapes[2] == shapes[80] == ((8, 4), (8, *frame.shape))


def test_more_prompts_than_queries_is_one_line(sam_file, tmp_path):
    folder = write_random_detector(tmp_path / "det", seed=1, num_queries=30)
    detector = DFineDetector.from_pretrained(folder, device="cpu")
    segmenter = SamSegmenter.from_checkpoint(sam_file, device="cpu")
    with pytest.raises(SettingsError, match="max_prompts 31 is more than the detector's 30 queries"):
        Pipeline(detector, segmenter, PipelineConfig(device="cpu", max_prompts=31))
    Pipeline(detector, segmenter, PipelineConfig(device="cpu", max_prompts=30))
    with pytest.raises(ValueError, match="max_prompts must be >= 1"):
        PipelineConfig(max_prompts=0)


def test_bench_pipeline_compares_two_detectors(coco_s, sam_file, tmp_path, capsys):
    from UltramotionIGTLib.tools.cli import main as cli_main

    two = write_random_detector(tmp_path / "det2", seed=1)
    argv = ["pipeline", "--detector", str(two), "--vs-detector", str(coco_s), "--sam", str(sam_file)]
    assert cli_main(["bench", *argv, "--device", "cpu", "--frames", "1", "--warmup", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["paths"]) == {"detector", "vs_detector"}
    assert all(p["host_syncs_per_frame"] == 0.0 for p in report["paths"].values())
    ratio = report["cost_ratio"]
    a, b = (report["paths"][p] for p in ("detector", "vs_detector"))
    assert ratio["mean_frame_time"] == a["fps"] / b["fps"]
    assert f"{len(CLASS_NAMES)} vs 80 classes" in report["models"]
