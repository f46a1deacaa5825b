"""Device-side SAM image preprocessing, bit-exact with ``ResizeLongestSide.apply_image`` (Pillow
bilinear with antialiasing): the taps are computed once per (input size, output size) on the host and
uploaded; every frame is then resized with integer tensor ops on its own device.

Source of the arithmetic: Pillow ``src/libImaging/Resample.c`` (``precompute_coeffs``,
``normalize_coeffs_8bpc``, and the pass order of ``ImagingResample``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from UltramotionIGTLib.core.hostsync import allowed_host_transfer

_PIL_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point precision for 8-bit resampling


def get_preprocess_shape(old_h: int, old_w: int, long_side: int) -> tuple[int, int]:
    """(new_h, new_w) with the longest side ``long_side``; same rounding as `ResizeLongestSide`."""
    scale = long_side * 1.0 / max(old_h, old_w)
    return int(old_h * scale + 0.5), int(old_w * scale + 0.5)


def _pil_bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's antialiased bilinear taps for one axis: (indices out x K int64, weights out x K int32).

    Same arithmetic as Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` (doubles, then
    fixed point with 22 fractional bits, rounded half away from zero); unused taps get weight 0.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    index = np.zeros((out_size, ksize), dtype=np.int64)
    weight = np.zeros((out_size, ksize), dtype=np.int32)
    one = float(1 << _PIL_PRECISION_BITS)
    ss = 1.0 / filterscale
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        taps = []
        total = 0.0
        for x in range(xmax):
            t = abs((x + xmin - center + 0.5) * ss)
            w = 1.0 - t if t < 1.0 else 0.0
            taps.append(w)
            total += w
        for x, w in enumerate(taps):
            if total != 0.0:
                w /= total
            weight[xx, x] = int(w * one - 0.5) if w < 0 else int(w * one + 0.5)
            index[xx, x] = x + xmin
        index[xx, xmax:] = min(xmin + max(xmax - 1, 0), in_size - 1)
    return index, weight


def _resample_rows(x: torch.Tensor, taps: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One Pillow pass along dim 1 of a contiguous CxNxM int32 tensor: rounded, clipped to 0..255.

    Each tap gathers whole rows (``index_select`` on dim 1, memory-friendly) and accumulates
    ``row * weight`` in int32, exactly Pillow's integer arithmetic.
    """
    index, weight = taps[0]
    acc = x.index_select(1, index) * weight
    for index, weight in taps[1:]:
        acc.add_(x.index_select(1, index) * weight)
    acc.add_(1 << (_PIL_PRECISION_BITS - 1))
    return acc.bitwise_right_shift_(_PIL_PRECISION_BITS).clamp_(0, 255)


def _pillow_order_rule(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> bool:
    """Pillow >= 13 resamples vertically first when the height shrinks by more than twice the width."""
    (in_h, in_w), (out_h, out_w) = in_hw, out_hw
    return out_h < in_h and (in_h - out_h) > 2 * (in_w - out_w)


_PILLOW_ORDER: list[bool] = []  # [uses the vertical-first rule], probed once


def _pillow_uses_order_rule() -> bool:
    """Whether the installed Pillow follows `_pillow_order_rule` (13+) or always goes horizontal first.

    Probed once on a small image whose two pass orders give different pixels, so the device resize
    keeps matching the official (PIL-based) preprocessing whatever Pillow version is installed.
    """
    if not _PILLOW_ORDER:
        try:
            from PIL import Image
        except ImportError:  # no Pillow: the official predictor cannot run either; use the modern rule
            _PILLOW_ORDER.append(True)
            return True
        image = np.random.default_rng(20240611).integers(0, 256, (200, 9), dtype=np.uint8)
        in_hw, out_hw = (200, 9), (50, 2)
        reference = np.asarray(Image.fromarray(image).resize((out_hw[1], out_hw[0]), Image.BILINEAR))
        tables = _ResizeTables(in_hw, out_hw, torch.device("cpu"), vertical_first=True)
        vertical = tables.apply(torch.from_numpy(image)[None])[0]
        with allowed_host_transfer("Pillow resize-order probe: once per process, on CPU tensors"):
            _PILLOW_ORDER.append(torch.equal(torch.from_numpy(np.array(reference)), vertical))
    return _PILLOW_ORDER[0]


class _ResizeTables:
    """Device-resident Pillow taps for one (input size -> output size), built once per size."""

    def __init__(
        self,
        in_hw: tuple[int, int],
        out_hw: tuple[int, int],
        device: torch.device,
        vertical_first: bool | None = None,
    ) -> None:
        self.need_w = in_hw[1] != out_hw[1]
        self.need_h = in_hw[0] != out_hw[0]
        if vertical_first is None:
            vertical_first = _pillow_order_rule(in_hw, out_hw) and _pillow_uses_order_rule()
        self.vertical_first = vertical_first
        self.taps_w = self._upload(*_pil_bilinear_taps(in_hw[1], out_hw[1]), device)
        self.taps_h = self._upload(*_pil_bilinear_taps(in_hw[0], out_hw[0]), device)

    @staticmethod
    def _upload(
        index: np.ndarray, weight: np.ndarray, device: torch.device
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (
                torch.from_numpy(np.ascontiguousarray(index[:, k])).to(device),
                torch.from_numpy(np.ascontiguousarray(weight[:, k : k + 1])).to(device),
            )
            for k in range(index.shape[1])
        ]

    def _horizontal(self, x: torch.Tensor) -> torch.Tensor:
        # Transposed so that the pass gathers rows; back to CxHxW afterwards.
        out = _resample_rows(x.transpose(1, 2).contiguous(), self.taps_w)
        return out.transpose(1, 2).contiguous()

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        """CxHxW uint8 -> CxH'xW' uint8, the two passes in Pillow's order."""
        x = image.to(torch.int32)
        if self.vertical_first and self.need_h:
            x = _resample_rows(x.contiguous(), self.taps_h)
        if self.need_w:
            x = self._horizontal(x)
        if self.need_h and not self.vertical_first:
            x = _resample_rows(x.contiguous(), self.taps_h)
        return x.to(torch.uint8)


def resize_longest_side_uint8(image: torch.Tensor, long_side: int) -> torch.Tensor:
    """Resize a CxHxW uint8 tensor so its longest side is ``long_side``, on its own device.

    Bit-exact with ``ResizeLongestSide(long_side).apply_image`` (Pillow bilinear, antialiased) on the
    HxWxC numpy image. Returns CxH'xW' uint8 on the input's device.
    """
    out_hw = get_preprocess_shape(image.shape[-2], image.shape[-1], long_side)
    return _ResizeTables(tuple(image.shape[-2:]), out_hw, image.device).apply(image)
