"""Recorded-ultrasound input (PLUS sequence files, single images, arrays) and the segmentation output.

Reading: `read_sequence(source)` -> `UltrasoundSequence` (frames N x H x W, geometry, timestamps,
tracking transforms with status). Writing: `write_segmentation_sequence` (one labelmap per frame, the
input's geometry, a Slicer volume sequence), `write_image` (frames as a PLUS .mha or a Slicer .seq.nrrd).
One reader per file ending in `FORMAT_READERS`; `reader_for(path)` picks it or says what is supported.

Formats read
------------
- MetaImage ``.igs.mha`` / ``.seq.mha`` / ``.mha`` (data after ``ElementDataFile = LOCAL``) and ``.mhd``
  (data in the file named by ``ElementDataFile``): own parser. Raw or zlib/gzip compressed
  (``CompressedData = True``), binary or ASCII, any byte order, MET_UCHAR/CHAR/SHORT/USHORT/INT/UINT/
  LONG/ULONG/LONG_LONG/ULONG_LONG/FLOAT/DOUBLE, ``ElementNumberOfChannels`` 1, 3 or 4. ``NDims`` 2 (one
  frame) or 3 (the third axis is the frame axis; PLUS writes ``Kinds = domain domain list``).
- NRRD ``.igs.nrrd`` / ``.seq.nrrd`` / ``.nrrd`` / ``.nhdr`` (pynrrd; raw, gzip, bzip2, ascii): axes are
  classified as spatial (a ``space directions`` vector, or kind ``domain``/``space``), channel (kind
  ``vector``, ``RGB-color``, ... or no direction and size <= 4 on axis 0) and frame (the remaining
  ``list``/``time`` axis). This reads PLUS files (``kinds: domain domain list``, ``space dimension: 2``),
  PLUS colour (``kinds: vector domain domain``) and Slicer volume sequences (``kinds: domain domain
  domain list`` with a size-1 third axis, or the older ``list domain domain domain``).
- ``.npy`` arrays (``allow_pickle=False``), and numpy arrays / torch tensors passed in directly:
  HxW (one frame), NxHxW, HxWx3|4 (one colour frame: a 3-D array whose last axis has length 3 or 4 is
  read as colour), NxHxWx3|4. Unit spacing, zero origin, identity direction.

PLUS per-frame header fields are parsed in both formats (MetaImage ``Key = value``, NRRD
``key:=value``): ``Seq_FrameNNNN_<Name>Transform`` (16 numbers, row-major 4x4) ->
``transforms[<Name>]`` (N x 4 x 4 float64), ``..._<Name>TransformStatus`` -> ``transform_status[<Name>]``
(True where ``OK``), ``..._Timestamp`` -> ``timestamps`` (seconds, NaN where absent),
``..._ImageStatus`` / ``..._Status`` -> ``frame_status`` (True where ``OK``; True when the file has no
status field). A transform missing for a frame is all-NaN with status False (never a made-up matrix).
Other per-frame fields are kept as strings in ``metadata["frame_fields"]``.

Refused: RF data (``UltrasoundImageType`` / ``ultrasound image type`` starting with ``RF``) raises
`UnsupportedImageTypeError` naming the type and the file, before the pixel data is read. Missing,
empty, truncated, corrupt, lying or unknown-format files raise `InputFileError` naming the file and
what is wrong; pixel data is used only when its size matches the header exactly.

Pixel values
------------
The pipeline wants HxW uint8 brightness frames. ``read_sequence(..., intensity="uint8")`` (default)
gives uint8: uint8 data is untouched; bool -> 0/255; integer data already within 0..255 is cast
losslessly; float data within [0, 1] is scaled by 255; anything else is mapped linearly from the
sequence's finite [min, max] to [0, 255] (one mapping for all frames, NaN/inf -> 0). What was done is in
``metadata["intensity"]``. ``intensity="keep"`` keeps the file's dtype. Colour is converted to
luminance by default with ITU-R BT.601 weights, Y = 0.299 R + 0.587 G + 0.114 B, rounded to nearest
(ties to even) and clipped to 0..255 for uint8 input; ``color="rgb"`` keeps N x H x W x 3 (alpha dropped).

Geometry conventions (exact)
----------------------------
Voxel index (i, j, k): i = column (x, fastest in the file), j = row (y), k = frame / slice axis.
``frames[n, j, i]`` is the voxel (i, j) of frame n. ``spacing`` = (x, y, z) in mm; ``origin`` and
``direction`` (3x3, column a = unit direction of index axis a) are in **LPS** (patient left, posterior,
superior), the physical space of ITK, MetaImage and DICOM::

    p_LPS = origin + direction @ (spacing * (i, j, k))        (ijk_to_lps(), 4x4)
    p_RAS = diag(-1, -1, 1) @ p_LPS                           (ijk_to_ras(), 4x4, what Slicer shows)

- MetaImage: ``Offset`` is the origin, ``ElementSpacing`` the spacing, ``TransformMatrix`` holds the
  axis directions one after the other (numbers 3a..3a+2 = direction of axis a, i.e. the direction
  matrix column by column). ``AnatomicalOrientation`` is ignored, as ITK and Slicer do (PLUS writes
  ``RAI``, which is ITK's name for LPS). Checked against slicer-core: an identity-geometry PLUS file
  loads in Slicer with IJKToRAS = diag(-1, -1, 1).
- NRRD: ``space origin`` / ``space directions``; ``space: right-anterior-superior`` (or LAS) is
  converted to LPS on read; no ``space`` field (PLUS writes only ``space dimension: 2``) and the
  scanner/3D-handed spaces are taken as LPS, as ITK and Slicer do.
- 2-D images / 2-D spaces are embedded in 3-D with k = (0, 0, 1), z spacing 1, origin z 0 (ITK's
  embedding). A 3-D image is read as a stack of 2-D frames along k; z spacing comes from the file.
  Every frame shares one 2-D geometry (that of frame 0): right for PLUS sequences, whose third axis is
  a list of frames placed in space by the tracking transforms, not a spatial axis.
- Frames are never re-oriented: ``image_orientation`` (``MF``, ``MFA``, ...) reports how PLUS stored
  them (M/U = marked/unmarked transducer side at column 0, F/N = far/near at row 0).

Segmentation output (``write_segmentation_sequence``)
-----------------------------------------------------
Slicer has no single-file segmentation *sequence* format (segmentation sequences are saved as .mrb
bundles), so the output is a **labelmap volume sequence** in the layout Slicer's
``vtkMRMLVolumeSequenceStorageNode`` writes and reads (checked with slicer-core, see the tests)::

    type: unsigned char | dimension: 4 | space: left-posterior-superior | sizes: W H 1 N
    space directions: <i> <j> <k> none | kinds: domain domain domain list
    labels: "" "" "" "time" | units: "" "" "" "s" | space origin: <origin>
    DataNodeClassName:=vtkMRMLLabelMapVolumeNode
    axis 3 index type:=numeric | axis 3 index values:=<timestamps or frame numbers>
    Segment<n>_ID/_Name/_Color/_LabelValue/_Layer:=... (Slicer .seg.nrrd names; Color is RGB 0..1)

Slicer loads it as a sequence of labelmap volumes whose voxel (i, j) lies on the RAS point of the
input frame's voxel (i, j); the segment fields become attributes of the sequence node.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import tempfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from UltramotionIGTLib.errors import InputFileError, UnsupportedImageTypeError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""4x4 matrix taking LPS points to RAS points (and back: it is its own inverse)."""

