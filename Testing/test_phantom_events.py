"""Opt-in phantom events (`PhantomEvents`) and their visibility ground truth.

Each check compares the same seed with and without an event, or inside and outside its time window,
so the expected effect follows from the model (an echo loss darkens, a lateral smear removes lateral
detail, a sweep moves the scene), not from a recorded run.
"""

from __future__ import annotations

import numpy as np
import pytest

from UltramotionIGTLib.tools.phantom import (
    EVENT_KINDS,
    PhantomConfig,
    PhantomConfigError,
    PhantomEvents,
    PhantomStream,
)

CFG = PhantomConfig(height=128, width=128, spacing_mm=0.3)
#: the same without the slow background probe motion, so that a sweep is the only motion
STILL = PhantomConfig(height=128, width=128, spacing_mm=0.3, probe_speed_mm_s=0.0, probe_range_mm=0.0)


def _window(stream: PhantomStream, kind: str, until_s: float = 30.0):
    event = next(e for e in stream.events_until(until_s) if e.kind == kind)
    rate = stream.config.frame_rate_hz
    return event, int(np.ceil(event.t0 * rate)), int(np.floor(event.t1 * rate)) - 1


def test_without_events_frames_are_unchanged_and_all_visible():
    plain = PhantomStream(CFG, seed=4, n_frames=60)
    empty = PhantomStream(CFG, seed=4, n_frames=60, events=PhantomEvents())
    for i in (0, 25, 59):
        a, b = plain.frame(i), empty.frame(i)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.masks, b.masks)
        assert a.visible.all() and b.info["events"] == {} and a.visible.shape == a.target_ids.shape
    assert plain.events is None and empty.events is None


def test_events_change_nothing_outside_their_windows():
    """Contact and shadow leave the anatomy alone: before the first event the frames are identical."""
    plain = PhantomStream(CFG, seed=9, n_frames=400)
    events = PhantomStream(CFG, seed=9, n_frames=400, events=PhantomEvents(kinds=("contact", "shadow")))
    first = min(e.t0 for e in events.events_until(20.0))
    for i in range(0, int(first * CFG.frame_rate_hz), 7):
        np.testing.assert_array_equal(plain.frame(i).image, events.frame(i).image)


def test_schedule_is_deterministic_and_covers_every_kind():
    a = PhantomStream(CFG, seed=21, n_frames=300, events=PhantomEvents.all())
    b = PhantomStream(CFG, seed=21, n_frames=300, events=PhantomEvents.all())
    late = b.frame(250)  # random access first: the schedule is drawn lazily, in order
    np.testing.assert_array_equal(a.frame(250).image, late.image)
    kinds = [e.kind for e in a.events_until(12.0)]
    assert set(kinds[:4]) == set(EVENT_KINDS)
    ends = [(e.t0, e.t1) for e in a.events_until(12.0)]
    assert all(
        t1 <= next_t0 for (_, t1), (next_t0, _) in zip(ends[:-1], ends[1:], strict=True)
    )  # never overlap


