"""The D-FINE configs published on the Hugging Face hub (N/S/M/L/X, COCO and Objects365) load and run.

Testing/data/dfine_hub_configs.json writes the ten configs out. N and S are built on the CPU with random
weights and saved the way the hub stores them (no BatchNorm ``num_batches_tracked`` counters); M, L and X
are checked on the meta device (shapes only, no memory), which is what a config decides; all ten are.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from UltramotionIGTLib.core.detector import (
    PREPROCESSOR_NAME,
    WEIGHTS_NAME,
    DFineDetector,
    Preprocessing,
    preprocess_frames,
)

HUB_CONFIGS = {
    name: value
    for name, value in json.loads(
        (Path(__file__).resolve().parent / "data" / "dfine_hub_configs.json").read_text(encoding="utf-8")
    ).items()
    if not name.startswith("_")
}
#: parameter counts the D-FINE paper gives (millions, COCO heads), to check the meta-device builds
PAPER_PARAMS_M = {"n": 4, "s": 10, "m": 19, "l": 31, "x": 62}


def hub_config(entry: dict, num_labels: int | None = None):
    """A `DFineConfig` as transformers reads the hub's config.json (labels named ``label_i``)."""
    from transformers import DFineConfig

    data = {k: v for k, v in entry.items() if k not in ("hub_repo", "model_type")}
    labels = int(num_labels if num_labels is not None else data.pop("num_labels"))
    data.pop("num_labels", None)
    names = {i: f"label_{i}" for i in range(labels)}
    return DFineConfig(**data, num_labels=labels, id2label=names, label2id={v: k for k, v in names.items()})


def _unique_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.fixture(autouse=True)
def _two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def test_all_ten_published_configs_are_written_out():
    assert sorted(HUB_CONFIGS) == sorted(f"dfine-{s}-{d}" for s in "nsmlx" for d in ("coco", "obj365"))
    for name, entry in HUB_CONFIGS.items():
        assert entry["num_labels"] == (80 if name.endswith("coco") else 366)


def _write_hub_like_folder(entry: dict, folder: Path, seed: int) -> Path:
    """config.json + model.safetensors without num_batches_tracked + an RTDetrImageProcessor config."""
    from safetensors.torch import load_file, save_file
    from transformers import DFineForObjectDetection, RTDetrImageProcessor

    config = hub_config(entry)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DFineForObjectDetection(config).eval()
    model.save_pretrained(str(folder))
    weights = folder / WEIGHTS_NAME
    tensors = load_file(str(weights))
    counters = [k for k in tensors if k.endswith("num_batches_tracked")]
    assert counters  # transformers itself writes them: the hub's files do not have them
    save_file(
        {k: v for k, v in tensors.items() if k not in counters}, str(weights), metadata={"format": "pt"}
    )
    RTDetrImageProcessor().to_json_file(str(folder / PREPROCESSOR_NAME))  # the hub's: 640x640, bilinear
    return folder


@pytest.mark.plus
@pytest.mark.parametrize("name", ["dfine-n-coco", "dfine-s-obj365"])
def test_published_n_and_s_configs_load_and_run(name, tmp_path, plus_dir):
    from transformers import RTDetrImageProcessor

    from UltramotionIGTLib.io import read_sequence

    entry = HUB_CONFIGS[name]
    folder = _write_hub_like_folder(entry, tmp_path / name, seed=3)
    detector = DFineDetector.from_pretrained(folder, device="cpu", channels_last=False)
    assert len(detector.class_names) == entry["num_labels"] and detector.input_size == (640, 640)
    assert detector.num_queries == 300
    frame = torch.from_numpy(read_sequence(plus_dir / "SpinePhantomFreehand.igs.mha").frames[5])  # 616x820
    detections = detector.run_inference_torch(frame, num_top=100)
    assert detections.boxes.shape == (100, 4) and bool(torch.isfinite(detections.boxes).all())
    assert bool((detections.labels < entry["num_labels"]).all())
    # the same model input as transformers' own processor makes it (within its uint8 rounding)
    processor = RTDetrImageProcessor.from_pretrained(str(folder))
    theirs = processor(images=frame[None].expand(3, -1, -1), return_tensors="pt")["pixel_values"]
    ours = detector.preprocess_torch(frame[None, None])
    assert float((ours - theirs).abs().max()) <= 1.0 / 255.0 + 1e-6


