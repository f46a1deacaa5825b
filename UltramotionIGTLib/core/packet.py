"""ResultPacket: one frame's results as device tensors, and its host-side twin.

Everything in a `ResultPacket` stays on the device where it was computed. ``to_host()`` is the
pipeline's single intended device-to-host hop (declared to the transfer audit) and returns a
`HostResult` with numpy arrays, keeping only valid targets.
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
}
DEFAULT_COLOR = (0.6, 0.6, 0.6)


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
    the stream's intensity window (`core.intensity.IntensityWindow.to_dict`).
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

    @property
    def device(self) -> torch.device:
        return self.boxes.device

    def to_host(self) -> HostResult:
        """Copy to the host in one hop (two buffers, one wait) and drop invalid targets."""
        import torch

        with allowed_host_transfer("ResultPacket.to_host", max_syncs=2):
            table = torch.cat(
                [
                    self.boxes.to(torch.float64),
                    self.scores.to(torch.float64)[:, None],
                    self.labels.to(torch.float64)[:, None],
                    self.valid.to(torch.float64)[:, None],
                    self.centroids.to(torch.float64),
                    self.areas.to(torch.float64)[:, None],
                    self.track_ids.to(torch.float64)[:, None],
                ],
                dim=1,
            )
            if self.device.type == "cuda":
                host_table = torch.empty(table.shape, dtype=table.dtype, pin_memory=True)
                host_masks = torch.empty(self.masks.shape, dtype=torch.bool, pin_memory=True)
                host_table.copy_(table, non_blocking=True)
                host_masks.copy_(self.masks, non_blocking=True)
                torch.cuda.current_stream(self.device).synchronize()
            else:
                host_table, host_masks = table.detach(), self.masks.detach()
            table_np = host_table.numpy()
            masks_np = host_masks.numpy()
        keep = table_np[:, 6] > 0.5
        stage_ms = self.timer.elapsed_ms() if self.timer is not None else {}
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
    the intensity window its frame went through (all for the KPI record).
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

    def __len__(self) -> int:
        return int(self.labels.shape[0])

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

        Where masks overlap, the higher-scoring target wins.
        """
        if by not in ("class", "target"):
            raise ValueError(f"labelmap(by=...) must be 'class' or 'target', not {by!r}")
        out = np.zeros(self.image_size, dtype=dtype)
        for i in np.argsort(self.scores, kind="stable"):
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
        past 65535). Where masks overlap, the higher-scoring target wins."""
        names, colors = result.segment_names(), result.segment_colors()
        values = [self.value_for(n, c) for n, c in zip(names, colors, strict=True)]
        count = len(self._values)
        dtype = np.uint8 if count <= 255 else np.uint16 if count <= 65535 else np.uint32
        out = np.zeros(result.image_size, dtype=dtype)
        for i in np.argsort(result.scores, kind="stable"):
            out[result.masks[i]] = values[i]
        return out

    def segments(self) -> list[tuple[int, str, tuple[float, float, float]]]:
        """(label value, name, RGB colour) for every segment seen so far, in value order."""
        return [(v, n, self._colors[n]) for n, v in sorted(self._values.items(), key=lambda kv: kv[1])]
