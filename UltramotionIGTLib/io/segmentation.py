"""The segmentation output: N labelmaps as one Slicer labelmap volume sequence (``segmentation.seq.nrrd``).

Slicer has no single-file segmentation *sequence* format (segmentation sequences are saved as .mrb
bundles), so `SegmentationSequenceWriter` (frame by frame: ``run``, ``demo``, ``serve --record``) and
`write_segmentation_sequence` (N labelmaps in memory, over the same writer) write a **labelmap volume
sequence** in the layout Slicer's ``vtkMRMLVolumeSequenceStorageNode`` writes and reads
(`UltramotionIGTLib.io.nrrd`; checked with slicer-core, see Testing/test_io.py): ``type`` uint8
(uint16 past 255 label values, uint32 past 65535), ``sizes: W H 1 N``, the
input's geometry, ``DataNodeClassName:=vtkMRMLLabelMapVolumeNode``, the timestamps (or frame numbers)
as ``axis 3 index values``, and per segment the fields Slicer's ``.seg.nrrd`` uses::

    Segment<n>_ID:=Segment_<value> | Segment<n>_Name:=<name> | Segment<n>_Color:=<R G B, 0..1>
    Segment<n>_LabelValue:=<value> | Segment<n>_Layer:=0
    Segmentation_MasterRepresentation:=Binary labelmap
    Segmentation_ContainedRepresentationNames:=Binary labelmap|

Slicer loads it as a sequence of labelmap volumes whose voxel (i, j) lies on the RAS point of the
input frame's voxel (i, j); the segment fields become attributes of the sequence node.
`read_segmentation_sequence` reads it (or any Slicer volume sequence) back.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np

from UltramotionIGTLib.errors import InputFileError, UnsupportedImageTypeError
from UltramotionIGTLib.io.arrays import host_array
from UltramotionIGTLib.io.common import (
    LPS_TO_RAS,
    SegmentationSequence,
    SegmentInfo,
    UltrasoundSequence,
    find_field,
    format_number,
)
from UltramotionIGTLib.io.nrrd import VolumeSequenceWriter, sequence_index
from UltramotionIGTLib.io.sequence import reader_for

__all__ = [
    "MAX_LABEL_VALUE",
    "SegmentationSequenceWriter",
    "check_segment_name",
    "default_segments",
    "read_segmentation_sequence",
    "segment_fields",
    "write_segmentation_sequence",
]


def _color01(color: Sequence[float]) -> tuple[float, float, float]:
    """RGB 0..1 from 3 numbers in 0..1, or in 0..255 when any is above 1."""
    c = np.asarray(color, dtype=np.float64).reshape(-1)
    if c.shape != (3,) or not np.all(np.isfinite(c)) or c.min() < 0:
        raise ValueError(f"segment colour must be 3 numbers (RGB 0..1 or 0..255), got {color!r}")
    if c.max() > 1.0:
        c = c / 255.0
    return (float(c[0]), float(c[1]), float(c[2]))


def default_segments() -> list[tuple[int, str, tuple[float, float, float]]]:
    """(value, name, RGB 0..1) per class: value = class index + 1 (``ResultPacket.labelmap(by="class")``)."""
    from UltramotionIGTLib import CLASS_NAMES
    from UltramotionIGTLib.core.packet import CLASS_COLORS, DEFAULT_COLOR

    return [(i + 1, name, CLASS_COLORS.get(name, DEFAULT_COLOR)) for i, name in enumerate(CLASS_NAMES)]


MAX_LABEL_VALUE = 2**32 - 1
"""Largest label value: labelmaps are uint8, then uint16 past 255 segments, uint32 past 65535."""


def segment_fields(segments: Sequence[tuple[int, str, Sequence[float]]]) -> list[tuple[str, str]]:
    """Slicer's ``Segment<n>_*`` and ``Segmentation_*`` header fields for (value, name, colour) triples.

    `ValueError` for duplicate or out-of-range values (1..`MAX_LABEL_VALUE`), a colour that is not 3
    numbers, a name that is not one line of ASCII text (a NRRD header line)."""
    custom: list[tuple[str, str]] = []
    seen: set[int] = set()
    for s, (value, name, color) in enumerate(segments):
        value = int(value)
        if not 1 <= value <= MAX_LABEL_VALUE or value in seen:
            raise ValueError(
                f"segment label values must be unique and within 1..{MAX_LABEL_VALUE}, got {value}"
            )
        seen.add(value)
        name = str(name)
        check_segment_name(name)
        rgb = _color01(color)
        custom += [
            (f"Segment{s}_ID", f"Segment_{value}"),
            (f"Segment{s}_Name", name),
            (f"Segment{s}_Color", " ".join(format_number(c) for c in rgb)),
            (f"Segment{s}_LabelValue", str(value)),
            (f"Segment{s}_Layer", "0"),
        ]
    custom += [
        ("Segmentation_MasterRepresentation", "Binary labelmap"),
        ("Segmentation_ContainedRepresentationNames", "Binary labelmap|"),
    ]
    return custom


def check_segment_name(name: str) -> None:
    """`ValueError` unless ``name`` is one line of ASCII text (it becomes a NRRD header line)."""
    if "\n" in name or "\r" in name or not name.isascii():
        raise ValueError(f"segment name {name!r} must be ASCII text without line breaks (a NRRD header line)")


class SegmentationSequenceWriter:
    """The segmentation sequence written as frames are processed (the one writer of
    ``segmentation.seq.nrrd``: ``run``, ``demo``, ``serve --record`` and `write_segmentation_sequence`).

    path: the ``.seq.nrrd``. geometry: the input's (`UltrasoundSequence`, any `Geometry`, or a 4x4
    IJK-to-RAS matrix as a live frame carries it); every item gets it. compress: gzip (default) or
    raw. live: while writing, keep the readable pair ``<stem>.nhdr`` + ``<stem>.raw``
    (`UltramotionIGTLib.io.nrrd.VolumeSequenceWriter`); memory holds one labelmap.

    `append` one labelmap per frame (HxW integer, 0 = background; uint8, widened to uint16/uint32 when
    a frame needs it: the file is rewritten once) with its timestamp and the segments so far; `finish`
    writes the file with the index: the timestamps when every frame had a finite one (made distinct
    for Slicer, `UltramotionIGTLib.io.nrrd.unique_index_times`), else frame numbers; `abort` drops it.
    """

    def __init__(self, path: str | os.PathLike[str], geometry: Any, compress: bool = True, live: bool = True):
        if not hasattr(geometry, "ijk_to_lps"):
            geometry = _MatrixGeometry(np.asarray(geometry, dtype=np.float64))
        self._writer = VolumeSequenceWriter(path, geometry, "vtkMRMLLabelMapVolumeNode", compress, live)
        self.path = Path(path)
        self.timestamps: list[float] = []
        self.segments: list[tuple[int, str, tuple[float, float, float]]] = []
        self._fields: list[tuple[str, str]] = segment_fields([])
        self.report: dict[str, Any] | None = None

    @property
    def n_frames(self) -> int:
        """Labelmaps appended so far."""
        return self._writer.n

    @property
    def frame_shape(self) -> tuple[int, int] | None:
        """(H, W) of the labelmaps (None before the first)."""
        shape = self._writer.item_shape
        return None if shape is None else (shape[0], shape[1])

    @property
    def dtype(self) -> np.dtype | None:
        return self._writer.dtype

    def append(
        self,
        labelmap: Any,
        timestamp: float | None = None,
        segments: Sequence[tuple[int, str, Sequence[float]]] | None = None,
    ) -> None:
        """Append one HxW labelmap (numpy or torch, values 0..`MAX_LABEL_VALUE`); ``timestamp``: seconds
        (None/NaN: none); ``segments``: (value, name, colour) of every segment so far (None: unchanged).
        `ValueError` for another shape, negative or non-integer labels, or segments NRRD cannot carry."""
        maps = host_array(labelmap)
        if maps.ndim != 2:
            raise ValueError(f"a labelmap must be H x W, got shape {maps.shape}")
        if maps.dtype.kind not in "biu":
            raise ValueError(f"labelmaps must hold integer label values, got dtype {maps.dtype}")
        if maps.dtype.kind == "i":
            if maps.size and int(maps.min()) < 0:
                raise ValueError(f"label values must be >= 0, got {int(maps.min())}")
            maps = maps.astype(np.min_scalar_type(int(maps.max()) if maps.size else 0))
        if maps.dtype.kind == "u" and maps.dtype.itemsize > 4:
            if maps.size and int(maps.max()) > MAX_LABEL_VALUE:
                raise ValueError(f"label values must be within 0..{MAX_LABEL_VALUE}, got {int(maps.max())}")
            maps = maps.astype(np.uint32)
        if segments is not None:
            self.segments = [(int(v), str(n), _color01(c)) for v, n, c in segments]
            self._fields = segment_fields(self.segments)
        self._writer.append(maps, self._fields)
        t = float("nan") if timestamp is None else float(timestamp)
        self.timestamps.append(t)

    def finish(self) -> dict[str, Any]:
        """Write the file; returns the report: ``frames``, ``dtype``, ``index`` (``"time"`` or
        ``"frame"``), ``index_fixups`` (`SequenceIndex.fixups`), ``path`` (None when no labelmap was
        appended: then no file is written)."""
        index = sequence_index(self.n_frames, self.timestamps if self.timestamps else None, None)
        path = self._writer.finish(index, self._fields)
        self.report = {
            "path": None if path is None else str(path),
            "frames": self.n_frames,
            "dtype": None if self.dtype is None else str(np.dtype(self.dtype.str[1:])),
            "index": index.name,
            "index_fixups": index.fixups,
        }
        return self.report

    def abort(self) -> None:
        """Stop without writing the file (work files removed)."""
        self._writer.abort()


class _MatrixGeometry:
    """A `Geometry` stand-in from a 4x4 IJK-to-RAS matrix (a live frame's geometry)."""

    def __init__(self, ijk_to_ras: np.ndarray) -> None:
        if ijk_to_ras.shape != (4, 4) or not np.all(np.isfinite(ijk_to_ras)):
            raise ValueError(f"geometry must be a finite 4x4 IJK-to-RAS matrix, got shape {ijk_to_ras.shape}")
        self._ijk_to_lps = LPS_TO_RAS @ ijk_to_ras  # the matrix is its own inverse

    def ijk_to_lps(self) -> np.ndarray:
        return self._ijk_to_lps


def write_segmentation_sequence(
    path: str | os.PathLike[str],
    labelmaps: Any,
    reference: UltrasoundSequence,
    segments: Sequence[tuple[int, str, Sequence[float]]] | None = None,
    timestamps: Any = None,
    compress: bool = True,
) -> Path:
    """Write N labelmaps as a Slicer labelmap volume sequence NRRD (``segmentation.seq.nrrd``).

    labelmaps: N x H x W integer/bool (numpy, or a torch tensor on any device), values 0..`MAX_LABEL_VALUE`
    (0 = background; written uint8, or uint16/uint32 when the values need it), H x W =
    ``reference.frame_shape``; an H x W array is one item. reference: the input sequence, whose
    geometry every item gets (voxel (i, j) of item n lies on the same LPS/RAS point as voxel (i, j) of
    the input frames). segments: (label value, name, RGB colour 0..1 or 0..255) per segment, written as
    Slicer ``Segment<n>_*`` fields; None -> `default_segments()`. timestamps: N numbers written as the
    sequence index (``time``, seconds; made distinct for Slicer, see `SegmentationSequenceWriter`);
    None -> the reference's timestamps when it has N finite ones, else frame numbers 0..N-1 (index
    name ``frame``). The file is written atomically (gzip unless ``compress=False``), item by item
    (`SegmentationSequenceWriter`). Returns the path. Raises `ValueError` for labelmaps of another
    shape or range, duplicate or out-of-range segment values, a segment name that is not one ASCII
    line; nothing is left behind then.
    """
    path = Path(path)
    maps = host_array(labelmaps)
    if maps.ndim == 2:
        maps = maps[np.newaxis]
    if maps.ndim != 3:
        raise ValueError(f"labelmaps must be N x H x W, got shape {maps.shape}")
    if maps.dtype.kind not in "biu":
        raise ValueError(f"labelmaps must hold integer label values, got dtype {maps.dtype}")
    if maps.shape[1:] != reference.frame_shape:
        raise ValueError(
            f"labelmaps are {maps.shape[1]} x {maps.shape[2]} but the reference frames are "
            f"{reference.frame_shape[0]} x {reference.frame_shape[1]} (H x W): the geometry would not match"
        )
    if maps.size and (int(maps.min()) < 0 or int(maps.max()) > MAX_LABEL_VALUE):
        raise ValueError(
            f"label values must be 0..{MAX_LABEL_VALUE}, got {int(maps.min())}..{int(maps.max())}"
        )
    if maps.dtype.kind == "i" or maps.dtype == np.bool_:
        maps = maps.astype(np.min_scalar_type(int(maps.max()) if maps.size else 0))
    n = maps.shape[0]
    index = sequence_index(n, timestamps, reference)  # validates the timestamps before writing
    times = [float(t) for t in index.values] if index.name == "time" else [None] * n
    segs = default_segments() if segments is None else list(segments)
    segment_fields(segs)  # validate before writing anything
    writer = SegmentationSequenceWriter(path, reference, compress, live=False)
    try:
        for item, t in zip(maps, times, strict=True):
            writer.append(item, t, segs)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return path


def read_segmentation_sequence(path: str | os.PathLike[str]) -> SegmentationSequence:
    """Read a labelmap sequence written by `write_segmentation_sequence` (or any Slicer volume sequence).

    Returns labelmaps N x H x W (file dtype, uint8 for ours), geometry (LPS), index values/timestamps,
    segments and the header. Raises `InputFileError` like `read_sequence`.
    """
    path = Path(path)
    parsed = reader_for(path)(path)
    if parsed.data.shape[-1] != 1:
        raise UnsupportedImageTypeError(
            f"{path}: {parsed.data.shape[-1]} channels per voxel, a labelmap has 1"
        )
    header = parsed.header
    n = parsed.data.shape[0]
    index_text = find_field(header, "axis 3 index values", "axis 0 index values")
    index_values = [unquote(v) for v in index_text.split()] if index_text else [str(i) for i in range(n)]
    if len(index_values) != n:
        raise InputFileError(f"{path}: {len(index_values)} index values for {n} sequence items")
    timestamps = np.array([_to_float(v) for v in index_values], dtype=np.float64)
    labels = _list_field(header.get("labels", ""))
    units = _list_field(header.get("units", ""))
    segments: list[SegmentInfo] = []
    s = 0
    while f"Segment{s}_LabelValue" in header or f"Segment{s}_Name" in header:
        try:
            value = int(header.get(f"Segment{s}_LabelValue", str(s + 1)))
            color = tuple(float(c) for c in header.get(f"Segment{s}_Color", "0.5 0.5 0.5").split())
        except ValueError:
            raise InputFileError(f"{path}: Segment{s} fields are not numbers") from None
        if len(color) != 3:
            raise InputFileError(f"{path}: Segment{s}_Color is not 3 numbers")
        segments.append(SegmentInfo(value, header.get(f"Segment{s}_Name", f"Segment_{value}"), color))  # type: ignore[arg-type]
        s += 1
    return SegmentationSequence(
        labelmaps=parsed.data[..., 0],
        spacing=parsed.spacing,
        origin=parsed.origin,
        direction=parsed.direction,
        index_values=index_values,
        timestamps=timestamps,
        index_name=labels[-1] if labels else "",
        index_unit=units[-1] if units else "",
        segments=segments,
        header=header,
    )


def _to_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _list_field(text: str) -> list[str]:
    """A NRRD per-axis field (``labels``, ``units``) from its text: the quoted items, else the words."""
    return re.findall(r'"([^"]*)"', text) if '"' in text else text.split()
