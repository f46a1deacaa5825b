"""NRRD (``.nrrd`` / ``.nhdr``, the format of PLUS ``.igs.nrrd`` and Slicer ``.seq.nrrd`` volume sequences):
read with pynrrd; volume sequences written item by item (`VolumeSequenceWriter`), because pynrrd's
writer needs the whole array in memory and a recording of unknown length cannot be held.

Reading
-------
``.igs.nrrd`` / ``.seq.nrrd`` / ``.nrrd`` / ``.nhdr`` (raw, gzip, bzip2, ascii). Axes are classified as
spatial (a ``space directions`` vector, or kind ``domain``/``space``), channel (kind ``vector``,
``RGB-color``, ... or no direction and size <= 4 on axis 0) and frame (the remaining ``list``/``time``
axis). This reads PLUS files (``kinds: domain domain list``, ``space dimension: 2``), PLUS colour
(``kinds: vector domain domain``) and Slicer volume sequences (``kinds: domain domain domain list``
with a size-1 third axis, or the older ``list domain domain domain``). PLUS per-frame fields
(``Seq_FrameNNNN_<Name>:=value``) are collected for `UltramotionIGTLib.io.sequence`.

Geometry (conventions in `UltramotionIGTLib.io.common`): ``space origin`` / ``space directions``;
``space: right-anterior-superior`` (or LAS) is converted to LPS on read; no ``space`` field (PLUS
writes only ``space dimension: 2``) and the scanner/3D-handed spaces are taken as LPS, as ITK and
Slicer do.

Writing: the Slicer volume sequence
-----------------------------------
`VolumeSequenceWriter` (and `write_volume_sequence` over it) writes N frames (or labelmaps) as one
NRRD in the layout Slicer's ``vtkMRMLVolumeSequenceStorageNode`` writes and reads (checked with
slicer-core and read back with pynrrd, see Testing/test_io.py; ``sizes`` is W H 1 N)::

    type: uint8 (the data's; little-endian) | dimension: 4 | space: left-posterior-superior | sizes: W H 1 N
    space directions: <i> <j> <k> none | kinds: domain domain domain list
    labels: "" "" "" "time" | units: "" "" "" "s" | space origin: <origin> | encoding: gzip | raw
    DataNodeClassName:=vtkMRMLLabelMapVolumeNode (or ScalarVolume / VectorVolume)
    <custom fields>:=...  (e.g. Slicer's Segment<n>_* fields, PLUS per-frame fields)
    axis 3 index type:=numeric | axis 3 index values:=<timestamps or frame numbers>

Colour frames get a leading ``vector`` axis (``sizes: 3 W H 1 N``, ``space directions: none ...``);
the index fields stay on "axis 3", as Slicer writes them whatever the components. Slicer loads the
file as a sequence whose item n has voxel (i, j) on the RAS point of voxel (i, j) of input frame n,
the custom fields becoming attributes of the sequence node. Numeric index values closer than 1 ms
are one item to Slicer: `sequence_index` makes them distinct and reports what it moved.
"""

from __future__ import annotations

import bisect
import math
import os
import re
import secrets
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import nrrd  # pynrrd (absolute import: this module's own name does not shadow it)
import numpy as np

from UltramotionIGTLib.errors import InputFileError, UnsupportedImageTypeError
from UltramotionIGTLib.io.arrays import host_array
from UltramotionIGTLib.io.common import (
    PLUS_FRAME_FIELD,
    Geometry,
    ParsedFile,
    UltrasoundSequence,
    atomic_write,
    check_direction,
    check_image_type,
    embed_geometry,
    find_field,
    format_number,
    read_file_bytes,
)

_CHANNEL_KINDS = {
    "vector",
    "2-vector",
    "3-vector",
    "4-vector",
    "covariant-vector",
    "normal",
    "rgb-color",
    "3-color",
    "rgba-color",
    "4-color",
    "hsv-color",
    "xyz-color",
    "complex",
    "point",
    "3d-symmetric-matrix",
}


_SPATIAL_KINDS = {"domain", "space"}


