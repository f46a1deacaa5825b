"""Tests of the synthetic ultrasound phantom (UltramotionIGTLib.tools.phantom).

Physics checks compare two renderings of the same seed that differ in one parameter (the random
draws do not depend on parameter values), so the expected direction and rough size of each effect
follow from the model, not from a recorded run.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from UltramotionIGTLib import CLASS_NAMES
from UltramotionIGTLib.tools.phantom import (
    NEEDLE_ID_OFFSET,
    NEEDLE_LABEL,
    VESSEL_LABEL,
    PhantomConfig,
    PhantomConfigError,
    PhantomStream,
    frames_to_arrays,
    mask_to_box,
    render_dataset,
)

STILL = {"probe_speed_mm_s": 0.0, "probe_range_mm": 0.0, "probe_axial_range_mm": 0.0}


def _box_of(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=np.float32)


def _assert_frames_equal(a, b) -> None:
    assert a.index == b.index and a.timestamp == b.timestamp
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.target_ids, b.target_ids)


def test_class_labels_match_library_names():
    assert CLASS_NAMES[VESSEL_LABEL] == "vessel"
    assert CLASS_NAMES[NEEDLE_LABEL] == "needle"


def test_same_seed_gives_identical_frames_and_other_seed_differs():
    cfg = PhantomConfig()
    a = PhantomStream(cfg, seed=11, n_frames=40)
    b = PhantomStream(PhantomConfig(), seed=11, n_frames=40)
    c = PhantomStream(cfg, seed=12, n_frames=40)
    for i in (0, 17, 39):
        _assert_frames_equal(a.frame(i), b.frame(i))
        assert not np.array_equal(a.frame(i).image, c.frame(i).image)
    # Consecutive frames differ too (noise, pulsation, motion), but only a little.
    f0, f1 = a.frame(5).image.astype(np.int16), a.frame(6).image.astype(np.int16)
    assert np.any(f0 != f1)
    assert np.mean(np.abs(f0 - f1)) < 20


def test_random_access_equals_iteration_and_sequence_api():
    stream = PhantomStream(PhantomConfig(), seed=3, n_frames=30)
    iterated = list(stream)
    assert len(iterated) == len(stream) == 30
    for i in (29, 0, 13, 7):  # out of order, on a fresh stream as well
        _assert_frames_equal(stream.frame(i), iterated[i])
        _assert_frames_equal(PhantomStream(PhantomConfig(), seed=3).frame(i), iterated[i])
    _assert_frames_equal(stream[-1], iterated[29])
    assert [f.index for f in stream[5:10]] == [5, 6, 7, 8, 9]
    with pytest.raises(IndexError):
        stream[30]
    seq = list(PhantomStream(PhantomConfig(), seed=3, n_frames=12))
    for got, want in zip(seq, iterated[:12], strict=True):
        _assert_frames_equal(got, want)
    images, stamps = frames_to_arrays(seq)
    assert images.shape == (12, 256, 256) and images.dtype == np.uint8
    np.testing.assert_allclose(np.diff(stamps), 1.0 / stream.config.frame_rate_hz)
    assert stream.spacing == (0.2, 0.2)


def test_frame_contents_masks_boxes_labels_consistent():
    cfg = PhantomConfig(height=192, width=224, needle_probability=1.0)
    seen_labels: set[int] = set()
    for seed in range(4):
        stream = PhantomStream(cfg, seed=seed, n_frames=100)
        for i in range(0, 100, 9):
            f = stream.frame(i)
            m = len(f.labels)
            assert f.image.shape == (192, 224) and f.image.dtype == np.uint8
            assert f.masks.shape == (m, 192, 224) and f.masks.dtype == np.bool_
            assert f.boxes.shape == (m, 4) and f.boxes.dtype == np.float32
            assert f.labels.dtype == np.int64 and f.target_ids.dtype == np.int64
            assert len(set(f.target_ids.tolist())) == m
            for box, mask, label, tid in zip(f.boxes, f.masks, f.labels, f.target_ids, strict=True):
                assert mask.sum() >= cfg.min_visible_px
                np.testing.assert_array_equal(box, _box_of(mask))
                np.testing.assert_array_equal(mask_to_box(mask), box)
                assert 0 <= box[0] < box[2] <= 224 and 0 <= box[1] < box[3] <= 192
                assert label in (VESSEL_LABEL, NEEDLE_LABEL)
                assert (label == NEEDLE_LABEL) == (tid >= NEEDLE_ID_OFFSET)
                seen_labels.add(int(label))
            labelmap = f.labelmap()
            assert labelmap.shape == f.image.shape and labelmap.dtype == np.uint8
            np.testing.assert_array_equal(labelmap > 0, f.masks.any(0))
    assert seen_labels == {VESSEL_LABEL, NEEDLE_LABEL}


def test_needle_mask_is_a_thin_straight_shaft():
    cfg = PhantomConfig(needle_probability=1.0, **STILL)
    stream = PhantomStream(cfg, seed=5)
    frame = next(f for f in (stream.frame(i) for i in range(40, 120)) if NEEDLE_LABEL in f.labels)
    mask = frame.masks[list(frame.labels).index(NEEDLE_LABEL)]
    rows, cols = np.nonzero(mask)
    pts = np.stack([cols, rows], 1).astype(np.float64)
    pts -= pts.mean(0)
    _, sv, vt = np.linalg.svd(pts, full_matrices=False)
    across = np.abs(pts @ vt[1])
    along = pts @ vt[0]
    diameter_px = cfg.needle_diameter_mm / cfg.spacing_mm
    # Pixel centres inside the rectangle are within half a diameter of its axis (+ rounding).
    assert across.max() <= diameter_px / 2 + 1.0
    assert np.ptp(along) > 10 * diameter_px


def test_target_ids_stable_and_objects_move_smoothly():
    stream = PhantomStream(PhantomConfig(), seed=8, n_frames=80)
    centroids: dict[int, list[tuple[int, np.ndarray]]] = {}
    label_of: dict[int, int] = {}
    for f in stream:
        for mask, label, tid in zip(f.masks, f.labels, f.target_ids, strict=True):
            label_of.setdefault(int(tid), int(label))
            assert label_of[int(tid)] == int(label)
            rows, cols = np.nonzero(mask)
            centroids.setdefault(int(tid), []).append((f.index, np.array([cols.mean(), rows.mean()])))
    vessel_ids = sorted(t for t, lab in label_of.items() if lab == VESSEL_LABEL)
    assert vessel_ids == list(range(len(vessel_ids))) and len(vessel_ids) >= 1
    assert set(vessel_ids) <= set(range(stream.n_vessels))
    for tid in vessel_ids:
        track = centroids[tid]
        for (i0, c0), (i1, c1) in zip(track[:-1], track[1:], strict=True):
            if i1 == i0 + 1 and len(track) == 80:  # fully tracked vessel: no jumps between frames
                assert np.linalg.norm(c1 - c0) < 2.0


def test_objects_leave_and_reenter_with_the_same_id():
    cfg = PhantomConfig(probe_range_mm=12.0, probe_speed_mm_s=12.0, needle_probability=0.0, n_vessels=(3, 3))
    reentered = False
    for seed in range(6):
        stream = PhantomStream(cfg, seed=seed, n_frames=120)
        presence: dict[int, list[bool]] = {v: [] for v in range(stream.n_vessels)}
        for f in stream:
            ids = set(f.target_ids.tolist())
            for v in presence:
                presence[v].append(v in ids)
        for series in presence.values():
            s = np.asarray(series)
            first_in, gone = np.argmax(s), np.flatnonzero(~s)
            if s.any() and np.any(gone > first_in):
                later = gone[gone > first_in][0]
                reentered |= bool(s[later:].any())
        if reentered:
            break
    assert reentered


def test_needle_grows_during_insertion_then_is_withdrawn():
    cfg = PhantomConfig(needle_probability=1.0, needle_episode_s=6.0, **STILL)
    fps = cfg.frame_rate_hz
    for seed in (0, 1, 2):
        stream = PhantomStream(cfg, seed=seed)
        insertion = [stream.frame(i) for i in range(0, int(0.6 * 6.0 * fps))]
        needle_masks = [f.masks[f.labels == NEEDLE_LABEL] for f in insertion]
        present = [m[0] for m in needle_masks if len(m)]
        assert len(present) > 10
        # With the probe still, the visible shaft only gets longer: each mask contains the previous.
        for prev, cur in zip(present[:-1], present[1:], strict=True):
            assert not np.any(prev & ~cur)
        areas = [int(m.sum()) for m in present]
        assert areas[-1] > 2 * areas[0]
        depths = [f.info["needle"]["inserted_mm"] for f in insertion if NEEDLE_LABEL in f.labels]
        assert all(b >= a for a, b in zip(depths[:-1], depths[1:], strict=True))
        # By the end of the episode the needle is out; the next episode's needle has a new id.
        last = stream.frame(int(6.0 * fps) - 1)
        assert NEEDLE_LABEL not in last.labels
        ids = {
            int(t)
            for i in range(int(6.0 * fps), int(10.0 * fps), 5)
            for t in stream.frame(i).target_ids
            if t >= NEEDLE_ID_OFFSET
        }
        assert ids == {NEEDLE_ID_OFFSET + 1}


def test_vessels_pulsate_periodically():
    fps = 20.0
    cfg = PhantomConfig(
        frame_rate_hz=fps,
        pulsation_period_s=(1.0, 1.0),
        pulsation_amplitude=(0.1, 0.1),
        needle_probability=0.0,
        vessel_radius_mm=(3.5, 4.0),
        **STILL,
    )
    stream = PhantomStream(cfg, seed=4, n_frames=60)
    areas: dict[int, list[int]] = {}
    for f in stream:
        for mask, tid in zip(f.masks, f.target_ids, strict=True):
            areas.setdefault(int(tid), []).append(int(mask.sum()))
    full = {tid: np.asarray(a, dtype=np.float64) for tid, a in areas.items() if len(a) == 60}
    assert full
    period = int(fps * 1.0)
    for series in full.values():
        mean = series.mean()
        # Radius +-10 % -> area varies by roughly +-20 %; require a clear fraction of that.
        assert (series.max() - series.min()) / mean > 0.15
        # Same phase one period later: equal up to pixel discretisation.
        assert np.max(np.abs(series[period:] - series[:-period])) <= 0.02 * mean
        spectrum = np.abs(np.fft.rfft(series - mean))
        assert int(np.argmax(spectrum)) == 60 // period  # 1 Hz over 3 s of frames


def _ring(mask: np.ndarray, inner: int, outer: int) -> np.ndarray:
    return ndimage.binary_dilation(mask, iterations=outer) & ~ndimage.binary_dilation(mask, iterations=inner)


def test_vessels_dark_and_needle_bright():
    cfg = PhantomConfig(needle_probability=1.0)
    checked = {VESSEL_LABEL: 0, NEEDLE_LABEL: 0}
    for seed in range(4):
        stream = PhantomStream(cfg, seed=seed)
        for i in (50, 90):
            f = stream.frame(i)
            img = f.image.astype(np.float64)
            for mask, label in zip(f.masks, f.labels, strict=True):
                ring = _ring(mask, 3, 8)
                if label == VESSEL_LABEL:
                    # Only vessels whose lumen is clear of the needle and its shadow.
                    if mask.sum() < 200:
                        continue
                    assert img[mask].mean() < 0.35 * img[ring].mean()
                    assert img[mask].mean() < 40
                else:
                    assert img[mask].mean() > 200
                    assert img[mask].mean() > 1.8 * np.median(img)
                checked[int(label)] += 1
    assert checked[VESSEL_LABEL] >= 4 and checked[NEEDLE_LABEL] >= 4


def test_posterior_acoustic_enhancement_below_vessels():
    # Without electronic noise the image is a monotonic function of the gain above each pixel.
    base = {"needle_probability": 0.0, "n_vessels": (2, 2), "noise_level": 0.0, **STILL}
    lossy = PhantomStream(PhantomConfig(lumen_attenuation_ratio=1.0, **base), seed=2).frame(10)
    clear = PhantomStream(PhantomConfig(lumen_attenuation_ratio=0.1, **base), seed=2).frame(10)
    np.testing.assert_array_equal(lossy.masks, clear.masks)
    a, b = lossy.image.astype(np.int32), clear.image.astype(np.int32)
    assert np.all(b >= a)  # less attenuation above a pixel never makes it darker
    top = int(clear.boxes[:, 1].min())
    np.testing.assert_array_equal(a[:top], b[:top])  # nothing changes above the vessels
    for box in clear.boxes:
        x0, _, x1, y1 = (int(v) for v in box)
        cx, half = (x0 + x1) // 2, max((x1 - x0) // 4, 1)
        below = (slice(y1 + 3, min(y1 + 40, a.shape[0])), slice(cx - half, cx + half))
        if below[0].start < below[0].stop:
            assert (b[below] - a[below]).mean() > 5


def test_needle_shadow_darkens_tissue_below_the_shaft():
    base = {"needle_probability": 1.0, "noise_level": 0.0, **STILL}
    cfg_off = PhantomConfig(needle_shadow_db=0.0, reverb_count=0, **base)
    cfg_on = PhantomConfig(needle_shadow_db=10.0, reverb_count=0, **base)
    off = PhantomStream(cfg_off, seed=6).frame(100)
    on = PhantomStream(cfg_on, seed=6).frame(100)
    needle = on.masks[list(on.labels).index(NEEDLE_LABEL)]
    below = np.zeros_like(needle)
    for col in np.flatnonzero(needle.any(0)):
        below[np.flatnonzero(needle[:, col]).max() + 4 :, col] = True
    diff = off.image.astype(np.float64)[below] - on.image.astype(np.float64)[below]
    # 10 dB at 255 gray levels per 50 dB: ~50 levels lower, less where either image clips.
    assert diff.mean() > 25
    assert np.all(diff >= 0)


def test_attenuation_grows_with_depth_and_tgc_compensates():
    base = {"needle_probability": 0.0, "n_vessels": (0, 0), "tgc_jitter_db": 0.0, **STILL}
    flat = PhantomStream(
        PhantomConfig(attenuation_db_per_cm=(0.0, 0.0), tgc_db_per_cm=(0.0, 0.0), **base), seed=1
    ).frame(0)
    lossy = PhantomStream(
        PhantomConfig(attenuation_db_per_cm=(6.0, 6.0), tgc_db_per_cm=(0.0, 0.0), **base), seed=1
    ).frame(0)
    comp = PhantomStream(
        PhantomConfig(attenuation_db_per_cm=(6.0, 6.0), tgc_db_per_cm=(6.0, 6.0), **base), seed=1
    ).frame(0)
    f, lo, c = (x.image.astype(np.float64) for x in (flat, lossy, comp))
    top, deep = slice(20, 50), slice(200, 250)
    loss_top = (f[top] - lo[top]).mean()
    loss_deep = (f[deep] - lo[deep]).mean()
    # 6 dB/cm over ~4.5 cm more depth = ~27 dB = ~138 gray levels (less where the image clips at 0).
    assert loss_deep > loss_top + 40
    # TGC with the same slope restores the deep signal.
    assert abs((f[deep] - c[deep]).mean()) < 5


def test_speckle_is_rayleigh_like():
    base = {"needle_probability": 0.0, "n_vessels": (0, 0), "n_layers": (1, 1), "noise_level": 0.0, **STILL}
    cfg_on = PhantomConfig(speckle_strength=1.0, **base)
    cfg_off = PhantomConfig(speckle_strength=0.0, **base)
    img_on = PhantomStream(cfg_on, seed=9).frame(0).image.astype(np.float64)
    img_off = PhantomStream(cfg_off, seed=9).frame(0).image.astype(np.float64)
    patch = (slice(60, 200), slice(20, 236))
    assert img_on[patch].std() > 2.0 * img_off[patch].std()
    # Back to linear amplitude through the 8-bit log compression (50 dB over 255 levels): a fully
    # developed speckle envelope has std/mean = sqrt(4/pi - 1) = 0.52; smooth tissue texture on top
    # adds a little, clipping removes a little.
    amplitude = 10.0 ** (img_on[patch] * cfg_on.dynamic_range_db / 255.0 / 20.0)
    cv = amplitude.std() / amplitude.mean()
    assert 0.4 < cv < 0.8
    amplitude_off = 10.0 ** (img_off[patch] * cfg_off.dynamic_range_db / 255.0 / 20.0)
    assert amplitude_off.std() / amplitude_off.mean() < 0.3


def test_render_dataset_is_stacked_deterministic_and_traceable():
    cfg = PhantomConfig(height=128, width=128)
    ds = render_dataset(10, seed=0, config=cfg, frames_per_sequence=4)
    assert len(ds) == 10 and ds.images.shape == (10, 128, 128) and ds.images.dtype == np.uint8
    assert len(ds.boxes) == len(ds.labels) == len(ds.masks) == len(ds.target_ids) == 10
    assert len(set(ds.sequence_seeds.tolist())) == 3
    again = render_dataset(10, seed=0, config=cfg, frames_per_sequence=4)
    np.testing.assert_array_equal(ds.images, again.images)
    other = render_dataset(10, seed=1, config=cfg, frames_per_sequence=4)
    assert not set(ds.sequence_seeds.tolist()) & set(other.sequence_seeds.tolist())
    for k in (0, 9):
        f = PhantomStream(cfg, seed=int(ds.sequence_seeds[k])).frame(int(ds.frame_indices[k]))
        np.testing.assert_array_equal(f.image, ds.images[k])
        np.testing.assert_array_equal(f.masks, ds.masks[k])
        np.testing.assert_array_equal(f.boxes, ds.boxes[k])


def test_config_validation_and_round_trip():
    with pytest.raises(PhantomConfigError, match="height"):
        PhantomConfig(height=0)
    with pytest.raises(PhantomConfigError, match="n_vessels"):
        PhantomConfig(n_vessels=(3, 1))
    with pytest.raises(PhantomConfigError, match="needle_probability"):
        PhantomConfig(needle_probability=1.5)
    with pytest.raises(PhantomConfigError, match="seed"):
        PhantomStream(PhantomConfig(), seed=-1)
    with pytest.raises(PhantomConfigError, match="bogus"):
        PhantomConfig.from_dict({"bogus": 1})
    cfg = PhantomConfig(height=128, n_vessels=(2, 3))
    restored = PhantomConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert restored == cfg
    assert math.isclose(PhantomStream(restored, seed=1).timestamp(20), 1.0)