BT601_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights for R, G, B."""

_FRAME_FIELD = re.compile(r"^Seq_Frame(\d+)_(.+)$")


# --------------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------------


class _Geometry:
    """IJK -> physical matrices from ``spacing``, ``origin`` and ``direction`` (LPS)."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 float64: homogeneous (i, j, k, 1) -> LPS mm. Column a = direction[:, a] * spacing[a]."""
        m = np.eye(4)
        m[:3, :3] = np.asarray(self.direction, dtype=np.float64) * np.asarray(self.spacing, dtype=np.float64)
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 float64: (i, j, k, 1) -> RAS mm, i.e. ``diag(-1, -1, 1, 1) @ ijk_to_lps()`` (Slicer's IJKToRAS)."""
        return LPS_TO_RAS @ self.ijk_to_lps()


def _as_vec3(value: Any, name: str) -> tuple[float, float, float]:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be 3 finite numbers, got {value!r}")
    return (float(arr[0]), float(arr[1]), float(arr[2]))


@dataclass
class UltrasoundSequence(_Geometry):
    """A recorded ultrasound sequence on the host (numpy).

    frames: N x H x W (uint8 after the default reading; other scalar dtypes with ``intensity="keep"``)
    or N x H x W x 3 (colour kept with ``color="rgb"``). spacing (x = columns, y = rows, z) mm, origin
    and direction (3x3, column a = unit direction of index axis i, j, k) in LPS: see the module
    docstring. timestamps: N float64 seconds (NaN where absent). transforms: name (e.g.
    ``"ProbeToTracker"``) -> N x 4 x 4 float64; transform_status: name -> N bool (True = OK).
    frame_status: N bool (True = OK). image_orientation (``"MF"``, ``"MFA"``, ``""``), image_type
    (``"BRIGHTNESS"``, ``""``), path (file read, or None), metadata (other header fields).
    """

    frames: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    timestamps: np.ndarray | None = None
    transforms: dict[str, np.ndarray] = field(default_factory=dict)
    transform_status: dict[str, np.ndarray] = field(default_factory=dict)
    frame_status: np.ndarray | None = None
    image_orientation: str = ""
    image_type: str = ""
    path: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        frames = np.asarray(self.frames)
        if frames.ndim == 4 and frames.shape[-1] != 3:
            raise ValueError(f"colour frames must be N x H x W x 3, got shape {frames.shape}")
        if frames.ndim not in (3, 4):
            raise ValueError(f"frames must be N x H x W or N x H x W x 3, got shape {frames.shape}")
        self.frames = frames
        n = frames.shape[0]
        self.spacing = _as_vec3(self.spacing, "spacing")
        self.origin = _as_vec3(self.origin, "origin")
        direction = np.asarray(self.direction, dtype=np.float64)
        if direction.shape != (3, 3) or not np.all(np.isfinite(direction)):
            raise ValueError(f"direction must be a finite 3x3 matrix, got {self.direction!r}")
        self.direction = direction
        if self.timestamps is None:
            self.timestamps = np.full(n, np.nan)
        self.timestamps = np.asarray(self.timestamps, dtype=np.float64).reshape(-1)
        if self.frame_status is None:
            self.frame_status = np.ones(n, dtype=bool)
        self.frame_status = np.asarray(self.frame_status, dtype=bool).reshape(-1)
        if self.timestamps.shape != (n,) or self.frame_status.shape != (n,):
            raise ValueError(f"timestamps and frame_status must have {n} entries (one per frame)")
        for name, mats in list(self.transforms.items()):
            mats = np.asarray(mats, dtype=np.float64)
            if mats.shape != (n, 4, 4):
                raise ValueError(f"transforms[{name!r}] must be {n} x 4 x 4, got {mats.shape}")
            self.transforms[name] = mats
            status = self.transform_status.get(name)
            status = np.ones(n, dtype=bool) if status is None else np.asarray(status, dtype=bool).reshape(-1)
            if status.shape != (n,):
                raise ValueError(f"transform_status[{name!r}] must have {n} entries")
            self.transform_status[name] = status
        if self.path is not None:
            self.path = Path(self.path)

    @property
    def n_frames(self) -> int:
        """Number of frames N."""
        return int(self.frames.shape[0])

    @property
    def frame_shape(self) -> tuple[int, int]:
        """(H, W): rows, columns of one frame."""
        return int(self.frames.shape[1]), int(self.frames.shape[2])

    @property
    def is_color(self) -> bool:
        """True when frames are N x H x W x 3."""
        return self.frames.ndim == 4

    def __len__(self) -> int:
        return self.n_frames

    def subset(self, indices: Iterable[int] | slice) -> UltrasoundSequence:
        """A new sequence with the frames at ``indices`` (ints, range, slice or array; copies)."""
        n = self.n_frames
        idx = (
            np.arange(n)[indices] if isinstance(indices, slice) else np.asarray(list(indices), dtype=np.int64)
        )
        if idx.ndim != 1:
            raise ValueError("subset indices must be one-dimensional")
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"subset indices out of range for {n} frames")
        metadata = dict(self.metadata)
        if "frame_fields" in metadata:
            metadata["frame_fields"] = {k: [v[i] for i in idx] for k, v in metadata["frame_fields"].items()}
        return UltrasoundSequence(
            frames=self.frames[idx].copy(),
            spacing=self.spacing,
            origin=self.origin,
            direction=self.direction.copy(),
            timestamps=self.timestamps[idx].copy(),
            transforms={k: v[idx].copy() for k, v in self.transforms.items()},
            transform_status={k: v[idx].copy() for k, v in self.transform_status.items()},
            frame_status=self.frame_status[idx].copy(),
            image_orientation=self.image_orientation,
            image_type=self.image_type,
            path=self.path,
            metadata=metadata,
        )


