"""Per-target visibility on the device: "can I trust this mask right now?".

The in-house pipeline decided, per frame and per target, whether the target was reliably visible with
a finite-state machine over three states, ``VISIBLE -> RELOCALIZING -> LOST`` and back, driven by the
detection confidence and image-quality scores inside and around the mask. Its scores were never
implemented (stubs) and its spatial weight maps were computed on the CPU. Here everything runs on the
device, batched over the K targets of a frame, with fixed shapes and no host sync:

* `mask_region_maps` -- W_edge (a band around the mask boundary), W_in (inside) and W_out (a ring
  outside) from each mask by dilation and erosion (`max_filter`: the stride-1 max-pool of a
  rectangle), widths in millimetres converted with the pixel spacing. `compute_mask_weights`
  (`UltramotionIGTLib.core.pipeline`) returns them beside the weighted centroids and areas.
* `VisibilityMonitor.update` -- the image-quality scores S1-S4 and the consistency scores C1-C3 per
  target (each in 0..1, defined in `VisibilityMonitor.score_targets`), then the state machine per tracked target
  (`advance_states`), its state kept in fixed-size tensors indexed by the tracker's slots so that it
  follows the track ids across frames.

The scores are computed on an analysis grid: the frame and masks average-pooled by an integer
``stride`` (`analysis_stride`: the longest side becomes at most ``VisibilityConfig.analysis_size``
pixels). That keeps the cost a few per cent of a frame on a CPU; widths stay in millimetres (the grid's
spacing is ``stride x`` the frame's). Without a known pixel spacing 1 mm per pixel is assumed.

Probe pose: given the frame's image-to-reference transform (4x4, mm; e.g. PLUS ``ImageToReference``),
S4, C2 and C3 compare each target with its previous observation moved by the probe's motion (the
in-plane part of ``inv(P_now) @ P_then``); without it they compare in image space (zero motion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from UltramotionIGTLib.core.hostsync import allowed_host_transfer
from UltramotionIGTLib.core.packet import LOST, RELOCALIZING, SCORE_NAMES, STATE_NAMES, VISIBLE

__all__ = [
    "LOST",
    "RELOCALIZING",
    "SCORE_NAMES",
    "STATE_NAMES",
    "VISIBLE",
    "SlotStates",
    "VisibilityConfig",
    "VisibilityMonitor",
    "VisibilityResult",
    "advance_states",
    "analysis_stride",
    "as_pose",
    "mask_region_maps",
    "max_filter",
    "pool_to_grid",
]

#: Area / cut-length^2 of a half disc (pi r^2 / 2 over (2 r)^2): S3's truncation term is 0.5 there.
HALF_DISC_RATIO = math.pi / 8.0
_EPS = 1e-6


@dataclass
class VisibilityConfig:
    """Thresholds and widths of the visibility stage (the in-house names where it had them).

    State machine (`advance_states`), all in 0..1 except the frame counts:

    * ``tau_conf``: detection confidence a target needs to count as seen this frame.
    * ``theta_on``: quality (the lowest of S1-S4) needed to enter VISIBLE; ``theta_off``: quality
      below which a frame counts against VISIBLE (``theta_off <= theta_on``: hysteresis).
    * ``theta_cont``: consistency (geometric mean of C1-C3) needed to leave RELOCALIZING/LOST for VISIBLE.
    * ``on_frames`` consecutive good frames enter VISIBLE; ``off_frames`` consecutive bad frames leave
      it; ``lost_frames`` consecutive bad frames make a relocalizing target LOST; no state is left
      before it was held ``min_dwell`` frames (no single-frame states: no flicker).

    Scores (`VisibilityMonitor.score_targets`): ``edge_mm`` half-width of the W_edge band, ``ring_mm`` width of the W_out
    ring beyond it; ``sharpness_half`` (pixel^-4): S1 is 0.5 at this ratio of Laplacian to grey-level variance;
    ``cnr_half``: S2 is 0.5 at this contrast-to-noise ratio; ``motion_sigma_mm``: C3's tolerance for one
    frame of unexplained displacement. ``analysis_size``: longest side of the analysis grid (pixels).

    Defaults were chosen on phantom sequences with events from the training seeds; ``docs/visibility.md``
    gives the numbers.
    """

    enabled: bool = True
    tau_conf: float = 0.3
    theta_on: float = 0.5
    theta_off: float = 0.4
    theta_cont: float = 0.2
    on_frames: int = 1
    off_frames: int = 1
    lost_frames: int = 10
    min_dwell: int = 2
    edge_mm: float = 0.8
    ring_mm: float = 1.6
    sharpness_half: float = 1.3
    cnr_half: float = 2.0
    motion_sigma_mm: float = 2.0
    analysis_size: int = 96

    def __post_init__(self) -> None:
        for name in ("tau_conf", "theta_on", "theta_off", "theta_cont"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"VisibilityConfig.{name} must be in [0, 1], got {value}")
        if self.theta_off > self.theta_on:
            raise ValueError(
                f"VisibilityConfig.theta_off ({self.theta_off}) must not exceed theta_on ({self.theta_on})"
            )
        for name in ("on_frames", "off_frames", "lost_frames", "min_dwell"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"VisibilityConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("edge_mm", "ring_mm", "sharpness_half", "cnr_half", "motion_sigma_mm"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"VisibilityConfig.{name} must be > 0, got {getattr(self, name)}")
        if int(self.analysis_size) < 16:
            raise ValueError(f"VisibilityConfig.analysis_size must be >= 16, got {self.analysis_size}")


# -- morphology and grids -------------------------------------------------------------------------


def _window_max(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Max over windows of 2r + 1 along ``dim``, valid part only: the result is 2r shorter.

    ``out[i] = max(x[i .. i + 2r])`` by log2(2r + 1) doublings of shifted maxima (van Herk's idea):
    after a step ``acc[i] = max(x[i .. i + span - 1])`` and the tensor is ``span`` shorter.
    """
    if r <= 0:
        return x
    combine = torch.logical_or if x.dtype == torch.bool else torch.maximum
    width, span, acc = 2 * r + 1, 1, x
    while 2 * span <= width:
        n = acc.shape[dim]
        acc = combine(acc.narrow(dim, 0, n - span), acc.narrow(dim, span, n - span))
        span *= 2
    rest = width - span
    if rest:
        n = acc.shape[dim]
        acc = combine(acc.narrow(dim, 0, n - rest), acc.narrow(dim, rest, n - rest))
    return acc


