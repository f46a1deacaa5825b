"""The orchestrator: frame -> D-FINE -> prompt selection -> SAM -> mask weights -> tracker -> visibility
-> ResultPacket.

One host-to-device copy of the frame (`prepare_inference_inputs`); everything after it stays on the
device with fixed shapes (K = classes x max_targets_per_class prompts, invalid ones masked, never
filtered on the host); `ResultPacket.to_host()` is the one device-to-host hop. Stage times come from
`StageTimer` (CUDA events read back after that hop), in the order of `kpi.STAGES`.

The in-house pipeline's habits (``gpu_resident=False`` / ``sam_as_numpy=True``: frame and boxes hop to
the host, one SAM call per box, numpy mask weights) are not here: they live with the benchmarks that
compare against them (`UltramotionIGTLib.tools.benchmarks.legacy.LegacyPipeline`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from UltramotionIGTLib.core.boxes import box_iou
from UltramotionIGTLib.core.device import resolve_device
from UltramotionIGTLib.core.kpi import StageTimer
from UltramotionIGTLib.core.packet import ResultPacket
from UltramotionIGTLib.core.visibility import (
    VisibilityConfig,
    VisibilityMonitor,
    analysis_stride,
    as_pose,
    mask_region_maps,
)
from UltramotionIGTLib.errors import UnsupportedImageTypeError


@dataclass
class PipelineConfig:
    """Orchestrator settings.

    device: ``auto | cpu | cuda[:N]``. score_threshold: detections scoring above it become prompts
    (0..1). max_targets_per_class: prompt slots per class (K = classes x this). nms_iou: a prompt
    overlapping a higher-scoring one of its class by more IoU than this is dropped. track: assign
    stable target ids (`Tracker`); without it every target has id -1. visibility: the per-target
    VISIBLE / RELOCALIZING / LOST stage (`VisibilityConfig`; ``enabled=False`` skips it).
    mask_box_margin_px: confine each mask to its prompt box grown by this many pixels on every side
    (`confine_masks_to_boxes`); pixels beyond it stay only where SAM's probability is at least
    ``mask_outside_confidence``. None (default): masks are SAM's as they are. It keeps a mask from
    spilling across the image on frames unlike the model's training data (a box around a needle
    should not give a mask over a vessel beside it).
    """

    device: str = "auto"
    score_threshold: float = 0.3
    max_targets_per_class: int = 4
    nms_iou: float = 0.6
    track: bool = True
    visibility: VisibilityConfig = field(default_factory=VisibilityConfig)
    mask_box_margin_px: float | None = None
    mask_outside_confidence: float = 0.95

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.score_threshold) <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        if int(self.max_targets_per_class) < 1:
            raise ValueError(f"max_targets_per_class must be >= 1, got {self.max_targets_per_class}")
        if not 0.0 <= float(self.nms_iou) <= 1.0:
            raise ValueError(f"nms_iou must be in [0, 1], got {self.nms_iou}")
        if self.mask_box_margin_px is not None and not float(self.mask_box_margin_px) >= 0.0:
            raise ValueError(
                f"mask_box_margin_px must be >= 0 pixels (or None), got {self.mask_box_margin_px}"
            )
        if not 0.5 <= float(self.mask_outside_confidence) <= 1.0:
            raise ValueError(
                f"mask_outside_confidence must be in [0.5, 1], got {self.mask_outside_confidence}"
            )


def prepare_inference_inputs(frame: Any, device: torch.device | str) -> torch.Tensor:
    """The frame's single host-to-device copy.

    ``frame``: HxW (grayscale) or HxWx3 (RGB, converted to luminance on the device) as a numpy array
    or torch tensor, uint8 or any real dtype. Returns an HxW uint8 tensor on ``device``. On CUDA the
    host buffer is pinned and the copy is non-blocking; a tensor already on ``device`` is not copied.
    """
    device = torch.device(device)
    if isinstance(frame, np.ndarray):
        if frame.dtype == np.bool_ or not (
            np.issubdtype(frame.dtype, np.integer) or np.issubdtype(frame.dtype, np.floating)
        ):
            raise UnsupportedImageTypeError(f"frame pixel type {frame.dtype} is not an image type")
        tensor = torch.from_numpy(np.ascontiguousarray(frame))
    elif isinstance(frame, torch.Tensor):
        tensor = frame
    else:
        raise UnsupportedImageTypeError(
            f"frame must be a numpy array or torch tensor, got {type(frame).__name__}"
        )
    if tensor.ndim == 3 and tensor.shape[-1] == 1:
        tensor = tensor[..., 0]
    if tensor.ndim not in (2, 3) or (tensor.ndim == 3 and tensor.shape[-1] != 3):
        raise UnsupportedImageTypeError(
            f"frame must be HxW or HxWx3, got shape {tuple(tensor.shape)} (RF or multi-frame data?)"
        )
    if tensor.device != device:
        if device.type == "cuda" and tensor.device.type == "cpu":
            tensor = tensor.pin_memory().to(device, non_blocking=True)
        else:
            tensor = tensor.to(device)
    if tensor.ndim == 3:
        rgb = tensor.to(torch.float32)
        tensor = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    if tensor.dtype != torch.uint8:
        tensor = tensor.to(torch.float32).round().clamp_(0, 255).to(torch.uint8)
    return tensor


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
    num_classes: int,
    max_per_class: int,
    score_threshold: float,
    nms_iou: float = 0.6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose SAM prompts on the device with fixed shapes: per class the top ``max_per_class``.

    Inputs: Qx4 boxes, Q scores, Q int64 labels (any order). Returns boxes Kx4, scores K, labels K,
    valid K (bool) with K = num_classes x max_per_class. A prompt is valid when its score exceeds the
    threshold and no higher-scoring valid prompt of its class overlaps it by more than ``nms_iou``
    (parallel "fast NMS": no sequential loop, no sync).
    """
    q = scores.shape[0]
    k = min(max_per_class, q)
    classes = torch.arange(num_classes, device=scores.device)
    per_class = torch.where(
        labels[None, :] == classes[:, None], scores[None, :], torch.full_like(scores, -1.0)
    )
    top_scores, top_idx = per_class.topk(k, dim=1)  # C x k, sorted descending
    sel_boxes = boxes[top_idx]  # C x k x 4
    valid = top_scores > score_threshold
    iou = box_iou(sel_boxes, sel_boxes)  # C x k x k
    earlier = torch.ones(k, k, device=scores.device, dtype=torch.bool).triu(diagonal=1)  # [i, j]: i < j
    suppressed = ((iou > nms_iou) & earlier[None] & valid[:, :, None]).any(dim=1)
    valid = valid & ~suppressed
    sel_labels = classes[:, None].expand(num_classes, k)
    if k < max_per_class:  # fewer queries than prompt slots: pad with invalid prompts
        pad = max_per_class - k
        sel_boxes = torch.cat([sel_boxes, sel_boxes.new_zeros(num_classes, pad, 4)], dim=1)
        top_scores = torch.cat([top_scores, top_scores.new_zeros(num_classes, pad)], dim=1)
        valid = torch.cat([valid, valid.new_zeros(num_classes, pad)], dim=1)
        sel_labels = classes[:, None].expand(num_classes, max_per_class)
    return (
        sel_boxes.reshape(-1, 4),
        top_scores.clamp(min=0).reshape(-1),
        sel_labels.reshape(-1).to(torch.int64),
        valid.reshape(-1),
    )


