"""The module's self-test scenario (`UltramotionIGTTest.test_LiveSyntheticStream` in
UltramotionIGT/UltramotionIGT.py), run in pytest against slicer-core (real MRML, no Qt).

The module's logic maps its parameter node to the library's `SessionController` and copies state and
indicator texts back; this test drives that same controller step by step, with the same synthetic
stream, geometry, producer pattern and checks as the self-test. The live session runs the pipeline
on its worker thread: each step waits for it (``step(wait=...)``), so the checks are deterministic. Testing/test_slicer_module.py runs
the self-test itself, with the real logic, on Slicer's Python layer (../shared/slicer-python).
"""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (pip install slicer-core) provides MRML")
vtk = pytest.importorskip("vtk")

from UltramotionIGTLib.slicer import mrml  # noqa: E402
from UltramotionIGTLib.slicer.indicators import PathState, status_light  # noqa: E402
from UltramotionIGTLib.tools import doctor  # noqa: E402
from UltramotionIGTLib.tools.phantom import VESSEL_LABEL, PhantomStream  # noqa: E402

#: Seconds a step may wait for the live session's worker to finish a frame (CPU pipeline).
WAIT = 120.0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The shipped demo models when present (then segment content is checked against the phantom's
    ground truth), else small random models in the real formats (geometry and bookkeeping only)."""
    shipped = doctor.default_models()
    if shipped["detector"] is not None and shipped["sam"] is not None:
        return shipped["detector"], shipped["sam"], "auto", True
    from UltramotionIGTLib.core.detector import write_random_detector
    from UltramotionIGTLib.core.sam import write_random_sam_checkpoint

    out = tmp_path_factory.mktemp("scenario_models")
    det = write_random_detector(out / "detector", image_size=128, seed=0)
    sam = write_random_sam_checkpoint(out / "sam" / "sam.safetensors", model_type="vit_t_demo", seed=0)
    return det, sam, "vit_t_demo", False


@pytest.fixture()
def context():
    ctx = mrml.create_standalone_context()
    yield ctx
    ctx.close()


def check_segments(segmentation_node, volume_node, result):
    """As `UltramotionIGTTest._checkSegments`: one segment per tracked target (one per class for the
    untracked detections), its voxels are the segment's mask, its image-to-world matrix is the volume's IJK-to-RAS, so each mask voxel lands on the RAS
    point of the frame voxel it labels."""
    segments = result.segments()
    names = [name for name, _, _ in segments]
    segmentation = segmentation_node.GetSegmentation()
    assert sorted(segmentation.GetSegmentIDs()) == sorted(names)
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    expected = np.array([[ijk_to_ras.GetElement(i, j) for j in range(4)] for i in range(4)])
    h, w = result.image_size
    for name, _, mask in segments:
        labelmap = segmentation.GetSegment(name).GetRepresentation("Binary labelmap")
        image_to_world = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(image_to_world)
        got = np.array([[image_to_world.GetElement(i, j) for j in range(4)] for i in range(4)])
        np.testing.assert_allclose(got, expected, atol=1e-9)
        assert labelmap.GetExtent() == (0, w - 1, 0, h - 1, 0, 0)
        scalars = vtk.util.numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
        np.testing.assert_array_equal(scalars.reshape(h, w) > 0, mask)
        # RAS of a labelled voxel == RAS of the frame voxel under it
        ys, xs = np.nonzero(mask)
        if len(xs):
            ijk = np.stack([xs, ys, np.zeros_like(xs), np.ones_like(xs)]).astype(float)
            np.testing.assert_allclose(got @ ijk, expected @ ijk, atol=1e-9)


def test_module_self_test_scenario_on_slicer_core(context, models):
    import vtk.util.numpy_support  # noqa: F401 - used by check_segments

    from UltramotionIGTLib.core.pipeline import PipelineConfig
    from UltramotionIGTLib.models.source import ModelSource
    from UltramotionIGTLib.slicer.controller import SessionController
    from UltramotionIGTLib.slicer.sessions import SessionState

    detector, sam, sam_type, trained = models
    scene = context.scene
    stream = PhantomStream(seed=3, n_frames=8)
    geometry = mrml.FrameGeometry.from_spacing_origin_directions(
        (0.2, 0.3, 1.0),
        (12.0, -40.0, 7.5),
        ((0, 1, 0), (-1, 0, 0), (0, 0, 1)),
        stream.frame(0).image.shape,
    )
    volume = mrml.new_volume_node(scene, stream.frame(0).image, geometry, name="US image")

    # logic.start: models and settings from the parameter node, no output selected yet
    controller = SessionController()
    config = PipelineConfig(device="cpu", score_threshold=0.3 if trained else 0.0, max_targets_per_class=4)
    statuses: list[str] = []
    controller.start(
        volume, None, ModelSource(detector, sam, sam_type), config, "live", status_callback=statuses.append
    )
    assert controller.running and controller.state == SessionState.RUNNING
    segmentation_node = controller.output_node
    assert segmentation_node.GetName() == "US image segmentation" and segmentation_node.GetScene() is scene
    assert controller.step(wait=WAIT)  # the frame already in the input is processed first
    assert controller.last_result.frame_index == 0

    # a producer faster than inference: two new frames per timer tick, the newest is processed
    results = []
    for step in range(3):
        newest = 2 * step + 2
        for k in (newest - 1, newest):
            mrml.write_frame_to_volume(volume, stream.frame(k).image)
        assert controller.step(wait=WAIT) is True  # its copy goes to the worker; the result is written
        assert controller.step(wait=WAIT) is False  # nothing left: no queue
        result = controller.last_result
        results.append(result)
        assert result.frame_index == newest
        assert result.image_size == stream.frame(newest).image.shape
        check_segments(segmentation_node, volume, result)
        if trained:
            truth = stream.frame(newest)
            for label, mask in zip(truth.labels, truth.masks, strict=True):
                if int(label) == VESSEL_LABEL:
                    dice = [2.0 * (m & mask).sum() / (m.sum() + mask.sum()) for m in result.masks]
                    assert max(dice, default=0.0) >= 0.5
    session = controller.session
    assert (session.frames_received, session.frames_processed, session.frames_dropped) == (7, 4, 3)
    if not trained:
        assert any(len(r) for r in results), "with threshold 0 the random models must propose targets"

    # the indicators the widget shows (logic.indicatorTexts)
    texts = controller.indicator_texts()
    assert "4 processed" in texts["panel"] and "3 of 7 received" in texts["panel"]
    assert "frame #6" in texts["panel"]
    for stage in ("detector", "sam_decoder", "mrml"):
        assert f"  {stage}" in texts["panel"]
    snap = controller.snapshot()
    assert snap.device == "cpu" and snap.path == "gpu_resident"
    assert status_light(snap).state is PathState.CPU
    assert texts["corner"].startswith("CPU | ") and "drop 3" in texts["corner"]

    # a second start reuses the loaded pipeline (same models and device), with the new thresholds
    pipeline = controller.pipeline
    controller.start(volume, segmentation_node, ModelSource(detector, sam, sam_type), config, "live")
    assert controller.pipeline is pipeline and controller.session is not session
    assert session.done and "stopped" in session.status_message

    # deleting the input mid-stream stops processing with a status; no exception escapes
    assert controller.step(wait=WAIT)
    mrml.write_frame_to_volume(volume, stream.frame(7).image)
    scene.RemoveNode(volume)
    assert controller.step() is False
    assert not controller.running
    assert "removed" in controller.status_message
    assert statuses and "removed" not in statuses[-1]  # the first session's callback saw its own stop
    session = controller.session
    assert session.frames_received == session.frames_processed + session.frames_dropped


def test_replay_mode_needs_a_sequence_and_names_the_fix(context, models):
    from UltramotionIGTLib.core.pipeline import PipelineConfig
    from UltramotionIGTLib.models.source import ModelSource
    from UltramotionIGTLib.slicer.controller import SessionController

    detector, sam, sam_type, _ = models
    volume = mrml.new_volume_node(
        context.scene,
        PhantomStream(seed=1, n_frames=1).frame(0).image,
        mrml.FrameGeometry.from_matrix(np.eye(4), (256, 256)),
    )
    controller = SessionController()
    with pytest.raises(ValueError, match="Replay needs a sequence"):
        controller.start(
            volume, None, ModelSource(detector, sam, sam_type), PipelineConfig(device="cpu"), "replay"
        )
    with pytest.raises(ValueError, match="Select an input volume"):
        controller.start(None, None, ModelSource(detector, sam, sam_type), PipelineConfig(device="cpu"))
    assert controller.session is None and controller.snapshot() is None