@dataclass
class SegmentInfo:
    """One segment of a labelmap: voxel value, name, display colour (RGB, 0..1)."""

    value: int
    name: str
    color: tuple[float, float, float]


@dataclass
class SegmentationSequence(_Geometry):
    """What `read_segmentation_sequence` returns.

    labelmaps: N x H x W uint8; spacing/origin/direction in LPS as in `UltrasoundSequence`;
    index_values: the sequence index of each item (strings, as Slicer stores them); timestamps: the
    same as float64 (NaN where not numeric); index_name / index_unit (e.g. ``"time"``, ``"s"``);
    segments: `SegmentInfo` per ``Segment<n>_*`` field group; header: all header fields.
    """

    labelmaps: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    index_values: list[str]
    timestamps: np.ndarray
    index_name: str = ""
    index_unit: str = ""
    segments: list[SegmentInfo] = field(default_factory=list)
    header: dict[str, Any] = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return int(self.labelmaps.shape[0])

    @property
    def frame_shape(self) -> tuple[int, int]:
        return int(self.labelmaps.shape[1]), int(self.labelmaps.shape[2])


# --------------------------------------------------------------------------------------------------
# Parsed file (internal): pixel data N x H x W x C in file dtype, geometry in LPS, header fields.
# --------------------------------------------------------------------------------------------------


@dataclass
class _Parsed:
    data: np.ndarray  # N x H x W x C
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    header: dict[str, str]  # all non-per-frame fields, values as text
    frame_fields: dict[str, dict[int, str]]  # field name -> frame index -> value text
    image_type: str = ""
    image_orientation: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _norm_key(key: str) -> str:
    return re.sub(r"[\s_]", "", key).lower()


def _find_field(header: dict[str, Any], *names: str) -> str:
    wanted = {_norm_key(n) for n in names}
    for key, value in header.items():
        if _norm_key(key) in wanted:
            return str(value).strip()
    return ""


def _check_image_type(image_type: str, path: Path) -> None:
    if image_type.upper().startswith("RF"):
        raise UnsupportedImageTypeError(
            f"{path}: UltrasoundImageType is {image_type}: radio-frequency (RF) echo data, not a B-mode "
            "image to segment. Record or export BRIGHTNESS (B-mode) frames instead."
        )


# --------------------------------------------------------------------------------------------------
# MetaImage
# --------------------------------------------------------------------------------------------------

_MET_TYPES: dict[str, str] = {
    "MET_UCHAR": "u1",
    "MET_CHAR": "i1",
    "MET_SHORT": "i2",
    "MET_USHORT": "u2",
    "MET_INT": "i4",
    "MET_UINT": "u4",
    "MET_LONG": "i4",
    "MET_ULONG": "u4",
    "MET_LONG_LONG": "i8",
    "MET_ULONG_LONG": "u8",
    "MET_FLOAT": "f4",
    "MET_DOUBLE": "f8",
}
_NUMPY_TO_MET = {
    "u1": "MET_UCHAR",
    "i1": "MET_CHAR",
    "i2": "MET_SHORT",
    "u2": "MET_USHORT",
    "i4": "MET_INT",
    "u4": "MET_UINT",
    "i8": "MET_LONG_LONG",
    "u8": "MET_ULONG_LONG",
    "f4": "MET_FLOAT",
    "f8": "MET_DOUBLE",
}


def _floats(text: str, count: int, key: str, path: Path) -> list[float]:
    try:
        values = [float(v) for v in text.split()]
    except ValueError:
        raise InputFileError(f"{path}: header field {key} = {text!r} is not a list of numbers") from None
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise InputFileError(f"{path}: header field {key} must hold {count} finite numbers, got {text!r}")
    return values


def _parse_metaimage_header(raw: bytes, path: Path) -> tuple[dict[str, str], dict[str, dict[int, str]], int]:
    """Header fields, per-frame fields and the byte offset just after the ElementDataFile line."""
    header: dict[str, str] = {}
    frame_fields: dict[str, dict[int, str]] = {}
    pos, line_no = 0, 0
    while True:
        end = raw.find(b"\n", pos)
        if end < 0:
            end = len(raw)
        line_no += 1
        line = raw[pos:end].decode("latin-1").rstrip("\r")
        if "\x00" in line:
            raise InputFileError(
                f"{path}: binary data before an 'ElementDataFile' line: not a MetaImage file, or its header is cut"
            )
        pos = end + 1
        if line.strip():
            key, sep, value = line.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key or " " in key:
                raise InputFileError(
                    f"{path}: line {line_no} ({line[:60]!r}) is not 'Key = Value': not a MetaImage (.mha/.mhd) file"
                )
            m = _FRAME_FIELD.match(key)
            if m:
                frame_fields.setdefault(m.group(2), {})[int(m.group(1))] = value
            else:
                header[key] = value
            if key == "ElementDataFile":
                return header, frame_fields, min(pos, len(raw))
        if end >= len(raw):
            raise InputFileError(
                f"{path}: no 'ElementDataFile' line: not a MetaImage file, or its header is truncated"
            )


