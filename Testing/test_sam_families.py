"""SAM families other than plain SAM, and the checkpoint formats we recognise but do not run.

* MobileSAM (``vit_t``): MobileSAM's checkpoint layout (the ``mobile_sam`` package's own builder loads
  our file strictly), recognised from the keys, and the batched device segmenter against the
  package's own ``SamPredictor`` on a real PLUS frame.
* MedSAM: its preprocessing on the device against ``skimage`` (the library MedSAM's recipe uses) on
  real PLUS frames, the segmenter against MedSAM's published inference recipe (bowang-lab/MedSAM
  ``MedSAM_Inference.py``, written out below with the model's input size), and recognition from the
  training wrapper, the ``module.`` prefix of multi-GPU training, the file name or ``medsam`` given.
* SAM 2 / 2.1, HQ-SAM and Hugging Face transformers SAM models: one line naming what the file is.
  SAM 2 and HQ-SAM are built in their real key layouts (names from facebookresearch/sam2 and
  SysCV/sam-hq); the transformers ones are real ``SamModel`` / ``SamHQModel`` objects saved with
  ``save_pretrained``.

Random weights throughout. Where a layout needs the real (large) shapes, each tensor is one random
number expanded to its shape, so the file stays a few kB.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from UltramotionIGTLib.core.sam import (
    SAM_CONFIGS,
    SUPPORTED_SAM_FORMATS,
    SamConfig,
    SamSegmenter,
    build_sam_model,
    describe_sam,
    load_sam,
    load_sam_with_config,
    random_sam_model,
    read_sam_checkpoint,
    resize_square_medsam,
    resolve_sam_checkpoint,
    save_sam_checkpoint,
    sidecar_config_path,
    write_random_sam_checkpoint,
)
from UltramotionIGTLib.errors import CheckpointError
from UltramotionIGTLib.io import read_sequence

# MedSAM's preprocessing on a small encoder (the demo ViT at 256): the recipe is the same at any size.
MEDSAM_SMALL = SamConfig(
    **{**SAM_CONFIGS["vit_t_demo"].to_dict(), "name": "medsam_small_test", "preprocessing": "medsam"}
)


@pytest.fixture(scope="module")
def spine_frames(plus_dir) -> np.ndarray:
    """Real B-mode frames (N x 616 x 820 uint8) of the PLUS spine phantom recording."""
    return read_sequence(plus_dir / "SpinePhantomFreehand.igs.mha").frames


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _boxes(height: int, width: int, n: int, seed: int) -> np.ndarray:
    """Integer-valued XYXY boxes (MedSAM's recipe takes integer pixel boxes) as float32."""
    rng = np.random.default_rng(seed)
    x0 = rng.integers(0, int(width * 0.6), n)
    y0 = rng.integers(0, int(height * 0.6), n)
    x1 = np.minimum(x0 + rng.integers(16, int(width * 0.4), n), width - 1)
    y1 = np.minimum(y0 + rng.integers(16, int(height * 0.4), n), height - 1)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)


