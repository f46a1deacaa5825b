"""Live and replay sessions on real MRML (slicer-core): drop policy, flat memory, clean stops, replay."""

from __future__ import annotations

import gc
import time
import tracemalloc

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (pip install slicer-core) provides MRML")
vtk = pytest.importorskip("vtk")
ndimage = pytest.importorskip("scipy.ndimage")

from UltramotionIGTLib.core.kpi import MemoryKpiSink  # noqa: E402
from UltramotionIGTLib.core.packet import HostResult  # noqa: E402
from UltramotionIGTLib.slicer import mrml  # noqa: E402
from UltramotionIGTLib.slicer.pose import POSE_REFERENCE_ROLE  # noqa: E402
from UltramotionIGTLib.slicer.sessions import LiveSession, ReplaySession, SessionState, replay_sequence  # noqa: E402


def threshold_targets(
    frame: np.ndarray,
    frame_index: int,
    timestamp: float | None,
    threshold: int = 200,
    max_targets: int = 3,
    min_pixels: int = 20,
) -> HostResult:
    """A real (if simple) segmenter: bright connected components, largest first.

    Targets alternate between the two classes by size rank; the rank is the track id; centroids
    are intensity-weighted, as the pipeline's are probability-weighted.
    """
    gray = frame if frame.ndim == 2 else frame.mean(axis=2)
    labelled, _ = ndimage.label(gray >= threshold)
    sizes = np.bincount(labelled.ravel())[1:]
    order = [int(i) for i in np.argsort(-sizes, kind="stable") if sizes[i] >= min_pixels][:max_targets]
    objects = ndimage.find_objects(labelled)
    h, w = gray.shape
    ys, xs = np.mgrid[0:h, 0:w]
    masks = np.zeros((len(order), h, w), bool)
    boxes = np.zeros((len(order), 4), np.float32)
    centroids = np.zeros((len(order), 2), np.float32)
    scores = np.zeros(len(order), np.float32)
    for row, component in enumerate(order):
        sl = objects[component]
        masks[row] = labelled == component + 1
        boxes[row] = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
        weights = np.where(masks[row], gray, 0).astype(np.float64)
        centroids[row] = ((weights * xs).sum() / weights.sum(), (weights * ys).sum() / weights.sum())
        scores[row] = float(gray[masks[row]].mean()) / 255.0
    return HostResult(
        frame_index=frame_index,
        image_size=(h, w),
        boxes=boxes,
        scores=scores,
        labels=np.arange(len(order), dtype=np.int64) % 2,
        centroids=centroids,
        areas=masks.sum(axis=(1, 2)).astype(np.float32),
        track_ids=np.arange(len(order), dtype=np.int64),
        masks=masks,
        timestamp=timestamp,
    )


def stream_frame(index: int, shape: tuple[int, int] = (96, 128)) -> np.ndarray:
    """Frame ``index`` of a synthetic stream: a bright square whose position encodes the index, and
    the index itself in pixel (0, 0)."""
    h, w = shape
    frame = np.full(shape, 30, np.uint8)
    y, x = 10 + (index * 7) % (h - 30), 10 + (index * 13) % (w - 30)
    frame[y : y + 16, x : x + 16] = 230
    frame[0, 0] = index % 256
    return frame


