"""Remote gateway mode: the Slicer module as a client of ``ultramotion-igt serve``, with no torch in Slicer.

- End to end: a real in-process `Gateway` (the demo models on CPU) fed by the PLUS simulator streaming a
  real recording, its label maps, poses and KPI strings received over a real OpenIGTLink socket on
  127.0.0.1 (`services.igtl.IgtlClient`) and put into MRML as SlicerOpenIGTLink's connector does
  (`StandInConnector`: SlicerOpenIGTLink itself is not in slicer-core), the controller's
  `RemoteSession` turning them into the output segmentation and the KPI panel. Each mask is checked
  voxel for voxel, in world coordinates, against its frame's echoed pose, although the next frame's
  TRANSFORM has already moved the pose node when the mask is written.
- The module's own remote path (Slicer's Python layer, the real logic) in a fresh interpreter: it
  never imports torch, and without SlicerOpenIGTLink it says what to install.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (pip install slicer-core) provides MRML")
vtk = pytest.importorskip("vtk")
pytest.importorskip("pyigtl")

from test_gateway import POSE, RECORDING, free_port, wait_until  # noqa: E402
from test_live_worker import frame_voxels_world, mask_voxels_world  # noqa: E402

from UltramotionIGTLib.services import protocol  # noqa: E402
from UltramotionIGTLib.services.igtl import BadMessage, IgtlClient  # noqa: E402
from UltramotionIGTLib.slicer import mrml  # noqa: E402
from UltramotionIGTLib.slicer.controller import SessionController  # noqa: E402
from UltramotionIGTLib.slicer.gateway_client import host_result_from_message  # noqa: E402
from UltramotionIGTLib.slicer.indicators import PathState, status_light  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


class StandInConnector:
    """What SlicerOpenIGTLink's vtkMRMLIGTLConnectorNode does with incoming messages, on the main thread.

    One node per device name and type: IMAGE -> vtkMRMLScalarVolumeNode (voxels and IJK-to-RAS),
    TRANSFORM -> vtkMRMLLinearTransformNode, STRING -> vtkMRMLTextNode; each metadata entry K becomes
    the node attribute ``OpenIGTLink.K``. Like the connector, a message is applied inside the node's
    StartModify/EndModify, so observers see the node's new content and attributes together.
    Messages come from a real client socket (`IgtlClient`, its own thread) through a queue.
    """

    def __init__(self, scene, port: int) -> None:
        self.scene = scene
        self.inbox: queue.Queue = queue.Queue()
        self.counts: dict[str, int] = {}
        self.client = IgtlClient("127.0.0.1", port, name="gateway", on_message=self.inbox.put).start()

    def node(self, class_name: str, name: str):
        return self.scene.GetFirstNode(name, class_name) or self.scene.AddNewNodeByClass(class_name, name)

    def apply(self, message) -> str:
        assert not isinstance(message, BadMessage), message
        kind = message.message_type
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if kind == "IMAGE":
            node = self.node("vtkMRMLScalarVolumeNode", message.device_name)
        elif kind == "TRANSFORM":
            node = self.node("vtkMRMLLinearTransformNode", message.device_name)
        elif kind == "STRING":
            node = self.node("vtkMRMLTextNode", message.device_name)
        else:
            return kind  # POINT: SlicerOpenIGTLink's markups; the session does not read them
        was_modifying = node.StartModify()
        try:
            for key, value in (message.metadata or {}).items():
                node.SetAttribute(protocol.SLICER_METADATA_PREFIX + key, str(value))
            if kind == "IMAGE":
                geometry = mrml.FrameGeometry.from_matrix(
                    message.ijk_to_world_matrix, message.image.shape[1:]
                )
                mrml.write_frame_to_volume(node, message.image[0], geometry)
            elif kind == "TRANSFORM":
                node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(message.matrix))
            else:
                node.SetText(message.string)
        finally:
            node.EndModify(was_modifying)
        return kind

    def stop(self) -> None:
        self.client.stop()


@pytest.fixture(scope="module")
def pipeline():
    from UltramotionIGTLib.core.pipeline import Pipeline, PipelineConfig
    from UltramotionIGTLib.models.packs import default_models

    models = default_models()
    return Pipeline.from_paths(models["detector"], models["sam"], config=PipelineConfig(device="cpu"))


@pytest.mark.plus
def test_remote_session_shows_the_gateway_stream_with_each_frame_pose_and_its_kpis(pipeline, plus_dir):
    from UltramotionIGTLib.io import read_sequence
    from UltramotionIGTLib.services.gateway import Gateway, GatewayConfig
    from UltramotionIGTLib.services.plus_simulator import PlusSimulator

    recording = read_sequence(plus_dir / RECORDING)
    context = mrml.create_standalone_context()
    plus_port = free_port()
    gateway = Gateway(
        pipeline,
        GatewayConfig(plus_host="127.0.0.1", plus_port=plus_port, listen_port=0, plus_retry_max_s=0.2),
    ).start()
    connector = StandInConnector(context.scene, gateway.listen_port)
    simulator = PlusSimulator(recording, rate_hz=30.0, port=plus_port, passes=1, queue_limit=64)
    controller = SessionController()
    session = controller.start_remote(context.scene, None)  # the connector's nodes appear later
    assert session.running and "waiting" in session.status_message
    segmentation = controller.output_node
    transforms: dict[float, np.ndarray] = {}  # echoed poses by frame timestamp
    written, moved_before_write, voxels_checked, strings = 0, 0, 0, 0
    last_image = None
    sources: set[str] = set()

    def check_written(image) -> tuple[int, bool]:
        """The segmentation shows ``image``: its segments voxel for voxel, at the frame's pose."""
        expected = host_result_from_message(image)
        assert sorted(segmentation.GetSegmentation().GetSegmentIDs()) == sorted(expected.segment_names())
        pose = transforms[round(image.timestamp, 6)]
        geometry = mrml.FrameGeometry.from_matrix(image.ijk_to_world_matrix, image.image.shape[1:])
        count = 0
        for row, name in enumerate(expected.segment_names()):
            ijk, world = mask_voxels_world(segmentation, name)
            labelled = np.zeros(image.image.shape[1:], bool)
            labelled[ijk[:, 1].astype(int), ijk[:, 0].astype(int)] = True
            np.testing.assert_array_equal(
                labelled, image.image[0] == int(image.metadata[f"Segment{row}_LabelValue"])
            )
            np.testing.assert_allclose(world, frame_voxels_world(geometry, pose, ijk), atol=1e-4)
            count += len(ijk)
        pose_node = context.scene.GetFirstNode(image.device_name, "vtkMRMLLinearTransformNode")
        now = slicer.util.arrayFromTransformMatrix(pose_node)
        return count, not np.allclose(now, pose, atol=1e-6)

    try:
        wait_until(lambda: gateway.server.connections, what="the stand-in connector to connect")
        simulator.start()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                message = connector.inbox.get(timeout=0.05)
            except queue.Empty:
                finished = simulator.done.is_set() and simulator.drained()
                stats = gateway.stats()
                if (
                    finished
                    and stats["frames_in"] == simulator.frames_sent
                    and stats["processed"] + stats["dropped"] == stats["frames_in"]
                    and strings == stats["processed"] - stats["client_drops"]
                ):
                    break
                continue
            kind = connector.apply(message)
            if kind == "TRANSFORM":
                transforms[round(message.timestamp, 6)] = np.asarray(message.matrix, float)
                sources.add(message.metadata["SourceTransform"])
            strings += kind == "STRING"
            # step once the next frame's TRANSFORM has moved the pose node (or at the end): the mask
            # must still get its own frame's pose
            if kind == "TRANSFORM" and last_image is not None:
                assert controller.step()
                count, moved = check_written(last_image)
                written, voxels_checked, moved_before_write = (
                    written + 1,
                    voxels_checked + count,
                    moved_before_write + moved,
                )
                last_image = None
            if kind == "IMAGE":
                last_image = message
        else:
            raise AssertionError(f"the stream did not finish: {gateway.status_line()}")
        if last_image is not None:
            assert controller.step()
            count, _ = check_written(last_image)
            written, voxels_checked = written + 1, voxels_checked + count
        controller.step()  # reads the last KPI string
    finally:
        connector.stop()
        summary = gateway.stop()
        simulator.stop()

    g = summary["gateway"]
    assert g["frames_in"] == 21 and g["processed"] >= 2
    assert written == connector.counts["IMAGE"] == g["processed"] - g["client_drops"]
    assert voxels_checked > 0, "the demo models found nothing in the recording: the pose check would be empty"
    assert moved_before_write >= written - 1 > 0, "the pose node had moved on before each write"
    assert (session.frames_received, session.frames_processed, session.frames_dropped) == (
        written,
        written,
        0,
    )
    assert "receiving label maps" in session.status_message
    # the KPI panel from the STRING records: the gateway's own device, stages and counters
    assert session.kpi.frames == strings == written
    assert session.kpi.last.extra["source"] == "Image" and session.kpi.last.frames_received == 21
    assert "mrml" in session.kpi.last.stage_ms  # this side's write time, added to the gateway's record
    snapshot = controller.snapshot()
    assert snapshot.device == "cpu" and snapshot.path == "gpu_resident"
    assert snapshot.frames_received == 21 and snapshot.frames_processed == written
    assert status_light(snapshot).state is PathState.CPU
    panel = controller.indicator_texts()["panel"]
    assert f"{written} processed" in panel and "sam_decoder" in panel
    controller.stop("done")
    assert not controller.running
    context.close()
    assert sources == {POSE}  # the poses are the recording's own tracking, echoed by the gateway


