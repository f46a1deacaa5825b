"""Issue 13, kind 5: one segment naming rule, the same in the file, in Slicer and in the summary.

`segment_name`: ``<class>-<id>`` per tracked target, ``<class>-untracked`` for a class's detections
without a track id (tentative, or tracking off), merged into one segment. The table: a frame's
targets (class, track id) -> the segments it must give. Each row goes through `HostResult.segments`,
the run's writer chain (`SegmentTable`, the segmentation file) and, with slicer-core, the Slicer
writer; all three must agree, mask for mask.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from UltramotionIGTLib.core.packet import HostResult, SegmentTable, segment_name
from UltramotionIGTLib.io import UltrasoundSequence, read_segmentation_sequence
from UltramotionIGTLib.tools import cli

H, W = 24, 32

ROWS = [
    ("tracked targets", [(0, 3), (1, 0)], ["vessel-3", "needle-0"]),
    ("a tentative vessel beside a tracked one", [(0, 0), (0, -1)], ["vessel-0", "vessel-untracked"]),
    ("two untracked vessels are one segment", [(0, -1), (0, -1), (1, 2)], ["vessel-untracked", "needle-2"]),
    ("tracking off: one segment per class", [(0, -1), (1, -1), (0, -1), (1, -1)],
     ["vessel-untracked", "needle-untracked"]),
]  # fmt: skip


def _result(targets: list[tuple[int, int]]) -> HostResult:
    m = len(targets)
    masks = np.zeros((m, H, W), bool)
    for i in range(m):
        masks[i, 2 + i * 5 : 5 + i * 5, 3 : 3 + 4 * (i + 1)] = True  # distinct, non-overlapping
    return HostResult(
        0, (H, W), np.zeros((m, 4), np.float32), np.linspace(0.9, 0.6, m, dtype=np.float32),
        np.array([c for c, _ in targets]), np.zeros((m, 2), np.float32), masks.sum(axis=(1, 2)).astype(np.float32),
        np.array([t for _, t in targets]), masks,
    )  # fmt: skip


@pytest.mark.parametrize("targets, names", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_one_naming_rule_everywhere(targets, names, tmp_path) -> None:
    from UltramotionIGTLib.tools.outputs import OutputFolder, RunRecorder

    result = _result(targets)
    assert result.segment_names() == [segment_name(("vessel", "needle")[c], t) for c, t in targets]
    segments = result.segments()
    assert [name for name, _, _ in segments] == names
    expected = {name: np.zeros((H, W), bool) for name in names}
    for i, name in enumerate(result.segment_names()):
        expected[name] |= result.masks[i]
    for name, _, mask in segments:
        np.testing.assert_array_equal(mask, expected[name])

    # the file: one label value per segment name, its pixels = the segment's mask
    table = SegmentTable()
    ref = UltrasoundSequence(frames=np.zeros((1, H, W), np.uint8))
    recorder = RunRecorder(OutputFolder.open(tmp_path / "out"), "test", {}, geometry=ref, frames=1)
    recorder.add_item(table.labelmap(result), None, table.segments())
    recorder.close({"frames_out": 1})
    seg = read_segmentation_sequence(tmp_path / "out" / "segmentation.seq.nrrd")
    assert [s.name for s in seg.segments] == names
    for info in seg.segments:
        np.testing.assert_array_equal(seg.labelmaps[0] == info.value, expected[info.name])

    # Slicer: the same segments, the same masks
    pytest.importorskip("slicer", reason="slicer-core provides MRML")
    import vtk.util.numpy_support as numpy_support

    from UltramotionIGTLib.slicer import mrml

    ctx = mrml.create_standalone_context()
    try:
        node = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        geometry = mrml.FrameGeometry.from_matrix(np.diag([-1.0, -1.0, 1.0, 1.0]), (H, W))
        assert mrml.SegmentationWriter(node, geometry).write(result) == names
        segmentation = node.GetSegmentation()
        assert [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())] == names
        for name in names:
            image = segmentation.GetSegment(name).GetRepresentation("Binary labelmap")
            voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(H, W) > 0
            np.testing.assert_array_equal(voxels, expected[name])
    finally:
        ctx.close()


def test_no_track_says_what_it_does(random_models, tmp_path, capsys) -> None:
    """--no-track: every target untracked, one segment per class, and the summary says so."""
    frames = np.random.default_rng(3).integers(0, 256, (2, 48, 64), dtype=np.uint8)
    np.save(tmp_path / "f.npy", frames)
    argv = ["run", "--input", str(tmp_path / "f.npy"), "--out", str(tmp_path / "out"), "--detector",
            str(random_models[0]), "--sam", str(random_models[1]), "--device", "cpu", "--quiet",
            "--score-threshold", "0", "--no-track"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {s["name"] for s in summary["segments"]} <= {"vessel-untracked", "needle-untracked"}
    assert summary["segments"] and all(s["untracked"] for s in summary["segments"])
    assert "'<class>-untracked'" in summary["naming"]
    cli.main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "'<class>-untracked'" in help_text and "one segment" in help_text
