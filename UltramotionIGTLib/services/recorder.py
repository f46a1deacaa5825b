"""``serve --record DIR``: the outputs of ``run`` written as frames arrive, for a stream of unknown length.

``tools.run.process_sequence`` keeps every labelmap in memory and writes the segmentation at the
end, which does not fit a live stream that may last hours. `StreamRecorder` writes:

- ``kpi.jsonl``: a ``start`` record, then each frame's KPI record (the one sent as the KPI STRING)
  with the frame's ``ijk_to_ras`` (16 numbers, row-major) and echoed ``pose_matrix``, then a
  ``summary`` record. Line-buffered: a crash loses nothing written.
- while running, ``segmentation.seq.nhdr`` + ``segmentation.seq.raw``: each labelmap is appended to
  the raw file as it comes, and the detached NRRD header (the layout of
  `UltramotionIGTLib.io.write_segmentation_sequence`, without the index values) is rewritten
  atomically after each frame, so the pair is a readable labelmap sequence at any time (after a
  crash the raw file may hold one frame more than the header says).
- on `close`: ``segmentation.seq.nrrd`` (the same file ``run`` writes: gzip, Slicer segment fields,
  index values = the frames' sender timestamps), streamed from the raw file in chunks (the pair is
  then removed), ``overlay.png`` (up to 6 frames spread over the stream) and ``summary.json``.

Geometry: the sequence has one geometry, that of the first recorded frame (its IJK-to-RAS matrix as
received). Frames of another size are left out of the sequence (counted as ``skipped_size`` in the
summary) but are in ``kpi.jsonl``; each frame's own matrix is in its ``kpi.jsonl`` record.
Label values are those of the stream's `SegmentTable`: uint8, switching the whole file to uint16
(rewritten once) when a stream has had more than 255 segments.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from UltramotionIGTLib.core.kpi import FrameRecord, JsonlKpiSink, safe_log_kpi
from UltramotionIGTLib.io import LPS_TO_RAS

LOG = logging.getLogger("UltramotionIGTLib.services.recorder")

SEGMENTATION = "segmentation.seq.nrrd"
STREAM_HEADER = "segmentation.seq.nhdr"
STREAM_DATA = "segmentation.seq.raw"
_CHUNK_BYTES = 16 * 2**20
_NRRD_TYPES = {np.dtype(np.uint8): "unsigned char", np.dtype(np.uint16): "unsigned short"}


def _num(value: float) -> str:
    v = float(value)
    return "0" if v == 0.0 else repr(v)


def _vec(values: Sequence[float]) -> str:
    return "(" + ",".join(_num(v) for v in values) + ")"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class StreamRecorder:
    """Writes ``run``'s outputs into ``out_dir`` frame by frame (module docstring).

    ``source``: text for the records' ``source``; ``describe``: `Pipeline.describe()` for the start
    record. Call `write_frame` per processed frame and `close` once.
    """

    def __init__(
        self, out_dir: str | Path, source: str, describe: dict[str, Any], overlay_tiles: int = 6
    ) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.source = source
        self.overlay_tiles = overlay_tiles
        self.sink = JsonlKpiSink(self.out / "kpi.jsonl")
        safe_log_kpi({"event": "start", "source": source, "frames": None, **describe}, self.sink)
        self.frames = 0
        self.skipped_size = 0
        self._shape: tuple[int, int] | None = None
        self._ijk_to_ras: np.ndarray | None = None
        self._dtype = np.dtype(np.uint8)
        self._timestamps: list[float] = []
        self._segments: list[tuple[int, str, tuple[float, float, float]]] = []
        self._raw: Any = None
        self._samples: list[tuple[np.ndarray, Any]] = []
        self._stride = 1
        self._seen = 0
        self._closed = False

    # -- per frame -----------------------------------------------------------------------------------
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
        (uint8/uint16 stable values), the stream's segments so far, its KPI record (to which the
        frame's IJK-to-RAS and pose matrices are added, row-major, for ``kpi.jsonl`` only)."""
        line = record.to_dict()
        line["ijk_to_ras"] = [float(v) for v in np.asarray(frame.ijk_to_ras, np.float64).reshape(-1)]
        if pose_matrix is not None:
            line["pose_matrix"] = [float(v) for v in np.asarray(pose_matrix, np.float64).reshape(-1)]
        safe_log_kpi(line, self.sink)
        shape = tuple(labelmap.shape)
        if self._shape is None:
            self._shape = shape
            self._ijk_to_ras = np.asarray(frame.ijk_to_ras, np.float64).copy()
            self._raw = (self.out / STREAM_DATA).open("wb")
        elif shape != self._shape:
            if not self.skipped_size:
                LOG.warning(
                    "frame size changed from %s to %s: such frames stay out of %s (they are in kpi.jsonl)",
                    self._shape,
                    shape,
                    SEGMENTATION,
                )
            self.skipped_size += 1
            return
        if labelmap.dtype.itemsize > self._dtype.itemsize:
            self._widen(labelmap.dtype)
        self._raw.write(np.ascontiguousarray(labelmap, dtype=self._dtype.newbyteorder("<")).tobytes())
        self._raw.flush()
        self.frames += 1
        self._timestamps.append(float(frame.timestamp))
        self._segments = list(segments)
        _atomic_write(self.out / STREAM_HEADER, self._header(detached=True))
        self._sample(frame.image, result)

    def _widen(self, dtype: np.dtype) -> None:
        """Rewrite the raw file with the wider label type (once, past 255 segments)."""
        raw_path = self.out / STREAM_DATA
        self._raw.close()
        tmp = raw_path.with_suffix(".raw.part")
        with raw_path.open("rb") as src, tmp.open("wb") as dst:
            while chunk := src.read(_CHUNK_BYTES):
                dst.write(
                    np.frombuffer(chunk, self._dtype).astype(np.dtype(dtype).newbyteorder("<")).tobytes()
                )
        os.replace(tmp, raw_path)
        self._dtype = np.dtype(dtype)
        self._raw = raw_path.open("ab")
        LOG.info("more than 255 segments: the recorded label maps are now %s", self._dtype)

    def _sample(self, image: np.ndarray, result: Any) -> None:
        """Keep at most ~2x ``overlay_tiles`` frames spread over the stream (stride doubling)."""
        if self._seen % self._stride == 0:
            self._samples.append((np.asarray(image), result))
            if len(self._samples) > 2 * self.overlay_tiles:
                self._samples = self._samples[::2]
                self._stride *= 2
        self._seen += 1

    # -- files ---------------------------------------------------------------------------------------
    def _header(self, detached: bool, index_values: Sequence[float] | None = None) -> bytes:
        assert self._shape is not None and self._ijk_to_ras is not None
        h, w = self._shape
        m = LPS_TO_RAS @ self._ijk_to_ras  # IJK-to-LPS (the matrix is its own inverse)
        lines = [
            "NRRD0004",
            "# Complete NRRD file format specification at:",
            "# http://teem.sourceforge.net/nrrd/format.html",
            f"type: {_NRRD_TYPES[self._dtype]}",
            "dimension: 4",
            "space: left-posterior-superior",
            f"sizes: {w} {h} 1 {self.frames}",
            "space directions: " + " ".join(_vec(m[:3, a]) for a in range(3)) + " none",
            "kinds: domain domain domain list",
        ]
        timed = index_values is not None and all(math.isfinite(t) for t in index_values)
        label = "time" if timed else "frame"
        lines += [f'labels: "" "" "" "{label}"', f'units: "" "" "" "{"s" if timed else ""}"']
        if self._dtype.itemsize > 1:
            lines.append("endian: little")
        lines.append(f"encoding: {'raw' if detached else 'gzip'}")
        lines.append("space origin: " + _vec(m[:3, 3]))
        if detached:
            lines.append(f"data file: {STREAM_DATA}")
        lines.append("DataNodeClassName:=vtkMRMLLabelMapVolumeNode")
        for s, (value, name, color) in enumerate(self._segments):
            clean = str(name).replace("\n", " ").replace("\r", " ")
            lines += [
                f"Segment{s}_ID:=Segment_{int(value)}",
                f"Segment{s}_Name:={clean}",
                f"Segment{s}_Color:=" + " ".join(_num(c) for c in color),
                f"Segment{s}_LabelValue:={int(value)}",
                f"Segment{s}_Layer:=0",
            ]
        lines += [
            "Segmentation_MasterRepresentation:=Binary labelmap",
            "Segmentation_ContainedRepresentationNames:=Binary labelmap|",
        ]
        if index_values is not None:
            values = [_num(t) for t in index_values] if timed else [str(i) for i in range(len(index_values))]
            lines += ["axis 3 index type:=numeric", "axis 3 index values:=" + " ".join(values)]
        return ("\n".join(lines) + "\n\n").encode("latin-1", errors="replace")

    def close(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Finish: ``segmentation.seq.nrrd``, ``overlay.png``, ``summary.json``, the summary KPI record.

        Returns ``summary`` with ``outputs`` and ``skipped_size`` added (also written to summary.json).
        """
        if self._closed:
            return summary
        self._closed = True
        try:
            if self._raw is not None:
                self._raw.close()
                self._finish_segmentation()
            if self._samples:
                from UltramotionIGTLib.tools.overlay import save_overlay_grid

                save_overlay_grid(
                    self.out / "overlay.png",
                    [s[0] for s in self._samples],
                    [s[1] for s in self._samples],
                    max_tiles=self.overlay_tiles,
                )
            summary = {**summary, "recorded_frames": self.frames, "skipped_size": self.skipped_size}
            summary["outputs"] = sorted({p.name for p in self.out.iterdir()} | {"summary.json"})
            safe_log_kpi({"event": "summary", **summary}, self.sink)
        finally:
            self.sink.close()
        (self.out / "summary.json").write_text(
            json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8"
        )
        return summary

    def _finish_segmentation(self) -> None:
        raw_path = self.out / STREAM_DATA
        target = self.out / SEGMENTATION
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=self.out)
        try:
            with os.fdopen(fd, "wb") as dst, raw_path.open("rb") as src:
                dst.write(self._header(detached=False, index_values=self._timestamps))
                gz = zlib.compressobj(
                    1, zlib.DEFLATED, 31
                )  # wbits 31: a gzip member, as NRRD's gzip encoding
                while chunk := src.read(_CHUNK_BYTES):
                    dst.write(gz.compress(chunk))
                dst.write(gz.flush())
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        raw_path.unlink()
        (self.out / STREAM_HEADER).unlink()