# Sign flips that take a NRRD space's coordinates to LPS.
_SPACE_TO_LPS = {
    "left-posterior-superior": (1.0, 1.0, 1.0),
    "lps": (1.0, 1.0, 1.0),
    "right-anterior-superior": (-1.0, -1.0, 1.0),
    "ras": (-1.0, -1.0, 1.0),
    "left-anterior-superior": (1.0, -1.0, 1.0),
    "las": (1.0, -1.0, 1.0),
}


def read_nrrd(path: Path) -> ParsedFile:
    """Read a NRRD file (``.nrrd`` or a detached ``.nhdr``) with pynrrd, axes classified as described in
    the module docstring. Raises `InputFileError` (missing, empty, bad header, corrupt or truncated
    data, size mismatch) and `UnsupportedImageTypeError` (RF data, axes that are not 2-D frames, a
    space with time), both naming the file.
    """
    read_file_bytes(path, probe_only=True)
    try:
        with open(path, "rb") as fh:
            header = nrrd.read_header(fh)
    except OSError as exc:
        raise InputFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except Exception as exc:  # pynrrd raises NRRDError / ValueError / UnicodeError on a bad header
        raise InputFileError(f"{path}: not a valid NRRD header ({exc})") from None

    image_type = find_field(header, "ultrasound image type", "UltrasoundImageType")
    check_image_type(image_type, path)

    sizes = [int(s) for s in np.atleast_1d(header.get("sizes", []))]
    dim = int(header.get("dimension", len(sizes)))
    if dim != len(sizes) or dim < 2:
        raise InputFileError(f"{path}: NRRD dimension {dim} does not match sizes {sizes}")
    kinds = [str(k).lower() for k in header["kinds"]] if "kinds" in header else None
    if kinds is not None and len(kinds) != dim:
        raise InputFileError(f"{path}: NRRD kinds {kinds} do not match dimension {dim}")
    directions = header.get("space directions")
    if directions is not None:
        # an array with NaN rows for "none", or a list with None rows when the process-wide
        # nrrd.SPACE_DIRECTIONS_TYPE is "double vector list": read both
        width = next((len(d) for d in directions if d is not None), 3)
        directions = np.array([np.full(width, np.nan) if d is None else d for d in directions], np.float64)
        if directions.shape[0] != dim:
            raise InputFileError(f"{path}: NRRD space directions do not match dimension {dim}")

    # Classify axes (file order, fastest first).
    if directions is not None:
        spatial = [a for a in range(dim) if not np.any(np.isnan(directions[a]))]
    elif kinds is not None:
        spatial = [a for a in range(dim) if kinds[a] in _SPATIAL_KINDS]
    else:
        spatial = [a for a in range(dim) if not (a == 0 and dim > 2 and sizes[0] <= 4)][:3]
    others = [a for a in range(dim) if a not in spatial]
    channel_axis = None
    for a in others:
        if (kinds is not None and kinds[a] in _CHANNEL_KINDS) or (kinds is None and a == 0 and sizes[0] <= 4):
            channel_axis = a
    frame_axes = [a for a in others if a != channel_axis]
    if len(spatial) not in (2, 3) or len(frame_axes) > 1:
        raise UnsupportedImageTypeError(
            f"{path}: NRRD axes (kinds {kinds}, sizes {sizes}) are not 2-D frames: need 2 or 3 spatial axes, "
            "at most one channel axis and at most one frame (list) axis"
        )
    frame_axis = frame_axes[0] if frame_axes else None
    if len(spatial) == 3:
        if frame_axis is not None and sizes[spatial[2]] != 1:
            raise UnsupportedImageTypeError(
                f"{path}: a sequence of 3-D volumes (sizes {sizes}) is not 2-D frames"
            )
        if frame_axis is None:
            if sizes[spatial[2]] > 1 and not any(PLUS_FRAME_FIELD.match(str(k)) for k in header):
                raise UnsupportedImageTypeError(
                    f"{path}: a 3-D volume (sizes {sizes}, kinds {kinds}), not a sequence of 2-D frames: its "
                    "slices would all be placed at the first slice's position. If the third axis is time, "
                    "mark it so (kinds: domain domain list)"
                )
            frame_axis = spatial[2]

    # Geometry -> LPS.
    space = str(header.get("space", "")).lower()
    if space.endswith("-time"):
        raise UnsupportedImageTypeError(f"{path}: NRRD space {space} (with time) is not supported")
    signs = np.array(_SPACE_TO_LPS.get(space, (1.0, 1.0, 1.0)))
    if directions is not None:
        vecs = [directions[a] for a in spatial]
        sdim = directions.shape[1]
    else:
        spacings = np.atleast_1d(header.get("spacings", np.ones(dim))).astype(np.float64)
        spacings = np.where(np.isfinite(spacings), spacings, 1.0)
        sdim = len(spatial)
        vecs = [np.eye(sdim)[n] * spacings[a] for n, a in enumerate(spatial)]
    if sdim not in (2, 3):
        raise UnsupportedImageTypeError(f"{path}: NRRD space dimension {sdim} is not supported")
    origin_nd = np.asarray(header.get("space origin", np.zeros(sdim)), dtype=np.float64).reshape(-1)
    if origin_nd.shape != (sdim,):
        raise InputFileError(f"{path}: NRRD space origin does not have {sdim} numbers")
    origin_nd = np.where(np.isfinite(origin_nd), origin_nd, 0.0)
    spacing = [float(np.linalg.norm(v)) for v in vecs]
    if any(s <= 1e-12 or not math.isfinite(s) for s in spacing):
        raise InputFileError(f"{path}: NRRD space directions have a zero or invalid axis")
    if sdim == 2:
        if len(spatial) != 2:
            raise InputFileError(f"{path}: {len(spatial)} spatial axes in a 2-D NRRD space")
        dir2 = np.stack([v / s for v, s in zip(vecs, spacing, strict=True)], axis=1)
        direction, spacing3, origin3 = embed_geometry(dir2, spacing, origin_nd, path)
    else:
        cols = [v / s for v, s in zip(vecs, spacing, strict=True)]
        if len(cols) == 2:
            k = np.cross(cols[0], cols[1])
            if np.linalg.norm(k) < 1e-12:
                raise InputFileError(f"{path}: NRRD space directions of the two image axes are parallel")
            cols.append(k / np.linalg.norm(k))
            spacing.append(1.0)
        direction = np.stack(cols, axis=1)
        check_direction(direction, path)
        spacing3 = tuple(spacing)  # type: ignore[assignment]
        origin3 = tuple(float(v) for v in origin_nd)  # type: ignore[assignment]
    direction = direction * signs[:, None]
    origin3 = tuple(float(v) for v in np.asarray(origin3) * signs)  # type: ignore[assignment]

    try:
        with open(path, "rb") as fh:
            nrrd.read_header(fh)
            data = nrrd.read_data(header, fh, str(path), index_order="F")
    except OSError as exc:
        raise InputFileError(f"{path}: pixel data cannot be read ({exc.strerror or exc})") from None
    except (zlib.error, EOFError) as exc:
        raise InputFileError(f"{path}: compressed pixel data is corrupt or truncated ({exc})") from None
    except Exception as exc:  # pynrrd: NRRDError / ValueError on size mismatch, bad encoding, ...
        raise InputFileError(
            f"{path}: pixel data does not match the header ({exc}): the file is truncated or its header is "
            "wrong; re-export or re-download it"
        ) from None
    if list(data.shape) != sizes:
        raise InputFileError(f"{path}: pixel data shape {data.shape} does not match sizes {sizes}")

    # To N x H x W x C (C-contiguous).
    if frame_axis is None:
        data = data[..., np.newaxis]
        frame_axis = data.ndim - 1
    if channel_axis is None:
        data = data[..., np.newaxis]
        channel_axis = data.ndim - 1
    order = [frame_axis, spatial[1], spatial[0], channel_axis]
    rest = [a for a in range(data.ndim) if a not in order]  # size-1 third spatial axis of a sequence
    data = np.ascontiguousarray(
        np.transpose(data, order + rest).reshape(
            data.shape[frame_axis], data.shape[spatial[1]], data.shape[spatial[0]], data.shape[channel_axis]
        )
    )
    data = data.astype(data.dtype.newbyteorder("="), copy=False)

    text_header: dict[str, str] = {}
    frame_fields: dict[str, dict[int, str]] = {}
    for key, value in header.items():
        m = PLUS_FRAME_FIELD.match(key)
        if m:
            frame_fields.setdefault(m.group(2), {})[int(m.group(1))] = str(value).strip()
        else:
            text_header[key] = _field_text(value)
    return ParsedFile(
        data=data,
        spacing=spacing3,
        origin=origin3,
        direction=direction,
        header=text_header,
        frame_fields=frame_fields,
        image_type=image_type,
        image_orientation=find_field(header, "ultrasound image orientation", "UltrasoundImageOrientation"),
        extra={
            "format": "NRRD",
            "space": space,
            "third_axis_kind": kinds[frame_axis] if kinds and frame_axis < len(kinds) else "",
        },
    )


