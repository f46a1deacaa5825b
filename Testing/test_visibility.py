"""Per-target visibility on the device: weight maps, scores, state machine, sync-freedom.

Oracles: ``torch.nn.functional.max_pool2d`` / ``avg_pool2d`` for the morphology and pooling; scores
are checked on images built here whose answer is known (a sharp vs a blurred edge, a disc with and
without contrast, a disc cut in half by the image border, a mask that moves with a known pose).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from UltramotionIGTLib.core.pipeline import compute_mask_weights
from UltramotionIGTLib.core.visibility import (
    LOST,
    RELOCALIZING,
    SCORE_NAMES,
    STATE_NAMES,
    VISIBLE,
    SlotStates,
    VisibilityConfig,
    VisibilityMonitor,
    advance_states,
    analysis_stride,
    mask_region_maps,
    max_filter,
    pool_to_grid,
)
from UltramotionIGTLib.tools.audit.runtime import RuntimeTransferAudit

S = {name: i for i, name in enumerate(SCORE_NAMES)}


@pytest.mark.parametrize(("rx", "ry"), [(1, 1), (2, 3), (5, 0), (0, 4), (7, 7)])
def test_max_filter_is_a_stride_one_max_pool(rx, ry):
    x = torch.rand(3, 31, 44, generator=torch.Generator().manual_seed(rx * 10 + ry))
    ref = F.max_pool2d(x[:, None], (2 * ry + 1, 2 * rx + 1), 1, (ry, rx))[:, 0]
    assert torch.equal(max_filter(x, rx, ry), ref)
    assert torch.equal(max_filter(x > 0.9, rx, ry), ref > 0.9)


@pytest.mark.parametrize("stride", [1, 2, 3, 4])
def test_pool_to_grid_is_a_ceil_mode_average_pool(stride):
    x = torch.rand(2, 37, 50, generator=torch.Generator().manual_seed(stride))
    ref = F.avg_pool2d(x[:, None], stride, stride, ceil_mode=True)[:, 0]
    torch.testing.assert_close(pool_to_grid(x, stride), ref)
    assert analysis_stride((256, 256), 96) == 3 and analysis_stride((64, 40), 96) == 1


def _disc(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r


def test_region_maps_widths_are_in_millimetres():
    """The same 4 mm disc at 0.25 and 0.5 mm per pixel gives the same band and ring areas in mm^2."""
    areas = []
    for spacing in (0.25, 0.5):
        n = int(round(20 / spacing))
        disc = torch.from_numpy(_disc(n, n, n / 2, n / 2, 4.0 / spacing))[None]
        edge, inside, outside = mask_region_maps(disc, (spacing, spacing), edge_mm=1.0, ring_mm=2.0)
        px = spacing * spacing
        areas.append([float(m.sum()) * px for m in (edge, inside, outside)])
        assert not (edge & inside).any() and not (edge & outside).any() and not (inside & outside).any()
        assert bool((inside <= disc).all()) and bool(((disc & ~inside) <= edge).all())
    (e1, i1, o1), (e2, i2, o2) = areas
    # square structuring elements: band ~ area(square of side 2r+2e around) - inner; compare the two grids
    assert abs(e1 - e2) / e1 < 0.15 and abs(i1 - i2) / i1 < 0.15 and abs(o1 - o2) / o1 < 0.15
    assert i1 < math.pi * 16 < i1 + e1  # the disc's true area lies between W_in and W_in + W_edge


def test_thin_mask_keeps_an_inside():
    needle = torch.zeros(1, 40, 40, dtype=torch.bool)
    needle[0, 20, 5:35] = True
    edge, inside, _ = mask_region_maps(needle, (0.5, 0.5), 1.0, 1.0)
    assert torch.equal(inside, needle) and bool(edge[0, 20, 20])


def test_compute_mask_weights_returns_grid_maps_zero_for_invalid_targets():
    probs = torch.zeros(3, 64, 64)
    probs[0] = torch.from_numpy(_disc(64, 64, 32, 32, 10)).float()
    probs[1] = probs[0]
    out = compute_mask_weights(
        probs, torch.tensor([0.9, 0.8, 0.1]), torch.tensor([True, False, False]), (0.5, 0.5), 1.0, 2.0, 2
    )
    assert out.regions.shape == (3, 3, 32, 32) and out.masks_grid.shape == (3, 32, 32)
    assert out.stride == 2 and out.grid_spacing == (1.0, 1.0)
    assert float(out.w_edge[0].sum()) > 0 and float(out.w_in[0].sum()) > 0 and float(out.w_out[0].sum()) > 0
    assert float(out.regions[:, 1:].abs().sum()) == 0.0  # invalid rows: no maps
    torch.testing.assert_close(out.centroids[0], torch.tensor([31.5, 31.5]))


# -- state machine ---------------------------------------------------------------------------------


def _run(
    config: VisibilityConfig, good: list[bool], keep: list[bool] | None = None, seen: list[bool] | None = None
):
    """States of one slot, born on the first frame, over frames of good/bad evidence."""
    n = len(good)
    keep = keep if keep is not None else good
    seen = seen if seen is not None else [True] * n
    st = SlotStates.fresh(1, "cpu")
    out = []
    for i in range(n):
        quality = 0.9 if good[i] else (0.5 * (config.theta_on + config.theta_off) if keep[i] else 0.0)
        st = advance_states(
            st,
            torch.tensor([seen[i]]),
            torch.tensor([0.9]),
            torch.tensor([quality]),
            torch.tensor([0.9]),
            torch.tensor([i == 0]),
            config,
        )
        out.append(int(st.state[0]))
    return out


def test_state_machine_transitions_and_hysteresis():
    cfg = VisibilityConfig(on_frames=2, off_frames=2, lost_frames=5, min_dwell=2)
    V, R, L = VISIBLE, RELOCALIZING, LOST
    # good first frame: born VISIBLE; two bad frames: RELOCALIZING; five: LOST; seen again: back
    states = _run(cfg, [True, True, True] + [False] * 6 + [True] * 5)
    assert states == [V, V, V, V, R, R, R, L, L, R, R, V, V, V]
    # quality between theta_off and theta_on: VISIBLE stays VISIBLE, RELOCALIZING stays RELOCALIZING
    held = _run(cfg, [True] * 3 + [False] * 4, keep=[True] * 7)
    assert held == [V] * 7
    # a new track whose first frames are poor starts RELOCALIZING and needs on_frames good frames
    assert _run(cfg, [False, True, True, True]) == [R, R, V, V]


def test_no_state_is_held_for_a_single_frame():
    cfg = VisibilityConfig(on_frames=1, off_frames=1, lost_frames=3, min_dwell=2)
    rng = np.random.default_rng(0)
    for _ in range(20):
        good = list(rng.random(60) < 0.5)
        states = _run(cfg, good, seen=list(rng.random(60) < 0.8))
        runs = [len(list(g)) for _, g in __import__("itertools").groupby(states)]
        assert min(runs[1:-1] or [2]) >= 2, states


# -- scores on known images ---------------------------------------------------------------------------


def _scene(
    blur: int = 0, contrast: float = 1.0, seed: int = 0, shift: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A speckle-like textured frame with a dark disc (a vessel) at (40 + shift, 48), and its mask."""
    rng = np.random.default_rng(seed)
    tex = 120 + 40 * rng.standard_normal((96, 96))
    disc = _disc(96, 96, 40 + shift, 48, 14)
    img = np.where(disc, 120 - 100 * contrast, 0) + np.where(disc, 10 * rng.standard_normal((96, 96)), tex)
    if blur:
        kernel = np.ones(blur) / blur
        img = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="same"), 1, img)
    return torch.from_numpy(np.clip(img, 0, 255).astype(np.uint8)), torch.from_numpy(disc)