class Recorder:
    """process_frame for the tests: the threshold segmenter, recording what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, float | None]] = []  # (frame_index, pixel (0,0), timestamp)

    def __call__(self, frame, frame_index, timestamp):
        self.calls.append((frame_index, int(frame[0, 0]), timestamp))
        return threshold_targets(frame, frame_index, timestamp)


@pytest.fixture()
def context():
    ctx = mrml.create_standalone_context()
    yield ctx
    ctx.close()


@pytest.fixture()
def stream(context):
    """(input volume with frame 0, output segmentation node)."""
    volume = mrml.new_volume_node(context.scene, stream_frame(0), name="Image_Reference")
    segmentation = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Targets")
    return volume, segmentation


def segment_ids(segmentation) -> list[str]:
    seg = segmentation.GetSegmentation()
    return [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]


def segment_mask(segmentation, segment_id: str) -> np.ndarray:
    from vtk.util import numpy_support

    image = segmentation.GetSegmentation().GetSegment(segment_id).GetRepresentation(mrml.BINARY_LABELMAP)
    w, h, _ = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w).astype(bool)


# -- live ---------------------------------------------------------------------------------------------


def test_fast_producer_newest_frame_processed_drops_counted_memory_flat(context):
    shape = (616, 820)  # a queue of frames would grow by 0.5 MB per frame
    volume = mrml.new_volume_node(context.scene, stream_frame(0, shape), name="Image_Reference")
    segmentation = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Targets")
    recorder = Recorder()
    session = LiveSession(volume, segmentation, recorder)
    session.start(process_current=False)
    assert session.state == SessionState.RUNNING

    per_round, produced = 5, 0
    traced: list[int] = []
    nodes = None
    tracemalloc.start()
    try:
        for round_ in range(24):
            for _ in range(per_round):  # the producer is 5x faster than inference
                mrml.write_frame_to_volume(volume, stream_frame(produced, shape))
                produced += 1
            assert session.has_pending
            assert session.process_pending()
            assert not session.process_pending()  # one slot: nothing else is queued
            newest = produced - 1
            frame_index, pixel, _ = recorder.calls[-1]
            assert frame_index == newest and pixel == newest % 256  # the newest frame, its content
            assert session.frames_received == produced
            assert session.frames_processed == round_ + 1
            assert session.frames_dropped == produced - session.frames_processed
            if round_ == 0:
                nodes = context.scene.GetNumberOfNodes()  # + the segmentation's display node
            if round_ in (6, 23):
                gc.collect()
                traced.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    growth = traced[1] - traced[0]
    assert growth < 256 * 1024, f"memory grew by {growth} bytes over 17 rounds of 5 frames"
    assert context.scene.GetNumberOfNodes() == nodes  # no node per frame
    # the segmentation shows the newest frame's square
    assert segment_ids(segmentation) == ["vessel-0"]
    np.testing.assert_array_equal(
        segment_mask(segmentation, "vessel-0"), stream_frame(produced - 1, shape) >= 200
    )
    session.stop()
    assert session.state == SessionState.STOPPED and session.status_message == "stopped by user"


def test_every_nth_policy_takes_a_copy_of_the_chosen_frame(stream):
    volume, segmentation = stream
    recorder = Recorder()
    session = LiveSession(volume, segmentation, recorder, drop_policy="every_nth", every_nth=3)
    session.start(process_current=False)
    for i in range(5):  # frames 0..4 arrive; 0 and 3 are taken; 3 is processed, after 4 arrived
        mrml.write_frame_to_volume(volume, stream_frame(i))
    assert session.process_pending()
    assert recorder.calls[-1][:2] == (3, 3)  # frame 3's pixels, not the newer frame 4 in the node
    np.testing.assert_array_equal(segment_mask(segmentation, "vessel-0"), stream_frame(3) >= 200)
    assert session.frames_skipped == 3  # 1, 2, 4
    assert session.frames_dropped == 4  # + frame 0, replaced while pending by frame 3
    assert session.frames_received == session.frames_processed + session.frames_dropped
    with pytest.raises(ValueError, match="drop_policy"):
        LiveSession(volume, segmentation, recorder, drop_policy="queue")


def test_deleting_the_input_mid_stream_stops_with_a_status(context, stream):
    volume, segmentation = stream
    messages: list[str] = []
    session = LiveSession(volume, segmentation, Recorder(), status_callback=messages.append)
    session.start()
    assert session.process_pending()
    mrml.write_frame_to_volume(volume, stream_frame(1))
    context.scene.RemoveNode(volume)  # mid-stream, with a frame pending
    assert session.state == SessionState.STOPPED
    assert "input volume was removed" in session.status_message
    assert messages[-1] == session.status_message
    assert not session.process_pending()
    assert session.frames_received == session.frames_processed + session.frames_dropped == 2
    mrml.write_frame_to_volume(volume, stream_frame(2))  # the orphan node still changes: not observed
    assert session.frames_received == 2


def test_deleting_the_output_mid_stream_stops_with_a_status(context, stream):
    volume, segmentation = stream
    session = LiveSession(volume, segmentation, Recorder())
    session.start()
    assert session.process_pending()
    mrml.write_frame_to_volume(volume, stream_frame(1))
    context.scene.RemoveNode(segmentation)
    assert session.state == SessionState.STOPPED
    assert "output segmentation was removed" in session.status_message
    assert not session.process_pending()


def test_output_removed_unobserved_is_caught_before_writing(context, stream):
    """The session watches the input's scene; an output living in another scene is checked per frame."""
    volume, _ = stream
    other = mrml.create_standalone_context()
    try:
        segmentation = other.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        session = LiveSession(volume, segmentation, Recorder())
        session.start()
        assert session.process_pending()
        mrml.write_frame_to_volume(volume, stream_frame(1))
        other.scene.RemoveNode(segmentation)
        assert session.running  # no event reached the session
        assert not session.process_pending()
        assert session.state == SessionState.STOPPED
        assert "output segmentation was removed" in session.status_message
    finally:
        other.close()