def max_filter(x: torch.Tensor, rx: int, ry: int) -> torch.Tensor:
    """Dilation of ``...xHxW`` ``x`` by a (2 ry + 1) x (2 rx + 1) rectangle: a max-pool of stride 1.

    Bool masks (OR) or non-negative real maps (max); pixels outside the image count as 0/False, so the
    result has ``x``'s shape, dtype and device (equal to ``max_pool2d(x, (2ry+1, 2rx+1), 1, (ry, rx))``
    for real maps). Separable, each axis by log2 doublings of shifted maxima (van Herk's idea): torch's
    CPU ``max_pool2d`` with stride 1 costs 20-50x more at these sizes. Erosion is
    ``~max_filter(~x, ...)`` (pixels outside then count as inside: no erosion from the image border).
    No host sync.
    """
    rx, ry = max(int(rx), 0), max(int(ry), 0)
    if rx == 0 and ry == 0:
        return x
    *lead, h, w = x.shape
    padded = x.new_zeros(*lead, h + 2 * ry, w + 2 * rx)
    padded[..., ry : ry + h, rx : rx + w] = x
    return _window_max(_window_max(padded, rx, x.ndim - 1), ry, x.ndim - 2)


def mm_to_radius(mm: float, spacing: tuple[float, float]) -> tuple[int, int]:
    """(rx, ry) pixels for a distance of ``mm`` on a grid of ``spacing`` (sx, sy) mm; at least 1."""
    return (max(1, round(mm / float(spacing[0]))), max(1, round(mm / float(spacing[1]))))


def analysis_stride(shape: tuple[int, int], analysis_size: int) -> int:
    """Integer pooling stride that brings the longest side of ``shape`` (H, W) to <= ``analysis_size``."""
    return max(1, math.ceil(max(int(shape[0]), int(shape[1])) / int(analysis_size)))


