"""What every format shares: the data classes, the geometry conventions, the parsed-file record and
the helpers the readers and writers use (package-internal unless listed in ``__all__``).

Geometry conventions (exact)
----------------------------
Voxel index (i, j, k): i = column (x, fastest in the file), j = row (y), k = frame / slice axis.
``frames[n, j, i]`` is the voxel (i, j) of frame n. ``spacing`` = (x, y, z) in mm; ``origin`` and
``direction`` (3x3, column a = unit direction of index axis a) are in **LPS** (patient left, posterior,
superior), the physical space of ITK, MetaImage and DICOM::

    p_LPS = origin + direction @ (spacing * (i, j, k))        (ijk_to_lps(), 4x4)
    p_RAS = diag(-1, -1, 1) @ p_LPS                           (ijk_to_ras(), 4x4, what Slicer shows)

- 2-D images / 2-D spaces are embedded in 3-D with k = (0, 0, 1), z spacing 1, origin z 0 (ITK's
  embedding, `embed_geometry`). A 3-D image is read as a stack of 2-D frames along k; z spacing comes
  from the file. Every frame shares one 2-D geometry (that of frame 0): right for PLUS sequences, whose
  third axis is a list of frames placed in space by the tracking transforms, not a spatial axis.
- Frames are never re-oriented: ``image_orientation`` (``MF``, ``MFA``, ...) reports how PLUS stored
  them (M/U = marked/unmarked transducer side at column 0, F/N = far/near at row 0).
- How each format stores the geometry: `UltramotionIGTLib.io.metaimage`, `UltramotionIGTLib.io.nrrd`.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from UltramotionIGTLib.errors import InputFileError, UnsupportedImageTypeError

__all__ = ["LPS_TO_RAS", "SegmentInfo", "SegmentationSequence", "UltrasoundSequence"]


LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""4x4 matrix taking LPS points to RAS points (and back: it is its own inverse)."""


PLUS_FRAME_FIELD = re.compile(r"^Seq_Frame(\d+)_(.+)$")
"""A PLUS per-frame header field name, ``Seq_Frame<NNNN>_<Name>``: groups (frame index, field name)."""


