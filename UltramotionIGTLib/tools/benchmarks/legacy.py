"""The in-house pipeline's habits, kept to measure against: ``gpu_resident=False`` / ``sam_as_numpy=True``.

The pipeline this project replaces moved data to the host between stages: the frame went to the host
for numpy preprocessing and came back, D-FINE's outputs were post-processed in numpy, prompts were
thresholded in Python loops, SAM was called once per box returning numpy (``as_numpy=True``), and the
mask weights were computed on the CPU. `LegacyPipeline` reproduces those habits on the same models,
with the seed's switch names, so that ``bench pipeline``, ``audit --runtime --compare`` and ``run
--legacy`` can put numbers side by side. It is not part of the product's per-frame path (`core/`),
and the Slicer module does not offer it.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np
import torch

from UltramotionIGTLib.core.detector import Detections, DFineDetector
from UltramotionIGTLib.core.kpi import StageTimer
from UltramotionIGTLib.core.pipeline import Pipeline, PipelineConfig
from UltramotionIGTLib.errors import SettingsError
from UltramotionIGTLib.tools.metrics import box_iou_np

LOG = logging.getLogger(__name__)


def run_inference_legacy(
    detector: DFineDetector, frame: Any, num_top: int | None = None, batched: bool = False
) -> Detections:
    """The in-house ``run_inference_torch(frame, gpu_resident=False)``: host copy, numpy preprocessing,
    model, numpy post-processing, copy back. Same inputs and results as
    `DFineDetector.run_inference_torch` (``batched``: as `DFineDetector.run_inference_batch`), to
    float32 rounding."""
    batch = detector._as_batch(frame, batched=batched)
    k = detector.num_top(num_top)
    prep = detector.preprocessing
    if prep.fit_size is not None:
        raise SettingsError("the legacy detector path stretches frames only: it has no letterbox")
    device = detector.device
    frames = batch.detach().to("cpu").numpy().astype(np.float32)  # BxCxHxW on the host
    image_h, image_w = frames.shape[-2:]
    inputs = []
    for one in frames:
        x = _resize_bilinear_numpy(one, prep.input_size) if (image_h, image_w) != prep.input_size else one
        if prep.do_rescale:
            x = x * np.float32(prep.rescale_factor)
        if x.shape[0] == 1:
            x = np.repeat(x, 3, axis=0)
        if prep.do_normalize:
            mean = np.asarray(prep.image_mean, dtype=np.float32)[:, None, None]
            std = np.asarray(prep.image_std, dtype=np.float32)[:, None, None]
            x = (x - mean) * (np.float32(1.0) / std)
        inputs.append(x)
    pixel_values = torch.from_numpy(np.stack(inputs)).to(device)
    if detector._channels_last:
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
    logits_t, boxes_t = detector.forward(pixel_values)
    logits = logits_t.float().cpu().numpy()
    pred_boxes = boxes_t.float().cpu().numpy()
    boxes, scores, labels = _postprocess_numpy(logits, pred_boxes, (image_h, image_w), k)
    pick = slice(None) if batched else 0
    return Detections(
        boxes=torch.from_numpy(boxes[pick]).to(device),
        scores=torch.from_numpy(scores[pick]).to(device),
        labels=torch.from_numpy(labels[pick]).to(device),
    )


def _resize_bilinear_numpy(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """CxHxW float32 -> Cxhxw; the arithmetic of torch's bilinear, align_corners=False, no antialias."""

    def axis(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scale = np.float32(in_size / out_size)
        src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
        src = np.maximum(src, np.float32(0.0))
        i0 = np.minimum(src.astype(np.int64), in_size - 1)
        i1 = np.minimum(i0 + 1, in_size - 1)
        lam = (src - i0.astype(np.float32)).astype(np.float32)
        return i0, i1, lam

    out_h, out_w = size
    y0, y1, ly = axis(image.shape[-2], out_h)
    x0, x1, lx = axis(image.shape[-1], out_w)
    ly = ly[:, None]
    one = np.float32(1.0)
    top = image[:, y0, :]
    bottom = image[:, y1, :]
    rows = (one - ly) * top + ly * bottom  # C x out_h x W
    return ((one - lx) * rows[:, :, x0] + lx * rows[:, :, x1]).astype(np.float32)


def _postprocess_numpy(
    logits: np.ndarray, pred_boxes: np.ndarray, image_size: tuple[int, int], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Numpy twin of `postprocess_detections` (the old pipeline's host post-processing)."""
    num_classes = logits.shape[-1]
    scores = (1.0 / (1.0 + np.exp(-logits.astype(np.float32)))).astype(np.float32)
    flat = scores.reshape(scores.shape[0], -1)
    index = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    top_scores = np.take_along_axis(flat, index, axis=1)
    labels = (index % num_classes).astype(np.int64)
    query = index // num_classes
    boxes = np.take_along_axis(pred_boxes.astype(np.float32), query[..., None], axis=1)
    cx, cy, w, h = (boxes[..., i] for i in range(4))
    height, width = np.float32(image_size[0]), np.float32(image_size[1])
    half = np.float32(0.5)
    xyxy = np.stack(
        [
            (cx - half * w) * width,
            (cy - half * h) * height,
            (cx + half * w) * width,
            (cy + half * h) * height,
        ],
        axis=-1,
    ).astype(np.float32)
    return xyxy, top_scores.astype(np.float32), labels


class HostWeights(NamedTuple):
    """The legacy path's mask weights: K x 2 centroids and K areas, computed with numpy."""

    centroids: torch.Tensor
    areas: torch.Tensor


class LegacyPipeline(Pipeline):
    """`Pipeline` with the in-house habits, switched by the seed's names.

    ``gpu_resident=False``: the detector runs `run_inference_legacy` (host round trip).
    ``sam_as_numpy=True``: prompts are chosen on the host, SAM is called once per box with numpy
    outputs and the mask weights are computed with numpy. Either one makes the KPI path ``"legacy"``.
    Both default to the in-house configuration; using them logs a warning, as the seed did.
    """

    path = "legacy"

    def __init__(
        self,
        detector: Any,
        segmenter: Any,
        config: PipelineConfig | None = None,
        tracker: Any | None = None,
        *,
        gpu_resident: bool = False,
        sam_as_numpy: bool = True,
    ) -> None:
        super().__init__(detector, segmenter, config, tracker)
        self.gpu_resident = bool(gpu_resident)
        self.sam_as_numpy = bool(sam_as_numpy)
        if self.sam_as_numpy:
            LOG.warning("SAM running in legacy CPU mode (sam_as_numpy=True): masks hop to the host per box")
        if not self.gpu_resident:
            LOG.warning(
                "detector running in legacy mode (gpu_resident=False): frame and boxes hop to the host"
            )

    def _detect(self, image: torch.Tensor) -> Detections:
        if self.gpu_resident:
            return super()._detect(image)
        return run_inference_legacy(self.detector, image)

    def _select_and_segment(self, image: torch.Tensor, detections: Detections, timer: StageTimer) -> tuple:
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
            # one budget over all classes: the best K of every class's survivors
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

    def _mask_weights(
        self, probs: Any, scores: torch.Tensor, valid: torch.Tensor, spacing: Any = None, stride: int = 1
    ) -> HostWeights:
        """Weighted centroids and areas with numpy, one target at a time (the seed's CPU version). The
        visibility stage then makes its weight maps on the device from these masks."""
        if torch.is_tensor(probs):
            probs = probs.cpu().numpy()
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
        return HostWeights(
            torch.from_numpy(centroids).to(self.device), torch.from_numpy(areas).to(self.device)
        )


def build_pipeline(detector: Any, segmenter: Any, config: PipelineConfig, legacy: bool = False) -> Pipeline:
    """The resident `Pipeline`, or with ``legacy`` the in-house habits (``gpu_resident=False,
    sam_as_numpy=True``) on the same models: the one switch the tools use."""
    if legacy:
        return LegacyPipeline(detector, segmenter, config, gpu_resident=False, sam_as_numpy=True)
    return Pipeline(detector, segmenter, config)
