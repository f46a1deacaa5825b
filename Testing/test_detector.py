"""DFineDetector: real tiny D-FINE models written in the real HF format, checked against transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from UltramotionIGTLib.core.detector import (
    CONFIG_NAME,
    PREPROCESSOR_NAME,
    WEIGHTS_NAME,
    Detections,
    DFineDetector,
    Preprocessing,
    postprocess_detections,
    preprocess_frames,
    save_detector_folder,
    small_dfine_config,
    write_random_detector,
)
from UltramotionIGTLib.errors import CheckpointError, UnsupportedImageTypeError
from UltramotionIGTLib.tools.benchmarks.legacy import run_inference_legacy

NON_SQUARE = (616, 820)  # H, W of the PLUS SpinePhantom frames
# The legacy host path resizes bilinearly without antialiasing; the resident path resizes as the image
# processor does (antialiased). They agree on frames that need no resize: the model input size.
MODEL_SIZE = (256, 256)


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory) -> Path:
    return write_random_detector(tmp_path_factory.mktemp("detector") / "dfine", seed=0)


@pytest.fixture(scope="module")
def detector(detector_dir) -> DFineDetector:
    return DFineDetector.from_pretrained(detector_dir, device="cpu")


def _frame(shape=NON_SQUARE, seed=1, dtype=torch.uint8) -> torch.Tensor:
    """A speckle-like frame with a bright band and a dark disc, so that the model sees structure."""
    g = torch.Generator().manual_seed(seed)
    h, w = shape
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    img = 60 + 40 * torch.rand((h, w), generator=g)
    img = torch.where(((yy - 0.6 * h) ** 2 + (xx - 0.4 * w) ** 2) < (0.1 * h) ** 2, 10.0, img)
    img = torch.where((yy - 0.3 * xx - 0.1 * h).abs() < 3, 230.0, img)
    return img.round().clamp(0, 255).to(dtype)


def _hf_outputs(detector: DFineDetector, frame: torch.Tensor):
    """The model's raw outputs for a frame, run by transformers directly on our model input."""
    pixel_values = detector.preprocess_torch(frame.reshape(1, -1, *frame.shape[-2:]))
    with torch.inference_mode():
        return detector.model(pixel_values=pixel_values)


def _assert_same(a: Detections, b: Detections, box_atol: float = 1e-3) -> None:
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.boxes, b.boxes, rtol=1e-5, atol=box_atol)


def _rows(d: Detections) -> np.ndarray:
    """Detections as rows (score, label, box) in a canonical order, for comparisons up to ties."""
    table = torch.cat([d.scores[:, None], d.labels[:, None].float(), d.boxes], 1).numpy().astype(np.float64)
    return table[np.lexsort(table.T[::-1])]


# ------------------------------------------------------------------ format, save/load


def test_folder_is_real_hf_format(detector_dir):
    from safetensors import safe_open
    from transformers import DFineForObjectDetection, RTDetrImageProcessor

    config = json.loads((detector_dir / CONFIG_NAME).read_text())
    assert config["model_type"] == "d_fine"
    assert config["id2label"] == {"0": "vessel", "1": "needle", "2": "bone"}
    with safe_open(str(detector_dir / WEIGHTS_NAME), framework="pt") as handle:
        assert len(list(handle.keys())) > 100
    # transformers itself loads the folder, and the processor config has our input size
    model = DFineForObjectDetection.from_pretrained(str(detector_dir), local_files_only=True)
    assert model.config.num_queries == 50
    processor = RTDetrImageProcessor.from_pretrained(str(detector_dir))
    assert (processor.size.height, processor.size.width) == (256, 256)
    assert processor.do_normalize is False


def test_properties(detector):
    assert detector.class_names == ("vessel", "needle", "bone")
    assert detector.input_size == (256, 256)
    assert detector.device == torch.device("cpu")
    assert not detector.model.training
    assert sum(p.numel() for p in detector.model.parameters()) < 1_000_000


def test_same_seed_same_weights_other_seed_differs(detector_dir, tmp_path):
    from safetensors.torch import load_file

    again = load_file(str(write_random_detector(tmp_path / "again", seed=0) / WEIGHTS_NAME))
    other = load_file(str(write_random_detector(tmp_path / "other", seed=1) / WEIGHTS_NAME))
    first = load_file(str(detector_dir / WEIGHTS_NAME))
    assert again.keys() == first.keys()
    assert all(torch.equal(again[k], first[k]) for k in first)
    assert any(not torch.equal(other[k], first[k]) for k in first)


