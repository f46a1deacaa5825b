"""NRRD (``.nrrd`` / ``.nhdr``, the format of PLUS ``.igs.nrrd`` and Slicer ``.seq.nrrd`` volume sequences),
read and written with pynrrd.

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
`write_volume_sequence` writes N frames (or labelmaps) as one NRRD in the layout Slicer's
``vtkMRMLVolumeSequenceStorageNode`` writes and reads (checked with slicer-core, see
Testing/test_io.py), through ``nrrd.write`` (index order C, so ``sizes`` is W H 1 N)::

    type: uint8 (the data's) | dimension: 4 | space: left-posterior-superior | sizes: W H 1 N
    space directions: <i> <j> <k> none | kinds: domain domain domain list
    labels: "" "" "" "time" | units: "" "" "" "s" | space origin: <origin> | encoding: gzip | raw
    DataNodeClassName:=vtkMRMLLabelMapVolumeNode (or ScalarVolume / VectorVolume)
    <custom fields>:=...  (e.g. Slicer's Segment<n>_* fields, PLUS per-frame fields)
    axis 3 index type:=numeric | axis 3 index values:=<timestamps or frame numbers>

Colour frames get a leading ``vector`` axis (``sizes: 3 W H 1 N``, ``space directions: none ...``);
the index fields stay on "axis 3", as Slicer writes them whatever the components. Slicer loads the
file as a sequence whose item n has voxel (i, j) on the RAS point of voxel (i, j) of input frame n,
the custom fields becoming attributes of the sequence node.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def sequence_index(
    n: int, timestamps: Any, reference: UltrasoundSequence | None
) -> tuple[list[str], str, str]:
    """(index values as text, index name, index unit) of an N-item volume sequence: ``timestamps`` (N
    numbers, numpy or torch; None -> the reference's when it has N) when all finite -> their text,
    ``"time"``, ``"s"``; otherwise frame numbers ``0..N-1``, ``"frame"``, ``""``. `ValueError` when
    ``timestamps`` does not hold N numbers.
    """
    if timestamps is None and reference is not None and reference.n_frames == n:
        timestamps = reference.timestamps
    if timestamps is not None:
        ts = np.asarray(host_array(timestamps), dtype=np.float64).reshape(-1)
        if ts.shape != (n,):
            raise ValueError(f"timestamps must have {n} entries (one per labelmap), got {ts.shape[0]}")
        if np.all(np.isfinite(ts)):
            return [format_number(t) for t in ts], "time", "s"
    return [str(i) for i in range(n)], "frame", ""


def write_volume_sequence(
    path: Path,
    data: np.ndarray,
    reference: Geometry,
    index: tuple[Sequence[str], str, str],
    data_node_class: str,
    custom: Sequence[tuple[str, str]],
    compress: bool,
) -> None:
    """Write ``data`` (N x H x W, or N x H x W x C colour) as a Slicer volume sequence NRRD at ``path``
    (layout in the module docstring), atomically, with pynrrd's writer.

    reference: the geometry (LPS) every item gets. index: (values, name, unit) from `sequence_index`.
    data_node_class: the MRML class Slicer creates per item. custom: ``key:=value`` fields in order.
    compress: gzip at level 1 (the fastest) or raw. `ValueError` for a pixel type NRRD cannot hold or
    a field value NRRD cannot carry (non-ASCII text or a line break: NRRD header lines are ASCII).
    """
    if data.dtype.str[1:] not in _NRRD_PIXEL_TYPES:
        raise ValueError(f"cannot write pixel type {data.dtype} to NRRD")
    values, index_name, index_unit = index
    m = reference.ijk_to_lps()
    none = np.full(3, np.nan)  # pynrrd writes an all-NaN direction as "none"
    directions = [m[:3, 0], m[:3, 1], m[:3, 2], none]
    kinds = ["domain", "domain", "domain", "list"]
    labels = ["", "", "", index_name]
    units = ["", "", "", index_unit]
    items = data[:, np.newaxis]  # N x 1 x H x W (x C): written in C order, sizes W H 1 N (C first)
    if data.ndim == 4:
        directions.insert(0, none)
        kinds.insert(0, "vector")
        labels.insert(0, "")
        units.insert(0, "")
    header: dict[str, Any] = {
        "space": "left-posterior-superior",
        "space directions": np.stack(directions),
        "kinds": kinds,
        "labels": labels,
        "units": units,
        "encoding": "gzip" if compress else "raw",
        "space origin": m[:3, 3],
        "DataNodeClassName": data_node_class,
    }
    fields = [*custom, ("axis 3 index type", "numeric"), ("axis 3 index values", " ".join(values))]
    for key, value in fields:
        text = f"{key}{value}"
        if not text.isascii() or re.search(r"[\r\n]", text):
            raise ValueError(f"NRRD header field {key!r} = {value!r}: only ASCII text without line breaks")
        header[key] = value
    items = np.ascontiguousarray(items)
    atomic_write(path, lambda fh: nrrd.write(fh, items, header, compression_level=1, index_order="C"))


# numpy dtype codes pynrrd writes as NRRD pixel types
_NRRD_PIXEL_TYPES = {"i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f4", "f8"}
