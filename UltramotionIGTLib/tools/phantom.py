"""Synthetic B-mode ultrasound phantom stream with ground truth (numpy only, deterministic by seed).

What a frame shows (linear probe, rows = depth, columns = lateral position):

- fully developed speckle: a complex Gaussian scatterer field blurred by an anisotropic point-spread
  function, whose envelope is Rayleigh distributed; it is fixed to the tissue (it moves with the
  probe) and decorrelates slowly over time (two independent fields mixed by a rotating phase, which
  keeps the envelope exactly Rayleigh at every instant);
- tissue layers (skin, fat with septa, muscle with fibres, fascia) with bright interfaces and
  different echogenicity;
- depth attenuation (dB/cm, accumulated along each beam, i.e. down each column) and time-gain
  compensation (a per-sequence TGC curve), log compression to 8 bit with a fixed dynamic range,
  electronic noise;
- 1-3 pulsating anechoic vessels: dark elliptical lumen, bright walls (brightest where the wall is
  perpendicular to the beam), posterior acoustic enhancement (blood attenuates less than tissue);
- a hyperechoic needle inserted in plane at an angle (from the top or the side of the image), growing
  in length, with comet-tail reverberation below the shaft and an acoustic shadow;
- optionally (``PhantomConfig.bone_probability``, 0 by default) a bone surface: a bright curved
  specular reflector a few pixels thick with a dark posterior acoustic shadow below it; where the
  surface is steeper than ``bone_visible_angle_deg`` it reflects the beam away from the probe and
  fades out, so only the flatter part of it is seen (and is ground truth);
- slow probe motion: the whole scene (tissue, speckle, vessels, needle, bone) translates laterally (and a
  little axially), so objects may leave and re-enter the field of view.

Ground truth per frame (`PhantomFrame`): masks are exactly the rendered shapes (vessel = lumen
ellipse; needle = the rotated rectangle of the visible shaft; bone = the cortex band of the surface
where it is flatter than ``bone_visible_angle_deg``), boxes are the tight pixel-edge boxes
of those masks, labels index `UltramotionIGTLib.CLASS_NAMES`, target ids are stable per object.

Opt-in events (`PhantomEvents`, off by default: without them every frame is exactly what it was) put
the situations that make a target (in)visible into a sequence -- a vessel fading into an acoustic
shadow, the probe lifting off (echoes gone, a burst of noise), fast probe motion (blur), a sideways
sweep that takes targets out of the field of view and back -- and the ground truth says, per target
and frame, whether it is reliably visible (`PhantomFrame.visible`).

`PhantomStream.frame(i)` is a pure function of (config, seed, i): random access gives exactly what
iteration gives. Everything runs on the host in numpy (float32); a 256x256 frame takes a few
milliseconds on one core.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from UltramotionIGTLib import CLASS_NAMES
from UltramotionIGTLib.errors import UltramotionError

__all__ = [
    "BONE_ID",
    "BONE_LABEL",
    "EVENT_KINDS",
    "NEEDLE_ID_OFFSET",
    "NEEDLE_LABEL",
    "VESSEL_LABEL",
    "PhantomConfig",
    "PhantomConfigError",
    "PhantomDataset",
    "PhantomEvents",
    "PhantomFrame",
    "PhantomStream",
    "frames_to_arrays",
    "mask_to_box",
    "render_dataset",
    "sequence_seeds",
]

VESSEL_LABEL: int = CLASS_NAMES.index("vessel")
NEEDLE_LABEL: int = CLASS_NAMES.index("needle")
#: Target id of the needle of insertion episode ``e`` is ``NEEDLE_ID_OFFSET + e``; vessels are 0..n-1.
NEEDLE_ID_OFFSET: int = 1000
BONE_LABEL: int = CLASS_NAMES.index("bone")
#: Target id of a sequence's bone surface (a sequence has at most one).
BONE_ID: int = 2000

_LN10_OVER_20 = math.log(10.0) / 20.0
_NOISE_PAD = 64  # the noise tile is this much larger than a frame in each direction


class PhantomConfigError(UltramotionError, ValueError):
    """A `PhantomConfig` value is out of range. The message names the field and the allowed range."""


def _range(lo: float, hi: float) -> tuple[float, float]:
    return (float(lo), float(hi))


@dataclass
class PhantomConfig:
    """Parameters of the synthetic phantom. Lengths in mm, times in s, levels relative to tissue.

    Tuples ``(lo, hi)`` are ranges: each sequence (seed) draws its value uniformly inside them, so one
    config describes a family of phantoms (useful for training). Use ``(v, v)`` to fix a value.
    """

    height: int = 256
    width: int = 256
    spacing_mm: float = 0.2
    frame_rate_hz: float = 20.0

    # Tissue and imaging physics.
    n_layers: tuple[int, int] = (3, 5)
    speckle_strength: float = 1.0  # 0 = no speckle, 1 = fully developed (Rayleigh) speckle
    speckle_axial_mm: float = 0.15  # point-spread function sigma, axial
    speckle_lateral_mm: float = 0.35  # point-spread function sigma, lateral
    speckle_decorrelation_s: float = 8.0  # time for the speckle to decorrelate completely
    attenuation_db_per_cm: tuple[float, float] = _range(6.0, 8.0)  # round trip
    tgc_db_per_cm: tuple[float, float] = _range(4.5, 6.5)  # time-gain compensation slope
    tgc_jitter_db: float = 2.0  # per-sequence wiggle of the TGC curve (4 knots)
    gain_db: tuple[float, float] = _range(-2.0, 2.0)  # overall gain jitter per sequence
    dynamic_range_db: float = 50.0
    noise_level: float = 0.01  # electronic noise amplitude relative to unit tissue echo

    # Vessels (anechoic lumen, bright walls).
    n_vessels: tuple[int, int] = (1, 3)
    vessel_radius_mm: tuple[float, float] = _range(2.0, 4.5)
    vessel_aspect: tuple[float, float] = _range(0.7, 1.0)  # minor / major semi-axis
    vessel_depth_mm: tuple[float, float] = _range(12.0, 40.0)  # depth range of the centres
    pulsation_period_s: tuple[float, float] = _range(0.75, 1.1)
    pulsation_amplitude: tuple[float, float] = _range(0.06, 0.15)  # fraction of the radius
    lumen_echo: float = 0.02
    wall_echo: float = 4.0
    wall_thickness_mm: float = 0.5
    lumen_attenuation_ratio: float = 0.1  # blood / tissue attenuation (posterior enhancement)

    # Needle (hyperechoic shaft, reverberation, shadow).
    needle_probability: float = 0.85  # chance that an insertion episode has a needle
    needle_episode_s: float = 8.0  # insert, hold, withdraw, pause; then the next episode
    needle_angle_deg: tuple[float, float] = _range(20.0, 55.0)  # shaft angle below horizontal
    needle_speed_mm_s: tuple[float, float] = _range(5.0, 12.0)
    needle_diameter_mm: float = 0.8
    needle_echo: float = 10.0
    needle_shadow_db: float = 6.0  # attenuation across the shaft, seen as a shadow below it
    reverb_spacing_mm: float = 1.4
    reverb_count: int = 3
    reverb_decay: float = 0.2  # amplitude ratio between successive reverberation echoes

    # Bone surface (bright curved specular reflector, posterior acoustic shadow). A sequence has one
    # with probability bone_probability (0: never, and every other part of the phantom is unchanged).
    # The surface is y = apex depth + curvature x d^2 / (2 radius) + tan(tilt) x d over a lateral
    # half-width (d: lateral distance from the apex), with curvature +1 (a dome, convex towards the
    # probe) or -1 (a trough).
    bone_probability: float = 0.0
    bone_depth_mm: tuple[float, float] = _range(22.0, 40.0)  # depth of the apex
    bone_radius_mm: tuple[float, float] = _range(8.0, 30.0)  # radius of curvature
    bone_half_width_mm: tuple[float, float] = _range(8.0, 18.0)  # lateral half-extent of the surface
    bone_tilt_deg: tuple[float, float] = _range(-12.0, 12.0)
    bone_dome_probability: float = 0.75  # chance of a dome (else a trough)
    bone_thickness_mm: tuple[float, float] = _range(1.0, 1.6)  # bright cortex band, along the normal
    bone_echo: float = 14.0
    bone_shadow_db: float = 40.0  # attenuation across the cortex: the shadow below it
    bone_visible_angle_deg: float = 35.0  # steeper parts reflect away from the probe: not seen

    # Probe motion (scene translation, sinusoidal sweep).
    probe_speed_mm_s: float = 1.0  # peak lateral speed
    probe_range_mm: float = 3.0  # lateral amplitude; 0 = probe held still
    probe_axial_range_mm: float = 0.3  # axial amplitude (gentle pressure changes)

    # Ground truth.
    min_visible_px: int = 40  # objects with fewer visible mask pixels are left out of a frame

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `PhantomConfigError` naming the first field that is out of range."""

        def need(cond: bool, name: str, what: str) -> None:
            if not cond:
                raise PhantomConfigError(f"PhantomConfig.{name} = {getattr(self, name)!r} is invalid: {what}")

        need(16 <= int(self.height) <= 4096, "height", "use 16..4096 pixels")
        need(16 <= int(self.width) <= 4096, "width", "use 16..4096 pixels")
        need(self.spacing_mm > 0, "spacing_mm", "must be > 0 mm")
        need(self.frame_rate_hz > 0, "frame_rate_hz", "must be > 0 Hz")
        need(0.0 <= self.speckle_strength <= 1.0, "speckle_strength", "use 0..1")
        need(self.speckle_decorrelation_s > 0, "speckle_decorrelation_s", "must be > 0 s")
        need(self.dynamic_range_db > 0, "dynamic_range_db", "must be > 0 dB")
        need(0.0 <= self.needle_probability <= 1.0, "needle_probability", "use 0..1")
        need(self.needle_episode_s > 0, "needle_episode_s", "must be > 0 s")
        need(self.needle_diameter_mm > 0, "needle_diameter_mm", "must be > 0 mm")
        need(self.reverb_count >= 0, "reverb_count", "must be >= 0")
        need(self.probe_range_mm >= 0, "probe_range_mm", "must be >= 0 mm")
        need(self.probe_speed_mm_s >= 0, "probe_speed_mm_s", "must be >= 0 mm/s")
        need(self.min_visible_px >= 1, "min_visible_px", "must be >= 1")
        need(0.0 <= self.bone_probability <= 1.0, "bone_probability", "use 0..1")
        need(0.0 <= self.bone_dome_probability <= 1.0, "bone_dome_probability", "use 0..1")
        need(self.bone_shadow_db >= 0, "bone_shadow_db", "must be >= 0 dB")
        need(5.0 <= self.bone_visible_angle_deg <= 80.0, "bone_visible_angle_deg", "use 5..80 degrees")
        ranges = [
            "n_layers",
            "attenuation_db_per_cm",
            "tgc_db_per_cm",
            "gain_db",
            "n_vessels",
            "vessel_radius_mm",
            "vessel_aspect",
            "vessel_depth_mm",
            "pulsation_period_s",
            "pulsation_amplitude",
            "needle_angle_deg",
            "needle_speed_mm_s",
            "bone_depth_mm",
            "bone_radius_mm",
            "bone_half_width_mm",
            "bone_tilt_deg",
            "bone_thickness_mm",
        ]
        for name in ranges:
            value = getattr(self, name)
            need(
                isinstance(value, Sequence) and len(value) == 2 and value[0] <= value[1],
                name,
                "give a (low, high) pair with low <= high",
            )
        need(self.n_layers[0] >= 1, "n_layers", "at least 1 layer")
        need(self.n_vessels[0] >= 0, "n_vessels", "the lower bound must be >= 0")
        need(self.vessel_radius_mm[0] > 0, "vessel_radius_mm", "radii must be > 0 mm")
        need(0 < self.vessel_aspect[0] and self.vessel_aspect[1] <= 1, "vessel_aspect", "use (0, 1]")
        need(self.pulsation_period_s[0] > 0, "pulsation_period_s", "periods must be > 0 s")
        need(
            0 <= self.pulsation_amplitude[0] and self.pulsation_amplitude[1] < 0.5,
            "pulsation_amplitude",
            "use 0..0.5 (fraction of the radius)",
        )
        need(
            5.0 <= self.needle_angle_deg[0] and self.needle_angle_deg[1] <= 85.0,
            "needle_angle_deg",
            "use 5..85 degrees below horizontal",
        )
        need(self.needle_speed_mm_s[0] > 0, "needle_speed_mm_s", "speeds must be > 0 mm/s")
        need(self.bone_radius_mm[0] > 0, "bone_radius_mm", "radii must be > 0 mm")
        need(self.bone_half_width_mm[0] > 0, "bone_half_width_mm", "must be > 0 mm")
        need(-60.0 <= self.bone_tilt_deg[0] and self.bone_tilt_deg[1] <= 60.0, "bone_tilt_deg", "use -60..60")
        need(self.bone_thickness_mm[0] > 0, "bone_thickness_mm", "must be > 0 mm")

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the frames in pixels."""
        return (int(self.height), int(self.width))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of every field (tuples become lists), e.g. for model cards."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PhantomConfig:
        """Inverse of `to_dict`; unknown keys raise `PhantomConfigError`."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise PhantomConfigError(f"unknown PhantomConfig field(s): {', '.join(unknown)}")
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()}
        return cls(**kwargs)


#: The situations `PhantomEvents` can put into a sequence.
EVENT_KINDS: tuple[str, ...] = ("shadow", "contact", "blur", "sweep")


@dataclass
class PhantomEvents:
    """Opt-in situations that change what is visible, with ground truth. Times in s, lengths in mm.

    ``kinds``: which events happen (any of `EVENT_KINDS`); empty: none, and the phantom is exactly the
    one without events. Events follow one another, never overlapping: the first starts within
    ``start_s``, each is followed by a quiet ``gap_s``; the kinds come in a random order per round,
    each once per round. Ranges ``(lo, hi)`` are drawn per event.

    * ``shadow``: an attenuating structure above one vessel (its shadow spans the vessel's width plus
      ``shadow_margin_mm``); the extra attenuation ramps up to ``shadow_db`` in ``shadow_ramp_s``,
      holds ``shadow_s``, ramps down -- the vessel fades out and back in.
    * ``contact``: the probe loses contact for ``contact_s``: echoes drop by ``contact_loss_db`` and the
      electronic noise rises ``contact_noise_gain`` times (a burst of noise), abruptly.
    * ``blur``: fast probe motion for ``blur_s``: the scene moves sideways back and forth
      (``blur_amplitude_mm``) at ``blur_speed_mm_s``; echoes are smeared over the distance the probe
      travels in ``exposure_s`` (the time to acquire one frame's scan lines: 256 lines of a 5 cm deep
      image take about 17 ms).
    * ``sweep``: the probe slides ``sweep_mm`` sideways at ``sweep_speed_mm_s``, stays ``sweep_hold_s``,
      slides back: targets near the side leave the field of view and come back.

    Ground truth (`PhantomFrame.visible`): a target is visible unless less than ``visible_fraction`` of
    a vessel's lumen is inside the image, the shadow over it averages ``shadow_visible_db`` or more,
    the contact loss is ``contact_visible_db`` or more, or the motion blur is ``blur_visible_mm`` or
    longer. Probe motion is smeared into every frame once events are on (the usual slow sweep and the
    ``sweep`` event blur by well under ``blur_visible_mm``).
    """

    kinds: tuple[str, ...] = ()
    start_s: tuple[float, float] = (0.5, 1.0)
    gap_s: tuple[float, float] = (1.0, 1.5)
    shadow_s: tuple[float, float] = (0.6, 1.0)
    shadow_ramp_s: float = 0.3
    shadow_db: tuple[float, float] = (35.0, 45.0)
    shadow_margin_mm: float = 4.0
    contact_s: tuple[float, float] = (0.5, 1.0)
    contact_loss_db: float = 40.0
    contact_noise_gain: float = 15.0
    blur_s: tuple[float, float] = (0.5, 0.8)
    blur_speed_mm_s: tuple[float, float] = (50.0, 80.0)
    blur_amplitude_mm: float = 1.5
    exposure_s: float = 0.02
    sweep_mm: tuple[float, float] = (8.0, 12.0)
    sweep_speed_mm_s: float = 10.0
    sweep_hold_s: tuple[float, float] = (0.5, 1.0)
    visible_fraction: float = 0.5
    shadow_visible_db: float = 12.0
    contact_visible_db: float = 12.0
    blur_visible_mm: float = 0.5

    def __post_init__(self) -> None:
        self.kinds = tuple(self.kinds)
        self.validate()

    @classmethod
    def all(cls, **overrides: Any) -> PhantomEvents:
        """Every kind of event (`EVENT_KINDS`), other fields at their defaults unless given."""
        return cls(kinds=EVENT_KINDS, **overrides)

    def validate(self) -> None:
        """Raise `PhantomConfigError` naming the first field that is out of range."""

        def need(cond: bool, name: str, what: str) -> None:
            if not cond:
                raise PhantomConfigError(f"PhantomEvents.{name} = {getattr(self, name)!r} is invalid: {what}")

        unknown = [k for k in self.kinds if k not in EVENT_KINDS]
        need(not unknown, "kinds", f"use any of {', '.join(EVENT_KINDS)}")
        for name in (
            "start_s",
            "gap_s",
            "shadow_s",
            "shadow_db",
            "contact_s",
            "blur_s",
            "blur_speed_mm_s",
            "sweep_mm",
            "sweep_hold_s",
        ):
            value = getattr(self, name)
            need(
                isinstance(value, Sequence) and len(value) == 2 and 0 <= value[0] <= value[1],
                name,
                "give a (low, high) pair with 0 <= low <= high",
            )
        need(self.gap_s[0] > 0, "gap_s", "events need a quiet gap > 0 s between them")
        for name in ("shadow_s", "contact_s", "blur_s", "blur_speed_mm_s", "sweep_mm"):
            need(getattr(self, name)[0] > 0, name, "must be > 0")
        for name in ("shadow_ramp_s", "blur_amplitude_mm", "sweep_speed_mm_s", "contact_noise_gain"):
            need(getattr(self, name) > 0, name, "must be > 0")
        need(self.exposure_s > 0, "exposure_s", "must be > 0 s")
        need(0.0 < self.visible_fraction <= 1.0, "visible_fraction", "use (0, 1]")
        for name in ("shadow_margin_mm", "contact_loss_db", "shadow_visible_db", "contact_visible_db"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(self.blur_visible_mm > 0, "blur_visible_mm", "must be > 0 mm")

    @property
    def enabled(self) -> bool:
        return bool(self.kinds)


@dataclass
class _Event:
    kind: str
    t0: float  # s: starts
    t1: float  # s: over
    params: dict[str, float]


@dataclass
class PhantomFrame:
    """One rendered frame with its ground truth (host numpy arrays).

    - ``image``: HxW uint8 B-mode image (row 0 = skin line, rows go deeper).
    - ``boxes``: Mx4 float32 XYXY in pixel-edge coordinates: ``[min_col, min_row, max_col + 1,
      max_row + 1]`` of the mask, so a full-frame box is ``[0, 0, W, H]`` (the D-FINE /
      normalised-cxcywh convention; torchvision's ``masks_to_boxes`` gives the inclusive form,
      1 less on x1 and y1).
    - ``labels``: M int64, indices into `UltramotionIGTLib.CLASS_NAMES` (0 = vessel, 1 = needle,
      2 = bone).
    - ``masks``: MxHxW bool, exactly the rendered lumen / visible needle shaft / visible bone cortex.
    - ``target_ids``: M int64, stable per object over the sequence (vessels 0..n-1, the needle of
      insertion episode e is ``NEEDLE_ID_OFFSET + e``, the bone surface is ``BONE_ID``).
    - ``index``: frame index in the stream; ``timestamp``: seconds (``index / frame_rate_hz``).
    - ``info``: extra state for tests and debugging (probe offset, needle insertion depth, vessel
      radii, ``bone``: the bone surface's geometry in image pixels at this frame or ``present`` False, ``image_to_world``: the 4x4 transform from image mm (x = column x spacing, y = row x
      spacing) to the phantom's world mm, i.e. the probe pose; ``events``: the events in progress);
      not needed for training.
    - ``visible``: M bool, ground truth "reliably visible" per target (all True without
      `PhantomEvents`); with events, targets hidden by one stay in the arrays with False.
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    target_ids: np.ndarray
    index: int
    timestamp: float
    info: dict[str, Any] = field(default_factory=dict)
    visible: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.visible is None:
            self.visible = np.ones(len(self.target_ids), dtype=bool)

    def labelmap(self) -> np.ndarray:
        """HxW uint8 class map: 0 = background, ``1 + label`` inside each mask (later masks win,
        so the needle is drawn over a vessel it touches)."""
        out = np.zeros(self.image.shape, dtype=np.uint8)
        for mask, label in zip(self.masks, self.labels, strict=True):
            out[mask] = 1 + int(label)
        return out


@dataclass
class _Vessel:
    target_id: int
    cx: float  # world pixels (column)
    cy: float  # world pixels (row)
    a: float  # semi-axis along the rotated x axis, pixels
    b: float  # semi-axis along the rotated y axis, pixels
    angle: float  # radians
    period: float  # s
    amplitude: float  # fraction of the radius
    phase: float  # radians


@dataclass
class _Bone:
    """A bone surface in world pixels: ``y(x) = apex_y + curvature * d**2 / (2 radius) + tan_tilt * d``
    for ``d = x - apex_x`` in ``[-half_width, half_width]``; the cortex is ``thickness`` px along the
    normal below that line."""

    apex_x: float
    apex_y: float
    radius: float
    curvature: float  # +1 dome, -1 trough
    tan_tilt: float
    half_width: float
    thickness: float

    def depth(self, x: np.ndarray) -> np.ndarray:
        d = x - self.apex_x
        return self.apex_y + self.curvature * d * d / (2.0 * self.radius) + self.tan_tilt * d

    def slope(self, x: np.ndarray) -> np.ndarray:
        return self.curvature * (x - self.apex_x) / self.radius + self.tan_tilt


@dataclass
class _NeedleEpisode:
    episode: int
    start: tuple[float, float]  # (x, y) world pixels of the skin entry point
    direction: tuple[float, float]  # unit vector (dx, dy), dy > 0
    s_enter: float  # shaft length (pixels) at which the tip enters the initial field of view
    s_stop: float  # final shaft length (pixels)
    t_begin: float  # s: tip at s_enter
    t_full: float  # s: tip at s_stop
    t_retract: float  # s: withdrawal starts
    t_end: float  # s: tip back at s_enter
    angle_deg: float


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """Tight pixel-edge XYXY box ``[x0, y0, x1, y1]`` (float32, shape 4) of an HxW bool mask.

    ``x1 = last column + 1``; an empty mask gives ``[0, 0, 0, 0]``.
    """
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    if cols.size == 0:
        return np.zeros(4, dtype=np.float32)
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    # Always draw, so that changing one range (even to a fixed value) leaves the other draws alone.
    lo, hi = bounds
    return float(lo) + (float(hi) - float(lo)) * float(rng.random())


def _fast_len(n: int) -> int:
    """Smallest m >= n whose only prime factors are 2, 3 and 5 (fast FFT sizes)."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def _filtered_noise(
    rng: np.random.Generator,
    shape: tuple[int, int],
    sigma_along: float,
    sigma_across: float,
    angle: float = 0.0,
    complex_valued: bool = False,
) -> np.ndarray:
    """White Gaussian noise of ``shape`` blurred by an oriented Gaussian PSF (FFT, periodic).

    ``angle`` is the direction of ``sigma_along`` (radians from the column axis). The noise is drawn
    at an FFT-friendly size and cropped, which keeps construction fast for any frame size.
    """
    h, w = _fast_len(shape[0]), _fast_len(shape[1])
    fy = np.fft.fftfreq(h)[:, None]
    c, s = math.cos(angle), math.sin(angle)
    if complex_valued:
        fx = np.fft.fftfreq(w)[None, :]
        noise = rng.standard_normal((h, w)) + 1j * rng.standard_normal((h, w))
    else:
        fx = np.fft.rfftfreq(w)[None, :]
        noise = rng.standard_normal((h, w))
    f_along = fx * c + fy * s
    f_across = -fx * s + fy * c
    transfer = np.exp(-2.0 * np.pi**2 * ((f_along * sigma_along) ** 2 + (f_across * sigma_across) ** 2))
    if complex_valued:
        out = np.fft.ifft2(np.fft.fft2(noise) * transfer)
    else:
        out = np.fft.irfft2(np.fft.rfft2(noise) * transfer, s=(h, w))
    return out[: shape[0], : shape[1]]


def _oriented_texture(
    rng: np.random.Generator, shape: tuple[int, int], along: float, across: float, angle: float
) -> np.ndarray:
    """Zero-mean unit-std real texture elongated along direction ``angle`` (fibres, septa)."""
    field_ = _filtered_noise(rng, shape, along, across, angle)
    field_ -= field_.mean()
    return field_ / (field_.std() + 1e-12)


class PhantomStream:
    """Deterministic stream of `PhantomFrame`s: ``stream[i] == stream.frame(i)`` for any ``i >= 0``.

    ``PhantomStream(config, seed, n_frames)`` draws the sequence's anatomy (layers, speckle, vessels,
    TGC) from ``seed`` once; each frame is then a pure function of (seed, index). ``len(stream)`` is
    ``n_frames`` (iteration stops there) but `frame` accepts any non-negative index.
    """

    def __init__(
        self,
        config: PhantomConfig | None = None,
        seed: int = 0,
        n_frames: int = 200,
        events: PhantomEvents | None = None,
    ) -> None:
        self.config = config if config is not None else PhantomConfig()
        self.config.validate()
        #: opt-in events (None or no kinds: the phantom is exactly the one without them)
        self.events = events if events is not None and events.enabled else None
        if self.events is not None:
            self.events.validate()
        self._event_list: list[_Event] = []
        self._event_rng = np.random.default_rng([int(seed) if int(seed) >= 0 else 0, 0xE7E27])
        self._event_round: list[str] = []
        if n_frames < 0:
            raise PhantomConfigError(f"n_frames = {n_frames} is invalid: must be >= 0")
        if int(seed) < 0:
            raise PhantomConfigError(f"seed = {seed} is invalid: use a non-negative integer")
        self.seed = int(seed)
        self.n_frames = int(n_frames)
        cfg = self.config
        h, w = cfg.shape
        px = 1.0 / cfg.spacing_mm  # pixels per mm
        self._px = px
        rng = np.random.default_rng([self.seed, 0x5EED])

        # Probe motion: scene offset (pixels) = amplitude * sin(omega t + phase).
        self._amp_x = cfg.probe_range_mm * px
        self._amp_y = cfg.probe_axial_range_mm * px
        self._omega_x = cfg.probe_speed_mm_s / cfg.probe_range_mm if cfg.probe_range_mm > 0 else 0.0
        self._omega_y = 0.37 * self._omega_x
        self._phase_x = float(rng.uniform(0, 2 * np.pi))
        self._phase_y = float(rng.uniform(0, 2 * np.pi))
        # World maps cover every offset the probe can reach, plus one pixel for interpolation.
        self._margin_x = int(math.ceil(self._amp_x)) + 2
        self._margin_y = int(math.ceil(self._amp_y)) + 2
        if self.events is not None:  # room for the events' extra probe travel
            ev = self.events
            extra_mm = max(
                ev.sweep_mm[1] if "sweep" in ev.kinds else 0.0,
                ev.blur_amplitude_mm if "blur" in ev.kinds else 0.0,
            )
            self._margin_x += int(math.ceil(extra_mm * px))
        hw, ww = h + 2 * self._margin_y + 1, w + 2 * self._margin_x + 1

        self._echo_world = self._build_tissue(rng, (hw, ww)).astype(np.float32)
        sig_r = max(cfg.speckle_axial_mm * px, 0.3)
        sig_c = max(cfg.speckle_lateral_mm * px, 0.3)
        fields = []
        for _ in range(2):
            blurred = _filtered_noise(rng, (hw, ww), sig_c, sig_r, complex_valued=True)
            blurred /= np.sqrt(np.mean(np.abs(blurred) ** 2))  # E|c|^2 = 1
            fields.append(blurred.astype(np.complex64))
        self._speckle_a, self._speckle_b = fields

        # Depth-dependent gain in dB: TGC curve (linear slope + jittered knots) minus attenuation.
        depth_cm = (np.arange(h, dtype=np.float64) + 0.5) * cfg.spacing_mm / 10.0
        self._alpha_db_per_px = _uniform(rng, cfg.attenuation_db_per_cm) * cfg.spacing_mm / 10.0
        tgc_slope = _uniform(rng, cfg.tgc_db_per_cm)
        knots = rng.uniform(-cfg.tgc_jitter_db, cfg.tgc_jitter_db, size=4)
        tgc = tgc_slope * depth_cm + np.interp(np.linspace(0, 3, h), np.arange(4), knots)
        gain = _uniform(rng, cfg.gain_db)
        self._depth_gain_db = (tgc - self._alpha_db_per_px * np.arange(h) + gain).astype(np.float32)
        # Map dB to 8 bit: unit tissue echo at zero depth sits at ~70 % of the display range.
        self._db_ref = 0.3 * cfg.dynamic_range_db
        self._db_scale = 255.0 / cfg.dynamic_range_db

        self._vessels = self._place_vessels(rng)
        # The bone has its own random stream, so a config without bone draws everything else as before.
        self._bone = self._place_bone(np.random.default_rng([self.seed, 0xB0E]))
        self._noise_tile = rng.standard_normal((2, h + _NOISE_PAD, w + _NOISE_PAD), dtype=np.float32)
        self._noise_tile *= np.float32(cfg.noise_level)
        self._needle_cache: dict[int, _NeedleEpisode | None] = {}

    # ------------------------------------------------------------------ anatomy (once per seed)

    def _build_tissue(self, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
        """World echogenicity map: layers with wavy boundaries, bright interfaces, textures."""
        cfg = self.config
        px = self._px
        hw, ww = shape
        yy = np.arange(hw, dtype=np.float64)[:, None] - self._margin_y  # image rows at zero offset
        xx = np.arange(ww, dtype=np.float64)[None, :]
        n_layers = int(rng.integers(cfg.n_layers[0], cfg.n_layers[1] + 1))
        depth_px = cfg.height
        echo = np.zeros(shape, dtype=np.float64)

        # Skin: thin bright band at the top plus ringdown.
        skin = 1.5 * px * rng.uniform(0.8, 1.3)
        # Boundaries between the deeper layers, sorted, spread over the depth.
        if n_layers > 1:
            cuts = np.sort(rng.uniform(0.12, 0.95, size=n_layers - 1)) * depth_px
            cuts = np.maximum(cuts, skin + 2 * px)
        else:
            cuts = np.zeros(0)
        boundaries = []
        for cut in cuts:
            amp = rng.uniform(0.5, 3.0) * px
            wavelength = rng.uniform(0.8, 3.0) * ww
            phase = rng.uniform(0, 2 * np.pi)
            tilt = rng.uniform(-0.08, 0.08)
            boundaries.append(cut + amp * np.sin(2 * np.pi * xx / wavelength + phase) + tilt * (xx - ww / 2))
        layer_index = np.zeros(shape, dtype=np.int64)
        for bnd in boundaries:
            layer_index += yy > bnd
        # Echogenicity per layer: alternate darker (fat-like) and brighter (muscle-like) layers.
        kinds = []
        levels = []
        first_fat = rng.random() < 0.7
        for k in range(n_layers):
            fat = (k % 2 == 0) == first_fat
            kinds.append("fat" if fat else "muscle")
            levels.append(rng.uniform(0.25, 0.45) if fat else rng.uniform(0.55, 0.95))
        echo += np.asarray(levels)[layer_index]
        small = (hw, ww)
        for k, kind in enumerate(kinds):
            in_layer = layer_index == k
            if kind == "muscle":
                fibres = _oriented_texture(
                    rng, small, along=6.0 * px, across=0.25 * px, angle=rng.uniform(-0.3, 0.3)
                )
                echo += in_layer * levels[k] * 0.35 * np.clip(fibres, -1.5, 3.0)
            else:
                septa = _oriented_texture(
                    rng, small, along=3.0 * px, across=0.3 * px, angle=rng.uniform(-0.6, 0.6)
                )
                echo += in_layer * levels[k] * 1.2 * np.clip(septa - 1.2, 0.0, None)
        # Interfaces (fascia): bright, a bit thicker than the PSF.
        for bnd in boundaries:
            width = rng.uniform(0.25, 0.5) * px
            echo += rng.uniform(1.0, 2.2) * np.exp(-(((yy - bnd) / width) ** 2))
        # Skin line and near-field ringdown (fixed to the probe, but drawn in the world map: the
        # axial probe motion is small).
        echo = np.where(yy < skin, 1.3 + 0.3 * np.sin(yy * 1.7) ** 2, echo)
        echo += 1.2 * np.exp(-(((yy - skin) / (0.3 * px)) ** 2))
        # Mild lateral inhomogeneity so no two columns look alike.
        echo *= 1.0 + 0.15 * _oriented_texture(rng, small, along=8.0 * px, across=4.0 * px, angle=0.0)
        return np.clip(echo, 0.02, None)

    def _place_vessels(self, rng: np.random.Generator) -> list[_Vessel]:
        cfg = self.config
        px = self._px
        h, w = cfg.shape
        n = int(rng.integers(cfg.n_vessels[0], cfg.n_vessels[1] + 1))
        vessels: list[_Vessel] = []
        for k in range(n):
            for _attempt in range(50):
                r = _uniform(rng, cfg.vessel_radius_mm) * px
                aspect = _uniform(rng, cfg.vessel_aspect)
                a, b = r, r * aspect
                cy = _uniform(rng, cfg.vessel_depth_mm) * px
                cy = float(np.clip(cy, r + 3 * px, h - r - 2 * px)) if h > 2 * r + 5 * px else h / 2
                # The first vessel starts well inside the view; later ones may sit at the edges.
                lo = r + 1.0 * px if k == 0 else 0.0
                cx = float(rng.uniform(lo, w - lo))
                ok = all(
                    math.hypot(cx - v.cx, cy - v.cy) > (max(a, b) + max(v.a, v.b)) * 1.25 + 2.0 * px
                    for v in vessels
                )
                if ok:
                    vessels.append(
                        _Vessel(
                            target_id=k,
                            cx=cx,
                            cy=cy,
                            a=a,
                            b=b,
                            angle=float(rng.uniform(-0.3, 0.3)),
                            period=_uniform(rng, cfg.pulsation_period_s),
                            amplitude=_uniform(rng, cfg.pulsation_amplitude),
                            phase=float(rng.uniform(0, 2 * np.pi)),
                        )
                    )
                    break
        return vessels

    def _place_bone(self, rng: np.random.Generator) -> _Bone | None:
        """The sequence's bone surface (None: none). Vessels whose columns it spans must lie above it
        (a vessel in its shadow would be ground truth that cannot be seen); tried 50 times."""
        cfg = self.config
        if cfg.bone_probability <= 0.0 or rng.random() >= cfg.bone_probability:
            return None
        px = self._px
        h, w = cfg.shape
        for _attempt in range(50):
            bone = _Bone(
                apex_x=float(rng.uniform(0.2 * w, 0.8 * w)),
                apex_y=_uniform(rng, cfg.bone_depth_mm) * px,
                radius=_uniform(rng, cfg.bone_radius_mm) * px,
                curvature=1.0 if rng.random() < cfg.bone_dome_probability else -1.0,
                tan_tilt=math.tan(math.radians(_uniform(rng, cfg.bone_tilt_deg))),
                half_width=_uniform(rng, cfg.bone_half_width_mm) * px,
                thickness=_uniform(rng, cfg.bone_thickness_mm) * px,
            )
            if not 3 * px < bone.apex_y < h - bone.thickness - 2:
                continue
            clear = True
            for v in self._vessels:
                reach = max(v.a, v.b) * (1 + v.amplitude) + cfg.wall_thickness_mm * px + 1.5 * px
                lo, hi = (
                    max(v.cx - reach, bone.apex_x - bone.half_width),
                    min(v.cx + reach, bone.apex_x + bone.half_width),
                )
                if lo > hi:
                    continue
                surface = bone.depth(np.linspace(lo, hi, 32))
                if float(surface.min()) < v.cy + reach:
                    clear = False
                    break
            if clear:
                return bone
        return None

    def _needle_episode(self, episode: int) -> _NeedleEpisode | None:
        """Needle geometry and timing of insertion episode ``episode`` (None: no needle)."""
        if episode in self._needle_cache:
            return self._needle_cache[episode]
        cfg = self.config
        px = self._px
        h, w = cfg.shape
        rng = np.random.default_rng([self.seed, 0x4EED, episode])
        result: _NeedleEpisode | None = None
        if rng.random() < cfg.needle_probability:
            t0 = episode * cfg.needle_episode_s
            result = None
            for _attempt in range(30):
                angle = math.radians(_uniform(rng, cfg.needle_angle_deg))
                inside = [v for v in self._vessels if 0.1 * w < v.cx < 0.9 * w]
                target = inside[int(rng.integers(len(inside)))] if inside and rng.random() < 0.8 else None
                # Come from the side with more room, mostly, so that a long shaft is visible.
                far_right = target is not None and target.cx > 0.5 * w
                from_left = bool(rng.random() < (0.85 if far_right else 0.15 if target is not None else 0.5))
                dx = math.cos(angle) if from_left else -math.cos(angle)
                dy = math.sin(angle)
                if target is not None:
                    reach = max(target.a, target.b) * (1 + target.amplitude) + cfg.wall_thickness_mm * px
                    reach += rng.uniform(1.0, 3.0) * px
                    tx, ty = target.cx - dx * reach, target.cy - dy * reach
                else:
                    tx = rng.uniform(0.25 * w, 0.75 * w)
                    ty = rng.uniform(0.3 * h, 0.7 * h)
                if not (0.05 * w < tx < 0.95 * w and 3 * px < ty < 0.95 * h):
                    continue
                s_stop = ty / dy  # skin entry point is at row 0 on the line through the tip
                sx, sy = tx - dx * s_stop, 0.0
                # Shaft length at which the tip enters the (zero-offset) field of view.
                if 0.0 <= sx < w:
                    s_enter = 0.0
                else:
                    edge = 0.0 if sx < 0 else float(w)
                    s_enter = (edge - sx) / dx
                if s_stop - s_enter < min(12 * px, 0.4 * min(h, w)):
                    continue
                # Keep the path clear of the other vessels (the needle must not cross a lumen).
                clear = True
                for v in self._vessels:
                    rel_x, rel_y = v.cx - sx, v.cy - sy
                    s = float(np.clip(rel_x * dx + rel_y * dy, 0.0, s_stop))
                    dist = math.hypot(rel_x - s * dx, rel_y - s * dy)
                    if dist < max(v.a, v.b) * (1 + v.amplitude) + cfg.wall_thickness_mm * px + 0.5 * px:
                        clear = False
                        break
                if clear and self._bone is not None:
                    # The tip stays 1.5 mm above the bone surface (the shaft in its shadow could not be seen).
                    bone = self._bone
                    s = np.arange(0.0, s_stop + 1.0, 1.0)
                    x = sx + s * dx
                    y = sy + s * dy
                    over = np.abs(x - bone.apex_x) <= bone.half_width + 1.5 * px
                    clear = not bool(np.any(y[over] > bone.depth(x[over]) - 1.5 * px))
                if not clear:
                    continue
                speed = _uniform(rng, cfg.needle_speed_mm_s) * px
                period = cfg.needle_episode_s
                t_begin = t0 + rng.uniform(0.03, 0.12) * period
                # Insertion takes at most half of the episode; withdrawal is three times faster.
                speed = max(speed, (s_stop - s_enter) / (0.5 * period))
                t_full = t_begin + (s_stop - s_enter) / speed
                t_end = t0 + rng.uniform(0.88, 0.97) * period
                t_retract = max(t_full, t_end - (s_stop - s_enter) / (3 * speed))
                result = _NeedleEpisode(
                    episode=episode,
                    start=(sx, sy),
                    direction=(dx, dy),
                    s_enter=s_enter,
                    s_stop=s_stop,
                    t_begin=t_begin,
                    t_full=t_full,
                    t_retract=t_retract,
                    t_end=t_end,
                    angle_deg=math.degrees(angle),
                )
                break
        if len(self._needle_cache) > 64:
            self._needle_cache.clear()
        self._needle_cache[episode] = result
        return result

    @staticmethod
    def _needle_length(ep: _NeedleEpisode, t: float) -> float:
        """Inserted shaft length in pixels at time t (<= s_enter: not in view)."""
        if t <= ep.t_begin or t >= ep.t_end:
            return 0.0
        if t < ep.t_full:
            return ep.s_enter + (ep.s_stop - ep.s_enter) * (t - ep.t_begin) / (ep.t_full - ep.t_begin)
        if t < ep.t_retract:
            return ep.s_stop
        frac = (t - ep.t_retract) / max(ep.t_end - ep.t_retract, 1e-9)
        return ep.s_stop - (ep.s_stop - ep.s_enter) * frac

    # ------------------------------------------------------------------ sequence protocol

    def __len__(self) -> int:
        return self.n_frames

    def __iter__(self) -> Iterator[PhantomFrame]:
        for i in range(self.n_frames):
            yield self.frame(i)

    def __getitem__(self, index: int | slice) -> PhantomFrame | list[PhantomFrame]:
        if isinstance(index, slice):
            return [self.frame(i) for i in range(*index.indices(self.n_frames))]
        i = int(index)
        if i < 0:
            i += self.n_frames
        if not 0 <= i < self.n_frames:
            raise IndexError(f"frame index {index} out of range for a stream of {self.n_frames} frames")
        return self.frame(i)

    @property
    def spacing(self) -> tuple[float, float]:
        """(row, column) pixel spacing in mm."""
        return (self.config.spacing_mm, self.config.spacing_mm)

    @property
    def n_vessels(self) -> int:
        """Number of vessels in this sequence's anatomy (visible or not)."""
        return len(self._vessels)

    def timestamp(self, index: int) -> float:
        """Acquisition time of frame ``index`` in seconds."""
        return index / self.config.frame_rate_hz

    def probe_offset(self, t: float) -> tuple[float, float]:
        """Scene offset (x, y) in pixels at time t: image pixel (r, c) shows world (r + y, c + x)."""
        ox = self._amp_x * math.sin(self._omega_x * t + self._phase_x)
        oy = self._amp_y * math.sin(self._omega_y * t + self._phase_y)
        if self.events is not None:
            ox += self._event_offset(t)
        return ox, oy

    def image_to_world(self, t: float) -> np.ndarray:
        """4x4 float64 transform from image mm (x = column x spacing, y = row x spacing) to world mm at
        time t: the probe pose (a translation: the phantom's probe slides without rotating)."""
        ox, oy = self.probe_offset(t)
        matrix = np.eye(4)
        matrix[0, 3], matrix[1, 3] = ox * self.config.spacing_mm, oy * self.config.spacing_mm
        return matrix

    # ------------------------------------------------------------------ events

    def events_until(self, t: float) -> list[_Event]:
        """The scheduled events that start before time t (drawn once, in order, from the seed)."""
        ev = self.events
        if ev is None:
            return []
        rng = self._event_rng
        # events never overlap, so once one starts at or after t every earlier one is known
        while not self._event_list or self._event_list[-1].t0 < t:
            last = self._event_list[-1] if self._event_list else None
            start = _uniform(rng, ev.start_s) if last is None else last.t1 + _uniform(rng, ev.gap_s)
            if not self._event_round:
                self._event_round = [ev.kinds[i] for i in rng.permutation(len(ev.kinds))]
            self._event_list.append(self._draw_event(self._event_round.pop(0), start))
        return [e for e in self._event_list if e.t0 < t]

    def _draw_event(self, kind: str, t0: float) -> _Event:
        """Parameters and duration of one event of ``kind`` starting at t0 (always the same draws)."""
        ev, rng, px = self.events, self._event_rng, self._px
        vessel = int(rng.integers(0, 1 << 30))
        side = 1.0 if rng.random() < 0.5 else -1.0
        if kind == "shadow":
            hold, peak = _uniform(rng, ev.shadow_s), _uniform(rng, ev.shadow_db)
            params = {"hold": hold, "peak_db": peak, "vessel": float(vessel)}
            return _Event(kind, t0, t0 + 2 * ev.shadow_ramp_s + hold, params)
        if kind == "contact":
            return _Event(kind, t0, t0 + _uniform(rng, ev.contact_s), {})
        if kind == "blur":
            speed = _uniform(rng, ev.blur_speed_mm_s) * px
            period = 4.0 * ev.blur_amplitude_mm * px / speed
            cycles = max(1, round(_uniform(rng, ev.blur_s) / period))
            return _Event(kind, t0, t0 + cycles * period, {"speed": speed * side, "period": period})
        distance, hold = _uniform(rng, ev.sweep_mm) * px, _uniform(rng, ev.sweep_hold_s)
        travel = distance / (ev.sweep_speed_mm_s * px)
        return _Event(kind, t0, t0 + 2 * travel + hold, {"distance": distance * side, "travel": travel})

    def _event_offset(self, t: float) -> float:
        """Extra lateral scene offset (pixels) from sweep and blur events at time t."""
        for e in self.events_until(t):
            if not e.t0 <= t < e.t1:
                continue
            u = t - e.t0
            if e.kind == "sweep":
                travel, distance = e.params["travel"], e.params["distance"]
                frac = min(u, travel, max(e.t1 - e.t0 - u, 0.0)) / travel
                return distance * min(frac, 1.0)
            if e.kind == "blur":
                period, speed = e.params["period"], e.params["speed"]
                phase = (u / period) % 1.0  # triangle wave: 0 -> +A -> 0 -> -A -> 0
                tri = 4 * phase if phase < 0.25 else 2 - 4 * phase if phase < 0.75 else 4 * phase - 4
                return abs(speed) * period / 4.0 * tri * (1.0 if speed > 0 else -1.0)
        return 0.0

    def _event_state(self, t: float) -> dict[str, Any]:
        """What the events do at time t: shadow (event, dB), contact loss dB, blur length px."""
        out: dict[str, Any] = {"shadow": None, "contact_db": 0.0, "blur_px": 0.0, "active": []}
        ev = self.events
        for e in self.events_until(t):
            if not e.t0 <= t < e.t1:
                continue
            out["active"].append(e.kind)
            u = t - e.t0
            if e.kind == "shadow":
                ramp = ev.shadow_ramp_s
                level = min(u / ramp, 1.0, max(e.t1 - t, 0.0) / ramp)
                level = level * level * (3 - 2 * level)  # smoothstep: the fade starts and ends gently
                out["shadow"] = (e, e.params["peak_db"] * level)
            elif e.kind == "contact":
                out["contact_db"] = ev.contact_loss_db
        # motion blur from the probe's lateral speed (central difference of the offset)
        exposure = ev.exposure_s
        dt = 1e-3
        speed = abs(self.probe_offset(t + dt)[0] - self.probe_offset(max(t - dt, 0.0))[0]) / (
            t + dt - max(t - dt, 0.0)
        )
        out["blur_px"] = speed * exposure
        return out

    # ------------------------------------------------------------------ rendering

    def frame(self, index: int) -> PhantomFrame:
        """Render frame ``index`` (any ``index >= 0``); same result however it is reached."""
        if index < 0:
            raise IndexError(f"frame index {index} must be >= 0")
        cfg = self.config
        h, w = cfg.shape
        px = self._px
        t = self.timestamp(index)
        ox, oy = self.probe_offset(t)

        # Sample the world maps at the probe offset (bilinear).
        wy, wx = oy + self._margin_y, ox + self._margin_x
        iy, ix = int(math.floor(wy)), int(math.floor(wx))
        fy, fx = np.float32(wy - iy), np.float32(wx - ix)
        echo = _bilinear(self._echo_world, iy, ix, fy, fx, h, w)
        theta = 0.5 * np.pi * t / cfg.speckle_decorrelation_s
        ca, cb = np.float32(math.cos(theta)), np.float32(math.sin(theta))
        win = (slice(iy, iy + h + 1), slice(ix, ix + w + 1))
        envelope = np.abs(ca * self._speckle_a[win] + cb * self._speckle_b[win])
        speckle = _bilinear(envelope, 0, 0, fy, fx, h, w)
        if cfg.speckle_strength < 1.0:
            speckle = (
                np.float32(1.0 - cfg.speckle_strength) * np.float32(math.sqrt(math.pi) / 2)
                + np.float32(cfg.speckle_strength) * speckle
            )
        # Extra attenuation (dB, relative to tissue) accumulated down each column, per object.
        extra_cum = np.zeros((h, w), dtype=np.float32)

        masks: list[np.ndarray] = []
        labels: list[int] = []
        ids: list[int] = []
        radii: dict[int, float] = {}
        full_area: dict[int, float] = {}  # a vessel's whole lumen (pixels), in view or not

        for v in self._vessels:
            scale = (
                1.0
                + v.amplitude
                * (
                    math.sin(2 * np.pi * t / v.period + v.phase)
                    + 0.25 * math.sin(4 * np.pi * t / v.period + 2 * v.phase)
                )
                / 1.25
            )
            a, b = v.a * scale, v.b * scale
            radii[v.target_id] = a * cfg.spacing_mm
            full_area[v.target_id] = math.pi * a * b
            cx, cy = v.cx - ox, v.cy - oy
            wall = max(cfg.wall_thickness_mm * px, 1.0)
            reach = max(a, b) + 3 * wall + 2
            r0, r1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, h)
            c0, c1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, w)
            if r0 >= r1 or c0 >= c1:
                continue
            yy = np.arange(r0, r1, dtype=np.float32)[:, None] + np.float32(0.5) - np.float32(cy)
            xx = np.arange(c0, c1, dtype=np.float32)[None, :] + np.float32(0.5) - np.float32(cx)
            cos_a, sin_a = np.float32(math.cos(v.angle)), np.float32(math.sin(v.angle))
            u = (xx * cos_a + yy * sin_a) / np.float32(a)
            q = (-xx * sin_a + yy * cos_a) / np.float32(b)
            rho = np.sqrt(u * u + q * q)
            lumen = rho <= 1.0
            # Signed distance to the lumen boundary (approximate, in pixels) for the wall profile.
            dist = (rho - 1.0) * np.float32(math.sqrt(a * b))
            # Specular wall: brightest where its normal points along the beam (top and bottom).
            ny = (u / a * sin_a + q / b * cos_a) / (np.sqrt((u / a) ** 2 + (q / b) ** 2) + 1e-6)
            spec = np.float32(0.3) + np.float32(0.7) * ny * ny
            wall_profile = np.exp(-(((dist - 0.5 * wall) / (0.6 * wall)) ** 2)) * (dist > 0)
            sub = echo[r0:r1, c0:c1]
            sub += np.float32(cfg.wall_echo) * spec * wall_profile
            sub[lumen] = cfg.lumen_echo
            _accumulate_down(
                extra_cum,
                r0,
                c0,
                lumen * np.float32(-(1.0 - cfg.lumen_attenuation_ratio) * self._alpha_db_per_px),
            )
            mask = np.zeros((h, w), dtype=bool)
            mask[r0:r1, c0:c1] = lumen
            if int(np.count_nonzero(lumen)) >= cfg.min_visible_px:
                masks.append(mask)
                labels.append(VESSEL_LABEL)
                ids.append(v.target_id)

        bone_info: dict[str, Any] = {"present": False}
        if self._bone is not None:
            bone_info = {"present": True}
            mask = self._draw_bone(self._bone, ox, oy, echo, speckle, extra_cum, bone_info)
            if mask is not None and int(np.count_nonzero(mask)) >= cfg.min_visible_px:
                masks.append(mask)
                labels.append(BONE_LABEL)
                ids.append(BONE_ID)

        needle_info: dict[str, Any] = {"present": False}
        episode = int(math.floor(t / cfg.needle_episode_s))
        ep = self._needle_episode(episode)
        if ep is not None:
            length = self._needle_length(ep, t)
            needle_info = {
                "present": length > ep.s_enter,
                "episode": episode,
                "inserted_mm": length * cfg.spacing_mm,
                "angle_deg": ep.angle_deg,
            }
            if length > ep.s_enter:
                mask = self._draw_needle(ep, length, ox, oy, echo, speckle, extra_cum)
                if mask is not None and int(np.count_nonzero(mask)) >= cfg.min_visible_px:
                    masks.append(mask)
                    labels.append(NEEDLE_LABEL)
                    ids.append(NEEDLE_ID_OFFSET + episode)

        events = self._event_state(t) if self.events is not None else None
        shadow_db = None
        if events is not None and events["shadow"] is not None:
            shadow_db = self._shadow_map(events["shadow"], ox, oy)
            extra_cum += shadow_db

        # Amplitude -> dB -> 8 bit. Depth gain (TGC - tissue attenuation) minus the extra attenuation
        # accumulated down each column (lumen: negative = posterior enhancement; needle: shadow).
        gain_db = self._depth_gain_db[:, None] - extra_cum
        amp = echo * speckle * np.exp(gain_db * np.float32(_LN10_OVER_20))
        # Electronic noise: a window of a per-sequence Gaussian tile at a per-frame random offset
        # (drawing 2 x H x W normals per frame would cost more than the rest of the frame).
        rng = np.random.default_rng([self.seed, 0xF4A3E, index])
        ny0, nx0 = (int(v) for v in rng.integers(0, _NOISE_PAD, size=2))
        noise = self._noise_tile[:, ny0 : ny0 + h, nx0 : nx0 + w]
        if events is not None:
            if events["blur_px"] >= 1.0:
                amp = _box_blur_rows(amp, events["blur_px"])
            if events["contact_db"] > 0:
                amp *= np.float32(10.0 ** (-events["contact_db"] / 20.0))
                noise = noise * np.float32(self.events.contact_noise_gain)
        amp += noise[0]
        amp *= amp
        amp += noise[1] * noise[1]
        amp += np.float32(1e-12)
        # 10 log10(power) in dB, mapped to the display range.
        img = np.log(amp) * np.float32(10.0 / math.log(10.0) * self._db_scale)
        img += np.float32((cfg.dynamic_range_db - self._db_ref) * self._db_scale)
        image = np.clip(img, 0, 255).astype(np.uint8)

        if masks:
            mask_arr = np.stack(masks)
            boxes = np.stack([mask_to_box(m) for m in masks])
        else:
            mask_arr = np.zeros((0, h, w), dtype=bool)
            boxes = np.zeros((0, 4), dtype=np.float32)
        visible = np.ones(len(masks), dtype=bool)
        info_events: dict[str, Any] = {}
        if events is not None:
            ev = self.events
            blur_mm = events["blur_px"] * cfg.spacing_mm
            info_events = {
                "active": list(events["active"]),
                "shadow_db": 0.0 if events["shadow"] is None else events["shadow"][1],
                "contact_db": events["contact_db"],
                "blur_mm": blur_mm,
            }
            for row, mask in enumerate(masks):
                tid = ids[row]
                if tid in full_area and np.count_nonzero(mask) < ev.visible_fraction * full_area[tid]:
                    visible[row] = False
                if shadow_db is not None and float(shadow_db[mask].mean()) >= ev.shadow_visible_db:
                    visible[row] = False
            if events["contact_db"] >= ev.contact_visible_db or blur_mm >= ev.blur_visible_mm:
                visible[:] = False
        return PhantomFrame(
            image=image,
            boxes=boxes.astype(np.float32),
            labels=np.asarray(labels, dtype=np.int64),
            masks=mask_arr,
            target_ids=np.asarray(ids, dtype=np.int64),
            index=int(index),
            timestamp=float(t),
            info={
                "probe_offset_mm": (ox * cfg.spacing_mm, oy * cfg.spacing_mm),
                "vessel_radius_mm": radii,
                "needle": needle_info,
                "bone": bone_info,
                "image_to_world": self.image_to_world(t),
                "events": info_events,
            },
            visible=visible,
        )

    def _shadow_map(self, shadow: tuple[_Event, float], ox: float, oy: float) -> np.ndarray:
        """HxW float32 extra attenuation (dB) of a shadow event: a band of columns over its vessel,
        from a little above the vessel down, with soft (2 px) sides."""
        event, level_db = shadow
        cfg, px = self.config, self._px
        h, w = cfg.shape
        out = np.zeros((h, w), dtype=np.float32)
        if not self._vessels:
            return out
        v = self._vessels[int(event.params["vessel"]) % len(self._vessels)]
        reach = max(v.a, v.b) * (1.0 + v.amplitude) + self.events.shadow_margin_mm * px
        cx, top = v.cx - ox, max(v.cy - oy - max(v.a, v.b) * 1.3 - 2.0 * px, 0.0)
        cols = np.arange(w, dtype=np.float32) + np.float32(0.5)
        lateral = np.clip((reach - np.abs(cols - np.float32(cx))) / 2.0 + 0.5, 0.0, 1.0)
        rows = np.arange(h, dtype=np.float32) + np.float32(0.5)
        out += np.float32(level_db) * (rows[:, None] >= top) * lateral[None, :]
        return out

    def _draw_bone(
        self,
        bone: _Bone,
        ox: float,
        oy: float,
        echo: np.ndarray,
        speckle: np.ndarray,
        extra_cum: np.ndarray,
        info: dict[str, Any],
    ) -> np.ndarray | None:
        """Draw the cortex and its shadow; return the mask of its visible part (None: out of view).

        Per column (pixel centre x): the surface is at row ``y(x)``, the local surface angle is
        ``atan|y'(x)|``; a pixel is in the cortex when its distance below the surface along the normal,
        ``(row + 0.5 - y) cos(angle)``, is in ``[0, thickness)``. The mask is the cortex where the angle
        is at most ``bone_visible_angle_deg``; steeper parts are drawn fading out within a few degrees
        (specular reflection away from the probe). The whole cortex attenuates ``bone_shadow_db``, so
        every column it spans is dark below it."""
        cfg = self.config
        h, w = cfg.shape
        c0 = max(int(math.floor(bone.apex_x - bone.half_width - ox)), 0)
        c1 = min(int(math.ceil(bone.apex_x + bone.half_width - ox)) + 1, w)
        if c0 >= c1:
            return None
        xw = np.arange(c0, c1, dtype=np.float64) + 0.5 + ox  # world column centres
        span = np.abs(xw - bone.apex_x) <= bone.half_width
        surface = bone.depth(xw) - oy  # image rows
        cos_a = 1.0 / np.sqrt(1.0 + bone.slope(xw) ** 2)
        angle = np.degrees(np.arccos(cos_a))
        r0 = max(int(math.floor(float(surface[span].min()) if span.any() else h)) - 3, 0)
        r1 = min(
            int(math.ceil(float((surface + bone.thickness / cos_a)[span].max()) if span.any() else 0)) + 4, h
        )
        info.update(
            apex_xy_px=(bone.apex_x - ox, bone.apex_y - oy),
            radius_mm=bone.radius * cfg.spacing_mm,
            radius_px=bone.radius,
            thickness_mm=bone.thickness * cfg.spacing_mm,
            thickness_px=bone.thickness,
            curvature=bone.curvature,
            tan_tilt=bone.tan_tilt,
            half_width_px=bone.half_width,
            columns=(c0, c1),
        )
        if r0 >= r1:
            return None
        rows = np.arange(r0, r1, dtype=np.float64)[:, None] + 0.5
        normal = (rows - surface[None, :]) * cos_a[None, :]  # px below the surface, along the normal
        band = (normal >= 0) & (normal < bone.thickness) & span[None, :]
        if not band.any():
            return None
        seen = angle <= cfg.bone_visible_angle_deg
        # Brightness: specular, a little dimmer as the surface tilts, fading fast past the visible angle.
        spec = 0.6 + 0.4 * cos_a**4
        spec = np.where(seen, spec, spec * np.exp(-(((angle - cfg.bone_visible_angle_deg) / 4.0) ** 2)))
        outside = np.maximum(np.maximum(-normal, normal - bone.thickness), 0.0)
        profile = np.exp(-(outside**2) / 0.8) * span[None, :] * spec[None, :]
        profile = profile.astype(np.float32)
        sub = echo[r0:r1, c0:c1]
        np.maximum(sub, np.float32(cfg.bone_echo) * profile, out=sub)
        sp = speckle[r0:r1, c0:c1]
        sp += (np.float32(0.85) - sp) * np.float32(0.6) * profile
        # Shadow: bone_shadow_db spread over each column's cortex pixels (exactly that much below it).
        count = np.maximum(band.sum(axis=0), 1)
        _accumulate_down(
            extra_cum, r0, c0, (np.float32(cfg.bone_shadow_db) * band / count).astype(np.float32)
        )
        mask = np.zeros((h, w), dtype=bool)
        mask[r0:r1, c0:c1] = band & seen[None, :]
        return mask

    def _draw_needle(
        self,
        ep: _NeedleEpisode,
        length: float,
        ox: float,
        oy: float,
        echo: np.ndarray,
        speckle: np.ndarray,
        extra_cum: np.ndarray,
    ) -> np.ndarray | None:
        """Draw the shaft (up to ``length``), its reverberation and shadow; return its mask."""
        cfg = self.config
        h, w = cfg.shape
        px = self._px
        half = max(0.5 * cfg.needle_diameter_mm * px, 0.75)
        dx, dy = ep.direction
        sx, sy = ep.start[0] - ox, ep.start[1] - oy
        ex, ey = sx + dx * length, sy + dy * length
        spacing = max(cfg.reverb_spacing_mm * px, 1.0)
        pad = half + 2
        r0 = max(int(math.floor(min(sy, ey) - pad)), 0)
        r1 = min(int(math.ceil(max(sy, ey) + pad)) + 1, h)
        c0 = max(int(math.floor(min(sx, ex) - pad)), 0)
        c1 = min(int(math.ceil(max(sx, ex) + pad)) + 1, w)
        if r0 >= r1 or c0 >= c1:
            return None
        yy = np.arange(r0, r1, dtype=np.float32)[:, None] + np.float32(0.5 - sy)
        xx = np.arange(c0, c1, dtype=np.float32)[None, :] + np.float32(0.5 - sx)
        along = xx * np.float32(dx) + yy * np.float32(dy)
        across = np.abs(-xx * np.float32(dy) + yy * np.float32(dx))
        on_shaft = (along >= 0) & (along <= np.float32(length))
        inside = on_shaft & (across <= np.float32(half))
        if not inside.any():
            return None
        # Shaft brightness: flat inside the mask, falling off over ~1 pixel outside it (PSF).
        profile = np.where(on_shaft, np.exp(-(np.maximum(across - np.float32(half), 0) ** 2) / 0.8), 0)
        profile = profile.astype(np.float32)
        bright = np.float32(cfg.needle_echo) * profile
        sub = echo[r0:r1, c0:c1]
        np.maximum(sub, bright, out=sub)
        # Specular reflector: little speckle on the shaft.
        sp = speckle[r0:r1, c0:c1]
        sp += (np.float32(0.85) - sp) * np.float32(0.7) * profile
        # Shadow: the shaft attenuates needle_shadow_db along the beam (vertical path across it).
        vertical_path = 2 * half / max(abs(dx), 0.2)
        _accumulate_down(extra_cum, r0, c0, np.float32(cfg.needle_shadow_db / vertical_path) * inside)
        # Comet-tail reverberation: decaying copies of the shaft below it (they sit in the shadow,
        # so boost them by the shadow to show at reverb_decay**k of the shaft's brightness).
        boost = np.float32(10.0 ** (cfg.needle_shadow_db / 20.0))
        for k in range(1, cfg.reverb_count + 1):
            shift = int(round(k * spacing))
            top, bottom = r0 + shift, min(r1 + shift, h)
            if top >= h:
                break
            rows = bottom - top
            echo[top:bottom, c0:c1] += (
                boost * np.float32(cfg.needle_echo * cfg.reverb_decay**k) * profile[:rows]
            )
        mask = np.zeros((h, w), dtype=bool)
        mask[r0:r1, c0:c1] = inside
        return mask


def _box_blur_rows(amp: np.ndarray, length: float) -> np.ndarray:
    """Average each row of ``amp`` over a centred window ``length`` pixels wide (a pixel's own width
    included, so 1 changes nothing; fractional ends weighted; edges repeat the last pixel): the lateral
    smear of probe motion during a frame."""
    h, w = amp.shape
    half = 0.5 * max(float(length) - 1.0, 0.0)
    whole = int(math.floor(half))
    frac = np.float32(half - whole)
    padded = np.pad(amp, ((0, 0), (whole + 1, whole + 1)), mode="edge").astype(np.float64)
    csum = np.concatenate((np.zeros((h, 1)), np.cumsum(padded, axis=1)), axis=1)
    centre = np.arange(w) + whole + 1
    inner = csum[:, centre + whole + 1] - csum[:, centre - whole]
    edges = padded[:, centre - whole - 1] + padded[:, centre + whole + 1]
    return ((inner + frac * edges) / (2 * whole + 1 + 2 * frac)).astype(np.float32)


def _accumulate_down(total: np.ndarray, r0: int, c0: int, local_db: np.ndarray) -> None:
    """Add the running sum down the columns of ``local_db`` (placed at r0, c0) to ``total``.

    Below the local block the sum stays at its last value: attenuation along a beam is cumulative.
    """
    r1, c1 = r0 + local_db.shape[0], c0 + local_db.shape[1]
    cum = np.cumsum(local_db, axis=0, dtype=np.float32)
    total[r0:r1, c0:c1] += cum
    total[r1:, c0:c1] += cum[-1]


def _bilinear(
    world: np.ndarray, iy: int, ix: int, fy: np.float32, fx: np.float32, h: int, w: int
) -> np.ndarray:
    """HxW bilinear sample of ``world`` at rows iy+fy.., columns ix+fx.. (float32 copy)."""
    a = world[iy : iy + h, ix : ix + w]
    b = world[iy : iy + h, ix + 1 : ix + w + 1]
    c = world[iy + 1 : iy + h + 1, ix : ix + w]
    d = world[iy + 1 : iy + h + 1, ix + 1 : ix + w + 1]
    one = np.float32(1.0)
    top = a * (one - fx) + b * fx
    bottom = c * (one - fx) + d * fx
    return (top * (one - fy) + bottom * fy).astype(np.float32, copy=False)


def frames_to_arrays(frames: Sequence[PhantomFrame]) -> tuple[np.ndarray, np.ndarray]:
    """Stack frames into (N x H x W uint8 images, N float64 timestamps in s) for sequence writers."""
    if not frames:
        raise PhantomConfigError("frames_to_arrays needs at least one frame")
    images = np.stack([f.image for f in frames])
    stamps = np.asarray([f.timestamp for f in frames], dtype=np.float64)
    return images, stamps


@dataclass
class PhantomDataset:
    """Stacked frames for training / evaluation.

    ``images``: N x H x W uint8; ``boxes[i]``: Mi x 4 float32 XYXY pixel-edge; ``labels[i]``: Mi int64;
    ``masks[i]``: Mi x H x W bool; ``target_ids[i]``: Mi int64; ``sequence_seeds`` / ``frame_indices``:
    N int64, where image i is ``PhantomStream(config, sequence_seeds[i]).frame(frame_indices[i])``.
    """

    images: np.ndarray
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    masks: list[np.ndarray]
    target_ids: list[np.ndarray]
    sequence_seeds: np.ndarray
    frame_indices: np.ndarray
    config: PhantomConfig

    def __len__(self) -> int:
        return int(self.images.shape[0])


def sequence_seeds(seed: int, n_sequences: int) -> np.ndarray:
    """The phantom seeds `render_dataset` uses for ``seed``: n int64 values derived with SeedSequence.

    Different dataset seeds give (with overwhelming probability) disjoint sequence seeds, so a
    training set from seed 0 and a held-out set from seed 1 share no anatomy.
    """
    state = np.random.SeedSequence([int(seed), 0xDA7A]).generate_state(max(n_sequences, 1), dtype=np.uint32)
    return state[:n_sequences].astype(np.int64)


def render_dataset(
    n: int,
    seed: int = 0,
    config: PhantomConfig | None = None,
    frames_per_sequence: int = 8,
    sequence_span_s: float | None = None,
) -> PhantomDataset:
    """Render ``n`` frames from ``ceil(n / frames_per_sequence)`` phantom sequences.

    Each sequence has its own seed (see `sequence_seeds`) and contributes frames at random times in
    ``[0, sequence_span_s)`` (default: two needle episodes), so the set mixes anatomies, probe
    offsets, pulsation phases and needle insertion depths. Deterministic by ``seed``.
    """
    if n < 1:
        raise PhantomConfigError(f"render_dataset n = {n} is invalid: must be >= 1")
    if frames_per_sequence < 1:
        raise PhantomConfigError(f"frames_per_sequence = {frames_per_sequence} is invalid: must be >= 1")
    cfg = config if config is not None else PhantomConfig()
    span = sequence_span_s if sequence_span_s is not None else 2.0 * cfg.needle_episode_s
    span_frames = max(int(span * cfg.frame_rate_hz), 1)
    n_seq = int(math.ceil(n / frames_per_sequence))
    seeds = sequence_seeds(seed, n_seq)
    pick = np.random.default_rng([int(seed), 0x91C]).integers(
        0, span_frames, size=(n_seq, frames_per_sequence)
    )
    frames: list[PhantomFrame] = []
    seq_of: list[int] = []
    for s in range(n_seq):
        stream = PhantomStream(cfg, seed=int(seeds[s]), n_frames=span_frames)
        for idx in np.sort(pick[s]):
            if len(frames) == n:
                break
            frames.append(stream.frame(int(idx)))
            seq_of.append(int(seeds[s]))
    return PhantomDataset(
        images=np.stack([f.image for f in frames]),
        boxes=[f.boxes for f in frames],
        labels=[f.labels for f in frames],
        masks=[f.masks for f in frames],
        target_ids=[f.target_ids for f in frames],
        sequence_seeds=np.asarray(seq_of, dtype=np.int64),
        frame_indices=np.asarray([f.index for f in frames], dtype=np.int64),
        config=cfg,
    )
