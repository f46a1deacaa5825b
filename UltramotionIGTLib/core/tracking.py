"""Device-resident multi-target tracker: detections -> stable target ids, with no host sync per frame.

Every frame, `Tracker.update` associates the frame's detections with the tracks it holds by an
exact linear assignment (`UltramotionIGTLib.core.assignment.batched_linear_sum_assignment`) on the cost
``1 - IoU``, where pairs of different classes or with IoU below ``iou_gate`` are forbidden and a
detection may stay unmatched (dummy column, cost 1 -- so the assignment maximises the summed IoU of
the matched pairs). Then, all with masks on fixed-size state tensors (``max_tracks`` slots):

* matched tracks take the detection's box, count a hit and clear their misses;
* births: an unmatched valid detection opens a *tentative* track in a free slot (higher score
  first); a tentative track becomes *confirmed*, and gets the next id, after ``min_hits``
  consecutive matches; a tentative track that misses a frame is dropped (hysteresis);
* deaths: a confirmed track missed in ``max_misses`` consecutive frames is deleted;
* ids come from a device counter and are never reused (until `Tracker.reset`).

No ``.item()``, ``.cpu()``, ``bool(tensor)``, ``torch.nonzero`` or boolean-mask indexing runs in
`update`; its work is fixed by K (detections per frame) and ``max_tracks``.
"""

from __future__ import annotations

import torch

from UltramotionIGTLib.core.assignment import batched_linear_sum_assignment
from UltramotionIGTLib.core.boxes import box_iou
from UltramotionIGTLib.core.device import resolve_device

__all__ = ["Tracker"]


