"""What the gateway sends back per frame, in one place: device names, metadata keys, the KPI record.

numpy only (no torch, no pyigtl): the gateway encodes with it and a client, the Slicer module
included, decodes with it.

Per processed frame the gateway sends, in this order, as OpenIGTLink v3 messages (header version
2, so every message can carry metadata)::

    TRANSFORM <output>          the frame's pose transform (the TRANSFORM received with the frame's
                                timestamp, or the nearest one), so the mask keeps its frame's pose
    IMAGE     <output>          the label map: uint8 (uint16 once a stream has had more than 255
                                segments), the input's size and IJK-to-RAS matrix (voxel (i, j) of
                                the label map lies on voxel (i, j) of the frame), the frame's
                                timestamp; segments in the metadata (below)
    POINT     <output>_Targets  one point per target: its weighted centroid in RAS, named after
                                its segment, in its segment's colour; owner = the IMAGE's name
    STRING    <output>_KPI      the frame's KPI record as JSON (`parse_kpi_string`)

The TRANSFORM comes first so that a client that applies it sees the pose before the mask.
``<output>`` is ``<input device name>_Segmentation`` or the name given. OpenIGTLink device names
are at most 20 bytes (the header field's size): longer names are shortened by `fit_device_name`,
keeping each suffix whole, so that the four names stay distinct.

Label map metadata (values are text, as OpenIGTLink metadata is; keys follow Slicer's
``.seg.nrrd`` segment fields, plus the target's class, track id and score)::

    Segment<n>_ID, Segment<n>_Name      segment name, e.g. "vessel-3" (class-track id)
    Segment<n>_LabelValue               its voxel value, stable for the whole stream
    Segment<n>_Color                    "r g b", 0..1
    Segment<n>_Class, _TrackId, _Score  detector class, tracker id (-1 untracked), detection score
    SegmentCount                        how many segments are listed (n = 0 .. SegmentCount - 1)
    ClassNames                          JSON list of the detector's class names
    FrameNumber                         the gateway's number for the frame (arrival order)
    SourceDevice, SourceTimestamp       the input IMAGE's device name and header timestamp
    PoseTransform                       name of the input TRANSFORM echoed as the pose ("" if none)
    TargetsDevice, KpiDevice            the names of the POINT and STRING messages of this frame

Only the segments present in the frame are listed. SlicerOpenIGTLink copies each metadata entry
``K`` onto the receiving node as the attribute ``OpenIGTLink.K`` and never removes one, so a node
still carries ``Segment5_*`` from an earlier frame when the current one has 3 segments: decoders
read ``SegmentCount`` entries, not "until one is missing"
(`UltramotionIGTLib.slicer.gateway_client` reads them back from node attributes).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_PLUS_PORT = 18944
"""PlusServer's usual OpenIGTLink port (the gateway is its client)."""

DEFAULT_LISTEN_PORT = 18945
"""Where the gateway serves label maps (Slicer, or any OpenIGTLink client, connects here)."""

MAX_DEVICE_NAME_BYTES = 20
"""Size of the device name field of the OpenIGTLink header (v1, v2 and v3)."""

OUTPUT_SUFFIX = "_Segmentation"
TARGETS_SUFFIX = "_Targets"
KPI_SUFFIX = "_KPI"

META_SEGMENT_COUNT = "SegmentCount"
META_CLASS_NAMES = "ClassNames"
META_FRAME_NUMBER = "FrameNumber"
META_SOURCE_DEVICE = "SourceDevice"
META_SOURCE_TIMESTAMP = "SourceTimestamp"
META_POSE_TRANSFORM = "PoseTransform"
META_TARGETS_DEVICE = "TargetsDevice"
META_KPI_DEVICE = "KpiDevice"

#: Attribute prefix SlicerOpenIGTLink gives metadata entries copied onto a node.
SLICER_METADATA_PREFIX = "OpenIGTLink."


def fit_device_name(base: str, suffix: str = "") -> str:
    """``base + suffix`` shortened to `MAX_DEVICE_NAME_BYTES` UTF-8 bytes by cutting ``base``.

    The suffix is kept whole (it tells the messages of one frame apart); ``base`` is cut at a
    character boundary. Raises ValueError when the suffix alone does not fit.
    """
    budget = MAX_DEVICE_NAME_BYTES - len(suffix.encode("utf-8"))
    if budget < 1:
        raise ValueError(f"device name suffix {suffix!r} leaves no room in {MAX_DEVICE_NAME_BYTES} bytes")
    head = base.encode("utf-8")[:budget].decode("utf-8", errors="ignore")
    return head + suffix


