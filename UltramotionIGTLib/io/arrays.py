"""numpy ``.npy`` files and in-memory arrays (numpy, or torch tensors on any device) as input, and the
host copy of an array or tensor for writing.

Accepted layouts: HxW (one frame), NxHxW, HxWx3|4 (one colour frame: a 3-D array whose last axis has
length 3 or 4 is read as colour), NxHxWx3|4; ``.npy`` files are loaded with ``allow_pickle=False``.
Arrays carry no geometry: unit spacing, zero origin, identity direction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from UltramotionIGTLib.errors import InputFileError, UnsupportedImageTypeError
from UltramotionIGTLib.io.common import ParsedFile, read_file_bytes


def read_npy(path: Path) -> ParsedFile:
    """Read a ``.npy`` array (see the module docstring); `InputFileError` naming the file when it is
    missing, empty or not a readable array, `UnsupportedImageTypeError` for a non-pixel dtype or shape."""
    read_file_bytes(path, probe_only=True)
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:  # ValueError / EOFError / OSError on a bad or truncated .npy
        raise InputFileError(f"{path}: not a readable .npy array ({exc})") from None
    return parsed_from_array(array, str(path))


def parsed_from_array(array: Any, name: str) -> ParsedFile:
    """A host array in one of the accepted layouts -> `ParsedFile` (N x H x W x C); ``name`` is what error
    messages call it (the file, or ``<ndarray (shape)>``)."""
    arr = np.asarray(array)
    if arr.dtype.kind == "b":
        raise UnsupportedImageTypeError(f"{name}: a bool array is a mask, not an image: pass intensities")
    if arr.dtype.kind not in "iuf":
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
    return ParsedFile(
        data=np.ascontiguousarray(arr),
        spacing=(1.0, 1.0, 1.0),
        origin=(0.0, 0.0, 0.0),
        direction=np.eye(3),
        header={},
        frame_fields={},
        extra={"format": "array"},
    )


def is_torch_tensor(obj: Any) -> bool:
    """True for a torch tensor, checked without importing torch (reading files needs no torch)."""
    return type(obj).__module__.split(".")[0] == "torch" and hasattr(obj, "detach")


def host_array(array: Any) -> np.ndarray:
    """A numpy array of ``array``; a torch tensor (any device) is detached and copied to the host."""
    if is_torch_tensor(array):
        return array.detach().cpu().numpy()  # files are the edge: the one device-to-host copy
    return np.asarray(array)