def _scores(monitor, image, mask, box, spacing=(0.5, 0.5), pose=None, slot=0, born=False):
    probs = mask.to(torch.float32)[None]
    weights = compute_mask_weights(
        probs,
        torch.tensor([0.9]),
        torch.tensor([True]),
        spacing,
        monitor.config.edge_mm,
        monitor.config.ring_mm,
        1,
    )
    born_t = torch.zeros(monitor.max_tracks, dtype=torch.bool)
    if slot < monitor.max_tracks:
        born_t[slot] = born
    return monitor.update(
        image,
        weights.masks_grid,
        weights.regions,
        1,
        torch.tensor([box], dtype=torch.float32),
        torch.tensor([0.9]),
        torch.tensor([True]),
        det_slot=torch.tensor([slot]),
        born=born_t,
        spacing=spacing,
        pose=pose,
    )


def test_sharpness_contrast_and_truncation_scores():
    monitor = VisibilityMonitor(4, "cpu")
    sharp_img, mask = _scene()
    box = [26.0, 34.0, 54.0, 62.0]
    base = _scores(monitor, sharp_img, mask, box, born=True).scores[0]
    blurred = _scores(VisibilityMonitor(4, "cpu"), _scene(blur=9)[0], mask, box, born=True).scores[0]
    flat = _scores(VisibilityMonitor(4, "cpu"), _scene(contrast=0.0)[0], mask, box, born=True).scores[0]
    assert float(blurred[S["S1_sharpness"]]) < 0.75 * float(base[S["S1_sharpness"]])
    assert float(flat[S["S2_snr"]]) < 0.5 * float(base[S["S2_snr"]])
    assert float(base[S["S3_continuity"]]) > 0.95 and float(base[S["C1_geometry"]]) > 0.95
    # the same disc half out of the field of view (cut through its centre): truncation term 0.5
    half = mask.clone()
    half[:, :40] = False
    cut_image = sharp_img[:, 40:].contiguous()
    cut = _scores(
        VisibilityMonitor(4, "cpu"), cut_image, half[:, 40:].contiguous(), [0.0, 34.0, 14.0, 62.0], born=True
    )
    assert 0.35 < float(cut.scores[0, S["S3_continuity"]]) < 0.65
    # a fragmented mask (every other column removed) is not continuous
    broken = mask.clone()
    broken[:, ::3] = False
    frag = _scores(VisibilityMonitor(4, "cpu"), sharp_img, broken, box, born=True)
    assert float(frag.scores[0, S["S3_continuity"]]) < 0.8
    assert all(0.0 <= float(v) <= 1.0 for v in base)


