"""The orchestrator: frame -> D-FINE -> prompt selection -> SAM -> mask weights -> tracker -> visibility
-> ResultPacket.

One host-to-device copy of the frame (`prepare_inference_inputs`); everything after it stays on the
device with fixed shapes (K = ``max_prompts`` SAM prompts over all classes, whatever the detector's
class count; invalid ones masked, never filtered on the host); `ResultPacket.to_host()` is the one
device-to-host hop. With an imaging region (`PipelineConfig.imaging_region`) the models see a view of
that part of the frame and boxes and masks are put back into frame pixels (`core.region`). Stage times
come from `StageTimer` (CUDA events read back after that hop), in the order of `kpi.STAGES`.

How the models run (`PipelineConfig` precision, attention, compile; `UltramotionIGTLib.core.acceleration`)
is applied when the pipeline is built, on the pipeline's own copies of the models (the caller's are
never changed), and checked on the first frame (`Pipeline.warmup`). `Pipeline.submit` starts the next
frame's host-to-device copy on a transfer stream while the current frame computes.

The in-house pipeline's habits (``gpu_resident=False`` / ``sam_as_numpy=True``: frame and boxes hop to
the host, one SAM call per box, numpy mask weights) are not here: they live with the benchmarks that
compare against them (`UltramotionIGTLib.tools.benchmarks.legacy.LegacyPipeline`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import torch

from UltramotionIGTLib.core import acceleration
from UltramotionIGTLib.core.boxes import box_iou
from UltramotionIGTLib.core.device import resolve_device
from UltramotionIGTLib.core.hostsync import allowed_host_transfer
from UltramotionIGTLib.core.intensity import (
    IntensityMapper,
    IntensityWindow,
    NonFiniteFrameError,
    apply_window,
)
from UltramotionIGTLib.core.kpi import FrameRecord, KpiSink, StageTimer, safe_log_kpi
from UltramotionIGTLib.core.packet import HostResult, ResultPacket
from UltramotionIGTLib.core.region import ImagingRegion
from UltramotionIGTLib.core.visibility import (
    VisibilityConfig,
    VisibilityMonitor,
    analysis_stride,
    as_pose,
    mask_region_maps,
)
from UltramotionIGTLib.errors import SettingsError, UnsupportedImageTypeError

LOG = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    """Orchestrator settings.

    device: ``auto | cpu | cuda[:N]``. score_threshold: detections scoring above it become prompts
    (0..1). max_prompts: SAM prompts per frame over all classes (K, the fixed budget that sets the cost
    of SAM, the weights and the tracker whatever the detector's class count; at most the detector's
    query count). max_targets_per_class: optional cap per class within that budget (None: none).
    nms_iou: a prompt overlapping a higher-scoring one of its class by more IoU than this is dropped.
    imaging_region: (x, y, width, height) pixels of the frame that hold the ultrasound image
    (`core.region.ImagingRegion`; PLUS's clip rectangle); the models see only that part, outputs stay
    in frame pixels; None: the whole frame. track: assign stable target ids (`Tracker`); without it
    every target has id -1. visibility: the per-target VISIBLE / RELOCALIZING / LOST stage
    (`VisibilityConfig`; ``enabled=False`` skips it).

    How the models run (see `UltramotionIGTLib.core.acceleration`): precision: ``auto | fp32 | fp16 |
    bf16`` for the detector and SAM (auto: fp16 on CUDA, fp32 on CPU; a model whose reduced-precision
    results break the parity rules on the first frame stays in fp32, with a warning). sam_attention:
    ``auto | sdpa | explicit`` for SAM's ViT encoder (auto: sdpa on CUDA). compile: `torch.compile`
    the detector and SAM's encoder and decoder (static shapes; compiled during `Pipeline.warmup`),
    in ``compile_mode`` (``default``, ``reduce-overhead`` = with CUDA graphs, ``max-autotune``...).
    mask_box_margin_px: confine each mask to its prompt box grown by this many pixels on every side
    (`confine_masks_to_boxes`); pixels beyond it stay only where SAM's probability is at least
    ``mask_outside_confidence``. None (default): masks are SAM's as they are. It keeps a mask from
    spilling across the image on frames unlike the model's training data (a box around a needle
    should not give a mask over a vessel beside it).
    """

    device: str = "auto"
    score_threshold: float = 0.3
    max_targets_per_class: int | None = 4
    max_prompts: int = 8
    imaging_region: tuple[int, int, int, int] | None = None
    nms_iou: float = 0.6
    track: bool = True
    precision: str = "auto"
    sam_attention: str = "auto"
    compile: bool = False
    compile_mode: str = "default"
    visibility: VisibilityConfig = field(default_factory=VisibilityConfig)
    mask_box_margin_px: float | None = None
    mask_outside_confidence: float = 0.95

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.score_threshold) <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        if self.max_targets_per_class is not None and int(self.max_targets_per_class) < 1:
            raise ValueError(f"max_targets_per_class must be >= 1 or None, got {self.max_targets_per_class}")
        if int(self.max_prompts) < 1:
            raise ValueError(f"max_prompts must be >= 1, got {self.max_prompts}")
        if self.imaging_region is not None:
            self.imaging_region = ImagingRegion(*(int(v) for v in self.imaging_region)).as_tuple()
        if not 0.0 <= float(self.nms_iou) <= 1.0:
            raise ValueError(f"nms_iou must be in [0, 1], got {self.nms_iou}")
        if str(self.precision).lower() not in acceleration.PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(acceleration.PRECISIONS)}, got {self.precision!r}"
            )
        if str(self.sam_attention).lower() not in acceleration.ATTENTIONS:
            raise ValueError(
                f"sam_attention must be one of {', '.join(acceleration.ATTENTIONS)}, got {self.sam_attention!r}"
            )
        if self.compile_mode not in acceleration.COMPILE_MODES:
            raise ValueError(
                f"compile_mode must be one of {', '.join(acceleration.COMPILE_MODES)}, got {self.compile_mode!r}"
            )

        if self.mask_box_margin_px is not None and not float(self.mask_box_margin_px) >= 0.0:
            raise ValueError(
                f"mask_box_margin_px must be >= 0 pixels (or None), got {self.mask_box_margin_px}"
            )
        if not 0.5 <= float(self.mask_outside_confidence) <= 1.0:
            raise ValueError(
                f"mask_outside_confidence must be in [0.5, 1], got {self.mask_outside_confidence}"
            )

    def build_settings(self) -> tuple[str, ...]:
        """The settings that decide how the models are built (device, precision, attention, compilation):
        a pipeline must be rebuilt when one of them changes; the others apply to a running one."""
        compiled = f"compile:{self.compile_mode}" if self.compile else "eager"
        return (str(self.device), str(self.precision), str(self.sam_attention), compiled)


def _seconds_or_none(value: Any) -> float | None:
    """A timestamp in seconds, or None where there is none (None or NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


MIN_FRAME_SIDE = 16
"""Smallest frame side (rows and columns, pixels) the pipeline segments: below it a frame is not an
image (a 1-row PLUS frame, a degenerate export) and SAM's longest-side resize would collapse it."""


def check_frame_shape(shape: Any) -> tuple[int, int]:
    """(H, W) of a frame shaped HxW, HxWx1 or HxWx3, both at least `MIN_FRAME_SIDE` pixels.

    Raises `UnsupportedImageTypeError` naming the shape otherwise (torch-free; `run` checks a
    recording's frames with it before loading any model).
    """
    dims = tuple(int(d) for d in shape)
    if len(dims) == 3 and dims[-1] in (1, 3):
        dims = dims[:2]
    if len(dims) != 2:
        raise UnsupportedImageTypeError(
            f"frame must be HxW or HxWx3, got shape {tuple(shape)} (RF or multi-frame data?)"
        )
    h, w = dims
    if min(h, w) < MIN_FRAME_SIDE:
        raise UnsupportedImageTypeError(
            f"frame of {h} x {w} pixels (shape {tuple(shape)}) is too small to segment: both sides must be "
            f"at least {MIN_FRAME_SIDE} pixels"
        )
    return h, w


def prepare_inference_inputs(
    frame: Any,
    device: torch.device | str,
    intensity: IntensityMapper | None = None,
    keep_colour: bool = False,
) -> torch.Tensor:
    """The frame's single host-to-device copy, and the intensity mapping (`core.intensity`).

    ``frame``: HxW (grayscale), HxWx1 or HxWx3 (RGB) as a numpy array or torch tensor of any real
    dtype (integers, floats), each side at least `MIN_FRAME_SIDE` pixels. ``intensity``: the stream's
    `IntensityMapper` (`Pipeline.intensity`); None: this frame is a stream of its own (its window is
    fixed from it). Returns an HxW uint8 tensor on ``device``: uint8 frames unchanged, others through
    the stream's window; an RGB frame is converted to luminance (`luminance`, ITU-R BT.601) on the
    device, or kept as HxWx3 uint8 with ``keep_colour`` (for 3-channel detectors). On CUDA the
    host buffer is pinned and the copy is non-blocking; a tensor already on ``device`` is not copied.

    Raises `UnsupportedImageTypeError` naming the shape or type for what is not an image (wrong
    shape, too small, a meta tensor, a bool mask or a non-numeric type) and `NonFiniteFrameError` for a host frame
    with no finite pixel.
    """
    device = torch.device(device)
    mapper = intensity if intensity is not None else IntensityMapper()
    host: np.ndarray | None = None
    if isinstance(frame, np.ndarray):
        if frame.dtype.kind not in "iuf":
            raise UnsupportedImageTypeError(f"frame pixel type {frame.dtype} is not an image type")
        host = frame if frame.dtype.isnative else frame.astype(frame.dtype.newbyteorder("="))
        check_frame_shape(host.shape)
        upload = host
        if host.dtype.kind == "u" and host.dtype.itemsize > 1:
            # torch's unsigned 16/32/64-bit types have limited operator support on GPUs: upload
            # a signed type that holds every value (uint64 as float64, whose rounding the window
            # would do anyway)
            upload = host.astype({2: np.int32, 4: np.int64}.get(host.dtype.itemsize, np.float64))
        tensor = torch.from_numpy(np.ascontiguousarray(upload))
    elif isinstance(frame, torch.Tensor):
        if frame.is_meta:
            raise UnsupportedImageTypeError(
                f"frame is a meta tensor (shape {tuple(frame.shape)}, no pixel data): pass real pixels"
            )
        if frame.is_complex() or frame.dtype in (torch.bool, torch.quint8, torch.qint8, torch.qint32):
            raise UnsupportedImageTypeError(f"frame pixel type {frame.dtype} is not an image type")
        check_frame_shape(frame.shape)
        tensor = frame
        if tensor.device.type == "cpu" and tensor.dtype != torch.uint8:
            with allowed_host_transfer("intensity checks of a host (CPU) frame: no device involved"):
                host = tensor.detach().numpy()
    else:
        raise UnsupportedImageTypeError(
            f"frame must be a numpy array or torch tensor, got {type(frame).__name__}"
        )
    if tensor.ndim == 3 and tensor.shape[-1] == 1:
        tensor = tensor[..., 0]
        host = None if host is None else host[..., 0]
    window = mapper.window_for(tensor, host)
    # the frame's one upload (a no-op for a tensor already on ``device``): pinned and asynchronous
    # on CUDA, so no sync; a blocking copy elsewhere
    with allowed_host_transfer("frame upload (prepare_inference_inputs)", max_syncs=1):
        if device.type == "cuda" and tensor.device.type == "cpu":
            tensor = tensor.pin_memory().to(device, non_blocking=True)
        else:
            tensor = tensor.to(device)
    tensor = apply_window(tensor, window)
    if tensor.ndim == 3 and not keep_colour:
        return luminance(tensor)
    if tensor.dtype != torch.uint8:
        tensor = tensor.round().clamp_(0, 255).to(torch.uint8)
    return tensor


def luminance(image: torch.Tensor) -> torch.Tensor:
    """HxW uint8 grey of an HxWx3 RGB image (any real dtype, 0..255 values), ITU-R BT.601 luma
    weights (PIL's ``convert("L")``), on the image's device; an HxW image is returned as uint8."""
    x = image.to(torch.float32)
    if x.ndim == 3:
        x = x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114
    return x.round().clamp_(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class StagedFrame:
    """A frame whose host-to-device copy was started by `Pipeline.submit`.

    image: HxW uint8 (HxWx3 for a colour detector) on the pipeline's device (still being written while
    ``ready`` has not fired).
    ready: the CUDA event recorded on the transfer stream after the copy (None on the CPU: the image
    is complete). `use` makes the calling stream wait for it.
    """

    image: torch.Tensor
    ready: Any = None

    def use(self) -> torch.Tensor:
        """The image, ordered after its copy on the current stream (a device-side wait, no host sync)."""
        if self.ready is not None:
            stream = torch.cuda.current_stream(self.image.device)
            stream.wait_event(self.ready)
            # the image was allocated on the transfer stream: keep its memory until this stream is done
            self.image.record_stream(stream)
        return self.image


class MaskWeights(NamedTuple):
    """What `compute_mask_weights` returns (device tensors unless said otherwise).

    ``weights`` KxHxW (probability x score, zero for invalid targets); ``centroids`` Kx2 (x, y) pixels;
    ``areas`` K soft pixel counts; ``regions`` 3xKxhxw float32 0/1: the maps W_edge, W_in and W_out
    (also as the properties ``w_edge``, ``w_in``, ``w_out``) on the analysis grid
    (`UltramotionIGTLib.core.visibility.mask_region_maps`; zero for invalid targets); ``masks_grid``
    Kxhxw bool the masks (probability > 0.5, valid targets) sampled on that grid (every ``stride``-th
    pixel); ``stride`` (int)
    frame pixels per grid pixel; ``grid_spacing`` (sx, sy) mm per grid pixel (floats).
    """

    weights: torch.Tensor
    centroids: torch.Tensor
    areas: torch.Tensor
    regions: torch.Tensor
    masks_grid: torch.Tensor
    stride: int
    grid_spacing: tuple[float, float]

    @property
    def w_edge(self) -> torch.Tensor:
        """Kxhxw: the band around each mask's boundary."""
        return self.regions[0]

    @property
    def w_in(self) -> torch.Tensor:
        """Kxhxw: the inside of each mask."""
        return self.regions[1]

    @property
    def w_out(self) -> torch.Tensor:
        """Kxhxw: the ring outside each mask's band."""
        return self.regions[2]


def compute_mask_weights(
    mask_probs: torch.Tensor,
    scores: torch.Tensor,
    valid: torch.Tensor,
    spacing: tuple[float, float] | None = None,
    edge_mm: float = 0.8,
    ring_mm: float = 1.6,
    stride: int = 1,
) -> MaskWeights:
    """Per-pixel target weights and the in-house spatial weight maps, on the device.

    ``mask_probs`` KxHxW (0..1), ``scores`` K, ``valid`` K bool, all on one device. ``spacing`` (sx,
    sy) mm per pixel (None: 1 mm, the convention when a recording has no calibrated spacing).
    Returns a `MaskWeights`: weights KxHxW = prob x score (zero for invalid targets); centroids Kx2 as
    (x, y) pixels, the weight-averaged pixel position (NaN for a target with no weight); areas K = soft
    pixel count sum(prob); and per target the maps W_edge (band of half-width ``edge_mm`` around the
    boundary), W_in (inside) and W_out (ring of width ``ring_mm`` beyond the band), made by max-pool
    dilation and erosion of the mask (probability > 0.5) on a grid pooled by ``stride`` (1: the frame's
    own pixels). Fixed shapes, no host sync.
    """
    k, h, w = mask_probs.shape
    gate = (scores * valid.to(scores.dtype)).to(mask_probs.dtype)
    weights = mask_probs * gate[:, None, None]
    total = weights.sum(dim=(1, 2))
    ys = torch.arange(h, device=mask_probs.device, dtype=mask_probs.dtype)
    xs = torch.arange(w, device=mask_probs.device, dtype=mask_probs.dtype)
    cx = (weights.sum(dim=1) * xs).sum(dim=1) / total
    cy = (weights.sum(dim=2) * ys).sum(dim=1) / total
    centroids = torch.stack([cx, cy], dim=1)
    areas = mask_probs.sum(dim=(1, 2)) * valid.to(mask_probs.dtype)
    sx, sy = (1.0, 1.0) if spacing is None else (float(spacing[0]), float(spacing[1]))
    grid_spacing = (sx * stride, sy * stride)
    # masks are sampled (every stride-th pixel), not pooled: pooling K full-size maps would cost more
    # than everything else on this grid, and a 0.5 threshold of the mean changes nothing that matters
    masks = (mask_probs[:, ::stride, ::stride] > 0.5) & valid.to(torch.bool)[:, None, None]
    regions = torch.stack(mask_region_maps(masks, grid_spacing, edge_mm, ring_mm)).to(torch.float32)
    return MaskWeights(weights, centroids, areas, regions, masks, int(stride), grid_spacing)


def confine_masks_to_boxes(
    masks: torch.Tensor,
    mask_probs: torch.Tensor,
    boxes: torch.Tensor,
    margin_px: float,
    confidence: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each mask within its prompt box plus a margin, unless the model is confident beyond it.

    ``masks`` KxHxW bool, ``mask_probs`` KxHxW float (0..1), ``boxes`` Kx4 XYXY pixel-edge
    coordinates (x1, y1 exclusive), all on one device. A pixel whose centre lies outside
    ``[x0 - margin_px, x1 + margin_px] x [y0 - margin_px, y1 + margin_px]`` stays in its mask only when
    its probability is at least ``confidence``; elsewhere its mask bit and probability are set to 0
    (so the mask weights, centroids and areas ignore it too). Returns new (masks, mask_probs) of the
    same shapes, dtypes and device; fixed shapes, no host sync. Non-finite box coordinates confine
    nothing on that side.
    """
    k, h, w = mask_probs.shape
    boxes = torch.nan_to_num(boxes.to(mask_probs.dtype), nan=0.0)
    margin = float(margin_px)
    xs = torch.arange(w, device=mask_probs.device, dtype=mask_probs.dtype) + 0.5
    ys = torch.arange(h, device=mask_probs.device, dtype=mask_probs.dtype) + 0.5
    in_x = (xs[None, :] >= boxes[:, 0:1] - margin) & (xs[None, :] <= boxes[:, 2:3] + margin)  # K x W
    in_y = (ys[None, :] >= boxes[:, 1:2] - margin) & (ys[None, :] <= boxes[:, 3:4] + margin)  # K x H
    keep = (in_y[:, :, None] & in_x[:, None, :]) | (mask_probs >= confidence)
    return masks & keep, mask_probs * keep.to(mask_probs.dtype)


def select_prompts(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    max_prompts: int,
    score_threshold: float,
    nms_iou: float = 0.6,
    max_per_class: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose SAM prompts on the device with one fixed budget: the top ``max_prompts`` over all classes.

    Inputs: Qx4 boxes (XYXY pixels), Q scores, Q int64 labels (any order), all on one device.
    Returns boxes Kx4, scores K, labels K, valid K (bool) with K = ``max_prompts``, sorted by
    score (valid first); invalid slots have score 0 (padding when Q < K). A detection is a valid
    prompt when (1) its score exceeds ``score_threshold``, (2) no higher-scoring detection of its
    class above the threshold overlaps it by more than ``nms_iou`` (parallel "fast NMS", YOLACT,
    Bolya et al. 2019: no sequential loop), (3) fewer than ``max_per_class`` higher-scoring
    detections of its class passed (1)-(2) (``None``: no per-class cap), and (4) it is among the
    ``max_prompts`` best of those. The work is O(Q^2) whatever the number of classes, the shapes
    are fixed by Q and K, and nothing is read back to the host.
    """
    q = scores.shape[0]
    k = int(max_prompts)
    order = torch.sort(scores, descending=True, stable=True).indices
    boxes, scores, labels = boxes[order], scores[order], labels[order]
    passed = scores > score_threshold
    same_class = labels[:, None] == labels[None, :]
    earlier = torch.ones(q, q, device=scores.device, dtype=torch.bool).triu(diagonal=1)  # [j, i]: j < i
    above = same_class & earlier & passed[:, None]  # [j, i]: j is a higher-scoring candidate of i's class
    passed = passed & ~((box_iou(boxes, boxes) > nms_iou) & above).any(dim=0)
    if max_per_class is not None:
        rank_in_class = (above & passed[:, None]).sum(dim=0)  # surviving prompts of i's class above i
        passed = passed & (rank_in_class < int(max_per_class))
    # sorted by score already: the first K survivors, in that order, are the budget's prompts
    rank = torch.arange(q, 0, -1, device=scores.device)
    key = torch.where(passed, rank + q, rank)  # invalid slots (padding) in a deterministic order too
    slot = key.topk(min(k, q)).indices
    sel_boxes, sel_labels, valid = boxes[slot], labels[slot], passed[slot]
    sel_scores = torch.where(valid, scores[slot], 0.0)
    if k > q:  # fewer detections than prompt slots: pad with invalid prompts
        pad = k - q
        sel_boxes = torch.cat([sel_boxes, sel_boxes.new_zeros(pad, 4)])
        sel_scores = torch.cat([sel_scores, sel_scores.new_zeros(pad)])
        sel_labels = torch.cat([sel_labels, sel_labels.new_zeros(pad)])
        valid = torch.cat([valid, valid.new_zeros(pad)])
    return sel_boxes, sel_scores.float(), sel_labels.to(torch.int64), valid


def check_prompt_budget(
    queries: int | None,
    max_prompts: int,
    max_per_class: int | None,
    names: tuple[str, str] = ("max_prompts", "max_targets_per_class"),
) -> None:
    """THE check of a prompt budget against a detector: raises `SettingsError` when ``max_prompts`` or
    ``max_per_class`` (None: no cap) exceeds ``queries``, the boxes the detector proposes per frame
    (its query count; None: unknown, nothing checked). More slots could never be filled, and each
    costs an HxW mask per frame. ``names``: how the message names the two settings (the CLI passes its
    option names)."""
    if queries is None:
        return
    queries = int(queries)
    for name, value in zip(names, (max_prompts, max_per_class), strict=True):
        if value is not None and int(value) > queries:
            raise SettingsError(
                f"{name} {int(value)} is more than the detector's {queries} queries (its query count: it "
                f"never returns more detections): use at most {queries}"
            )


class Pipeline:
    """The per-frame orchestrator. Heavy resources are made once; ``process_frame`` does one frame.

    >>> pipeline = Pipeline.from_paths("Resources/Models/detector", "Resources/Models/sam/sam_vit_t_demo.safetensors")
    >>> packet = pipeline.process_frame(frame)      # device tensors
    >>> result = packet.to_host()                    # the single device-to-host hop

    ``path`` names the implementation in KPI records (``"gpu_resident"``; the benchmarks' legacy
    subclass says ``"legacy"``).

    Overlapped copies: ``staged = pipeline.submit(next_frame)`` starts that frame's host-to-device
    copy on a transfer stream (CUDA) and returns at once; ``pipeline.process_frame(staged)`` orders
    its work after the copy by an event. Submitting frame i+1 right after ``process_frame(frame i)``
    and before ``to_host()`` overlaps the copy with frame i's compute; results are those of the
    single-stream path.

    The models given are never changed: when the config asks for another precision, attention
    kernel or compilation, the pipeline builds its own copies (``detector``/``segmenter`` are the
    ones it runs). With reduced precision or compilation the first frame (or an explicit `warmup`)
    checks the reduced models against the given fp32 ones and compiles.
    """

    path = "gpu_resident"

    def __init__(
        self,
        detector: Any,
        segmenter: Any,
        config: PipelineConfig | None = None,
        tracker: Any | None = None,
    ) -> None:
        self.config = config or PipelineConfig()
        self.device = resolve_device(self.config.device)
        self.class_names: tuple[str, ...] = tuple(detector.class_names)
        #: colour frames stay colour for a 3-channel detector (SAM is RGB); grey models get luminance
        self._colour = int(getattr(detector, "num_channels", 1)) == 3
        if tracker is None and self.config.track:
            from UltramotionIGTLib.core.tracking import Tracker

            tracker = Tracker(device=self.device)
        self.tracker = tracker
        #: the stream's intensity mapping (`core.intensity`): its window is fixed on the first frame
        #: (or stated from the data's metadata) and kept until `reset`
        self.intensity = IntensityMapper()
        #: the visibility stage's per-track state (made on the first frame that needs it)
        self.visibility: VisibilityMonitor | None = None
        #: the last frame's `VisibilityResult` (device tensors; evidence per slot for offline tuning)
        self.last_visibility: Any = None
        self._frame_counter = 0
        self._copy_stream: Any = None
        self._build_models(detector, segmenter)
        self._check_prompt_slots()

    # -- how the models run ------------------------------------------------------------------------
    def _build_models(self, detector: Any, segmenter: Any) -> None:
        cfg = self.config
        self.dtype = acceleration.resolve_precision(cfg.precision, self.device)
        self.sam_attention = acceleration.resolve_attention(cfg.sam_attention, self.device)
        reduced = self.dtype != torch.float32
        self.detector = self._own_detector(detector, self.dtype)
        self.segmenter = self._own_segmenter(segmenter, self.dtype)
        #: precision each model runs in (final after the first frame's check)
        self.precision: dict[str, str] = {
            role: acceleration.precision_name(getattr(model, "dtype", torch.float32))
            for role, model in (("detector", self.detector), ("sam", self.segmenter))
        }
        self.precision_notes: list[str] = []
        #: the given fp32 models, kept until the first frame has checked the reduced ones against them
        self._reference: tuple[Any, Any] | None = (detector, segmenter) if reduced else None
        self.compile_stats: dict[str, Any] = {"enabled": bool(cfg.compile), "mode": cfg.compile_mode}
        self._compiled = False
        self.recompiles = 0
        self._warm = not (reduced or cfg.compile)

    def _own_detector(self, detector: Any, dtype: torch.dtype) -> Any:
        """The detector as the config asks, a copy whenever it must differ from the one given."""
        if dtype != torch.float32 and hasattr(detector, "with_precision"):
            return detector.with_precision(dtype)
        if self.config.compile and hasattr(detector, "compile"):
            return copy.deepcopy(detector)  # compiled at warm-up: never the caller's model
        return detector

    def _own_segmenter(self, segmenter: Any, dtype: torch.dtype) -> Any:
        current = getattr(segmenter, "attention", None)
        retune = current is not None and current != self.sam_attention
        if dtype != torch.float32 and hasattr(segmenter, "with_precision"):
            segmenter = segmenter.with_precision(dtype)
        elif (self.config.compile and hasattr(segmenter, "compile")) or retune:
            segmenter = copy.deepcopy(segmenter)
        else:
            return segmenter
        if retune:
            segmenter.set_attention(self.sam_attention)
        return segmenter

    def warmup(self, frame: Any, progress: bool = False) -> dict[str, Any]:
        """Make the pipeline ready for real-time frames, on one frame of the stream's size.

        With reduced precision: run the given fp32 models and the reduced ones on ``frame`` and keep a
        model in fp32 (warning logged, reason in ``precision_notes``) when its results break the
        parity rules (`acceleration.BOX_TOLERANCE_PX`, `SCORE_TOLERANCE`, `MASK_IOU_MIN`). With
        compile: compile the models and run ``frame`` twice (the second run proves the graphs are
        reused); the time is logged and kept in ``compile_stats``. Then tracks are forgotten
        (`reset`). ``progress``: show a progress bar on stderr (compilation takes minutes).
        `process_frame` calls this on its first frame when it was not called. Returns `describe()`.
        """
        if self._warm:
            return self.describe()
        steps = (["precision check"] if self._reference is not None else []) + (
            ["compile + first run", "second run"] if self.config.compile else []
        )
        import sys

        from tqdm import tqdm

        bar = tqdm(total=len(steps), desc="warm-up", unit="step", disable=not progress, file=sys.stderr)
        with torch.inference_mode():
            image = (
                frame.use()
                if isinstance(frame, StagedFrame)
                else prepare_inference_inputs(frame, self.device, self.intensity, self._colour)
            )
            if self._reference is not None:
                bar.set_postfix_str("precision check")
                self._check_precision(image)
                bar.update(1)
            if self.config.compile and not self._compiled:
                self._compile()
                before = acceleration.CompileCounter.count()
                times = []
                for step in steps[-2:]:
                    bar.set_postfix_str(step)
                    t0 = time.perf_counter()
                    self._run(image, frame_index=0, timestamp=None).to_host()
                    times.append(time.perf_counter() - t0)
                    bar.update(1)
                self.compile_stats.update(
                    warmup_s=[round(t, 3) for t in times], graphs=acceleration.CompileCounter.count() - before
                )
                LOG.info(
                    "compiled (%s): first run %.1f s, second run %.3f s, %d graphs",
                    self.config.compile_mode,
                    times[0],
                    times[1],
                    self.compile_stats["graphs"],
                )
        bar.close()
        self._warm = True
        self.reset()
        return self.describe()

    def _compile(self) -> None:
        for model in (self.detector, self.segmenter):
            if hasattr(model, "compile"):
                model.compile(self.config.compile_mode)
        self._compiled = True

    def _check_precision(self, image: torch.Tensor) -> None:
        """Compare the reduced models with the given fp32 ones on ``image``; fall back per model."""
        cfg = self.config
        ref_detector, ref_segmenter = self._reference
        self._reference = None

        def prompts(detections: Any, threshold: float) -> tuple:
            return select_prompts(
                detections.boxes, detections.scores, detections.labels,
                cfg.max_prompts, threshold, cfg.nms_iou, cfg.max_targets_per_class,
            )  # fmt: skip

        ref_det = ref_detector.run_inference_torch(image)
        det = self.detector.run_inference_torch(image)
        ref_p, p = prompts(ref_det, cfg.score_threshold), prompts(det, cfg.score_threshold)
        score_diff = (ref_det.scores.sort().values - det.scores.sort().values).abs().max()
        # SAM on the same prompts: the frame's targets, else every slot (a frame without targets
        # still tests it)
        boxes, _, _, slots = prompts(ref_det, -1.0)
        slots = torch.where(ref_p[3].any(), ref_p[3], slots)
        ref_segmenter.set_torch_image(image)
        ref_masks = ref_segmenter.predict_boxes(boxes, valid=slots).masks
        self.segmenter.set_torch_image(image)
        masks = self.segmenter.predict_boxes(boxes, valid=slots).masks
        iou_min = acceleration.mask_ious(ref_masks, masks).min()
        ref_segmenter.reset_image()
        with allowed_host_transfer("precision check (warm-up, once)"):
            score_diff, iou_min = torch.stack([score_diff, iou_min]).float().tolist()
            fields = ("boxes", "scores", "labels", "valid")
            box_px = acceleration.agreement(
                SimpleNamespace(**dict(zip(fields, ref_p, strict=True))),
                SimpleNamespace(**dict(zip(fields, p, strict=True))),
                cfg.score_threshold,
            )["box_px"]
        name = acceleration.precision_name(self.dtype)
        if self.precision["detector"] != "fp32" and not (
            box_px <= acceleration.BOX_TOLERANCE_PX and score_diff <= acceleration.SCORE_TOLERANCE
        ):
            note = (
                f"detector kept in fp32: in {name} its scores moved by {score_diff:.3g} (limit "
                f"{acceleration.SCORE_TOLERANCE}) and its prompt boxes by {box_px:.3g} px (limit "
                f"{acceleration.BOX_TOLERANCE_PX}) on the first frame"
            )
            self.detector = self._own_detector(ref_detector, torch.float32)
            self.precision["detector"] = "fp32"
            self.precision_notes.append(note)
            LOG.warning(note)
        if self.precision["sam"] != "fp32" and not iou_min >= acceleration.MASK_IOU_MIN:
            note = (
                f"SAM kept in fp32: in {name} a mask's IoU with fp32 fell to {iou_min:.3f} (limit "
                f"{acceleration.MASK_IOU_MIN}) on the first frame"
            )
            self.segmenter = self._own_segmenter(ref_segmenter, torch.float32)
            self.precision["sam"] = "fp32"
            self.precision_notes.append(note)
            LOG.warning(note)
        self.precision_check = {"box_px": box_px, "score_max_diff": score_diff, "mask_iou_min": iou_min}

    def submit(self, frame: Any) -> StagedFrame:
        """Start ``frame``'s host-to-device copy now and return at once; give the result to
        `process_frame`. On CUDA the copy (pinned, non-blocking, plus the RGB->gray conversion) runs on
        the pipeline's transfer stream, so it overlaps whatever the compute stream is doing; an event
        orders the frame's processing after it. On the CPU the frame is just prepared.
        Raises `UnsupportedImageTypeError` like `prepare_inference_inputs`."""
        if self.device.type != "cuda":
            return StagedFrame(prepare_inference_inputs(frame, self.device, self.intensity, self._colour))
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            image = prepare_inference_inputs(frame, self.device, self.intensity, self._colour)
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        return StagedFrame(image, ready)

    def _check_prompt_slots(self) -> None:
        """`SettingsError` when the prompt budget exceeds the boxes the detector proposes per frame
        (`check_prompt_budget`)."""
        check_prompt_budget(
            getattr(self.detector, "num_queries", None),
            self.config.max_prompts,
            self.config.max_targets_per_class,
        )

    @classmethod
    def from_paths(
        cls,
        detector_dir: str | Path,
        sam_checkpoint: str | Path,
        sam_type: str = "auto",
        config: PipelineConfig | None = None,
        **kwargs: Any,
    ) -> Pipeline:
        """Load both models (clear errors for missing/corrupt checkpoints) and build the pipeline.

        Raises `CheckpointError` naming the file at fault, `DeviceUnavailableError` for an unusable
        device. ``kwargs`` go to the constructor (subclasses' options).
        """
        from UltramotionIGTLib.core.detector import DFineDetector
        from UltramotionIGTLib.core.sam import SamSegmenter

        config = config or PipelineConfig()
        device = resolve_device(config.device)
        detector = DFineDetector.from_pretrained(detector_dir, device=device)
        segmenter = SamSegmenter.from_checkpoint(sam_checkpoint, model_type=sam_type, device=device)
        return cls(detector, segmenter, config, **kwargs)

    @torch.inference_mode()  # like the frames: a CUDA-graph tracker's state is updated in place
    def reset(self, intensity_window: IntensityWindow | None | str = "keep") -> None:
        """Forget tracks, the frame counter and the intensity window fixed from a first frame (a new
        stream starts). ``intensity_window``: the window the new stream's metadata states (None: none;
        by default the stated one is kept), see `core.intensity`."""
        if self.tracker is not None:
            self.tracker.reset()
        self.intensity.reset(intensity_window)
        if self.visibility is not None:
            self.visibility.reset()
        self._frame_counter = 0

    # -- per frame ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def process_frame(
        self,
        frame: Any,
        frame_index: int | None = None,
        timestamp: float | None = None,
        spacing: tuple[float, float] | None = None,
        pose: Any | None = None,
    ) -> ResultPacket:
        """One frame -> `ResultPacket` of device tensors (see `ResultPacket` for shapes).

        ``frame``: HxW or HxWx3, numpy array or tensor of any real pixel type, each side at least
        `MIN_FRAME_SIDE` pixels (see `prepare_inference_inputs`; its intensities go through the
        stream's window, `Pipeline.intensity`), or a `StagedFrame` from `submit` (its copy already
        under way). ``frame_index``: its number in the stream (default: one more than the last).
        ``timestamp``: its acquisition time in seconds (carried through to the result). The first
        frame runs `warmup` first when the config needs one (reduced precision, compile).
        ``spacing``: (sx, sy) mm per pixel (columns, rows); None: 1 mm, the convention for images
        without a calibrated spacing (the visibility widths are in mm).
        ``pose``: the frame's 4x4 image-to-reference transform in mm (a host array, e.g. PLUS
        ``ImageToReference``); the visibility scores then compensate the probe's motion. None: image
        space only.
        Raises `UnsupportedImageTypeError` naming the shape or type for a frame that is not an image
        (the frame is not counted), `NonFiniteFrameError` (a subclass) for a frame without a finite
        pixel: report and skip it; ValueError for a pose that is not a finite 4x4 matrix or a spacing
        that is not two positive numbers.
        """
        if not self._warm:
            self.warmup(frame)
        if frame_index is None:
            frame_index = self._frame_counter
        spacing = _as_spacing(spacing)
        pose = as_pose(pose) if pose is not None else None
        if not self.config.compile:
            return self._run(frame, frame_index, timestamp, spacing, pose)
        if self.device.type == "cuda" and self.config.compile_mode in ("reduce-overhead", "max-autotune"):
            torch.compiler.cudagraph_mark_step_begin()  # a new frame: the graphs' last outputs are consumed
        before = acceleration.CompileCounter.count()
        packet = self._run(frame, frame_index, timestamp, spacing, pose)
        compiled = acceleration.CompileCounter.count() - before
        if compiled:
            self.recompiles += compiled
            self.compile_stats["recompiles"] = self.recompiles
            LOG.warning(
                "frame %d: torch.compile compiled %d graph(s) again (%d since warm-up): an input shape, a "
                "setting or a torch function the graphs guard on changed (the runtime audit wraps some)",
                frame_index,
                compiled,
                self.recompiles,
            )
        return packet

    def _run(
        self,
        frame: Any,
        frame_index: int,
        timestamp: float | None,
        spacing: tuple[float, float] = (1.0, 1.0),
        pose: Any | None = None,
    ) -> ResultPacket:
        vis_config = self.config.visibility
        timer = StageTimer(self.device)
        with timer.stage("prepare"):
            if isinstance(frame, StagedFrame):
                image = frame.use()
            else:
                image = prepare_inference_inputs(frame, self.device, self.intensity, self._colour)
        self._frame_counter = frame_index + 1  # a frame that is not an image is not counted
        h, w = int(image.shape[0]), int(image.shape[1])
        stride = analysis_stride((h, w), vis_config.analysis_size)
        # the models see the imaging region only (a view, no copy); outputs go back into frame pixels
        imaging = self.config.imaging_region
        region = ImagingRegion(*imaging).clipped(h, w) if imaging is not None else None
        view = region.crop(image) if region is not None else image
        with timer.stage("detector"):
            detections = self._detect(view)
        boxes, scores, labels, valid, masks, probs = self._select_and_segment(view, detections, timer)
        if region is not None:
            with timer.stage("sam_decoder"):
                boxes = region.offset_boxes(boxes)
                masks = region.paste_masks(masks, h, w)
                probs = region.paste_masks(torch.as_tensor(probs, device=masks.device), h, w)
        with timer.stage("weights"):
            weights = self._mask_weights(probs, scores, valid, spacing, stride)
        with timer.stage("track"):
            if self.tracker is not None:
                track_ids = self.tracker.update(boxes, scores, labels, valid)
            else:
                track_ids = torch.full_like(labels, -1)
        states = visibility = tracks = None
        if vis_config.enabled:
            with timer.stage("visibility"):
                states, visibility, tracks = self._visibility(
                    luminance(image) if image.ndim == 3 else image,
                    probs,
                    weights,
                    boxes,
                    scores,
                    valid,
                    spacing,
                    pose,
                    stride,
                )
        return ResultPacket(
            frame_index=frame_index,
            image_size=(h, w),
            boxes=boxes,
            scores=scores,
            labels=labels,
            valid=valid,
            masks=masks,
            centroids=weights.centroids,
            areas=weights.areas,
            track_ids=track_ids,
            class_names=self.class_names,
            timestamp=timestamp,
            timer=timer,
            path=self.path,
            intensity=self.intensity.describe(),
            states=states,
            visibility=visibility,
            tracks=tracks,
        )

    def _detect(self, image: torch.Tensor) -> Any:
        """`Detections` of the HxW uint8 device frame (K fixed, sorted by score, on the device)."""
        return self.detector.run_inference_torch(image)

    def _select_and_segment(
        self, image: torch.Tensor, detections: Any, timer: StageTimer
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompts (fixed K) and their masks, on the device: boxes Kx4 float32 xyxy, scores K, labels K
        int64, valid K bool, masks KxHxW bool, probs KxHxW float32."""
        cfg = self.config
        with timer.stage("select"):
            boxes, scores, labels, valid = select_prompts(
                detections.boxes,
                detections.scores,
                detections.labels,
                cfg.max_prompts,
                cfg.score_threshold,
                cfg.nms_iou,
                cfg.max_targets_per_class,
            )
        with timer.stage("sam_encoder"):
            self.segmenter.set_torch_image(image)
        with timer.stage("sam_decoder"):
            sam = self.segmenter.predict_boxes(boxes, valid=valid)
            masks, probs = sam.masks, sam.mask_probs
            if cfg.mask_box_margin_px is not None:
                masks, probs = confine_masks_to_boxes(
                    masks, probs, boxes, cfg.mask_box_margin_px, cfg.mask_outside_confidence
                )
        return boxes, scores, labels, valid, masks, probs

    def _mask_weights(
        self,
        probs: torch.Tensor,
        scores: torch.Tensor,
        valid: torch.Tensor,
        spacing: tuple[float, float],
        stride: int,
    ) -> MaskWeights:
        cfg = self.config.visibility
        return compute_mask_weights(probs, scores, valid, spacing, cfg.edge_mm, cfg.ring_mm, stride)

    def _visibility(
        self,
        image: torch.Tensor,
        probs: Any,
        weights: MaskWeights,
        boxes: torch.Tensor,
        scores: torch.Tensor,
        valid: torch.Tensor,
        spacing: tuple[float, float],
        pose: Any,
        stride: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The visibility stage: (states K, scores Kx9, tracks Mx3 = id, label, state or None)."""
        tracker = self.tracker
        slots = int(tracker.max_tracks) if tracker is not None else 0
        if self.visibility is None or self.visibility.max_tracks != slots:
            self.visibility = VisibilityMonitor(slots, self.device, self.config.visibility)
        self.visibility.config = self.config.visibility
        if not isinstance(weights, MaskWeights):  # a subclass computed its weights elsewhere (legacy)
            weights = compute_mask_weights(
                torch.as_tensor(probs, device=self.device),
                scores,
                valid,
                spacing,
                self.config.visibility.edge_mm,
                self.config.visibility.ring_mm,
                stride,
            )
        result = self.visibility.update(
            image,
            weights.masks_grid,
            weights.regions,
            weights.stride,
            boxes,
            scores,
            valid,
            det_slot=tracker.det_slot if tracker is not None else None,
            born=tracker.born if tracker is not None else None,
            spacing=spacing,
            pose=pose,
        )
        tracks = None
        if tracker is not None:
            tracks = torch.stack((tracker.ids, tracker.labels, result.slot_states), dim=1)
        self.last_visibility = result
        return result.states, result.scores, tracks

    def run(
        self,
        frames: Iterable[Any],
        timestamps: Iterable[float | None] | None = None,
        *,
        audit: Any | None = None,
        sink: KpiSink | None = None,
        on_skip: Callable[[int, float | None, Any, Exception], None] | None = None,
        spacing: tuple[float, float] | None = None,
        poses: Iterable[Any] | None = None,
    ) -> Iterator[tuple[Any, HostResult, FrameRecord]]:
        """The per-frame loop over a recording; yields (frame, `HostResult`, `FrameRecord`) per frame.

        Each frame goes through `process_frame` and its one host copy; its record (wall time of both)
        goes to ``sink``. The first frame warms the pipeline up (`warmup`) before its timing; the next
        frame's copy is started (`submit`) while a frame computes, so on CUDA the two overlap.
        ``timestamps``: one per frame, seconds (NaN or None: none). ``audit``: an active
        `UltramotionIGTLib.tools.audit.runtime.RuntimeTransferAudit`; each frame is one audit frame and
        its counts go into the record (``host_syncs``, ``declared_hops``, ...); what the loop does
        between frames (the record, the sink) is counted by the audit as after that frame.
        ``on_skip``: called, in frame order, with (frame index, timestamp, frame, error) for a frame
        without a finite pixel (`NonFiniteFrameError`), which then yields nothing; without it the error
        is raised. Any other error of a frame is raised at that frame's turn, after every earlier
        frame's result was yielded. ``spacing`` (mm per pixel) and ``poses`` (one 4x4 image-to-reference
        transform or None per frame) go to `process_frame` for the visibility stage.
        """
        stamps = iter(timestamps) if timestamps is not None else None
        pose_of = iter(poses) if poses is not None else None
        source = enumerate(frames)

        def stage(item: tuple[int, Any] | None) -> tuple | None:
            if item is None:
                return None
            index, frame = item
            timestamp = _seconds_or_none(next(stamps, None)) if stamps is not None else None
            pose = next(pose_of, None) if pose_of is not None else None
            try:
                return index, frame, timestamp, pose, self.submit(frame), None
            except Exception as exc:  # raised at the frame's turn, not before earlier results
                return index, frame, timestamp, pose, None, exc

        pending = stage(next(source, None))
        while pending is not None:
            index, frame, timestamp, pose, staged, error = pending
            upcoming = next(source, None)
            if error is not None:
                if on_skip is None or not isinstance(error, NonFiniteFrameError):
                    raise error
                on_skip(index, timestamp, frame, error)
                pending = stage(upcoming)
                continue
            if not self._warm:
                self.warmup(staged)  # precision check, compilation: before the timing and the audit
            t0 = time.perf_counter()
            with audit.frame(index) if audit is not None else nullcontext():
                packet = self.process_frame(staged, index, timestamp, spacing=spacing, pose=pose)
                pending = stage(upcoming)  # the next frame's copy overlaps this frame's compute
                result = packet.to_host()
            wall_ms = (time.perf_counter() - t0) * 1000.0
            counts = audit.last_frame.kpi() if audit is not None else {}
            record = FrameRecord.from_result(result, wall_ms=wall_ms, **counts)
            if sink is not None:
                safe_log_kpi(record, sink)
            yield frame, result, record

    def describe(self) -> dict[str, Any]:
        """Device, path, config, classes and how the models run (precision per model with the notes
        of the first frame's check, SAM attention, compilation), for the start record of a run."""
        return {
            "device": str(self.device),
            "path": self.path,
            "config": asdict(self.config),
            "class_names": list(self.class_names),
            "intensity": self.intensity.describe(),
            "precision": dict(self.precision),
            "precision_notes": list(self.precision_notes),
            "sam_attention": getattr(self.segmenter, "attention", None),
            "compile": dict(self.compile_stats),
        }


def _as_spacing(spacing: Any) -> tuple[float, float]:
    """(sx, sy) mm per pixel as floats; None -> (1.0, 1.0). ValueError unless two positive numbers."""
    if spacing is None:
        return (1.0, 1.0)
    values = tuple(float(v) for v in np.asarray(spacing, dtype=np.float64).reshape(-1)[:2])
    if len(values) != 2 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be two positive numbers (mm per pixel), got {spacing!r}")
    return values