@dataclass(frozen=True)
class OutputNames:
    """Device names of the messages sent per frame (see the module docstring)."""

    image: str
    transform: str
    targets: str
    kpi: str


def output_names(output_name: str) -> OutputNames:
    """The four device names for an output name (IMAGE and TRANSFORM share it)."""
    if not output_name:
        raise ValueError("the output device name must not be empty")
    image = fit_device_name(output_name)
    return OutputNames(
        image=image,
        transform=image,
        targets=fit_device_name(image, TARGETS_SUFFIX),
        kpi=fit_device_name(image, KPI_SUFFIX),
    )


def default_output_name(input_name: str) -> str:
    """``<input device name>_Segmentation`` (before fitting to 20 bytes)."""
    return (input_name or "Image") + OUTPUT_SUFFIX


# -- segments --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelSegment:
    """One segment of a label map: voxel ``value``, ``name`` (``vessel-3``), RGB ``color`` 0..1,
    detector ``class_name``, tracker ``track_id`` (-1 untracked) and detection ``score``."""

    value: int
    name: str
    color: tuple[float, float, float]
    class_name: str
    track_id: int = -1
    score: float = float("nan")


def _num(value: float) -> str:
    v = float(value)
    return repr(round(v, 6)) if math.isfinite(v) else "nan"


def segments_to_metadata(segments: Sequence[LabelSegment]) -> dict[str, str]:
    """``Segment<n>_*`` metadata entries (text values) for ``segments``, n = 0, 1, ... in order, and
    ``SegmentCount``."""
    out: dict[str, str] = {META_SEGMENT_COUNT: str(len(segments))}
    for n, seg in enumerate(segments):
        key = f"Segment{n}_"
        out[key + "ID"] = seg.name
        out[key + "Name"] = seg.name
        out[key + "LabelValue"] = str(int(seg.value))
        out[key + "Color"] = " ".join(_num(c) for c in seg.color)
        out[key + "Class"] = seg.class_name
        out[key + "TrackId"] = str(int(seg.track_id))
        out[key + "Score"] = _num(seg.score)
    return out


def segments_from_metadata(metadata: Mapping[str, str]) -> list[LabelSegment]:
    """The segments listed in label map metadata (`segments_to_metadata`'s inverse), in order.

    Entries are read for n = 0 .. ``SegmentCount`` - 1 (without a count: until
    ``Segment<n>_LabelValue`` is missing). A missing name falls back to the ID, a missing class to
    the name's part before the last ``-``, a missing or unreadable colour to grey. Raises
    ValueError for a missing or non-positive label value, or an unreadable count.
    """
    count: int | None = None
    if META_SEGMENT_COUNT in metadata:
        try:
            count = int(str(metadata[META_SEGMENT_COUNT]).strip())
        except ValueError:
            raise ValueError(
                f"{META_SEGMENT_COUNT} = {metadata[META_SEGMENT_COUNT]!r} is not a number"
            ) from None
    segments = []
    n = 0
    while (n < count) if count is not None else (f"Segment{n}_LabelValue" in metadata):
        key = f"Segment{n}_"
        if key + "LabelValue" not in metadata:
            raise ValueError(f"{key}LabelValue is missing ({META_SEGMENT_COUNT} = {count})")
        raw_value = str(metadata[key + "LabelValue"]).strip()
        try:
            value = int(raw_value)
        except ValueError:
            raise ValueError(f"{key}LabelValue = {raw_value!r} is not an integer label value") from None
        if value < 1:
            raise ValueError(f"{key}LabelValue = {value}: label values start at 1 (0 is background)")
        name = str(metadata.get(key + "Name") or metadata.get(key + "ID") or f"segment{value}")
        try:
            rgb = tuple(float(c) for c in str(metadata.get(key + "Color", "")).split())
        except ValueError:
            rgb = ()
        color = rgb if len(rgb) == 3 and all(0.0 <= c <= 1.0 for c in rgb) else (0.6, 0.6, 0.6)
        class_name = str(metadata.get(key + "Class") or name.rsplit("-", 1)[0])
        segments.append(
            LabelSegment(
                value=value,
                name=name,
                color=(float(color[0]), float(color[1]), float(color[2])),
                class_name=class_name,
                track_id=_int_or(metadata.get(key + "TrackId"), -1),
                score=_float_or(metadata.get(key + "Score"), float("nan")),
            )
        )
        n += 1
    return segments


