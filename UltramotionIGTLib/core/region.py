"""The imaging region: the part of a frame that holds the ultrasound image, without the black margin.

Scanners and frame grabbers deliver the image inside a larger frame (the sector or rectangle of the
ultrasound image, black around it, sometimes text). The models were trained on the image itself:
stretching the whole frame to the detector input shrinks the targets and adds a black border they
never saw. `ImagingRegion` is the rectangle to keep, given the way PLUS writes it in its device
configuration (``ClipRectangleOrigin="X Y"``, ``ClipRectangleSize="W H"``, pixels, origin at the
top-left) or found from the frames (`ImagingRegion.from_frames`: the bounding box of the pixels that
are ever brighter than a threshold, decided once before a run, never per frame).

Per frame the crop is a slice of the frame tensor (a view: no copy, no host sync); boxes come back
with the region's offset added and masks are padded back to the frame with zeros (`paste_masks`), so
every output stays in the frame's pixel coordinates.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from UltramotionIGTLib.errors import InputFileError


@dataclass(frozen=True)
class ImagingRegion:
    """A pixel rectangle of the frame: top-left (``x``, ``y``), ``width`` x ``height`` (pixels, > 0)."""

    x: int
    y: int
    width: int
    height: int

    def __post_init__(self) -> None:
        if min(self.x, self.y) < 0 or min(self.width, self.height) < 1:
            raise InputFileError(
                f"imaging region {self.as_text()} is not a rectangle inside a frame: X, Y >= 0 and W, H >= 1"
            )

    @classmethod
    def parse(cls, text: str) -> ImagingRegion:
        """``"X,Y,W,H"`` or PLUS's ``"X Y W H"`` (ClipRectangleOrigin then ClipRectangleSize), pixels."""
        parts = [p for p in re.split(r"[,\s]+", str(text).strip()) if p]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) != 4:
            raise InputFileError(
                f"imaging region {text!r} is not X,Y,W,H in pixels (PLUS: ClipRectangleOrigin X Y, "
                "ClipRectangleSize W H), e.g. 120,40,560,520"
            )
        return cls(*values)

    @classmethod
    def from_frames(cls, frames: Iterable[Any], threshold: float = 0.0) -> ImagingRegion:
        """The bounding box of the pixels above ``threshold`` in any of ``frames`` (HxW or HxWx3,
        numpy or torch; read on the host, once, before a run). Raises InputFileError when every
        pixel is at or below the threshold (nothing to find)."""
        seen: np.ndarray | None = None
        for frame in frames:
            array = frame.detach().cpu().numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame)
            bright = array > threshold
            if bright.ndim == 3:
                bright = bright.any(axis=-1)
            seen = bright if seen is None else (seen | bright)
        if seen is None or not seen.any():
            raise InputFileError(
                f"no pixel above {threshold} in the frames: no imaging region to find; give it as X,Y,W,H"
            )
        rows = np.flatnonzero(seen.any(axis=1))
        cols = np.flatnonzero(seen.any(axis=0))
        return cls(int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1))

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.width, self.height)

    def as_text(self) -> str:
        return f"{self.x},{self.y},{self.width},{self.height}"

    def clipped(self, height: int, width: int) -> ImagingRegion:
        """This region inside an ``height`` x ``width`` frame (PLUS clips its rectangle the same way);
        InputFileError when nothing of it is inside."""
        x1, y1 = min(self.x + self.width, width), min(self.y + self.height, height)
        if x1 <= self.x or y1 <= self.y:
            raise InputFileError(f"imaging region {self.as_text()} lies outside the {width}x{height} frame")
        return ImagingRegion(self.x, self.y, x1 - self.x, y1 - self.y)

    def crop(self, image: torch.Tensor) -> torch.Tensor:
        """The region of an HxW (or HxWxC) frame tensor: a view (no copy, no sync)."""
        return image[self.y : self.y + self.height, self.x : self.x + self.width]

    def offset_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Kx4 XYXY boxes in region pixels -> frame pixels (same device and dtype). The offsets go in as
        Python scalars: no small tensor is uploaded per frame."""
        x, y = self.x, self.y
        return torch.stack((boxes[:, 0] + x, boxes[:, 1] + y, boxes[:, 2] + x, boxes[:, 3] + y), dim=1)

    def paste_masks(self, masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Kxhxw masks or probabilities of the region -> KxHxW of the frame, zero outside the region."""
        right = width - self.x - masks.shape[-1]
        bottom = height - self.y - masks.shape[-2]
        if masks.dtype == torch.bool:
            return torch.nn.functional.pad(masks.to(torch.uint8), (self.x, right, self.y, bottom)).bool()
        return torch.nn.functional.pad(masks, (self.x, right, self.y, bottom))