def _field_text(value: Any) -> str:
    """A pynrrd header value (number, list, array) as the text it stands for."""
    if isinstance(value, np.ndarray):
        return " ".join(str(v) for v in value.reshape(-1).tolist())
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


SLICER_INDEX_TOLERANCE = 0.001
"""Numeric index values closer than this are ONE item to Slicer's ``vtkMRMLSequenceNode`` (checked with
slicer-core: three items at 5.0, 5.0, 5.0 -- or at 5.0, 5.0005, 5.001 -- load as one)."""

_INDEX_STEP = 2 * SLICER_INDEX_TOLERANCE


class SequenceIndex(NamedTuple):
    """The index of an N-item volume sequence: values (text), name, unit, and the fix-ups made so
    that Slicer keeps every item: ``fixups`` lists ``{"item", "timestamp", "index_value"}`` for each
    item whose timestamp was moved (empty when none was)."""

    values: list[str]
    name: str
    unit: str
    fixups: list[dict[str, Any]]


def unique_index_times(times: Sequence[float]) -> tuple[list[float], list[dict[str, Any]]]:
    """Timestamps made distinct for Slicer, in item order: an item whose time lies within
    1.5 x `SLICER_INDEX_TOLERANCE` of an earlier item's index value is moved to just after it (that
    value + 2 ms, repeated until free); the others keep their time exactly. Returns the index times and
    the fix-ups (`SequenceIndex.fixups`)."""
    used: list[float] = []  # sorted
    out: list[float] = []
    fixups: list[dict[str, Any]] = []
    margin = 1.5 * SLICER_INDEX_TOLERANCE
    for item, t in enumerate(times):
        v = float(t)
        while True:
            at = bisect.bisect_left(used, v - margin)
            clash = [u for u in used[at : at + 3] if abs(u - v) <= margin]
            if not clash:
                break
            v = max(clash) + _INDEX_STEP
        if v != float(t):
            fixups.append({"item": item, "timestamp": float(t), "index_value": v})
        bisect.insort(used, v)
        out.append(v)
    return out, fixups