def test_geometry_change_stops_and_moved_origin_is_followed(context, stream):
    volume, segmentation = stream
    session = LiveSession(volume, segmentation, Recorder())
    session.start()
    assert session.process_pending()
    # a moved origin (e.g. the image pushed with a new position) is followed
    volume.SetOrigin(5.0, -3.0, 2.0)
    mrml.write_frame_to_volume(volume, stream_frame(1))
    assert session.process_pending() and session.running
    matrix = vtk.vtkMatrix4x4()
    segmentation.GetSegmentation().GetSegment("vessel-0").GetRepresentation(
        mrml.BINARY_LABELMAP
    ).GetImageToWorldMatrix(matrix)
    assert [matrix.GetElement(r, 3) for r in range(3)] == pytest.approx([5.0, -3.0, 2.0])
    # new spacing: the segmentation grid would no longer match -> stop
    volume.SetSpacing(0.5, 0.5, 1.0)
    mrml.write_frame_to_volume(volume, stream_frame(2))
    assert not session.process_pending()
    assert session.state == SessionState.STOPPED
    assert "geometry changed" in session.status_message and "spacing" in session.status_message


def test_new_frame_size_stops(context, stream):
    volume, segmentation = stream
    session = LiveSession(volume, segmentation, Recorder())
    session.start()
    assert session.process_pending()
    mrml.write_frame_to_volume(volume, stream_frame(1, (64, 80)))
    assert not session.process_pending()
    assert "dimensions" in session.status_message


def test_other_parties_observers_survive_stop(context, stream):
    volume, segmentation = stream
    theirs = {"image": 0, "removed": 0}
    volume.AddObserver(
        slicer.vtkMRMLVolumeNode.ImageDataModifiedEvent,
        lambda *a: theirs.__setitem__("image", theirs["image"] + 1),
    )
    context.scene.AddObserver(
        slicer.vtkMRMLScene.NodeAboutToBeRemovedEvent,
        lambda *a: theirs.__setitem__("removed", theirs["removed"] + 1),
    )
    session = LiveSession(volume, segmentation, Recorder())
    session.start()
    mrml.write_frame_to_volume(volume, stream_frame(1))
    session.stop()
    mrml.write_frame_to_volume(volume, stream_frame(2))
    other = context.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    context.scene.RemoveNode(other)
    assert theirs == {"image": 2, "removed": 1}
    assert session.frames_received == 2  # the current frame at start + frame 1, not frame 2
    session.stop()  # idempotent
    assert session.status_message == "stopped by user"