REMOTE_MODULE_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from slicer_layer import SlicerLayer, layer_dir

layer = SlicerLayer(layer_dir()).install()
module = layer.module
import numpy as np
import slicer

from UltramotionIGTLib.core.kpi import FrameRecord, format_kpi
from UltramotionIGTLib.errors import MissingExtensionError
from UltramotionIGTLib.services import protocol
from UltramotionIGTLib.slicer import mrml

scene = slicer.mrmlScene
logic = module.UltramotionIGTLogic()
node = logic.getParameterNode()
node.mode = module.Mode.REMOTE
node.gatewayHost = "gpu-box.example.org"
try:
    logic.start(node)
    raise SystemExit("a connector needs SlicerOpenIGTLink: MissingExtensionError expected")
except MissingExtensionError as error:
    assert "SlicerOpenIGTLink" in str(error), error

node.gatewayHost = ""  # a connector set up by the user: the module only listens
logic.start(node)
assert node.runState == module.RunState.RUNNING, node.statusMessage
output = node.outputSegmentation

# what SlicerOpenIGTLink makes of a gateway frame: pose TRANSFORM, label map IMAGE, KPI STRING
labels = np.zeros((40, 60), np.uint8)
labels[5:15, 10:30] = 1
labels[20:35, 40:55] = 2
segments = [
    protocol.LabelSegment(1, "vessel-3", (0.9, 0.25, 0.25), "vessel", 3, 0.8),
    protocol.LabelSegment(2, "needle-100", (0.95, 0.85, 0.15), "needle", 100, 0.7),
]
names = protocol.output_names("Image_Segmentation")
pose = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", names.transform)
matrix = np.eye(4); matrix[:3, 3] = (10.0, -4.0, 2.5)
pose.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", names.image)
was = volume.StartModify()
metadata = protocol.segments_to_metadata(segments)
metadata.update({protocol.META_FRAME_NUMBER: "7", protocol.META_KPI_DEVICE: names.kpi,
                 protocol.META_POSE_TRANSFORM: "ProbeToTracker", protocol.META_CLASS_NAMES: '["vessel", "needle"]'})
