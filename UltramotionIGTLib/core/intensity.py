"""The one intensity mapping: frames of any pixel type -> the pipeline's uint8 brightness (0..255).

Every entry point goes through it: `Pipeline.process_frame` (so the CLI, the Slicer sessions, the
gateway and the library API), and `UltramotionIGTLib.io.read_sequence`'s default uint8 reading. The
rule, per *stream* (a recording, a live session, a gateway connection; `IntensityMapper` holds it):

1. ``uint8`` frames are used as they are (rule ``"uint8"``). ``bool`` frames are masks, not images:
   refused (`UnsupportedImageTypeError`), like complex and non-numeric types.
2. Any other pixel type goes through one linear window ``[lo, hi]`` -> ``[0, 255]``::

       y = clip(rint((x - lo) * (255 / (hi - lo))), 0, 255)        (float32; rint: ties to even)

   NaN and infinite pixels become 0. Colour frames are windowed per channel, then converted to
   luminance (BT.601).
3. The window is fixed ONCE per stream, never per frame (no brightness flicker, no per-frame host
   read of a device frame's min/max):

   a. ``"metadata"``: the window the data states, when it states one (MetaImage ``ElementMin`` /
      ``ElementMax``, NRRD ``min`` / ``max``; parsed by `UltramotionIGTLib.io`), else
   b. from the stream's first frame that has a finite pixel:

      - ``"bit depth"``: integers >= 0: ``[0, 2**b - 1]`` with ``b`` the smallest of 8, 10, 12, 14,
        16, 24, 32, 64 that holds the frame's maximum. A 12-bit frame in uint16 maps 0..4095 (not
        0..65535, which would leave it black, nor its own min..max, which would change with the
        content); integers within 0..255 are cast unchanged.
      - ``"unit range"``: floats within [0, 1]: ``[0, 1]`` (the usual normalised image).
      - ``"8-bit values"``: floats that are whole numbers within 0..255 (8-bit data stored as
        float): ``[0, 255]``, i.e. unchanged.
      - ``"first frame range"``: anything else (negative integers, other floats): the first frame's
        finite ``[min, max]``.

   Why these: a recording's own statement wins; the bit depth is how ultrasound and DICOM data are
   stored (``BitsStored``) and does not depend on what the first frame shows; the first frame's
   range is the only stable choice left for data with no convention.
4. A frame with no finite pixel at all (all NaN/inf) is refused with `NonFiniteFrameError`;
   `tools.run.process_sequence` and the gateway report it and skip the frame. The check needs the
   pixels on the host: it runs for host frames (numpy arrays and CPU tensors: what every entry point
   hands in), not for a float tensor already on a GPU (that would be a host sync per frame; its
   non-finite pixels map to 0).

`IntensityWindow.to_dict()` is what ``summary.json`` and each KPI record (`FrameRecord.intensity`)
carry: ``{"rule": ..., "window": [lo, hi], "dtype": ...}``.

Device path: the window is computed on the host from a host frame (no device involved); for a
first frame that is already a device tensor, its min/max come back in one declared host read
(`allowed_host_transfer`), once per stream. Later frames are mapped with the fixed window on the
device: no sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from UltramotionIGTLib.errors import UnsupportedImageTypeError

__all__ = [
    "BIT_DEPTHS",
    "IntensityMapper",
    "IntensityWindow",
    "NonFiniteFrameError",
    "apply_window",
    "window_for_frame",
]

#: Candidate bit depths of the ``"bit depth"`` rule, smallest first.
BIT_DEPTHS: tuple[int, ...] = (8, 10, 12, 14, 16, 24, 32, 64)


class NonFiniteFrameError(UnsupportedImageTypeError):
    """A frame has no finite pixel (all NaN or infinite): nothing to segment; callers skip it."""


@dataclass(frozen=True)
class IntensityWindow:
    """A linear window ``[lo, hi]`` -> 0..255 and where it came from.

    rule: ``"uint8"`` (no mapping), ``"metadata"``, ``"bit depth"``, ``"unit range"``,
    ``"8-bit values"`` or ``"first frame range"`` (module docstring). dtype: the pixel type it was
    fixed for (text). lo/hi: finite, ``hi > lo`` (for ``"first frame range"`` of a constant frame,
    ``hi = lo + 1``).
    """

    rule: str
    lo: float = 0.0
    hi: float = 255.0
    dtype: str = "uint8"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)) or self.hi <= self.lo:
            raise ValueError(f"intensity window must be finite with hi > lo, got [{self.lo}, {self.hi}]")

    @property
    def scale(self) -> float:
        """255 / (hi - lo), as the float32 the mapping multiplies by."""
        return float(np.float32(255.0 / (self.hi - self.lo)))

    def to_dict(self) -> dict[str, Any]:
        """``{"rule", "window": [lo, hi], "dtype"}`` for summary.json and KPI records."""
        return {"rule": self.rule, "window": [float(self.lo), float(self.hi)], "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IntensityWindow:
        """Inverse of `to_dict`."""
        lo, hi = data.get("window", (0.0, 255.0))
        return cls(str(data["rule"]), float(lo), float(hi), str(data.get("dtype", "")))

    @classmethod
    def stated(cls, lo: float, hi: float, dtype: str = "") -> IntensityWindow:
        """The window the data's metadata states (rule ``"metadata"``). `ValueError` if not finite with
        ``hi > lo``."""
        return cls("metadata", float(lo), float(hi), dtype)

    def map_numpy(self, frames: np.ndarray) -> np.ndarray:
        """Frames (any shape, any real dtype) -> uint8 with this window, on the host (numpy).

        The same float32 arithmetic as the device path (`IntensityMapper.to_uint8`), so both give the
        same bytes. uint8 input with rule ``"uint8"`` is returned as is.
        """
        frames = np.asarray(frames)
        if frames.dtype == np.uint8 and self.rule == "uint8":
            return frames
        if frames.dtype.itemsize > 4 and frames.dtype.kind == "f":
            # beyond float32's range a cast would overflow; outside the window every value maps to 0
            # or 255 anyway (NaN stays NaN, handled below)
            frames = np.clip(frames, self.lo, self.hi)
        x = frames.astype(np.float32)
        if frames.dtype.kind == "f":
            x[~np.isfinite(x)] = np.float32(self.lo)
        y = (x - np.float32(self.lo)) * np.float32(self.scale)
        return np.clip(np.rint(y), 0, 255).astype(np.uint8)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _bit_depth_hi(maximum: float) -> float:
    for bits in BIT_DEPTHS:
        if maximum < 2.0**bits:
            return 2.0**bits - 1.0
    return float(maximum)


def window_for_frame(frame: np.ndarray) -> IntensityWindow:
    """The window fixed from a stream's first frame (host numpy, any real dtype), rule 3b of the
    module docstring. Raises `NonFiniteFrameError` when the frame has no finite pixel and
    `UnsupportedImageTypeError` for a pixel type that is not a real number."""
    frame = np.asarray(frame)
    dtype = frame.dtype
    if dtype == np.uint8:
        return IntensityWindow("uint8")
    if dtype == np.bool_:
        raise UnsupportedImageTypeError("a bool frame is a mask, not an image: pass intensities")
    if dtype.kind not in "iuf":
        raise UnsupportedImageTypeError(f"frame pixel type {dtype} is not an image type")
    if frame.size == 0:
        raise UnsupportedImageTypeError(f"frame of shape {frame.shape} holds no pixels")
    if dtype.kind == "f":
        finite = np.isfinite(frame)
        if not finite.any():
            raise NonFiniteFrameError(
                f"frame of shape {frame.shape} has no finite pixel (all NaN or infinite): nothing to segment"
            )
        values = frame[finite] if not finite.all() else frame
    else:
        values = frame
    # a window float32 can hold (the mapping's arithmetic): values beyond it map to 0 or 255
    lo, hi = (min(max(float(v), -_FLOAT32_MAX), _FLOAT32_MAX) for v in (values.min(), values.max()))
    name = str(dtype)
    if dtype.kind in "iu" and lo >= 0:
        return IntensityWindow("bit depth", 0.0, _bit_depth_hi(hi), name)
    if dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
        return IntensityWindow("unit range", 0.0, 1.0, name)
    if dtype.kind == "f" and lo >= 0.0 and hi <= 255.0 and bool(np.all(values == np.round(values))):
        return IntensityWindow("8-bit values", 0.0, 255.0, name)
    if hi <= lo:  # a constant frame: a window one step wide (a step float32 resolves at this value)
        step = max(1.0, abs(lo) * 2.0**-20)
        lo, hi = (lo, lo + step) if lo + step <= _FLOAT32_MAX else (lo - step, lo)
    return IntensityWindow("first frame range", lo, hi, name)


class IntensityMapper:
    """The stream state of the mapping: the window, fixed once (module docstring).

    ``stated``: the window the data's metadata states (rule ``"metadata"``), kept across `reset`;
    None: fixed from the first frame. `to_uint8` maps one frame to an HxW uint8 tensor on a device.
    """

    def __init__(self, stated: IntensityWindow | None = None) -> None:
        self.stated = stated
        self.window: IntensityWindow | None = stated

    def reset(self, stated: IntensityWindow | None | str = "keep") -> None:
        """A new stream: forget the window fixed from a first frame. ``stated``: a new stated window
        (or None for none); by default the stated one is kept."""
        if stated != "keep":
            self.stated = stated  # type: ignore[assignment]
        self.window = self.stated

    def describe(self) -> dict[str, Any] | None:
        """The window in use as `IntensityWindow.to_dict`, None before the first frame."""
        return None if self.window is None else self.window.to_dict()

    def check_host_frame(self, frame: np.ndarray) -> IntensityWindow:
        """Check a host frame (numpy) and fix the window on the first one: the window to use.

        Raises `NonFiniteFrameError` for a float frame without a finite pixel (every frame, not just
        the first), `UnsupportedImageTypeError` for a non-image pixel type.
        """
        if frame.dtype.kind == "f" and frame.size and not np.isfinite(frame).any():
            raise NonFiniteFrameError(
                f"frame of shape {frame.shape} has no finite pixel (all NaN or infinite): nothing to segment"
            )
        if self.window is None or (self.window.rule == "uint8" and frame.dtype != np.uint8):
            self.window = window_for_frame(frame)
        return self.window

    def window_for(self, tensor: Any, host_frame: np.ndarray | None) -> IntensityWindow:
        """The window for one frame (fixing it on the stream's first frame), after the checks.

        ``tensor``: the frame on its device. ``host_frame``: the same frame on the host (numpy) when
        it came from there (the checks and the first window use it); None for a frame that was a
        device tensor (its first window costs one declared host read, and it is not checked for
        non-finite pixels).
        """
        import torch

        if host_frame is not None:
            return self.check_host_frame(host_frame)
        window = self.window
        if window is None or (window.rule == "uint8" and tensor.dtype != torch.uint8):
            window = self.window = self._window_of_device_frame(tensor)
        return window

    def _window_of_device_frame(self, tensor: Any) -> IntensityWindow:
        """The first frame's window when the frame is a device tensor: min/max in one declared read."""
        import torch

        from UltramotionIGTLib.core.hostsync import allowed_host_transfer

        if tensor.dtype == torch.uint8:
            return IntensityWindow("uint8")
        with allowed_host_transfer("intensity window: the stream's first frame (once per stream)"):
            host = tensor.detach().to("cpu").numpy()
        return window_for_frame(host)


def apply_window(tensor: Any, window: IntensityWindow) -> Any:
    """A frame tensor with ``window`` applied, on its device, no sync: the uint8 tensor itself for
    rule ``"uint8"``, else float32 ``(x - lo) * scale`` (not yet rounded or
    clipped: colour frames are converted to luminance first) with non-finite pixels at 0."""
    import torch

    if tensor.dtype == torch.uint8 and window.rule == "uint8":
        return tensor
    if tensor.dtype == torch.float64:  # as `IntensityWindow.map_numpy`: no float32 overflow
        tensor = tensor.clamp(window.lo, window.hi)
    x = tensor.to(torch.float32)
    if tensor.dtype.is_floating_point:
        x = torch.nan_to_num(x, nan=window.lo, posinf=window.lo, neginf=window.lo)
    return (x - window.lo) * window.scale