def test_stability_and_motion_scores_follow_the_probe_pose():
    """A target that moves 8 px (4 mm) between frames: without a pose S4/C3 see a jump; with the
    probe pose that explains the motion they do not."""
    spacing = (0.5, 0.5)
    img0, mask0 = _scene(seed=1)
    img1, mask1 = _scene(seed=1, shift=8)
    box0, box1 = [26.0, 34.0, 54.0, 62.0], [34.0, 34.0, 62.0, 62.0]
    results = {}
    for name, poses in (("image", (None, None)), ("pose", (np.eye(4), None))):
        monitor = VisibilityMonitor(2, "cpu")
        p0 = poses[0]
        p1 = None
        if p0 is not None:
            # the scene moved +4 mm in x in the image: the probe moved -4 mm in the reference frame
            p1 = np.eye(4)
            p1[0, 3] = -4.0
        _scores(monitor, img0, mask0, box0, spacing, pose=p0, born=True)
        results[name] = _scores(monitor, img1, mask1, box1, spacing, pose=p1).scores[0]
    assert float(results["image"][S["S4_stability"]]) < 0.7 and float(results["image"][S["C3_motion"]]) < 0.3
    assert float(results["pose"][S["S4_stability"]]) > 0.95 and float(results["pose"][S["C3_motion"]]) > 0.95
    assert float(results["pose"][S["C2_coherence"]]) > float(results["image"][S["C2_coherence"]])


def test_states_follow_tracker_slots_and_rows_without_slot():
    monitor = VisibilityMonitor(3, "cpu", VisibilityConfig(on_frames=1, min_dwell=1))
    img, mask = _scene()
    box = [26.0, 34.0, 54.0, 62.0]
    first = _scores(monitor, img, mask, box, slot=1, born=True)
    assert int(first.states[0]) == VISIBLE and int(first.slot_states[1]) == VISIBLE
    # a noise frame on the same slot: quality collapses, the slot leaves VISIBLE
    noise = torch.from_numpy(np.random.default_rng(3).integers(0, 255, (96, 96), dtype=np.uint8))
    second = _scores(monitor, noise, mask, box, slot=1)
    assert int(second.slot_states[1]) != VISIBLE and float(second.scores[0, S["C2_coherence"]]) < 0.3
    # a row the tracker could not place (slot = M) gets the instantaneous state
    third = _scores(monitor, img, mask, box, slot=3)
    assert int(third.states[0]) in (VISIBLE, RELOCALIZING)
    assert STATE_NAMES[VISIBLE] == "VISIBLE"


def test_visibility_stage_has_no_host_sync(host_hops):
    monitor = VisibilityMonitor(4, "cpu")
    img, mask = _scene()
    probs = torch.zeros(4, 96, 96)
    probs[0] = mask.float()
    valid = torch.tensor([True, False, False, False])
    boxes = torch.tensor([[26.0, 34.0, 54.0, 62.0]] * 4)
    scores = torch.full((4,), 0.9)
    det_slot = torch.tensor([0, 4, 4, 4])
    born = [torch.tensor([i == 0, False, False, False]) for i in range(3)]
    # the pipeline's tensors are on the device already; the pose arrives on the host (declared upload)
    with host_hops(img, probs, valid, boxes, scores, det_slot, *born) as hops:
        for i in range(3):
            weights = compute_mask_weights(probs, scores, valid, (0.5, 0.5), 0.8, 1.6, 2)
            monitor.update(
                img,
                weights.masks_grid,
                weights.regions,
                2,
                boxes,
                scores,
                valid,
                det_slot=det_slot,
                born=born[i],
                spacing=(0.5, 0.5),
                pose=np.eye(4),
            )
    assert hops.undeclared == {}, hops
    assert hops.declared["visibility: the frame's probe pose and its inverse"] == 6  # 2 per frame


# -- the evaluation's metrics on hand-made logs ---------------------------------------------------------


