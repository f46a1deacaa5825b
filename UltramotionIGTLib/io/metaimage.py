"""MetaImage (``.mha`` / ``.mhd``, the format of PLUS ``.igs.mha`` / ``.seq.mha`` sequence files): our
own reader and writer (no maintained Python library reads MetaImage without ITK).

Reading
-------
``.igs.mha`` / ``.seq.mha`` / ``.mha`` (data after ``ElementDataFile = LOCAL``) and ``.mhd`` (data in
the file named by ``ElementDataFile``). Raw or zlib/gzip compressed (``CompressedData = True``), binary
or ASCII, any byte order, MET_UCHAR/CHAR/SHORT/USHORT/INT/UINT/LONG/ULONG/LONG_LONG/ULONG_LONG/FLOAT/
DOUBLE, ``ElementNumberOfChannels`` 1, 3 or 4. ``NDims`` 2 (one frame) or 3 (the third axis is the
frame axis; PLUS writes ``Kinds = domain domain list``). PLUS per-frame fields (``Seq_FrameNNNN_<Name> =
value``) are collected for `UltramotionIGTLib.io.sequence`. Pixel data is used only when its size
matches the header exactly (after decompression for compressed data).

Geometry (conventions in `UltramotionIGTLib.io.common`): ``Offset`` is the origin, ``ElementSpacing``
the spacing, ``TransformMatrix`` holds the axis directions one after the other (numbers 3a..3a+2 =
direction of axis a, i.e. the direction matrix column by column). ``AnatomicalOrientation`` is
ignored, as ITK and Slicer do (PLUS writes ``RAI``, which is ITK's name for LPS). Checked against
slicer-core: an identity-geometry PLUS file loads in Slicer with IJKToRAS = diag(-1, -1, 1).

Writing
-------
`write_metaimage`: a PLUS sequence file (``NDims = 3``, ``Kinds = domain domain list``, one header line
per field, zlib-compressed data when asked) with the reference's geometry and per-frame fields.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from UltramotionIGTLib.errors import InputFileError, UnsupportedImageTypeError
from UltramotionIGTLib.io.common import (
    PLUS_FRAME_FIELD,
    Geometry,
    ParsedFile,
    atomic_write,
    check_image_type,
    embed_geometry,
    find_field,
    format_number,
    read_file_bytes,
)

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


_KNOWN_KEYS = (
    "ObjectType", "NDims", "DimSize", "ElementType", "ElementDataFile", "ElementNumberOfChannels",
    "ElementSpacing", "ElementSize", "Offset", "Position", "Origin", "TransformMatrix", "Rotation",
    "Orientation", "BinaryData", "BinaryDataByteOrderMSB", "ElementByteOrderMSB", "CompressedData",
    "CompressedDataSize", "HeaderSize", "Kinds", "AnatomicalOrientation", "CenterOfRotation",
    "ElementMin", "ElementMax",
)  # fmt: skip
_KNOWN_BY_LOWER = {k.lower(): k for k in _KNOWN_KEYS}

# zlib's best case is about 1032:1 (a run of one byte value): compressed data declaring more than
# this many times its own size cannot hold it (and would make decompression allocate the lie).
_ZLIB_MAX_RATIO = 1100


def _int_field(header: dict[str, str], key: str, default: int, path: Path) -> int:
    """The integer value of header field ``key`` (``default`` when absent or empty); `InputFileError`
    naming the field and the file otherwise."""
    text = header.get(key, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise InputFileError(f"{path}: header field {key} = {text!r} is not an integer") from None


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
            canonical = _KNOWN_BY_LOWER.get(key.lower())
            if canonical is not None and canonical != key:
                raise InputFileError(
                    f"{path}: line {line_no} has header key {key!r}; MetaImage keys are case-sensitive: "
                    f"write {canonical!r}"
                )
            m = PLUS_FRAME_FIELD.match(key)
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


def read_metaimage(path: Path) -> ParsedFile:
    """Read a MetaImage (``.mha`` with the data inside, ``.mhd`` with a separate data file) as described in
    the module docstring. Raises `InputFileError` (missing, empty, truncated, corrupt, size mismatch,
    not a MetaImage) and `UnsupportedImageTypeError` (RF data, NDims other than 2/3, multi-file data,
    unknown ElementType), both naming the file.
    """
    raw = read_file_bytes(path)
    header, frame_fields, data_offset = _parse_metaimage_header(raw, path)
    object_type = header.get("ObjectType", "Image")
    if object_type.lower() != "image":
        raise InputFileError(f"{path}: ObjectType = {object_type}, expected Image")
    for required in ("NDims", "DimSize", "ElementType"):
        if required not in header:
            raise InputFileError(f"{path}: MetaImage header has no {required} field")
    ndims = _int_field(header, "NDims", 0, path)
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

    image_type = find_field(header, "UltrasoundImageType")
    check_image_type(image_type, path)

    element_type = header["ElementType"].upper().removesuffix("_ARRAY")
    if element_type not in _MET_TYPES:
        raise UnsupportedImageTypeError(f"{path}: ElementType {header['ElementType']} is not supported")
    channels = _int_field(header, "ElementNumberOfChannels", 1, path)
    if channels < 1:
        raise InputFileError(f"{path}: ElementNumberOfChannels = {channels}, must be at least 1")
    msb = (
        header.get("BinaryDataByteOrderMSB") or header.get("ElementByteOrderMSB") or "False"
    ).lower() == "true"
    dtype = np.dtype(_MET_TYPES[element_type]).newbyteorder(">" if msb else "<")

    w, h = dims[0], dims[1]
    n = dims[2] if ndims == 3 else 1
    third_kind = _third_kind(header.get("Kinds", ""), ndims)
    if ndims == 3 and n > 1 and third_kind in ("", "domain", "space") and not frame_fields:
        raise UnsupportedImageTypeError(
            f"{path}: a 3-D volume (DimSize {header['DimSize']}, third axis spatial), not a sequence of 2-D "
            "frames: its slices would all be placed at the first slice's position. If the third axis is "
            "time, mark it so: Kinds = domain domain list"
        )
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
        payload = read_file_bytes(data_path, allow_empty=True, role=f"pixel data file of {path}")
        data_name = str(data_path)
        header_size = _int_field(header, "HeaderSize", 0, path)
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
        if nbytes > _ZLIB_MAX_RATIO * max(len(payload), 1):
            raise InputFileError(
                f"{data_name}: the header (DimSize {header['DimSize']}, {header['ElementType']}) declares "
                f"{nbytes} bytes of pixel data, more than {len(payload)} bytes of compressed data can hold: "
                "header and data disagree"
            )
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
    direction, spacing3, origin3 = embed_geometry(direction_nd, spacing, origin, path)
    return ParsedFile(
        data=data,
        spacing=spacing3,
        origin=origin3,
        direction=direction,
        header=header,
        frame_fields=frame_fields,
        image_type=image_type,
        image_orientation=find_field(header, "UltrasoundImageOrientation"),
        extra={"format": "MetaImage", "third_axis_kind": third_kind},
    )


def _third_kind(kinds: str, ndims: int) -> str:
    parts = kinds.lower().split()
    return parts[2] if ndims == 3 and len(parts) == 3 else ("" if ndims == 3 else "none")


def _orientation_code(direction: np.ndarray) -> str:
    """ITK/MetaIO AnatomicalOrientation letters ('RAI' = LPS for the identity direction)."""
    letters = (("R", "L"), ("A", "P"), ("I", "S"))
    out = ""
    for a in range(3):
        m = int(np.argmax(np.abs(direction[:, a])))
        out += letters[m][0 if direction[m, a] > 0 else 1]
    return out


def write_metaimage(
    path: Path,
    data: np.ndarray,
    reference: Geometry,
    fields: Sequence[tuple[str, str]],
    per_frame: Sequence[tuple[str, str]],
    compress: bool,
) -> None:
    """Write ``data`` (N x H x W or N x H x W x C, any dtype in the MET table) as a PLUS sequence
    MetaImage at ``path``, atomically: ``DimSize = W H N``, ``reference``'s spacing, origin and direction
    (LPS), ``fields`` (e.g. ``UltrasoundImageOrientation``) then ``per_frame`` (``Seq_FrameNNNN_*``) as
    ``Key = value`` lines, little-endian data, zlib level 1 when ``compress``. `ValueError` for a pixel
    type MetaImage has no name for, or a value holding a line break.
    """
    key = data.dtype.str[1:]
    if key not in _NUMPY_TO_MET:
        raise ValueError(f"cannot write pixel type {data.dtype} to MetaImage")
    payload = np.ascontiguousarray(data.astype(data.dtype.newbyteorder("<"), copy=False)).tobytes()
    if compress:
        payload = zlib.compress(payload, 1)
    n, h, w = data.shape[:3]
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
        ("ElementSpacing", " ".join(format_number(v) for v in reference.spacing)),
        ("ElementType", _NUMPY_TO_MET[key]),
        ("Kinds", "domain domain list"),
        ("Offset", " ".join(format_number(v) for v in reference.origin)),
        ("TransformMatrix", " ".join(format_number(v) for v in reference.direction.T.reshape(-1))),
        *fields,
        *per_frame,
        ("ElementDataFile", "LOCAL"),
    ]
    for k, v in lines:
        if re.search(r"[\r\n]", f"{k}{v}"):
            raise ValueError(f"MetaImage header field {k!r} holds a line break: {v!r}")
    head = "".join(f"{k} = {v}\n" for k, v in lines).encode("latin-1")

    def write(fh: BinaryIO) -> None:
        fh.write(head)
        fh.write(payload)

    atomic_write(path, write)