def test_scene_close_and_processing_error_stop_without_raising(context, stream):
    volume, segmentation = stream
    session = LiveSession(volume, segmentation, Recorder())
    session.start()
    context.scene.Clear(False)
    assert session.state == SessionState.STOPPED
    assert session.status_message == "stopped: the scene is being closed"
    assert not session.process_pending()

    ctx = mrml.create_standalone_context()
    try:
        volume = mrml.new_volume_node(ctx.scene, stream_frame(0))
        segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")

        def wrong_size(frame, index, timestamp):
            return threshold_targets(frame[:10], index, timestamp)

        session = LiveSession(volume, segmentation, wrong_size)
        session.start()
        assert not session.process_pending()
        assert session.state == SessionState.ERROR
        assert (
            "failed" in session.status_message and "do not match the frame geometry" in session.status_message
        )
    finally:
        ctx.close()


def test_latency_from_acquisition_time_when_the_sender_provides_one(stream):
    volume, segmentation = stream
    sink = MemoryKpiSink()
    recorder = Recorder()
    session = LiveSession(volume, segmentation, recorder, kpi_sink=sink)
    session.start(process_current=False)
    # Unix-clock timestamp (e.g. a pyigtl sender): latency counts from it
    volume.SetAttribute("OpenIGTLink.Timestamp", repr(time.time() - 0.25))
    mrml.write_frame_to_volume(volume, stream_frame(1))
    assert session.process_pending()
    record = sink.records[-1]
    assert record["event"] == "frame" and record["latency_reference"] == "acquisition"
    assert record["latency_ms"] >= 250.0 > record["wall_ms"]
    assert recorder.calls[-1][2] == pytest.approx(float(volume.GetAttribute("OpenIGTLink.Timestamp")))
    assert "mrml" in record["stage_ms"]
    # PLUS sends its own clock (seconds since it started): aligned by the smallest offset seen
    volume.SetAttribute("OpenIGTLink.Timestamp", "215.102186")
    mrml.write_frame_to_volume(volume, stream_frame(2))
    assert session.process_pending()
    assert sink.records[-1]["latency_reference"].startswith("acquisition (sender clock")
    assert 0.0 <= sink.records[-1]["latency_ms"] < 10_000
    # no timestamp: from arrival
    volume.RemoveAttribute("OpenIGTLink.Timestamp")
    mrml.write_frame_to_volume(volume, stream_frame(3))
    assert session.process_pending()
    assert sink.records[-1]["latency_reference"] == "arrival"
    from UltramotionIGTLib.slicer import indicators

    snapshot = indicators.build_snapshot(
        session.kpi, running=session.running, frames_received=session.frames_received
    )
    assert snapshot.frames_processed == 3 and snapshot.mask_frame_index == 2
    assert snapshot.end_to_end_ms["p50"] is not None and "mrml" in snapshot.stage_latency_ms
    assert snapshot.latency_reference == "arrival"
    panel = indicators.format_kpi_panel(snapshot)
    assert "3 processed" in panel and "from arrival" in panel
    session.stop()
    assert sink.records[-1]["event"] == "live_stop"


def test_outputs_are_placed_with_the_frame_pose_and_markups(context, stream):
    volume, segmentation = stream
    transform = context.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "ImageToReference")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    markups = context.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Target points")
    session = LiveSession(volume, segmentation, Recorder(), markups_node=markups)
    session.start()
    assert session.process_pending()
    # both outputs under the session's pose node, which holds the input's transform at arrival
    pose = segmentation.GetNodeReference(POSE_REFERENCE_ROLE)
    assert pose is not None and pose is not transform
    assert segmentation.GetTransformNodeID() == pose.GetID() == markups.GetTransformNodeID()
    assert markups.GetNumberOfControlPoints() == 1
    expected = mrml.geometry_from_volume(volume).pixel_to_ras(session.last_result.centroids)[0]
    np.testing.assert_allclose(markups.GetNthControlPointPosition(0), expected, atol=1e-6)
    context.scene.RemoveNode(markups)  # optional output: the session goes on without it
    mrml.write_frame_to_volume(volume, stream_frame(1))
    assert session.process_pending() and session.running


