"""`HungarianMatcher(use_gpu_match=...)`: the DETR / RT-DETR / D-FINE training matcher (predictions <->
ground truth) on the sync-free solver of `UltramotionIGTLib.core.assignment`, or scipy, and
`patched_transformers_matcher` to put it into transformers' D-FINE loss during training.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from UltramotionIGTLib.core.assignment import batched_linear_sum_assignment, scipy_linear_sum_assignment
from UltramotionIGTLib.core.boxes import box_cxcywh_to_xyxy, generalized_box_iou
from UltramotionIGTLib.core.hostsync import allowed_host_transfer

__all__ = ["HungarianMatcher", "patched_transformers_matcher"]


class HungarianMatcher(nn.Module):
    """DETR / RT-DETR / D-FINE bipartite matcher (predictions <-> ground truth), GPU solver or scipy.

    Cost = ``cost_class`` * class cost (focal-style when ``use_focal_loss``, else -softmax prob)
    + ``cost_bbox`` * L1 between CXCYWH boxes + ``cost_giou`` * (-GIoU), exactly as transformers'
    ``RTDetrHungarianMatcher`` computes it (NaN/inf costs replaced by the dtype's max).

    ``forward(outputs, targets)``: outputs ``{"logits": BxQxC, "pred_boxes": BxQx4 CXCYWH normalised}``,
    targets ``[{"class_labels": T_b int64, "boxes": T_b x 4 CXCYWH}]``. Returns B tuples
    ``(index_i, index_j)`` of int64 tensors with ``len(index_i) == len(index_j) == min(Q, T_b)``,
    index_i (prediction indices) ascending. With ``use_gpu_match=True`` the indices stay on the
    logits' device and no host sync happens (all images solved in one batched call); with False the
    cost matrix goes to the host and scipy solves it (indices come back on the logits' device).

    Swap-in for transformers' D-FINE / RT-DETR loss: ``criterion.matcher =
    HungarianMatcher.from_config(config)`` on a ``DFineLoss``/``RTDetrLoss``, or wrap the model's
    forward in `patched_transformers_matcher()` (the loss builds its matcher per call).
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        use_focal_loss: bool = True,
        alpha: float = 0.25,
        gamma: float = 2.0,
        use_gpu_match: bool = True,
    ) -> None:
        super().__init__()
        if cost_class == cost_bbox == cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0; set cost_class, cost_bbox or cost_giou")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.use_focal_loss = use_focal_loss
        self.alpha = alpha
        self.gamma = gamma
        self.use_gpu_match = use_gpu_match

    @classmethod
    def from_config(cls, config: Any, use_gpu_match: bool = True) -> HungarianMatcher:
        """Build from a transformers ``DFineConfig``/``RTDetrConfig`` (its ``matcher_*`` fields)."""
        return cls(
            cost_class=config.matcher_class_cost,
            cost_bbox=config.matcher_bbox_cost,
            cost_giou=config.matcher_giou_cost,
            use_focal_loss=config.use_focal_loss,
            alpha=config.matcher_alpha,
            gamma=config.matcher_gamma,
            use_gpu_match=use_gpu_match,
        )

    def cost_matrix(
        self, outputs: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> torch.Tensor:
        """Bx Q x sum(T_b) matching costs on the logits' device (column blocks per image, in order)."""
        bs, nq = outputs["logits"].shape[:2]
        logits = outputs["logits"].flatten(0, 1)
        out_bbox = outputs["pred_boxes"].flatten(0, 1)
        tgt_ids = torch.cat([t["class_labels"] for t in targets]).to(logits.device)
        tgt_bbox = torch.cat([t["boxes"] for t in targets]).to(out_bbox)
        if self.use_focal_loss:
            prob = logits.sigmoid()[:, tgt_ids]
            neg = (1 - self.alpha) * (prob**self.gamma) * (-(1 - prob + 1e-8).log())
            pos = self.alpha * ((1 - prob) ** self.gamma) * (-(prob + 1e-8).log())
            class_cost = pos - neg
        else:
            class_cost = -logits.softmax(-1)[:, tgt_ids]
        bbox_cost = torch.cdist(out_bbox, tgt_bbox, p=1)
        giou_cost = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))
        cost = self.cost_bbox * bbox_cost + self.cost_class * class_cost + self.cost_giou * giou_cost
        big = torch.finfo(cost.dtype).max
        cost = torch.nan_to_num(cost, nan=big, posinf=big, neginf=big)
        return cost.view(bs, nq, -1)

    @torch.no_grad()
    def forward(
        self, outputs: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image (index_i, index_j) int64, len == min(num_queries, num_targets); see the class doc."""
        bs, nq = outputs["logits"].shape[:2]
        dev = outputs["logits"].device
        sizes = [int(t["boxes"].shape[0]) for t in targets]  # shapes: host ints, no sync
        if len(sizes) != bs:
            raise ValueError(f"HungarianMatcher: {bs} images in outputs but {len(sizes)} target dicts")
        if sum(sizes) == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=dev)
            return [(empty, empty) for _ in range(bs)]
        cost = self.cost_matrix(outputs, targets)
        if not self.use_gpu_match:
            with allowed_host_transfer("HungarianMatcher(use_gpu_match=False) -> scipy", max_syncs=1):
                host = cost.detach().to("cpu", torch.float64)
            out = []
            for b, block in enumerate(host.split(sizes, -1)):
                i, j = scipy_linear_sum_assignment(block[b])
                out.append((i.to(dev), j.to(dev)))
            return out
        t_max = max(sizes)
        blocks = [F.pad(c, (0, t_max - c.shape[-1])) for c in cost.split(sizes, -1)]
        padded = torch.stack([blk[b] for b, blk in enumerate(blocks)])  # B x Q x Tmax
        res = batched_linear_sum_assignment(padded, valid_cols=sizes)
        return [(res.rows[b, : min(nq, t)], res.cols[b, : min(nq, t)]) for b, t in enumerate(sizes)]


@contextmanager
def patched_transformers_matcher(use_gpu_match: bool = True) -> Iterator[None]:
    """Make transformers' D-FINE and RT-DETR losses use `HungarianMatcher` inside this block.

    ``DFineForObjectDetectionLoss`` builds ``DFineLoss(config)`` (and its ``RTDetrHungarianMatcher``)
    at every call, so the class those modules look up is swapped for a factory of ours and restored
    on exit.
    """
    from transformers.loss import loss_d_fine, loss_rt_detr

    def factory(config: Any) -> HungarianMatcher:
        return HungarianMatcher.from_config(config, use_gpu_match=use_gpu_match)

    saved = (loss_d_fine.RTDetrHungarianMatcher, loss_rt_detr.RTDetrHungarianMatcher)
    loss_d_fine.RTDetrHungarianMatcher = factory
    loss_rt_detr.RTDetrHungarianMatcher = factory
    try:
        yield
    finally:
        loss_d_fine.RTDetrHungarianMatcher, loss_rt_detr.RTDetrHungarianMatcher = saved
