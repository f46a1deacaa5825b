"""D-FINE object detector on transformers' `DFineForObjectDetection`, GPU-resident end to end.

A detector is an HF-format folder: ``config.json`` (a `DFineConfig` with ``id2label``),
``model.safetensors`` and ``preprocessor_config.json`` (an `RTDetrImageProcessor` config: input size,
rescale, normalisation). Real D-FINE folders from the hub load as they are; `small_dfine_config` and
`write_random_detector` make tiny models in the same format for tests and the demo.

`DFineDetector.run_inference_torch(frame)` keeps everything on the model's device: the frame is turned
into the model input (float, the model's 1 or 3 channels, resized and rescaled as the folder's image
processor does: `preprocess_frames`), the model runs under ``torch.inference_mode()`` and the post-processing (sigmoid scores, top-k over
queries x classes, cxcywh -> XYXY in pixels of the input frame) is done with tensor ops. It returns
a fixed number K of detections sorted by score, with no thresholding: the caller masks on the device.
No ``.cpu()/.item()/.tolist()/.numpy()/bool(tensor)/nonzero`` happens in that path (a test counts them).
Building a detector sets ``TRANSFORMERS_DISABLE_TORCH_CHECK=1`` for the whole process (once, never
unset; a value set beforehand is kept): transformers' shape checks in D-FINE's attention would
otherwise sync with the host once per decoder layer (see `_disable_transformers_sync_checks`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from UltramotionIGTLib import CLASS_NAMES
from UltramotionIGTLib.core.device import resolve_device
from UltramotionIGTLib.core.hostsync import allowed_host_transfer
from UltramotionIGTLib.core.weights import check_finite_weights
from UltramotionIGTLib.errors import CheckpointError, UnsupportedImageTypeError

__all__ = [
    "CONFIG_NAME",
    "PREPROCESSOR_NAME",
    "WEIGHTS_NAME",
    "DFineDetector",
    "Detections",
    "Preprocessing",
    "postprocess_detections",
    "preprocess_frames",
    "save_detector_folder",
    "small_dfine_config",
    "write_random_detector",
]

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PREPROCESSOR_NAME = "preprocessor_config.json"

#: transformers' RTDetrImageProcessor defaults (the processor D-FINE checkpoints ship with).
HF_DEFAULT_INPUT_SIZE = (640, 640)
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

# transformers' D-FINE deformable attention checks its spatial shapes with
# `torch_compilable_check(tensor_condition)`, which ends in `cond._is_all_true().item()`: one host
# sync per decoder layer on CUDA. transformers skips these checks when TRANSFORMERS_DISABLE_TORCH_CHECK
# is "1", read with os.getenv at every check (transformers/utils/import_utils.py), so the switch is
# process-wide by nature. It is therefore set once, when a detector is built, and never unset: a
# toggle around each forward raced with other threads (one thread's restore turned the checks, and
# their syncs, back on under another thread's forward). Safe for the whole process: the checks are
# assertions on shapes the models derive from their own feature maps (true by construction), which
# transformers documents as switchable off in production; no output changes.
_TRANSFORMERS_CHECK_ENV = "TRANSFORMERS_DISABLE_TORCH_CHECK"


def _disable_transformers_sync_checks() -> None:
    """Set ``TRANSFORMERS_DISABLE_TORCH_CHECK=1`` for the process (idempotent); a value the user set
    explicitly is kept, with a warning that each forward then syncs with the host once per decoder layer."""
    value = os.environ.setdefault(_TRANSFORMERS_CHECK_ENV, "1")
    if value != "1":
        log.warning(
            "%s=%s keeps transformers' shape checks on: the detector's forward syncs with the host "
            "once per decoder layer",
            _TRANSFORMERS_CHECK_ENV,
            value,
        )


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and load reports; errors are reported by us."""
    from transformers.utils import logging as hf_logging

    bar_was_enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar_was_enabled:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Detections:
    """K detections of one frame (or BxK for a batch), sorted by score descending, on one device.

    boxes: Kx4 float32, XYXY in pixels of the input frame (x along width, y along height).
    scores: K float32 in 0..1 (sigmoid of the class logit).
    labels: K int64 class index into the detector's ``class_names``.
    For a batch the shapes are BxKx4, BxK, BxK. K is fixed (no thresholding): mask on the device.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.boxes.device

    @property
    def num(self) -> int:
        """K, the number of detections per frame (a shape, not a count above a threshold)."""
        return int(self.scores.shape[-1])

    def to(self, device: torch.device | str) -> Detections:
        return Detections(self.boxes.to(device), self.scores.to(device), self.labels.to(device))

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Copy to the host (a declared hop): ``{"boxes", "scores", "labels"}`` numpy arrays."""
        with allowed_host_transfer("Detections.to_numpy", max_syncs=3):
            return {
                "boxes": self.boxes.detach().cpu().numpy(),
                "scores": self.scores.detach().cpu().numpy(),
                "labels": self.labels.detach().cpu().numpy(),
            }


def postprocess_detections(
    logits: torch.Tensor, pred_boxes: torch.Tensor, image_size: tuple[int, int], num_top: int
) -> Detections:
    """D-FINE outputs -> top-k detections, on the outputs' device, without host syncs.

    logits: BxQxC class logits (focal-loss style: sigmoid per class); pred_boxes: BxQx4 cxcywh
    normalised to 0..1; image_size: (H, W) of the input frame in pixels; num_top: K <= Q*C.
    Same result as transformers' ``post_process_object_detection(use_focal_loss=True)`` with
    ``threshold`` below every score and ``target_sizes`` = (H, W), before its thresholding.
    Returns Detections with BxKx4 / BxK / BxK tensors.
    """
    num_classes = logits.shape[-1]
    scores = torch.sigmoid(logits.float()).flatten(1)
    top_scores, index = torch.topk(scores, num_top, dim=1)
    labels = torch.remainder(index, num_classes)
    query = torch.div(index, num_classes, rounding_mode="floor")
    boxes = pred_boxes.float().gather(1, query.unsqueeze(-1).expand(-1, -1, 4))
    cx, cy, w, h = boxes.unbind(-1)
    height, width = float(image_size[0]), float(image_size[1])
    xyxy = torch.stack(
        [(cx - 0.5 * w) * width, (cy - 0.5 * h) * height, (cx + 0.5 * w) * width, (cy + 0.5 * h) * height],
        dim=-1,
    )
    return Detections(boxes=xyxy, scores=top_scores, labels=labels.to(torch.int64))


# --------------------------------------------------------------------------------------------------
# Preprocessing settings (what transformers' RTDetrImageProcessor does, mirrored on the device)


#: PIL resample codes (what ``preprocessor_config.json`` stores) -> ``torch.nn.functional.interpolate``
#: modes, as transformers' torchvision-backed processors map them (PIL NEAREST -> "nearest-exact").
#: BOX, HAMMING and LANCZOS (4, 5, 1) have no device implementation in torch.
RESAMPLE_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}
RESAMPLE_NAMES = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}
#: ITU-R BT.601 luma weights (PIL's ``convert("L")``): colour frames into a one-channel model
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def _whole_size(size: dict, keys: tuple[str, str], path: Path) -> tuple[int, int]:
    """(H, W) from a processor config's size dict; CheckpointError naming the file if not whole numbers."""
    try:
        return (int(size[keys[0]]), int(size[keys[1]]))
    except (TypeError, ValueError):
        raise CheckpointError(
            f"detector preprocessing config {path}: size {size} is not two whole numbers"
        ) from None


