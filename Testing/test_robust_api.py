"""Issue 13, kind 4: library API contracts (`Pipeline.process_frame`, `SamSegmenter.predict_boxes`).

Two tables: frames the pipeline refuses (the error type and the shape in the message), and box
prompts SAM must treat as invalid (empty masks, zero probabilities and IoU) next to a good box that
gives a mask, with the shipped demo models on a phantom frame whose true vessel box is known.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from UltramotionIGTLib.core.pipeline import Pipeline, PipelineConfig
from UltramotionIGTLib.errors import UnsupportedImageTypeError


@pytest.fixture(scope="module")
def pipeline(random_models) -> Pipeline:
    return Pipeline.from_paths(*random_models, config=PipelineConfig(device="cpu"))


FRAMES = [
    ("0 x 0", np.zeros((0, 0), np.uint8), "(0, 0)"),
    ("0 x N", np.zeros((0, 600), np.uint8), "(0, 600)"),
    ("1 x 600", np.zeros((1, 600), np.uint8), "1 x 600"),
    ("600 x 1 x 3", np.zeros((600, 1, 3), np.uint8), "600 x 1"),
    ("15 x 15", np.zeros((15, 15), np.uint8), "15 x 15"),
    ("meta tensor", torch.empty((64, 64), device="meta"), "meta tensor"),
    ("complex", np.zeros((64, 64), np.complex64), "complex64"),
    ("bool mask", np.zeros((64, 64), bool), "bool"),
    ("object array", np.zeros((64, 64), object), "object"),
    ("4 channels", np.zeros((64, 64, 4), np.uint8), "(64, 64, 4)"),
    ("a list", [[0] * 64] * 64, "list"),
]


@pytest.mark.parametrize("frame, shape_text", [f[1:] for f in FRAMES], ids=[f[0] for f in FRAMES])
def test_process_frame_refuses_what_is_not_an_image(pipeline, frame, shape_text) -> None:
    pipeline.reset()
    with pytest.raises(UnsupportedImageTypeError) as info:
        pipeline.process_frame(frame)
    assert isinstance(info.value, ValueError)  # also a ValueError, for plain library callers
    assert shape_text in str(info.value), str(info.value)
    assert pipeline._frame_counter == 0  # a refused frame is not counted
    result = pipeline.process_frame(np.zeros((64, 64), np.uint8)).to_host()
    assert result.frame_index == 0


@pytest.fixture(scope="module")
def sam_on_phantom():
    from UltramotionIGTLib.models.source import ModelSource
    from UltramotionIGTLib.tools.demo import demo_sequence

    _, segmenter = ModelSource.demo().load("cpu")
    _, truth = demo_sequence(1, seed=424242)
    frame = truth[0]
    vessel = int(np.flatnonzero(np.asarray(frame.labels) == 0)[0])
    segmenter.set_torch_image(torch.from_numpy(frame.image))
    return segmenter, np.asarray(frame.boxes[vessel], np.float64), frame.image.shape


def _box(name: str, good: np.ndarray, shape: tuple[int, int]) -> list[float]:
    x1, y1, x2, y2 = good.tolist()
    h, w = shape
    return {
        "reversed": [x2, y2, x1, y1],
        "reversed in x": [x2, y1, x1, y2],
        "zero area": [x1, y1, x1, y2],
        "a point": [x1, y1, x1, y1],
        "NaN": [float("nan"), y1, x2, y2],
        "infinite": [x1, y1, float("inf"), y2],
        "off the image (right)": [w + 10, y1, w + 50, y2],
        "off the image (above)": [x1, -60, x2, -10],
    }[name]


BAD_BOXES = ["reversed", "reversed in x", "zero area", "a point", "NaN", "infinite", "off the image (right)",
             "off the image (above)"]  # fmt: skip


@pytest.mark.parametrize("bad", BAD_BOXES)
def test_degenerate_boxes_are_invalid_prompts(sam_on_phantom, bad) -> None:
    segmenter, good, shape = sam_on_phantom
    boxes = torch.tensor([good.tolist(), _box(bad, good, shape)], dtype=torch.float32)
    out = segmenter.predict_boxes(boxes)
    assert out.masks.shape == (2, *shape)
    assert out.masks[0].any() and float(out.iou_scores[0]) > 0  # the good box, in the same batch
    assert not out.masks[1].any() and float(out.mask_probs[1].abs().max()) == 0.0
    assert float(out.iou_scores[1]) == 0.0
    # the good box's mask does not depend on the bad one beside it
    alone = segmenter.predict_boxes(boxes[:1])
    assert torch.equal(alone.masks[0], out.masks[0])


def test_valid_must_match_and_empty_prompts_are_n_0(sam_on_phantom) -> None:
    segmenter, good, shape = sam_on_phantom
    boxes = torch.tensor([good.tolist()] * 3, dtype=torch.float32)
    for valid in (
        torch.ones(2, dtype=torch.bool),
        torch.ones(1, dtype=torch.bool),
        [True] * 4,
        np.ones((3, 1), bool),
    ):
        with pytest.raises(ValueError, match="one bool per box"):
            segmenter.predict_boxes(boxes, valid=valid)
    out = segmenter.predict_boxes(boxes, valid=[True, False, True])
    assert out.masks[0].any() and not out.masks[1].any() and out.masks[2].any()
    for empty in ([], np.zeros((0, 4)), np.zeros(0), torch.zeros((0, 4))):
        got = segmenter.predict_boxes(empty)
        assert got.masks.shape == (0, *shape) and got.iou_scores.shape == (0,)
    with pytest.raises(ValueError, match=r"Nx4"):
        segmenter.predict_boxes([[1, 2, 3]])
    with pytest.raises(ValueError, match="Nx4 numbers"):
        segmenter.predict_boxes([[1, 2, 3, "x"]])
