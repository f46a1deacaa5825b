"""Recorded-ultrasound input: `read_sequence` (PLUS sequence files, single images, arrays) with the
intensity mapping and the PLUS per-frame fields, and `write_image` (frames out as a PLUS ``.mha`` or a
Slicer ``.seq.nrrd``).

``read_sequence(source)`` -> `UltrasoundSequence` (frames N x H x W, geometry, timestamps, tracking
transforms with status). One reader per file ending in `FORMAT_READERS` (`UltramotionIGTLib.io.metaimage`,
`UltramotionIGTLib.io.nrrd`, `UltramotionIGTLib.io.arrays` say what each format reader accepts and how
it reads the geometry); `reader_for(path)` picks it or says what is supported. Geometry conventions:
`UltramotionIGTLib.io.common`. The segmentation output: `UltramotionIGTLib.io.segmentation`.

PLUS per-frame fields
---------------------
Parsed in both formats (MetaImage ``Key = value``, NRRD ``key:=value``):
``Seq_FrameNNNN_<Name>Transform`` (16 numbers, row-major 4x4) -> ``transforms[<Name>]`` (N x 4 x 4
float64), ``..._<Name>TransformStatus`` -> ``transform_status[<Name>]`` (True where ``OK``),
``..._Timestamp`` -> ``timestamps`` (seconds, NaN where absent; a Slicer sequence's numeric ``axis 3
index values`` when there is no timestamp field), ``..._ImageStatus`` / ``..._Status`` ->
``frame_status`` (True where ``OK``; True when the file has no status field). A transform missing for
a frame is all-NaN with status False (never a made-up matrix). Other per-frame fields are kept as
strings in ``metadata["frame_fields"]``. `write_image` writes the same fields back.

Refused
-------
RF data (``UltrasoundImageType`` / ``ultrasound image type`` starting with ``RF``) raises
`UnsupportedImageTypeError` naming the type and the file, before the pixel data is read. Missing,
empty, truncated, corrupt, lying or unknown-format files raise `InputFileError` naming the file and
what is wrong; pixel data is used only when its size matches the header exactly.

Pixel values
------------
The pipeline wants HxW uint8 brightness frames, through ONE intensity mapping for every entry point
(`UltramotionIGTLib.core.intensity`: uint8 unchanged, bool refused, other types through one window per stream,
stated by the file or fixed from the first frame; NaN/inf -> 0). The readers do not map: they hand the
file's pixels and, when the header states a display window (MetaImage ``ElementMin`` /
``ElementMax``, NRRD ``min`` / ``max``), ``metadata["intensity_window"] = [lo, hi]``; ``run`` passes
both to the pipeline, which maps. ``read_sequence(..., intensity="uint8")`` (default) applies the same
mapping on the host (`to_uint8`) for callers that want uint8 frames; what was done is in
``metadata["intensity"]``. ``intensity="keep"`` keeps the file's dtype. Colour is converted to
luminance by default (`luminance`) with ITU-R BT.601 weights, Y = 0.299 R + 0.587 G + 0.114 B, rounded
to nearest (ties to even) and clipped to 0..255 for uint8 input; ``color="rgb"`` keeps N x H x W x 3
(alpha dropped).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from UltramotionIGTLib.errors import InputFileError, UnsupportedImageTypeError
from UltramotionIGTLib.io.arrays import host_array, is_torch_tensor, parsed_from_array, read_npy
from UltramotionIGTLib.io.common import ParsedFile, UltrasoundSequence, find_field, format_number
from UltramotionIGTLib.io.metaimage import read_metaimage, write_metaimage
from UltramotionIGTLib.io.nrrd import read_nrrd, sequence_index, write_volume_sequence

__all__ = [
    "BT601_WEIGHTS",
    "FORMAT_READERS",
    "luminance",
    "read_sequence",
    "reader_for",
    "stated_window",
    "to_uint8",
    "write_image",
]


BT601_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights for R, G, B."""


FORMAT_READERS: dict[str, Callable[[Path], ParsedFile]] = {
    ".igs.mha": read_metaimage,
    ".seq.mha": read_metaimage,
    ".mha": read_metaimage,
    ".mhd": read_metaimage,
    ".igs.nrrd": read_nrrd,
    ".seq.nrrd": read_nrrd,
    ".nrrd": read_nrrd,
    ".seq.nhdr": read_nrrd,
    ".nhdr": read_nrrd,
    ".npy": read_npy,
}
"""File ending (lower case, longest match wins) -> reader returning the parsed file."""


def reader_for(path: str | os.PathLike[str]) -> Callable[[Path], ParsedFile]:
    """The reader for ``path``'s ending; `InputFileError` listing the supported endings otherwise."""
    name = Path(path).name.lower()
    for ending in sorted(FORMAT_READERS, key=len, reverse=True):
        if name.endswith(ending):
            return FORMAT_READERS[ending]
    raise InputFileError(
        f"{path}: unknown file type; supported endings: {', '.join(FORMAT_READERS)} "
        "(PLUS sequence files, MetaImage and NRRD images, numpy .npy arrays)"
    )


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
    if isinstance(source, np.ndarray) or is_torch_tensor(source):
        array = host_array(source)
        parsed, path = parsed_from_array(array, f"<{type(source).__name__} {tuple(array.shape)}>"), None
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
    stated = stated_window(parsed.header, name)
    if stated is not None:
        metadata["intensity_window"] = list(stated)
    if intensity == "uint8":
        frames, metadata["intensity"] = to_uint8(frames, stated)
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
    """N x H x W x C file pixels -> N x H x W (grey, or luma of colour) or N x H x W x 3 (``color="rgb"``)."""
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