def sequence_index(n: int, timestamps: Any, reference: UltrasoundSequence | None) -> SequenceIndex:
    """The index of an N-item volume sequence: ``timestamps`` (N numbers, numpy or torch; None -> the
    reference's when it has N) when all finite -> their text (made distinct for Slicer by
    `unique_index_times`, the fix-ups reported), ``"time"``, ``"s"``; otherwise frame numbers
    ``0..N-1``, ``"frame"``, ``""``. `ValueError` when ``timestamps`` does not hold N numbers.
    """
    if timestamps is None and reference is not None and reference.n_frames == n:
        timestamps = reference.timestamps
    if timestamps is not None:
        ts = np.asarray(host_array(timestamps), dtype=np.float64).reshape(-1)
        if ts.shape != (n,):
            raise ValueError(f"timestamps must have {n} entries (one per labelmap), got {ts.shape[0]}")
        if np.all(np.isfinite(ts)):
            times, fixups = unique_index_times(ts.tolist())
            return SequenceIndex([format_number(t) for t in times], "time", "s", fixups)
    return SequenceIndex([str(i) for i in range(n)], "frame", "", [])


# numpy dtype codes -> NRRD pixel type names (the spellings pynrrd reads and writes)
_NRRD_TYPE_NAMES = {
    "i1": "int8", "u1": "uint8", "i2": "int16", "u2": "uint16", "i4": "int32", "u4": "uint32",
    "i8": "int64", "u8": "uint64", "f4": "float", "f8": "double",
}  # fmt: skip