@dataclass(frozen=True)
class Preprocessing:
    """How a frame becomes the model input; mirrors `RTDetrImageProcessor` (D-FINE's processor).

    input_size: (H, W) of the model input, multiples of the largest feature stride (32).
    resample: the processor's PIL resample code (2 bilinear, the default; 3 bicubic; 0 nearest). The
    resize is the one of transformers' torchvision backend (``torchvision.transforms.v2.functional
    .resize``, antialiased for bilinear/bicubic; integer frames resized as integers, see
    `preprocess_frames`). Then ``x * rescale_factor`` if do_rescale, then ``(x - mean) / std`` if
    do_normalize. The processor's defaults are bilinear, rescale 1/255 and no normalisation.
    fit_size: None (the processor's ``size {"height", "width"}``: the frame is stretched to
    ``input_size``), or (H, W) for a letterbox (``size {"max_height", "max_width"}`` with ``do_pad`` and
    ``pad_size`` = ``input_size``): the frame keeps its aspect ratio inside ``fit_size``
    (`resized_size`), and after rescale/normalisation the bottom and right are padded with zeros up to
    ``input_size``, as the processor's ``pad`` does.
    """

    input_size: tuple[int, int] = HF_DEFAULT_INPUT_SIZE
    do_rescale: bool = True
    rescale_factor: float = 1.0 / 255.0
    do_normalize: bool = False
    image_mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    image_std: tuple[float, ...] = IMAGENET_DEFAULT_STD
    resample: int = 2
    fit_size: tuple[int, int] | None = None

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) a ``height`` x ``width`` frame is resized to before any padding (host ints)."""
        if self.fit_size is None:
            return tuple(self.input_size)
        from transformers.image_utils import get_image_size_for_max_height_width

        return tuple(get_image_size_for_max_height_width((height, width), *self.fit_size))

    def boxes_frame_size(self, height: int, width: int) -> tuple[int | float, int | float]:
        """The (H, W) that the model's normalised boxes are scaled by to give pixels of a ``height`` x
        ``width`` frame: the frame itself when stretched; the padded input in frame pixels for a
        letterbox (``input_size`` / resize scale)."""
        if self.fit_size is None:
            return (height, width)
        h, w = self.resized_size(height, width)
        return (self.input_size[0] * height / h, self.input_size[1] * width / w)

    @classmethod
    def from_json_file(cls, path: Path, fallback_size: tuple[int, int] | None = None) -> Preprocessing:
        """Read an HF ``preprocessor_config.json``; raises CheckpointError naming the file."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read detector preprocessing config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise CheckpointError(f"detector preprocessing config {path} is not a JSON object")
        size = data.get("size") or {}
        fit_size = None
        if isinstance(size, dict) and "max_height" in size and "max_width" in size:
            pad = data.get("pad_size") or {}
            if not (data.get("do_pad") and isinstance(pad, dict) and "height" in pad and "width" in pad):
                raise CheckpointError(
                    f"detector preprocessing config {path} keeps the aspect ratio (size max_height/max_width) "
                    "but does not pad to a fixed pad_size: D-FINE needs a fixed input; add do_pad and pad_size"
                )
            fit_size = _whole_size(size, ("max_height", "max_width"), path)
            input_size = _whole_size(pad, ("height", "width"), path)
            if input_size[0] < fit_size[0] or input_size[1] < fit_size[1]:
                raise CheckpointError(f"detector preprocessing config {path}: pad_size is smaller than size")
        elif isinstance(size, dict) and "height" in size and "width" in size:
            input_size = _whole_size(size, ("height", "width"), path)
        elif fallback_size is not None:
            input_size = fallback_size
        else:
            raise CheckpointError(
                f"detector preprocessing config {path} has no size {{'height': H, 'width': W}}: "
                "D-FINE needs a fixed input size; add it to the file"
            )
        resample = data.get("resample", 2)
        if resample is None:
            resample = 2
        if not isinstance(resample, int) or resample not in RESAMPLE_MODES:
            name = (
                RESAMPLE_NAMES.get(resample, repr(resample)) if isinstance(resample, int) else repr(resample)
            )
            raise CheckpointError(
                f"detector preprocessing config {path} asks for resample {name}: the device resize supports "
                "0 (NEAREST), 2 (BILINEAR) and 3 (BICUBIC)"
            )
        return cls(
            input_size=input_size,
            do_rescale=bool(data.get("do_rescale", True)),
            rescale_factor=float(data.get("rescale_factor", 1.0 / 255.0)),
            do_normalize=bool(data.get("do_normalize", False)),
            image_mean=_channel_values(data.get("image_mean", IMAGENET_DEFAULT_MEAN), path),
            image_std=_channel_values(data.get("image_std", IMAGENET_DEFAULT_STD), path),
            resample=resample,
            fit_size=fit_size,
        )

    def write(self, folder: Path) -> Path:
        """Write ``preprocessor_config.json`` as transformers' `RTDetrImageProcessor` would."""
        path = Path(folder) / PREPROCESSOR_NAME
        height, width = (int(v) for v in self.input_size)
        letterbox = self.fit_size is not None
        kwargs = dict(
            size={"max_height": int(self.fit_size[0]), "max_width": int(self.fit_size[1])}
            if letterbox
            else {"height": height, "width": width},
            do_resize=True,
            resample=int(self.resample),
            do_rescale=self.do_rescale,
            rescale_factor=self.rescale_factor,
            do_normalize=self.do_normalize,
            image_mean=list(self.image_mean),
            image_std=list(self.image_std),
            do_pad=letterbox,
        )
        if letterbox:
            kwargs["pad_size"] = {"height": height, "width": width}
        try:
            from transformers import RTDetrImageProcessor

            RTDetrImageProcessor(**kwargs).to_json_file(str(path))
        except ImportError:  # torchvision missing: write the same keys by hand
            data = {"image_processor_type": "RTDetrImageProcessor", **kwargs}
            path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        return path

    def channel_constants(
        self, num_channels: int, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/std) as 1xCx1x1 float32 tensors on ``device`` (a one-channel model takes the first)."""
        mean = torch.tensor(self.image_mean[:num_channels], dtype=torch.float32, device=device)
        std = torch.tensor(self.image_std[:num_channels], dtype=torch.float32, device=device)
        return mean.view(1, -1, 1, 1), (1.0 / std).view(1, -1, 1, 1)


def _channel_values(values: Any, path: Path) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        values = [values] * 3
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"detector preprocessing config {path}: bad image_mean/image_std {values!r}"
        ) from exc
    if len(out) not in (1, 3):
        raise CheckpointError(
            f"detector preprocessing config {path}: image_mean/image_std need 1 or 3 values"
        )
    return out if len(out) == 3 else out * 3


def _resize_like_processor(x: torch.Tensor, size: tuple[int, int], mode: str, integer: bool) -> torch.Tensor:
    """BxCxHxW float32 -> BxCx``size``: the image processor's resize of a float or an integer frame.

    Float frames: one antialiased ``interpolate`` (torchvision's float path). Integer frames go the
    way torchvision's CPU uint8 kernel takes them (``torch._C._nn._upsample_bilinear2d_aa`` and its
    bicubic twin, ``UpSampleKernel.cpp``): width pass, rounded and clipped to 0..255, then height pass,
    rounded and clipped; it works in 16-bit fixed point where we use float, which leaves a one-grey-level
    difference on a few pixels.
    """
    if mode == "nearest-exact":
        return F.interpolate(x, size=size, mode=mode)
    if not integer:
        return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
    if x.shape[-1] != size[1]:
        x = F.interpolate(x, size=(x.shape[-2], size[1]), mode=mode, align_corners=False, antialias=True)
        x = x.round().clamp(0.0, 255.0)
    if x.shape[-2] != size[0]:
        x = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
        x = x.round().clamp(0.0, 255.0)
    return x


def preprocess_frames(
    batch: torch.Tensor,
    preprocessing: Preprocessing,
    *,
    device: torch.device | str | None = None,
    channels_last: bool = False,
    mean: torch.Tensor | None = None,
    inv_std: torch.Tensor | None = None,
    num_channels: int = 3,
) -> torch.Tensor:
    """Frames -> D-FINE input, all with tensor ops on ``device`` (default: the frames' device).

    batch: BxCxHxW, C = 1 (grey) or 3, uint8 (or another integer type) or float in 0..255.
    num_channels: the model's input channels: 3 (grey frames repeat their plane) or 1 (colour frames
    become BT.601 luma, rounded for integer frames, as PIL's ``convert("L")``). Returns
    Bxnum_channelsxhxw float32, (h, w) = ``preprocessing.input_size``: the processor's resize
    (`_resize_like_processor`: within one grey level of it on integer frames, float frames to float
    rounding), rescale, optional normalisation. No host sync. Training code uses this too, so that the
    model is trained on exactly what inference feeds it. ``mean``/``inv_std`` (1xCx1x1 on device,
    `Preprocessing.channel_constants`) avoid rebuilding the constants per call. Source of the resize
    semantics: ``transformers.image_processing_backends.TorchvisionBackend.resize`` and
    ``torchvision.transforms.v2.functional.resize_image``.
    """
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 or 3, got {num_channels}")
    mode = RESAMPLE_MODES.get(preprocessing.resample)
    if mode is None:
        raise ValueError(f"resample {preprocessing.resample} has no device resize (use 0, 2 or 3)")
    x = batch.to(device if device is not None else batch.device, non_blocking=True)
    integer = not (x.is_floating_point() or x.is_complex())
    x = x.to(torch.float32)
    if num_channels == 1 and x.shape[1] == 3:
        r, g, b = LUMA_WEIGHTS
        x = r * x[:, 0:1] + g * x[:, 1:2] + b * x[:, 2:3]
        if integer:
            x = x.round()
    resized = preprocessing.resized_size(int(x.shape[-2]), int(x.shape[-1]))
    if tuple(x.shape[-2:]) != resized:
        x = _resize_like_processor(x, resized, mode, integer)
    if preprocessing.do_rescale:
        x = x * preprocessing.rescale_factor
    if num_channels == 3 and x.shape[1] == 1:  # grey: the same plane in all three channels (resize once)
        x = x.expand(-1, 3, -1, -1)
    if preprocessing.do_normalize:
        if mean is None or inv_std is None:
            mean, inv_std = preprocessing.channel_constants(num_channels, x.device)
        x = (x - mean) * inv_std
    if resized != tuple(preprocessing.input_size):  # letterbox: zeros below and right, after normalising
        x = F.pad(
            x, (0, preprocessing.input_size[1] - resized[1], 0, preprocessing.input_size[0] - resized[0])
        )
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# --------------------------------------------------------------------------------------------------
# Configs


def small_dfine_config(
    class_names: Sequence[str] = CLASS_NAMES,
    image_size: int | tuple[int, int] = 256,
    *,
    num_queries: int = 50,
    decoder_layers: int = 2,
    d_model: int = 48,
    ffn_dim: int = 96,
    attention_heads: int = 4,
    stem_channels: int = 8,
    stage_mid_channels: Sequence[int] = (8, 16, 24, 32),
    stage_out_channels: Sequence[int] = (24, 48, 96, 128),
    feature_strides: Sequence[int] = (16, 32),
    decoder_points: int = 4,
    max_num_bins: int = 16,
    num_denoising: int = 20,
) -> Any:
    """A tiny D-FINE config (about 0.24 M parameters) for tests, training on the phantom and the demo.

    HGNetV2 backbone with four stages (``stage_out_channels``), no pretrained weights; hybrid encoder
    and decoder of width ``d_model``; ``feature_strides`` picks the backbone outputs used ((16, 32):
    stages 3-4; (8, 16, 32): stages 2-4). ``image_size`` (int or (H, W), multiples of the largest
    stride) is recorded as ``config.image_size`` and used as the model input size. ``id2label`` /
    ``label2id`` come from ``class_names``. Returns a `transformers.DFineConfig`.
    """
    from transformers import DFineConfig, HGNetV2Config

    size = _as_size(image_size)
    strides = [int(s) for s in feature_strides]
    stride_to_stage = {4: 1, 8: 2, 16: 3, 32: 4}
    if not strides or any(s not in stride_to_stage for s in strides) or strides != sorted(set(strides)):
        raise ValueError(
            f"feature_strides must be increasing values among 4, 8, 16, 32, got {feature_strides}"
        )
    if size[0] % strides[-1] or size[1] % strides[-1]:
        raise ValueError(f"image_size {size} must be a multiple of the largest feature stride {strides[-1]}")
    if decoder_layers < 2:
        raise ValueError(
            f"decoder_layers must be at least 2 (transformers' D-FINE ties layer 0), got {decoder_layers}"
        )
    if d_model % attention_heads:
        raise ValueError(f"d_model {d_model} must be divisible by attention_heads {attention_heads}")
    names = [str(n) for n in class_names]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"class_names must be distinct and non-empty, got {class_names}")
    outs = [int(c) for c in stage_out_channels]
    if len(outs) != 4 or len(stage_mid_channels) != 4:
        raise ValueError("stage_out_channels and stage_mid_channels need 4 values (HGNetV2 stages)")
    out_indices = [stride_to_stage[s] for s in strides]
    backbone = HGNetV2Config(
        num_channels=3,
        embedding_size=stem_channels,
        stem_channels=[3, stem_channels, stem_channels],
        stage_in_channels=[stem_channels, outs[0], outs[1], outs[2]],
        stage_mid_channels=[int(c) for c in stage_mid_channels],
        stage_out_channels=outs,
        stage_num_blocks=[1, 1, 1, 1],
        stage_numb_of_layers=[2, 2, 2, 2],
        stage_downsample=[False, True, True, True],
        stage_light_block=[False, False, True, True],
        stage_kernel_size=[3, 3, 5, 5],
        hidden_sizes=outs,
        depths=[1, 1, 1, 1],
        out_indices=out_indices,
        use_learnable_affine_block=False,
    )
    levels = len(strides)
    config = DFineConfig(
        backbone_config=backbone,
        encoder_in_channels=[outs[i - 1] for i in out_indices],
        feat_strides=strides,
        encoder_hidden_dim=d_model,
        encoder_ffn_dim=ffn_dim,
        encoder_attention_heads=attention_heads,
        encode_proj_layers=[levels - 1],
        hidden_expansion=0.5,
        depth_mult=0.34,
        d_model=d_model,
        decoder_in_channels=[d_model] * levels,
        decoder_ffn_dim=ffn_dim,
        num_feature_levels=levels,
        decoder_n_points=[decoder_points] * levels,
        decoder_layers=decoder_layers,
        decoder_attention_heads=attention_heads,
        num_queries=num_queries,
        num_denoising=num_denoising,
        max_num_bins=max_num_bins,
        lqe_hidden_dim=16,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    config.image_size = [size[0], size[1]]
    return config


def _as_size(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    values = tuple(int(v) for v in size)
    if len(values) != 2 or min(values) <= 0:
        raise ValueError(f"an image size is an int or (H, W) of positive ints, got {size!r}")
    return values  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Checkpoint validation


def _check_folder(folder: Path) -> tuple[Path, Path]:
    """Check the files of an HF D-FINE folder before transformers touches them.

    Returns (config path, weights path); raises CheckpointError naming the file at fault.
    """
    if not folder.exists():
        raise CheckpointError(
            f"detector folder {folder} does not exist: pass an HF-format D-FINE folder "
            f"({CONFIG_NAME} + {WEIGHTS_NAME}), e.g. one written by `write_random_detector`"
        )
    if not folder.is_dir():
        if _looks_like_torch_checkpoint(folder):
            raise CheckpointError(
                f"detector path {folder} is a file (a PyTorch checkpoint), not an HF-format D-FINE folder; "
                f"a checkpoint of the original D-FINE code converts with "
                f"`ultramotion-igt models import-dfine {folder} --out DIR`, then pass DIR"
            )
        raise CheckpointError(f"detector path {folder} is a file; pass the folder holding {CONFIG_NAME}")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        checkpoints = sorted(
            p.name for p in folder.iterdir() if p.is_file() and _looks_like_torch_checkpoint(p)
        )
        hint = (
            f"; it holds {checkpoints[0]}: a checkpoint of the original D-FINE code converts with "
            f"`ultramotion-igt models import-dfine {folder / checkpoints[0]} --out DIR`"
            if checkpoints
            else ""
        )
        raise CheckpointError(f"detector folder {folder} has no {CONFIG_NAME} (expected {config_path}){hint}")
    try:
        config_data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"detector config {config_path} is not valid JSON: {exc}") from exc
    model_type = config_data.get("model_type") if isinstance(config_data, dict) else None
    if model_type in _OTHER_DETECTORS:
        raise CheckpointError(
            f"detector config {config_path} is an {_OTHER_DETECTORS[model_type]} folder (model_type "
            f"{model_type!r}); only D-FINE folders (model_type 'd_fine', DFineForObjectDetection) run here"
        )
    if model_type != "d_fine":
        raise CheckpointError(
            f"detector config {config_path} has model_type {model_type!r}, expected 'd_fine' "
            "(a transformers DFineForObjectDetection folder)"
        )
    weights = folder / WEIGHTS_NAME
    index = folder / WEIGHTS_INDEX_NAME
    if weights.is_file():
        shard_files = [weights]
    elif index.is_file():
        try:
            index_data = json.loads(index.read_text(encoding="utf-8"))
            shard_files = sorted({folder / name for name in index_data["weight_map"].values()})
        except (
            OSError,
            UnicodeDecodeError,
            json.JSONDecodeError,
            KeyError,
            TypeError,
            AttributeError,
        ) as exc:
            raise CheckpointError(f"detector weight index {index} is not valid: {exc}") from exc
        weights = index
    else:
        found = sorted(p.name for p in folder.iterdir())
        hint = (
            " (.bin pickles are not loaded: convert to safetensors)"
            if any(".bin" in f for f in found)
            else ""
        )
        raise CheckpointError(f"detector folder {folder} has no {WEIGHTS_NAME}{hint}; found {found}")
    for shard in shard_files:
        _check_safetensors(shard)
    return config_path, weights


#: transformers detectors that share D-FINE's processor and look alike, named in the refusal
_OTHER_DETECTORS = {
    "rt_detr": "RT-DETR (transformers RTDetrForObjectDetection)",
    "rt_detr_v2": "RT-DETRv2 (transformers RTDetrV2ForObjectDetection)",
}
_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".tar", ".bin")


def _looks_like_torch_checkpoint(path: Path) -> bool:
    """A ``torch.save`` file by name or content (a zip with ``data.pkl``, or a pickle), without loading it."""
    if path.suffix.lower() in _TORCH_SUFFIXES:
        return True
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith("data.pkl") for name in archive.namelist())
        with open(path, "rb") as handle:
            return handle.read(1) == b"\x80"  # pickle protocol 2+
    except (OSError, zipfile.BadZipFile):
        return False


def _check_safetensors(path: Path) -> None:
    """Open the header and every tensor record: catches missing, truncated and corrupt files."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"detector weight file {path} is missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            if not keys:
                raise CheckpointError(f"detector weight file {path} holds no tensors")
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"detector weight file {path} is corrupt or truncated ({exc}); copy it again or re-export it"
        ) from exc


