"""No process-wide state changed per call: two pipelines in two threads give what they give one after
the other, the detector's transformers switch is set once, training hands back the caller's RNG.

Real parts only: random-weight D-FINE and SAM in their real formats, phantom frames, real threads.
(torch's global settings are checked after every test by the autouse fixture in conftest.py.)
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from UltramotionIGTLib.core.detector import DFineDetector, write_random_detector
from UltramotionIGTLib.core.packet import HostResult
from UltramotionIGTLib.core.pipeline import Pipeline, PipelineConfig
from UltramotionIGTLib.core.sam import SamSegmenter, write_random_sam_checkpoint
from UltramotionIGTLib.tools.phantom import PhantomConfig, PhantomStream

N_FRAMES = 3
SEEDS = (0, 1)  # pipeline k: models and phantom sequence of seed SEEDS[k]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> list[tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("thread_models")
    return [
        (
            write_random_detector(root / f"detector{seed}", image_size=128, seed=seed, num_queries=12),
            write_random_sam_checkpoint(root / f"sam{seed}.safetensors", model_type="vit_t_demo", seed=seed),
        )
        for seed in SEEDS
    ]


@pytest.fixture(scope="module")
def frames() -> list[list[np.ndarray]]:
    config = PhantomConfig(height=128, width=160)
    return [[PhantomStream(config, seed=seed).frame(i).image for i in range(N_FRAMES)] for seed in SEEDS]


def _pipeline(detector_dir: Path, sam_file: Path) -> Pipeline:
    # score threshold 0: random weights score low, and every prompt slot should carry a target
    return Pipeline(
        DFineDetector.from_pretrained(detector_dir, device="cpu"),
        SamSegmenter.from_checkpoint(sam_file, device="cpu"),
        PipelineConfig(device="cpu", score_threshold=0.0, max_targets_per_class=3),
    )


def _run(pipeline: Pipeline, images: list[np.ndarray], barrier: threading.Barrier | None) -> list[HostResult]:
    results = []
    for i, image in enumerate(images):
        if barrier is not None:
            barrier.wait(timeout=120)  # both threads enter every frame together
        results.append(pipeline.process_frame(image, frame_index=i).to_host())
    return results


def test_two_pipelines_in_two_threads_match_one_after_the_other(model_files, frames) -> None:
    pipelines = [_pipeline(*files) for files in model_files]
    one_after_the_other = [_run(p, images, None) for p, images in zip(pipelines, frames, strict=True)]

    for p in pipelines:
        p.reset()  # a new sequence: tracks forgotten; the models hold no per-frame state across frames
    barrier = threading.Barrier(len(pipelines))
    with ThreadPoolExecutor(max_workers=len(pipelines)) as pool:
        futures = [pool.submit(_run, p, images, barrier) for p, images in zip(pipelines, frames, strict=True)]
        at_once = [f.result(timeout=600) for f in futures]

    for alone, together in zip(one_after_the_other, at_once, strict=True):
        assert len(alone) == len(together) == N_FRAMES
        for a, b in zip(alone, together, strict=True):
            assert len(a) > 0, "no target: the comparison would be empty"
            np.testing.assert_array_equal(a.boxes, b.boxes)
            np.testing.assert_array_equal(a.scores, b.scores)
            np.testing.assert_array_equal(a.labels, b.labels)
            np.testing.assert_array_equal(a.masks, b.masks)
            np.testing.assert_array_equal(a.track_ids, b.track_ids)
            np.testing.assert_array_equal(a.centroids, b.centroids)
    # the two pipelines really differ (models and frames), so cross-talk would show
    assert not np.array_equal(one_after_the_other[0][0].boxes, one_after_the_other[1][0].boxes)
    # the tracker's state is compared too: ids appear once tracks are confirmed (second frame on)
    for results in one_after_the_other:
        assert (results[0].track_ids == -1).all() and (results[-1].track_ids >= 0).any()


def test_detector_sets_the_transformers_check_switch_once(model_files, monkeypatch, caplog) -> None:
    name = "TRANSFORMERS_DISABLE_TORCH_CHECK"
    monkeypatch.delenv(name, raising=False)
    detector = DFineDetector.from_pretrained(model_files[0][0], device="cpu")
    assert os.environ[name] == "1"
    detector.run_inference_torch(torch.zeros(64, 64, dtype=torch.uint8))
    assert os.environ[name] == "1"  # not toggled back after a forward: other threads rely on it
    # a value the user chose is kept (transformers then checks, and syncs), with a warning
    monkeypatch.setenv(name, "0")
    with caplog.at_level(logging.WARNING, logger="UltramotionIGTLib.core.detector"):
        DFineDetector.from_pretrained(model_files[0][0], device="cpu")
    assert os.environ[name] == "0"
    assert name in caplog.text


def test_training_hands_back_the_callers_rng(tmp_path: Path) -> None:
    from UltramotionIGTLib.tools.training.detector import train_detector

    torch.manual_seed(1234)
    np.random.seed(1234)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    train_detector(
        tmp_path / "det",
        steps=1,
        batch_size=1,
        checkpoint_every=1,
        heldout_frames=0,
        progress=False,
        threads=1,
        num_queries=10,
        decoder_layers=2,
        d_model=32,
        ffn_dim=64,
        stem_channels=8,
        stage_mid_channels=(8, 8, 16, 16),
        stage_out_channels=(16, 24, 32, 48),
        feature_strides=(16, 32),
        num_denoising=10,
        pool_sequences=2,
        bn_batches=1,
    )
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert (
        after[0] == numpy_state[0]
        and np.array_equal(after[1], numpy_state[1])
        and after[2:] == numpy_state[2:]
    )