def _read_metaimage(path: Path) -> _Parsed:
    raw = _read_bytes(path)
    header, frame_fields, data_offset = _parse_metaimage_header(raw, path)
    object_type = header.get("ObjectType", "Image")
    if object_type.lower() != "image":
        raise InputFileError(f"{path}: ObjectType = {object_type}, expected Image")
    for required in ("NDims", "DimSize", "ElementType"):
        if required not in header:
            raise InputFileError(f"{path}: MetaImage header has no {required} field")
    try:
        ndims = int(header["NDims"])
    except ValueError:
        raise InputFileError(f"{path}: NDims = {header['NDims']!r} is not an integer") from None
    if ndims not in (2, 3):
        raise UnsupportedImageTypeError(
            f"{path}: NDims = {ndims}; only 2-D images and 2-D+frames (3-D) are read"
        )
    try:
        dims = [int(v) for v in header["DimSize"].split()]
    except ValueError:
        raise InputFileError(f"{path}: DimSize = {header['DimSize']!r} is not a list of integers") from None
    if len(dims) != ndims or min(dims) < 1:
        raise InputFileError(f"{path}: DimSize = {header['DimSize']!r} must hold {ndims} positive sizes")

    image_type = _find_field(header, "UltrasoundImageType")
    _check_image_type(image_type, path)

    element_type = header["ElementType"].upper().removesuffix("_ARRAY")
    if element_type not in _MET_TYPES:
        raise UnsupportedImageTypeError(f"{path}: ElementType {header['ElementType']} is not supported")
    channels = int(header.get("ElementNumberOfChannels", "1") or 1)
    if channels < 1:
        raise InputFileError(f"{path}: ElementNumberOfChannels = {channels}")
    msb = (
        header.get("BinaryDataByteOrderMSB") or header.get("ElementByteOrderMSB") or "False"
    ).lower() == "true"
    dtype = np.dtype(_MET_TYPES[element_type]).newbyteorder(">" if msb else "<")

    w, h = dims[0], dims[1]
    n = dims[2] if ndims == 3 else 1
    count = w * h * n * channels
    nbytes = count * dtype.itemsize

    # Where the pixel bytes are: after the header (LOCAL) or in a separate file (.mhd + .raw).
    data_file = header["ElementDataFile"]
    if data_file.upper() == "LOCAL":
        payload = raw[data_offset:]
        data_name = str(path)
    else:
        if data_file.upper().startswith("LIST") or "%" in data_file or len(data_file.split()) > 1:
            raise UnsupportedImageTypeError(
                f"{path}: multi-file pixel data (ElementDataFile = {data_file}) is not supported"
            )
        data_path = (path.parent / data_file) if not Path(data_file).is_absolute() else Path(data_file)
        payload = _read_bytes(data_path, allow_empty=True, role=f"pixel data file of {path}")
        data_name = str(data_path)
        header_size = int(header.get("HeaderSize", "0") or 0)
        if header_size == -1:
            payload = payload[max(len(payload) - nbytes, 0) :]
        elif header_size > 0:
            payload = payload[header_size:]

    compressed = header.get("CompressedData", "False").lower() == "true"
    binary = header.get("BinaryData", "True").lower() == "true"
    if compressed:
        declared = header.get("CompressedDataSize")
        if declared:
            try:
                declared_size = int(declared)
            except ValueError:
                raise InputFileError(f"{path}: CompressedDataSize = {declared!r} is not an integer") from None
            if declared_size > len(payload):
                raise InputFileError(
                    f"{data_name}: header declares {declared_size} bytes of compressed pixel data but the file "
                    f"holds {len(payload)}: the file is truncated"
                )
            payload = payload[:declared_size]
        decomp = zlib.decompressobj(wbits=47)  # zlib or gzip header, auto-detected
        try:
            buf = decomp.decompress(payload, nbytes + 1)
        except zlib.error as exc:
            raise InputFileError(f"{data_name}: compressed pixel data is corrupt ({exc})") from None
        if len(buf) > nbytes:
            raise InputFileError(
                f"{data_name}: compressed pixel data holds more than the {nbytes} bytes the header's "
                f"DimSize {header['DimSize']} / {header['ElementType']} declares: header and data disagree"
            )
        if len(buf) < nbytes or not decomp.eof:
            raise InputFileError(
                f"{data_name}: compressed pixel data ends early ({len(buf)} of {nbytes} bytes"
                f"{'' if decomp.eof else ', stream not terminated'}): the file is truncated or corrupt"
            )
        flat = np.frombuffer(buf, dtype=dtype)
    elif binary:
        if len(payload) != nbytes:
            what = "truncated" if len(payload) < nbytes else "longer than its header says"
            raise InputFileError(
                f"{data_name}: holds {len(payload)} bytes of pixel data but the header (DimSize "
                f"{header['DimSize']}, {header['ElementType']}, {channels} channel(s)) needs {nbytes}: the file is {what}"
            )
        flat = np.frombuffer(payload, dtype=dtype)
    else:
        try:
            flat = np.array(payload.decode("latin-1").split(), dtype=np.float64)
        except ValueError:
            raise InputFileError(
                f"{data_name}: ASCII pixel data holds something that is not a number"
            ) from None
        if flat.size != count:
            raise InputFileError(
                f"{data_name}: ASCII pixel data holds {flat.size} values, header needs {count}"
            )
        flat = flat.astype(dtype.newbyteorder("="))
    data = flat.reshape(n, h, w, channels).astype(dtype.newbyteorder("="), copy=True)

    spacing = _floats(
        header.get("ElementSpacing") or header.get("ElementSize") or " ".join(["1"] * ndims),
        ndims,
        "ElementSpacing",
        path,
    )
    origin = _floats(
        header.get("Offset") or header.get("Position") or header.get("Origin") or " ".join(["0"] * ndims),
        ndims,
        "Offset",
        path,
    )
    matrix_text = header.get("TransformMatrix") or header.get("Rotation") or header.get("Orientation")
    flat_dir = (
        _floats(matrix_text, ndims * ndims, "TransformMatrix", path)
        if matrix_text
        else list(np.eye(ndims).ravel())
    )
    direction_nd = np.array(flat_dir, dtype=np.float64).reshape(ndims, ndims).T  # column a = axis a
    direction, spacing3, origin3 = _embed_geometry(direction_nd, spacing, origin, path)
    return _Parsed(
        data=data,
        spacing=spacing3,
        origin=origin3,
        direction=direction,
        header=header,
        frame_fields=frame_fields,
        image_type=image_type,
        image_orientation=_find_field(header, "UltrasoundImageOrientation"),
        extra={"format": "MetaImage", "third_axis_kind": _third_kind(header.get("Kinds", ""), ndims)},
    )


def _third_kind(kinds: str, ndims: int) -> str:
    parts = kinds.split()
    return parts[2] if ndims == 3 and len(parts) == 3 else ("" if ndims == 3 else "none")


def _embed_geometry(
    direction_nd: np.ndarray, spacing: Sequence[float], origin: Sequence[float], path: Path
) -> tuple[np.ndarray, tuple[float, float, float], tuple[float, float, float]]:
    """2-D geometry -> 3-D with k = (0, 0, 1), z spacing 1, origin z 0 (ITK's embedding)."""
    nd = direction_nd.shape[0]
    direction = np.eye(3)
    direction[:nd, :nd] = direction_nd
    norms = np.linalg.norm(direction, axis=0)
    if np.any(norms < 1e-12):
        raise InputFileError(f"{path}: the direction matrix has a zero axis: {direction_nd.tolist()}")
    if any(s <= 0 for s in spacing):
        raise InputFileError(f"{path}: spacing must be positive, got {list(spacing)}")
    direction = direction / norms
    spacing3 = tuple(float(v) for v in (list(spacing) + [1.0] * (3 - nd)))
    origin3 = tuple(float(v) for v in (list(origin) + [0.0] * (3 - nd)))
    return direction, spacing3, origin3  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# NRRD