def test_live_session_on_a_sequence_browser_proxy(context, plus_dir):
    """The sequence browser fires ImageDataModified on its proxy volume: play faster than inference."""
    from UltramotionIGTLib.io import read_sequence

    recording = read_sequence(plus_dir / "SpinePhantomFreehand.igs.mha")
    geometry = mrml.FrameGeometry.from_matrix(recording.ijk_to_ras(), recording.frame_shape)
    sequence = mrml.volume_sequence_from_frames(
        context.scene, recording.frames[:9], geometry, recording.timestamps[:9]
    )
    browser = context.scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    context.logic("Sequences").UpdateProxyNodesFromSequences(browser)
    proxy = browser.GetProxyNode(sequence)
    segmentation = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    recorder = Recorder()
    session = LiveSession(proxy, segmentation, lambda f, i, t: recorder(f, i, t))
    session.start()
    for item in (2, 5, 8):  # three browser steps per inference
        for step in range(item - 2, item + 1):
            browser.SetSelectedItemNumber(step)
        assert session.process_pending()
        expected = threshold_targets(recording.frames[item], 0, None)
        assert segment_ids(segmentation) == [name for name, _, _ in expected.segments()]
        for name, _, mask in expected.segments():
            np.testing.assert_array_equal(segment_mask(segmentation, name), mask)
    assert session.frames_received == 1 + 9 - 1  # the start frame + every step that changed the item
    assert session.frames_processed == 3  # the start frame was replaced while pending
    assert session.frames_dropped == 6


# -- replay -------------------------------------------------------------------------------------------


def test_replay_of_a_plus_recording_gives_one_segmentation_per_frame(context, plus_dir):
    from UltramotionIGTLib.io import read_sequence

    recording = read_sequence(plus_dir / "SpinePhantomFreehand.igs.mha")
    assert recording.n_frames == 21
    geometry = mrml.FrameGeometry.from_matrix(recording.ijk_to_ras(), recording.frame_shape)
    sequence = mrml.volume_sequence_from_frames(
        context.scene, recording.frames, geometry, recording.timestamps, name="Image_Image"
    )
    browser = context.scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "Recording")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    context.logic("Sequences").UpdateProxyNodesFromSequences(browser)
    segmentation = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Targets")
    progress: list[tuple[int, int]] = []
    sink = MemoryKpiSink()
    session = ReplaySession(
        browser,
        segmentation,
        threshold_targets,
        progress_callback=lambda d, t: progress.append((d, t)),
        kpi_sink=sink,
    )
    out = session.run()

    assert session.state == SessionState.FINISHED, session.status_message
    assert progress == [(i, 21) for i in range(1, 22)]
    assert out.GetNumberOfDataNodes() == 21
    assert out.GetIndexName() == sequence.GetIndexName() and out.GetIndexUnit() == sequence.GetIndexUnit()
    expected_any = 0
    for i in range(21):
        assert out.GetNthIndexValue(i) == sequence.GetNthIndexValue(i)
        item = out.GetNthDataNode(i)
        assert item.IsA("vtkMRMLSegmentationNode")
        expected = threshold_targets(recording.frames[i], i, None)
        assert segment_ids(item) == [name for name, _, _ in expected.segments()]
        for name, _, mask in expected.segments():
            np.testing.assert_array_equal(segment_mask(item, name), mask)
        expected_any += len(expected)
    assert expected_any > 0, "the threshold found nothing in the recording: the check would be empty"
    assert [r["frame"] for r in sink.records if r["event"] == "frame"] == list(range(21))

    # the browser plays the result aligned with the input, the working node as proxy
    assert browser.IsSynchronizedSequenceNode(out, True)
    assert browser.GetProxyNode(out) is segmentation
    browser.SetSelectedItemNumber(13)
    expected = threshold_targets(recording.frames[13], 13, None)
    assert segment_ids(segmentation) == [name for name, _, _ in expected.segments()]
    for name, _, mask in expected.segments():
        np.testing.assert_array_equal(segment_mask(segmentation, name), mask)

    # a second replay refills the same output sequence
    assert replay_sequence(sequence, segmentation, threshold_targets) is out
    assert out.GetNumberOfDataNodes() == 21