def test_contact_loss_hides_every_target():
    stream = PhantomStream(CFG, seed=5, n_frames=400, events=PhantomEvents(kinds=("contact",)))
    _, start, end = _window(stream, "contact")
    before, during = stream.frame(start - 3), stream.frame((start + end) // 2)
    assert before.visible.all() and len(during.visible) and not during.visible.any()
    assert during.info["events"]["active"] == ["contact"]
    # echoes gone, noise up: the image loses its structure (row means no longer vary with depth)
    assert np.std(during.image.mean(axis=1)) < 0.5 * np.std(before.image.mean(axis=1))


def test_shadow_fades_its_vessel():
    stream = PhantomStream(
        CFG, seed=8, n_frames=400, events=PhantomEvents(kinds=("shadow",), shadow_s=(1.0, 1.0))
    )
    event, start, end = _window(stream, "shadow")
    mid = stream.frame((start + end) // 2)
    before = stream.frame(start - 2)
    assert mid.info["events"]["shadow_db"] == pytest.approx(event.params["peak_db"])
    hidden = [t for t, v in zip(mid.target_ids, mid.visible, strict=True) if not v]
    assert hidden, "the shadowed vessel must be marked not visible"
    # the tissue around the hidden vessel is much darker than before the shadow
    row = list(mid.target_ids).index(hidden[0])
    ring = mid.masks[row]
    prev_row = list(before.target_ids).index(hidden[0])
    assert mid.image[ring].mean() <= before.image[before.masks[prev_row]].mean() + 5
    box = mid.boxes[row].astype(int)
    below = slice(box[1], min(box[3] + 10, CFG.height)), slice(box[0], box[2])
    assert mid.image[below].mean() < 0.5 * before.image[below].mean()


def test_fast_motion_blurs_laterally():
    stream = PhantomStream(CFG, seed=3, n_frames=400, events=PhantomEvents(kinds=("blur",)))
    _, start, end = _window(stream, "blur")
    before, during = stream.frame(start - 2), stream.frame((start + end) // 2)
    blur_mm = during.info["events"]["blur_mm"]
    assert blur_mm >= PhantomEvents().blur_visible_mm and not during.visible.any() and before.visible.all()

    def lateral_detail(img):
        img = img.astype(np.float64)
        return np.mean(np.diff(img, axis=1) ** 2) / np.mean(np.diff(img, axis=0) ** 2)

    assert lateral_detail(during.image) < 0.5 * lateral_detail(before.image)


def test_sweep_takes_targets_out_of_view_and_back():
    """During the hold of a 12 mm sweep each vessel is where the probe offset puts it: out of view
    (not visible) when its centre left the image, visible when it stayed well inside; afterwards it is
    back, with the same id."""
    events = PhantomEvents(kinds=("sweep",), sweep_mm=(12.0, 12.0))
    left_view = 0
    for seed in range(8):
        stream = PhantomStream(STILL, seed=seed, n_frames=600, events=events)
        event, start, end = _window(stream, "sweep")
        hold = int((event.t0 + event.params["travel"] + 0.1) * STILL.frame_rate_hz)
        x0 = stream.probe_offset(stream.timestamp(start - 1))[0]
        x1 = stream.probe_offset(stream.timestamp(hold))[0]
        assert abs(x1 - x0) == pytest.approx(12.0 / STILL.spacing_mm)
        before, during, after = stream.frame(start - 1), stream.frame(hold), stream.frame(end + 2)
        shown = dict(zip(during.target_ids.tolist(), during.visible.tolist(), strict=True))
        for row, tid in enumerate(before.target_ids.tolist()):
            if tid >= 1000 or not before.visible[row]:
                continue  # needles come and go with their insertion episodes
            x_a, _, x_b, _ = before.boxes[row]
            shifted = ((x_a + x_b) / 2 - (x1 - x0), x_a - (x1 - x0), x_b - (x1 - x0))
            if not 0 <= shifted[0] < STILL.width:
                assert not shown.get(tid, False)
                left_view += 1
            elif shifted[1] > 2 and shifted[2] < STILL.width - 2:
                assert shown.get(tid, False)
            assert tid in set(after.target_ids[after.visible].tolist())
        pose = during.info["image_to_world"]
        assert pose[0, 3] == pytest.approx(x1 * STILL.spacing_mm)
    assert left_view > 0, "some vessel must leave the field of view in these sequences"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kinds", ("quake",)),
        ("gap_s", (0.0, 1.0)),
        ("visible_fraction", 0.0),
        ("exposure_s", 0.0),
        ("shadow_db", (5, 1)),
    ],
)
def test_bad_event_settings_name_the_field(field, value):
    with pytest.raises(PhantomConfigError, match=f"PhantomEvents.{field}"):
        PhantomEvents(**{field: value})