# --------------------------------------------------------------------------------------------------

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


def _nrrd_module() -> Any:
    import nrrd  # pynrrd

    return nrrd


def _read_nrrd(path: Path) -> _Parsed:
    nrrd = _nrrd_module()
    _read_bytes(path, probe_only=True)
    try:
        with open(path, "rb") as fh:
            header = nrrd.read_header(fh)
    except OSError as exc:
        raise InputFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except Exception as exc:  # pynrrd raises NRRDError / ValueError / UnicodeError on a bad header
        raise InputFileError(f"{path}: not a valid NRRD header ({exc})") from None

    image_type = _find_field(header, "ultrasound image type", "UltrasoundImageType")
    _check_image_type(image_type, path)

    sizes = [int(s) for s in np.atleast_1d(header.get("sizes", []))]
    dim = int(header.get("dimension", len(sizes)))
    if dim != len(sizes) or dim < 2:
        raise InputFileError(f"{path}: NRRD dimension {dim} does not match sizes {sizes}")
    kinds = [str(k).lower() for k in header["kinds"]] if "kinds" in header else None
    if kinds is not None and len(kinds) != dim:
        raise InputFileError(f"{path}: NRRD kinds {kinds} do not match dimension {dim}")
    directions = header.get("space directions")
    if directions is not None:
        directions = np.asarray(directions, dtype=np.float64)
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
        direction, spacing3, origin3 = _embed_geometry(dir2, spacing, origin_nd, path)
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
        m = _FRAME_FIELD.match(key)
        if m:
            frame_fields.setdefault(m.group(2), {})[int(m.group(1))] = str(value).strip()
        else:
            text_header[key] = _field_text(value)
    return _Parsed(
        data=data,
        spacing=spacing3,
        origin=origin3,
        direction=direction,
        header=text_header,
        frame_fields=frame_fields,
        image_type=image_type,
        image_orientation=_find_field(header, "ultrasound image orientation", "UltrasoundImageOrientation"),
        extra={
            "format": "NRRD",
            "space": space,
            "third_axis_kind": kinds[frame_axis] if kinds and frame_axis < len(kinds) else "",
        },
    )


def _field_text(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return " ".join(str(v) for v in value.reshape(-1).tolist())
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


# --------------------------------------------------------------------------------------------------
# .npy and arrays
# --------------------------------------------------------------------------------------------------


def _read_npy(path: Path) -> _Parsed:
    _read_bytes(path, probe_only=True)
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:  # ValueError / EOFError / OSError on a bad or truncated .npy
        raise InputFileError(f"{path}: not a readable .npy array ({exc})") from None
    return _parsed_from_array(array, str(path))


def _parsed_from_array(array: Any, name: str) -> _Parsed:
    arr = np.asarray(array)
    if arr.dtype.kind not in "biuf":
        raise UnsupportedImageTypeError(f"{name}: array dtype {arr.dtype} is not a pixel type")
    if arr.ndim == 2:
        arr = arr[np.newaxis, :, :, np.newaxis]
    elif arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[np.newaxis]
    elif arr.ndim == 3:
        arr = arr[..., np.newaxis]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3, 4):
        pass
    else:
        raise UnsupportedImageTypeError(
            f"{name}: array of shape {arr.shape} is not HxW, NxHxW, HxWx3, or NxHxWx3 frames"
        )
    if min(arr.shape) < 1:
        raise InputFileError(f"{name}: array of shape {arr.shape} holds no pixels")
    return _Parsed(
        data=np.ascontiguousarray(arr),
        spacing=(1.0, 1.0, 1.0),
        origin=(0.0, 0.0, 0.0),
        direction=np.eye(3),
        header={},
        frame_fields={},
        extra={"format": "array"},
    )


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------

FORMAT_READERS: dict[str, Callable[[Path], _Parsed]] = {
    ".igs.mha": _read_metaimage,
    ".seq.mha": _read_metaimage,
    ".mha": _read_metaimage,
    ".mhd": _read_metaimage,
    ".igs.nrrd": _read_nrrd,
    ".seq.nrrd": _read_nrrd,
    ".nrrd": _read_nrrd,
    ".seq.nhdr": _read_nrrd,
    ".nhdr": _read_nrrd,
    ".npy": _read_npy,
}
"""File ending (lower case, longest match wins) -> reader returning the parsed file."""


def reader_for(path: str | os.PathLike[str]) -> Callable[[Path], _Parsed]:
    """The reader for ``path``'s ending; `InputFileError` listing the supported endings otherwise."""
    name = Path(path).name.lower()
    for ending in sorted(FORMAT_READERS, key=len, reverse=True):
        if name.endswith(ending):
            return FORMAT_READERS[ending]
    raise InputFileError(
        f"{path}: unknown file type; supported endings: {', '.join(FORMAT_READERS)} "
        "(PLUS sequence files, MetaImage and NRRD images, numpy .npy arrays)"
    )


def _read_bytes(path: Path, allow_empty: bool = False, probe_only: bool = False, role: str = "file") -> bytes:
    """Whole file content, or b"" after checks only; `InputFileError` for missing/empty/unreadable."""
    try:
        if not path.exists():
            raise InputFileError(f"{path}: {role} does not exist")
        if path.is_dir():
            raise InputFileError(f"{path}: is a directory, expected a {role}")
        size = path.stat().st_size
        if size == 0 and not allow_empty:
            raise InputFileError(f"{path}: {role} is empty (0 bytes)")
        if probe_only:
            return b""
        return path.read_bytes()
    except OSError as exc:
        raise InputFileError(f"{path}: {role} cannot be read ({exc.strerror or exc})") from None


