"""The imaging region: the models see only the ultrasound image inside a larger frame; outputs stay in
frame pixels. A phantom frame placed into a black 820x616 frame gives, with the region, exactly what
the phantom frame alone gives (offset by the placement); ``run --imaging-region auto`` on a real PLUS
recording finds the image inside its frame."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from UltramotionIGTLib.core.detector import DFineDetector, write_random_detector
from UltramotionIGTLib.core.pipeline import Pipeline, PipelineConfig
from UltramotionIGTLib.core.region import ImagingRegion
from UltramotionIGTLib.core.sam import SamSegmenter, write_random_sam_checkpoint
from UltramotionIGTLib.errors import InputFileError
from UltramotionIGTLib.io import read_segmentation_sequence, read_sequence
from UltramotionIGTLib.tools.audit.runtime import RuntimeTransferAudit

X, Y = 150, 100  # where the phantom frame sits in the 820x616 frame


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("region")
    det = write_random_detector(root / "detector", seed=0)
    sam = write_random_sam_checkpoint(root / "sam" / "sam_vit_t_demo.safetensors", seed=0)
    return det, sam


@pytest.fixture(scope="module")
def placed():
    from UltramotionIGTLib.tools.demo import demo_sequence

    small = demo_sequence(2)[0].frames
    big = np.zeros((len(small), 616, 820), np.uint8)
    big[:, Y : Y + small.shape[1], X : X + small.shape[2]] = small
    return small, big


def test_parse_plus_style_and_errors():
    assert ImagingRegion.parse("120,40,560,520") == ImagingRegion(120, 40, 560, 520)
    assert ImagingRegion.parse("120 40 560 520").as_tuple() == (120, 40, 560, 520)  # PLUS: "X Y" "W H"
    for bad in ("120,40,560", "a,b,c,d", "-1,0,10,10", "0,0,0,5"):
        with pytest.raises(InputFileError):
            ImagingRegion.parse(bad)
    assert ImagingRegion(800, 600, 100, 100).clipped(616, 820) == ImagingRegion(800, 600, 20, 16)
    with pytest.raises(InputFileError, match="outside"):
        ImagingRegion(900, 0, 10, 10).clipped(616, 820)
    with pytest.raises(InputFileError, match="no pixel above"):
        ImagingRegion.from_frames([np.zeros((4, 5), np.uint8)])


def test_region_found_from_the_frames(placed):
    small, big = placed
    bright = (small > 0).any(axis=0)
    rows, cols = np.flatnonzero(bright.any(axis=1)), np.flatnonzero(bright.any(axis=0))
    expected = ImagingRegion(X + cols[0], Y + rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1)
    assert ImagingRegion.from_frames(big) == expected
    colour = np.repeat(big[0][..., None], 3, axis=-1)
    assert ImagingRegion.from_frames([torch.from_numpy(colour)]) == ImagingRegion.from_frames(big[:1])


def test_pipeline_on_the_region_equals_the_image_alone(model_files, placed):
    small, big = placed
    det, sam = model_files
    detector = DFineDetector.from_pretrained(det, device="cpu")
    segmenter = SamSegmenter.from_checkpoint(sam, device="cpu")
    h, w = small.shape[1:]
    alone = Pipeline(detector, segmenter, PipelineConfig(device="cpu", score_threshold=0.0))
    inside = Pipeline(
        detector, segmenter, PipelineConfig(device="cpu", score_threshold=0.0, imaging_region=(X, Y, w, h))
    )
    with RuntimeTransferAudit("cpu", cuda_profiler=False) as audit:
        for i in range(len(small)):
            a = alone.process_frame(small[i], i)
            with audit.frame(i):
                b = inside.process_frame(big[i], i)
                b.to_host()
    assert audit.result.syncs_per_frame == 0.0
    assert b.image_size == (616, 820) and b.masks.shape == (8, 616, 820)
    assert bool(a.valid.any())
    assert torch.equal(a.valid, b.valid) and torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.scores, b.scores)
    torch.testing.assert_close(b.boxes, a.boxes + torch.tensor([X, Y, X, Y], dtype=torch.float32))
    assert torch.equal(b.masks[:, Y : Y + h, X : X + w], a.masks)
    assert int(b.masks.sum()) == int(a.masks.sum())  # nothing outside the region
    ok = a.valid & torch.isfinite(a.centroids).all(dim=1)
    torch.testing.assert_close(b.centroids[ok], a.centroids[ok] + torch.tensor([X, Y], dtype=torch.float32))
    torch.testing.assert_close(b.areas, a.areas)
    assert torch.equal(a.track_ids, b.track_ids)


@pytest.mark.plus
def test_run_with_auto_region_on_a_plus_recording(model_files, plus_dir, tmp_path):
    det, sam = model_files
    src = plus_dir / "BkCurvilinearScanConvertedData.igs.mha"
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["run", "--input", str(src), "--out", str(out), "--max-frames", "2", "--score-threshold", "0"]
    args += [
        "--imaging-region",
        "auto",
        "--detector",
        str(det),
        "--sam",
        str(sam),
        "--device",
        "cpu",
        "--quiet",
        "--sync-audit",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "UltramotionIGTLib", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    seq = read_sequence(src)
    n = min(2, seq.n_frames)
    region = ImagingRegion.from_frames(seq.frames[:n])
    h, w = seq.frame_shape
    assert (
        f"imaging region (auto, from the non-black pixels): {region.as_text()} of the {w}x{h} frame"
        in proc.stdout
    )
    assert region.as_tuple() != (0, 0, w, h)  # the recording has a black margin to leave out
    labels = read_segmentation_sequence(out / "segmentation.seq.nrrd").labelmaps
    assert labels.shape == (n, h, w) and labels.any()
    inside = np.zeros((h, w), bool)
    inside[region.y : region.y + region.height, region.x : region.x + region.width] = True
    assert not labels[:, ~inside].any()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["host_syncs_per_frame"] == 0.0


def test_colour_frames_stay_colour_for_a_three_channel_detector(model_files, plus_dir):
    """A real colour PLUS frame: a 3-channel detector sees its colours (not their luminance), in the
    region; prepare_inference_inputs keeps HxWx3 only when asked."""
    from UltramotionIGTLib.core.pipeline import prepare_inference_inputs, select_prompts

    colour = read_sequence(plus_dir / "ColorNrrdSample.igs.nrrd", color="rgb").frames[0]
    assert colour.ndim == 3 and colour.shape[-1] == 3
    assert np.abs(colour[..., 0].astype(int) - colour[..., 2]).max() > 0  # really colour
    kept = prepare_inference_inputs(colour, "cpu", keep_colour=True)
    assert kept.shape == colour.shape and np.array_equal(kept.numpy(), colour)
    assert prepare_inference_inputs(colour, "cpu").shape == colour.shape[:2]

    det, sam = model_files
    detector = DFineDetector.from_pretrained(det, device="cpu")
    assert detector.num_channels == 3
    segmenter = SamSegmenter.from_checkpoint(sam, device="cpu")
    h, w = colour.shape[:2]
    region = (w // 8, h // 8, w // 2, h // 2)
    config = PipelineConfig(device="cpu", score_threshold=0.0, imaging_region=region, track=False)
    packet = Pipeline(detector, segmenter, config).process_frame(colour, 0)
    x, y, rw, rh = region
    crop = torch.from_numpy(colour[y : y + rh, x : x + rw])
    d = detector.run_inference_torch(crop)
    boxes, scores, labels, valid = select_prompts(d.boxes, d.scores, d.labels, 8, 0.0, 0.6, 4)
    torch.testing.assert_close(packet.boxes, boxes + torch.tensor([x, y, x, y], dtype=torch.float32))
    torch.testing.assert_close(packet.scores, scores)
    grey = detector.run_inference_torch(prepare_inference_inputs(colour, "cpu")[y : y + rh, x : x + rw])
    assert not torch.allclose(grey.scores, d.scores)  # the colours made a difference


@pytest.mark.plus
def test_run_on_a_colour_recording(model_files, plus_dir, tmp_path):
    """``run`` reads colour as colour (the 3-channel detector gets it) and writes the usual outputs."""
    det, sam = model_files
    src = plus_dir / "ColorNrrdSample.igs.nrrd"
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [
        "run",
        "--input",
        str(src),
        "--out",
        str(out),
        "--score-threshold",
        "0",
        "--imaging-region",
        "auto",
    ]
    args += ["--detector", str(det), "--sam", str(sam), "--device", "cpu", "--quiet"]
    proc = subprocess.run(
        [sys.executable, "-m", "UltramotionIGTLib", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    seq = read_sequence(src, color="rgb")
    labels = read_segmentation_sequence(out / "segmentation.seq.nrrd").labelmaps
    assert labels.shape == (1, *seq.frame_shape) and labels.any()
    assert (out / "overlay.png").is_file()