# --------------------------------------------------------------------------------------------------
# Detector


class DFineDetector:
    """A `DFineForObjectDetection` in eval mode on one device, with device-side pre/post-processing.

    Build it from a model (``DFineDetector(model, input_size=(256, 256))``) or load a folder with
    `from_pretrained`. ``class_names`` come from ``config.id2label``; ``input_size`` is the model
    input (H, W). ``channels_last`` (default: on CPU) stores convolution weights and inputs in NHWC,
    which is 2-3x faster for oneDNN convolutions on CPU and gives the same results.
    The detector takes the model over: it is moved to ``device``, put in eval mode and, with
    ``channels_last``, converted in place (for checkpoints during training use `save_detector_folder`).
    """

    def __init__(
        self,
        model: Any,
        *,
        input_size: int | tuple[int, int] | None = None,
        preprocessing: Preprocessing | None = None,
        device: str | torch.device | None = None,
        channels_last: bool | None = None,
    ) -> None:
        from transformers import DFineForObjectDetection

        if not isinstance(model, DFineForObjectDetection):
            raise TypeError(
                f"DFineDetector needs a transformers DFineForObjectDetection, got {type(model).__name__}"
            )
        _disable_transformers_sync_checks()
        config = model.config
        if preprocessing is None:
            size = input_size if input_size is not None else getattr(config, "image_size", None)
            preprocessing = Preprocessing(
                input_size=_as_size(size) if size is not None else HF_DEFAULT_INPUT_SIZE
            )
        elif input_size is not None:
            preprocessing = dataclasses.replace(preprocessing, input_size=_as_size(input_size))
        stride = max(int(s) for s in config.feat_strides)
        height, width = preprocessing.input_size
        if height < stride or width < stride or height % stride or width % stride:
            raise CheckpointError(
                f"detector input size {preprocessing.input_size} is not a positive multiple of the model's "
                f"largest feature stride {stride}: fix the size in {PREPROCESSOR_NAME}"
            )
        self._preprocessing = preprocessing
        self._device = resolve_device(device) if device is not None else model.device
        self._channels_last = self._device.type == "cpu" if channels_last is None else bool(channels_last)
        model = model.to(self._device).eval()
        if self._channels_last:
            model = model.to(memory_format=torch.channels_last)
        self._model = model
        self._dtype = next(model.parameters()).dtype  # checkpoints may be fp16/bf16; inputs follow
        num_labels = int(config.num_labels)
        id2label = {int(k): str(v) for k, v in (config.id2label or {}).items()}
        self._class_names = tuple(id2label.get(i, f"class_{i}") for i in range(num_labels))
        # 3 (RGB) or 1 (grey models, e.g. imported from the original D-FINE code with a one-channel stem)
        self._num_channels = int(getattr(config.backbone_config, "num_channels", 3))
        # per-channel constants live on the device once, so that no frame needs a host-to-device copy
        self._mean, self._inv_std = preprocessing.channel_constants(self._num_channels, self._device)

    # ---------------------------------------------------------------- loading / saving

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike[str],
        device: str | torch.device = "auto",
        *,
        channels_last: bool | None = None,
    ) -> DFineDetector:
        """Load an HF-format D-FINE folder (config.json + model.safetensors [+ preprocessor_config.json]).

        Raises CheckpointError naming the file for: a missing folder, a missing or invalid config,
        missing, truncated or corrupt safetensors, and weights that do not match the config (shape
        mismatches, missing or unexpected tensors). Without ``preprocessor_config.json`` the input
        size comes from ``config.image_size``, else transformers' default 640x640.
        """
        from transformers import DFineConfig, DFineForObjectDetection

        folder = Path(folder).expanduser()
        config_path, weights_path = _check_folder(folder)
        target = resolve_device(device)
        try:
            config = DFineConfig.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # transformers raises many types for a bad config
            raise CheckpointError(f"detector config {config_path} is not a valid DFineConfig: {exc}") from exc
        config_size = getattr(config, "image_size", None)
        fallback = _as_size(config_size) if config_size is not None else None
        processor_path = folder / PREPROCESSOR_NAME
        if processor_path.is_file():
            preprocessing = Preprocessing.from_json_file(processor_path, fallback_size=fallback)
        else:
            preprocessing = Preprocessing(input_size=fallback or HF_DEFAULT_INPUT_SIZE)
            log.warning(
                "detector folder %s has no %s: input size %s",
                folder,
                PREPROCESSOR_NAME,
                preprocessing.input_size,
            )
        try:
            with _quiet_transformers():
                model, info = DFineForObjectDetection.from_pretrained(
                    str(folder),
                    config=config,
                    local_files_only=True,
                    use_safetensors=True,
                    ignore_mismatched_sizes=True,
                    output_loading_info=True,
                )
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"detector weights {weights_path} do not load into the model of {config_path} "
                f"(do they belong together?): {exc}"
            ) from exc
        problems = []
        mismatched = list(info.get("mismatched_keys") or [])
        if mismatched:
            problems.append(
                f"{len(mismatched)} tensors have other shapes than the config, e.g. {_describe(mismatched)}"
            )
        # folders saved by transformers leave out BatchNorm's num_batches_tracked (training-only counters)
        missing = sorted(k for k in (info.get("missing_keys") or []) if not k.endswith("num_batches_tracked"))
        if missing:
            problems.append(f"{len(missing)} tensors are missing, e.g. {missing[:3]}")
        unexpected = sorted(
            k for k in (info.get("unexpected_keys") or []) if not k.endswith("num_batches_tracked")
        )
        if unexpected:
            problems.append(f"{len(unexpected)} tensors are not in the config, e.g. {unexpected[:3]}")
        if info.get("error_msgs"):
            problems.append(str(list(info["error_msgs"])[:2]))
        if problems:
            raise CheckpointError(
                f"detector weights {weights_path} do not match {config_path}: " + "; ".join(problems)
            )
        check_finite_weights(model.state_dict().items(), f"detector weights {weights_path}")
        return cls(model, preprocessing=preprocessing, device=target, channels_last=channels_last)

    # ---------------------------------------------------------------- how the model runs

    def with_precision(self, dtype: torch.dtype) -> DFineDetector:
        """A copy whose feature extractor computes in ``dtype`` (float16/bfloat16/float32); this
        detector is left as it is.

        The backbone (HGNetV2), its input projections and the hybrid encoder -- the convolutions that
        are most of D-FINE's arithmetic -- run in ``dtype``; the query selection, the decoder and the
        heads run in float32 (their inputs are cast back at ``decoder_input_proj``). Why: D-FINE's
        boxes come out of the decoder as sigmoid-normalised coordinates refined by distribution
        integrals, and a bfloat16 value in 0..1 has steps of up to 1/256 -- up to 4 pixels of a 1024-px
        frame -- while the decoder is a small share of the work (K queries, not the whole feature map).
        The outputs (logits, boxes) are float32 as before.
        """
        import copy

        from UltramotionIGTLib.core.acceleration import cast_inputs

        twin = copy.deepcopy(self)
        core = twin._model.model
        for part in (core.backbone, core.encoder_input_proj, core.encoder):
            part.to(dtype)
        for proj in core.decoder_input_proj:
            cast_inputs(proj, torch.float32)
        twin._dtype = dtype
        return twin

    @property
    def dtype(self) -> torch.dtype:
        """The precision of the model input and of the feature extractor (`with_precision`)."""
        return self._dtype

    def compile(self, mode: str = "default") -> None:
        """`torch.compile` the model in place with static shapes (the input is always ``input_size``);
        compilation happens on the first call."""
        from UltramotionIGTLib.core.acceleration import compile_module

        compile_module(self._model, mode)

    def save_pretrained(self, folder: str | os.PathLike[str]) -> Path:
        """Write config.json, model.safetensors and preprocessor_config.json into ``folder``."""
        return save_detector_folder(self._model, folder, preprocessing=self._preprocessing)

    # ---------------------------------------------------------------- properties

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._class_names

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the model input."""
        return self._preprocessing.input_size

    @property
    def preprocessing(self) -> Preprocessing:
        return self._preprocessing

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def num_channels(self) -> int:
        """Input channels of the model: 3, or 1 for grey models."""
        return self._num_channels

    @property
    def model(self) -> Any:
        """The `DFineForObjectDetection`, in eval mode, on ``device``."""
        return self._model

    @property
    def num_queries(self) -> int:
        return int(self._model.config.num_queries)

    # ---------------------------------------------------------------- inference

    def run_inference_torch(self, frame: torch.Tensor | np.ndarray, num_top: int | None = None) -> Detections:
        """Detect objects in one frame; results stay on the model's device.

        frame: HxW (grayscale), 1xHxW, 3xHxW or HxWx3, uint8 or float in 0..255, a torch tensor on
        any device (moved to the model's device if needed) or a numpy array.
        Returns Detections with boxes Kx4 (float32 XYXY, pixels of this frame), scores K, labels K,
        sorted by score descending, K = ``num_top`` (default: num_queries), no thresholding.
        No host sync. (The in-house ``gpu_resident=False`` host path is kept for comparison in
        `UltramotionIGTLib.tools.benchmarks.legacy`.)
        """
        batch = self._as_batch(frame, batched=False)
        result = self._run(batch, num_top)
        return Detections(result.boxes[0], result.scores[0], result.labels[0])

    def run_inference_batch(
        self, frames: torch.Tensor | np.ndarray, num_top: int | None = None
    ) -> Detections:
        """Detect objects in a batch of same-size frames: BxHxW, Bx1xHxW, Bx3xHxW or BxHxWx3.

        Returns Detections with BxKx4 boxes (pixels of the frames), BxK scores and BxK labels.
        """
        return self._run(self._as_batch(frames, batched=True), num_top)

    __call__ = run_inference_torch

    def num_top(self, num_top: int | None = None) -> int:
        """K detections per frame: ``num_top`` checked against queries x classes, default num_queries."""
        num_classes = len(self._class_names)
        k = self.num_queries if num_top is None else int(num_top)
        if not 1 <= k <= self.num_queries * num_classes:
            raise ValueError(
                f"num_top must be in 1..{self.num_queries * num_classes} (queries x classes), got {k}"
            )
        return k

    def _run(self, batch: torch.Tensor, num_top: int | None) -> Detections:
        k = self.num_top(num_top)
        image_size = self._preprocessing.boxes_frame_size(int(batch.shape[-2]), int(batch.shape[-1]))
        logits, pred_boxes = self.forward(self.preprocess_torch(batch))
        # outside inference_mode on purpose: the results are ordinary tensors callers may update in place
        return postprocess_detections(logits, pred_boxes, image_size, k)

    @staticmethod
    def _as_batch(frame: torch.Tensor | np.ndarray, batched: bool) -> torch.Tensor:
        """Any accepted layout -> BxCxHxW (C = 1 or 3) tensor, a view where possible (no copy, no sync)."""
        if isinstance(frame, np.ndarray):
            frame = torch.from_numpy(np.ascontiguousarray(frame))
        if not isinstance(frame, torch.Tensor):
            raise UnsupportedImageTypeError(
                f"a frame must be a torch tensor or numpy array, got {type(frame).__name__}"
            )
        if frame.dtype == torch.bool or frame.is_complex():
            raise UnsupportedImageTypeError(
                f"frame dtype {frame.dtype} is not an image type: use uint8 or float"
            )
        shape = tuple(frame.shape)
        single = frame.unsqueeze(0) if not batched else frame
        if single.ndim == 3:  # BxHxW
            return single.unsqueeze(1)
        if single.ndim == 4:
            if single.shape[1] in (1, 3):  # BxCxHxW
                return single
            if single.shape[-1] in (1, 3):  # BxHxWxC
                return single.permute(0, 3, 1, 2)
        expected = "BxHxW, Bx1xHxW, Bx3xHxW or BxHxWx3" if batched else "HxW, 1xHxW, 3xHxW or HxWx3"
        raise UnsupportedImageTypeError(f"frame of shape {shape} is not an image: expected {expected}")

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model input Bx3xhxw (see `preprocess_torch`) -> (logits BxQxC, pred_boxes BxQx4 cxcywh 0..1)."""
        with torch.inference_mode():
            outputs = self._model(pixel_values=pixel_values.to(self._dtype))
        return outputs.logits, outputs.pred_boxes

    def preprocess_torch(self, batch: torch.Tensor) -> torch.Tensor:
        """BxCxHxW (C = 1 or 3, any device, uint8/float 0..255) -> model input on device.

        Bx``num_channels``xhxw float32, as the folder's image processor makes it (`preprocess_frames`).
        """
        return preprocess_frames(
            batch,
            self._preprocessing,
            device=self._device,
            channels_last=self._channels_last,
            mean=self._mean,
            inv_std=self._inv_std,
            num_channels=self._num_channels,
        )


def _describe(mismatched: list[Any]) -> str:
    parts = []
    for item in mismatched[:3]:
        if isinstance(item, (tuple, list)) and len(item) == 3:
            key, ckpt, model = item
            parts.append(f"{key}: file {tuple(ckpt)} vs config {tuple(model)}")
        else:
            parts.append(str(item))
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------
# Random small models in the real format


def save_detector_folder(
    model: Any,
    folder: str | os.PathLike[str],
    input_size: int | tuple[int, int] | None = None,
    *,
    preprocessing: Preprocessing | None = None,
) -> Path:
    """Save a `DFineForObjectDetection` (e.g. during training) as a detector folder, without changing it.

    Writes config.json (with ``image_size``), model.safetensors and preprocessor_config.json. The
    input size comes from ``preprocessing``, else ``input_size``, else ``model.config.image_size``.
    """
    if preprocessing is None:
        size = input_size if input_size is not None else getattr(model.config, "image_size", None)
        if size is None:
            raise ValueError("save_detector_folder needs input_size (the model's (H, W) input)")
        preprocessing = Preprocessing(input_size=_as_size(size))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.image_size = list(preprocessing.input_size)
    with _quiet_transformers():
        model.save_pretrained(str(folder), safe_serialization=True)
    preprocessing.write(folder)
    return folder


def write_random_detector(
    folder: str | os.PathLike[str],
    class_names: Sequence[str] = CLASS_NAMES,
    image_size: int | tuple[int, int] = 256,
    seed: int = 0,
    **config_kwargs: Any,
) -> Path:
    """Write a random-weight small D-FINE (`small_dfine_config`) as an HF folder; returns the folder.

    Deterministic for a seed (the global RNG state is left as it was). ``config_kwargs`` go to
    `small_dfine_config` (e.g. ``num_queries=30``).
    """
    from transformers import DFineForObjectDetection

    config = small_dfine_config(class_names, image_size, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DFineForObjectDetection(config).eval()
    return save_detector_folder(model, folder, image_size)
