"""Orchestrator building blocks: inputs, prompt selection, mask weights, packets (no models needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from UltramotionIGTLib.core.packet import HostResult, ResultPacket, SegmentTable
from UltramotionIGTLib.core.pipeline import (
    compute_mask_weights,
    confine_masks_to_boxes,
    prepare_inference_inputs,
    select_prompts,
)
from UltramotionIGTLib.errors import UnsupportedImageTypeError
from UltramotionIGTLib.tools.metrics import box_iou_np


def test_prepare_inputs_gray_rgb_and_dtypes():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (17, 19), dtype=np.uint8)
    out = prepare_inference_inputs(gray, "cpu")
    assert out.dtype == torch.uint8 and out.shape == (17, 19)
    assert np.array_equal(out.numpy(), gray)
    rgb = rng.integers(0, 256, (17, 19, 3), dtype=np.uint8)
    lum = prepare_inference_inputs(rgb, "cpu").numpy().astype(int)
    expected = np.round(rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114).astype(int)
    assert np.abs(lum - expected).max() <= 1
    as_float = prepare_inference_inputs(gray.astype(np.float32), "cpu")  # 8-bit values stored as float
    assert torch.equal(as_float, out)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((2, 3, 4, 5), np.uint8), np.zeros((4, 5, 2), np.uint8), np.zeros((4, 5), bool), "not an array"],
)
def test_prepare_inputs_rejects_non_images(bad):
    with pytest.raises(UnsupportedImageTypeError):
        prepare_inference_inputs(bad, "cpu")


def _host_select(boxes, scores, labels, budget, thr, nms, cap):
    """Reference, one detection at a time on the host, of the documented rule: above the threshold,
    not overlapped (> nms) by a higher-scoring above-threshold box of its class, at most ``cap`` per
    class, the ``budget`` best overall. Returns the chosen detection indices in score order."""
    order = [int(i) for i in np.argsort(-scores, kind="stable")]
    survivors = []
    for pos, i in enumerate(order):
        if scores[i] <= thr:
            continue
        higher = [j for j in order[:pos] if labels[j] == labels[i] and scores[j] > thr]
        if any(box_iou_np(boxes[i], boxes[j])[0, 0] > nms for j in higher):
            continue
        if cap is not None and sum(labels[j] == labels[i] for j in survivors) >= cap:
            continue
        survivors.append(i)
    return survivors[:budget]


def _greedy_nms(boxes, scores, labels, thr, nms):
    """Sequential greedy NMS per class (what the legacy path does), all survivors."""
    kept = []
    for i in np.argsort(-scores, kind="stable"):
        if scores[i] > thr and all(
            labels[j] != labels[i] or box_iou_np(boxes[i], boxes[j])[0, 0] <= nms for j in kept
        ):
            kept.append(int(i))
    return kept


def _random_detections(rng, q, num_classes):
    xy = rng.uniform(0, 100, (q, 2))
    wh = rng.uniform(5, 40, (q, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.uniform(0, 1, q).astype(np.float32)
    labels = rng.integers(0, num_classes, q)
    return boxes, scores, labels


@pytest.mark.parametrize("num_classes", [2, 80])
def test_select_prompts_matches_host_reference(num_classes):
    rng = np.random.default_rng(1)
    for trial in range(150):
        q = int(rng.integers(1, 40))
        boxes, scores, labels = _random_detections(rng, q, num_classes)
        budget = int(rng.integers(1, 12))
        cap = [None, 1, 3][trial % 3]
        sb, ss, sl, sv = select_prompts(
            torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), budget, 0.3, 0.6, cap
        )
        assert sb.shape == (budget, 4) and ss.shape == sl.shape == sv.shape == (budget,)
        assert sl.dtype == torch.int64 and sv.dtype == torch.bool
        ref = _host_select(boxes, scores, labels, budget, 0.3, 0.6, cap)
        n = int(sv.sum())
        assert sv[:n].all() and not sv[n:].any(), "valid prompts come first"
        got = [
            int(np.where((boxes == sb[r].numpy()).all(1) & (scores == ss[r].item()))[0][0]) for r in range(n)
        ]
        assert got == ref, (trial, got, ref)
        assert [int(v) for v in sl[:n]] == [int(labels[i]) for i in ref]
        assert float(ss[n:].abs().sum()) == 0.0
        # with no same-class overlap above the NMS IoU, fast NMS is greedy NMS: the legacy path's choice
        if not any(
            labels[i] == labels[j] and box_iou_np(boxes[i], boxes[j])[0, 0] > 0.6
            for i in range(q)
            for j in range(i + 1, q)
        ):
            greedy = _greedy_nms(boxes, scores, labels, 0.3, 0.6)
            if cap is None:
                assert got == greedy[:budget]


def test_select_prompts_budget_does_not_grow_with_classes():
    """80 classes and 2 classes: the same K prompt slots, the best detections whatever their class."""
    rng = np.random.default_rng(3)
    boxes, scores, _ = _random_detections(rng, 300, 2)
    for num_classes in (2, 80):
        labels = torch.from_numpy(np.arange(300) % num_classes)
        sb, ss, sl, sv = select_prompts(
            torch.from_numpy(boxes), torch.from_numpy(scores), labels, 8, 0.0, 1.0
        )
        assert sb.shape == (8, 4) and bool(sv.all())
        assert torch.equal(ss, torch.from_numpy(np.sort(scores)[::-1][:8].copy()))


def test_select_prompts_pads_when_few_queries():
    boxes = torch.tensor([[0.0, 0, 10, 10]])
    sb, ss, sl, sv = select_prompts(boxes, torch.tensor([0.9]), torch.tensor([1]), 8, 0.3, max_per_class=4)
    assert sb.shape == (8, 4) and int(sv.sum()) == 1 and int(sl[sv][0]) == 1 and bool(sv[0])


def test_compute_mask_weights_against_numpy():
    rng = np.random.default_rng(2)
    probs = rng.uniform(0, 1, (3, 12, 17)).astype(np.float32)
    scores = np.array([0.9, 0.5, 0.7], np.float32)
    valid = np.array([True, True, False])
    out = compute_mask_weights(torch.from_numpy(probs), torch.from_numpy(scores), torch.from_numpy(valid))
    w, c, a = out.weights, out.centroids, out.areas
    ys, xs = np.mgrid[0:12, 0:17]
    for i in range(2):
        wi = probs[i] * scores[i]
        np.testing.assert_allclose(w[i].numpy(), wi, rtol=1e-6)
        np.testing.assert_allclose(
            c[i].numpy(), [(wi * xs).sum() / wi.sum(), (wi * ys).sum() / wi.sum()], rtol=1e-5
        )
        np.testing.assert_allclose(a[i].item(), probs[i].sum(), rtol=1e-5)
    assert float(w[2].abs().sum()) == 0.0 and float(a[2]) == 0.0 and torch.isnan(c[2]).all()


def test_per_frame_parts_hop_only_where_declared(host_hops):
    """select_prompts and compute_mask_weights make no host hop; the frame upload and the packet's
    host copy are declared, each within its budget."""
    g = torch.Generator().manual_seed(4)
    xy = torch.rand(30, 2, generator=g) * 80
    boxes, scores = torch.cat([xy, xy + 15], dim=1), torch.rand(30, generator=g)
    labels, probs = torch.randint(0, 2, (30,), generator=g), torch.rand(8, 16, 20, generator=g)
    frame = np.random.default_rng(4).integers(0, 256, (16, 20), dtype=np.uint8)
    with host_hops() as parts:
        sb, ss, sl, sv = select_prompts(boxes, scores, labels, 8, 0.3, max_per_class=4)
        compute_mask_weights(probs, ss, sv)
    assert parts.events == [], parts
    device = torch.device("cpu")  # the pipeline's device object (the string "cpu" names the host)
    packet = _packet(np.zeros((3, 16, 20), bool), [True, False, True], [0, 1, 1], [4, -1, 5], [0.9, 0.1, 0.8])
    with host_hops() as edge:
        image = prepare_inference_inputs(frame, device)  # numpy in: one upload
        packet.masks = image[None].expand(3, -1, -1) > 128  # masks computed on the device
        packet.to_host()
    assert edge.undeclared == {}, edge
    assert edge.declared == {"frame upload (prepare_inference_inputs)": 1, "ResultPacket.to_host": 2}


def _packet(masks, valid, labels, track_ids, scores):
    k = len(valid)
    return ResultPacket(
        frame_index=3,
        image_size=masks.shape[1:],
        boxes=torch.arange(k * 4, dtype=torch.float32).reshape(k, 4),
        scores=torch.tensor(scores),
        labels=torch.tensor(labels),
        valid=torch.tensor(valid),
        masks=torch.from_numpy(masks),
        centroids=torch.zeros(k, 2),
        areas=torch.ones(k),
        track_ids=torch.tensor(track_ids),
    )


def test_packet_to_host_keeps_valid_targets_and_labelmaps():
    masks = np.zeros((3, 5, 6), bool)
    masks[0, :2] = True
    masks[1, 1:4, :3] = True
    masks[2, 4] = True
    packet = _packet(masks, [True, True, False], [0, 1, 0], [7, 2, -1], [0.9, 0.5, 0.4])
    host = packet.to_host()
    assert isinstance(host, HostResult) and len(host) == 2
    assert host.segment_names() == ["vessel-7", "needle-2"]
    np.testing.assert_array_equal(host.masks, masks[:2])
    lm = host.labelmap()
    assert lm[0, 0] == 1 and lm[3, 0] == 2 and lm[1, 0] == 1  # overlap: higher score (vessel) wins
    table = SegmentTable()
    assert table.labelmap(host)[3, 0] == 2
    host_b = _packet(masks, [False, True, True], [0, 1, 0], [7, 2, 9], [0.9, 0.5, 0.4]).to_host()
    lm_b = table.labelmap(host_b)  # needle-2 keeps value 2, vessel-9 is new -> 3
    assert lm_b[3, 0] == 2 and lm_b[4, 0] == 3
    assert [s[1] for s in table.segments()] == ["vessel-7", "needle-2", "vessel-9"]


def test_visibility_states_reach_the_host_result_labelmaps_and_overlay():
    from UltramotionIGTLib.core.packet import LOST, RELOCALIZING, SCORE_NAMES, VISIBLE
    from UltramotionIGTLib.tools.overlay import draw_overlay

    masks = np.zeros((3, 20, 24), bool)
    masks[0, 2:8, 2:8] = True
    masks[1, 10:16, 2:8] = True
    masks[2, 10:16, 12:20] = True
    packet = _packet(masks, [True, True, True], [0, 0, 1], [4, 5, 6], [0.9, 0.8, 0.7])
    packet.states = torch.tensor([VISIBLE, RELOCALIZING, LOST])
    packet.visibility = torch.linspace(0, 1, 3 * len(SCORE_NAMES)).reshape(3, len(SCORE_NAMES))
    packet.tracks = torch.tensor(
        [[4, 0, VISIBLE], [5, 0, RELOCALIZING], [6, 1, LOST], [-1, 0, LOST], [9, 1, LOST]]
    )
    host = packet.to_host()
    assert host.state_names() == ["VISIBLE", "RELOCALIZING", "LOST"]
    np.testing.assert_allclose(host.visibility, packet.visibility.numpy(), rtol=1e-6)
    assert host.tracks.tolist() == [[4, 0, 0], [5, 0, 1], [6, 1, 2], [9, 1, 2]]  # confirmed tracks only
    assert host.state_counts() == {"visible": 1, "relocalizing": 1, "lost": 2}
    assert host.shown.tolist() == [True, True, False]
    lm = host.labelmap()
    assert lm[3, 3] == 1 and lm[12, 3] == 1 and lm[12, 15] == 0  # the LOST needle is hidden
    assert SegmentTable().labelmap(host)[12, 15] == 0
    frame = np.full((20, 24), 100, np.uint8)
    rgb = draw_overlay(frame, host).astype(int)
    tinted = np.abs(rgb - 100).sum(axis=2)
    assert tinted[4, 4] > tinted[13, 4] > 0  # VISIBLE filled, RELOCALIZING dimmed (its inside)
    assert tinted[12, 16] == 0  # the LOST target's mask is not drawn
    from UltramotionIGTLib.core.kpi import FrameRecord

    record = FrameRecord.from_result(host)
    assert record.visibility == {"visible": 1, "relocalizing": 1, "lost": 2}
    assert FrameRecord.from_dict(record.to_dict()).visibility == record.visibility


def test_confine_masks_to_boxes_keeps_the_box_plus_margin_and_confident_pixels():
    h, w = 40, 50
    probs = torch.full((3, h, w), 0.7)
    probs[0, 30:, 40:] = 0.99  # confident beyond the box: kept
    probs[2] = 0.0
    masks = probs > 0.5
    boxes = torch.tensor([[10.0, 5.0, 20.0, 15.0], [0.0, 0.0, 50.0, 40.0], [float("nan"), 0.0, 5.0, 5.0]])
    out_masks, out_probs = confine_masks_to_boxes(masks, probs, boxes, margin_px=2.0, confidence=0.95)
    assert out_masks.dtype == torch.bool and out_probs.dtype == probs.dtype
    assert out_masks.shape == masks.shape and out_probs.shape == probs.shape
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    inside = (xs >= 8) & (xs <= 22) & (ys >= 3) & (ys <= 17)
    expected = inside | (probs[0].numpy() >= 0.95)
    assert np.array_equal(out_masks[0].numpy(), expected)
    assert np.array_equal(out_probs[0].numpy(), np.where(expected, probs[0].numpy(), 0.0))
    assert torch.equal(out_masks[1], masks[1]) and torch.equal(out_probs[1], probs[1])  # whole-frame box
    assert not out_masks[2].any()
    # margin 0: exactly the pixels whose centres are inside the pixel-edge box
    m0, _ = confine_masks_to_boxes(masks[:1], probs[:1] * 0 + 0.6, boxes[:1], 0.0)
    assert int(m0.sum()) == 10 * 10


def test_confine_masks_to_boxes_runs_without_host_syncs():
    from UltramotionIGTLib.tools.audit.runtime import RuntimeTransferAudit

    probs = torch.rand(6, 64, 64, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[4.0, 4.0, 30.0, 30.0]] * 6)
    with RuntimeTransferAudit("cpu") as audit:
        for i in range(3):
            with audit.frame(i):
                confine_masks_to_boxes(probs > 0.5, probs, boxes, 3.0, 0.9)
    assert audit.result.totals["undeclared"] == 0, audit.result.by_origin()


@pytest.mark.gpu
def test_confine_masks_to_boxes_on_cuda_matches_cpu_without_syncs():
    probs = torch.rand(6, 64, 64, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[4.0, 4.0, 30.0, 30.0], [10.0, 0.0, 64.0, 20.0]] * 3)
    ref = confine_masks_to_boxes(probs > 0.5, probs, boxes, 3.0, 0.9)
    dev_probs, dev_boxes = probs.cuda(), boxes.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = confine_masks_to_boxes(dev_probs > 0.5, dev_probs, dev_boxes, 3.0, 0.9)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out[0].cpu(), ref[0]) and torch.equal(out[1].cpu(), ref[1])


def test_mask_box_margin_option_reaches_the_pipeline_config():
    import argparse

    from UltramotionIGTLib.core.pipeline import PipelineConfig
    from UltramotionIGTLib.errors import UsageError
    from UltramotionIGTLib.tools.options import add_pipeline_arguments, pipeline_config_from_args

    parser = argparse.ArgumentParser(exit_on_error=False)
    add_pipeline_arguments(parser)
    parser.add_argument("--device", default="cpu")
    assert pipeline_config_from_args(parser.parse_args([])).mask_box_margin_px is None
    config = pipeline_config_from_args(
        parser.parse_args(["--mask-box-margin", "6", "--mask-outside-confidence", "0.9"])
    )
    assert config.mask_box_margin_px == 6.0 and config.mask_outside_confidence == 0.9
    with pytest.raises(UsageError, match="mask_outside_confidence"):
        pipeline_config_from_args(parser.parse_args(["--mask-outside-confidence", "0.2"]))
    with pytest.raises(ValueError, match="mask_outside_confidence"):
        PipelineConfig(mask_outside_confidence=0.2)


def test_pipeline_with_a_mask_box_margin_keeps_masks_near_their_prompts():
    from UltramotionIGTLib.core.pipeline import Pipeline, PipelineConfig
    from UltramotionIGTLib.models.packs import default_pack, load_pack
    from UltramotionIGTLib.tools.phantom import PhantomStream
    from UltramotionIGTLib.tools.training.common import demo_phantom_config

    detector, segmenter, _ = load_pack(default_pack(), device="cpu")
    frames = [PhantomStream(demo_phantom_config(), seed=s, n_frames=1).frame(0).image for s in (3, 4)]
    # an out-of-domain frame too: the phantom flipped upside down (shadows above, skin at the bottom)
    frames.append(np.ascontiguousarray(frames[0][::-1]))
    config = PipelineConfig(device="cpu", track=False, mask_box_margin_px=0.0, mask_outside_confidence=0.99)
    pipeline = Pipeline(detector, segmenter, config)
    ys, xs = np.mgrid[0:256, 0:256] + 0.5
    spilled = 0
    for image in frames:
        packet = pipeline.process_frame(image)
        boxes, valid, masks = packet.boxes, packet.valid, packet.masks.numpy()
        assert valid.any()
        sam = segmenter.segment(torch.from_numpy(image), boxes, valid=valid)  # the same SAM, unconfined
        sam_masks, sam_probs = sam.masks.numpy(), sam.mask_probs.numpy()
        for k in range(len(valid)):
            x0, y0, x1, y1 = boxes[k].tolist()
            inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
            assert np.array_equal(masks[k], sam_masks[k] & (inside | (sam_probs[k] >= 0.99)))
            spilled += int((sam_masks[k] & ~inside & (sam_probs[k] < 0.99)).sum())
    assert spilled > 0  # something was confined
