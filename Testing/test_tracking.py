"""Tracker: stable ids on jittered and synthetic-phantom sequences, hysteresis, and no host hops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from UltramotionIGTLib.core.tracking import Tracker

K = 8  # detection slots per frame, as the pipeline uses (max_targets_per_class x classes)


def _frame(dets: list[tuple[np.ndarray, int, float]], rng: np.random.Generator, k: int = K):
    """Pack (box XYXY, label, score) detections into fixed-size tensors in a shuffled order."""
    order = rng.permutation(k)
    boxes = torch.zeros(k, 4)
    labels = torch.zeros(k, dtype=torch.int64)
    scores = torch.zeros(k)
    valid = torch.zeros(k, dtype=torch.bool)
    slot_of = []
    for n, (box, label, score) in enumerate(dets):
        s = int(order[n])
        boxes[s] = torch.as_tensor(box, dtype=torch.float32)
        labels[s], scores[s], valid[s] = label, score, True
        slot_of.append(s)
    return boxes, scores, labels, valid, slot_of


def _run(tracker: Tracker, frames, rng):
    """frames: list of lists of (gt_id or None, box, label). Returns {gt_id: [track id per frame seen]}."""
    seen: dict[int, list[int]] = {}
    false_positive_ids = []
    for dets in frames:
        boxes, scores, labels, valid, slot_of = _frame([(b, lab, 0.9) for _, b, lab in dets], rng)
        ids = tracker.update(boxes, scores, labels, valid).tolist()
        assert all(ids[s] == -1 for s in range(K) if not valid[s])
        for (gt, _, _), s in zip(dets, slot_of, strict=True):
            if gt is None:
                false_positive_ids.append(ids[s])
            else:
                seen.setdefault(gt, []).append(ids[s])
    return seen, false_positive_ids


def _jittered_sequence(rng: np.random.Generator, n_frames: int = 80, dropout: float = 0.1):
    # four targets; 0 (class 0) and 1 (class 1) cross each other around frame 40
    starts = {0: (20.0, 100.0), 1: (180.0, 100.0), 2: (60.0, 30.0), 3: (150.0, 170.0)}
    speed = {0: (2.0, 0.0), 1: (-2.0, 0.0), 2: (0.5, 0.3), 3: (-0.3, 0.0)}
    size = {0: (30.0, 24.0), 1: (28.0, 26.0), 2: (16.0, 40.0), 3: (22.0, 22.0)}
    label = {0: 0, 1: 1, 2: 1, 3: 0}
    frames = []
    for f in range(n_frames):
        dets = []
        for t in starts:
            if f > 2 and rng.random() < dropout:  # missed detection
                continue
            cx = starts[t][0] + speed[t][0] * f + rng.normal(0, 1.5)
            cy = starts[t][1] + speed[t][1] * f + rng.normal(0, 1.5)
            w, h = size[t][0] + rng.normal(0, 1.0), size[t][1] + rng.normal(0, 1.0)
            dets.append((t, np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]), label[t]))
        if f in (10, 47):  # one-frame false positives
            dets.append((None, np.array([200.0, 5.0, 215.0, 20.0]), 0))
        frames.append(dets)
    return frames


def _assert_stable(seen: dict[int, list[int]], min_tracked: float = 0.9):
    final = {}
    for gt, ids in seen.items():
        tracked = [i for i in ids if i >= 0]
        assert len(set(tracked)) == 1, f"target {gt} changed track id: {ids}"
        assert len(tracked) >= min_tracked * len(ids), f"target {gt} untracked too often: {ids}"
        final[gt] = tracked[0]
    assert len(set(final.values())) == len(final), f"two targets share an id: {final}"


def test_ids_stable_through_jittered_sequence_with_crossing_and_dropouts():
    rng = np.random.default_rng(1)
    tracker = Tracker(max_tracks=16, iou_gate=0.1, min_hits=2, max_misses=5, device="cpu")
    seen, fps = _run(tracker, _jittered_sequence(rng), rng)
    _assert_stable(seen)
    assert fps and all(i == -1 for i in fps)  # a single-frame false positive never gets an id
    # ids were handed out only to the four real targets
    assert int(tracker.next_id) == 4


def test_births_need_min_hits_consecutive_matches():
    rng = np.random.default_rng(2)
    tracker = Tracker(max_tracks=4, min_hits=3, device="cpu")
    box = np.array([10.0, 10.0, 40.0, 40.0])
    got = [_run(tracker, [[(0, box, 0)]], rng)[0][0][0] for _ in range(2)]
    assert got == [-1, -1]
    _run(tracker, [[]], rng)  # a miss while tentative: the track is dropped
    got = [_run(tracker, [[(0, box, 0)]], rng)[0][0][0] for _ in range(4)]
    assert got == [-1, -1, 0, 0]


def test_deaths_after_max_misses_and_ids_never_reused():
    rng = np.random.default_rng(3)
    tracker = Tracker(max_tracks=4, min_hits=2, max_misses=3, device="cpu")
    box = np.array([50.0, 50.0, 80.0, 90.0])
    seq = [[(0, box, 1)]] * 3 + [[]] * 2 + [[(0, box, 1)]] * 2  # gap of 2 < 3: same id
    seen, _ = _run(tracker, seq, rng)
    assert seen[0] == [-1, 0, 0, 0, 0]
    seq = [[]] * 3 + [[(0, box, 1)]] * 3  # gap of 3: the track died; a new one gets a new id
    seen, _ = _run(tracker, seq, rng)
    assert seen[0] == [-1, 1, 1]
    tracker.reset()
    seen, _ = _run(tracker, [[(0, box, 1)]] * 2, rng)
    assert seen[0] == [-1, 0]


def test_class_forbids_association():
    rng = np.random.default_rng(4)
    tracker = Tracker(max_tracks=4, min_hits=1, device="cpu")
    box = np.array([0.0, 0.0, 30.0, 30.0])
    seen, _ = _run(tracker, [[(0, box, 0)], [(0, box, 0)], [(1, box + 1, 1)]], rng)
    assert seen[0] == [0, 0] and seen[1] == [1]


def test_more_detections_than_track_slots():
    """K > max_tracks: the assignment is solved with tracks as rows; extra births are dropped."""
    tracker = Tracker(max_tracks=3, min_hits=1, device="cpu")
    boxes = torch.tensor([[i * 50.0, 0.0, i * 50.0 + 30.0, 30.0] for i in range(6)])
    scores = torch.tensor([0.1, 0.9, 0.5, 0.8, 0.2, 0.3])
    labels = torch.zeros(6, dtype=torch.int64)
    valid = torch.ones(6, dtype=torch.bool)
    first = tracker.update(boxes, scores, labels, valid)
    assert sorted(first.tolist()) == [-1, -1, -1, 0, 1, 2]
    assert set(torch.argsort(-scores)[:3].tolist()) == {i for i, t in enumerate(first.tolist()) if t >= 0}
    second = tracker.update(boxes + 2.0, scores, labels, valid)
    assert second.tolist() == first.tolist()


def test_update_makes_no_host_hop(host_hops):
    rng = np.random.default_rng(5)
    tracker = Tracker(max_tracks=32, device="cpu")
    frames = [
        _frame([(np.array([10.0, 10, 40, 40]) + f, 0, 0.9), (np.array([90.0, 60, 120, 99]), 1, 0.7)], rng)
        for f in range(6)
    ]
    with host_hops() as hops:
        for boxes, scores, labels, valid, _ in frames:
            ids = tracker.update(boxes, scores, labels, valid)
    assert hops.events == [], f"host hops in Tracker.update: {hops}"
    assert sorted(ids.tolist()) == [-1] * (K - 2) + [0, 1]


def test_phantom_targets_keep_one_track_id():
    """Ground truth of the synthetic phantom + box noise, dropouts and false positives."""
    from UltramotionIGTLib.tools import phantom as synthetic

    stream = synthetic.PhantomStream(synthetic.PhantomConfig(height=128, width=128), seed=3, n_frames=90)
    rng = np.random.default_rng(6)
    frames = []
    for frame in stream:
        dets = []
        for box, label, gt in zip(frame.boxes, frame.labels, frame.target_ids, strict=True):
            if frame.index > 2 and rng.random() < 0.1:
                continue
            noisy = box.astype(np.float64) + rng.normal(0.0, 1.0, 4)
            dets.append((int(gt), noisy, int(label)))
        if frame.index in (20, 61):
            dets.append((None, np.array([2.0, 100.0, 12.0, 110.0]), 1))
        frames.append(dets)
    assert len({gt for dets in frames for gt, _, _ in dets if gt is not None}) >= 2
    tracker = Tracker(max_tracks=32, device="cpu")
    seen, fps = _run(tracker, frames, rng)
    _assert_stable(seen, min_tracked=0.85)
    assert all(i == -1 for i in fps)


@pytest.mark.gpu
def test_cuda_update_without_sync():
    rng = np.random.default_rng(7)
    tracker = Tracker(device="cuda", cuda_graph=False)  # the eager update, kernel by kernel
    frames = [
        tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in f)
        for f in (_frame([(np.array([10.0, 10, 40, 40]) + i, 0, 0.9)], rng) for i in range(5))
    ]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for boxes, scores, labels, valid, _ in frames:
            ids = tracker.update(boxes, scores, labels, valid)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert ids.is_cuda and sorted(ids.tolist())[-1] == 0


@pytest.mark.gpu
def test_cuda_graph_mode_gives_the_same_ids_without_sync():
    rng = np.random.default_rng(8)
    frames = [
        tuple(t.cuda() for t in _frame([(b, lab, 0.9) for _, b, lab in dets], rng)[:4])
        for dets in _jittered_sequence(rng, n_frames=40)
    ]
    eager = Tracker(device="cuda", cuda_graph=False)
    graphed = Tracker(device="cuda")  # the default on CUDA: one graph replay per frame
    assert graphed.cuda_graph and not Tracker(device="cpu").cuda_graph
    first = graphed.update(*frames[0])  # captures the graph (capture itself synchronises)
    assert torch.equal(first, eager.update(*frames[0]))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [graphed.update(*f) for f in frames[1:]]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    want = [eager.update(*f) for f in frames[1:]]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    graphed.reset()
    eager.reset()
    assert torch.equal(graphed.update(*frames[0]), eager.update(*frames[0]))
    assert int(graphed.next_id) == int(eager.next_id)
