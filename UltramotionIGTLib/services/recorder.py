"""``serve --record DIR``: the outputs of ``run`` written as frames arrive, for a stream of unknown length.

The same result folder as ``run`` (`UltramotionIGTLib.tools.outputs`: checked and locked folder,
``summary.json`` marked partial until the end, ``kpi.jsonl``, ``segmentation.seq.nrrd`` through the
one streaming writer `UltramotionIGTLib.io.SegmentationSequenceWriter`, readable as
``segmentation.seq.nhdr`` + ``segmentation.seq.raw`` while running, bounded overlay sample).
What a live stream adds:

- each frame's ``kpi.jsonl`` record carries the frame's ``ijk_to_ras`` (16 numbers, row-major) and
  the echoed ``pose_matrix``;
- geometry: the sequence has one geometry, that of the first recorded frame (its IJK-to-RAS matrix
  as received). Frames of another size are left out of the sequence (counted as ``skipped_size`` in
  the summary) but are in ``kpi.jsonl``; each frame's own matrix is in its ``kpi.jsonl`` record;
- label values are those of the stream's `SegmentTable` (uint8, widened past 255 segments).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from UltramotionIGTLib.core.kpi import FrameRecord
from UltramotionIGTLib.tools.outputs import SEGMENTATION, OutputFolder, RunRecorder

LOG = logging.getLogger("UltramotionIGTLib.services.recorder")


class StreamRecorder:
    """Writes ``run``'s outputs into ``out_dir`` frame by frame (module docstring).

    ``out_dir``: a folder (checked and locked by `OutputFolder.open`; refused when it holds an
    earlier run's results unless ``overwrite``) or an `OutputFolder` already opened. ``source``: text
    for the records' ``source``; ``describe``: `Pipeline.describe()` for the start record. Call
    `write_frame` per processed frame and `close` once.
    """

    def __init__(
        self,
        out_dir: str | Path | OutputFolder,
        source: str,
        describe: dict[str, Any],
        overlay_tiles: int = 6,
        overwrite: bool = False,
    ) -> None:
        folder = out_dir if isinstance(out_dir, OutputFolder) else OutputFolder.open(out_dir, overwrite)
        self.out = folder.path
        self.source = source
        self._recorder = RunRecorder(folder, source, describe, overlay_tiles=overlay_tiles)
        self.frames = 0
        self.skipped_size = 0

    def write_frame(
        self,
        frame: Any,
        result: Any,
        labelmap: np.ndarray,
        segments: Sequence[tuple[int, str, tuple[float, float, float]]],
        record: FrameRecord,
        pose_matrix: np.ndarray | None = None,
    ) -> None:
        """Append one processed frame: ``frame`` (`InputFrame`), its `HostResult`, its HxW labelmap
        (stable values), the stream's segments so far, its KPI record (to which the frame's
        IJK-to-RAS and pose matrices are added, row-major, for ``kpi.jsonl`` only)."""
        line = record.to_dict()
        line["ijk_to_ras"] = [float(v) for v in np.asarray(frame.ijk_to_ras, np.float64).reshape(-1)]
        if pose_matrix is not None:
            line["pose_matrix"] = [float(v) for v in np.asarray(pose_matrix, np.float64).reshape(-1)]
        self._recorder.log(line)
        shape = tuple(labelmap.shape)
        first = self._recorder.frame_shape
        if first is not None and shape != first:
            if not self.skipped_size:
                LOG.warning(
                    "frame size changed from %s to %s: such frames stay out of %s (they are in kpi.jsonl)",
                    first,
                    shape,
                    SEGMENTATION,
                )
            self.skipped_size += 1
            return
        self._recorder.add_item(labelmap, frame.timestamp, segments, ijk_to_ras=frame.ijk_to_ras)
        self.frames += 1
        self._recorder.sample(frame.image, result)

    def close(
        self, summary: dict[str, Any], complete: bool = True, reason: str | None = None
    ) -> dict[str, Any]:
        """Finish: ``segmentation.seq.nrrd``, ``overlay.png``, ``summary.json``, the summary KPI record.

        Returns ``summary`` with ``recorded_frames``, ``skipped_size``, ``complete`` and ``outputs``
        added (also written to summary.json)."""
        summary = {**summary, "recorded_frames": self.frames, "skipped_size": self.skipped_size}
        return self._recorder.close(summary, complete=complete, reason=reason)
