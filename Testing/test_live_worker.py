"""The threaded live session on real MRML (slicer-core): the pipeline on a worker thread, the frame copy and
the result write on the main thread, newest frame wins, every frame accounted for; and the pose: each mask
lands where its frame was when it arrived, voxel for voxel, however the input's transform moves or is
re-parented before the write.

The worker is held at a gate (`GatedSegmenter`) where a test needs a frame to be in flight; every wait
is bounded and event-driven (``step(wait=...)``, ``drain``), never a sleep.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (pip install slicer-core) provides MRML")
vtk = pytest.importorskip("vtk")

from test_live import segment_ids, segment_mask, stream_frame, threshold_targets  # noqa: E402

from UltramotionIGTLib.slicer import mrml  # noqa: E402
from UltramotionIGTLib.slicer.pose import (  # noqa: E402
    POSE_REFERENCE_ROLE,
    transform_node_to_world,
    transform_to_world,
)
from UltramotionIGTLib.slicer.sessions import LiveSession, SessionState  # noqa: E402

WAIT = 30.0  # seconds; a bound, never reached when things work


class GatedSegmenter:
    """process_frame for the tests: the threshold segmenter, run when the test allows it (one `allow`
    per frame, or the gate open for all). Records the frame index, pixel (0, 0) as seen *when
    processing* and the thread it ran on."""

    def __init__(self, open_: bool = True) -> None:
        self.is_open = open_
        self._permits = threading.Semaphore(0)
        self._started = threading.Condition()
        self.started: list[int] = []  # frame indices taken up, in order
        self.calls: list[tuple[int, int, int]] = []

    def __call__(self, frame, frame_index, timestamp):
        with self._started:
            self.started.append(frame_index)
            self._started.notify_all()
        if not self.is_open:
            assert self._permits.acquire(timeout=WAIT), "the test never let the frame through"
        self.calls.append((frame_index, int(frame[0, 0]), threading.get_ident()))
        return threshold_targets(frame, frame_index, timestamp)

    def allow(self, frames: int = 1) -> None:
        for _ in range(frames):
            self._permits.release()

    def open(self) -> None:
        self.is_open = True
        self._permits.release()  # a frame already waiting goes through

    def wait_started(self, frame_index: int) -> None:
        with self._started:
            assert self._started.wait_for(lambda: frame_index in self.started, WAIT), "frame never taken up"


class MainThreadProbe:
    """Records the thread of every event the output segmentation fires, and whether rendering was paused."""

    def __init__(self, node) -> None:
        self.events: list[tuple[int, bool]] = []
        self.paused = False
        self.pauses = 0
        node.AddObserver(
            vtk.vtkCommand.AnyEvent, lambda *a: self.events.append((threading.get_ident(), self.paused))
        )

    @contextlib.contextmanager
    def render_pause(self):
        self.pauses += 1
        self.paused = True
        try:
            yield
        finally:
            self.paused = False


def accounted(session: LiveSession) -> bool:
    return session.frames_received == (
        session.frames_processed + session.frames_dropped + session.frames_in_flight
    )


@pytest.fixture()
def context():
    ctx = mrml.create_standalone_context()
    yield ctx
    ctx.close()


def matrix_from(array) -> vtk.vtkMatrix4x4:
    return slicer.util.vtkMatrixFromArray(np.asarray(array, dtype=float))


def rigid(angle_deg: float, axis: str, translation) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    rot = {"z": [[c, -s, 0], [s, c, 0], [0, 0, 1]], "x": [[1, 0, 0], [0, c, -s], [0, s, c]]}[axis]
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = translation
    return out


# -- threading ------------------------------------------------------------------------------------------


def test_the_worker_runs_the_pipeline_newest_frame_wins_mrml_only_on_the_main_thread(context):
    shape = (96, 128)
    volume = mrml.new_volume_node(context.scene, stream_frame(0, shape), name="Image_Reference")
    segmentation = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Targets")
    probe = MainThreadProbe(segmentation)
    segmenter = GatedSegmenter(open_=False)
    session = LiveSession(volume, segmentation, segmenter, threaded=True, render_pause=probe.render_pause)
    session.start()  # frame 0 (already in the volume) is pending
    main = threading.get_ident()

    assert session.step() is False  # frame 0's copy goes to the worker; nothing finished yet
    segmenter.wait_started(0)  # the worker holds frame 0 at the gate
    assert session.frames_in_flight == 1 and accounted(session)
    for i in (1, 2, 3, 4):  # the worker is busy: each frame replaces the pending one (dropped)
        mrml.write_frame_to_volume(volume, stream_frame(i, shape))
        assert session.step() is False  # nothing copied while the worker is busy
    assert (session.frames_received, session.frames_dropped, session.frames_in_flight) == (5, 3, 2)
    assert accounted(session) and session.has_pending

    segmenter.allow()
    assert session.step(wait=WAIT) is True  # frame 0's result, written by this thread ...
    assert session.last_result.frame_index == 0
    assert not session.has_pending  # ... and frame 4, the newest, copied for the now free worker
    segmenter.wait_started(4)
    segmenter.allow()
    assert session.drain(WAIT) == 1  # then frame 4's result
    assert session.last_result.frame_index == 4 and session.frames_in_flight == 0
    # the worker processed frames 0 and 4 with their own pixels (frame 0 from its copy: the node
    # held frame 4 by then), on a thread of its own
    assert [(i, p) for i, p, _ in segmenter.calls] == [(0, 0), (4, 4)]
    assert {t for _, _, t in segmenter.calls} != {main}
    # every MRML event of the output came from this (the main) thread, inside a render pause
    assert probe.events and all(thread == main for thread, _ in probe.events)
    assert all(paused for _, paused in probe.events)
    assert probe.pauses == 2  # one per written result
    assert (session.frames_processed, session.frames_dropped) == (2, 3) and accounted(session)
    np.testing.assert_array_equal(segment_mask(segmentation, "vessel-0"), stream_frame(4, shape) >= 200)
    record = session.kpi.last
    assert record.extra["main_thread_ms"] == pytest.approx(record.extra["copy_ms"] + record.stage_ms["mrml"])
    assert record.extra["pipeline_ms"] > 0
    session.stop()
    assert session.state == SessionState.STOPPED and accounted(session)


def test_stop_with_a_frame_in_flight_waits_for_it_and_counts_it_dropped(context):
    volume = mrml.new_volume_node(context.scene, stream_frame(0), name="Image")
    segmentation = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmenter = GatedSegmenter(open_=False)
    session = LiveSession(volume, segmentation, segmenter, threaded=True)
    session.start()
    session.step()
    segmenter.wait_started(0)
    mrml.write_frame_to_volume(volume, stream_frame(1))
    session.step()  # frame 1 stays pending: the worker is busy
    worker = session._worker._thread
    segmenter.open()
    session.stop("stopped by the test")  # joins the worker: frame 0 finishes, is never written
    assert session.state == SessionState.STOPPED
    assert (session.frames_received, session.frames_processed, session.frames_dropped) == (2, 0, 2)
    assert session.frames_in_flight == 0 and segment_ids(segmentation) == []
    assert session._worker is None and not worker.is_alive()


def test_a_pipeline_error_on_the_worker_stops_the_session_on_the_main_thread(context):
    volume = mrml.new_volume_node(context.scene, stream_frame(0), name="Image")
    segmentation = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")

    def broken(frame, index, timestamp):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    messages: list[str] = []
    session = LiveSession(volume, segmentation, broken, threaded=True, status_callback=messages.append)
    session.start()
    assert session.step(wait=WAIT) is False
    assert session.state == SessionState.ERROR
    assert messages[-1] == session.status_message
    assert "processing frame 0 failed: RuntimeError: CUDA error" in session.status_message
    assert session.frames_dropped == 1 and accounted(session)


# -- pose -----------------------------------------------------------------------------------------------


def mask_voxels_world(segmentation, segment_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(IJK of every labelled voxel, Nx3) and their world RAS (Nx3), read from MRML alone: the segment's
    labelmap (image-to-world) under the segmentation's parent transform chain."""
    image = segmentation.GetSegmentation().GetSegment(segment_id).GetRepresentation(mrml.BINARY_LABELMAP)
    w, h, _ = image.GetDimensions()
    voxels = segment_mask(segmentation, segment_id)
    ys, xs = np.nonzero(voxels)
    ijk = np.stack([xs, ys, np.zeros_like(xs)], axis=1).astype(float)
    image_to_world = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(image_to_world)
    local = mrml.FrameGeometry.from_matrix(image_to_world, (h, w)).ijk_to_ras_points(ijk)
    to_world = transform_to_world(segmentation)
    world = local @ to_world[:3, :3].T + to_world[:3, 3]
    return ijk, world