def _vector(values: Sequence[float]) -> str:
    return "(" + ",".join(format_number(v) for v in values) + ")"


def _check_field(key: str, value: str) -> None:
    text = f"{key}{value}"
    if not text.isascii() or re.search(r"[\r\n]", text):
        raise ValueError(f"NRRD header field {key!r} = {value!r}: only ASCII text without line breaks")


def volume_sequence_header(
    item_shape: tuple[int, ...],
    n: int,
    dtype: np.dtype,
    ijk_to_lps: np.ndarray,
    data_node_class: str,
    custom: Sequence[tuple[str, str]],
    index: SequenceIndex | None,
    encoding: str,
    data_file: str | None = None,
) -> bytes:
    """The header of a Slicer volume sequence NRRD (layout in the module docstring) as bytes.

    item_shape: (H, W) or (H, W, C); n: items; dtype: written little-endian; ijk_to_lps: 4x4 of every
    item; custom: ``key:=value`` fields; index: the ``axis 3 index`` fields (None: left out, e.g. in the
    header written while a recording grows); encoding: ``gzip`` or ``raw``; data_file: a detached
    header's data file name. `ValueError` for a pixel type or a field NRRD cannot carry.
    """
    dtype = np.dtype(dtype)
    type_name = _NRRD_TYPE_NAMES.get(dtype.str[1:])
    if type_name is None:
        raise ValueError(f"cannot write pixel type {dtype} to NRRD")
    h, w = int(item_shape[0]), int(item_shape[1])
    m = np.asarray(ijk_to_lps, dtype=np.float64)
    sizes = [str(w), str(h), "1", str(n)]
    directions = [_vector(m[:3, 0]), _vector(m[:3, 1]), _vector(m[:3, 2]), "none"]
    kinds = ["domain", "domain", "domain", "list"]
    labels = ["", "", "", index.name if index is not None else "frame"]
    units = ["", "", "", index.unit if index is not None else ""]
    if len(item_shape) == 3:  # colour: a leading vector axis
        sizes.insert(0, str(int(item_shape[2])))
        directions.insert(0, "none")
        kinds.insert(0, "vector")
        labels.insert(0, "")
        units.insert(0, "")
    lines = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        f"type: {type_name}",
        f"dimension: {len(sizes)}",
        "space: left-posterior-superior",
        "sizes: " + " ".join(sizes),
        "space directions: " + " ".join(directions),
        "kinds: " + " ".join(kinds),
        "labels: " + " ".join(f'"{v}"' for v in labels),
        "units: " + " ".join(f'"{v}"' for v in units),
    ]
    if dtype.itemsize > 1:
        lines.append("endian: little")
    lines.append(f"encoding: {encoding}")
    lines.append("space origin: " + _vector(m[:3, 3]))
    if data_file is not None:
        lines.append(f"data file: {data_file}")
    fields = [("DataNodeClassName", data_node_class), *custom]
    if index is not None:
        fields += [("axis 3 index type", "numeric"), ("axis 3 index values", " ".join(index.values))]
    for key, value in fields:
        _check_field(key, value)
        lines.append(f"{key}:={value}")
    return ("\n".join(lines) + "\n\n").encode("ascii")


_CHUNK_BYTES = 16 * 2**20