def test_save_load_round_trip_gives_identical_outputs(detector, tmp_path):
    frame = _frame()
    before = detector.run_inference_torch(frame)
    folder = detector.save_pretrained(tmp_path / "copy")
    assert {p.name for p in folder.iterdir()} >= {CONFIG_NAME, WEIGHTS_NAME, PREPROCESSOR_NAME}
    reloaded = DFineDetector.from_pretrained(folder, device="cpu", channels_last=False)
    after = reloaded.run_inference_torch(frame)
    assert torch.equal(before.labels, after.labels)
    torch.testing.assert_close(before.scores, after.scores, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(before.boxes, after.boxes, rtol=1e-6, atol=1e-4)
    assert reloaded.input_size == detector.input_size and reloaded.class_names == detector.class_names


def test_save_detector_folder_leaves_a_training_model_alone(tmp_path):
    from transformers import DFineForObjectDetection

    model = DFineForObjectDetection(small_dfine_config(image_size=(224, 320))).train()
    trainable = [p.requires_grad for p in model.parameters()]
    folder = save_detector_folder(model, tmp_path / "checkpoint")
    assert model.training and [p.requires_grad for p in model.parameters()] == trainable
    loaded = DFineDetector.from_pretrained(folder, device="cpu")
    assert loaded.input_size == (224, 320)
    state = model.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in loaded.model.state_dict().items())


def test_small_config_validates_and_sets_labels():
    config = small_dfine_config(
        ("a", "b", "c"), image_size=(192, 320), num_queries=20, feature_strides=(8, 16, 32)
    )
    assert config.num_labels == 3 and config.id2label == {0: "a", 1: "b", 2: "c"}
    assert config.label2id == {"a": 0, "b": 1, "c": 2}
    assert config.num_feature_levels == 3 and config.num_queries == 20
    with pytest.raises(ValueError, match="multiple of the largest feature stride"):
        small_dfine_config(image_size=250)
    with pytest.raises(ValueError, match="distinct"):
        small_dfine_config(("a", "a"))
    with pytest.raises(ValueError, match="decoder_layers"):
        small_dfine_config(decoder_layers=1)


# ------------------------------------------------------------------ agreement with transformers