def _is_torch_tensor(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "torch" and hasattr(obj, "detach")


def read_sequence(source: Any, color: str = "luminance", intensity: str = "uint8") -> UltrasoundSequence:
    """Read a PLUS sequence file, a single image file, or wrap an array, as an `UltrasoundSequence`.

    source: path (str / Path) to ``.igs.mha``, ``.seq.mha``, ``.mha``, ``.mhd``, ``.igs.nrrd``,
    ``.seq.nrrd``, ``.nrrd``, ``.nhdr`` or ``.npy``; or a numpy array / torch tensor (any device; copied to
    the host) shaped HxW, NxHxW, HxWx3 or NxHxWx3. color: ``"luminance"`` (default: colour -> BT.601
    luma, N x H x W) or ``"rgb"`` (N x H x W x 3). intensity: ``"uint8"`` (default, see the module
    docstring) or ``"keep"`` (file dtype). Raises `InputFileError` (missing, empty, corrupt, truncated,
    unknown ending) and `UnsupportedImageTypeError` (RF data, unsupported pixel layout); both name the file.
    """
    if color not in ("luminance", "rgb"):
        raise ValueError(f"color must be 'luminance' or 'rgb', not {color!r}")
    if intensity not in ("uint8", "keep"):
        raise ValueError(f"intensity must be 'uint8' or 'keep', not {intensity!r}")
    if isinstance(source, np.ndarray) or _is_torch_tensor(source):
        array = source.detach().cpu().numpy() if _is_torch_tensor(source) else source
        parsed, path = _parsed_from_array(array, f"<{type(source).__name__} {tuple(array.shape)}>"), None
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        parsed = reader_for(path)(path)
    else:
        raise TypeError(
            f"read_sequence takes a path, a numpy array or a torch tensor, not {type(source).__name__}"
        )
    name = str(path) if path is not None else "array"
    frames = _to_frames(parsed.data, color, name)
    metadata: dict[str, Any] = {
        "format": parsed.extra.get("format", ""),
        "source_dtype": str(parsed.data.dtype),
    }
    if intensity == "uint8":
        frames, metadata["intensity"] = to_uint8(frames)
    timestamps, frame_status, transforms, transform_status, leftover = _per_frame(
        parsed, frames.shape[0], name
    )
    metadata.update({k: v for k, v in parsed.extra.items() if k != "format"})
    metadata["header"] = parsed.header
    if leftover:
        metadata["frame_fields"] = leftover
    return UltrasoundSequence(
        frames=frames,
        spacing=parsed.spacing,
        origin=parsed.origin,
        direction=parsed.direction,
        timestamps=timestamps,
        transforms=transforms,
        transform_status=transform_status,
        frame_status=frame_status,
        image_orientation=parsed.image_orientation,
        image_type=parsed.image_type,
        path=path,
        metadata=metadata,
    )


def _to_frames(data: np.ndarray, color: str, name: str) -> np.ndarray:
    channels = data.shape[-1]
    if channels == 1:
        return data[..., 0]
    if channels not in (3, 4):
        raise UnsupportedImageTypeError(
            f"{name}: {channels} channels per pixel; only 1 (grey), 3 (RGB), 4 (RGBA) are read"
        )
    rgb = data[..., :3]
    if color == "rgb":
        return np.ascontiguousarray(rgb)
    return luminance(rgb)


def luminance(rgb: np.ndarray) -> np.ndarray:
    """... x 3 RGB -> ... luma with ITU-R BT.601 weights; uint8 input gives uint8 (rounded, clipped)."""
    y = np.tensordot(rgb.astype(np.float64), np.asarray(BT601_WEIGHTS), axes=([-1], [0]))
    if rgb.dtype == np.uint8:
        return np.clip(np.rint(y), 0, 255).astype(np.uint8)
    return y.astype(np.float32) if rgb.dtype.kind == "f" and rgb.dtype.itemsize <= 4 else y


def to_uint8(frames: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Frames of any scalar dtype -> uint8 with the rule in the module docstring, plus what was done."""
    dtype = frames.dtype
    if dtype == np.uint8:
        return frames, {"rule": "unchanged"}
    if dtype == np.bool_:
        return frames.astype(np.uint8) * 255, {"rule": "bool -> 0/255"}
    finite = frames[np.isfinite(frames)] if dtype.kind == "f" else frames
    if finite.size == 0:
        return np.zeros(frames.shape, np.uint8), {"rule": "no finite values -> 0"}
    lo, hi = float(finite.min()), float(finite.max())
    if dtype.kind in "iu" and lo >= 0 and hi <= 255:
        return frames.astype(np.uint8), {"rule": "integers within 0..255 cast"}
    values = np.where(np.isfinite(frames), frames, 0.0) if dtype.kind == "f" else frames
    if dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
        return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8), {"rule": "[0, 1] * 255"}
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    out = np.clip(np.rint((values.astype(np.float64) - lo) * scale), 0, 255).astype(np.uint8)
    if dtype.kind == "f":
        out[~np.isfinite(frames)] = 0
    return out, {"rule": "linear [min, max] -> [0, 255]", "min": lo, "max": hi}


def _per_frame(
    parsed: _Parsed, n: int, name: str
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray], dict[str, list[str | None]]]:
    fields = parsed.frame_fields
    for field_name, values in fields.items():
        bad = [i for i in values if i >= n]
        if bad:
            raise InputFileError(
                f"{name}: header has Seq_Frame{bad[0]:04d}_{field_name} but only {n} frame(s) of pixel data: "
                "header and data disagree"
            )
    timestamps = np.full(n, np.nan)
    for i, text in fields.get("Timestamp", {}).items():
        try:
            timestamps[i] = float(text)
        except ValueError:
            raise InputFileError(f"{name}: Seq_Frame{i:04d}_Timestamp = {text!r} is not a number") from None
    if not fields.get("Timestamp"):
        index_values = _find_field(parsed.header, "axis 3 index values", "axis 0 index values")
        index_type = _find_field(parsed.header, "axis 3 index type", "axis 0 index type")
        if index_values and index_type.lower() == "numeric":
            try:
                values = [float(v) for v in index_values.split()]
            except ValueError:
                values = []
            if len(values) == n:
                timestamps = np.array(values)
    status_field = "ImageStatus" if "ImageStatus" in fields else "Status"
    frame_status = np.ones(n, dtype=bool)
    for i, text in fields.get(status_field, {}).items():
        frame_status[i] = text.strip().upper() == "OK"
    transforms: dict[str, np.ndarray] = {}
    transform_status: dict[str, np.ndarray] = {}
    for field_name, values in fields.items():
        if not field_name.endswith("Transform"):
            continue
        tname = field_name[: -len("Transform")]
        mats = np.full((n, 4, 4), np.nan)
        status = np.zeros(n, dtype=bool)
        for i, text in values.items():
            try:
                numbers = [float(v) for v in text.split()]
            except ValueError:
                numbers = []
            if len(numbers) != 16:
                raise InputFileError(
                    f"{name}: Seq_Frame{i:04d}_{field_name} is not 16 numbers: {text[:80]!r}"
                )
            mats[i] = np.array(numbers).reshape(4, 4)
            status[i] = True
        statuses = fields.get(field_name + "Status", {})
        for i in range(n):
            if i in statuses:
                status[i] = status[i] and statuses[i].strip().upper() == "OK"
        transforms[tname] = mats
        transform_status[tname] = status
    used = {"Timestamp", status_field} | {
        f for f in fields if f.endswith("Transform") or f.endswith("TransformStatus")
    }
    leftover = {k: [v.get(i) for i in range(n)] for k, v in fields.items() if k not in used}
    return timestamps, frame_status, transforms, transform_status, leftover


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _num(value: float) -> str:
    v = float(value)
    if v == 0.0:
        return "0"
    return repr(v)


def _vec(values: Iterable[float]) -> str:
    return "(" + ",".join(_num(v) for v in values) + ")"


def _host_array(array: Any) -> np.ndarray:
    if _is_torch_tensor(array):
        return array.detach().cpu().numpy()  # file output is the edge: the one device-to-host copy
    return np.asarray(array)


def _atomic_write(path: Path, chunks: Iterable[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _nrrd_sequence_bytes(
    data: np.ndarray,
    reference: _Geometry,
    index_values: Sequence[str],
    index_name: str,
    index_unit: str,
    data_node_class: str,
    custom: Sequence[tuple[str, str]],
    compress: bool,
) -> list[bytes]:
    """A Slicer volume sequence NRRD: data N x H x W (x C), sizes [C] W H 1 N, LPS space."""
    n, h, w = data.shape[:3]
    channels = data.shape[3] if data.ndim == 4 else 0
    nrrd_types = {
        "u1": "unsigned char",
        "i1": "signed char",
        "u2": "unsigned short",
        "i2": "short",
        "u4": "unsigned int",
        "i4": "int",
        "u8": "unsigned long long int",
        "i8": "long long int",
        "f4": "float",
        "f8": "double",
    }
    key = data.dtype.str[1:]
    if key not in nrrd_types:
        raise ValueError(f"cannot write pixel type {data.dtype} to NRRD")
    m = reference.ijk_to_lps()
    dirs = [_vec(m[:3, a]) for a in range(3)]
    lines = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        f"type: {nrrd_types[key]}",
        f"dimension: {4 + (1 if channels else 0)}",
        "space: left-posterior-superior",
        "sizes: " + " ".join(str(s) for s in ([channels] if channels else []) + [w, h, 1, n]),
        "space directions: " + " ".join((["none"] if channels else []) + dirs + ["none"]),
        "kinds: " + " ".join((["vector"] if channels else []) + ["domain", "domain", "domain", "list"]),
        "labels: " + " ".join(['""'] * (4 if channels else 3) + [f'"{index_name}"']),
        "units: " + " ".join(['""'] * (4 if channels else 3) + [f'"{index_unit}"']),
    ]
    if data.dtype.itemsize > 1:
        lines.append("endian: little")
    lines += [
        f"encoding: {'gzip' if compress else 'raw'}",
        "space origin: " + _vec(m[:3, 3]),
        f"DataNodeClassName:={data_node_class}",
    ]
    lines += [f"{k}:={v}" for k, v in custom]
    lines += ["axis 3 index type:=numeric", "axis 3 index values:=" + " ".join(index_values)]
    for line in lines:
        if "\n" in line:
            raise ValueError(f"NRRD header line contains a newline: {line!r}")
    payload = np.ascontiguousarray(data.astype(data.dtype.newbyteorder("<"), copy=False)).tobytes()
    if compress:
        payload = gzip.compress(payload, compresslevel=1, mtime=0)
    return [("\n".join(lines) + "\n\n").encode("latin-1"), payload]


def _index_values(
    n: int, timestamps: Any, reference: UltrasoundSequence | None
) -> tuple[list[str], str, str]:
    if timestamps is None and reference is not None and reference.n_frames == n:
        timestamps = reference.timestamps
    if timestamps is not None:
        ts = np.asarray(_host_array(timestamps), dtype=np.float64).reshape(-1)
        if ts.shape != (n,):
            raise ValueError(f"timestamps must have {n} entries (one per labelmap), got {ts.shape[0]}")
        if np.all(np.isfinite(ts)):
            return [_num(t) for t in ts], "time", "s"
    return [str(i) for i in range(n)], "frame", ""


def _color01(color: Sequence[float]) -> tuple[float, float, float]:
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
    (gzip unless ``compress=False``). Returns the path. See the module docstring for the header.
    """
    path = Path(path)
    maps = _host_array(labelmaps)
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
    index_values, index_name, index_unit = _index_values(n, timestamps, reference)
    segs = default_segments() if segments is None else list(segments)
    custom: list[tuple[str, str]] = []
    seen: set[int] = set()
    for s, (value, name, color) in enumerate(segs):
        value = int(value)
        if not 1 <= value <= 255 or value in seen:
            raise ValueError(f"segment label values must be unique and within 1..255, got {value}")
        seen.add(value)
        name = str(name)
        if "\n" in name or "\r" in name:
            raise ValueError(f"segment name {name!r} must not contain a line break")
        rgb = _color01(color)
        custom += [
            (f"Segment{s}_ID", f"Segment_{value}"),
            (f"Segment{s}_Name", name),
            (f"Segment{s}_Color", " ".join(_num(c) for c in rgb)),
            (f"Segment{s}_LabelValue", str(value)),
            (f"Segment{s}_Layer", "0"),
        ]
    custom += [
        ("Segmentation_MasterRepresentation", "Binary labelmap"),
        ("Segmentation_ContainedRepresentationNames", "Binary labelmap|"),
    ]
    chunks = _nrrd_sequence_bytes(
        maps, reference, index_values, index_name, index_unit, "vtkMRMLLabelMapVolumeNode", custom, compress
    )
    _atomic_write(path, chunks)
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
    index_text = _find_field(header, "axis 3 index values", "axis 0 index values")
    index_values = [_url_decode(v) for v in index_text.split()] if index_text else [str(i) for i in range(n)]
    if len(index_values) != n:
        raise InputFileError(f"{path}: {len(index_values)} index values for {n} sequence items")
    timestamps = np.array([_to_float(v) for v in index_values], dtype=np.float64)
    labels = _nrrd_list_field(header.get("labels", ""))
    units = _nrrd_list_field(header.get("units", ""))
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


def _nrrd_list_field(text: str) -> list[str]:
    return re.findall(r'"([^"]*)"', text) if '"' in text else text.split()


def _url_decode(text: str) -> str:
    from urllib.parse import unquote

    return unquote(text)


def _to_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _orientation_code(direction: np.ndarray) -> str:
    """ITK/MetaIO AnatomicalOrientation letters ('RAI' = LPS for the identity direction)."""
    letters = (("R", "L"), ("A", "P"), ("I", "S"))
    out = ""
    for a in range(3):
        m = int(np.argmax(np.abs(direction[:, a])))
        out += letters[m][0 if direction[m, a] > 0 else 1]
    return out


def write_image(
    path: str | os.PathLike[str],
    frames: Any,
    reference: UltrasoundSequence | None = None,
    compress: bool = True,
) -> Path:
    """Write frames (N x H x W or N x H x W x 3, numpy or torch) with ``reference``'s geometry.

    ``.mha`` / ``.igs.mha`` / ``.seq.mha``: a PLUS sequence MetaImage (``Kinds = domain domain list``,
    zlib-compressed when ``compress``) with the reference's per-frame timestamps, statuses and transforms
    as ``Seq_FrameNNNN_*`` fields. ``.nrrd`` / ``.seq.nrrd``: a Slicer volume sequence (as in
    `write_segmentation_sequence`, ``DataNodeClassName`` scalar or vector volume) with the same per-frame
    fields as ``key:=value``. reference None -> unit spacing, zero origin, identity direction. Both
    read back with `read_sequence` to the same frames, geometry and per-frame fields.
    """
    path = Path(path)
    data = _host_array(frames)
    if data.ndim == 2:
        data = data[np.newaxis]
    if not (data.ndim == 3 or (data.ndim == 4 and data.shape[-1] == 3)):
        raise ValueError(f"frames must be N x H x W or N x H x W x 3, got shape {data.shape}")
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    data = data.astype(data.dtype.newbyteorder("="), copy=False)
    n = data.shape[0]
    if reference is None:
        reference = UltrasoundSequence(frames=np.zeros((n, 1, 1), np.uint8))
    if reference.n_frames != n and (reference.transforms or np.any(np.isfinite(reference.timestamps))):
        raise ValueError(
            f"{n} frames but the reference has {reference.n_frames}: per-frame fields would not match"
        )
    per_frame: list[tuple[str, str]] = []
    if reference.n_frames == n:
        for i in range(n):
            for name in sorted(reference.transforms):
                mat = reference.transforms[name][i]
                if np.all(np.isfinite(mat)):
                    per_frame.append(
                        (f"Seq_Frame{i:04d}_{name}Transform", " ".join(_num(v) for v in mat.reshape(-1)))
                    )
                    ok = bool(reference.transform_status[name][i])
                    per_frame.append((f"Seq_Frame{i:04d}_{name}TransformStatus", "OK" if ok else "INVALID"))
            if math.isfinite(reference.timestamps[i]):
                per_frame.append((f"Seq_Frame{i:04d}_Timestamp", _num(reference.timestamps[i])))
            per_frame.append(
                (f"Seq_Frame{i:04d}_ImageStatus", "OK" if reference.frame_status[i] else "INVALID")
            )
    name = path.name.lower()
    if name.endswith(".nrrd"):
        index_values, index_name, index_unit = _index_values(
            n, None, reference if reference.n_frames == n else None
        )
        custom = []
        if reference.image_orientation:
            custom.append(("ultrasound image orientation", reference.image_orientation))
        if reference.image_type:
            custom.append(("ultrasound image type", reference.image_type))
        node_class = "vtkMRMLVectorVolumeNode" if data.ndim == 4 else "vtkMRMLScalarVolumeNode"
        chunks = _nrrd_sequence_bytes(
            data, reference, index_values, index_name, index_unit, node_class, custom + per_frame, compress
        )
    elif name.endswith(".mha"):
        key = data.dtype.str[1:]
        if key not in _NUMPY_TO_MET:
            raise ValueError(f"cannot write pixel type {data.dtype} to MetaImage")
        payload = np.ascontiguousarray(data.astype(data.dtype.newbyteorder("<"), copy=False)).tobytes()
        if compress:
            payload = zlib.compress(payload, 1)
        h, w = data.shape[1:3]
        lines = [
            ("ObjectType", "Image"),
            ("NDims", "3"),
            ("AnatomicalOrientation", _orientation_code(reference.direction)),
            ("BinaryData", "True"),
            ("BinaryDataByteOrderMSB", "False"),
            ("CenterOfRotation", "0 0 0"),
            ("CompressedData", "True" if compress else "False"),
        ]
        if compress:
            lines.append(("CompressedDataSize", str(len(payload))))
        lines += [
            ("DimSize", f"{w} {h} {n}"),
            ("ElementNumberOfChannels", str(data.shape[3] if data.ndim == 4 else 1)),
            ("ElementSpacing", " ".join(_num(v) for v in reference.spacing)),
            ("ElementType", _NUMPY_TO_MET[key]),
            ("Kinds", "domain domain list"),
            ("Offset", " ".join(_num(v) for v in reference.origin)),
            ("TransformMatrix", " ".join(_num(v) for v in reference.direction.T.reshape(-1))),
        ]
        if reference.image_orientation:
            lines.append(("UltrasoundImageOrientation", reference.image_orientation))
        if reference.image_type:
            lines.append(("UltrasoundImageType", reference.image_type))
        lines += per_frame + [("ElementDataFile", "LOCAL")]
        chunks = [("".join(f"{k} = {v}\n" for k, v in lines)).encode("latin-1"), payload]
    else:
        raise InputFileError(
            f"{path}: write_image writes .mha or .nrrd files (PLUS sequence / Slicer volume sequence)"
        )
    _atomic_write(path, chunks)
    return path


__all__ = [
    "BT601_WEIGHTS",
    "FORMAT_READERS",
    "LPS_TO_RAS",
    "SegmentInfo",
    "SegmentationSequence",
    "UltrasoundSequence",
    "default_segments",
    "luminance",
    "read_segmentation_sequence",
    "read_sequence",
    "reader_for",
    "to_uint8",
    "write_image",
    "write_segmentation_sequence",
]