def frame_voxels_world(geometry: mrml.FrameGeometry, pose: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    local = geometry.ijk_to_ras_points(ijk)
    return local @ pose[:3, :3].T + pose[:3, 3]


def oblique_geometry(shape=(96, 128)) -> mrml.FrameGeometry:
    a = np.deg2rad(25.0)
    directions = np.array([[np.cos(a), -np.sin(a), 0], [0, 0, -1], [np.sin(a), np.cos(a), 0]])
    return mrml.FrameGeometry.from_spacing_origin_directions(
        (0.21, 0.17, 1.0), (-30, 12, 40), directions, shape
    )


def test_a_transform_that_moves_between_arrival_and_write_leaves_the_mask_on_its_frame(context):
    """The probe moves (a new ProbeToTracker) while frame 0 is being segmented: its mask still lands on
    the anatomy frame 0 imaged: every mask voxel's world position is the frame voxel's at arrival."""
    geometry = oblique_geometry()
    volume = mrml.new_volume_node(context.scene, stream_frame(0), geometry, name="Image_Reference")
    probe = context.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "ProbeToTracker")
    tracker = context.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "TrackerToReference")
    probe.SetAndObserveTransformNodeID(tracker.GetID())  # a chain of two
    tracker.SetMatrixTransformToParent(matrix_from(rigid(-10.0, "x", (0, 5, -3))))
    at_arrival = rigid(30.0, "z", (12.5, -7.0, 3.25))
    probe.SetMatrixTransformToParent(matrix_from(at_arrival))
    volume.SetAndObserveTransformNodeID(probe.GetID())
    pose_at_arrival = transform_to_world(volume)

    segmentation = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Targets")
    markups = context.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Targets points")
    segmenter = GatedSegmenter(open_=False)
    session = LiveSession(volume, segmentation, segmenter, markups_node=markups, threaded=True)
    session.start()  # frame 0 arrives
    session.step()
    segmenter.wait_started(0)
    probe.SetMatrixTransformToParent(matrix_from(rigid(-45.0, "x", (-20, 4, 9))))  # the probe moved
    moved = transform_to_world(volume)
    assert not np.allclose(moved, pose_at_arrival)
    segmenter.open()
    assert session.step(wait=WAIT)

    ijk, world = mask_voxels_world(segmentation, "vessel-0")
    assert len(ijk) == (stream_frame(0) >= 200).sum() > 0
    np.testing.assert_array_equal(segment_mask(segmentation, "vessel-0"), stream_frame(0) >= 200)
    np.testing.assert_allclose(world, frame_voxels_world(geometry, pose_at_arrival, ijk), atol=1e-9)
    assert not np.allclose(world, frame_voxels_world(geometry, moved, ijk), atol=1e-3)
    # the target point too: its world position is the frame's centroid under the arrival pose
    point = np.array(markups.GetNthControlPointPositionWorld(0))
    centroid = geometry.pixel_to_ras(session.last_result.centroids[:1])[0]
    np.testing.assert_allclose(point, pose_at_arrival[:3, :3] @ centroid + pose_at_arrival[:3, 3], atol=1e-9)
    # the image itself still follows its transform; our pose node is separate from it
    pose_node = segmentation.GetNodeReference(POSE_REFERENCE_ROLE)
    assert segmentation.GetParentTransformNode() is pose_node is markups.GetParentTransformNode()
    assert volume.GetParentTransformNode() is probe

    # the next frame arrives under the moved probe: its mask follows to the new pose
    mrml.write_frame_to_volume(volume, stream_frame(1))
    assert session.step(wait=WAIT) and session.last_result.frame_index == 1
    ijk, world = mask_voxels_world(segmentation, "vessel-0")
    np.testing.assert_allclose(world, frame_voxels_world(geometry, moved, ijk), atol=1e-9)
    session.stop()


