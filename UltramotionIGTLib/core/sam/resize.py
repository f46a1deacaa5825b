"""Device-side SAM image preprocessing, one per family's recipe.

SAM and MobileSAM: bit-exact with ``ResizeLongestSide.apply_image`` (Pillow bilinear with
antialiasing): the taps are computed once per (input size, output size) on the host and uploaded;
every frame is then resized with integer tensor ops on its own device. Source of the arithmetic:
Pillow ``src/libImaging/Resample.c`` (``precompute_coeffs``, ``normalize_coeffs_8bpc``, and the pass
order of ``ImagingResample``).

MedSAM: the square bicubic resize of ``skimage.transform.resize`` and min-max scaling
(`_SquareResizeTables`, `resize_square_medsam`), as float64 matmuls with per-size matrices.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from UltramotionIGTLib.core.hostsync import allowed_host_transfer

_PIL_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point precision for 8-bit resampling


def get_preprocess_shape(old_h: int, old_w: int, long_side: int) -> tuple[int, int]:
    """(new_h, new_w) with the longest side ``long_side``; same rounding as `ResizeLongestSide`, but
    never 0: a side that would round to 0 (aspect beyond 2 x ``long_side`` : 1) is 1 pixel.
    `ValueError` for an empty image."""
    if min(old_h, old_w) < 1:
        raise ValueError(f"cannot resize an image of {old_h} x {old_w} pixels")
    scale = long_side * 1.0 / max(old_h, old_w)
    return max(1, int(old_h * scale + 0.5)), max(1, int(old_w * scale + 0.5))


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
        # the first frame of a new input size: 4 uploads (index and weights per axis), none after
        with allowed_host_transfer("SAM resize tables, once per input size", max_syncs=4):
            self.taps_w = self._upload(*_pil_bilinear_taps(in_hw[1], out_hw[1]), device)
            self.taps_h = self._upload(*_pil_bilinear_taps(in_hw[0], out_hw[0]), device)

    @staticmethod
    def _upload(
        index: np.ndarray, weight: np.ndarray, device: torch.device
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One upload of each out x K table; the per-tap columns are cut on the device."""
        index_d = torch.from_numpy(np.ascontiguousarray(index)).to(device)
        weight_d = torch.from_numpy(np.ascontiguousarray(weight)).to(device)
        return [
            (index_d[:, k].contiguous(), weight_d[:, k : k + 1].contiguous()) for k in range(index.shape[1])
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


# ---------------------------------------------------------------------------------------------------
# MedSAM: square bicubic resize (skimage), on the device
# ---------------------------------------------------------------------------------------------------


def _skimage_cubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``out_size x in_size`` float64: ``skimage.transform.resize(order=3, mode="reflect",
    anti_aliasing=True)`` along one axis, as a matrix.

    skimage (``transform/_warps.py::resize``) smooths with a Gaussian of sigma ``max(0, (in/out - 1) / 2)``
    (``scipy.ndimage.gaussian_filter``, mode ``"mirror"``, truncate 4) and then calls
    ``scipy.ndimage.zoom(order=3, mode="mirror", grid_mode=True)``: both are linear and act on each
    axis alone, so applying them to the identity (rows = samples) gives the matrix. The spline
    evaluated at the untouched axis' own nodes is the identity up to rounding.
    """
    from scipy import ndimage

    basis = np.eye(in_size)
    sigma = max(0.0, (in_size / out_size - 1.0) / 2.0)
    if sigma > 0:
        basis = ndimage.gaussian_filter1d(basis, sigma, axis=0, mode="mirror")
    matrix = ndimage.zoom(basis, (out_size / in_size, 1.0), order=3, mode="mirror", grid_mode=True)
    if matrix.shape != (out_size, in_size):  # zoom rounds the output shape; never seen off, but be sure
        raise ValueError(f"resize matrix {matrix.shape} for {in_size} -> {out_size}")
    return matrix


class _SquareResizeTables:
    """MedSAM's image preprocessing for one input size, on the device.

    Source: bowang-lab/MedSAM ``MedSAM_Inference.py`` (the recipe its released weights expect): the
    HxWx3 uint8 image resized to SxS with ``skimage.transform.resize`` (order 3, preserve_range,
    anti-aliasing) and cast to uint8; minus its minimum, divided by max(max - min, 1e-8); float32,
    permuted to 1x3xSxS. No mean/std, no padding.

    Here the resize is two float64 matmuls with the per-axis matrices of `_skimage_cubic_matrix`
    (built once per input size on the host with scipy, then uploaded), followed by skimage's clip to
    the input's range and the truncating cast to integers; the min-max scaling divides in float64
    before the float32 cast, like numpy. Per frame: device ops only, no host sync.

    The truncating cast is ill-conditioned where the exact resized value is an integer (flat regions):
    skimage's own float noise (~1e-13) sometimes lands just below the integer there and truncates one
    grey level down. Our sums round differently, so values within 1e-9 below an integer are taken as
    that integer (the exact-arithmetic result). Measured on the PLUS recordings: gray B-mode frames
    equal the recipe bit for bit; a colour frame with a flat white background differs by one grey
    level at 3-7 % of its pixels, all where skimage's value lies within 1e-6 of an integer.
    """

    def __init__(self, in_hw: tuple[int, int], size: int, device: torch.device) -> None:
        self.size = int(size)
        rows = _skimage_cubic_matrix(in_hw[0], size)
        cols = _skimage_cubic_matrix(in_hw[1], size)
        with allowed_host_transfer("MedSAM resize matrices, once per input size", max_syncs=2):
            self.rows = torch.from_numpy(rows).to(device)
            self.cols_t = torch.from_numpy(np.ascontiguousarray(cols.T)).to(device)

    def resize(self, image: torch.Tensor) -> torch.Tensor:
        """CxHxW uint8 -> CxSxS float64 holding the recipe's uint8 values (its resize and cast)."""
        x = image.to(torch.float64)
        lo, hi = x.amin(), x.amax()
        resized = torch.matmul(torch.matmul(self.rows, x), self.cols_t)
        # skimage clips to the input's range; astype(uint8) truncates (1e-9: see the class docstring).
        return resized.clamp_(lo, hi).add_(1e-9).trunc_()

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        """CxHxW uint8 (C = 1 gray, or 3 RGB) -> 1x3xSxS float32 in 0..1, the image encoder's input.

        The result is laid out like the recipe's ``HxWx3`` tensor permuted to ``3xHxW`` (channels
        last in memory), so the encoder runs the same kernels and gives the same embedding.
        """
        resized = self.resize(image)
        lo, hi = resized.amin(), resized.amax()
        scaled = ((resized - lo) / (hi - lo).clamp_(min=1e-8)).to(torch.float32)
        hwc = scaled.permute(1, 2, 0).expand(self.size, self.size, 3).contiguous()
        return hwc.permute(2, 0, 1)[None]


def resize_square_medsam(image: torch.Tensor, size: int) -> torch.Tensor:
    """MedSAM's preprocessing of a CxHxW uint8 tensor (C = 1 or 3) on its own device: 1x3xSxS float32.

    ``skimage.transform.resize(img, (size, size), order=3, preserve_range=True,
    anti_aliasing=True).astype(np.uint8)`` then min-max scaling to 0..1, on the device; equal up to
    one grey level where skimage's own rounding noise flips its truncating cast (see
    `_SquareResizeTables`).
    """
    return _SquareResizeTables(tuple(image.shape[-2:]), size, image.device).apply(image)
