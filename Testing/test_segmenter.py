"""SamSegmenter against the official segment_anything SamPredictor, with real checkpoint files.

Every model here is a real `segment_anything` model (the small ``vit_t_demo`` config) with random
weights written to disk in the real formats and loaded back; the oracle is the official
``SamPredictor.set_image(...); predict(box=..., multimask_output=False)`` on the same weights.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.utils.transforms import ResizeLongestSide

from UltramotionIGTLib.core.sam import (
    SAM_CONFIGS,
    SamConfig,
    SamOutput,
    SamSegmenter,
    load_sam,
    load_sam_with_config,
    random_sam_model,
    read_sam_checkpoint,
    resize_longest_side_uint8,
    save_sam_checkpoint,
    sidecar_config_path,
    write_random_sam_checkpoint,
)
from UltramotionIGTLib.errors import CheckpointError, UnsupportedImageTypeError

# A second small architecture (not in the registry) for the custom-config formats: 128 input with
# window 5 so that windowed attention pads (8x8 tokens -> 10x10).
TINY_CUSTOM = SamConfig(
    name="tiny_test",
    image_size=128,
    vit_patch_size=16,
    encoder_embed_dim=32,
    encoder_depth=2,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(1,),
    window_size=5,
    prompt_embed_dim=32,
    mask_in_chans=8,
    decoder_depth=1,
    decoder_mlp_dim=64,
    decoder_num_heads=2,
    iou_head_hidden_dim=32,
)


def _ultrasound_like(height: int, width: int, seed: int) -> np.ndarray:
    """A gray uint8 image with structure (dark disc in speckle) rather than pure noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    speckle = rng.gamma(2.0, 40.0, (height, width))
    disc = (yy - 0.55 * height) ** 2 + (xx - 0.4 * width) ** 2 < (0.2 * min(height, width)) ** 2
    image = np.where(disc, 0.2 * speckle, speckle) * np.linspace(1.2, 0.6, height)[:, None]
    return np.clip(image, 0, 255).astype(np.uint8)


def _random_boxes(height: int, width: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(0, width * 0.6, n)
    y0 = rng.uniform(0, height * 0.6, n)
    x1 = np.minimum(x0 + rng.uniform(4, width * 0.5, n), width - 1)
    y1 = np.minimum(y0 + rng.uniform(4, height * 0.5, n), height - 1)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory) -> Path:
    return write_random_sam_checkpoint(
        tmp_path_factory.mktemp("sam") / "sam_demo.safetensors", "vit_t_demo", seed=3
    )


@pytest.fixture(scope="module")
def segmenter(demo_checkpoint) -> SamSegmenter:
    return SamSegmenter.from_checkpoint(demo_checkpoint, model_type="auto", device="cpu")


@pytest.fixture(scope="module")
def official(demo_checkpoint) -> SamPredictor:
    # A separate model instance loaded from the same file: the official predictor stays untouched.
    return SamPredictor(load_sam(demo_checkpoint, device="cpu"))


# ---------------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [(616, 820), (37, 50, 3), (820, 300), (1000, 17, 3), (256, 256), (5, 3, 3), (200, 9)],
)
@pytest.mark.parametrize("long_side", [256, 1024])
def test_device_resize_is_bit_exact_with_official_transform(shape, long_side):
    image = np.random.default_rng(sum(shape) + long_side).integers(0, 256, shape, dtype=np.uint8)
    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=-1)
    expected = ResizeLongestSide(long_side).apply_image(rgb)
    chw = torch.from_numpy(image).permute(2, 0, 1) if image.ndim == 3 else torch.from_numpy(image)[None]
    got = resize_longest_side_uint8(chw, long_side).permute(1, 2, 0).numpy()
    if image.ndim == 2:
        got = np.repeat(got, 3, axis=-1)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------------------------------------------
