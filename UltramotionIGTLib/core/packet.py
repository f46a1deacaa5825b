"""ResultPacket: one frame's results as device tensors, and its host-side twin.

Everything in a `ResultPacket` stays on the device where it was computed. ``to_host()`` is the
pipeline's single intended device-to-host hop (declared to the transfer audit) and returns a
`HostResult` with numpy arrays, keeping only valid targets.

Visibility (`UltramotionIGTLib.core.visibility`): each target's state -- VISIBLE, RELOCALIZING or
LOST -- and scores travel with it; outputs hide LOST targets (`HostResult.shown`, the labelmaps) and
draw RELOCALIZING ones dimmed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from UltramotionIGTLib import CLASS_NAMES
from UltramotionIGTLib.core.hostsync import allowed_host_transfer

if TYPE_CHECKING:
    import torch

    from UltramotionIGTLib.core.kpi import StageTimer

#: Display colour (RGB 0..1) per class name; unknown classes get a grey.
CLASS_COLORS: dict[str, tuple[float, float, float]] = {
    "vessel": (0.90, 0.25, 0.25),
    "needle": (0.95, 0.85, 0.15),
    "bone": (0.30, 0.75, 0.95),
}
DEFAULT_COLOR = (0.6, 0.6, 0.6)

#: Visibility state codes and names (`UltramotionIGTLib.core.visibility.STATE_NAMES`), kept here too so
#: that host-side readers need no torch import.
STATE_NAMES: tuple[str, ...] = ("VISIBLE", "RELOCALIZING", "LOST")
VISIBLE, RELOCALIZING, LOST = 0, 1, 2
#: Columns of `HostResult.visibility` (`UltramotionIGTLib.core.visibility.SCORE_NAMES`).
SCORE_NAMES: tuple[str, ...] = (
    "S1_sharpness",
    "S2_snr",
    "S3_continuity",
    "S4_stability",
    "C1_geometry",
    "C2_coherence",
    "C3_motion",
    "quality",
    "consistency",
)


UNTRACKED = "untracked"


def segment_name(class_name: str, track_id: int) -> str:
    """The segment a target belongs to -- THE naming rule of every output (file, Slicer, gateway):

    - ``<class>-<id>`` (``vessel-3``): a tracked target; the id comes from the tracker, is never
      reused in a run, and the segment keeps its name, colour and label value for the whole run;
    - ``<class>-untracked`` (``vessel-untracked``): every detection of that class without a track id
      in a frame -- tentative ones (not yet confirmed by the tracker's ``min_hits`` frames) and, with
      tracking off (``--no-track``), all of them -- merged into ONE segment per class and frame.
    """
    return f"{class_name}-{int(track_id)}" if track_id >= 0 else f"{class_name}-{UNTRACKED}"


@dataclass
class ResultPacket:
    """One frame's pipeline output. All tensors live on ``device``; K is fixed per pipeline config.

    Shapes: boxes Kx4 (XYXY, pixels of the input frame, float32); scores K (float32); labels K
    (int64 class index); valid K (bool: selected as a prompt and kept); masks KxHxW (bool);
    centroids Kx2 (x, y pixels, weighted by mask probability and score); areas K (weighted pixel
    count); track_ids K (int64, -1 when untracked). ``path`` names the pipeline implementation
    (``"gpu_resident"``, or ``"legacy"`` for the benchmarks' in-house-habits path). ``intensity``:
    the stream's intensity window (`core.intensity.IntensityWindow.to_dict`). Visibility (None
    when the stage is off): states K (int64 `STATE_NAMES` code), visibility Kx9 (float32 scores,
    `SCORE_NAMES` columns), tracks Mx3 (int64 per tracker slot: track id, -1 for no confirmed track;
    label; state).
    """

    frame_index: int
    image_size: tuple[int, int]
    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    masks: torch.Tensor
    centroids: torch.Tensor
    areas: torch.Tensor
    track_ids: torch.Tensor
    class_names: tuple[str, ...] = CLASS_NAMES
    timestamp: float | None = None
    timer: StageTimer | None = None
    path: str = "gpu_resident"
    intensity: dict[str, Any] | None = None
    states: torch.Tensor | None = None
    visibility: torch.Tensor | None = None
    tracks: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.boxes.device

    def to_host(self) -> HostResult:
        """Copy to the host in one hop (two buffers, one wait) and drop invalid targets."""
        import torch

        columns = [
            self.boxes.to(torch.float64),
            self.scores.to(torch.float64)[:, None],
            self.labels.to(torch.float64)[:, None],
            self.valid.to(torch.float64)[:, None],
            self.centroids.to(torch.float64),
            self.areas.to(torch.float64)[:, None],
            self.track_ids.to(torch.float64)[:, None],
        ]
        with_visibility = self.states is not None and self.visibility is not None
        if with_visibility:
            columns += [self.states.to(torch.float64)[:, None], self.visibility.to(torch.float64)]
        tracks = self.tracks if self.tracks is not None else self.track_ids.new_zeros(0, 3)
        # one wait for two host buffers (table, masks), three with the track table
        with allowed_host_transfer("ResultPacket.to_host", max_syncs=2 + (self.tracks is not None)):
            table = torch.cat(columns, dim=1)
            if self.device.type == "cuda":
                host_table = torch.empty(table.shape, dtype=table.dtype, pin_memory=True)
                host_masks = torch.empty(self.masks.shape, dtype=torch.bool, pin_memory=True)
                host_tracks = torch.empty(tracks.shape, dtype=tracks.dtype, pin_memory=True)
                host_table.copy_(table, non_blocking=True)
                host_masks.copy_(self.masks, non_blocking=True)
                host_tracks.copy_(tracks, non_blocking=True)
                torch.cuda.current_stream(self.device).synchronize()
            else:
                host_table, host_masks, host_tracks = table.detach(), self.masks.detach(), tracks.detach()
            table_np = host_table.numpy()
            masks_np = host_masks.numpy()
            tracks_np = host_tracks.numpy() if self.tracks is not None else None
        keep = table_np[:, 6] > 0.5
        stage_ms = self.timer.elapsed_ms() if self.timer is not None else {}
        states = visibility = tracks = None
        if with_visibility:
            states = table_np[keep, 11].astype(np.int64)
            visibility = table_np[keep, 12:].astype(np.float32)
        if tracks_np is not None:
            tracks = np.ascontiguousarray(tracks_np[tracks_np[:, 0] >= 0].astype(np.int64))
        return HostResult(
            frame_index=self.frame_index,
            image_size=self.image_size,
            boxes=table_np[keep, 0:4].astype(np.float32),
            scores=table_np[keep, 4].astype(np.float32),
            labels=table_np[keep, 5].astype(np.int64),
            centroids=table_np[keep, 7:9].astype(np.float32),
            areas=table_np[keep, 9].astype(np.float32),
            track_ids=table_np[keep, 10].astype(np.int64),
            masks=np.ascontiguousarray(masks_np[keep]),
            class_names=self.class_names,
            timestamp=self.timestamp,
            stage_ms=stage_ms,
            device=str(self.device),
            path=self.path,
            tensor_devices=self.tensor_devices(),
            intensity=self.intensity,
            states=states,
            visibility=visibility,
            tracks=tracks,
        )

    def tensor_devices(self) -> dict[str, str]:
        """Where the frame's results were computed, per output (the in-house "GPU continuity" KPI)."""
        return {
            "boxes": str(self.boxes.device),
            "masks": str(self.masks.device),
            "weights": str(self.centroids.device),
            "track_ids": str(self.track_ids.device),
        }


@dataclass
class HostResult:
    """Host-side (numpy) results of one frame: M valid targets. Shapes as in `ResultPacket`.

    ``stage_ms``: milliseconds per stage (`UltramotionIGTLib.core.kpi.STAGES`); ``device``,
    ``tensor_devices`` and ``path``: where and by which implementation it was computed, ``intensity``:
    the intensity window its frame went through (all for the KPI record). Visibility (None when the
    stage was off): ``states`` M int64 codes (`STATE_NAMES`), ``visibility`` Mx9 float32 scores
    (`SCORE_NAMES`), ``tracks`` Tx3 int64 (track id, label, state) of every confirmed track, matched
    this frame or not.
    """

    frame_index: int
    image_size: tuple[int, int]
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    centroids: np.ndarray
    areas: np.ndarray
    track_ids: np.ndarray
    masks: np.ndarray
    class_names: tuple[str, ...] = CLASS_NAMES
    timestamp: float | None = None
    stage_ms: dict[str, float] = field(default_factory=dict)
    device: str | None = None
    path: str | None = None
    tensor_devices: dict[str, str] = field(default_factory=dict)
    intensity: dict[str, Any] | None = None
    states: np.ndarray | None = None
    visibility: np.ndarray | None = None
    tracks: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def state_names(self) -> list[str]:
        """Each target's visibility state name (``"VISIBLE"`` for all when the stage was off)."""
        if self.states is None:
            return [STATE_NAMES[VISIBLE]] * len(self)
        return [STATE_NAMES[int(s)] if 0 <= int(s) < len(STATE_NAMES) else "UNKNOWN" for s in self.states]

    def segment_states(self) -> dict[str, str]:
        """Each segment's visibility state (`segments` order): its targets' best, VISIBLE before
        RELOCALIZING before LOST (an untracked segment merges several targets)."""
        rank = {name: i for i, name in enumerate(STATE_NAMES)}
        best: dict[str, str] = {}
        for name, state in zip(self.segment_names(), self.state_names(), strict=True):
            if rank.get(state, len(rank)) < rank.get(best.get(name, ""), len(rank) + 1):
                best[name] = state
        return best

    @property
    def shown(self) -> np.ndarray:
        """M bool: the targets an output should draw (all but LOST)."""
        if self.states is None:
            return np.ones(len(self), dtype=bool)
        return np.asarray(self.states) != LOST

    def state_counts(self) -> dict[str, int] | None:
        """Confirmed tracks per state, ``{"visible": n, "relocalizing": n, "lost": n}`` (from the
        track table, which includes tracks missed this frame; from the targets when untracked).
        None when the visibility stage was off."""
        if self.states is None:
            return None
        codes = self.tracks[:, 2] if self.tracks is not None else self.states
        return {name.lower(): int(np.count_nonzero(codes == i)) for i, name in enumerate(STATE_NAMES)}

    def class_name(self, i: int) -> str:
        label = int(self.labels[i])
        return self.class_names[label] if 0 <= label < len(self.class_names) else f"class{label}"

    def segment_names(self) -> list[str]:
        return [segment_name(self.class_name(i), int(self.track_ids[i])) for i in range(len(self))]

    def segment_colors(self) -> list[tuple[float, float, float]]:
        return [CLASS_COLORS.get(self.class_name(i), DEFAULT_COLOR) for i in range(len(self))]

    def segments(self) -> list[tuple[str, tuple[float, float, float], np.ndarray]]:
        """(name, colour, HxW bool mask) per segment of this frame, by `segment_name`'s rule: one per
        tracked target, one per class for its untracked detections (their masks merged), in order of
        first appearance among the targets."""
        merged: dict[str, tuple[tuple[float, float, float], np.ndarray]] = {}
        for i, (name, color) in enumerate(zip(self.segment_names(), self.segment_colors(), strict=True)):
            if name in merged:
                merged[name] = (merged[name][0], merged[name][1] | self.masks[i])
            else:
                merged[name] = (color, np.asarray(self.masks[i], dtype=bool))
        return [(name, color, mask) for name, (color, mask) in merged.items()]

    def labelmap(self, by: str = "class", dtype: Any = np.uint8) -> np.ndarray:
        """HxW label image. ``by="class"``: value = class index + 1; ``by="target"``: value = row + 1.

        Where masks overlap, the higher-scoring target wins. LOST targets are left out.
        """
        if by not in ("class", "target"):
            raise ValueError(f"labelmap(by=...) must be 'class' or 'target', not {by!r}")
        out = np.zeros(self.image_size, dtype=dtype)
        shown = self.shown
        for i in np.argsort(self.scores, kind="stable"):
            if not shown[i]:
                continue
            value = int(self.labels[i]) + 1 if by == "class" else int(i) + 1
            out[self.masks[i]] = value
        return out


class SegmentTable:
    """Label values for segments that keep their meaning through a whole sequence.

    Each segment name (`segment_name`: ``vessel-3``; ``vessel-untracked`` for a class's untracked
    detections) gets one label value the first time it appears and keeps it in every frame, so a
    labelmap sequence, a Slicer segmentation and the KPI stream all speak of the same targets.
    Labelmaps are uint8, uint16 past 255 segments, uint32 past 65535.
    """

    def __init__(self) -> None:
        self._values: dict[str, int] = {}
        self._colors: dict[str, tuple[float, float, float]] = {}

    def value_for(self, name: str, color: tuple[float, float, float] = DEFAULT_COLOR) -> int:
        if name not in self._values:
            self._values[name] = len(self._values) + 1
            self._colors[name] = color
        return self._values[name]

    def labelmap(self, result: HostResult) -> np.ndarray:
        """HxW labelmap of ``result`` with this table's values (uint8; uint16 past 255 segments, uint32
        past 65535). Where masks overlap, the higher-scoring target wins. LOST targets are hidden (left
        out); their segment keeps its value for when it comes back."""
        names, colors = result.segment_names(), result.segment_colors()
        values = [self.value_for(n, c) for n, c in zip(names, colors, strict=True)]
        count = len(self._values)
        dtype = np.uint8 if count <= 255 else np.uint16 if count <= 65535 else np.uint32
        out = np.zeros(result.image_size, dtype=dtype)
        shown = result.shown
        for i in np.argsort(result.scores, kind="stable"):
            if shown[i]:
                out[result.masks[i]] = values[i]
        return out

    def segments(self) -> list[tuple[int, str, tuple[float, float, float]]]:
        """(label value, name, RGB colour) for every segment seen so far, in value order."""
        return [(v, n, self._colors[n]) for n, v in sorted(self._values.items(), key=lambda kv: kv[1])]