class Tracker:
    """Fixed-capacity IoU + class tracker living on one device.

    Args:
        max_tracks: number of track slots M (tentative + confirmed). Detections that would open a
            track when all slots are taken are left untracked.
        iou_gate: pairs with IoU below this are never associated.
        min_hits: consecutive matched frames (the first detection included) before a track is
            confirmed and gets an id.
        max_misses: consecutive unmatched frames after which a confirmed track is deleted.
        device: ``"auto" | "cpu" | "cuda[:N]"`` or a torch.device (see `resolve_device`).
        cuda_graph: on CUDA, capture `update` once as a CUDA graph and replay it every frame (one
            launch instead of ~1000 small kernels of the fixed-iteration assignment; same results).
            None (default): on for CUDA devices. Ignored on CPU.

    State (fixed size, on ``device``): ``boxes`` Mx4 XYXY float32 (last matched box per slot),
    ``labels`` M int64, ``alive`` M bool (slot holds a tentative or confirmed track), ``hits`` /
    ``misses`` M int64 (consecutive matched / missed frames), ``ids`` M int64 (-1 while tentative
    or empty), ``next_id`` 0-d int64.

    After each `update`: ``det_slot`` K int64 (the slot each detection was matched to or born in, M
    when none) and ``born`` M bool (slots that opened a new track this frame), for per-track state
    kept elsewhere (`UltramotionIGTLib.core.visibility.VisibilityMonitor`).
    """

    def __init__(
        self,
        max_tracks: int = 32,
        iou_gate: float = 0.1,
        min_hits: int = 2,
        max_misses: int = 5,
        device: str | torch.device | None = "auto",
        cuda_graph: bool | None = None,
    ) -> None:
        if max_tracks < 1:
            raise ValueError(f"Tracker: max_tracks must be >= 1, got {max_tracks}")
        if min_hits < 1 or max_misses < 1:
            raise ValueError(f"Tracker: min_hits and max_misses must be >= 1, got {min_hits}, {max_misses}")
        if not 0.0 <= iou_gate <= 1.0:
            raise ValueError(f"Tracker: iou_gate must be within [0, 1], got {iou_gate}")
        self.max_tracks = int(max_tracks)
        self.iou_gate = float(iou_gate)
        self.min_hits = int(min_hits)
        self.max_misses = int(max_misses)
        self.device = resolve_device(device)
        #: replay the whole update as one CUDA graph (CUDA only): one launch per frame instead of
        #: ~1000 small kernels; captured on the first update (and again if K changes)
        self.cuda_graph = (cuda_graph is None or bool(cuda_graph)) and self.device.type == "cuda"
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_inputs: tuple[torch.Tensor, ...] = ()
        self._graph_out: tuple[torch.Tensor, ...] = ()
        self.reset()

    _STATE = ("boxes", "labels", "alive", "hits", "misses", "ids", "next_id")

    def _state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._STATE}

    def reset(self) -> None:
        """Forget every track; ids restart at 0 (in place: a captured CUDA graph stays valid)."""
        self.det_slot = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.born = torch.zeros(self.max_tracks, dtype=torch.bool, device=self.device)
        if self._graph is not None:
            fresh = self._fresh_state()
            for name, tensor in self._state().items():
                tensor.copy_(fresh[name])
            return
        for name, tensor in self._fresh_state().items():
            setattr(self, name, tensor)

    def _fresh_state(self) -> dict[str, torch.Tensor]:
        M, dev = self.max_tracks, self.device
        return {
            "boxes": torch.zeros(M, 4, dtype=torch.float32, device=dev),
            "labels": torch.zeros(M, dtype=torch.int64, device=dev),
            "alive": torch.zeros(M, dtype=torch.bool, device=dev),
            "hits": torch.zeros(M, dtype=torch.int64, device=dev),
            "misses": torch.zeros(M, dtype=torch.int64, device=dev),
            "ids": torch.full((M,), -1, dtype=torch.int64, device=dev),
            "next_id": torch.zeros((), dtype=torch.int64, device=dev),
        }

    def _cost(self, boxes: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(K + M) problem: detections x (tracks | one dummy per detection), or its transpose when M < K."""
        M, K = self.max_tracks, boxes.shape[0]
        inf = float("inf")
        iou = box_iou(boxes.to(torch.float32), self.boxes)  # K x M
        allowed = (
            valid[:, None]
            & self.alive[None, :]
            & (labels[:, None] == self.labels[None, :])
            & (iou >= self.iou_gate)
            & (iou > 0)
        )
        match = torch.where(allowed, 1.0 - iou, inf).to(torch.float64)
        if K <= M:  # rows = detections: each may take its own dummy column at cost 1
            dummy = torch.full((K, K), inf, dtype=torch.float64, device=self.device)
            dummy.diagonal().fill_(1.0)
            return torch.cat((match, dummy), dim=1)  # K x (M + K)
        dummy = torch.full((M, M), inf, dtype=torch.float64, device=self.device)
        dummy.diagonal().fill_(1.0)
        return torch.cat((match.T, dummy), dim=1)  # M x (K + M): rows = tracks

    def update(
        self, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Associate one frame's detections; returns K int64 track ids on the tracker's device.

        boxes Kx4 XYXY (any consistent unit, e.g. pixels), scores K, labels K (int class), valid K
        bool (False = ignore this row); all on the tracker's device. The id is -1 for invalid
        detections and for those whose track is not (yet) confirmed. No host sync.
        """
        if not self.cuda_graph or boxes.shape[0] == 0:
            # once a graph is captured, its state buffers must be updated in place, never rebound
            ids, self.det_slot, self.born = self._advance(
                boxes, scores, labels, valid, into=self._state() if self._graph is not None else None
            )
            return ids
        if self._graph is None or self._graph_inputs[0].shape[0] != boxes.shape[0]:
            self._capture(boxes.shape[0])
        for static, given in zip(self._graph_inputs, (boxes, scores, labels, valid), strict=True):
            static.copy_(given)
        self._graph.replay()
        ids, self.det_slot, self.born = (t.clone() for t in self._graph_out)
        return ids

    def _capture(self, k: int) -> None:
        """Record `_advance` for K = k detections as a CUDA graph (state updated in place)."""
        dev = self.device
        self._graph_inputs = (
            torch.zeros(k, 4, dtype=torch.float32, device=dev),
            torch.zeros(k, dtype=torch.float32, device=dev),
            torch.zeros(k, dtype=torch.int64, device=dev),
            torch.zeros(k, dtype=torch.bool, device=dev),
        )
        persistent = self._state()
        saved = {name: t.clone() for name, t in persistent.items()}
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up outside the graph, as torch.cuda.graphs asks
            for _ in range(2):
                self._advance(*self._graph_inputs, into=persistent)
        torch.cuda.current_stream(dev).wait_stream(side)
        for name, t in persistent.items():
            t.copy_(saved[name])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._graph_out = self._advance(*self._graph_inputs, into=persistent)
        self._graph = graph

    def _advance(
        self,
        boxes: torch.Tensor,
        scores: torch.Tensor,
        labels: torch.Tensor,
        valid: torch.Tensor,
        into: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The update itself: (ids K, det_slot K, born M). ``into``: state buffers to write back in
        place (graph mode)."""
        M, K, dev = self.max_tracks, boxes.shape[0], self.device
        valid = valid.to(torch.bool)
        labels = labels.to(torch.int64)
        ar_m = torch.arange(M, device=dev)
        ar_k = torch.arange(K, device=dev)

        # --- association: exact assignment, sync-free -------------------------------------------
        if K == 0:
            det_track = torch.zeros(0, dtype=torch.int64, device=dev)
        else:
            res = batched_linear_sum_assignment(self._cost(boxes, labels, valid)[None])
            cols = res.cols[0]  # every row is assigned (the dummies make it feasible), rows = arange
            if K <= M:
                det_track = torch.where((cols >= 0) & (cols < M), cols, -1)  # K
            else:
                track_det = torch.where((cols >= 0) & (cols < K), cols, -1)  # M
                det_track = torch.full((K + 1,), -1, dtype=torch.int64, device=dev).scatter(
                    0, torch.where(track_det >= 0, track_det, K), ar_m
                )[:K]
        matched_det = det_track >= 0
        slot_idx = torch.where(matched_det, det_track, M)  # M = dummy slot
        track_det = torch.full((M + 1,), -1, dtype=torch.int64, device=dev).scatter(0, slot_idx, ar_k)[:M]
        matched = track_det >= 0

        # --- matched tracks ------------------------------------------------------------------------
        src = track_det.clamp(min=0)
        self.boxes = torch.where(
            matched[:, None], boxes.to(torch.float32)[src] if K else self.boxes, self.boxes
        )
        self.hits = torch.where(matched, self.hits + 1, 0)
        self.misses = torch.where(matched, 0, self.misses + 1)
        # --- deaths: a tentative track that misses, a confirmed one after max_misses misses -------
        keep = matched | ((self.ids >= 0) & (self.misses < self.max_misses))
        self.alive = self.alive & keep
        self.ids = torch.where(self.alive, self.ids, -1)

        # --- births: unmatched valid detections, higher score first, into free slots ---------------
        newborn = valid & ~matched_det
        s = scores.to(torch.float32)
        ahead = (s[None, :] > s[:, None]) | ((s[None, :] == s[:, None]) & (ar_k[None, :] < ar_k[:, None]))
        det_rank = (newborn[None, :] & ahead).sum(dim=1)  # K: newborns ahead of this one
        free = ~self.alive
        slot_rank = torch.cumsum(free.to(torch.int64), 0) - 1
        slot_by_rank = torch.full((M + 1,), M, dtype=torch.int64, device=dev).scatter(
            0, torch.where(free, slot_rank, M), ar_m
        )
        birth_slot = torch.where(newborn, slot_by_rank[det_rank.clamp(max=M)], M)  # K, M = no slot
        born = torch.zeros(M + 1, dtype=torch.bool, device=dev).scatter(0, birth_slot, True)[:M]
        born_det = torch.zeros(M + 1, dtype=torch.int64, device=dev).scatter(0, birth_slot, ar_k)[:M]
        if K:
            self.boxes = torch.where(born[:, None], boxes.to(torch.float32)[born_det], self.boxes)
            self.labels = torch.where(born, labels[born_det], self.labels)
        self.alive = self.alive | born
        self.hits = torch.where(born, 1, self.hits)
        self.misses = torch.where(born, 0, self.misses)
        self.ids = torch.where(born, -1, self.ids)

        # --- confirmation: ids from the device counter, never reused --------------------------------
        promote = self.alive & (self.ids < 0) & (self.hits >= self.min_hits)
        order = torch.cumsum(promote.to(torch.int64), 0) - 1
        self.ids = torch.where(promote, self.next_id + order, self.ids)
        self.next_id = self.next_id + promote.sum()

        # --- per-detection ids ----------------------------------------------------------------------
        det_slot = torch.where(matched_det, det_track, birth_slot)  # M: none
        ids_ext = torch.cat((self.ids, torch.full((1,), -1, dtype=torch.int64, device=dev)))
        out = torch.where(valid, ids_ext[det_slot], -1)
        if into is not None:  # graph mode: the captured kernels must write the same buffers each replay
            for name, buffer in into.items():
                buffer.copy_(getattr(self, name))
                setattr(self, name, buffer)
        return out, det_slot, born
