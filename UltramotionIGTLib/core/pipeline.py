"""The orchestrator: frame -> D-FINE -> prompt selection -> tracker -> SAM -> mask weights -> ResultPacket.

GPU-resident path (default): one host-to-device copy of the frame (`prepare_inference_inputs`),
everything after it stays on the device with fixed shapes (K = ``max_prompts`` SAM prompts over all
classes, whatever the detector's class count; invalid ones masked, never filtered on the host), and
`ResultPacket.to_host()` is the one device-to-host hop. Stage times come from `StageTimer` (CUDA
events read back after that hop).

Legacy path (``gpu_resident=False`` and/or ``sam_as_numpy=True``): the in-house pipeline's habits,
kept for side-by-side measurement: frame and detections hop to the host, prompts are filtered in
numpy, SAM is called once per box and returns numpy, mask weights are computed on the CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from UltramotionIGTLib.core.boxes import box_iou
from UltramotionIGTLib.core.device import resolve_device
from UltramotionIGTLib.core.kpi import KpiSink, LatencyStats, StageTimer, format_kpi, safe_log_kpi
from UltramotionIGTLib.core.packet import HostResult, ResultPacket
from UltramotionIGTLib.core.region import ImagingRegion
from UltramotionIGTLib.errors import SettingsError, UnsupportedImageTypeError
from UltramotionIGTLib.tools.metrics import box_iou_np

LOG = logging.getLogger("UltramotionIGTLib.core.pipeline")

STAGES = ("prepare", "detector", "select", "track", "sam_encoder", "sam_decoder", "weights")


@dataclass
class PipelineConfig:
    """Orchestrator settings. ``device``: auto | cpu | cuda[:N].

    ``max_prompts``: SAM prompts per frame over all classes (the fixed budget that sets the cost of
    SAM, the weights and the tracker; at most the detector's query count). ``max_targets_per_class``:
    optional cap per class within that budget (``None``: none). ``imaging_region``: (x, y, width,
    height) pixels of the frame that hold the ultrasound image (`region.ImagingRegion`; PLUS's clip
    rectangle); the models see only that part, outputs stay in frame pixels. None: the whole frame.
    """

    device: str = "auto"
    score_threshold: float = 0.3
    max_targets_per_class: int | None = 4
    max_prompts: int = 8
    imaging_region: tuple[int, int, int, int] | None = None
    nms_iou: float = 0.6
    gpu_resident: bool = True
    sam_as_numpy: bool = False
    track: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.score_threshold) <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        if self.max_targets_per_class is not None and int(self.max_targets_per_class) < 1:
            raise ValueError(f"max_targets_per_class must be >= 1 or None, got {self.max_targets_per_class}")
        if int(self.max_prompts) < 1:
            raise ValueError(f"max_prompts must be >= 1, got {self.max_prompts}")
        if self.imaging_region is not None:
            self.imaging_region = ImagingRegion(*(int(v) for v in self.imaging_region)).as_tuple()

    @property
    def legacy(self) -> bool:
        return (not self.gpu_resident) or self.sam_as_numpy


def prepare_inference_inputs(
    frame: Any, device: torch.device | str, keep_colour: bool = False
) -> torch.Tensor:
    """The frame's single host-to-device copy.

    ``frame``: HxW (grayscale) or HxWx3 (RGB) as a numpy array or torch tensor, uint8 or any real
    dtype. Returns an HxW uint8 tensor on ``device``; an RGB frame is converted to luminance (ITU-R
    BT.601) on the device, or kept as HxWx3 uint8 with ``keep_colour`` (for 3-channel models). On CUDA
    the host buffer is pinned and the copy is non-blocking; a tensor already on ``device`` is not copied.
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
    if tensor.ndim == 3 and not keep_colour:
        rgb = tensor.to(torch.float32)
        tensor = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    if tensor.dtype != torch.uint8:
        tensor = tensor.to(torch.float32).round().clamp_(0, 255).to(torch.uint8)
    return tensor


def compute_mask_weights(
    mask_probs: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pixel target weights on the device.

    ``mask_probs`` KxHxW (0..1), ``scores`` K, ``valid`` K bool, all on one device.
    Returns (weights KxHxW = prob x score, zero for invalid targets; centroids Kx2 as (x, y) pixels,
    the weight-averaged pixel position; areas K = soft pixel count sum(prob)). A target with no
    weight gets its centroid at NaN. No host sync.
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
    return weights, centroids, areas


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


class Pipeline:
    """The per-frame orchestrator. Heavy resources are made once; ``process_frame`` does one frame.

    >>> pipeline = Pipeline.from_paths("Resources/Models/detector", "Resources/Models/sam/sam.safetensors")
    >>> packet = pipeline.process_frame(frame)      # device tensors
    >>> result = packet.to_host()                    # the single device-to-host hop
    """

    def __init__(
        self,
        detector: Any,
        segmenter: Any,
        config: PipelineConfig | None = None,
        kpi_sink: KpiSink | None = None,
        tracker: Any | None = None,
    ) -> None:
        self.config = config or PipelineConfig()
        self.device = resolve_device(self.config.device)
        self.detector = detector
        self.segmenter = segmenter
        self.kpi_sink = kpi_sink
        self.class_names: tuple[str, ...] = tuple(detector.class_names)
        #: colour frames stay colour for a 3-channel detector (SAM is RGB); grey models get luminance
        self._colour = int(getattr(detector, "num_channels", 1)) == 3
        queries = getattr(detector, "num_queries", None)
        if queries is not None and int(self.config.max_prompts) > int(queries):
            raise SettingsError(
                f"max_prompts {self.config.max_prompts} is more than the detector's {queries} queries "
                f"(it never returns more detections): use at most {queries}"
            )
        if tracker is None and self.config.track:
            from UltramotionIGTLib.core.tracking import Tracker

            tracker = Tracker(device=self.device)
        self.tracker = tracker
        self.latency = LatencyStats()
        self._frame_counter = 0
        if self.config.sam_as_numpy:
            LOG.warning("SAM running in legacy CPU mode (sam_as_numpy=True): masks hop to the host per box")
        if not self.config.gpu_resident:
            LOG.warning(
                "detector running in legacy mode (gpu_resident=False): frame and boxes hop to the host"
            )

    @classmethod
    def from_paths(
        cls,
        detector_dir: str | Path,
        sam_checkpoint: str | Path,
        sam_type: str = "auto",
        config: PipelineConfig | None = None,
        kpi_sink: KpiSink | None = None,
    ) -> Pipeline:
        """Load both models (clear errors for missing/corrupt checkpoints) and build the pipeline."""
        from UltramotionIGTLib.core.detector import DFineDetector
        from UltramotionIGTLib.core.sam import SamSegmenter

        config = config or PipelineConfig()
        device = resolve_device(config.device)
        detector = DFineDetector.from_pretrained(detector_dir, device=device)
        segmenter = SamSegmenter.from_checkpoint(sam_checkpoint, model_type=sam_type, device=device)
        return cls(detector, segmenter, config, kpi_sink=kpi_sink)

    def reset(self) -> None:
        """Forget tracks and counters (a new sequence starts)."""
        if self.tracker is not None:
            self.tracker.reset()
        self.latency = LatencyStats()
        self._frame_counter = 0

    # -- per frame ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def process_frame(
        self, frame: Any, frame_index: int | None = None, timestamp: float | None = None
    ) -> ResultPacket:
        """Run one frame (HxW or HxWx3, numpy or tensor) through the pipeline -> ResultPacket on the device."""
        if frame_index is None:
            frame_index = self._frame_counter
        self._frame_counter = frame_index + 1
        timer = StageTimer(self.device)
        cfg = self.config
        with timer.stage("prepare"):
            image = prepare_inference_inputs(frame, self.device, keep_colour=self._colour)
        h, w = int(image.shape[0]), int(image.shape[1])
        # the models see the imaging region only (a view); outputs are put back into frame pixels
        region = ImagingRegion(*cfg.imaging_region).clipped(h, w) if cfg.imaging_region else None
        view = region.crop(image) if region is not None else image
        with timer.stage("detector"):
            detections = self.detector.run_inference_torch(view, gpu_resident=cfg.gpu_resident)
        if cfg.legacy:
            boxes, scores, labels, valid, masks, probs = self._legacy_select_and_segment(
                view, detections, timer
            )
            if region is not None:
                boxes = region.offset_boxes(boxes)
                masks = region.paste_masks(masks, h, w)
                pads = (
                    (0, 0),
                    (region.y, h - region.y - region.height),
                    (region.x, w - region.x - region.width),
                )
                probs = np.pad(probs, pads)
        else:
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
                self.segmenter.set_torch_image(view)
            with timer.stage("sam_decoder"):
                sam = self.segmenter.predict_boxes(boxes, as_numpy=False)
                masks = sam.masks & valid[:, None, None]
                probs = sam.mask_probs
                if region is not None:
                    boxes = region.offset_boxes(boxes)
                    masks = region.paste_masks(masks, h, w)
                    probs = region.paste_masks(probs, h, w)
        with timer.stage("weights"):
            if cfg.legacy:
                centroids, areas = self._legacy_weights(probs, scores, valid)
            else:
                _, centroids, areas = compute_mask_weights(probs, scores, valid)
        with timer.stage("track"):
            if self.tracker is not None:
                track_ids = self.tracker.update(boxes, scores, labels, valid)
            else:
                track_ids = torch.full_like(labels, -1)
        devices = {
            "frame": str(image.device),
            "boxes": str(boxes.device),
            "masks": str(masks.device),
            "weights": str(centroids.device),
        }
        return ResultPacket(
            frame_index=frame_index,
            image_size=(h, w),
            boxes=boxes,
            scores=scores,
            labels=labels,
            valid=valid,
            masks=masks,
            centroids=centroids,
            areas=areas,
            track_ids=track_ids,
            class_names=self.class_names,
            timestamp=timestamp,
            timer=timer,
            extra={"devices": devices},
        )

    def _legacy_select_and_segment(self, image: torch.Tensor, detections: Any, timer: StageTimer):
        """The old habits: threshold on the host, one SAM call per box returning numpy."""
        cfg = self.config
        k = cfg.max_prompts
        cap = cfg.max_targets_per_class
        with timer.stage("select"):
            det_boxes = detections.boxes.detach().cpu().numpy()
            det_scores = detections.scores.detach().cpu().numpy()
            det_labels = detections.labels.detach().cpu().numpy()
            det_iou = box_iou_np(det_boxes, det_boxes)
            chosen: list[int] = []
            for c in range(len(self.class_names)):
                idx = [
                    i
                    for i in np.argsort(-det_scores)
                    if det_labels[i] == c and det_scores[i] > cfg.score_threshold
                ]
                kept: list[int] = []
                for i in idx:
                    if cap is not None and len(kept) >= cap:
                        break
                    if all(det_iou[i, j] <= cfg.nms_iou for j in kept):
                        kept.append(i)
                chosen.extend(kept)
            chosen = sorted(chosen, key=lambda i: -det_scores[i])[:k]
        h, w = int(image.shape[0]), int(image.shape[1])
        boxes = np.zeros((k, 4), np.float32)
        scores = np.zeros(k, np.float32)
        labels = np.zeros(k, np.int64)
        valid = np.zeros(k, bool)
        masks = np.zeros((k, h, w), bool)
        probs = np.zeros((k, h, w), np.float32)
        with timer.stage("sam_encoder"):
            self.segmenter.set_torch_image(image)
        with timer.stage("sam_decoder"):
            for row, i in enumerate(chosen):
                x1, y1, x2, y2 = (float(v) for v in det_boxes[i].tolist())
                box = torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32, device=self.device)
                out = self.segmenter.predict_boxes(box, as_numpy=True)
                boxes[row], scores[row], labels[row], valid[row] = (
                    det_boxes[i],
                    det_scores[i],
                    det_labels[i],
                    True,
                )
                masks[row], probs[row] = out.masks[0], out.mask_probs[0]
        to_dev = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        return to_dev(boxes), to_dev(scores), to_dev(labels), to_dev(valid), to_dev(masks), probs

    def _legacy_weights(self, probs: np.ndarray, scores: torch.Tensor, valid: torch.Tensor):
        s = scores.cpu().numpy()
        v = valid.cpu().numpy()
        k, h, w = probs.shape
        centroids = np.full((k, 2), np.nan, np.float32)
        areas = np.zeros(k, np.float32)
        ys, xs = np.mgrid[0:h, 0:w]
        for i in range(k):
            if not v[i]:
                continue
            wts = probs[i] * s[i]
            total = wts.sum()
            if total > 0:
                centroids[i] = ((wts * xs).sum() / total, (wts * ys).sum() / total)
            areas[i] = probs[i].sum()
        return torch.from_numpy(centroids).to(self.device), torch.from_numpy(areas).to(self.device)

    # -- loops and KPIs ----------------------------------------------------------------------------
    def frame_kpi(self, packet: ResultPacket, result: HostResult, **extra: Any) -> dict[str, Any]:
        """The KPI record of one frame (after its host copy, when stage times are readable)."""
        record: dict[str, Any] = {
            "event": "frame",
            "frame": result.frame_index,
            "device": str(self.device),
            "path": "legacy" if self.config.legacy else "gpu_resident",
            "targets": len(result),
            "stage_ms": result.stage_ms,
            "total_ms": float(sum(result.stage_ms.values())),
            "tensor_devices": packet.extra.get("devices", {}),
        }
        record.update(extra)
        return record

    def run(
        self,
        frames: Iterable[Any],
        timestamps: Iterable[float | None] | None = None,
        audit: Any | None = None,
        **kpi_extra: Any,
    ) -> Iterator[HostResult]:
        """Process frames in order, yielding host results and logging one KPI record per frame.

        ``audit``: an active `audit.runtime.RuntimeTransferAudit`; each frame (process + host copy) is
        counted as one audit frame and its ``host_syncs`` / ``declared_hops`` go into the KPI record.
        """
        ts_iter = iter(timestamps) if timestamps is not None else None
        for index, frame in enumerate(frames):
            ts = next(ts_iter, None) if ts_iter is not None else None
            t0 = time.perf_counter()
            with audit.frame(index) if audit is not None else nullcontext():
                packet = self.process_frame(frame, index, ts)
                result = packet.to_host()
            wall_ms = (time.perf_counter() - t0) * 1000.0
            sync_kpi = audit.last_frame.kpi() if audit is not None else {}
            self.latency.add({**result.stage_ms, "end_to_end": wall_ms})
            if self.kpi_sink is not None:
                record = self.frame_kpi(packet, result, wall_ms=wall_ms, **sync_kpi, **kpi_extra)
                safe_log_kpi(format_kpi(record), self.kpi_sink)
            yield result

    def describe(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "config": asdict(self.config),
            "class_names": list(self.class_names),
        }
