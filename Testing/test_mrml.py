"""The MRML bridge on real MRML (slicer-core from PyPI): frames, geometry, segmentation writing."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (pip install slicer-core) provides MRML")
vtk = pytest.importorskip("vtk")

from UltramotionIGTLib.core.packet import CLASS_COLORS, HostResult  # noqa: E402
from UltramotionIGTLib.errors import UnsupportedImageTypeError  # noqa: E402
from UltramotionIGTLib.slicer import mrml  # noqa: E402


@pytest.fixture()
def context():
    ctx = mrml.create_standalone_context()
    yield ctx
    ctx.close()


def oblique_geometry(shape: tuple[int, int]) -> mrml.FrameGeometry:
    """Non-identity direction (a rotation that is not a permutation), anisotropic spacing, offset origin."""
    a, b = np.deg2rad(27.0), np.deg2rad(-38.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return mrml.FrameGeometry.from_spacing_origin_directions(
        spacing=(0.21, 0.47, 1.3), origin=(-31.5, 12.25, 87.0), directions=rz @ rx, shape=shape
    )


def blob_frame(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Dark speckle with bright blobs of different sizes, placed asymmetrically (a flip or a
    transposition of the grid would move them)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    frame = rng.integers(0, 90, size=shape, dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for cy, cx, ry, rx in ((0.2, 0.15, 0.08, 0.05), (0.7, 0.6, 0.12, 0.2), (0.35, 0.85, 0.05, 0.09)):
        inside = ((yy - cy * h) / (ry * h)) ** 2 + ((xx - cx * w) / (rx * w)) ** 2 <= 1.0
        frame[inside] = rng.integers(180, 256, size=int(inside.sum()), dtype=np.uint8)
    return frame


def result_from_masks(masks: np.ndarray, labels, track_ids, frame_index: int = 0) -> HostResult:
    """A HostResult whose boxes, centroids and areas are computed from the masks."""
    masks = np.asarray(masks, dtype=bool)
    m = masks.shape[0]
    boxes = np.zeros((m, 4), np.float32)
    centroids = np.full((m, 2), np.nan, np.float32)
    for i, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        if xs.size:
            boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            centroids[i] = (xs.mean(), ys.mean())
    return HostResult(
        frame_index=frame_index,
        image_size=masks.shape[1:],
        boxes=boxes,
        scores=np.linspace(0.9, 0.5, m).astype(np.float32),
        labels=np.asarray(labels, np.int64),
        centroids=centroids,
        areas=masks.sum(axis=(1, 2)).astype(np.float32),
        track_ids=np.asarray(track_ids, np.int64),
        masks=masks,
    )


def oriented_image_arrays(image) -> tuple[np.ndarray, np.ndarray]:
    """(voxels KxJxI as numpy, image-to-world 4x4) of a vtkOrientedImageData."""
    from vtk.util import numpy_support

    w, h, d = image.GetDimensions()
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(d, h, w)
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return voxels, np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


# -- frames and geometry ----------------------------------------------------------------------------


def test_geometry_and_zero_copy_frame(context):
    frame = blob_frame((37, 53))
    geometry = oblique_geometry(frame.shape)
    volume = mrml.new_volume_node(context.scene, frame, geometry, name="US")

    read = mrml.geometry_from_volume(volume)
    assert read.is_same(geometry)
    assert read.dimensions == (53, 37, 1) and read.shape == (37, 53)
    np.testing.assert_allclose(read.spacing, (0.21, 0.47, 1.3))
    np.testing.assert_allclose(read.origin, (-31.5, 12.25, 87.0))
    np.testing.assert_allclose(read.directions @ read.directions.T, np.eye(3), atol=1e-12)
    # the node's own matrix agrees with ours voxel by voxel
    ijk = np.array([[0, 0, 0], [52, 0, 0], [0, 36, 0], [17, 29, 0]], dtype=float)
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    node_ras = np.array([matrix.MultiplyPoint([*p, 1.0])[:3] for p in ijk])
    np.testing.assert_allclose(read.ijk_to_ras_points(ijk), node_ras, atol=1e-12)
    np.testing.assert_allclose(read.ras_to_ijk_points(node_ras), ijk, atol=1e-9)

    view = mrml.frame_from_volume(volume)
    assert view.shape == (37, 53) and view.dtype == np.uint8
    np.testing.assert_array_equal(view, frame)
    # zero copy: a change of the node's voxels is visible in the view
    voxels = mrml.array_from_volume(volume)
    assert np.shares_memory(view, voxels)
    voxels[0, 5, 7] = 255 - voxels[0, 5, 7]
    assert view[5, 7] == voxels[0, 5, 7]

    torch = pytest.importorskip("torch")
    tensor = mrml.tensor_from_volume(volume)
    assert tensor.shape == (37, 53) and tensor.dtype == torch.uint8
    assert tensor.data_ptr() == view.__array_interface__["data"][0]


def test_vector_volume_gives_rgb_frames(context):
    rgb = np.random.default_rng(1).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    volume = mrml.new_volume_node(context.scene, rgb, name="Doppler")
    assert volume.IsA("vtkMRMLVectorVolumeNode")
    frame = mrml.frame_from_volume(volume)
    assert frame.shape == (20, 30, 3)
    np.testing.assert_array_equal(frame, rgb)
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 255, np.uint8)], axis=2)
    mrml.write_frame_to_volume(volume, rgba)
    frame = mrml.frame_from_volume(volume)
    assert frame.shape == (20, 30, 3) and np.shares_memory(frame, mrml.array_from_volume(volume))
    np.testing.assert_array_equal(frame, rgb)


def test_multi_slice_volume_and_empty_volume_are_refused(context):
    volume = context.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    with pytest.raises(UnsupportedImageTypeError, match="no image data"):
        mrml.frame_from_volume(volume)
    image = vtk.vtkImageData()
    image.SetDimensions(8, 6, 4)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    volume.SetAndObserveImageData(image)
    with pytest.raises(UnsupportedImageTypeError, match="4 slices"):
        mrml.frame_from_volume(volume)


def test_write_frame_in_place_fires_one_image_modified_event(context):
    frame = blob_frame((16, 24))
    volume = mrml.new_volume_node(context.scene, frame)
    image_before = volume.GetImageData()
    events = []
    tag = volume.AddObserver(slicer.vtkMRMLVolumeNode.ImageDataModifiedEvent, lambda *args: events.append(1))
    mrml.write_frame_to_volume(volume, frame[::-1].copy())
    volume.RemoveObserver(tag)
    assert len(events) == 1
    assert volume.GetImageData() is image_before  # same buffer, like an OpenIGTLink image node
    np.testing.assert_array_equal(mrml.frame_from_volume(volume), frame[::-1])


# -- segmentation ------------------------------------------------------------------------------------


def test_every_mask_voxel_maps_to_the_ras_point_of_the_frame_voxel_it_labels(context):
    """Acceptance: oblique direction, anisotropic spacing, offset origin; checked voxel by voxel."""
    frame = blob_frame((61, 83), seed=3)
    geometry = oblique_geometry(frame.shape)
    volume = mrml.new_volume_node(context.scene, frame, geometry, name="US")
    segmentation = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Targets")

    # masks computed from the frame itself: bright pixels, split by column into two targets
    bright = frame >= 180
    left = bright.copy()
    left[:, 40:] = False
    right = bright & ~left
    result = result_from_masks(np.stack([left, right]), labels=[0, 1], track_ids=[3, 7])
    writer = mrml.SegmentationWriter(segmentation, volume)
    assert writer.write(result) == ["vessel-3", "needle-7"]

    ras_to_ijk = vtk.vtkMatrix4x4()
    volume.GetRASToIJKMatrix(ras_to_ijk)
    ras_to_ijk = np.array([[ras_to_ijk.GetElement(r, c) for c in range(4)] for r in range(4)])
    for segment_id, expected in (("vessel-3", left), ("needle-7", right)):
        segment = segmentation.GetSegmentation().GetSegment(segment_id)
        image = segment.GetRepresentation(mrml.BINARY_LABELMAP)
        voxels, image_to_world = oriented_image_arrays(image)
        extent = image.GetExtent()
        k, j, i = np.nonzero(voxels)
        assert i.size == expected.sum() > 0
        ijk_seg = np.stack([i + extent[0], j + extent[2], k + extent[4], np.ones_like(i)], axis=1).astype(
            float
        )
        ras = ijk_seg @ image_to_world.T  # every labelled voxel of the segment, in RAS
        ijk_frame = ras @ ras_to_ijk.T  # ... and where that RAS point is in the frame
        np.testing.assert_allclose(ijk_frame[:, :3], np.round(ijk_frame[:, :3]), atol=1e-6)
        fi, fj, fk = (np.round(ijk_frame[:, c]).astype(int) for c in range(3))
        assert np.all(fk == 0)
        # the frame voxel at that RAS point is one the mask labels, and it is bright (>= 180)
        assert np.all(expected[fj, fi])
        assert np.all(frame[fj, fi] >= 180)
        assert len(set(zip(fi.tolist(), fj.tolist(), strict=True))) == expected.sum()  # one-to-one

    # an independent check with Slicer's own export (resampling into the reference volume's grid)
    labelmap = context.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ids = vtk.vtkStringArray()
    for segment_id in ("vessel-3", "needle-7"):
        ids.InsertNextValue(segment_id)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic.ExportSegmentsToLabelmapNode(segmentation, ids, labelmap, volume)
    exported = mrml.array_from_volume(labelmap)[0]
    assert exported.shape == frame.shape
    np.testing.assert_array_equal(exported == 1, left)
    np.testing.assert_array_equal(exported == 2, right)


def test_segments_are_updated_in_place_with_stable_names_colours_and_removal(context):
    shape = (40, 50)
    frame = blob_frame(shape)
    geometry = oblique_geometry(shape)
    segmentation = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg = segmentation.GetSegmentation()
    seg.AddEmptySegment("liver", "liver", [0.1, 0.9, 0.1])  # someone else's segment: must survive
    writer = mrml.SegmentationWriter(segmentation, geometry)
    rng = np.random.default_rng(5)

    masks = rng.random((3, *shape)) > 0.7
    writer.write(result_from_masks(masks, labels=[0, 0, 1], track_ids=[1, 2, 5]))
    images = {
        s: seg.GetSegment(s).GetRepresentation(mrml.BINARY_LABELMAP)
        for s in ("vessel-1", "vessel-2", "needle-5")
    }
    assert seg.GetSegment("vessel-1").GetColor() == pytest.approx(CLASS_COLORS["vessel"])
    assert seg.GetSegment("needle-5").GetColor() == pytest.approx(CLASS_COLORS["needle"])
    assert seg.GetSegment("needle-5").GetName() == "needle-5"
    nodes_before = context.scene.GetNumberOfNodes()

    for frame_index in range(1, 6):
        masks = rng.random((2, *shape)) > 0.5
        writer.write(result_from_masks(masks, labels=[0, 1], track_ids=[2, 5], frame_index=frame_index))
        ids = {seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())}
        assert ids == {"liver", "vessel-2", "needle-5"}  # vessel-1 disappeared and was removed
        for row, segment_id in enumerate(("vessel-2", "needle-5")):
            image = seg.GetSegment(segment_id).GetRepresentation(mrml.BINARY_LABELMAP)
            assert image is images[segment_id]  # the same oriented image, written in place
            np.testing.assert_array_equal(oriented_image_arrays(image)[0][0].astype(bool), masks[row])
    assert context.scene.GetNumberOfNodes() == nodes_before  # no temporary nodes per frame

    # new segments reuse pooled images; the untracked detections of a class share one segment
    # ('<class>-untracked', the one naming rule of files, Slicer and the summary)
    masks = rng.random((3, *shape)) > 0.5
    names = writer.write(result_from_masks(masks, labels=[0, 0, 1], track_ids=[-1, -1, 9]))
    assert names == ["vessel-untracked", "needle-9"]
    for segment_id, expected in (("vessel-untracked", masks[0] | masks[1]), ("needle-9", masks[2])):
        image = seg.GetSegment(segment_id).GetRepresentation(mrml.BINARY_LABELMAP)
        assert any(image is pooled for pooled in images.values())
        np.testing.assert_array_equal(oriented_image_arrays(image)[0][0].astype(bool), expected)
    # a new writer (a new run) removes the segments the previous one left, not the user's
    mrml.SegmentationWriter(segmentation, geometry)
    assert [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())] == ["liver"]
    writer.write(result_from_masks(masks[:1], labels=[0], track_ids=[1]))
    writer.clear()
    assert [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())] == ["liver"]
    del frame


def test_writer_rejects_masks_of_another_frame_size(context):
    segmentation = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    writer = mrml.SegmentationWriter(segmentation, oblique_geometry((30, 40)))
    with pytest.raises(ValueError, match="do not match the frame geometry"):
        writer.write(result_from_masks(np.zeros((1, 40, 30), bool), labels=[0], track_ids=[1]))


def test_reference_geometry_and_moved_origin(context):
    shape = (30, 40)
    geometry = oblique_geometry(shape)
    segmentation = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    writer = mrml.SegmentationWriter(segmentation, geometry)
    writer.write(result_from_masks(np.ones((1, *shape), bool), labels=[1], track_ids=[4]))
    converter = slicer.vtkSegmentationConverter
    stored = segmentation.GetSegmentation().GetConversionParameter(
        converter.GetReferenceImageGeometryParameterName()
    )
    reference = slicer.vtkOrientedImageData()
    converter.DeserializeImageGeometry(stored, reference)
    assert reference.GetExtent() == geometry.extent
    np.testing.assert_allclose(oriented_image_arrays(reference)[1], geometry.ijk_to_ras, atol=1e-9)

    moved = mrml.FrameGeometry(_translation(4.0, -2.0, 1.5) @ geometry.ijk_to_ras, geometry.extent)
    assert geometry.same_grid(moved) and not geometry.is_same(moved)
    writer.set_geometry(moved)
    image = segmentation.GetSegmentation().GetSegment("needle-4").GetRepresentation(mrml.BINARY_LABELMAP)
    np.testing.assert_allclose(oriented_image_arrays(image)[1], moved.ijk_to_ras, atol=1e-9)


def _translation(x: float, y: float, z: float) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = (x, y, z)
    return matrix


def test_target_points_follow_weighted_centroids(context):
    shape = (30, 40)
    geometry = oblique_geometry(shape)
    markups = context.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Targets")
    points = mrml.TargetPointsWriter(markups, geometry)
    masks = np.zeros((3, *shape), bool)
    masks[0, 5:9, 10:20] = True
    masks[2, 20:25, 30:33] = True  # masks[1] is empty: its centroid is NaN and gets no point
    result = result_from_masks(masks, labels=[0, 0, 1], track_ids=[1, 2, 3])
    assert points.write(result) == 2
    assert markups.GetNumberOfControlPoints() == 2
    assert [markups.GetNthControlPointLabel(i) for i in range(2)] == ["vessel-1", "needle-3"]
    expected = geometry.pixel_to_ras(result.centroids[[0, 2]])
    for i in range(2):
        np.testing.assert_allclose(markups.GetNthControlPointPosition(i), expected[i], atol=1e-9)
    # the first point is the RAS of the mask's centre pixel (x = 14.5, y = 6.5)
    np.testing.assert_allclose(expected[0], geometry.ijk_to_ras_points([[14.5, 6.5, 0]])[0])
    assert points.write(result_from_masks(masks[:1], labels=[0], track_ids=[1])) == 1
    assert markups.GetNumberOfControlPoints() == 1


def test_acquisition_timestamp_attributes(context):
    volume = context.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    assert mrml.acquisition_timestamp(volume) is None
    volume.SetAttribute("OpenIGTLink.Timestamp", "not a number")
    assert mrml.acquisition_timestamp(volume) is None
    volume.SetAttribute("OpenIGTLink.Timestamp", "215.102186")
    assert mrml.acquisition_timestamp(volume) == pytest.approx(215.102186)


def test_volume_sequence_from_frames_keeps_frames_and_index_values(context):
    frames = [blob_frame((12, 18), seed=s) for s in range(4)]
    geometry = oblique_geometry((12, 18))
    sequence = mrml.volume_sequence_from_frames(context.scene, frames, geometry, [10.5, 10.75, 11.0, 11.25])
    assert sequence.GetNumberOfDataNodes() == 4
    assert [sequence.GetNthIndexValue(i) for i in range(4)] == ["10.5", "10.75", "11", "11.25"]
    for i, frame in enumerate(frames):
        node = sequence.GetNthDataNode(i)
        np.testing.assert_array_equal(mrml.frame_from_volume(node), frame)
        assert mrml.geometry_from_volume(node).is_same(geometry)


def test_visibility_states_tag_hide_and_dim_segments(context):
    """LOST segments are hidden, RELOCALIZING ones drawn dimmed, the state is in each segment's tag;
    the display changes only when a state does."""
    from UltramotionIGTLib.core.packet import LOST, RELOCALIZING, VISIBLE

    shape = (30, 40)
    segmentation = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    writer = mrml.SegmentationWriter(segmentation, oblique_geometry(shape))
    display = segmentation.GetDisplayNode()
    seg = segmentation.GetSegmentation()
    masks = np.random.default_rng(1).random((3, *shape)) > 0.6
    points = context.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    points_writer = mrml.TargetPointsWriter(points, oblique_geometry(shape))

    def write(states):
        result = result_from_masks(masks, labels=[0, 0, 1], track_ids=[1, 2, 3])
        result.states = np.asarray(states, np.int64)
        writer.write(result)
        return points_writer.write(result)

    assert write([VISIBLE, RELOCALIZING, LOST]) == 2  # no target point for the LOST target

    def tag(segment_id):
        value = vtk.reference("")
        assert seg.GetSegment(segment_id).GetTag(mrml.VISIBILITY_TAG, value)
        return str(value)

    tags = {s: tag(s) for s in ("vessel-1", "vessel-2", "needle-3")}
    assert tags == {"vessel-1": "VISIBLE", "vessel-2": "RELOCALIZING", "needle-3": "LOST"}
    assert display.GetSegmentVisibility("vessel-1") and display.GetSegmentVisibility("vessel-2")
    assert not display.GetSegmentVisibility("needle-3")
    assert display.GetSegmentOpacity2DFill("vessel-2") == pytest.approx(mrml.RELOCALIZING_FILL_OPACITY)
    assert display.GetSegmentOpacity2DFill("vessel-1") == pytest.approx(1.0)
    modified = display.GetMTime()
    write([VISIBLE, RELOCALIZING, LOST])
    assert display.GetMTime() == modified  # same states: display untouched
    write([RELOCALIZING, VISIBLE, RELOCALIZING])
    assert display.GetSegmentVisibility("needle-3")
    assert display.GetSegmentOpacity2DFill("vessel-1") == pytest.approx(mrml.RELOCALIZING_FILL_OPACITY)
    assert tag("vessel-2") == "VISIBLE"
