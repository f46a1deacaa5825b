"""Evaluation metrics on the host (numpy): detection AP at an IoU threshold, Dice."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of Nx4 and Mx4 XYXY boxes -> NxM (numpy)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def average_precision(
    predictions: Sequence[tuple[np.ndarray, np.ndarray]],
    ground_truth: Sequence[np.ndarray],
    iou_threshold: float = 0.5,
) -> float:
    """AP of one class over many images (all-point interpolated precision-recall area, as VOC 2010+).

    ``predictions[i]`` = (boxes Px4 XYXY, scores P) of image i; ``ground_truth[i]`` = boxes Gx4.
    Each ground-truth box can be matched once, greedily by descending score. With no ground truth
    at all, AP is 1.0 if there are no predictions either, else 0.0.
    """
    if len(predictions) != len(ground_truth):
        raise ValueError("predictions and ground_truth must have one entry per image")
    n_gt = sum(len(g) for g in ground_truth)
    records: list[tuple[float, int, int]] = []  # (score, image, box index)
    for img, (_, scores) in enumerate(predictions):
        records += [(float(s), img, j) for j, s in enumerate(np.asarray(scores).reshape(-1))]
    if n_gt == 0:
        return 1.0 if not records else 0.0
    records.sort(key=lambda r: -r[0])
    used = [np.zeros(len(g), bool) for g in ground_truth]
    tp = np.zeros(len(records))
    for r, (_, img, j) in enumerate(records):
        gt = np.asarray(ground_truth[img]).reshape(-1, 4)
        if len(gt) == 0:
            continue
        ious = box_iou_np(np.asarray(predictions[img][0]).reshape(-1, 4)[j], gt)[0]
        ious[used[img]] = -1.0
        best = int(np.argmax(ious))
        if ious[best] >= iou_threshold:
            used[img][best] = True
            tp[r] = 1.0
    cum_tp = np.cumsum(tp)
    recall = cum_tp / n_gt
    precision = cum_tp / np.arange(1, len(records) + 1)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    pred = np.asarray(pred, bool)
    gt = np.asarray(gt, bool)
    denom = int(pred.sum()) + int(gt.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(pred, gt).sum()) / denom