def test_re_parenting_the_input_is_followed_from_the_next_frame_on(context):
    geometry = oblique_geometry()
    volume = mrml.new_volume_node(context.scene, stream_frame(0), geometry, name="Image")
    first = context.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "ImageToProbe")
    first.SetMatrixTransformToParent(matrix_from(rigid(15.0, "z", (1, 2, 3))))
    second = context.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "ImageToReference")
    second.SetMatrixTransformToParent(matrix_from(rigid(-60.0, "x", (40, -2, 8))))
    volume.SetAndObserveTransformNodeID(first.GetID())
    segmentation = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmenter = GatedSegmenter(open_=False)
    session = LiveSession(volume, segmentation, segmenter, threaded=True)
    session.start()
    session.step()
    segmenter.wait_started(0)
    volume.SetAndObserveTransformNodeID(second.GetID())  # re-parented while frame 0 is in flight
    segmenter.open()
    assert session.step(wait=WAIT)
    ijk, world = mask_voxels_world(segmentation, "vessel-0")
    np.testing.assert_allclose(
        world, frame_voxels_world(geometry, transform_node_to_world(first), ijk), atol=1e-9
    )  # frame 0 arrived under the first transform

    mrml.write_frame_to_volume(volume, stream_frame(1))  # arrives under the second one
    assert session.step(wait=WAIT)
    ijk, world = mask_voxels_world(segmentation, "vessel-0")
    np.testing.assert_allclose(
        world, frame_voxels_world(geometry, transform_node_to_world(second), ijk), atol=1e-9
    )

    volume.SetAndObserveTransformNodeID(None)  # untransformed input: untransformed output
    mrml.write_frame_to_volume(volume, stream_frame(2))
    assert session.step(wait=WAIT)
    assert segmentation.GetParentTransformNode() is None
    ijk, world = mask_voxels_world(segmentation, "vessel-0")
    np.testing.assert_allclose(world, geometry.ijk_to_ras_points(ijk), atol=1e-9)
    session.stop()