class Geometry:
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
class UltrasoundSequence(Geometry):
    """A recorded ultrasound sequence on the host (numpy).

    frames: N x H x W (uint8 after the default reading; other scalar dtypes with ``intensity="keep"``)
    or N x H x W x 3 (colour kept with ``color="rgb"``). spacing (x = columns, y = rows, z) mm, origin
    and direction (3x3, column a = unit direction of index axis i, j, k) in LPS: see the geometry
    conventions in this module's docstring. timestamps: N float64 seconds (NaN where absent). transforms: name (e.g.
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
class SegmentationSequence(Geometry):
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


@dataclass
class ParsedFile:
    """What a format reader returns (package-internal): pixel data N x H x W x C in the file's dtype
    (native byte order, C-contiguous), geometry in LPS as in `UltrasoundSequence`, the header fields
    as text, and the PLUS per-frame fields by name and frame index (parsed by `sequence.read_sequence`).
    """

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


def find_field(header: dict[str, Any], *names: str) -> str:
    """The value (stripped text) of the first header field named like one of ``names``, ignoring case,
    spaces and underscores (PLUS writes ``UltrasoundImageType`` in MetaImage, ``ultrasound image type``
    in NRRD); ``""`` when absent."""
    wanted = {_norm_key(n) for n in names}
    for key, value in header.items():
        if _norm_key(key) in wanted:
            return str(value).strip()
    return ""


def check_image_type(image_type: str, path: Path) -> None:
    """`UnsupportedImageTypeError` naming the file for RF data (an image type starting with ``RF``)."""
    if image_type.upper().startswith("RF"):
        raise UnsupportedImageTypeError(
            f"{path}: UltrasoundImageType is {image_type}: radio-frequency (RF) echo data, not a B-mode "
            "image to segment. Record or export BRIGHTNESS (B-mode) frames instead."
        )


def embed_geometry(
    direction_nd: np.ndarray, spacing: Sequence[float], origin: Sequence[float], path: Path
) -> tuple[np.ndarray, tuple[float, float, float], tuple[float, float, float]]:
    """2-D geometry -> 3-D with k = (0, 0, 1), z spacing 1, origin z 0 (ITK's embedding)."""
    nd = direction_nd.shape[0]
    direction = np.eye(3)
    direction[:nd, :nd] = direction_nd
    norms = np.linalg.norm(direction, axis=0)
    if np.any(norms < 1e-12):
        raise InputFileError(f"{path}: the direction matrix has a zero axis: {direction_nd.tolist()}")
    if any(s == 0 for s in spacing):
        raise InputFileError(f"{path}: spacing must not be zero, got {list(spacing)}")
    direction = direction / norms
    # A negative spacing (PLUS writes some) is a flipped axis: ITK and Slicer read it as the positive
    # spacing along the reversed direction, and so do we.
    signs = np.sign(np.asarray(list(spacing) + [1.0] * (3 - nd), dtype=np.float64))
    direction = direction * signs[None, :]
    spacing = [abs(float(s)) for s in spacing]
    check_direction(direction, path)
    spacing3 = tuple(float(v) for v in (list(spacing) + [1.0] * (3 - nd)))
    origin3 = tuple(float(v) for v in (list(origin) + [0.0] * (3 - nd)))
    return direction, spacing3, origin3  # type: ignore[return-value]


def check_direction(direction: np.ndarray, path: Path) -> None:
    """`InputFileError` when the 3x3 direction matrix (unit columns) is singular: two image axes are
    parallel (or one is zero), so the voxels have no place in space and Slicer cannot load the file."""
    det = float(np.linalg.det(direction))
    if not np.isfinite(det) or abs(det) < 1e-6:
        raise InputFileError(
            f"{path}: the image axes' directions are parallel (direction matrix {np.round(direction, 6).tolist()} "
            "is singular): the voxels have no position in space; fix the file's direction matrix"
        )


def check_readable_file(path: Path, role: str = "file") -> None:
    """`InputFileError` naming ``path`` unless it is an existing regular file (broken or looping
    symbolic links and folders are named as such, not as "does not exist")."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise InputFileError(
                f"{path}: {role} is a symbolic link to {os.readlink(path)!r}, which does not exist"
            ) from None
        raise InputFileError(f"{path}: {role} does not exist") from None
    except OSError as exc:  # ELOOP (a symbolic link loop), EACCES on a parent, ENAMETOOLONG...
        raise InputFileError(f"{path}: {role} cannot be opened ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputFileError(f"{path}: is a directory, expected a {role}")
    if not stat.S_ISREG(st.st_mode):
        raise InputFileError(f"{path}: {role} is not a regular file (a device, pipe or socket)")


def read_file_bytes(
    path: Path, allow_empty: bool = False, probe_only: bool = False, role: str = "file"
) -> bytes:
    """Whole file content, or b"" after checks only; `InputFileError` for missing/empty/unreadable."""
    check_readable_file(path, role)
    try:
        size = path.stat().st_size
        if size == 0 and not allow_empty:
            raise InputFileError(f"{path}: {role} is empty (0 bytes)")
        if probe_only:
            return b""
        return path.read_bytes()
    except OSError as exc:
        raise InputFileError(f"{path}: {role} cannot be read ({exc.strerror or exc})") from None


def format_number(value: float) -> str:
    """Shortest text that reads back to the same float64 (``repr``); ``"0"`` for zero (also -0.0)."""
    v = float(value)
    if v == 0.0:
        return "0"
    return repr(v)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace ``path`` with what ``write(file)`` writes, atomically.

    The bytes go to a new file beside ``path`` (so ``os.replace`` stays within one file system), created
    with mode 0644 less the process umask (rw-r--r--, not mkstemp's owner-only 0600), and
    are renamed over ``path`` only once complete: readers never see a partial file; on any error the
    partial file is removed and ``path`` is left as it was. Parent folders are created.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