def test_replay_into_a_sequence_node_and_stop_on_removal(context):
    frames = [stream_frame(i) for i in range(6)]
    sequence = mrml.volume_sequence_from_frames(
        context.scene, frames, mrml.FrameGeometry.from_matrix(np.eye(4), (96, 128))
    )
    out = context.scene.AddNewNodeByClass("vtkMRMLSequenceNode", "Targets sequence")
    nodes = context.scene.GetNumberOfNodes()
    replay_sequence(sequence, out, threshold_targets)
    assert out.GetNumberOfDataNodes() == 6
    assert context.scene.GetNumberOfNodes() == nodes  # the working segmentation stays out of the scene
    for i in range(6):
        np.testing.assert_array_equal(segment_mask(out.GetNthDataNode(i), "vessel-0"), frames[i] >= 200)

    session = ReplaySession(sequence, out, threshold_targets)
    assert session.step() and session.step()
    context.scene.RemoveNode(sequence)
    assert not session.step()
    assert session.state == SessionState.STOPPED and "input sequence was removed" in session.status_message
    with pytest.raises(ValueError, match="not volume frames|empty"):
        ReplaySession(out, context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode"), threshold_targets)


def test_live_session_with_the_real_pipeline(tmp_path, stream):
    """The lead's pipeline (random-weight D-FINE + SAM in their real checkpoint formats) as process_frame."""
    pytest.importorskip("torch")
    from UltramotionIGTLib.core.pipeline import Pipeline, PipelineConfig
    from UltramotionIGTLib.tools import cli

    assert cli.main(["make-test-models", "--out", str(tmp_path)]) == 0
    pipeline = Pipeline.from_paths(
        tmp_path / "detector",
        tmp_path / "sam" / "sam_vit_t_demo.safetensors",
        sam_type="vit_t_demo",
        config=PipelineConfig(device="cpu", score_threshold=0.0),
    )
    volume, segmentation = stream
    session = LiveSession(volume, segmentation, lambda f, i, t: pipeline.process_frame(f, i, t).to_host())
    session.start(process_current=False)
    for i in range(3):
        mrml.write_frame_to_volume(volume, stream_frame(i))
    assert session.process_pending(), session.status_message
    result = session.last_result
    assert result.frame_index == 2 and session.frames_dropped == 2
    assert len(result) > 0  # score threshold 0: the prompts are kept, whatever random weights see
    segments = result.segments()
    assert segment_ids(segmentation) == [name for name, _, _ in segments]
    for name, _, mask in segments:
        np.testing.assert_array_equal(segment_mask(segmentation, name), mask)


def test_start_before_the_first_frame_arrives(context):
    """An OpenIGTLink image node can exist before its first message: geometry comes with frame 1."""
    volume = context.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Image_Reference")
    segmentation = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    session = LiveSession(volume, segmentation, Recorder())
    session.start()
    assert session.running and not session.has_pending and not session.process_pending()
    mrml.write_frame_to_volume(volume, stream_frame(0))
    assert session.process_pending()
    assert session.geometry is not None and session.geometry.shape == (96, 128)
    assert segment_ids(segmentation) == ["vessel-0"]