class VolumeSequenceWriter:
    """Writes a Slicer volume sequence NRRD item by item: memory holds one item, whatever N is.

    Why not pynrrd's writer: it needs the whole N-item array in memory (and copies it once more to
    bytes); a recording of unknown length cannot be. Items are appended to a raw data file beside
    ``path``; `finish` writes the NRRD (header + gzip or raw data, streamed in chunks) atomically and
    removes the raw file. pynrrd still reads everything back (tests).

    path: the ``.seq.nrrd`` to write. geometry: anything with ``ijk_to_lps()`` (4x4, LPS; every item
    gets it). data_node_class: the MRML class Slicer creates per item. compress: gzip (level 1) or
    raw. live_header: keep ``<stem>.nhdr`` + ``<stem>.raw`` (``segmentation.seq.nhdr`` +
    ``segmentation.seq.raw`` for ``segmentation.seq.nrrd``) as a readable detached NRRD while
    writing (the header is rewritten atomically after each item; without index values): what a
    killed process leaves is readable. Otherwise the raw file is hidden (``.<name>.<random>.raw``).

    Items: HxW or HxWxC arrays, all of one shape; their dtype is the first item's, widened (the raw
    file rewritten once) when a later item needs a wider unsigned type (uint8 -> uint16 -> uint32).
    Files get mode 0644 less the umask.
    """

    def __init__(
        self,
        path: str | Path,
        geometry: Any,
        data_node_class: str,
        compress: bool = True,
        live_header: bool = False,
    ) -> None:
        self.path = Path(path)
        self.ijk_to_lps = np.asarray(geometry.ijk_to_lps(), dtype=np.float64)
        self.data_node_class = data_node_class
        self.compress = compress
        self.live_header = live_header
        stem = self.path.name[: -len(".nrrd")] if self.path.name.endswith(".nrrd") else self.path.name
        if live_header:
            self.raw_path = self.path.with_name(stem + ".raw")
            self.header_path: Path | None = self.path.with_name(stem + ".nhdr")
        else:
            self.raw_path = self.path.with_name(f".{self.path.name}.{secrets.token_hex(6)}.raw")
            self.header_path = None
        self.custom: list[tuple[str, str]] = []
        self.item_shape: tuple[int, ...] | None = None
        self.dtype: np.dtype | None = None
        self.n = 0
        self._raw: Any = None

    def _open_raw(self, mode: str) -> Any:
        flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_BINARY", 0)
        flags |= os.O_APPEND if mode == "ab" else os.O_TRUNC
        return os.fdopen(os.open(self.raw_path, flags, 0o644), mode)

    def append(self, item: Any, custom: Sequence[tuple[str, str]] | None = None) -> None:
        """Append one item (HxW or HxWxC, numpy or torch on any device). ``custom``: the ``key:=value``
        fields from now on (validated here). `ValueError` for another shape, a pixel type that does not
        fit, or a field NRRD cannot carry."""
        array = host_array(item)
        if custom is not None:
            for key, value in custom:
                _check_field(key, value)
            self.custom = list(custom)
        if self.item_shape is None:
            if array.ndim not in (2, 3) or min(array.shape) < 1:
                raise ValueError(f"a sequence item must be HxW or HxWxC, got shape {array.shape}")
            if array.dtype == np.bool_:
                array = array.astype(np.uint8)
            if array.dtype.str[1:] not in _NRRD_TYPE_NAMES:
                raise ValueError(f"cannot write pixel type {array.dtype} to NRRD")
            self.item_shape = tuple(int(d) for d in array.shape)
            self.dtype = np.dtype(array.dtype.str[1:]).newbyteorder("<")
            self.raw_path.parent.mkdir(parents=True, exist_ok=True)
            self._raw = self._open_raw("wb")
        elif tuple(array.shape) != self.item_shape:
            raise ValueError(
                f"sequence item of shape {array.shape}, the sequence's items are {self.item_shape}"
            )
        assert self.dtype is not None
        if array.dtype != self.dtype and not np.can_cast(array.dtype, self.dtype, casting="safe"):
            if (
                array.dtype.kind == "u"
                and self.dtype.kind == "u"
                and array.dtype.itemsize > self.dtype.itemsize
            ):
                self._widen(np.dtype(array.dtype.str[1:]).newbyteorder("<"))
            elif array.dtype == np.bool_:
                pass
            else:
                raise ValueError(
                    f"sequence item of pixel type {array.dtype} does not fit the sequence's {self.dtype}"
                )
        self._raw.write(np.ascontiguousarray(array, dtype=self.dtype).tobytes())
        self._raw.flush()
        self.n += 1
        if self.header_path is not None:
            self._write_live_header()

    def _write_live_header(self) -> None:
        assert self.item_shape is not None and self.dtype is not None and self.header_path is not None
        head = volume_sequence_header(
            self.item_shape, self.n, self.dtype, self.ijk_to_lps, self.data_node_class, self.custom,
            None, "raw", self.raw_path.name,
        )  # fmt: skip
        atomic_write(self.header_path, lambda fh: fh.write(head))

    def _widen(self, dtype: np.dtype) -> None:
        """Rewrite the raw file with a wider pixel type (once per widening)."""
        assert self.dtype is not None
        self._raw.close()
        tmp = self.raw_path.with_name(self.raw_path.name + ".part")
        with (
            self.raw_path.open("rb") as src,
            os.fdopen(
                os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o644), "wb"
            ) as dst,
        ):
            step = _CHUNK_BYTES - _CHUNK_BYTES % self.dtype.itemsize
            while chunk := src.read(step):
                dst.write(np.frombuffer(chunk, self.dtype).astype(dtype).tobytes())
        os.replace(tmp, self.raw_path)
        self.dtype = dtype
        self._raw = self._open_raw("ab")

    def finish(self, index: SequenceIndex, custom: Sequence[tuple[str, str]] | None = None) -> Path | None:
        """Write the NRRD at ``path`` (atomically) with ``index`` (N values) and ``custom`` fields (default:
        the last given), remove the raw file (and live header). Returns the path, or None when no item
        was appended (nothing is written). `ValueError` when the index does not hold N values."""
        if custom is not None:
            for key, value in custom:
                _check_field(key, value)
            self.custom = list(custom)
        if self._raw is None:
            return None
        self._raw.close()
        assert self.item_shape is not None and self.dtype is not None
        if len(index.values) != self.n:
            raise ValueError(f"{len(index.values)} index values for {self.n} sequence items")
        head = volume_sequence_header(
            self.item_shape, self.n, self.dtype, self.ijk_to_lps, self.data_node_class, self.custom,
            index, "gzip" if self.compress else "raw",
        )  # fmt: skip

        def write(fh: BinaryIO) -> None:
            fh.write(head)
            gz = zlib.compressobj(1, zlib.DEFLATED, 31) if self.compress else None  # 31: a gzip member
            with self.raw_path.open("rb") as src:
                while chunk := src.read(_CHUNK_BYTES):
                    fh.write(gz.compress(chunk) if gz is not None else chunk)
            if gz is not None:
                fh.write(gz.flush())

        atomic_write(self.path, write)
        self._remove_work_files()
        return self.path

    def abort(self) -> None:
        """Stop without writing ``path``: the raw file (and live header) are removed."""
        if self._raw is not None:
            self._raw.close()
        self._remove_work_files()

    def _remove_work_files(self) -> None:
        self.raw_path.unlink(missing_ok=True)
        if self.header_path is not None:
            self.header_path.unlink(missing_ok=True)
        self._raw = None