def stated_window(header: dict[str, Any], name: str) -> tuple[float, float] | None:
    """The display window a header states, (lo, hi), or None: MetaImage ``ElementMin`` / ``ElementMax``,
    NRRD ``min`` / ``max`` (both or neither). `InputFileError` naming the file when they are not
    finite numbers with max > min."""
    lo_text = find_field(header, "ElementMin", "min")
    hi_text = find_field(header, "ElementMax", "max")
    if not lo_text and not hi_text:
        return None
    try:
        lo, hi = float(lo_text), float(hi_text)
    except ValueError:
        raise InputFileError(
            f"{name}: the header's intensity range (min {lo_text!r}, max {hi_text!r}) is not two numbers"
        ) from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise InputFileError(
            f"{name}: the header's intensity range [{lo_text}, {hi_text}] is empty or not finite"
        )
    return lo, hi


def to_uint8(
    frames: np.ndarray, stated: tuple[float, float] | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Frames of any scalar dtype -> uint8 with the one intensity mapping (`core.intensity`): the
    ``stated`` window (lo, hi) when given, else the window fixed from the first frame with a finite
    pixel; the same window for every frame. Returns the frames and the window's description."""
    from UltramotionIGTLib.core.intensity import IntensityWindow, NonFiniteFrameError, window_for_frame

    if stated is not None:
        window = IntensityWindow.stated(stated[0], stated[1], str(frames.dtype))
    else:
        window = None
        for frame in frames:
            try:
                window = window_for_frame(frame)
                break
            except NonFiniteFrameError:
                continue
        if window is None:  # no frame has a finite pixel: all black, and said so
            return np.zeros(frames.shape, np.uint8), {"rule": "no finite values -> 0"}
    return window.map_numpy(frames), window.to_dict()


def _per_frame(
    parsed: ParsedFile, n: int, name: str
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray], dict[str, list[str | None]]]:
    """The PLUS per-frame fields of ``parsed`` (see the module docstring) -> (timestamps, frame_status,
    transforms, transform_status, the other per-frame fields as N strings or None each)."""
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
        index_values = find_field(parsed.header, "axis 3 index values", "axis 0 index values")
        index_type = find_field(parsed.header, "axis 3 index type", "axis 0 index type")
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


def _plus_frame_fields(reference: UltrasoundSequence) -> list[tuple[str, str]]:
    """The reference's per-frame transforms (with status), timestamps and image statuses as PLUS
    ``Seq_FrameNNNN_*`` fields, frame by frame; a transform that is NaN for a frame is left out."""
    fields: list[tuple[str, str]] = []
    for i in range(reference.n_frames):
        for name in sorted(reference.transforms):
            mat = reference.transforms[name][i]
            if np.all(np.isfinite(mat)):
                numbers = " ".join(format_number(v) for v in mat.reshape(-1))
                fields.append((f"Seq_Frame{i:04d}_{name}Transform", numbers))
                ok = bool(reference.transform_status[name][i])
                fields.append((f"Seq_Frame{i:04d}_{name}TransformStatus", "OK" if ok else "INVALID"))
        if math.isfinite(reference.timestamps[i]):
            fields.append((f"Seq_Frame{i:04d}_Timestamp", format_number(reference.timestamps[i])))
        fields.append((f"Seq_Frame{i:04d}_ImageStatus", "OK" if reference.frame_status[i] else "INVALID"))
    return fields


def write_image(
    path: str | os.PathLike[str],
    frames: Any,
    reference: UltrasoundSequence | None = None,
    compress: bool = True,
) -> Path:
    """Write frames (N x H x W or N x H x W x 3, numpy or torch) with ``reference``'s geometry.

    ``.mha`` / ``.igs.mha`` / ``.seq.mha``: a PLUS sequence MetaImage (`metaimage.write_metaimage`,
    zlib-compressed when ``compress``) with the reference's per-frame timestamps, statuses and transforms
    as ``Seq_FrameNNNN_*`` fields. ``.nrrd`` / ``.seq.nrrd``: a Slicer volume sequence
    (`nrrd.write_volume_sequence`, ``DataNodeClassName`` scalar or vector volume, gzip when
    ``compress``) with the same per-frame fields as ``key:=value``. reference None -> unit spacing,
    zero origin, identity direction. Both read back with `read_sequence` to the same frames, geometry
    and per-frame fields. The file is replaced atomically. Raises `InputFileError` for another ending,
    `ValueError` for frames of another shape or a reference with per-frame data for another N.
    """
    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".nrrd", ".mha")):
        raise InputFileError(
            f"{path}: write_image writes .mha or .nrrd files (PLUS sequence / Slicer volume sequence)"
        )
    data = host_array(frames)
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
    per_frame = _plus_frame_fields(reference) if reference.n_frames == n else []
    if name.endswith(".nrrd"):
        custom = []
        if reference.image_orientation:
            custom.append(("ultrasound image orientation", reference.image_orientation))
        if reference.image_type:
            custom.append(("ultrasound image type", reference.image_type))
        node_class = "vtkMRMLVectorVolumeNode" if data.ndim == 4 else "vtkMRMLScalarVolumeNode"
        index = sequence_index(n, None, reference if reference.n_frames == n else None)
        write_volume_sequence(path, data, reference, index, node_class, custom + per_frame, compress)
    else:
        fields = []
        if reference.image_orientation:
            fields.append(("UltrasoundImageOrientation", reference.image_orientation))
        if reference.image_type:
            fields.append(("UltrasoundImageType", reference.image_type))
        write_metaimage(path, data, reference, fields, per_frame, compress)
    return path
