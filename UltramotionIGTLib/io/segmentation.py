"""The segmentation output: N labelmaps as one Slicer labelmap volume sequence (``segmentation.seq.nrrd``).

Slicer has no single-file segmentation *sequence* format (segmentation sequences are saved as .mrb
bundles), so `write_segmentation_sequence` writes a **labelmap volume sequence** in the layout Slicer's
``vtkMRMLVolumeSequenceStorageNode`` writes and reads (`UltramotionIGTLib.io.nrrd`, written with
pynrrd; checked with slicer-core, see Testing/test_io.py): ``type`` uint8, ``sizes: W H 1 N``, the
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
    SegmentationSequence,
    SegmentInfo,
    UltrasoundSequence,
    find_field,
    format_number,
)
from UltramotionIGTLib.io.nrrd import sequence_index, write_volume_sequence
from UltramotionIGTLib.io.sequence import reader_for

__all__ = ["default_segments", "read_segmentation_sequence", "write_segmentation_sequence"]


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


def write_segmentation_sequence(
    path: str | os.PathLike[str],
    labelmaps: Any,
    reference: UltrasoundSequence,
    segments: Sequence[tuple[int, str, Sequence[float]]] | None = None,
    timestamps: Any = None,
    compress: bool = True,
) -> Path:
    """Write N labelmaps as a Slicer labelmap volume sequence NRRD (``segmentation.seq.nrrd``).

    labelmaps: N x H x W integer/bool (numpy, or a torch tensor on any device), values 0..255
    (0 = background), H x W = ``reference.frame_shape``; an H x W array is one item. reference: the input
    sequence, whose geometry every item gets (voxel (i, j) of item n lies on the same LPS/RAS point as
    voxel (i, j) of the input frames). segments: (label value, name, RGB colour 0..1 or 0..255) per
    segment, written as Slicer ``Segment<n>_*`` fields; None -> `default_segments()`. timestamps: N
    numbers written as the sequence index (``time``, seconds); None -> the reference's timestamps when it
    has N finite ones, else frame numbers 0..N-1 (index name ``frame``). The file is written atomically
    (gzip unless ``compress=False``). Returns the path. Raises `ValueError` for labelmaps of another
    shape or range, duplicate or out-of-range segment values, a segment name that is not one ASCII line.
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
    if maps.size and (int(maps.min()) < 0 or int(maps.max()) > 255):
        raise ValueError(f"label values must be 0..255, got {int(maps.min())}..{int(maps.max())}")
    maps = maps.astype(np.uint8, copy=False)
    n = maps.shape[0]
    index = sequence_index(n, timestamps, reference)
    segs = default_segments() if segments is None else list(segments)
    custom: list[tuple[str, str]] = []
    seen: set[int] = set()
    for s, (value, name, color) in enumerate(segs):
        value = int(value)
        if not 1 <= value <= 255 or value in seen:
            raise ValueError(f"segment label values must be unique and within 1..255, got {value}")
        seen.add(value)
        name = str(name)
        if "\n" in name or "\r" in name or not name.isascii():
            raise ValueError(
                f"segment name {name!r} must be ASCII text without line breaks (a NRRD header line)"
            )
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
    write_volume_sequence(path, maps, reference, index, "vtkMRMLLabelMapVolumeNode", custom, compress)
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