def pool_to_grid(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Average-pool ``...xHxW`` float ``x`` by ``stride`` into ceil(H / stride) x ceil(W / stride)
    blocks (partial blocks at the far edges average the pixels they have). A sum of stride^2 strided
    views: torch's CPU ``avg_pool2d`` (and a reshaped sum) is many times slower for this."""
    if stride == 1:
        return x
    *lead, big_h, big_w = x.shape
    h, w = -(-big_h // stride), -(-big_w // stride)
    exact = (big_h, big_w) == (h * stride, w * stride)
    if not exact:
        padded = x.new_zeros(*lead, h * stride, w * stride)
        padded[..., :big_h, :big_w] = x
        x = padded
    sums = x[..., ::stride, ::stride] + x[..., ::stride, 1::stride]
    for i in range(stride):
        for j in range(stride):
            if i * stride + j > 1:
                sums += x[..., i::stride, j::stride]
    if exact:
        return sums * (1.0 / (stride * stride))
    rows = torch.full((h,), float(stride), dtype=x.dtype, device=x.device)
    cols = torch.full((w,), float(stride), dtype=x.dtype, device=x.device)
    rows[-1] = big_h - (h - 1) * stride
    cols[-1] = big_w - (w - 1) * stride
    return sums / (rows[:, None] * cols[None, :])


def mask_region_maps(
    masks: torch.Tensor, spacing: tuple[float, float], edge_mm: float, ring_mm: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The in-house spatial weight maps of K masks: (W_edge, W_in, W_out), each KxHxW bool.

    ``masks`` KxHxW bool on a grid of ``spacing`` (sx, sy) mm per pixel. With D(r) the dilation and
    E(r) the erosion of a mask by a rectangle of half-width r (`max_filter`), e = ``edge_mm`` and
    o = ``ring_mm`` (converted to pixels per axis, at least 1):

    * W_edge = D(e) - E(e): the band within e of the boundary, both sides;
    * W_in = E(e): the inside, at least e from the boundary -- the whole mask where E(e) is empty
      (targets thinner than 2e, e.g. a needle shaft);
    * W_out = D(e + o) - D(e): the ring of width o outside the band.

    W_edge | W_in is D(e) and W_edge | W_in | W_out is D(e + o). No host sync.
    """
    rx_e, ry_e = mm_to_radius(edge_mm, spacing)
    rx_o, ry_o = mm_to_radius(ring_mm, spacing)
    dilated = max_filter(masks, rx_e, ry_e)
    eroded = ~max_filter(~masks, rx_e, ry_e)
    wide = max_filter(dilated, rx_o, ry_o)  # D(e + o): dilations by rectangles add up
    inside = torch.where(eroded.flatten(-2).amax(dim=-1)[..., None, None], eroded, masks)
    return dilated & ~eroded, inside, wide & ~dilated


def as_pose(pose: np.ndarray) -> np.ndarray:
    """A frame's image-to-reference transform as a 4x4 float64 numpy array (mm), validated.

    ``pose``: 4x4 host array-like (numpy, nested lists) that maps image millimetres (x = column x
    sx, y = row x sy, z = 0) to a fixed reference frame: poses come from the tracker with the frame,
    on the host. Raises ValueError for another shape or non-finite values.
    """
    matrix = np.asarray(pose, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise ValueError(f"pose must be a finite 4x4 transform, got shape {matrix.shape}")
    return matrix


# -- the state machine ------------------------------------------------------------------------------


class SlotStates(NamedTuple):
    """State machine variables per track slot (all int64, same shape): the state code, consecutive
    good and bad frames, and frames spent in the current state."""

    state: torch.Tensor
    good: torch.Tensor
    bad: torch.Tensor
    dwell: torch.Tensor

    @classmethod
    def fresh(cls, n: int, device: torch.device | str) -> SlotStates:
        def zeros() -> torch.Tensor:
            return torch.zeros(n, dtype=torch.int64, device=device)

        return cls(
            torch.full((n,), RELOCALIZING, dtype=torch.int64, device=device), zeros(), zeros(), zeros()
        )


def advance_states(
    prev: SlotStates,
    seen: torch.Tensor,
    confidence: torch.Tensor,
    quality: torch.Tensor,
    consistency: torch.Tensor,
    born: torch.Tensor,
    config: VisibilityConfig,
) -> SlotStates:
    """One frame of the visibility state machine for every slot at once (no branching on values).

    Inputs (same length N, one device): ``seen`` bool (the slot's track was matched to a valid target
    this frame), ``confidence`` (its detection score), ``quality`` and ``consistency`` (0..1, see
    `VisibilityMonitor.score_targets`; anything where not seen), ``born`` bool (the slot opened a new track this
    frame: its history is forgotten). Per slot:

    * a frame is *good* when seen with confidence >= tau_conf, quality >= theta_on and consistency
      >= theta_cont; *bad* unless seen with confidence >= tau_conf and quality >= theta_off;
    * a new track starts VISIBLE if its first frame is good, else RELOCALIZING;
    * VISIBLE -> RELOCALIZING after ``off_frames`` consecutive bad frames;
    * RELOCALIZING -> VISIBLE after ``on_frames`` consecutive good frames;
    * RELOCALIZING -> LOST after ``lost_frames`` consecutive bad frames;
    * LOST -> RELOCALIZING when the target is seen again with confidence >= tau_conf;
    * no transition leaves a state held for fewer than ``min_dwell`` frames.

    Returns the new `SlotStates`.
    """
    candidate = seen & (confidence >= config.tau_conf)
    keep = candidate & (quality >= config.theta_off)
    enter = candidate & (quality >= config.theta_on) & (consistency >= config.theta_cont)
    zero = torch.zeros_like(prev.good)
    state = torch.where(born, torch.where(enter, VISIBLE, RELOCALIZING), prev.state)
    good = torch.where(enter, torch.where(born, zero, prev.good) + 1, zero)
    bad = torch.where(keep, zero, torch.where(born, zero, prev.bad) + 1)
    dwell = torch.where(born, zero, prev.dwell)
    settled = dwell >= config.min_dwell
    new = state
    new = torch.where((state == VISIBLE) & settled & (bad >= config.off_frames), RELOCALIZING, new)
    new = torch.where((state == RELOCALIZING) & settled & (good >= config.on_frames), VISIBLE, new)
    new = torch.where((state == RELOCALIZING) & settled & (bad >= config.lost_frames), LOST, new)
    new = torch.where((state == LOST) & settled & candidate, RELOCALIZING, new)
    dwell = torch.where((new != state) | born, 1, dwell + 1)
    return SlotStates(new, good, bad, dwell)


# -- scores ----------------------------------------------------------------------------------------


class VisibilityResult(NamedTuple):
    """One frame's visibility, on the device.

    ``states`` K int64 per target row (`STATE_NAMES` codes; LOST for invalid rows); ``scores`` Kx9
    float32 (`SCORE_NAMES` columns); ``slot_states`` M int64, the state of every tracker slot (its
    track id and label are the tracker's ``ids`` / ``labels``). Evidence per slot for offline analysis
    (M each): ``seen`` bool, ``confidence``, ``quality``, ``consistency`` float32, ``born`` bool.
    """

    states: torch.Tensor
    scores: torch.Tensor
    slot_states: torch.Tensor
    seen: torch.Tensor
    confidence: torch.Tensor
    quality: torch.Tensor
    consistency: torch.Tensor
    born: torch.Tensor


def _geometric_mean(columns: torch.Tensor) -> torch.Tensor:
    """Row-wise geometric mean of KxN scores in 0..1 (a single zero pulls it to ~0)."""
    return torch.exp(torch.log(columns.clamp(min=1e-4)).mean(dim=1))


def _grid_normaliser(h: int, w: int, stride: int, spacing: tuple[float, float]) -> np.ndarray:
    """3x3 map from affine_grid's normalised (x, y) of an hxw grid to image millimetres."""
    sx, sy = float(spacing[0]), float(spacing[1])
    # grid pixel j covers frame columns [j s, (j + 1) s): its centre is frame column (j + 0.5) s - 0.5
    ax, ay = 0.5 * w * stride * sx, 0.5 * h * stride * sy
    return np.array([[ax, 0.0, ax - 0.5 * sx], [0.0, ay, ay - 0.5 * sy], [0.0, 0.0, 1.0]])


def _in_plane(m: torch.Tensor) -> torch.Tensor:
    """...x4x4 -> ...x3x3: the z = 0 plane's (x, y) part of a 3-D transform."""
    # slices, not an index tensor: nothing to upload
    cols = torch.cat([m[..., :2], m[..., 3:4]], dim=-1)
    out = torch.cat([cols[..., :2, :], cols[..., 3:4, :]], dim=-2).clone()
    out[..., 2, :2] = 0.0
    out[..., 2, 2] = 1.0
    return out


def _warp(images: torch.Tensor, cur_to_prev: torch.Tensor, normaliser: np.ndarray) -> torch.Tensor:
    """Sample KxHxW ``images`` (previous grid) at the current grid's pixels mapped by ``cur_to_prev``
    (Kx3x3 on the device, image mm -> image mm); zeros outside. ``normaliser``: `_grid_normaliser`."""
    k, h, w = images.shape
    dev = images.device
    # two 3x3 host matrices (they depend on the grid size and spacing only) for the frame's warp
    with allowed_host_transfer("visibility: grid-to-mm matrices of a pose-compensated warp", max_syncs=2):
        to_mm = torch.as_tensor(normaliser, dtype=torch.float32).to(dev)
        from_mm = torch.as_tensor(np.linalg.inv(normaliser), dtype=torch.float32).to(dev)
    theta = (from_mm @ cur_to_prev @ to_mm)[:, :2, :]
    grid = F.affine_grid(theta.to(images.dtype), [k, 1, h, w], align_corners=False)
    return F.grid_sample(images[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[
        :, 0
    ]


@dataclass
class _Memory:
    """What the monitor keeps per slot (M + 1 rows: the last one is a dump for rows without a slot)."""

    states: SlotStates
    since: torch.Tensor  # frames since the slot's last observation
    has_prev: torch.Tensor  # bool
    mask: torch.Tensor  # (M+1) x h x w bool: the mask on the analysis grid at the last observation
    geometry: torch.Tensor  # (M+1) x 3: area (mm^2), box centre x, y (image mm)
    pose: torch.Tensor  # (M+1) x 4 x 4 image-to-reference at the last observation
    pose_inv: torch.Tensor
    has_pose: torch.Tensor  # bool


class VisibilityMonitor:
    """The visibility stage: scores per target and the state per track slot, on one device.

    ``max_tracks``: the tracker's slot count M (0 without a tracker: every target then gets the
    instantaneous state, VISIBLE for a good frame else RELOCALIZING). State lives in fixed-size tensors
    indexed by slot, so it follows the tracker's ids; the previous frame (for C2) is kept too. `reset`
    forgets both. No host sync in `update`.
    """

    def __init__(
        self, max_tracks: int, device: torch.device | str, config: VisibilityConfig | None = None
    ) -> None:
        self.max_tracks = int(max_tracks)
        self.device = torch.device(device)
        self.config = config or VisibilityConfig()
        self.reset()

    def reset(self) -> None:
        """Forget every slot's history and the previous frame."""
        self._memory: _Memory | None = None
        self._grid: tuple[int, int, int] | None = None  # (h, w, stride) of the memory's masks
        self._prev_image: torch.Tensor | None = None
        self._prev_pose: np.ndarray | None = None

    def _fresh_memory(self, h: int, w: int) -> _Memory:
        n, dev = self.max_tracks + 1, self.device
        eye = torch.eye(4, dtype=torch.float32, device=dev).expand(n, 4, 4).clone()
        return _Memory(
            states=SlotStates.fresh(n, dev),
            since=torch.zeros(n, dtype=torch.int64, device=dev),
            has_prev=torch.zeros(n, dtype=torch.bool, device=dev),
            mask=torch.zeros(n, h, w, dtype=torch.bool, device=dev),
            geometry=torch.zeros(n, 3, dtype=torch.float32, device=dev),
            pose=eye,
            pose_inv=eye.clone(),
            has_pose=torch.zeros(n, dtype=torch.bool, device=dev),
        )

    def update(
        self,
        image: torch.Tensor,
        masks_grid: torch.Tensor,
        regions: torch.Tensor,
        stride: int,
        boxes: torch.Tensor,
        scores: torch.Tensor,
        valid: torch.Tensor,
        det_slot: torch.Tensor | None = None,
        born: torch.Tensor | None = None,
        spacing: tuple[float, float] = (1.0, 1.0),
        pose: np.ndarray | None = None,
    ) -> VisibilityResult:
        """Score the frame's K targets and advance every slot's state.

        ``image`` HxW uint8 (the frame on the device); ``masks_grid`` Kxhxw bool masks on the
        analysis grid (``stride``: frame pixels per grid pixel); ``regions`` 3xKxhxw float 0/1:
        W_edge, W_in, W_out on that grid (`mask_region_maps`); ``boxes`` Kx4 XYXY frame pixels, ``scores``
        K, ``valid`` K bool. ``det_slot`` K int64 (the tracker slot of each row, M when none) and
        ``born`` M bool (new tracks) from the tracker (None: no tracker). ``spacing`` (sx, sy) mm per
        frame pixel; ``pose`` 4x4 float64 host array (`as_pose`) or None. Returns a
        `VisibilityResult`.
        """
        cfg = self.config
        dev, m_slots = self.device, self.max_tracks
        k, h, w = masks_grid.shape
        if self._memory is None or self._grid != (h, w, stride):
            self._memory = self._fresh_memory(h, w)
            self._grid = (h, w, stride)
            self._prev_image = None
        mem = self._memory
        valid = valid.to(torch.bool)
        if det_slot is None or det_slot.shape[0] != k:
            det_slot = torch.full((k,), m_slots, dtype=torch.int64, device=dev)
        slot = torch.where(valid, det_slot.clamp(max=m_slots), m_slots)  # K, M = dump row
        born_ext = torch.zeros(m_slots + 1, dtype=torch.bool, device=dev)
        if born is not None and m_slots:
            born_ext[:m_slots] = born
        cur_pose = cur_inv = None
        if pose is not None:
            # the frame's probe pose arrives on the host (tracking data): it and its inverse go up
            with allowed_host_transfer("visibility: the frame's probe pose and its inverse", max_syncs=2):
                cur_pose = torch.as_tensor(pose, dtype=torch.float32).to(dev)
                cur_inv = torch.as_tensor(np.linalg.inv(pose), dtype=torch.float32).to(dev)

        scores_k, masks, geometry, grey = self.score_targets(
            image, masks_grid, regions, stride, boxes, slot, born_ext, spacing, cur_pose, cur_inv, pose
        )
        conf_k = scores.to(torch.float32)
        quality, consistency = scores_k[:, 7], scores_k[:, 8]

        # -- evidence per slot (rows without a slot land in the dump row M, then ignored) -------------
        evidence = torch.zeros(m_slots + 1, 4, dtype=torch.float32, device=dev).index_copy_(
            0, slot, torch.stack((valid.to(torch.float32), conf_k, quality, consistency), dim=1)
        )
        seen = evidence[:, 0] > 0.5
        seen[m_slots] = False
        conf, qual, cons = evidence[:, 1], evidence[:, 2], evidence[:, 3]
        states = advance_states(mem.states, seen, conf, qual, cons, born_ext, cfg)
        # rows without a slot get the instantaneous state (no history to hold it)
        instant = torch.where(
            (conf_k >= cfg.tau_conf) & (quality >= cfg.theta_on) & (consistency >= cfg.theta_cont),
            VISIBLE,
            RELOCALIZING,
        )
        row_state = torch.where(slot < m_slots, states.state[slot], instant)
        row_state = torch.where(valid, row_state, LOST)

        # -- memory: the observation of every seen slot ---------------------------------------------
        mem.mask.index_copy_(0, slot, masks)
        mem.geometry.index_copy_(0, slot, geometry)
        if cur_pose is not None:
            mem.pose.index_copy_(0, slot, cur_pose.expand(k, 4, 4).contiguous())
            mem.pose_inv.index_copy_(0, slot, cur_inv.expand(k, 4, 4).contiguous())
            mem.has_pose = mem.has_pose | seen
        else:
            mem.has_pose = mem.has_pose & ~seen
        mem.has_pose = mem.has_pose & (seen | ~born_ext)
        mem.has_prev = (mem.has_prev & ~born_ext) | seen
        mem.since = torch.where(seen | born_ext, 0, mem.since + 1)
        mem.states = states
        self._prev_image = grey
        self._prev_pose = pose
        return VisibilityResult(
            states=row_state,
            scores=scores_k,
            slot_states=states.state[:m_slots],
            seen=seen[:m_slots],
            confidence=conf[:m_slots],
            quality=qual[:m_slots],
            consistency=cons[:m_slots],
            born=born_ext[:m_slots],
        )

    def score_targets(
        self,
        image: torch.Tensor,
        masks_grid: torch.Tensor,
        regions: torch.Tensor,
        stride: int,
        boxes: torch.Tensor,
        slot: torch.Tensor,
        born_ext: torch.Tensor,
        spacing: tuple[float, float],
        cur_pose: torch.Tensor | None,
        cur_inv: torch.Tensor | None,
        pose_host: np.ndarray | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Kx9 float32 scores of the frame's targets (`SCORE_NAMES`), each in 0..1 (1 = trustworthy),
        with what the memory keeps of them (Kxhxw bool masks, Kx3 area mm^2 and box centre mm) and the
        frame's grey levels on the grid (the next frame's C2 reference).

        On the analysis grid (frame pooled by ``stride``), with m the mask (probability > 0.5) and the
        weight maps W_edge, W_in, W_out of `mask_region_maps`; grey levels are the frame's 0..255:

        * **S1 sharpness** -- variance of the Laplacian (4-neighbour, on the full-resolution frame)
          weighted on W_edge (the in-house definition; Pech-Pacheco et al. 2000 for the variance of the
          Laplacian as a focus measure), divided by the grey-level variance on W_edge (+1) so that gain,
          depth and attenuation cancel: r, in pixel^-4. Blur (probe motion) lowers it. ``r / (r +
          sharpness_half)``.
        * **S2 signal-to-noise** -- contrast-to-noise ratio of the intensities inside (W_in) against the
          ring outside (W_out): ``|mu_in - mu_out| / sqrt((var_in + var_out) / 2 + 1)`` (CNR, e.g. Szabo,
          *Diagnostic Ultrasound Imaging*, ch. 8; the +1 grey level^2 keeps a flat black image at 0).
          Shadow, attenuation, lost contact and noise lower it. ``cnr / (cnr + cnr_half)``.
        * **S3 continuity** -- is the segmented structure whole? The closing ratio ``area(m) /
          area(close(m))`` (close = dilate then erode by ``edge_mm``: 1 for a solid mask, lower for a
          fragmented one), times a truncation term for masks cut by the image border: with A the mask area
          (mm^2) and L the length of its cut along the border (mm), ``t = A / L^2`` and the term is ``t^2 /
          (t^2 + (pi/8)^2)``, 0.5 for a half disc (a vessel half out of the field of view), 1 for no cut.
        * **S4 temporal stability** -- soft Dice of the mask with the same track's previous mask, moved by
          the probe motion when the pose is known. 1 for a track's first observation (nothing to compare).
        * **C1 geometric consistency** -- the fraction of the mask inside its detection box (grid pixel
          centres), times the ratio min/max of the mask area now and at the track's previous observation.
        * **C2 visual coherence** -- normalised cross-correlation of the frame with the previous frame
          (moved by the probe motion when known) over the target and its surroundings (W_edge | W_in |
          W_out), clipped to 0..1. 1 on a stream's first frame.
        * **C3 spatial consistency with the probe motion** -- ``exp(-d^2 / (2 sigma^2 n))``: d (mm) the
          distance of the box centre from where the probe motion puts the track's previous centre (no
          motion without a pose), n the frames since that observation, sigma = ``motion_sigma_mm``.
        * **quality** = min(S1..S4): any one failing aspect makes the image of the target untrustworthy;
          **consistency** = geometric mean of C1-C3: three pieces of evidence that the target is the
          same one, weighed together.

        ``regions`` 3xKxhxw float (W_edge, W_in, W_out), ``slot`` K int64 rows' slots (M = none),
        ``born_ext`` M+1 bool. No host sync.
        """
        slot = slot.to(torch.int64)  # each target's tracker slot (M = none): an index, never a mask
        cfg = self.config
        mem = self._memory
        dev = image.device
        k, h, w = masks_grid.shape
        sx, sy = float(spacing[0]), float(spacing[1])
        gsx, gsy = stride * sx, stride * sy
        w_edge, w_in, w_out = regions
        masks = masks_grid
        mf = masks.to(torch.float32)
        area_px = mf.flatten(1).sum(dim=1)

        # the previous frame, moved by the probe motion when both poses are known (for C2)
        prev_grey = self._prev_image
        if prev_grey is not None and pose_host is not None and self._prev_pose is not None:
            m3 = (np.linalg.inv(self._prev_pose) @ pose_host)[np.ix_([0, 1, 3], [0, 1, 3])]
            m3[2] = (0.0, 0.0, 1.0)
            with allowed_host_transfer("visibility: probe motion since the previous frame", max_syncs=1):
                cur_to_prev = torch.as_tensor(m3, dtype=torch.float32).to(dev)[None]
            prev_grey = _warp(prev_grey[None], cur_to_prev, _grid_normaliser(h, w, stride, spacing))[0]

        # every weighted sum at once: (map x target) rows times (image moment) columns, one matmul.
        # The Laplacian is taken at full resolution, then each moment is pooled onto the grid.
        img = image.to(torch.float32)
        padded = F.pad(img[None, None], (1, 1, 1, 1), mode="replicate")[0, 0]
        lap = padded[1:-1, :-2] + padded[1:-1, 2:] + padded[:-2, 1:-1] + padded[2:, 1:-1] - 4.0 * img
        grey = pool_to_grid(img, stride)
        columns = [torch.ones_like(grey), grey, pool_to_grid(img * img, stride)]
        columns += [pool_to_grid(lap, stride), pool_to_grid(lap * lap, stride)]
        if prev_grey is not None:
            columns += [prev_grey, prev_grey * prev_grey, grey * prev_grey, grey * grey]
        n_col = len(columns)
        sums = regions.reshape(3 * k, h * w) @ torch.stack(columns).reshape(n_col, h * w).T
        sums = sums.reshape(3, k, n_col)
        # W_edge, W_in and W_out are disjoint unless W_in fell back to the mask (then W_in is inside W_edge):
        # their union, the target and its surroundings, sums without a map of its own
        overlap = (w_in * w_edge).flatten(1).sum(dim=1) > 0
        around_sums = sums[0] + sums[2] + torch.where(overlap[:, None], 0.0, sums[1])
        sums = torch.cat((sums, around_sums[None]))
        means = sums[..., 1:] / sums[..., :1].clamp(min=_EPS)  # 4 x K x moments
        edge, inside, outside, around = means[0], means[1], means[2], means[3]

        # S1: variance of the Laplacian on W_edge, relative to the grey-level variance there
        var_lap = (edge[:, 3] - edge[:, 2] ** 2).clamp(min=0)
        var_edge = (edge[:, 1] - edge[:, 0] ** 2).clamp(min=0)
        sharp = var_lap / (var_edge + 1.0)
        s1 = torch.where(sums[0, :, 0] > 0, sharp / (sharp + cfg.sharpness_half), 0.0)

        # S2: contrast-to-noise ratio, inside vs the ring outside
        var_in = (inside[:, 1] - inside[:, 0] ** 2).clamp(min=0)
        var_out = (outside[:, 1] - outside[:, 0] ** 2).clamp(min=0)
        cnr = (inside[:, 0] - outside[:, 0]).abs() / torch.sqrt(0.5 * (var_in + var_out) + 1.0)
        s2 = cnr / (cnr + cfg.cnr_half)

        # S3: closing ratio x truncation by the image border
        rx, ry = mm_to_radius(cfg.edge_mm, (gsx, gsy))
        dilated = (w_edge + w_in) > 0  # = D(e)
        closed = (~max_filter(~dilated, rx, ry)) | masks
        closing = area_px / closed.flatten(1).sum(dim=1).to(torch.float32).clamp(min=1.0)
        rows_cut = mf[:, 0, :].sum(1) + mf[:, -1, :].sum(1)
        cols_cut = mf[:, :, 0].sum(1) + mf[:, :, -1].sum(1)
        cut_mm = rows_cut * gsx + cols_cut * gsy
        ratio = area_px * (gsx * gsy) / cut_mm.clamp(min=_EPS) ** 2
        trunc = torch.where(cut_mm > 0, ratio**2 / (ratio**2 + HALF_DISC_RATIO**2), 1.0)
        s3 = closing * trunc

        # previous observation of each row's track, moved by the probe motion when both poses are known
        has_prev = (mem.has_prev & ~born_ext)[slot]
        prev_mask = mem.mask[slot]
        prev_geometry = mem.geometry[slot]
        prev_centre = prev_geometry[:, 1:]
        if cur_pose is not None:
            use_pose = mem.has_pose[slot]  # K
            eye = torch.eye(4, dtype=torch.float32, device=dev)
            # prev image mm -> current image mm, and back
            fwd = torch.where(use_pose[:, None, None], cur_inv @ mem.pose[slot], eye)
            back = torch.where(use_pose[:, None, None], mem.pose_inv[slot] @ cur_pose, eye)
            warped = _warp(
                prev_mask.to(torch.float32), _in_plane(back), _grid_normaliser(h, w, stride, spacing)
            )
            prev_mask = warped > 0.5
            c = torch.cat((prev_centre, torch.ones(k, 1, device=dev)), dim=1)
            prev_centre = (_in_plane(fwd) @ c[:, :, None])[:, :2, 0]

        # S4: Dice with the previous mask
        inter = (masks & prev_mask).flatten(1).sum(dim=1).to(torch.float32)
        prev_area = prev_mask.flatten(1).sum(dim=1).to(torch.float32)
        dice = 2.0 * inter / (area_px + prev_area).clamp(min=1.0)
        s4 = torch.where(has_prev, dice, 1.0)

        # C1: the mask inside its box, its area frame to frame
        centres_x = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) * stride
        centres_y = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) * stride
        b = boxes.to(torch.float32)
        in_x = ((centres_x[None, :] >= b[:, 0:1]) & (centres_x[None, :] <= b[:, 2:3])).to(torch.float32)
        in_y = ((centres_y[None, :] >= b[:, 1:2]) & (centres_y[None, :] <= b[:, 3:4])).to(torch.float32)
        in_box = ((mf @ in_x[:, :, None])[:, :, 0] * in_y).sum(dim=1)  # K
        inside_fraction = in_box / area_px.clamp(min=1.0)
        area_mm = area_px * (gsx * gsy)
        prev_mm = prev_geometry[:, 0]
        size = torch.minimum(area_mm, prev_mm) / torch.maximum(area_mm, prev_mm).clamp(min=_EPS)
        c1 = inside_fraction * torch.where(has_prev, size, 1.0)

        # C2: NCC with the previous frame over the target and its surroundings (pooled grey levels on
        # both sides: the pooled squares would add the within-block speckle to one side only)
        if prev_grey is None:
            c2 = torch.ones(k, dtype=torch.float32, device=dev)
        else:
            mu_a, mu_b = around[:, 0], around[:, 4]
            var_a = (around[:, 7] - mu_a**2).clamp(min=0)
            var_b = (around[:, 5] - mu_b**2).clamp(min=0)
            ncc = (around[:, 6] - mu_a * mu_b) / torch.sqrt(var_a * var_b + _EPS)
            c2 = ncc.clamp(0.0, 1.0)

        # C3: displacement unexplained by the probe motion
        centre = centre_mm(boxes, spacing)
        d2 = ((centre - prev_centre) ** 2).sum(dim=1)
        gap = (mem.since[slot] + 1).to(torch.float32)
        c3 = torch.where(has_prev, torch.exp(-d2 / (2.0 * cfg.motion_sigma_mm**2 * gap)), 1.0)

        s = torch.stack((s1, s2, s3, s4), dim=1)
        c = torch.stack((c1, c2, c3), dim=1)
        scores = torch.cat((s, c, s.amin(dim=1, keepdim=True), _geometric_mean(c)[:, None]), dim=1)
        geometry = torch.cat((area_mm[:, None], centre), dim=1)
        return scores.to(torch.float32), masks, geometry, grey


def centre_mm(boxes: torch.Tensor, spacing: tuple[float, float]) -> torch.Tensor:
    """Kx2 box centres in image millimetres (x = column x sx, y = row x sy) of Kx4 XYXY pixel boxes."""
    sx, sy = float(spacing[0]), float(spacing[1])
    return torch.stack(
        ((boxes[:, 0] + boxes[:, 2]) * (0.5 * sx), (boxes[:, 1] + boxes[:, 3]) * (0.5 * sy)), dim=1
    ).to(torch.float32)