def write_volume_sequence(
    path: Path,
    data: np.ndarray,
    reference: Geometry,
    index: SequenceIndex,
    data_node_class: str,
    custom: Sequence[tuple[str, str]],
    compress: bool,
) -> None:
    """Write ``data`` (N x H x W, or N x H x W x C colour) as a Slicer volume sequence NRRD at ``path``
    (layout in the module docstring), atomically, item by item (`VolumeSequenceWriter`).

    reference: the geometry (LPS) every item gets. index: from `sequence_index`. data_node_class: the
    MRML class Slicer creates per item. custom: ``key:=value`` fields in order. compress: gzip at level
    1 (the fastest) or raw. `ValueError` for a pixel type NRRD cannot hold or a field value NRRD cannot
    carry (non-ASCII text or a line break: NRRD header lines are ASCII); nothing is left behind then.
    """
    if data.dtype.str[1:] not in _NRRD_TYPE_NAMES:
        raise ValueError(f"cannot write pixel type {data.dtype} to NRRD")
    for key, value in custom:
        _check_field(key, value)
    writer = VolumeSequenceWriter(path, reference, data_node_class, compress)
    try:
        for item in data:
            writer.append(item, custom)
        writer.finish(index, custom)
    except BaseException:
        writer.abort()
        raise