# Parity with the official predictor
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width", "color"), [(616, 820, False), (37, 50, True), (700, 180, False)])
def test_masks_equal_official_predictor_box_by_box(segmenter, official, height, width, color):
    gray = _ultrasound_like(height, width, seed=height)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    if color:
        rgb = rgb.copy()
        rgb[..., 0] = np.random.default_rng(1).integers(0, 256, gray.shape, dtype=np.uint8)
    boxes = _random_boxes(height, width, 6, seed=width)

    official.set_image(rgb)
    segmenter.set_torch_image(torch.from_numpy(rgb if color else gray))
    assert torch.equal(segmenter.get_image_embedding(), official.features)
    out = segmenter.predict_boxes(torch.from_numpy(boxes))

    assert out.masks.shape == (6, height, width) and out.masks.dtype == torch.bool
    assert out.mask_probs.shape == (6, height, width) and out.mask_probs.dtype == torch.float32
    assert out.iou_scores.shape == (6,) and out.iou_scores.dtype == torch.float32
    foreground = 0.0
    for i, box in enumerate(boxes):
        masks, scores, _ = official.predict(box=box, multimask_output=False)
        logits, _, _ = official.predict(box=box, multimask_output=False, return_logits=True)
        # One box per call runs the very same kernels as the official predictor: bit-equal masks.
        single = segmenter.predict_boxes(torch.from_numpy(box[None]))
        np.testing.assert_array_equal(single.masks[0].numpy(), masks[0])
        np.testing.assert_allclose(single.iou_scores[0].item(), scores[0], atol=1e-6)
        # The batched call may round differently in the last bits (other matmul shapes; logits differ
        # by ~1e-7): masks equal wherever the official logit is not within 1e-5 of the threshold.
        on_edge = np.abs(logits[0]) < 1e-5
        assert on_edge.mean() < 1e-3
        np.testing.assert_array_equal(out.masks[i].numpy()[~on_edge], masks[0][~on_edge])
        np.testing.assert_allclose(out.mask_probs[i].numpy(), 1.0 / (1.0 + np.exp(-logits[0])), atol=1e-5)
        np.testing.assert_allclose(out.iou_scores[i].item(), scores[0], atol=1e-5)
        foreground += masks[0].mean()
    # Meaningful comparison: the masks are neither empty nor full.
    assert 0.02 < foreground / len(boxes) < 0.98


def test_multimask_output_returns_the_best_scored_mask(segmenter, official):
    gray = _ultrasound_like(300, 410, seed=5)
    official.set_image(np.repeat(gray[..., None], 3, axis=-1))
    segmenter.set_torch_image(torch.from_numpy(gray))
    boxes = _random_boxes(300, 410, 3, seed=6)
    batched = segmenter.predict_boxes(torch.from_numpy(boxes), multimask_output=True)
    for i, box in enumerate(boxes):
        masks, scores, _ = official.predict(box=box, multimask_output=True)
        best = int(np.argmax(scores))
        out = segmenter.predict_boxes(torch.from_numpy(box[None]), multimask_output=True)
        np.testing.assert_array_equal(out.masks[0].numpy(), masks[best])
        np.testing.assert_allclose(out.iou_scores[0].item(), scores[best], atol=1e-6)
        np.testing.assert_allclose(batched.iou_scores[i].item(), scores[best], atol=1e-5)
        assert (batched.masks[i].numpy() != masks[best]).mean() < 1e-4


