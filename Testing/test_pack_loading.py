"""A pack is checked by loading it: ``models make / import / verify`` build both models from the files.

Real layouts with random weights: an RT-DETR folder written by transformers, a SAM-HQ checkpoint (the
official ViT-B keys plus SAM-HQ's extra decoder tensors, as sam_hq_vit_b.pth holds them), a SAM file
labelled with another type, and an HF Trainer output folder (optimizer, scheduler, RNG state,
trainer state and a pickled training_args.bin beside the model).
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from UltramotionIGTLib.core.detector import write_random_detector
from UltramotionIGTLib.core.packet import CLASS_NAMES
from UltramotionIGTLib.core.sam import write_random_sam_checkpoint
from UltramotionIGTLib.core.sam.checkpoint import random_sam_model
from UltramotionIGTLib.core.sam.config import build_sam_model
from UltramotionIGTLib.errors import CheckpointError
from UltramotionIGTLib.models.packs import (
    MANIFEST_NAME,
    import_pack,
    load_pack,
    make_pack,
    read_manifest,
    verify_pack,
    write_manifest,
    zip_pack,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("byom")
    det = write_random_detector(root / "detector", image_size=128, seed=0, num_queries=20)
    sam = write_random_sam_checkpoint(root / "sam" / "sam_vit_t_demo.safetensors", seed=0)
    return {"root": root, "detector": Path(det), "sam": Path(sam)}


def _no_staging(message: str) -> None:
    for staging in (".making-pack-", ".importing-", "ultramotion-verify-"):
        assert staging not in message, message


def _rt_detr_folder(folder: Path) -> Path:
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig

    backbone = RTDetrResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])
    config = RTDetrConfig(
        backbone_config=backbone,
        encoder_hidden_dim=32,
        d_model=32,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        decoder_layers=1,
        num_queries=20,
        num_labels=2,
    )
    torch.manual_seed(0)
    RTDetrForObjectDetection(config).save_pretrained(str(folder))
    return folder


def test_make_refuses_an_rt_detr_folder_naming_it(models, tmp_path):
    folder = _rt_detr_folder(tmp_path / "my-rtdetr")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "rt_detr"
    with pytest.raises(CheckpointError, match="RT-DETR") as err:
        make_pack(tmp_path / "pack", detector_dir=folder, sam_checkpoint=models["sam"])
    assert str(folder) in str(err.value)
    _no_staging(str(err.value))
    assert not (tmp_path / "pack").exists()


def _zeros_like_official(model_type: str) -> dict[str, torch.Tensor]:
    """The official state dict layout of ``model_type`` with zero tensors (shapes are what matters)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_sam_model(model_type).state_dict().items()}
    return {k: torch.zeros(shape) for k, shape in shapes.items()}