def _expanded_state_dict(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Real shapes, one random number per tensor (stride-0 views: torch.save stores one element each)."""
    gen = torch.Generator().manual_seed(seed)
    return {key: torch.randn((), generator=gen).expand(shape) for key, shape in shapes.items()}


def _official_shapes(model_type: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_sam_model(model_type).state_dict().items()}


# ---------------------------------------------------------------------------------------------------
# MobileSAM
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mobile_sam_checkpoint(tmp_path_factory) -> Path:
    path = write_random_sam_checkpoint(
        tmp_path_factory.mktemp("mobilesam") / "mobile_sam.pt", "vit_t", seed=7
    )
    assert not sidecar_config_path(path).exists()  # MobileSAM ships a plain state dict
    return path


def _package_mobile_sam(path: Path):
    """MobileSAM's own model from its package's registry, loaded the package's way (strict)."""
    import mobile_sam

    model = mobile_sam.sam_model_registry["vit_t"]()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return (
        model.eval()
    )  # after loading, as MobileSAM's README does: TinyViT caches attention biases in eval()


def test_mobilesam_layout_is_recognised_and_named_apart_from_the_demo_vit(mobile_sam_checkpoint):
    state_dict, carried = read_sam_checkpoint(mobile_sam_checkpoint)
    assert carried is None
    assert "image_encoder.layers.0.blocks.0.conv1.c.weight" in state_dict
    assert _same_weights(_package_mobile_sam(mobile_sam_checkpoint), random_sam_model("vit_t", seed=7))
    for model_type in ("auto", "vit_t", "mobile_sam"):
        _, config = resolve_sam_checkpoint(mobile_sam_checkpoint, model_type)
        assert config == SAM_CONFIGS["vit_t"] and config.family == "mobilesam"
    assert SAM_CONFIGS["vit_t_demo"].family == "sam" and SAM_CONFIGS["vit_t_demo"].image_encoder == "vit"
    # Asking for our demo ViT names what the file is instead.
    with pytest.raises(
        CheckpointError, match=r"mobile_sam\.pt.*'vit_t_demo'.*looks like SAM type 'vit_t' \(MobileSAM"
    ):
        load_sam(mobile_sam_checkpoint, model_type="vit_t_demo", device="cpu")


def test_mobilesam_segmenter_matches_package_predictor_without_host_hops(
    mobile_sam_checkpoint, spine_frames, host_hops
):
    import mobile_sam

    frame = spine_frames[10]
    height, width = frame.shape
    boxes = _boxes(height, width, 3, seed=1)
    segmenter = SamSegmenter.from_checkpoint(mobile_sam_checkpoint, device="cpu")
    assert segmenter.config.name == "vit_t"

    frame_t, boxes_t = torch.from_numpy(frame), torch.from_numpy(boxes)
    with host_hops(frame_t, boxes_t) as hops:  # as in the pipeline: inputs already on the device
        segmenter.set_torch_image(frame_t)
        batched = segmenter.predict_boxes(boxes_t)
    assert hops.undeclared == {}, f"undeclared host hops in the resident MobileSAM path: {hops}"

    predictor = mobile_sam.SamPredictor(_package_mobile_sam(mobile_sam_checkpoint))
    predictor.set_image(np.repeat(frame[..., None], 3, axis=-1))
    assert torch.equal(segmenter.get_image_embedding(), predictor.features)
    foreground = 0.0
    for i, box in enumerate(boxes):
        masks, scores, _ = predictor.predict(box=box, multimask_output=False)
        single = segmenter.predict_boxes(torch.from_numpy(box[None]))
        np.testing.assert_array_equal(single.masks[0].numpy(), masks[0])
        np.testing.assert_allclose(single.iou_scores[0].item(), scores[0], atol=1e-6)
        # The batch may round the last bits differently: pixels within 1e-5 of the threshold may flip.
        on_edge = np.abs(single.mask_probs[0].numpy() - 0.5) < 1e-5
        np.testing.assert_array_equal(batched.masks[i].numpy()[~on_edge], masks[0][~on_edge])
        np.testing.assert_allclose(batched.iou_scores[i].item(), scores[0], atol=1e-5)
        foreground += masks[0].mean()
    assert 0.02 < foreground / len(boxes) < 0.98


# ---------------------------------------------------------------------------------------------------
# MedSAM
# ---------------------------------------------------------------------------------------------------


def _skimage_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    from skimage import transform

    return transform.resize(rgb, (size, size), order=3, preserve_range=True, anti_aliasing=True)


def _medsam_recipe_input(rgb: np.ndarray, size: int, resized: np.ndarray | None = None) -> torch.Tensor:
    """MedSAM_Inference.py's image preprocessing (skimage), ``size`` for its 1024: 1x3xSxS float32."""
    image = (_skimage_resize(rgb, size) if resized is None else resized).astype(np.uint8)
    scaled = (image - image.min()) / np.clip(image.max() - image.min(), a_min=1e-8, a_max=None)
    return torch.tensor(scaled).float().permute(2, 0, 1).unsqueeze(0)


def _medsam_recipe(model, rgb: np.ndarray, boxes: np.ndarray, size: int):
    """MedSAM_Inference.py, one box at a time: (embedding, [(probabilities HxW, predicted IoU)])."""
    height, width = rgb.shape[:2]
    results = []
    with torch.no_grad():
        embedding = model.image_encoder(_medsam_recipe_input(rgb, size))
        for box in boxes:
            box_s = box[None].astype(np.float64) / np.array([width, height, width, height]) * size
            box_t = torch.as_tensor(box_s, dtype=torch.float)[:, None, :]
            sparse, dense = model.prompt_encoder(points=None, boxes=box_t, masks=None)
            low_res, iou = model.mask_decoder(
                image_embeddings=embedding,
                image_pe=model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            probs = F.interpolate(
                torch.sigmoid(low_res), size=(height, width), mode="bilinear", align_corners=False
            )
            results.append((probs[0, 0].numpy(), float(iou[0, 0])))
    return embedding, results


def _plus_frames(plus_dir: Path, colour: bool = True) -> list[np.ndarray]:
    """Real frames: B-mode 616x820 (linear), 400x600 (curvilinear), and an RGB 648x1152 one."""
    frames = [
        read_sequence(plus_dir / "SpinePhantomFreehand.igs.mha").frames[3],
        read_sequence(plus_dir / "BkCurvilinearScanConvertedData.igs.mha").frames[0],
    ]
    if colour:
        frames.append(read_sequence(plus_dir / "ColorNrrdSample.igs.nrrd", color="rgb").frames[0])
    return frames


def test_medsam_preprocessing_on_device_equals_skimage_recipe(plus_dir):
    # At MedSAM's 1024; the smaller input of the segmenter test below is checked there (equal embeddings).
    for frame in _plus_frames(plus_dir):
        rgb = frame if frame.ndim == 3 else np.repeat(frame[..., None], 3, axis=-1)
        chw = torch.from_numpy(frame).permute(2, 0, 1) if frame.ndim == 3 else torch.from_numpy(frame)[None]
        exact = _skimage_resize(rgb, 1024)
        expected = _medsam_recipe_input(rgb, 1024, resized=exact)
        got = resize_square_medsam(chw, 1024)
        assert got.shape == expected.shape == (1, 3, 1024, 1024) and got.dtype == torch.float32
        assert got.stride() == expected.stride()  # channels last in memory, like the recipe's permute
        if frame.ndim == 2:  # B-mode frames: bit for bit
            assert torch.equal(got, expected), str(frame.shape)
            continue
        # The colour frame's flat white background: skimage's float noise flips its truncating cast at
        # some pixels; the values differ there only, and by one grey level at most.
        noise = torch.from_numpy(np.abs(exact - np.round(exact)) < 1e-6).permute(2, 0, 1)[None]
        differ = got != expected
        assert not differ[~noise].any() and differ.float().mean() < 0.1
        assert (got - expected).abs().max() <= 1 / 255 + 1e-6


def test_medsam_segmenter_matches_published_recipe(plus_dir, host_hops):
    model = random_sam_model(MEDSAM_SMALL, seed=11)
    segmenter = SamSegmenter(random_sam_model(MEDSAM_SMALL, seed=11), MEDSAM_SMALL, device="cpu")
    frames = _plus_frames(plus_dir, colour=False)  # the colour frame's input differs by noise: test above
    foreground = []
    for frame in frames:
        rgb = frame if frame.ndim == 3 else np.repeat(frame[..., None], 3, axis=-1)
        height, width = frame.shape[:2]
        boxes = _boxes(height, width, 4, seed=height)

        frame_t, boxes_t = torch.from_numpy(frame), torch.from_numpy(boxes)
        with host_hops(frame_t, boxes_t) as hops:
            segmenter.set_torch_image(frame_t)
            batched = segmenter.predict_boxes(boxes_t)
        assert hops.undeclared == {}, f"undeclared host hops in the resident MedSAM path: {hops}"

        embedding, expected = _medsam_recipe(model, rgb, boxes, MEDSAM_SMALL.image_size)
        assert torch.equal(segmenter.get_image_embedding(), embedding)
        assert batched.masks.shape == (4, height, width)
        for i, (box, (probs, iou)) in enumerate(zip(boxes, expected, strict=True)):
            single = segmenter.predict_boxes(torch.from_numpy(box[None]))
            np.testing.assert_array_equal(single.mask_probs[0].numpy(), probs)
            np.testing.assert_array_equal(single.masks[0].numpy(), probs > 0.5)
            np.testing.assert_allclose(single.iou_scores[0].item(), iou, atol=1e-6)
            # One decoder call for all boxes: the same up to last-bit rounding.
            np.testing.assert_allclose(batched.mask_probs[i].numpy(), probs, atol=1e-5)
            on_edge = np.abs(probs - 0.5) < 1e-5
            np.testing.assert_array_equal(batched.masks[i].numpy()[~on_edge], (probs > 0.5)[~on_edge])
            foreground.append((probs > 0.5).mean())
    assert 0.02 < np.mean(foreground) < 0.98
    # SAM's preprocessing on the same weights gives another embedding: the family's recipe matters.
    sam_way = SamSegmenter(model, SAM_CONFIGS["vit_t_demo"], device="cpu")
    sam_way.set_torch_image(torch.from_numpy(frames[0]))
    segmenter.set_torch_image(torch.from_numpy(frames[0]))
    assert not torch.allclose(sam_way.get_image_embedding(), segmenter.get_image_embedding(), atol=1e-3)


def test_medsam_is_recognised_from_its_checkpoints(tmp_path):
    weights = _expanded_state_dict(_official_shapes("vit_b"), seed=0)
    released = tmp_path / "medsam_vit_b.pth"  # MedSAM's release: a plain ViT-B state dict
    torch.save(weights, released)
    meta_sam = tmp_path / "sam_vit_b_01ec64.pth"  # the same keys under Meta's name: plain SAM
    torch.save(weights, meta_sam)
    training = tmp_path / "medsam_model_best.pth"  # MedSAM's multi-GPU training checkpoint
    torch.save(
        {
            "model": {f"module.{k}": v for k, v in weights.items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
            "epoch": 3,
        },
        training,
    )
    renamed = tmp_path / "best.pth"  # the training layout under any name
    renamed.write_bytes(training.read_bytes())

    assert resolve_sam_checkpoint(meta_sam)[1].name == "vit_b"
    for path in (released, training, renamed):
        state_dict, config = resolve_sam_checkpoint(path)
        assert config == SAM_CONFIGS["medsam"] and config.family == "medsam", path.name
        assert state_dict.keys() == weights.keys()
    assert resolve_sam_checkpoint(meta_sam, "medsam")[1].name == "medsam"  # given explicitly
    assert resolve_sam_checkpoint(released, "vit_b")[1].name == "vit_b"  # an explicit type wins

    model, config = load_sam_with_config(training, device="cpu")
    assert config.preprocessing == "medsam"
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_medsam_config_travels_with_our_formats(tmp_path):
    model = random_sam_model(MEDSAM_SMALL, seed=2)
    for suffix in (".safetensors", ".pth"):
        path = save_sam_checkpoint(model, tmp_path / f"fine_tuned{suffix}", MEDSAM_SMALL)
        loaded, config = load_sam_with_config(path, device="cpu")
        assert config == MEDSAM_SMALL and _same_weights(loaded, model)
        assert SamSegmenter(loaded, config).preprocessing == "medsam"
    # SAM's registry config of the same architecture is another config: its preprocessing differs.
    with pytest.raises(CheckpointError, match="differs from the config passed"):
        load_sam(tmp_path / "fine_tuned.safetensors", model_type=SAM_CONFIGS["vit_t_demo"], device="cpu")


@pytest.mark.slow
def test_medsam_vit_b_at_1024_matches_published_recipe(spine_frames):
    model = random_sam_model("medsam", seed=0)
    segmenter = SamSegmenter(random_sam_model("medsam", seed=0), device="cpu")
    frame = spine_frames[0]
    box = _boxes(*frame.shape, 1, seed=0)[0]
    out = segmenter.segment(torch.from_numpy(frame), torch.from_numpy(box[None]))
    embedding, [(probs, iou)] = _medsam_recipe(
        model, np.repeat(frame[..., None], 3, axis=-1), box[None], 1024
    )
    assert torch.equal(segmenter.get_image_embedding(), embedding)
    np.testing.assert_array_equal(out.mask_probs[0].numpy(), probs)
    np.testing.assert_allclose(out.iou_scores[0].item(), iou, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Multi-GPU prefix
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_module_prefix_of_multi_gpu_training_is_read(tmp_path, wrapper):
    model = random_sam_model("vit_t_demo", seed=4)
    prefixed = {f"module.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "ddp.pth"
    torch.save(prefixed if wrapper is None else {wrapper: prefixed, "epoch": 1}, path)
    assert _same_weights(load_sam(path, model_type="vit_t_demo", device="cpu"), model)


# ---------------------------------------------------------------------------------------------------
# Formats we do not run: one line saying what the file is
# ---------------------------------------------------------------------------------------------------


def _sam2_shapes(version: str) -> dict[str, tuple[int, ...]]:
    """facebookresearch/sam2 ``SAM2Base`` state dict of sam2(.1)_hiera_tiny: keys and shapes."""
    width, stages, d, mem = 96, (1, 2, 7, 2), 256, 64
    shapes: dict[str, tuple[int, ...]] = {
        "maskmem_tpos_enc": (7, 1, 1, mem),
        "no_mem_embed": (1, 1, d),
        "no_mem_pos_enc": (1, 1, d),
        "no_obj_ptr": (1, d),
        "image_encoder.trunk.pos_embed": (1, width, 7, 7),
        "image_encoder.trunk.pos_embed_window": (1, width, 8, 8),
        "image_encoder.trunk.patch_embed.proj.weight": (width, 3, 7, 7),
        "image_encoder.trunk.patch_embed.proj.bias": (width,),
        "mask_downsample.weight": (1, 1, 4, 4),
        "mask_downsample.bias": (1,),
        "memory_attention.norm.weight": (d,),
        "memory_attention.norm.bias": (d,),
    }
    block, dim = 0, width
    for stage, depth in enumerate(stages):
        for j in range(depth):
            out = width * 2**stage
            p = f"image_encoder.trunk.blocks.{block}."
            shapes.update({p + "norm1.weight": (dim,), p + "norm1.bias": (dim,)})
            shapes.update({p + "attn.qkv.weight": (3 * out, dim), p + "attn.qkv.bias": (3 * out,)})
            shapes.update({p + "attn.proj.weight": (out, out), p + "attn.proj.bias": (out,)})
            shapes.update({p + "norm2.weight": (out,), p + "norm2.bias": (out,)})
            shapes.update({p + "mlp.layers.0.weight": (4 * out, out), p + "mlp.layers.0.bias": (4 * out,)})
            shapes.update({p + "mlp.layers.1.weight": (out, 4 * out), p + "mlp.layers.1.bias": (out,)})
            if j == 0 and stage > 0:
                shapes.update({p + "proj.weight": (out, dim), p + "proj.bias": (out,)})
            block, dim = block + 1, out
    for i, channels in enumerate((768, 384, 192, 96)):
        shapes[f"image_encoder.neck.convs.{i}.conv.weight"] = (d, channels, 1, 1)
        shapes[f"image_encoder.neck.convs.{i}.conv.bias"] = (d,)
    for i in range(4):
        p = f"memory_attention.layers.{i}."
        for attn, kv in (("self_attn", d), ("cross_attn_image", mem)):
            for proj, fan_in in (("q_proj", d), ("k_proj", kv), ("v_proj", kv), ("out_proj", d)):
                shapes.update({f"{p}{attn}.{proj}.weight": (d, fan_in), f"{p}{attn}.{proj}.bias": (d,)})
        shapes.update({p + "linear1.weight": (2048, d), p + "linear1.bias": (2048,)})
        shapes.update({p + "linear2.weight": (d, 2048), p + "linear2.bias": (d,)})
        for n in (1, 2, 3):
            shapes.update({f"{p}norm{n}.weight": (d,), f"{p}norm{n}.bias": (d,)})
    shapes.update(
        {
            "memory_encoder.pix_feat_proj.weight": (d, d, 1, 1),
            "memory_encoder.pix_feat_proj.bias": (d,),
            "memory_encoder.fuser.layers.0.dwconv.weight": (d, 1, 7, 7),
            "memory_encoder.out_proj.weight": (mem, d, 1, 1),
            "memory_encoder.out_proj.bias": (mem,),
            "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (2, d // 2),
            "sam_prompt_encoder.not_a_point_embed.weight": (1, d),
            "sam_prompt_encoder.no_mask_embed.weight": (1, d),
            "sam_mask_decoder.iou_token.weight": (1, d),
            "sam_mask_decoder.mask_tokens.weight": (4, d),
            "sam_mask_decoder.obj_score_token.weight": (1, d),
            "sam_mask_decoder.conv_s0.weight": (32, d, 1, 1),
            "sam_mask_decoder.conv_s1.weight": (64, d, 1, 1),
        }
    )
    for i in range(3):
        shapes[f"obj_ptr_proj.layers.{i}.weight"] = (d, d)
        shapes[f"obj_ptr_proj.layers.{i}.bias"] = (d,)
    if version == "2.1":
        shapes.update(
            {
                "no_obj_embed_spatial": (1, mem),
                "obj_ptr_tpos_proj.weight": (mem, d),
                "obj_ptr_tpos_proj.bias": (mem,),
            }
        )
    return shapes


def _hq_sam_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """SysCV/sam-hq ``MaskDecoderHQ`` on the demo ViT: SAM's keys plus HQ-SAM's decoder layers."""
    config = SAM_CONFIGS["vit_t_demo"]
    d, vit = config.prompt_embed_dim, config.encoder_embed_dim
    gen = torch.Generator().manual_seed(seed)
    extra = {
        "hf_token.weight": (1, d),
        "compress_vit_feat.0.weight": (vit, d, 2, 2),
        "compress_vit_feat.0.bias": (d,),
        "compress_vit_feat.1.weight": (d,),
        "compress_vit_feat.1.bias": (d,),
        "compress_vit_feat.3.weight": (d, d // 8, 2, 2),
        "compress_vit_feat.3.bias": (d // 8,),
        "embedding_encoder.0.weight": (d, d // 4, 2, 2),
        "embedding_encoder.0.bias": (d // 4,),
        "embedding_encoder.1.weight": (d // 4,),
        "embedding_encoder.1.bias": (d // 4,),
        "embedding_encoder.3.weight": (d // 4, d // 8, 2, 2),
        "embedding_encoder.3.bias": (d // 8,),
        "embedding_maskfeature.0.weight": (d // 4, d // 8, 3, 3),
        "embedding_maskfeature.0.bias": (d // 4,),
        "embedding_maskfeature.1.weight": (d // 4,),
        "embedding_maskfeature.1.bias": (d // 4,),
        "embedding_maskfeature.3.weight": (d // 8, d // 4, 3, 3),
        "embedding_maskfeature.3.bias": (d // 8,),
    }
    for i, (rows, cols) in enumerate(((d, d), (d, d), (d // 8, d))):
        extra[f"hf_mlp.layers.{i}.weight"] = (rows, cols)
        extra[f"hf_mlp.layers.{i}.bias"] = (rows,)
    state_dict = random_sam_model("vit_t_demo", seed=seed).state_dict()
    state_dict.update({f"mask_decoder.{k}": torch.randn(shape, generator=gen) for k, shape in extra.items()})
    return state_dict


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(("version", "label"), [("2.0", "SAM 2 checkpoint"), ("2.1", "SAM 2.1 checkpoint")])
def test_sam2_checkpoint_gets_one_line(tmp_path, version, label):
    path = tmp_path / f"sam{version}_hiera_tiny.pt"
    torch.save({"model": _expanded_state_dict(_sam2_shapes(version), seed=1)}, path)
    assert path.stat().st_size < 200_000
    for model_type in ("auto", "vit_b"):  # whatever type is asked for, the file is named
        with pytest.raises(CheckpointError) as excinfo:
            load_sam(path, model_type=model_type, device="cpu")
        message = _one_line(excinfo)
        assert message.startswith(f"{path} is a {label} (Hiera-T image encoder")
        assert "not supported" in message and message.endswith(SUPPORTED_SAM_FORMATS)


def test_hq_sam_checkpoint_gets_one_line(tmp_path):
    path = tmp_path / "sam_hq_vit_tiny_demo.pth"
    torch.save(_hq_sam_state_dict(seed=3), path)
    for model_type in ("auto", "vit_t_demo"):
        with pytest.raises(CheckpointError) as excinfo:
            load_sam(path, model_type=model_type, device="cpu")
        message = _one_line(excinfo)
        assert message.startswith(
            f"{path} is an HQ-SAM (SAM-HQ) checkpoint (SAM with a ViT (width 160, 4 blocks) image encoder"
        )
        assert "looks like" not in message and message.endswith(SUPPORTED_SAM_FORMATS)


def _tiny_transformers_sam(kind: str):
    import transformers

    vision = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=64,
        patch_size=16,
        output_channels=16,
        global_attn_indexes=[1],
        mlp_dim=64,
        window_size=2,
    )
    prompt = dict(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4)
    decoder = dict(
        hidden_size=16, mlp_dim=32, num_hidden_layers=1, num_attention_heads=2, iou_head_hidden_dim=16
    )
    if kind == "sam":
        config = transformers.SamConfig(
            vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder
        )
        return transformers.SamModel(config)
    config = transformers.SamHQConfig(
        vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config={**decoder, "vit_dim": 32}
    )
    return transformers.SamHQModel(config)


@pytest.mark.parametrize(("kind", "label"), [("sam", "SAM"), ("sam_hq", "HQ-SAM")])
def test_transformers_sam_folder_and_files_get_one_line(tmp_path, kind, label):
    model = _tiny_transformers_sam(kind)
    folder = tmp_path / f"hf-{kind}"
    model.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == kind
    loose = tmp_path / "pytorch_model.bin"  # the weights alone, no config.json beside them
    torch.save(model.state_dict(), loose)
    for path in (folder, folder / "model.safetensors", loose):
        with pytest.raises(CheckpointError) as excinfo:
            load_sam(path, device="cpu")
        message = _one_line(excinfo)
        assert message.startswith(f"{path} is a Hugging Face transformers {label} model (model_type {kind!r}")
        assert message.endswith(SUPPORTED_SAM_FORMATS)
        if kind == "sam":
            assert "sam_vit_b_01ec64.pth" in message
        else:
            assert "not supported" in message


def test_other_folders_are_not_checkpoints(tmp_path):
    (tmp_path / "detector").mkdir()
    (tmp_path / "detector" / "config.json").write_text(json.dumps({"model_type": "d_fine"}))
    with pytest.raises(
        CheckpointError, match=r"detector is a folder \(a Hugging Face 'd_fine' model folder\)"
    ):
        load_sam(tmp_path / "detector", device="cpu")
    with pytest.raises(CheckpointError, match=r"is a folder, not a checkpoint file"):
        load_sam(tmp_path, device="cpu")


# ---------------------------------------------------------------------------------------------------
# describe_sam (for doctor)
# ---------------------------------------------------------------------------------------------------


def test_describe_sam_names_family_encoder_size_and_parameters(mobile_sam_checkpoint):
    from segment_anything import sam_model_registry

    vit_b = describe_sam("vit_b")
    assert vit_b["family"] == "sam" and vit_b["image_encoder"] == "ViT-B"
    assert vit_b["input_size"] == [1024, 1024] and vit_b["embedding_size"] == [64, 64]
    official = sam_model_registry["vit_b"](checkpoint=None)
    assert vit_b["parameters"] == sum(p.numel() for p in official.parameters())

    medsam = describe_sam(SAM_CONFIGS["medsam"])
    assert (medsam["family"], medsam["family_name"], medsam["image_encoder"]) == ("medsam", "MedSAM", "ViT-B")
    assert medsam["parameters"] == vit_b["parameters"] and "min-max" in medsam["preprocessing"]

    segmenter = SamSegmenter.from_checkpoint(mobile_sam_checkpoint, device="cpu")
    from_segmenter = describe_sam(segmenter)
    assert from_segmenter == describe_sam("vit_t") == describe_sam(segmenter.model)
    assert from_segmenter["family_name"] == "MobileSAM" and from_segmenter["image_encoder"] == "TinyViT-5M"
    assert from_segmenter["parameters"] == sum(
        p.numel() for p in _package_mobile_sam(mobile_sam_checkpoint).parameters()
    )

    demo = random_sam_model("vit_t_demo", seed=0)
    del demo.sam_config  # a bare model: its config is read off its shapes
    described = describe_sam(demo)
    assert described["model_type"] == "vit_t_demo" and described["input_size"] == [256, 256]
    assert described["image_encoder"] == "ViT (width 160, 4 blocks)"
    assert json.loads(json.dumps(described)) == described


def test_model_pack_describes_mobilesam(tmp_path, mobile_sam_checkpoint):
    from UltramotionIGTLib.models.packs import describe_segmenter

    (tmp_path / "sam").mkdir()
    (tmp_path / "sam" / "mobile_sam.pt").write_bytes(mobile_sam_checkpoint.read_bytes())
    spec = describe_segmenter(tmp_path, "sam/mobile_sam.pt")
    assert (spec.model_type, spec.input_size) == ("vit_t", [1024, 1024])


# ---------------------------------------------------------------------------------------------------
# GPU: the resident path of each family makes no host sync
# ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("config_name", ["vit_t", "medsam_small"])
def test_cuda_families_have_no_syncs_and_match_cpu(config_name, spine_frames):
    config = SAM_CONFIGS["vit_t"] if config_name == "vit_t" else MEDSAM_SMALL
    gpu = SamSegmenter(random_sam_model(config, seed=5), config, device="cuda")
    cpu = SamSegmenter(random_sam_model(config, seed=5), config, device="cpu")
    frames = [torch.from_numpy(f).cuda() for f in spine_frames[:2]]
    boxes = torch.from_numpy(_boxes(*spine_frames.shape[1:], 6, seed=9))
    gpu.set_torch_image(frames[0])  # first frame of this size builds the resize tables
    gpu.predict_boxes(boxes.cuda())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu.set_torch_image(frames[1])
        out = gpu.predict_boxes(boxes.cuda())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu.set_torch_image(torch.from_numpy(spine_frames[1]))
    ref = cpu.predict_boxes(boxes)
    torch.testing.assert_close(out.mask_probs.cpu(), ref.mask_probs, atol=2e-3, rtol=0)
    assert (out.masks.cpu() != ref.masks).float().mean() < 1e-3


def test_missing_mobilesam_package_is_one_clear_line(monkeypatch, mobile_sam_checkpoint):
    # As if mobilesam-mirror were not installed: its import fails (None in sys.modules raises ImportError).
    monkeypatch.setitem(sys.modules, "mobile_sam", None)
    monkeypatch.setitem(sys.modules, "mobile_sam.modeling", None)
    with pytest.raises(
        CheckpointError, match=r"MobileSAM \(vit_t\) needs the packages mobilesam-mirror and timm"
    ):
        load_sam(mobile_sam_checkpoint, device="cpu")
    assert describe_sam("vit_b")["family"] == "sam"  # plain SAM does not need them
