"""Generic box operations on torch tensors (no host syncs; any leading batch dimensions).

Formats: ``xyxy`` is (x0, y0, x1, y1); ``cxcywh`` is (centre x, centre y, width, height). Units are
whatever the caller uses (pixels or normalised 0..1); every function returns tensors on the input's
device and dtype.
"""

from __future__ import annotations

import torch


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """...x4 CXCYWH -> ...x4 XYXY, same device and dtype."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """...x4 XYXY -> ... areas (negative extents count as zero)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _inter_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    area_a = box_area(a)
    area_b = box_area(b)
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return inter, union


def box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Pairwise IoU: ...xNx4 and ...xMx4 XYXY -> ...xNxM, on the inputs' device.

    Two empty boxes have IoU 0 (not NaN): the union is clamped to ``max(union, eps)`` with a tiny
    positive floor when ``eps`` is 0.
    """
    inter, union = _inter_union(a, b)
    floor = eps if eps > 0 else torch.finfo(inter.dtype).tiny
    return inter / union.clamp(min=floor)


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise generalised IoU (Rezatofighi et al. 2019): ...xNx4, ...xMx4 XYXY -> ...xNxM in [-1, 1].

    Same definition as DETR's / transformers' ``generalized_box_iou``; degenerate boxes (x1 < x0)
    are not rejected here (that check would need a host sync) and give meaningless values.
    """
    inter, union = _inter_union(a, b)
    iou = inter / union
    lt = torch.minimum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.maximum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull
