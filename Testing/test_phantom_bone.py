"""The phantom's bone surface: exact cortex mask and box, shadow below it, steep parts unseen, seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from UltramotionIGTLib import CLASS_NAMES
from UltramotionIGTLib.tools.phantom import (
    BONE_ID,
    BONE_LABEL,
    PhantomConfig,
    PhantomConfigError,
    PhantomStream,
    mask_to_box,
)
from UltramotionIGTLib.tools.training.common import demo_phantom_config


def _config(**overrides) -> PhantomConfig:
    values = {
        "height": 160,
        "width": 160,
        "bone_probability": 1.0,
        "needle_probability": 0.0,
        "bone_depth_mm": (17.0, 26.0),
        "vessel_depth_mm": (5.0, 10.0),
        "vessel_radius_mm": (1.5, 3.0),
    }
    values.update(overrides)
    return PhantomConfig(**values)


def _bone_frame(config: PhantomConfig, seed: int, index: int = 5):
    frame = PhantomStream(config, seed=seed, n_frames=10).frame(index)
    rows = np.flatnonzero(frame.labels == BONE_LABEL)
    return frame, (int(rows[0]) if rows.size else None)


def _expected_cortex(info: dict, shape: tuple[int, int], visible_angle_deg: float):
    """Independent reconstruction of the cortex from the frame's info: (band, seen columns)."""
    h, w = shape
    ax, ay = info["apex_xy_px"]
    cols = np.arange(w) + 0.5
    d = cols - ax
    surface = ay + info["curvature"] * d * d / (2.0 * info["radius_px"]) + info["tan_tilt"] * d
    slope = info["curvature"] * d / info["radius_px"] + info["tan_tilt"]
    cos_a = 1.0 / np.sqrt(1.0 + slope * slope)
    rows = np.arange(h)[:, None] + 0.5
    normal = (rows - surface[None, :]) * cos_a[None, :]
    span = np.abs(d) <= info["half_width_px"]
    band = (normal >= 0) & (normal < info["thickness_px"]) & span[None, :]
    seen = np.degrees(np.arctan(np.abs(slope))) <= visible_angle_deg
    return band, seen


def test_bone_is_the_third_class():
    assert CLASS_NAMES == ("vessel", "needle", "bone") and CLASS_NAMES[BONE_LABEL] == "bone"


def test_default_config_has_no_bone_and_demo_config_has_it_in_most_sequences():
    for seed in range(4):
        frame = PhantomStream(PhantomConfig(height=128, width=128), seed=seed, n_frames=3).frame(1)
        assert BONE_LABEL not in frame.labels and frame.info["bone"] == {"present": False}
    have = [
        PhantomStream(demo_phantom_config(), seed=s, n_frames=1).frame(0).info["bone"]["present"]
        for s in range(20)
    ]
    assert 8 <= sum(have) < 20  # DEMO_BONE_PROBABILITY of the sequences, not all


@pytest.mark.parametrize("seed", [0, 3, 7, 11])
def test_bone_mask_is_the_visible_cortex_band_and_its_box_is_tight(seed):
    config = _config()
    frame, row = _bone_frame(config, seed)
    info = frame.info["bone"]
    assert info["present"]
    band, seen = _expected_cortex(info, frame.image.shape, config.bone_visible_angle_deg)
    expected = band & seen[None, :]
    if row is None:  # too little of it in view this frame
        assert np.count_nonzero(expected) < config.min_visible_px
        return
    mask = frame.masks[row]
    assert frame.target_ids[row] == BONE_ID
    assert np.array_equal(mask, expected)
    assert np.array_equal(frame.boxes[row], mask_to_box(mask))
    x0, y0, x1, y1 = (int(v) for v in frame.boxes[row])
    assert mask[:, x0].any() and mask[:, x1 - 1].any() and mask[y0].any() and mask[y1 - 1].any()
    # A few pixels thick: per column, the cortex is thickness / cos(angle) rows (+-1 for sampling).
    thickness = info["thickness_px"]
    assert 1.0 / 0.2 - 1e-6 <= thickness <= 1.6 / 0.2 + 1e-6
    per_column = mask.sum(axis=0)
    whole = ~mask[0] & ~mask[-1]  # columns whose cortex is not cut by the top or bottom of the image
    cols = np.flatnonzero((per_column > 0) & whole)
    assert cols.size > 10
    assert (
        per_column[cols].min() >= math.floor(thickness) - 1 and per_column[cols].max() <= 2.0 * thickness + 1
    )


def test_steep_parts_of_the_surface_are_drawn_dark_and_left_out_of_the_mask():
    # A tight trough: its sides are steeper than the visible angle.
    config = _config(bone_radius_mm=(6.0, 6.0), bone_half_width_mm=(9.0, 9.0), bone_dome_probability=0.0)
    for seed in range(10):
        frame, row = _bone_frame(config, seed)
        if row is None:
            continue
        band, seen = _expected_cortex(frame.info["bone"], frame.image.shape, config.bone_visible_angle_deg)
        steep = band & ~seen[None, :]
        if np.count_nonzero(steep) < 30:
            continue
        mask = frame.masks[row]
        assert not (mask & steep).any() and mask.any()
        img = frame.image.astype(float)
        assert img[mask].mean() > img[steep].mean() + 40  # the flat part is bright, the steep part is not
        return
    pytest.fail("no trough with steep sides in view among 10 seeds")


def test_shadow_below_the_bone_and_nothing_else_changes():
    seed = 2
    with_bone = PhantomStream(_config(), seed=seed, n_frames=10).frame(4)
    without = PhantomStream(_config(bone_probability=0.0), seed=seed, n_frames=10).frame(4)
    c0, c1 = with_bone.info["bone"]["columns"]
    assert 0 <= c0 < c1 <= 160
    outside = np.ones(160, bool)
    outside[c0:c1] = False
    # Own random stream: the rest of the scene (tissue, speckle, vessels, noise) is untouched.
    assert np.array_equal(with_bone.image[:, outside], without.image[:, outside])
    assert np.array_equal(with_bone.masks[with_bone.labels != BONE_LABEL], without.masks)
    row = int(np.flatnonzero(with_bone.labels == BONE_LABEL)[0])
    mask = with_bone.masks[row]
    below = np.zeros_like(mask)
    for c in np.flatnonzero(mask.any(axis=0)):
        last = int(np.flatnonzero(mask[:, c])[-1])
        below[last + 6 : last + 30, c] = True
    assert below.sum() > 200
    a, b = with_bone.image.astype(float), without.image.astype(float)
    assert a[below].mean() < 0.35 * b[below].mean()  # posterior acoustic shadow
    assert a[mask].mean() > b[mask].mean() + 50  # bright cortex


def test_vessels_stay_above_the_bone():
    config = _config(n_vessels=(3, 3), vessel_depth_mm=(10.0, 28.0))
    checked = 0
    for seed in range(12):
        stream = PhantomStream(config, seed=seed, n_frames=1)
        frame = stream.frame(0)
        if not frame.info["bone"]["present"] or BONE_LABEL not in frame.labels:
            continue
        bone = frame.masks[int(np.flatnonzero(frame.labels == BONE_LABEL)[0])]
        top = np.where(bone.any(axis=0), bone.argmax(axis=0), 10**6)
        for m, label in zip(frame.masks, frame.labels, strict=True):
            if label == BONE_LABEL:
                continue
            rows, cols = np.nonzero(m)
            assert (rows < top[cols]).all()
            checked += int(np.isin(cols, np.flatnonzero(bone.any(axis=0))).any())
    assert checked >= 1  # some vessel shared columns with the bone


def test_bone_is_deterministic_by_seed():
    config = _config(needle_probability=0.85)
    a = PhantomStream(config, seed=5, n_frames=30)
    b = PhantomStream(config, seed=5, n_frames=30)
    listed = list(a)
    for i in (0, 13, 29):
        fb = b.frame(i)
        for fa in (listed[i], a.frame(i)):
            assert np.array_equal(fa.image, fb.image)
            assert np.array_equal(fa.masks, fb.masks) and np.array_equal(fa.boxes, fb.boxes)
            assert np.array_equal(fa.labels, fb.labels) and np.array_equal(fa.target_ids, fb.target_ids)
    other = PhantomStream(config, seed=6, n_frames=1).frame(0)
    assert other.info["bone"]["apex_xy_px"] != listed[0].info["bone"]["apex_xy_px"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("bone_probability", 1.5),
        ("bone_radius_mm", (0.0, 3.0)),
        ("bone_thickness_mm", (1.0, 0.5)),
        ("bone_visible_angle_deg", 90.0),
    ],
)
def test_bad_bone_settings_name_the_field(field, value):
    with pytest.raises(PhantomConfigError, match=field):
        PhantomConfig(**{field: value})