for key, value in metadata.items():
    volume.SetAttribute(protocol.SLICER_METADATA_PREFIX + key, value)
mrml.write_frame_to_volume(volume, labels, mrml.FrameGeometry.from_matrix(np.diag([0.2, 0.3, 1.0, 1.0]), labels.shape))
volume.EndModify(was)
text = scene.AddNewNodeByClass("vtkMRMLTextNode", names.kpi)
record = FrameRecord(frame=7, stage_ms={"detector": 4.0, "sam_decoder": 2.0}, targets=2, device="cuda:0",
                     path="gpu_resident", latency_ms=21.0, latency_reference="acquisition",
                     frames_received=9, frames_processed=8, frames_dropped=1)
text.SetText(format_kpi(record))
pose.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(np.eye(4)))  # the next frame's pose came

assert logic.processPending() == 1
ids = sorted(output.GetSegmentation().GetSegmentIDs())
placed = slicer.util.arrayFromTransformMatrix(output.GetParentTransformNode())
texts = logic.indicatorTexts()
print(json.dumps({
    "ids": ids,
    "translation": placed[:3, 3].tolist(),
    "panel": texts["panel"],
    "light": texts["lightTooltip"],
    "torch": "torch" in sys.modules,
    "pauses": layer.app.render_pauses,
}))
"""


def test_the_module_remote_path_imports_no_torch_and_fills_the_panel():
    from slicer_layer import layer_dir

    if layer_dir() is None:
        pytest.skip("3D Slicer's Python layer not found (../shared/slicer-python)")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", REMOTE_MODULE_SCRIPT, str(REPO_ROOT / "Testing")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["torch"] is False
    assert out["ids"] == ["needle-100", "vessel-3"]
    assert out["translation"] == [10.0, -4.0, 2.5]  # the pose at arrival, not the newer identity
    assert "1 processed" in out["panel"] and "1 of 9 received" in out["panel"]  # the gateway's counts
    assert "mrml" in out["panel"]  # this side's write, added to the gateway's stages
    assert "cuda" in out["panel"].lower() and "detector" in out["panel"]
    assert "GPU" in out["light"]
    assert out["pauses"] == 1  # the write ran inside slicer.util.RenderBlocker
