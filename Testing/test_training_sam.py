"""`ultramotion-igt train sam`: real (short) trainings of the small SAM on real phantom frames."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from UltramotionIGTLib.core.sam import SAM_CONFIGS, SamSegmenter, build_sam_model
from UltramotionIGTLib.errors import CheckpointError
from UltramotionIGTLib.tools import cli
from UltramotionIGTLib.tools.training.common import CHECKPOINT_NAME, PhantomFramePool
from UltramotionIGTLib.tools.training.sam import (
    WEIGHTS_NAME,
    PromptJitter,
    jitter_boxes,
    train_sam,
    training_step_loss,
)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_cli_training_writes_loadable_checkpoint_and_report(tmp_path):
    out = tmp_path / "sam"
    argv = ["sam", "--out", str(out), "--steps", "3", "--batch-size", "2", "--checkpoint-every", "2"]
    assert cli.main(["train", *argv, "--heldout-frames", "4", "--no-progress"]) == 0

    assert (out / CHECKPOINT_NAME).is_file()
    seg = SamSegmenter.from_checkpoint(out / WEIGHTS_NAME, device="cpu")
    assert seg.config.same_architecture(SAM_CONFIGS["vit_t_demo"])
    frame = PhantomFramePool().batch(0, 1)[0]
    masks = seg.segment(frame.image, frame.boxes, as_numpy=True).masks
    assert masks.shape == (len(frame.boxes), *frame.image.shape)

    report = json.loads((out / "training.json").read_text())
    assert report["steps"] == 3
    assert report["args"]["batch_size"] == 2
    assert report["environment"]["threads"] == 1
    assert report["environment"]["wall_s"] > 0
    assert report["loss"]["last"]["step"] == 3
    held = report["heldout"]
    assert held["n_frames"] == 4
    assert held["n_targets"] == sum(held["counts"].values()) > 0
    assert 0.0 <= held["mean_dice"] <= 1.0
    assert set(held["per_class"]) == {"vessel", "needle", "bone"}


def test_resume_equals_uninterrupted_run(tmp_path):
    kwargs = dict(steps=4, batch_size=2, checkpoint_every=2, progress=False, heldout_frames=0, warmup=2)
    train_sam(tmp_path / "straight", **kwargs)
    assert train_sam(tmp_path / "resumed", stop_at=2, **kwargs) == {"stopped_at": 2}
    assert not (tmp_path / "resumed" / WEIGHTS_NAME).exists()
    train_sam(tmp_path / "resumed", **kwargs)

    a = load_file(tmp_path / "straight" / WEIGHTS_NAME)
    b = load_file(tmp_path / "resumed" / WEIGHTS_NAME)
    assert a.keys() == b.keys()
    fresh = build_sam_model("vit_t_demo").state_dict()
    assert any(not torch.equal(a[k], fresh[k]) for k in a)  # it trained
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ra = json.loads((tmp_path / "straight" / "training.json").read_text())
    rb = json.loads((tmp_path / "resumed" / "training.json").read_text())
    assert ra["history"] == rb["history"]

    with pytest.raises(CheckpointError, match="other arguments"):
        train_sam(tmp_path / "resumed", **{**kwargs, "lr": 5e-4})


def test_loss_decreases_when_overfitting_one_batch():
    torch.manual_seed(0)
    model = build_sam_model("vit_t_demo").train()
    frames = PhantomFramePool().batch(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    jitter = PromptJitter(copies=1)
    losses = []
    for _ in range(12):
        terms = training_step_loss(model, frames, np.random.default_rng(0), jitter, torch.device("cpu"))
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(float(terms["loss"].detach()))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses


def test_jittered_boxes_stay_valid_and_near_the_truth():
    frame = PhantomFramePool().batch(5, 1)[0]
    rng = np.random.default_rng(1)
    boxes = np.repeat(frame.boxes, 50, axis=0)
    out = jitter_boxes(boxes, rng, frame.image.shape, PromptJitter(frac=0.1, min_px=1.0))
    h, w = frame.image.shape
    assert out.shape == boxes.shape and out.dtype == np.float32
    assert (
        (out[:, 0] >= 0).all()
        and (out[:, 2] <= w).all()
        and (out[:, 1] >= 0).all()
        and (out[:, 3] <= h).all()
    )
    assert (out[:, 2] - out[:, 0] >= 2 - 1e-4).all() and (out[:, 3] - out[:, 1] >= 2 - 1e-4).all()
    side = np.maximum(boxes[:, 2:] - boxes[:, :2], 1.0)
    shift = np.abs(out - boxes) / np.concatenate([side, side], axis=1)
    assert shift.max() <= 0.25 + 2.5 / side.min()  # clipped at 2.5 sigma (sigma >= 1 px)
    assert 0.04 < shift.mean() < 0.15  # about 10 % of the box side
    assert not np.array_equal(out, boxes)