def _log(truth: list[bool], pred_states: list[int | None]):
    """One target (id 0), frames where it is visible or not, and the state of its matched row (None:
    no row). Its track sits in slot 0 with id 0."""
    from UltramotionIGTLib.tools.visibility_eval import FrameLog, SequenceLog

    frames = []
    for visible, state in zip(truth, pred_states, strict=True):
        rows = 0 if state is None else 1
        frames.append(
            FrameLog(
                gt_ids=np.array([0]),
                gt_labels=np.array([0]),
                gt_boxes=np.array([[0.0, 0, 10, 10]], np.float32),
                gt_visible=np.array([visible]),
                events=[],
                labels=np.zeros(rows, np.int64),
                boxes=np.tile(np.array([[0.0, 0, 10, 10]], np.float32), (rows, 1)),
                confidences=np.full(rows, 0.9, np.float32),
                track_ids=np.zeros(rows, np.int64),
                states=np.full(rows, state if state is not None else 0, np.int64),
                scores=np.zeros((rows, len(SCORE_NAMES)), np.float32),
                slots=np.zeros(rows, np.int64),
                slot_ids=np.array([0]),
                born=np.array([False]),
                slot_states=np.array([state if state is not None else RELOCALIZING]),
                match=np.array([0 if rows else -1]),
            )
        )
    return SequenceLog(seed=0, frames=frames, max_tracks=1, ms_per_frame=0.0)


def test_evaluation_metrics_on_hand_made_logs():
    from UltramotionIGTLib.tools.visibility_eval import evaluate_logs, single_frame_states

    V, R = VISIBLE, RELOCALIZING
    truth = [True] * 5 + [False] * 5 + [True] * 5
    pred = [V, V, V, V, V, V, R, R, R, R, R, V, V, V, V]  # leaves VISIBLE 1 frame late, returns 1 late
    report = evaluate_logs([_log(truth, pred)])
    assert report["agreement"] == pytest.approx(13 / 15)
    assert report["switches"] == 2 and report["switches_within_3"] == 1.0 and report["switch_frames_max"] == 1
    assert report["flicker_track_states"] == 0
    late = [V] * 5 + [R] * 10  # leaves on time, never comes back: that switch is missing
    assert evaluate_logs([_log(truth, late)])["switches_within_3"] == 0.5
    # a missed detection for one frame reads as a single not-visible frame of the target
    gap = [V, V, None, V, V]
    assert evaluate_logs([_log([True] * 5, gap)])["flicker_target_visibility"] == 1
    assert single_frame_states([0, 0, 1, 0, 0, 1, 1]) == 1 and single_frame_states([0, 1]) == 0


def test_pipeline_with_scores_pose_and_tracking_makes_no_undeclared_host_sync():
    """The whole frame (shipped demo models, tracker on, spacing and probe pose given, phantom frames
    with events) under the runtime audit: every hop is the declared one of ``to_host()``."""
    from UltramotionIGTLib.core.pipeline import Pipeline, PipelineConfig
    from UltramotionIGTLib.models.packs import default_pack, load_pack
    from UltramotionIGTLib.tools.visibility_eval import event_stream

    detector, segmenter, _ = load_pack(default_pack(), device="cpu")
    pipeline = Pipeline(detector, segmenter, PipelineConfig(device="cpu"))
    assert pipeline.config.visibility.enabled and pipeline.tracker is not None
    stream = event_stream(seed=3, n_frames=8)
    spacing = (stream.config.spacing_mm, stream.config.spacing_mm)
    states_seen = 0
    with RuntimeTransferAudit("cpu") as audit:
        for i in range(len(stream)):
            truth = stream.frame(i)
            with audit.frame(i):
                packet = pipeline.process_frame(
                    truth.image, i, truth.timestamp, spacing=spacing, pose=truth.info["image_to_world"]
                )
                result = packet.to_host()
            assert result.states is not None and result.visibility.shape == (len(result), len(SCORE_NAMES))
            states_seen += len(result)
    assert states_seen > 0  # targets were found, so the scores ran on real masks
    frames = audit.result.frames
    assert len(frames) == len(stream)
    assert [f.undeclared for f in frames] == [0] * len(stream), audit.result.by_origin()
    assert all(f.declared > 0 for f in frames)  # to_host()'s declared copies are seen, so the count works


@pytest.mark.parametrize("bad", [["--threads", "0"], ["--frames", "1"], ["--sequences", "0"]])
def test_evaluate_visibility_rejects_bad_options_in_one_line(bad, capsys):
    from UltramotionIGTLib.tools.cli import main as cli_main

    threads = torch.get_num_threads()
    assert cli_main(["evaluate-visibility", *bad]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "evaluate-visibility" in err and "Traceback" not in err
    assert torch.get_num_threads() == threads  # refused before it touched the process's settings
