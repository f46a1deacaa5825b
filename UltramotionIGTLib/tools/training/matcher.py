"""`HungarianMatcher(use_gpu_match=...)`: the DETR / RT-DETR / D-FINE training matcher (predictions <->
ground truth) on the sync-free solver of `UltramotionIGTLib.core.assignment`, or scipy, and
`DFineCriterion`: transformers' D-FINE training loss with that matcher, for one training run.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from UltramotionIGTLib.core.assignment import batched_linear_sum_assignment, scipy_linear_sum_assignment
from UltramotionIGTLib.core.boxes import box_cxcywh_to_xyxy, generalized_box_iou
from UltramotionIGTLib.core.hostsync import allowed_host_transfer

__all__ = ["DFineCriterion", "HungarianMatcher"]


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
    HungarianMatcher.from_config(config)`` on a ``DFineLoss``/``RTDetrLoss`` (what `DFineCriterion` does).
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


class DFineCriterion:
    """transformers' D-FINE training loss (``DFineLoss``: VFL, L1, GIoU, FGL, DDF, with the auxiliary,
    encoder and denoising terms) computed with `HungarianMatcher` as its matcher.

    transformers' ``DFineForObjectDetection(labels=...)`` builds a new ``DFineLoss`` (and its scipy
    matcher, a module global of ``transformers.loss``) at every call, so the only way to give that
    path our matcher is to swap a module global for the whole process. Here the loss is built once,
    owns our matcher, and the training step calls the model without the loss::

        outputs = model.model(pixel_values, labels=labels)  # DFineModel: denoising queries from labels
        loss, terms = criterion(outputs, labels)

    which gives exactly what ``model(pixel_values, labels=labels).loss`` gives with our matcher (a
    test compares the terms). ``DFineLoss`` keeps per-call scratch values on itself, so one criterion
    belongs to one training run (one thread). config: the model's ``DFineConfig``; device: where the
    model runs.
    """

    def __init__(self, config: Any, device: torch.device | str, use_gpu_match: bool = True) -> None:
        from transformers.loss.loss_d_fine import DFineLoss

        self.config = config
        self.loss = DFineLoss(config).to(device)
        self.loss.matcher = HungarianMatcher.from_config(config, use_gpu_match=use_gpu_match)

    def __call__(
        self, outputs: Any, labels: list[dict[str, torch.Tensor]]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """outputs: a ``DFineModelOutput`` of ``model.model(pixel_values, labels=labels)``; labels: per
        image ``{"class_labels": T int64, "boxes": T x 4 cxcywh 0..1}``. Returns (the summed loss, the
        weighted terms by name), as ``DFineForObjectDetection`` reports ``loss`` and ``loss_dict``."""
        terms = self.loss(self.loss_inputs(outputs), labels)
        return sum(terms.values()), terms

    def loss_inputs(self, outputs: Any) -> dict[str, Any]:
        """The dict ``DFineLoss`` reads, from the decoder's per-layer outputs (B x layers x queries x ...).

        The matched queries' last layer gives ``logits`` / ``pred_boxes`` (clamped to 0..1). With
        ``config.auxiliary_loss``: every earlier layer (with the last layer's corners and logits as
        the distillation teacher) and the encoder's top-k proposals go to ``auxiliary_outputs``; in
        training the denoising queries (the first ``dn_num_split[0]`` queries) go, layer by layer
        with their own last layer as teacher, to ``dn_auxiliary_outputs``.
        """
        meta = outputs.denoising_meta_values  # None outside training
        split = meta["dn_num_split"] if meta is not None else None

        def matched_and_denoising(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            if split is None:
                return t, None
            dn, matched = torch.split(t, split, dim=dim)
            return matched, dn

        logits, _ = matched_and_denoising(outputs.intermediate_logits[:, -1], dim=1)
        boxes, _ = matched_and_denoising(outputs.intermediate_reference_points[:, -1], dim=1)
        inputs: dict[str, Any] = {"logits": logits, "pred_boxes": boxes.clamp(min=0, max=1)}
        if not self.config.auxiliary_loss:
            return inputs
        layer_boxes, dn_boxes = matched_and_denoising(
            outputs.intermediate_reference_points.clamp(min=0, max=1), 2
        )
        layer_logits, dn_logits = matched_and_denoising(outputs.intermediate_logits, 2)
        corners, dn_corners = matched_and_denoising(outputs.intermediate_predicted_corners, 2)
        refs, dn_refs = matched_and_denoising(outputs.initial_reference_points, 2)
        inputs["auxiliary_outputs"] = _per_layer(
            layer_logits[:, :-1],
            layer_boxes[:, :-1],
            corners[:, :-1],
            refs[:, :-1],
            corners[:, -1],
            layer_logits[:, -1],
        )
        inputs["auxiliary_outputs"].append(
            {"logits": outputs.enc_topk_logits, "pred_boxes": outputs.enc_topk_bboxes.clamp(min=0, max=1)}
        )
        if meta is not None:
            inputs["dn_auxiliary_outputs"] = _per_layer(
                dn_logits, dn_boxes, dn_corners, dn_refs, dn_corners[:, -1], dn_logits[:, -1]
            )
            inputs["denoising_meta_values"] = meta
        return inputs


def _per_layer(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    corners: torch.Tensor,
    refs: torch.Tensor,
    teacher_corners: torch.Tensor,
    teacher_logits: torch.Tensor,
) -> list[dict[str, torch.Tensor]]:
    """B x layers x ... tensors -> one ``DFineLoss`` output dict per layer, paired by position.

    The decoder reports one more logits/boxes entry than corners/reference points; pairing stops at the
    shorter, as transformers' D-FINE loss pairs them."""
    return [
        {
            "logits": logits[:, layer],
            "pred_boxes": boxes[:, layer],
            "pred_corners": corners[:, layer],
            "ref_points": refs[:, layer],
            "teacher_corners": teacher_corners,
            "teacher_logits": teacher_logits,
        }
        for layer in range(min(logits.shape[1], boxes.shape[1], corners.shape[1], refs.shape[1]))
    ]