def test_batched_equals_one_by_one_and_numpy_path_equals_tensor_path(segmenter):
    gray = _ultrasound_like(240, 320, seed=7)
    segmenter.set_torch_image(torch.from_numpy(gray))
    boxes = torch.from_numpy(_random_boxes(240, 320, 8, seed=8))
    batched = segmenter.predict_boxes(boxes)
    for i in range(len(boxes)):
        single = segmenter.predict_boxes(boxes[i : i + 1])
        # Equal up to pixels whose probability is within 1e-5 of 0.5 (last-bit rounding of the batch).
        differ = single.masks[0] != batched.masks[i]
        assert torch.all((single.mask_probs[0][differ] - 0.5).abs() < 1e-5)
        torch.testing.assert_close(single.mask_probs[0], batched.mask_probs[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(single.iou_scores[0], batched.iou_scores[i], atol=1e-5, rtol=0)

    legacy = segmenter.predict_boxes(boxes.numpy(), as_numpy=True)
    assert isinstance(legacy.masks, np.ndarray) and legacy.masks.dtype == np.bool_
    assert isinstance(legacy.mask_probs, np.ndarray) and legacy.mask_probs.dtype == np.float32
    assert isinstance(legacy.iou_scores, np.ndarray) and legacy.iou_scores.dtype == np.float32
    np.testing.assert_array_equal(legacy.masks, batched.masks.numpy())
    np.testing.assert_array_equal(legacy.mask_probs, batched.mask_probs.numpy())
    np.testing.assert_array_equal(legacy.iou_scores, batched.iou_scores.numpy())

    via_segment = segmenter.segment(torch.from_numpy(gray), boxes)
    assert torch.equal(via_segment.masks, batched.masks)


def test_zero_boxes_and_fixed_size_batches_with_dummy_rows(segmenter):
    gray = _ultrasound_like(120, 160, seed=9)
    segmenter.set_torch_image(torch.from_numpy(gray))
    empty = segmenter.predict_boxes(torch.zeros((0, 4)))
    assert empty.masks.shape == (0, 120, 160) and empty.mask_probs.shape == (0, 120, 160)
    assert empty.iou_scores.shape == (0,)
    assert segmenter.predict_boxes(np.zeros((0, 4)), as_numpy=True).masks.shape == (0, 120, 160)

    real = torch.from_numpy(_random_boxes(120, 160, 2, seed=10))
    fixed = torch.zeros((4, 4))
    fixed[0], fixed[2] = real[0], real[1]
    fixed[3] = float("nan")  # a dummy row must not poison the batch
    valid = torch.tensor([True, False, True, False])
    out = segmenter.predict_boxes(fixed, valid=valid)
    alone = segmenter.predict_boxes(real)
    assert (out.masks[[0, 2]] != alone.masks).float().mean() < 1e-4
    torch.testing.assert_close(out.mask_probs[[0, 2]], alone.mask_probs, atol=1e-5, rtol=0)
    assert not out.masks[[1, 3]].any()
    assert torch.all(out.mask_probs[[1, 3]] == 0) and torch.all(out.iou_scores[[1, 3]] == 0)
    assert torch.isfinite(out.mask_probs).all() and torch.isfinite(out.iou_scores).all()


def test_resident_path_makes_no_host_hops(segmenter, host_hops):
    """What would sync, copy or upload on a GPU (the runtime audit; on CPU its emulated placement)."""
    frames = [torch.from_numpy(_ultrasound_like(333, 222, seed=s)) for s in (11, 12)]
    boxes = torch.from_numpy(_random_boxes(333, 222, 4, seed=13))
    valid = torch.tensor([True, True, False, True])
    with host_hops(*frames, boxes, valid) as first:  # inputs already on the device, as in the pipeline
        segmenter.set_torch_image(frames[0])
        segmenter.predict_boxes(boxes, valid=valid)
    # the first frame of a new size builds the resize tables (and the encoder its relative-position
    # index) on the host and uploads them, once per size, declared (none if an earlier test used it)
    assert first.undeclared == {}, first
    tables = ("UltramotionIGTLib/core/sam/resize.py:", "UltramotionIGTLib/core/sam/encoder.py:")
    assert all(e.origin.startswith(tables) for e in first.events), first
    with host_hops(*frames, boxes, valid) as hops:
        for frame in frames:
            segmenter.set_torch_image(frame)
            out = segmenter.predict_boxes(boxes, valid=valid)
    assert hops.undeclared == {}, hops
    assert isinstance(out, SamOutput) and out.masks.device.type == "cpu"

    with host_hops(boxes) as legacy:  # the legacy path does hop, and the counter sees it
        segmenter.predict_boxes(boxes, as_numpy=True)
    assert legacy.undeclared["cpu"] >= 3, legacy


def test_image_inputs_and_misuse(segmenter):
    fresh = SamSegmenter(segmenter.model, device="cpu")
    with pytest.raises(RuntimeError, match="set_torch_image"):
        fresh.predict_boxes(torch.zeros((1, 4)))
    gray = _ultrasound_like(64, 80, seed=14)
    boxes = torch.tensor([[10.0, 10.0, 50.0, 40.0]])
    by_uint8 = fresh.segment(torch.from_numpy(gray), boxes)
    by_numpy = fresh.segment(gray, boxes)
    by_float = fresh.segment(torch.from_numpy(gray).float(), boxes)
    by_channel = fresh.segment(torch.from_numpy(gray)[..., None], boxes)
    for other in (by_numpy, by_float, by_channel):
        assert torch.equal(other.masks, by_uint8.masks)
    with pytest.raises(UnsupportedImageTypeError, match="HxW"):
        fresh.set_torch_image(torch.zeros((4, 64, 80), dtype=torch.uint8))
    with pytest.raises(UnsupportedImageTypeError, match="uint8"):
        fresh.set_torch_image(torch.zeros((64, 80), dtype=torch.int32))
    with pytest.raises(ValueError, match="Nx4"):
        fresh.predict_boxes(torch.zeros((2, 3)))


# ---------------------------------------------------------------------------------------------------
# Checkpoint formats and errors
# ---------------------------------------------------------------------------------------------------


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_official_format_pth_round_trip(tmp_path):
    # Official layout: a plain state dict in a .pth zip, no sidecar, the type given or recognised.
    path = write_random_sam_checkpoint(tmp_path / "sam_vit_t_demo.pth", "vit_t_demo", seed=1)
    sidecar_config_path(path).unlink()  # keep only the state dict, as Meta ships it
    assert zipfile.is_zipfile(path)
    state_dict, carried = read_sam_checkpoint(path)
    assert carried is None and all(torch.is_tensor(v) for v in state_dict.values())
    expected = random_sam_model("vit_t_demo", seed=1)
    for model_type in ("vit_t_demo", "auto"):
        model, config = load_sam_with_config(path, model_type=model_type, device="cpu")
        assert config == SAM_CONFIGS["vit_t_demo"]
        assert _same_weights(model, expected)
    assert not _same_weights(expected, random_sam_model("vit_t_demo", seed=2))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_custom_config_round_trip(tmp_path, suffix):
    path = write_random_sam_checkpoint(tmp_path / f"tiny{suffix}", TINY_CUSTOM, seed=4)
    if suffix == ".pth":
        record = json.loads(sidecar_config_path(path).read_text())
        assert record["model_type"] == "tiny_test" and record["sam_config"]["window_size"] == 5
    else:
        assert not sidecar_config_path(path).exists()
    model, config = load_sam_with_config(path, device="cpu")
    assert config == TINY_CUSTOM
    assert _same_weights(model, random_sam_model(TINY_CUSTOM, seed=4))
    # The name the file carries must agree with an explicit type.
    with pytest.raises(CheckpointError, match="tiny_test"):
        load_sam(path, model_type="vit_t_demo", device="cpu")
    # And the custom model works end to end like the official predictor (padded windows here).
    seg = SamSegmenter(model, config)
    gray = _ultrasound_like(90, 70, seed=15)
    box = np.array([5, 10, 60, 80], dtype=np.float32)
    out = seg.segment(torch.from_numpy(gray), torch.from_numpy(box[None]))
    predictor = SamPredictor(load_sam(path, device="cpu"))
    predictor.set_image(np.repeat(gray[..., None], 3, axis=-1))
    masks, _, _ = predictor.predict(box=box, multimask_output=False)
    np.testing.assert_array_equal(out.masks[0].numpy(), masks[0])


def test_custom_pth_without_config_needs_one(tmp_path):
    model = random_sam_model(TINY_CUSTOM, seed=0)
    path = tmp_path / "orphan.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"orphan\.pth.*custom config.*orphan\.json"):
        load_sam(path, device="cpu")
    assert _same_weights(load_sam(path, model_type=TINY_CUSTOM, device="cpu"), model)


def test_missing_empty_truncated_and_corrupt_files(tmp_path, demo_checkpoint):
    with pytest.raises(CheckpointError, match="not found.*nope.pth"):
        load_sam(tmp_path / "nope.pth", device="cpu")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pth.*empty"):
        load_sam(empty, device="cpu")
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pth"):
        load_sam(text, device="cpu")

    pth = write_random_sam_checkpoint(tmp_path / "whole.pth", "vit_t_demo")
    data = pth.read_bytes()
    truncated_pth = tmp_path / "cut.pth"
    truncated_pth.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth.*truncated or corrupt"):
        load_sam(truncated_pth, model_type="vit_t_demo", device="cpu")

    data = demo_checkpoint.read_bytes()
    truncated_st = tmp_path / "cut.safetensors"
    truncated_st.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated or corrupt"):
        load_sam(truncated_st, device="cpu")

    bad_sidecar = write_random_sam_checkpoint(tmp_path / "side.pth", TINY_CUSTOM)
    sidecar_config_path(bad_sidecar).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"side\.json"):
        load_sam(bad_sidecar, device="cpu")


def test_pickle_with_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "code-was-run"

    class Payload:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"image_encoder.pos_embed": Payload()}, fh, protocol=2)
    with pytest.raises(CheckpointError, match=r"evil\.pth.*weights_only"):
        load_sam(path, model_type="vit_t_demo", device="cpu")
    zipped = tmp_path / "evil_zip.pth"
    torch.save({"weights": Payload()}, zipped)
    marker_existed = marker.exists()  # torch.save pickles without running the payload
    with pytest.raises(CheckpointError, match=r"evil_zip\.pth.*weights_only"):
        load_sam(zipped, model_type="vit_t_demo", device="cpu")
    assert not marker.exists() and not marker_existed