class Pipeline:
    """The per-frame orchestrator. Heavy resources are made once; ``process_frame`` does one frame.

    >>> pipeline = Pipeline.from_paths("Resources/Models/detector", "Resources/Models/sam/sam_vit_t_demo.safetensors")
    >>> packet = pipeline.process_frame(frame)      # device tensors
    >>> result = packet.to_host()                    # the single device-to-host hop

    ``path`` names the implementation in KPI records (``"gpu_resident"``; the benchmarks' legacy
    subclass says ``"legacy"``).
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
        self.detector = detector
        self.segmenter = segmenter
        self.class_names: tuple[str, ...] = tuple(detector.class_names)
        if tracker is None and self.config.track:
            from UltramotionIGTLib.core.tracking import Tracker

            tracker = Tracker(device=self.device)
        self.tracker = tracker
        #: the visibility stage's per-track state (made on the first frame that needs it)
        self.visibility: VisibilityMonitor | None = None
        #: the last frame's `VisibilityResult` (device tensors; evidence per slot for offline tuning)
        self.last_visibility: Any = None
        self._frame_counter = 0

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

    def reset(self) -> None:
        """Forget tracks and the frame counter (a new sequence starts)."""
        if self.tracker is not None:
            self.tracker.reset()
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

        ``frame``: HxW or HxWx3, numpy array or tensor (see `prepare_inference_inputs`).
        ``frame_index``: its number in the stream (default: one more than the last).
        ``timestamp``: its acquisition time in seconds (carried through to the result).
        ``spacing``: (sx, sy) mm per pixel (columns, rows); None: 1 mm, the convention for images
        without a calibrated spacing (the visibility widths are in mm).
        ``pose``: the frame's 4x4 image-to-reference transform in mm (a host array, e.g. PLUS
        ``ImageToReference``); the visibility scores then compensate the probe's motion. None: image
        space only.
        Raises `UnsupportedImageTypeError` for a frame that is not an image, ValueError for a pose that
        is not a finite 4x4 matrix or a spacing that is not two positive numbers.
        """
        if frame_index is None:
            frame_index = self._frame_counter
        self._frame_counter = frame_index + 1
        spacing = _as_spacing(spacing)
        pose = as_pose(pose) if pose is not None else None
        vis_config = self.config.visibility
        timer = StageTimer(self.device)
        with timer.stage("prepare"):
            image = prepare_inference_inputs(frame, self.device)
        h, w = int(image.shape[0]), int(image.shape[1])
        stride = analysis_stride((h, w), vis_config.analysis_size)
        with timer.stage("detector"):
            detections = self._detect(image)
        boxes, scores, labels, valid, masks, probs = self._select_and_segment(image, detections, timer)
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
                    image, probs, weights, boxes, scores, valid, spacing, pose, stride
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
            states=states,
            visibility=visibility,
            tracks=tracks,
        )

    def _detect(self, image: torch.Tensor) -> Any:
        """`Detections` of the HxW uint8 device frame (K fixed, sorted by score, on the device)."""
        return self.detector.run_inference_torch(image)

    def _select_and_segment(self, image: torch.Tensor, detections: Any, timer: StageTimer) -> tuple:
        """Prompts (fixed K) and their masks, on the device: (boxes, scores, labels, valid, masks, probs)."""
        cfg = self.config
        with timer.stage("select"):
            boxes, scores, labels, valid = select_prompts(
                detections.boxes,
                detections.scores,
                detections.labels,
                len(self.class_names),
                cfg.max_targets_per_class,
                cfg.score_threshold,
                cfg.nms_iou,
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

    def describe(self) -> dict[str, Any]:
        """Device, path, config and classes, for the start record of a run."""
        return {
            "device": str(self.device),
            "path": self.path,
            "config": asdict(self.config),
            "class_names": list(self.class_names),
        }


def _as_spacing(spacing: Any) -> tuple[float, float]:
    """(sx, sy) mm per pixel as floats; None -> (1.0, 1.0). ValueError unless two positive numbers."""
    if spacing is None:
        return (1.0, 1.0)
    values = tuple(float(v) for v in np.asarray(spacing, dtype=np.float64).reshape(-1)[:2])
    if len(values) != 2 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be two positive numbers (mm per pixel), got {spacing!r}")
    return values