def _sam_hq_vit_b(path: Path) -> Path:
    """sam_hq_vit_b.pth's layout: the official ViT-B keys plus SAM-HQ's HQ token, its MLP and the
    ViT-feature fusion convolutions in the mask decoder (SAM-HQ, Ke et al. 2023, MaskDecoderHQ)."""
    state = _zeros_like_official("vit_b")
    state.update(
        {
            "mask_decoder.hf_token.weight": torch.zeros(1, 256),
            "mask_decoder.hf_mlp.layers.0.weight": torch.zeros(256, 256),
            "mask_decoder.hf_mlp.layers.0.bias": torch.zeros(256),
            "mask_decoder.hf_mlp.layers.1.weight": torch.zeros(256, 256),
            "mask_decoder.hf_mlp.layers.1.bias": torch.zeros(256),
            "mask_decoder.hf_mlp.layers.2.weight": torch.zeros(32, 256),
            "mask_decoder.hf_mlp.layers.2.bias": torch.zeros(32),
            "mask_decoder.compress_vit_feat.0.weight": torch.zeros(768, 256, 2, 2),
            "mask_decoder.compress_vit_feat.0.bias": torch.zeros(256),
            "mask_decoder.compress_vit_feat.1.weight": torch.zeros(256),
            "mask_decoder.compress_vit_feat.1.bias": torch.zeros(256),
            "mask_decoder.compress_vit_feat.3.weight": torch.zeros(256, 32, 2, 2),
            "mask_decoder.compress_vit_feat.3.bias": torch.zeros(32),
            "mask_decoder.embedding_encoder.0.weight": torch.zeros(256, 64, 2, 2),
            "mask_decoder.embedding_encoder.0.bias": torch.zeros(64),
            "mask_decoder.embedding_maskfeature.0.weight": torch.zeros(32, 32, 3, 3),
            "mask_decoder.embedding_maskfeature.0.bias": torch.zeros(32),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def test_make_refuses_a_sam_hq_file_naming_it(models, tmp_path):
    hq = _sam_hq_vit_b(tmp_path / "downloads" / "sam_hq_vit_b.pth")
    dest = tmp_path / "pack.zip"
    with pytest.raises(CheckpointError) as err:
        make_pack(dest, detector_dir=models["detector"], sam_checkpoint=hq)
    message = str(err.value)
    assert str(hq) in message and ("hf_token" in message or "HQ" in message), message
    _no_staging(message)
    assert [p.name for p in tmp_path.iterdir()] == ["downloads"]  # no staging folder left behind


def test_make_takes_only_inference_files_from_a_training_folder(models, tmp_path):
    run = tmp_path / "checkpoint-500"
    write_random_detector(run, image_size=128, seed=1, num_queries=20)
    model_bytes = sum(p.stat().st_size for p in run.iterdir())
    torch.save({"state": {0: {"exp_avg": torch.zeros(4096, 64)}}, "param_groups": []}, run / "optimizer.pt")
    torch.save({"last_epoch": 500}, run / "scheduler.pt")
    torch.save({"python": 1, "cpu": torch.zeros(5000, dtype=torch.uint8)}, run / "rng_state.pth")
    (run / "trainer_state.json").write_text(json.dumps({"global_step": 500}), encoding="utf-8")
    (run / "training_args.bin").write_bytes(pickle.dumps({"learning_rate": 1e-4, "output_dir": "runs"}))
    (run / "runs").mkdir()
    (run / "runs" / "events.out.tfevents").write_bytes(b"\0" * 100)
    (run / "MODEL_CARD.md").write_text("# fine-tuned\n", encoding="utf-8")
    out = make_pack(tmp_path / "clinic", detector_dir=run, sam_checkpoint=models["sam"])
    det = read_manifest(out).model("detector")
    assert sorted(det.files) == [
        "detector/MODEL_CARD.md",
        "detector/config.json",
        "detector/model.safetensors",
        "detector/preprocessor_config.json",
    ]
    assert det.extra["left_out"] == [
        "optimizer.pt",
        "rng_state.pth",
        "runs/",
        "scheduler.pt",
        "trainer_state.json",
        "training_args.bin",
    ]
    packed = sum(p.stat().st_size for p in (out / "detector").iterdir())
    assert packed < model_bytes + 100 < sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    detector, segmenter, _ = load_pack(out, device="cpu")
    assert detector.class_names == CLASS_NAMES  # write_random_detector's default classes


def _mislabelled_pack(models, folder: Path) -> Path:
    """A pack whose manifest calls a vit_t_demo state dict (plain .pth, no config) an official vit_b:
    every hash matches; the file cannot be loaded as what the manifest says."""
    folder.mkdir()
    sam = folder / "sam" / "sam_vit_b.pth"
    sam.parent.mkdir()
    torch.save(random_sam_model("vit_t_demo", seed=0).state_dict(), sam)
    write_random_detector(folder / "detector", image_size=128, seed=0, num_queries=20)
    write_manifest(
        folder,
        "mislabelled",
        models=[
            {"role": "detector", "path": "detector"},
            {"role": "segmenter", "path": "sam/sam_vit_b.pth", "model_type": "vit_b"},
        ],
    )
    assert read_manifest(folder).model("segmenter").model_type == "vit_b"
    return folder


def test_verify_and_import_refuse_a_pack_that_does_not_load(models, tmp_path):
    pack = _mislabelled_pack(models, tmp_path / "mislabelled")
    assert verify_pack(pack, load=False).checked_files > 0  # the hashes alone pass
    with pytest.raises(CheckpointError, match="vit_b") as err:
        verify_pack(pack)
    assert str(pack / "sam" / "sam_vit_b.pth") in str(err.value)
    archive = zip_pack(pack, tmp_path / "mislabelled.zip")
    for action in (verify_pack, lambda p: import_pack(p, tmp_path / "user")):
        with pytest.raises(CheckpointError, match="vit_b") as err:
            action(archive)
        assert f"{archive}:sam/sam_vit_b.pth" in str(err.value)  # the file inside the user's zip
        _no_staging(str(err.value))
    assert not any((tmp_path / "user").iterdir())  # nothing installed, no staging left


def test_verify_reports_what_loading_showed(models, tmp_path):
    out = make_pack(tmp_path / "ok.zip", detector_dir=models["detector"], sam_checkpoint=models["sam"])
    assert zipfile.is_zipfile(out)
    report = verify_pack(out)
    det, seg = report.loaded
    assert (det.family, det.classes, det.input_channels, det.input_size) == (
        "D-FINE",
        list(CLASS_NAMES),
        3,
        (128, 128),
    )
    assert (seg.family, seg.size, seg.input_size) == ("SAM", "vit_t_demo", (256, 256))
    assert det.parameters > 0 and seg.parameters > 0
    assert det.path == out / "detector" and seg.path == out / "sam" / "sam_vit_t_demo.safetensors"
    text = report.format()
    names = ", ".join(CLASS_NAMES)
    assert "and its models load" in text and f"D-FINE-custom, {len(CLASS_NAMES)} classes ({names})" in text
    installed = import_pack(out, tmp_path / "user")
    assert [m.path for m in installed.loaded] == [
        installed.root / "detector",
        installed.root / "sam" / "sam_vit_t_demo.safetensors",
    ]
    assert (installed.root / MANIFEST_NAME).is_file()