def _int_or(text: Any, default: int) -> int:
    try:
        return int(str(text).strip())
    except (TypeError, ValueError):
        return default


def _float_or(text: Any, default: float) -> float:
    try:
        return float(str(text).strip())
    except (TypeError, ValueError):
        return default


def class_names_from_metadata(metadata: Mapping[str, str]) -> tuple[str, ...]:
    """The ``ClassNames`` entry (a JSON list), or () when absent or unreadable."""
    try:
        names = json.loads(metadata.get(META_CLASS_NAMES, "[]"))
    except (TypeError, ValueError):
        return ()
    return tuple(str(n) for n in names) if isinstance(names, list) else ()


def host_result_from_labelmap(
    labelmap: Any,
    metadata: Mapping[str, str],
    frame_index: int | None = None,
    timestamp: float | None = None,
):
    """A `HostResult` (one target per listed segment) from a received label map and its metadata.

    ``labelmap``: HxW (or 1xHxW) integer array. Masks are ``labelmap == value``; boxes (XYXY pixels,
    the mask's extent: x2 = last column + 1) and centroids (x, y, the unweighted mean pixel; NaN
    for an empty mask) are recomputed from the masks; scores, classes and track ids come from the
    metadata. The gateway's own centroids (probability-weighted) travel in the POINT message.
    ``frame_index`` defaults to the metadata's ``FrameNumber`` (else 0). Raises ValueError for a
    label map that is not 2-D or not integer, or for unreadable segment metadata.
    """
    from UltramotionIGTLib.core.packet import HostResult

    labels_img = np.asarray(labelmap)
    if labels_img.ndim == 3 and labels_img.shape[0] == 1:
        labels_img = labels_img[0]
    if labels_img.ndim != 2 or labels_img.dtype.kind not in "iu":
        raise ValueError(
            f"a label map is an HxW integer image, got shape {labels_img.shape} dtype {labels_img.dtype}"
        )
    segments = segments_from_metadata(metadata)
    class_names = list(class_names_from_metadata(metadata))
    for seg in segments:
        if seg.class_name not in class_names:
            class_names.append(seg.class_name)
    h, w = labels_img.shape
    m = len(segments)
    masks = np.zeros((m, h, w), dtype=bool)
    boxes = np.zeros((m, 4), np.float32)
    centroids = np.full((m, 2), np.nan, np.float32)
    areas = np.zeros(m, np.float32)
    for i, seg in enumerate(segments):
        mask = labels_img == seg.value
        masks[i] = mask
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        if rows.size:
            boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
            ys, xs = np.nonzero(mask)
            centroids[i] = (xs.mean(), ys.mean())
            areas[i] = float(xs.size)
    if frame_index is None:
        frame_index = _int_or(metadata.get(META_FRAME_NUMBER), 0)
    if timestamp is None:
        stamp = _float_or(metadata.get(META_SOURCE_TIMESTAMP), float("nan"))
        timestamp = stamp if math.isfinite(stamp) else None
    return HostResult(
        frame_index=int(frame_index),
        image_size=(h, w),
        boxes=boxes,
        scores=np.array([s.score if math.isfinite(s.score) else 1.0 for s in segments], np.float32),
        labels=np.array([class_names.index(s.class_name) for s in segments], np.int64),
        centroids=centroids,
        areas=areas,
        track_ids=np.array([s.track_id for s in segments], np.int64),
        masks=masks,
        class_names=tuple(class_names),
        timestamp=timestamp,
    )


def parse_kpi_string(text: str) -> dict[str, Any]:
    """The KPI record of a frame from the ``<output>_KPI`` STRING message (JSON object, event "frame").

    Raises ValueError when the text is not such a record. The record feeds the indicators unchanged
    (`core.kpi.FrameRecord.from_dict` -> `KpiAggregator`: `slicer.gateway_client.RemoteSession`).
    """
    record = json.loads(text)
    if not isinstance(record, dict) or record.get("event") != "frame":
        raise ValueError("not a gateway KPI record (a JSON object with event = 'frame')")
    return record


def metadata_from_attributes(
    attributes: Mapping[str, str], prefix: str = SLICER_METADATA_PREFIX
) -> dict[str, str]:
    """Metadata entries from node attributes named ``<prefix><key>`` (how SlicerOpenIGTLink stores them)."""
    return {k[len(prefix) :]: v for k, v in attributes.items() if k.startswith(prefix) and v is not None}
