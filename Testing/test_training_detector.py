"""Detector training on the phantom: a real short run, resume after interruption, overfit sanity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from UltramotionIGTLib import CLASS_NAMES
from UltramotionIGTLib.core.detector import DFineDetector
from UltramotionIGTLib.tools import cli
from UltramotionIGTLib.tools.training.common import CHECKPOINT_NAME, heldout_set
from UltramotionIGTLib.tools.training.detector import detector_ap50, train_detector

#: a tiny D-FINE and a small phantom pool, so that every run here takes a few seconds on one core
TINY = dict(
    num_queries=10,
    decoder_layers=2,
    d_model=32,
    ffn_dim=64,
    stem_channels=8,
    stage_mid_channels=(8, 8, 16, 16),
    stage_out_channels=(16, 24, 32, 48),
    feature_strides=(16, 32),
    num_denoising=10,
    pool_sequences=4,
    progress=False,
    threads=1,
)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_short_training_writes_loadable_folder_and_record(tmp_path: Path) -> None:
    out = tmp_path / "det"
    record = train_detector(out, steps=6, batch_size=2, lr=5e-4, checkpoint_every=3, heldout_frames=4, **TINY)
    for name in (
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "training.json",
        CHECKPOINT_NAME,
    ):
        assert (out / name).is_file(), name
    detector = DFineDetector.from_pretrained(out, device="cpu")
    assert detector.class_names == CLASS_NAMES
    assert detector.input_size == (256, 256)
    assert detector.num_queries == 10
    on_disk = json.loads((out / "training.json").read_text())
    assert on_disk == json.loads(json.dumps(record))
    assert on_disk["steps"] == 6 and on_disk["args"]["batch_size"] == 2
    assert on_disk["environment"]["threads"] == 1 and on_disk["environment"]["device"] == "cpu"
    assert on_disk["loss"]["logged_steps"] == 6 and np.isfinite(on_disk["loss"]["min_loss"])
    assert set(on_disk["heldout_ap50"]) == set(CLASS_NAMES)
    assert all(0.0 <= v <= 1.0 for v in on_disk["heldout_ap50"].values())
    assert on_disk["data"]["train_dataset_seed"] != on_disk["data"]["heldout_dataset_seed"]
    # the saved folder gives the same detections as the model did at the end of training
    frame = heldout_set(1).images[0]
    again = DFineDetector.from_pretrained(out, device="cpu").run_inference_torch(frame)
    first = detector.run_inference_torch(frame)
    torch.testing.assert_close(first.scores, again.scores)


def test_resume_after_interruption_gives_the_same_weights(tmp_path: Path) -> None:
    kwargs = dict(steps=6, batch_size=2, lr=5e-4, checkpoint_every=2, heldout_frames=0, **TINY)
    straight = tmp_path / "straight"
    train_detector(straight, **kwargs)
    interrupted = tmp_path / "interrupted"
    # killed after step 3: only the checkpoint of step 2 survives, the rerun continues from there
    assert train_detector(interrupted, stop_after=3, **kwargs) == {"stopped_at": 3}
    assert not (interrupted / "model.safetensors").exists()
    state = torch.load(interrupted / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert state["step"] == 2
    record = train_detector(interrupted, **kwargs)
    assert record["loss"]["logged_steps"] == 6
    a, b = _weights(straight), _weights(interrupted)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # a rerun with other arguments refuses the checkpoint instead of mixing two runs
    from UltramotionIGTLib.errors import CheckpointError

    with pytest.raises(CheckpointError, match="other arguments"):
        train_detector(interrupted, **{**kwargs, "lr": 1e-3})


def test_loss_falls_on_a_repeated_batch(tmp_path: Path) -> None:
    train_detector(
        tmp_path / "overfit",
        steps=40,
        batch_size=2,
        lr=2e-3,
        warmup=1,
        checkpoint_every=100,
        heldout_frames=0,
        repeat_batch=True,
        **TINY,
    )
    state = torch.load(tmp_path / "overfit" / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    losses = np.array([h["loss"] for h in state["history"]])
    assert losses.shape == (40,) and np.isfinite(losses).all()
    assert losses[-5:].mean() < 0.85 * losses[:3].mean(), losses


def test_detector_ap50_scores_a_detector_on_heldout_frames(tmp_path: Path) -> None:
    train_detector(tmp_path / "d", steps=1, batch_size=1, checkpoint_every=1, heldout_frames=0, **TINY)
    detector = DFineDetector.from_pretrained(tmp_path / "d", device="cpu")
    data = heldout_set(3)
    at_defaults = detector_ap50(detector, data)
    raw = detector_ap50(detector, data, score_threshold=0.0, max_prompts=None)
    assert set(at_defaults) == set(raw) == set(CLASS_NAMES)
    assert all(0.0 <= v <= 1.0 for v in [*at_defaults.values(), *raw.values()])


def test_cli_trains_the_demo_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    args = ["detector", "--out", str(out), "--steps", "1", "--batch-size", "1", "--heldout-frames", "2"]
    assert cli.main(["train", *args, "--no-progress"]) == 0
    assert "held-out AP50" in capsys.readouterr().out
    record = json.loads((out / "training.json").read_text())
    assert record["command"].startswith("ultramotion-igt train detector --out")
    assert "--threads 1" in record["command"]
    DFineDetector.from_pretrained(out, device="cpu")