def test_wrong_type_names_the_file_and_what_it_looks_like(tmp_path):
    path = write_random_sam_checkpoint(tmp_path / "demo.pth", "vit_t_demo")
    sidecar_config_path(path).unlink()
    with pytest.raises(CheckpointError, match=r"demo\.pth.*'vit_b'.*looks like SAM type 'vit_t_demo'"):
        load_sam(path, model_type="vit_b", device="cpu")
    with pytest.raises(CheckpointError, match="unknown SAM model type 'vit_x'"):
        load_sam(path, model_type="vit_x", device="cpu")
    not_sam = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, not_sam)
    with pytest.raises(CheckpointError, match=r"resnet\.pth.*does not look like a SAM state dict"):
        load_sam(not_sam, device="cpu")
    not_dict = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), not_dict)
    with pytest.raises(CheckpointError, match=r"tensor\.pth.*not a SAM state dict"):
        load_sam(not_dict, device="cpu")


def test_save_sam_checkpoint_keeps_extra_metadata(tmp_path):
    model = random_sam_model("vit_t_demo", seed=5)
    path = save_sam_checkpoint(
        model, tmp_path / "trained.safetensors", SAM_CONFIGS["vit_t_demo"], metadata={"steps": 10}
    )
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["steps"] == "10" and meta["model_type"] == "vit_t_demo"
    assert _same_weights(load_sam(path, model_type="vit_t_demo", device="cpu"), model)