def test_preprocessing_mirrors_rtdetr_image_processor(detector, detector_dir):
    from transformers import RTDetrImageProcessor

    processor = RTDetrImageProcessor.from_pretrained(str(detector_dir))
    same_size = _frame((256, 256), seed=3)
    ours = detector.preprocess_torch(same_size[None, None])
    theirs = processor(images=same_size[None].expand(3, -1, -1), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-7)
    # upsampling a float frame: both bilinear (antialiasing only differs when shrinking)
    small = _frame((128, 160), seed=4, dtype=torch.float32)
    ours = detector.preprocess_torch(small[None, None])
    theirs = processor(images=small[None].expand(3, -1, -1), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_normalising_processor_config_is_mirrored(detector_dir, tmp_path):
    from transformers import RTDetrImageProcessor

    folder = shutil.copytree(detector_dir, tmp_path / "normalised")
    processor_path = folder / PREPROCESSOR_NAME
    settings = json.loads(processor_path.read_text())
    settings.update(do_normalize=True, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3])
    processor_path.write_text(json.dumps(settings))
    detector = DFineDetector.from_pretrained(folder, device="cpu")
    assert detector.preprocessing.do_normalize
    colour = torch.randint(
        0, 256, (3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    theirs = RTDetrImageProcessor.from_pretrained(str(folder))(images=colour, return_tensors="pt")[
        "pixel_values"
    ]
    torch.testing.assert_close(detector.preprocess_torch(colour[None]), theirs, rtol=1e-6, atol=1e-6)
    _assert_same(detector.run_inference_torch(colour), run_inference_legacy(detector, colour))


@pytest.mark.plus
@pytest.mark.parametrize("resample", [2, 3, 0])
def test_device_resize_equals_the_image_processor_on_plus_frames(plus_dir, tmp_path, resample):
    """The processor the folder declares and the device path give the same model input (PLUS frames)."""
    from transformers import RTDetrImageProcessor

    from UltramotionIGTLib.io import read_sequence

    frames = torch.from_numpy(read_sequence(plus_dir / "SpinePhantomFreehand.igs.mha").frames[:3])  # 616x820
    for size in [(640, 640), (256, 256), (320, 480)]:
        settings = Preprocessing(input_size=size, resample=resample)
        settings.write(tmp_path)
        processor = RTDetrImageProcessor.from_pretrained(str(tmp_path))
        for batch in (frames, frames.float()):  # uint8 frames are resized as integers, float ones as floats
            theirs = processor(images=list(batch[:, None].expand(-1, 3, -1, -1)), return_tensors="pt")
            ours = preprocess_frames(batch[:, None], settings)
            difference = (ours - theirs["pixel_values"]).abs()
            # uint8: torchvision's CPU kernel weighs in 16-bit fixed point, we in float: one grey level
            # on a few pixels (under 1 % here), never more
            assert float(difference.max()) <= 1.0 / 255.0 + 1e-6, (size, resample, batch.dtype)
            assert float((difference > 0.5 / 255.0).float().mean()) < 0.01, (size, resample, batch.dtype)
        if resample == 2 and size == (256, 256):  # the old resize (no antialiasing) was far off
            old = F.interpolate(frames[:, None].float(), size=size, mode="bilinear", antialias=False) / 255.0
            assert float((old.expand(-1, 3, -1, -1) - theirs["pixel_values"]).abs().max()) > 0.1


def test_unsupported_resample_names_the_processor_config(detector_dir, tmp_path):
    folder = shutil.copytree(detector_dir, tmp_path / "lanczos")
    settings = json.loads((folder / PREPROCESSOR_NAME).read_text())
    settings["resample"] = 1
    (folder / PREPROCESSOR_NAME).write_text(json.dumps(settings))
    with pytest.raises(CheckpointError, match="LANCZOS") as err:
        DFineDetector.from_pretrained(folder, device="cpu")
    assert str(folder / PREPROCESSOR_NAME) in str(err.value)


def test_folder_without_batchnorm_counters_loads(detector, detector_dir, tmp_path):
    """transformers' own folders (e.g. the hub's) leave out num_batches_tracked; they load as they are."""
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(detector_dir, tmp_path / "no_counters")
    tensors = load_file(str(folder / WEIGHTS_NAME))
    counters = [k for k in tensors if k.endswith("num_batches_tracked")]
    assert counters
    save_file({k: v for k, v in tensors.items() if k not in counters}, str(folder / WEIGHTS_NAME))
    loaded = DFineDetector.from_pretrained(folder, device="cpu")
    _assert_same(loaded.run_inference_torch(_frame()), detector.run_inference_torch(_frame()))


def test_without_processor_config_the_config_size_is_used(detector_dir, tmp_path):
    folder = shutil.copytree(detector_dir, tmp_path / "no_processor")
    (folder / PREPROCESSOR_NAME).unlink()
    assert DFineDetector.from_pretrained(folder, device="cpu").input_size == (256, 256)


@pytest.mark.parametrize("num_top", [None, 7])
def test_device_postprocessing_matches_transformers(detector, num_top):
    from transformers import RTDetrImageProcessor

    frame = _frame()
    outputs = _hf_outputs(detector, frame)
    k = detector.num_queries if num_top is None else num_top
    ours = detector.run_inference_torch(frame, num_top=num_top)
    assert ours.boxes.shape == (k, 4) and ours.scores.shape == (k,) and ours.labels.shape == (k,)
    assert (
        ours.boxes.dtype == torch.float32
        and ours.scores.dtype == torch.float32
        and ours.labels.dtype == torch.int64
    )
    theirs = RTDetrImageProcessor().post_process_object_detection(
        outputs, threshold=0.0, target_sizes=[NON_SQUARE], use_focal_loss=True
    )[0]
    # transformers keeps num_queries detections (top-k over queries x classes), sorted by score
    assert theirs["scores"].shape[0] == detector.num_queries
    torch.testing.assert_close(ours.scores, theirs["scores"][:k], rtol=1e-5, atol=1e-5)
    assert torch.equal(ours.labels, theirs["labels"][:k])
    torch.testing.assert_close(ours.boxes, theirs["boxes"][:k], rtol=1e-5, atol=1e-5)
    assert bool((ours.scores[:-1] >= ours.scores[1:]).all())


def test_postprocess_function_on_batched_outputs():
    from transformers import RTDetrImageProcessor
    from transformers.models.d_fine.modeling_d_fine import DFineObjectDetectionOutput

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 30, 3, generator=g) * 3
    boxes = torch.rand(2, 30, 4, generator=g)
    ours = postprocess_detections(logits, boxes, (480, 640), 30)
    theirs = RTDetrImageProcessor().post_process_object_detection(
        DFineObjectDetectionOutput(logits=logits, pred_boxes=boxes),
        threshold=0.0,
        target_sizes=[(480, 640)] * 2,
    )
    for b in range(2):
        torch.testing.assert_close(ours.scores[b], theirs[b]["scores"], rtol=1e-5, atol=1e-5)
        assert torch.equal(ours.labels[b], theirs[b]["labels"])
        torch.testing.assert_close(ours.boxes[b], theirs[b]["boxes"], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ geometry, layouts, legacy path


def test_boxes_are_in_input_frame_pixels_for_non_square_frames(detector):
    frame = _frame(NON_SQUARE)
    big = detector.run_inference_torch(frame)
    # the same model input given as a 256x256 frame (0..255 float): boxes in 256-pixel units
    model_input = detector.preprocess_torch(frame[None, None])[0] * 255.0
    small = detector.run_inference_torch(model_input)
    assert torch.equal(big.labels, small.labels)
    h, w = NON_SQUARE
    scale_big = torch.tensor([w, h, w, h], dtype=torch.float32)
    torch.testing.assert_close(big.boxes / scale_big, small.boxes / 256.0, rtol=1e-4, atol=1e-4)
    # and directly from the model's normalised cxcywh boxes
    outputs = _hf_outputs(detector, frame)
    num_classes = outputs.logits.shape[-1]
    query = torch.div(
        torch.topk(outputs.logits.sigmoid().flatten(1), 5).indices, num_classes, rounding_mode="floor"
    )[0]
    cx, cy, bw, bh = outputs.pred_boxes[0, query].unbind(-1)
    expected = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
    torch.testing.assert_close(big.boxes[:5], expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("layout", ["hw_uint8", "hwc_float", "chw_float", "1hw_uint8", "numpy_hw"])
def test_legacy_path_equals_resident_path(detector, layout):
    gray = _frame(MODEL_SIZE, seed=5)
    frame = {
        "hw_uint8": gray,
        "hwc_float": gray.float()[..., None].expand(-1, -1, 3).contiguous(),
        "chw_float": gray.float()[None].expand(3, -1, -1).contiguous(),
        "1hw_uint8": gray[None],
        "numpy_hw": gray.numpy(),
    }[layout]
    resident = detector.run_inference_torch(frame)
    legacy = run_inference_legacy(detector, frame)
    assert legacy.device == resident.device == detector.device
    _assert_same(resident, legacy)
    # every layout of the same grey image gives the same detections
    _assert_same(resident, detector.run_inference_torch(gray))


def test_colour_frames_and_batches(detector):
    g = torch.Generator().manual_seed(7)
    colour = torch.randint(0, 256, (*MODEL_SIZE, 3), dtype=torch.uint8, generator=g)
    single = detector.run_inference_torch(colour)
    _assert_same(single, detector.run_inference_torch(colour.permute(2, 0, 1)))
    _assert_same(single, run_inference_legacy(detector, colour))
    frames = torch.stack([_frame(MODEL_SIZE, seed=8), _frame(MODEL_SIZE, seed=9)])
    batch = detector.run_inference_batch(frames)
    assert batch.boxes.shape == (2, detector.num_queries, 4)
    for i in range(2):
        one = detector.run_inference_torch(frames[i])
        _assert_same(Detections(batch.boxes[i], batch.scores[i], batch.labels[i]), one)
    _assert_same(batch, run_inference_legacy(detector, frames, batched=True))


def test_bad_frames_and_num_top(detector):
    with pytest.raises(UnsupportedImageTypeError, match=r"\(4, 5, 6, 7\)"):
        detector.run_inference_torch(torch.zeros(4, 5, 6, 7))
    with pytest.raises(UnsupportedImageTypeError, match="shape"):
        detector.run_inference_torch(torch.zeros(5, 6, 7))
    with pytest.raises(UnsupportedImageTypeError, match="bool"):
        detector.run_inference_torch(torch.zeros(64, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_top"):
        detector.run_inference_torch(torch.zeros(64, 64), num_top=0)
    full = detector.run_inference_torch(_frame(), num_top=100)  # queries x classes = 100
    assert full.scores.shape == (100,)


# ------------------------------------------------------------------ host syncs


def test_resident_path_makes_no_host_hops(detector, host_hops):
    from torch.profiler import ProfilerActivity, profile

    frame = _frame()
    detector.run_inference_torch(frame)  # warm-up (caches)
    with profile(activities=[ProfilerActivity.CPU]) as prof, host_hops() as hops:
        detections = detector.run_inference_torch(frame)
    assert hops.events == [], hops
    # and the profiler, independently: no op that reads a device value on the host ran
    syncing = {
        "aten::_local_scalar_dense",
        "aten::item",
        "aten::nonzero",
        "aten::masked_select",
        "aten::is_nonzero",
    }
    seen = {event.key for event in prof.key_averages()}
    assert not seen & syncing, f"host-reading ops in the resident path: {seen & syncing}"
    assert detections.scores.shape == (detector.num_queries,)
    # the counter does see the legacy path's hops: frame down, logits down, detections up
    with host_hops() as legacy:
        run_inference_legacy(detector, frame)
    assert legacy.undeclared["cpu"] >= 2 and legacy.undeclared["to_host"] >= 1, legacy
    assert legacy.undeclared["upload"] >= 4, legacy


# ------------------------------------------------------------------ checkpoint errors


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_folder_and_files_name_the_path(detector_dir, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match="does not exist") as err:
        DFineDetector.from_pretrained(missing, device="cpu")
    assert str(missing) in str(err.value)

    a_file = tmp_path / "file.safetensors"
    a_file.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        DFineDetector.from_pretrained(a_file, device="cpu")

    no_config = _copy(detector_dir, tmp_path / "no_config")
    (no_config / CONFIG_NAME).unlink()
    with pytest.raises(CheckpointError) as err:
        DFineDetector.from_pretrained(no_config, device="cpu")
    assert str(no_config / CONFIG_NAME) in str(err.value)

    no_weights = _copy(detector_dir, tmp_path / "no_weights")
    (no_weights / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match=WEIGHTS_NAME) as err:
        DFineDetector.from_pretrained(no_weights, device="cpu")
    assert str(no_weights) in str(err.value)


def test_bad_config_names_the_file(detector_dir, tmp_path):
    broken = _copy(detector_dir, tmp_path / "broken_json")
    (broken / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON") as err:
        DFineDetector.from_pretrained(broken, device="cpu")
    assert str(broken / CONFIG_NAME) in str(err.value)

    other = _copy(detector_dir, tmp_path / "other_model")
    config = json.loads((other / CONFIG_NAME).read_text())
    config["model_type"] = "rt_detr"
    (other / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'rt_detr'") as err:
        DFineDetector.from_pretrained(other, device="cpu")
    assert str(other / CONFIG_NAME) in str(err.value)

    bad_size = _copy(detector_dir, tmp_path / "bad_size")
    processor = json.loads((bad_size / PREPROCESSOR_NAME).read_text())
    processor["size"] = {"height": 250, "width": 256}
    (bad_size / PREPROCESSOR_NAME).write_text(json.dumps(processor))
    with pytest.raises(CheckpointError, match=PREPROCESSOR_NAME):
        DFineDetector.from_pretrained(bad_size, device="cpu")


@pytest.mark.parametrize("model_type", ["rt_detr", "rt_detr_v2"])
def test_rt_detr_folders_get_one_line_naming_them(detector_dir, tmp_path, model_type):
    folder = _copy(detector_dir, tmp_path / model_type)
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["model_type"] = model_type
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        DFineDetector.from_pretrained(folder, device="cpu")
    message = str(err.value)
    assert len(message.splitlines()) == 1 and str(folder / CONFIG_NAME) in message
    assert ("RT-DETRv2" if model_type == "rt_detr_v2" else "RT-DETR (") in message and "'d_fine'" in message


def test_original_checkpoint_where_a_folder_is_expected_points_at_import_dfine(tmp_path):
    checkpoint = tmp_path / "Dfine_last.pt"
    torch.save({"backbone.stem.stem1.conv.weight": torch.zeros(16, 3, 3, 3)}, checkpoint)
    with pytest.raises(CheckpointError, match="models import-dfine") as err:
        DFineDetector.from_pretrained(checkpoint, device="cpu")
    assert str(checkpoint) in str(err.value) and len(str(err.value).splitlines()) == 1
    renamed = tmp_path / "weights.bin.renamed"  # recognised by content, not only by name
    renamed.write_bytes(checkpoint.read_bytes())
    with pytest.raises(CheckpointError, match="models import-dfine"):
        DFineDetector.from_pretrained(renamed, device="cpu")
    folder = tmp_path / "run42"
    folder.mkdir()
    checkpoint.rename(folder / "Dfine_last_mono.pth")
    with pytest.raises(CheckpointError, match=r"has no config.json.*Dfine_last_mono.pth.*import-dfine"):
        DFineDetector.from_pretrained(folder, device="cpu")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_weights_name_the_file(detector_dir, tmp_path, damage):
    folder = _copy(detector_dir, tmp_path / damage)
    weights = folder / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": b"\x13\x37" * 500, "empty": b""}[damage]
    )
    with pytest.raises(CheckpointError, match="corrupt or truncated") as err:
        DFineDetector.from_pretrained(folder, device="cpu")
    assert str(weights) in str(err.value)


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"num_labels": 4}, "other shapes than the config"),
        ({"d_model": 32}, "other shapes than the config"),
        ({"decoder_layers": 3}, "are missing"),
        ({"decoder_layers": 1}, "do not"),
    ],
)
def test_weights_not_matching_config_name_the_file(detector_dir, tmp_path, change, expect):
    folder = _copy(detector_dir, tmp_path / "mismatch")
    if "num_labels" in change:
        other = small_dfine_config(("a", "b", "c", "d"))
    elif "d_model" in change:
        other = small_dfine_config(d_model=change["d_model"])
    else:  # a hand-edited config.json: the weights have 2 decoder layers
        other = small_dfine_config()
        other.decoder_layers = change["decoder_layers"]
    other.to_json_file(str(folder / CONFIG_NAME))
    with pytest.raises(CheckpointError, match=expect) as err:
        DFineDetector.from_pretrained(folder, device="cpu")
    message = str(err.value)
    assert (
        "do not" in message and str(folder / WEIGHTS_NAME) in message and str(folder / CONFIG_NAME) in message
    )


def test_extra_tensors_in_weights_name_the_file(detector_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(detector_dir, tmp_path / "extra")
    tensors = load_file(str(folder / WEIGHTS_NAME))
    tensors["model.decoder.layers.9.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not in the config") as err:
        DFineDetector.from_pretrained(folder, device="cpu")
    assert str(folder / WEIGHTS_NAME) in str(err.value)


def test_half_precision_checkpoint_runs(detector_dir, tmp_path):
    reference = DFineDetector.from_pretrained(detector_dir, device="cpu")
    half = DFineDetector(
        DFineDetector.from_pretrained(detector_dir, device="cpu").model.to(torch.bfloat16), device="cpu"
    )
    folder = half.save_pretrained(tmp_path / "bf16")
    loaded = DFineDetector.from_pretrained(folder, device="cpu")
    assert loaded.model.dtype == torch.bfloat16
    frame = _frame(MODEL_SIZE)
    detections = loaded.run_inference_torch(frame)
    assert detections.boxes.dtype == torch.float32 and detections.scores.dtype == torch.float32
    # the sorted scores follow the float32 model up to bf16 rounding (random weights: near-ties reorder)
    torch.testing.assert_close(
        detections.scores, reference.run_inference_torch(frame).scores, rtol=0, atol=0.02
    )
    # bf16 logits tie exactly; topk and the legacy argsort may order ties differently: compare as sets,
    # above the lowest kept score (at the cut-off, tied candidates may be kept by one and not the other)
    legacy = run_inference_legacy(loaded, frame)
    ours, theirs = _rows(detections), _rows(legacy)
    floor = max(ours[:, 0].min(), theirs[:, 0].min())
    np.testing.assert_allclose(ours[ours[:, 0] > floor], theirs[theirs[:, 0] > floor], rtol=1e-5, atol=1e-3)


# ------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_cuda_resident_path_has_no_syncs_and_matches_cpu(detector_dir):
    cpu = DFineDetector.from_pretrained(detector_dir, device="cpu", channels_last=False)
    gpu = DFineDetector.from_pretrained(detector_dir, device="cuda")
    frame = _frame()
    on_gpu = frame.to("cuda")
    gpu.run_inference_torch(on_gpu)  # warm-up (cuDNN autotuning, caches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        detections = gpu.run_inference_torch(on_gpu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert detections.device.type == "cuda"
    reference = cpu.run_inference_torch(frame)
    torch.testing.assert_close(detections.scores.cpu(), reference.scores, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(detections.boxes.cpu(), reference.boxes, rtol=1e-3, atol=0.5)
    at_model_size = _frame(MODEL_SIZE).to("cuda")
    legacy = run_inference_legacy(gpu, at_model_size)
    resident = gpu.run_inference_torch(at_model_size)
    torch.testing.assert_close(legacy.scores, resident.scores, rtol=1e-5, atol=1e-6)