def test_a_non_linear_input_transform_is_shared_not_captured(context):
    volume = mrml.new_volume_node(context.scene, stream_frame(0), name="Image")
    warp = context.scene.AddNewNodeByClass("vtkMRMLTransformNode", "Warp")
    spline = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for p, q in (
        ((0, 0, 0), (0, 0, 0)),
        ((100, 0, 0), (100, 3, 0)),
        ((0, 100, 0), (2, 100, 0)),
        ((0, 0, 100), (0, 0, 100)),
    ):
        source.InsertNextPoint(p)
        target.InsertNextPoint(q)
    spline.SetSourceLandmarks(source)
    spline.SetTargetLandmarks(target)
    warp.SetAndObserveTransformToParent(spline)
    volume.SetAndObserveTransformNodeID(warp.GetID())
    assert transform_to_world(volume) is None
    segmentation = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    session = LiveSession(volume, segmentation, GatedSegmenter(), threaded=True)
    session.start()
    assert session.step(wait=WAIT)
    assert segmentation.GetParentTransformNode() is warp  # no 4x4 to capture: the warp is followed
    session.stop()


def test_a_browsed_recording_gives_each_frame_its_own_item_pose(context, plus_dir):
    """A sequence browser plays frames with their ImageToReference sequence: when a frame's image
    arrives the proxy transform already holds that item's pose, so each mask gets its item's pose
    even though the browser has moved on by the time it is written."""
    from UltramotionIGTLib.io import read_sequence

    recording = read_sequence(plus_dir / "SpinePhantomFreehand.igs.mha")
    name = next(iter(recording.transforms))
    geometry = mrml.FrameGeometry.from_matrix(recording.ijk_to_ras(), recording.frame_shape)
    n = 6
    images = mrml.volume_sequence_from_frames(context.scene, recording.frames[:n], geometry, range(n))
    poses = context.scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    transform = slicer.vtkMRMLLinearTransformNode()
    for i in range(n):
        transform.SetMatrixTransformToParent(matrix_from(recording.transforms[name][i]))
        poses.SetDataNodeAtValue(transform, str(i))
    browser = context.scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode")
    browser.SetAndObserveMasterSequenceNodeID(images.GetID())
    browser.AddSynchronizedSequenceNodeID(poses.GetID())
    context.logic("Sequences").UpdateProxyNodesFromSequences(browser)
    proxy, proxy_pose = browser.GetProxyNode(images), browser.GetProxyNode(poses)
    proxy.SetAndObserveTransformNodeID(proxy_pose.GetID())

    segmentation = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmenter = GatedSegmenter(open_=False)
    session = LiveSession(proxy, segmentation, segmenter, threaded=True)
    session.start(process_current=False)
    checked = 0
    for item in (1, 3, 5):
        browser.SetSelectedItemNumber(item)
        arrival = session.frames_received - 1
        session.step()
        segmenter.wait_started(arrival)
        browser.SetSelectedItemNumber(item - 1)  # the browser moves on before the result is written
        assert transform_to_world(proxy) is not None
        segmenter.allow()  # the item's result is written; the step back's frame goes to the worker
        assert session.step(wait=WAIT) and session.last_result.frame_index == arrival
        expected = threshold_targets(recording.frames[item], 0, None)
        pose = np.asarray(recording.transforms[name][item], dtype=float)
        for row, segment in enumerate(expected.segment_names()):
            ijk, world = mask_voxels_world(segmentation, segment)
            np.testing.assert_array_equal(segment_mask(segmentation, segment), expected.masks[row])
            np.testing.assert_allclose(world, frame_voxels_world(geometry, pose, ijk), atol=1e-6)
            checked += len(ijk)
        segmenter.allow()
        assert session.drain(WAIT) == 1  # the frame of the step back, under its own item's pose
    assert checked > 0
    session.stop()