@pytest.mark.slow
def test_official_vit_b_layout_round_trip(tmp_path):
    path = write_random_sam_checkpoint(tmp_path / "sam_vit_b_random.pth", "vit_b", seed=0)
    assert not sidecar_config_path(path).exists()
    model, config = load_sam_with_config(path, model_type="auto", device="cpu")
    assert config.name == "vit_b"
    # The official builder accepts the very same state dict (strict key and shape match).
    from segment_anything import sam_model_registry

    official = sam_model_registry["vit_b"](checkpoint=None)
    official.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    assert _same_weights(model, official)


@pytest.mark.gpu
def test_cuda_resident_path_has_no_syncs_and_matches_cpu(demo_checkpoint):
    gpu = SamSegmenter.from_checkpoint(demo_checkpoint, device="cuda")
    cpu = SamSegmenter.from_checkpoint(demo_checkpoint, device="cpu")
    frames = [_ultrasound_like(480, 640, seed=s) for s in (21, 22)]
    boxes = torch.from_numpy(_random_boxes(480, 640, 8, seed=23))
    valid = torch.tensor([True] * 6 + [False] * 2)
    boxes_gpu, valid_gpu = boxes.cuda(), valid.cuda()
    frame_gpu = [torch.from_numpy(f).cuda() for f in frames]
    gpu.set_torch_image(frame_gpu[0])  # first frame of this size uploads the resize tables
    gpu.predict_boxes(boxes_gpu, valid=valid_gpu)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the steady state raises
    try:
        gpu.set_torch_image(frame_gpu[1])
        out = gpu.predict_boxes(boxes_gpu, valid=valid_gpu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.masks.is_cuda and out.mask_probs.is_cuda and out.iou_scores.is_cuda
    cpu.set_torch_image(torch.from_numpy(frames[1]))
    ref = cpu.predict_boxes(boxes, valid=valid)
    # Other kernels, other rounding: close probabilities, masks equal almost everywhere.
    torch.testing.assert_close(out.mask_probs.cpu(), ref.mask_probs, atol=1e-3, rtol=0)
    assert (out.masks.cpu() != ref.masks).float().mean() < 1e-3