@pytest.mark.parametrize("size", ["n", "s", "m", "l", "x"])
def test_published_configs_build_with_the_published_sizes(size, tmp_path):
    """Config -> config.json -> DFineConfig -> model on the meta device: shapes and parameter count."""
    from transformers import DFineConfig, DFineForObjectDetection

    for dataset in ("coco", "obj365"):
        entry = HUB_CONFIGS[f"dfine-{size}-{dataset}"]
        folder = tmp_path / dataset
        hub_config(entry).save_pretrained(str(folder))
        config = DFineConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            model = DFineForObjectDetection(config)
        assert model.class_embed[0].out_features == entry["num_labels"]
        backbone_out = model.model.backbone.intermediate_channel_sizes
        assert list(backbone_out) == entry["encoder_in_channels"]
        assert [proj[0].in_channels for proj in model.model.encoder_input_proj] == entry[
            "encoder_in_channels"
        ]
        assert len(model.model.decoder.layers) == entry["decoder_layers"]
        if dataset == "coco":
            millions = _unique_parameters(model) / 1e6
            assert abs(millions - PAPER_PARAMS_M[size]) < 1.5, f"{size}: {millions:.1f} M parameters"


def test_preprocessing_of_a_hub_processor_config(tmp_path):
    from transformers import RTDetrImageProcessor

    RTDetrImageProcessor().to_json_file(str(tmp_path / PREPROCESSOR_NAME))
    settings = Preprocessing.from_json_file(tmp_path / PREPROCESSOR_NAME)
    assert settings.input_size == (640, 640) and settings.resample == 2 and not settings.do_normalize
    frames = torch.randint(
        0, 256, (2, 1, 480, 600), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    assert preprocess_frames(frames, settings).shape == (2, 3, 640, 640)


@pytest.mark.plus
def test_letterbox_processor_config_is_followed(tmp_path, plus_dir):
    """A processor that keeps the aspect ratio (size max_height/max_width) and pads to pad_size: the
    device input equals the processor's on a real 820x616 frame, and boxes come back in frame pixels
    (transformers' own post-processing on the padded input, divided by the resize scale)."""
    from transformers import DFineForObjectDetection, RTDetrImageProcessor

    from UltramotionIGTLib.io import read_sequence

    folder = tmp_path / "letterbox"
    config = hub_config(HUB_CONFIGS["dfine-n-coco"], num_labels=2)
    torch.manual_seed(0)
    DFineForObjectDetection(config).eval().save_pretrained(str(folder))
    processor = RTDetrImageProcessor(
        size={"max_height": 640, "max_width": 640}, do_pad=True, pad_size={"height": 640, "width": 640}
    )
    processor.to_json_file(str(folder / PREPROCESSOR_NAME))
    detector = DFineDetector.from_pretrained(folder, device="cpu", channels_last=False)
    prep = detector.preprocessing
    assert prep.fit_size == (640, 640) and prep.input_size == (640, 640)
    frame = torch.from_numpy(read_sequence(plus_dir / "SpinePhantomFreehand.igs.mha").frames[5])  # 616x820
    assert prep.resized_size(616, 820) == (480, 640)  # the aspect ratio kept, the long side fitted
    theirs = processor(images=frame[None].expand(3, -1, -1), return_tensors="pt")["pixel_values"]
    ours = detector.preprocess_torch(frame[None, None])
    assert ours.shape == theirs.shape == (1, 3, 640, 640)
    assert float((ours - theirs).abs().max()) <= 1.0 / 255.0 + 1e-6
    assert float(ours[..., 480:, :].abs().max()) == 0.0  # the padding
    # boxes in frame pixels
    detections = detector.run_inference_torch(frame)  # the top num_queries, as the processor keeps
    with torch.inference_mode():
        outputs = detector.model(pixel_values=ours)
    post = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(640, 640)])[0]
    scale = torch.tensor([640 / 820, 480 / 616, 640 / 820, 480 / 616])
    torch.testing.assert_close(detections.boxes, post["boxes"] / scale, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(detections.scores, post["scores"])
    # written back as the processor wrote it
    prep.write(tmp_path)
    again = RTDetrImageProcessor.from_pretrained(str(tmp_path))
    assert again.size == processor.size and again.do_pad and again.pad_size == processor.pad_size
