"""The Slicer side of the OpenIGTLink gateway: received label maps into a segmentation node. No torch, no Qt.

When the module runs as a client of ``ultramotion-igt serve`` (its "Remote gateway" mode: a
vtkMRMLIGTLConnectorNode, client type, on the gateway's port, `connect_to_gateway`),
SlicerOpenIGTLink keeps one node per device name (see `UltramotionIGTLib.services.protocol` for
what is sent):

- a scalar volume ``<output>``: the label map, with the input frame's IJK-to-RAS, and every IMAGE
  metadata entry ``K`` as the attribute ``OpenIGTLink.K`` (segment names, colours, label values);
- a linear transform ``<output>``: the frame's pose (sent before the IMAGE);
- a markups point list ``<output>_Targets`` and a text node ``<output>_KPI`` (the KPI JSON,
  `protocol.parse_kpi_string` -> `FrameRecord.from_dict` -> the session's `KpiAggregator`).

`RemoteSession` (the `Session` the controller runs in remote mode) follows those nodes: each label
map that arrives is marked pending with its pose (`arrival_pose`); ``step()`` writes the newest one
through `GatewaySegmentationUpdater` (one segment per target, named ``vessel-3`` as in the
metadata, coloured by class, voxel for voxel on the frame, in place: no node per frame) and feeds
the KPI records of the STRING messages to the indicators. `host_result_from_volume` /
`host_result_from_message` give the same data as a `HostResult` (for a volume node, or a pyigtl
``ImageMessage`` received without Slicer).
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from UltramotionIGTLib.core.kpi import FrameRecord, KpiAggregator, KpiSink, safe_log_kpi
from UltramotionIGTLib.errors import MissingExtensionError
from UltramotionIGTLib.services import protocol
from UltramotionIGTLib.slicer import mrml
from UltramotionIGTLib.slicer.pose import OutputPose, transform_node_to_world
from UltramotionIGTLib.slicer.sessions import SessionState, _observer, _ObserverSet

LOG = logging.getLogger(__name__)

#: Name of the OpenIGTLink connector node the module creates for the gateway.
CONNECTOR_NODE_NAME = "UltramotionIGT gateway"


def metadata_from_node(node: Any, prefix: str = protocol.SLICER_METADATA_PREFIX) -> dict[str, str]:
    """The OpenIGTLink metadata SlicerOpenIGTLink stored on ``node`` (attributes ``<prefix><key>``)."""
    return protocol.metadata_from_attributes(
        {name: node.GetAttribute(name) for name in node.GetAttributeNames()}, prefix
    )


def is_gateway_label_map(node: Any) -> bool:
    """Whether a volume node carries the gateway's label map metadata (``OpenIGTLink.SegmentCount``)."""
    return (
        node is not None
        and node.IsA("vtkMRMLVolumeNode")
        and node.GetAttribute(protocol.SLICER_METADATA_PREFIX + protocol.META_SEGMENT_COUNT) is not None
    )


def host_result_from_volume(label_volume_node: Any) -> Any:
    """A `HostResult` from a received label map volume node and its ``OpenIGTLink.*`` attributes.

    One target per segment listed in the metadata (`protocol.host_result_from_labelmap`): masks
    HxW bool in the volume's voxel grid. Raises `UnsupportedImageTypeError` for a volume that is
    not one 2-D integer slice, ValueError for unreadable segment metadata.
    """
    labelmap = mrml.frame_from_volume(label_volume_node)
    return protocol.host_result_from_labelmap(labelmap, metadata_from_node(label_volume_node))


def host_result_from_message(image_message: Any) -> Any:
    """A `HostResult` from a pyigtl ``ImageMessage`` sent by the gateway (``image`` 1xHxW, ``metadata``)."""
    return protocol.host_result_from_labelmap(image_message.image, dict(image_message.metadata or {}))


def pose_transform_node(label_volume_node: Any) -> Any:
    """The transform node that holds a received label map's pose, or None (no pose).

    The label volume's own parent transform when it has one (the user placed it); else the linear
    transform node SlicerOpenIGTLink made for the gateway's TRANSFORM of the same device name (sent
    when the gateway had a pose for the frame: metadata ``PoseTransform`` not empty).
    """
    parent = label_volume_node.GetParentTransformNode()
    if parent is not None:
        return parent
    if not label_volume_node.GetAttribute(protocol.SLICER_METADATA_PREFIX + protocol.META_POSE_TRANSFORM):
        return None
    scene = label_volume_node.GetScene()
    name = label_volume_node.GetName()
    return scene.GetFirstNode(name, "vtkMRMLLinearTransformNode") if scene is not None and name else None


def arrival_pose(label_volume_node: Any) -> tuple[np.ndarray | None, str | None]:
    """(transform to world now, transform node ID) of a label map's pose (`pose_transform_node`);
    (identity, None) without one; matrix None for a non-linear chain. Read when the label map arrives:
    the gateway sends the TRANSFORM before the IMAGE, so the pose node holds this frame's pose then."""
    node = pose_transform_node(label_volume_node)
    if node is None:
        return np.eye(4), None
    return transform_node_to_world(node), node.GetID()


class GatewaySegmentationUpdater:
    """Keeps a segmentation node showing the newest label map received from the gateway.

    ``segmentation_node``: vtkMRMLSegmentationNode to fill (segments tagged as the writer's own;
    a user's segments are left alone). Call `update` whenever the label volume is modified (its
    ``ImageDataModifiedEvent``), on the main thread. The segmentation is placed with the frame's
    pose (`UltramotionIGTLib.slicer.pose.OutputPose`): ``pose`` as read at arrival
    (`arrival_pose`), or read at the call.
    """

    def __init__(self, segmentation_node: Any) -> None:
        self.segmentation_node = segmentation_node
        self.writer: mrml.SegmentationWriter | None = None
        self.pose = OutputPose(segmentation_node)
        self.last_result: Any = None

    def update(
        self, label_volume_node: Any, pose: tuple[np.ndarray | None, str | None] | None = None
    ) -> list[str]:
        """Write the label volume's segments; returns the segment ids, in metadata order."""
        geometry = mrml.geometry_from_volume(label_volume_node)
        result = host_result_from_volume(label_volume_node)
        if self.writer is None:
            self.writer = mrml.SegmentationWriter(self.segmentation_node, geometry)
        elif not geometry.is_same(self.writer.geometry):
            self.writer.set_geometry(geometry)
        matrix, parent_id = arrival_pose(label_volume_node) if pose is None else pose
        self.pose.place(matrix, parent_id, (self.segmentation_node,))
        self.last_result = result
        return self.writer.write(result)


def connect_to_gateway(scene: Any, host: str, port: int) -> Any:
    """Start an OpenIGTLink client connector (SlicerOpenIGTLink) to the gateway at ``host:port``.

    Reuses the connector `CONNECTOR_NODE_NAME` of the scene (restarted when its address differs or
    it is off). Returns the vtkMRMLIGTLConnectorNode. Raises `MissingExtensionError` when the
    SlicerOpenIGTLink extension is not installed.
    """
    import slicer

    if getattr(slicer, "vtkMRMLIGTLConnectorNode", None) is None:
        raise MissingExtensionError(
            "Remote gateway mode receives the segmentation over OpenIGTLink: install the "
            "'SlicerOpenIGTLink' extension from the Extensions Manager and restart Slicer (or use live "
            "mode, which runs the models in Slicer)."
        )
    connector = scene.GetFirstNode(CONNECTOR_NODE_NAME, "vtkMRMLIGTLConnectorNode")
    if connector is None:
        connector = scene.AddNewNodeByClass("vtkMRMLIGTLConnectorNode", CONNECTOR_NODE_NAME)
    same = (connector.GetServerHostname(), connector.GetServerPort()) == (host, int(port))
    if not same or connector.GetState() == connector.StateOff:
        connector.Stop()
        connector.SetTypeClient(host, int(port))
        connector.Start()
    return connector


class RemoteSession:
    """The `Session` of remote gateway mode: label maps from ``ultramotion-igt serve`` into a segmentation.

    Args:
        scene: the vtkMRMLScene the OpenIGTLink connector fills.
        output_segmentation_node: vtkMRMLSegmentationNode; one segment per label (names from the
            metadata), placed with each frame's pose (`arrival_pose`).
        label_volume_node: the received label map volume, when known; else the first volume node
            whose image changes while carrying the gateway's metadata (`is_gateway_label_map`) is
            followed (the connector creates it on the first IMAGE).
        status_callback / kpi_sink / render_pause: as for `LiveSession`.

    ``step()`` writes the newest label map that arrived (newest wins: one replaced before a step
    is counted as dropped) and reads the newest KPI STRING (the text node named by the metadata's
    ``KpiDevice``) into ``kpi``: the gateway's `FrameRecord`s (device, stage times, latency, its
    counters), with this side's write time as stage ``mrml``. No torch, no pipeline.
    """

    def __init__(
        self,
        scene: Any,
        output_segmentation_node: Any,
        label_volume_node: Any = None,
        *,
        status_callback: Callable[[str], None] | None = None,
        kpi_sink: KpiSink | None = None,
        render_pause: Callable[[], Any] | None = None,
    ) -> None:
        if output_segmentation_node is None or not output_segmentation_node.IsA("vtkMRMLSegmentationNode"):
            raise ValueError("output_segmentation_node must be a vtkMRMLSegmentationNode")
        if label_volume_node is not None and not label_volume_node.IsA("vtkMRMLVolumeNode"):
            raise ValueError("label_volume_node must be a volume node (the received label map)")
        self.scene = scene
        self.output_segmentation_node = output_segmentation_node
        self.label_volume_node = label_volume_node
        self.status_callback = status_callback
        self.kpi_sink = kpi_sink
        self.render_pause = render_pause or contextlib.nullcontext
        self.updater = GatewaySegmentationUpdater(output_segmentation_node)
        self.state = SessionState.IDLE
        self.status_message = "idle"
        self.frames_received = 0
        self.frames_processed = 0
        self.frames_dropped = 0
        self.kpi = KpiAggregator(window=300)
        self.last_result: Any = None
        self._pending: tuple[float, tuple[np.ndarray | None, str | None]] | None = None
        self._observers = _ObserverSet()
        self._watched: set[str] = set()  # IDs of the volume nodes observed for label maps
        self._kpi_mtime = 0
        self._kpi_frame: int | None = None
        self._write_ms: OrderedDict[int, float] = OrderedDict()  # frame number -> our write time

    # -- Session protocol ----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.state.running

    @property
    def done(self) -> bool:
        return self.state.done

    @property
    def frames_in_flight(self) -> int:
        return 1 if self._pending is not None else 0

    def gateway_counters(self) -> tuple[int | None, int | None]:
        """(frames received, frames dropped) as the gateway counts them (its last KPI record: the
        end-to-end view of the stream, drops at the gateway included), (None, None) before one."""
        last = self.kpi.last
        if last is None or last.frames_received is None:
            return None, None
        return last.frames_received, (last.frames_dropped or 0) + self.frames_dropped

    def start(self) -> None:
        if self.state == SessionState.RUNNING:
            return
        import slicer

        scene = self.scene
        self._observers.add(scene, slicer.vtkMRMLScene.NodeAddedEvent, self._callback("_on_node_added", True))
        self._observers.add(
            scene, slicer.vtkMRMLScene.NodeAboutToBeRemovedEvent, self._callback("_on_node_removed", True)
        )
        self._observers.add(scene, slicer.vtkMRMLScene.StartCloseEvent, self._callback("_on_scene_closing"))
        if self.label_volume_node is not None:
            self._watch(self.label_volume_node)
        else:
            volumes = scene.GetNodesByClass("vtkMRMLVolumeNode")
            for i in range(volumes.GetNumberOfItems()):
                self._watch(volumes.GetItemAsObject(i))
        self._set_state(SessionState.RUNNING, self._receiving_message())
        node = self.label_volume_node
        if node is not None and node.GetImageData() is not None and is_gateway_label_map(node):
            self._on_label_map(node)

    def stop(self, reason: str = "stopped by user") -> None:
        self._finish(SessionState.STOPPED, reason)

    def step(self, wait: float | None = None) -> bool:
        """Write the newest label map that arrived and read the newest KPI record. ``wait``: unused
        (nothing is computed here). Returns True when a label map was written; never raises."""
        if not self.running:
            return False
        if self._pending is None:
            self._read_kpi()
            return False
        arrival, pose = self._pending
        self._pending = None
        node = self.label_volume_node
        try:
            if self.output_segmentation_node.GetScene() is None:
                self.frames_dropped += 1
                self._finish(
                    SessionState.STOPPED, "stopped: the output segmentation was removed from the scene"
                )
                return False
            t0 = time.perf_counter()
            with self.render_pause():
                self.updater.update(node, pose)
            write_ms = (time.perf_counter() - t0) * 1000.0
        except Exception as exc:  # noqa: BLE001 - by contract: report, stop, never raise to the timer
            LOG.exception("remote session: label map %d could not be shown", self.frames_received - 1)
            self.frames_dropped += 1
            self._finish(
                SessionState.ERROR,
                f"stopped: the received label map could not be shown: {type(exc).__name__}: {exc}",
            )
            return False
        self.frames_processed += 1
        self.last_result = self.updater.last_result
        self._write_ms[int(self.last_result.frame_index)] = write_ms
        while len(self._write_ms) > 64:
            self._write_ms.popitem(last=False)
        self._read_kpi()
        return True

    # -- events ---------------------------------------------------------------------------------------
    def _callback(self, method: str, with_calldata: bool = False) -> Callable[..., None]:
        return _observer(self, method, with_calldata)

    def _watch(self, node: Any) -> None:
        import slicer

        if node is None or not node.IsA("vtkMRMLVolumeNode") or node.GetID() in self._watched:
            return
        ref = weakref.ref(self)

        def arrived(caller: Any, event: Any) -> None:
            session = ref()
            if session is not None:
                try:
                    session._on_label_map(caller)
                except Exception:  # noqa: BLE001 - an observer must not raise into VTK/Qt
                    LOG.exception("remote session: label map observer failed")

        self._observers.add(node, slicer.vtkMRMLVolumeNode.ImageDataModifiedEvent, arrived)
        self._watched.add(node.GetID())

    def _on_node_added(self, node: Any) -> None:
        if self.running and self.label_volume_node is None and node is not None:
            self._watch(node)

    def _on_label_map(self, node: Any) -> None:
        if not self.running:
            return
        if self.label_volume_node is None:
            if not is_gateway_label_map(node):
                return
            self.label_volume_node = node
            self._set_state(SessionState.RUNNING, self._receiving_message())
        elif node is not self.label_volume_node:
            return
        self.frames_received += 1
        if self._pending is not None:
            self.frames_dropped += 1
        self._pending = (mrml.now(), arrival_pose(node))

    def _on_node_removed(self, node: Any) -> None:
        if not self.running or node is None:
            return
        if node.GetID() == self.output_segmentation_node.GetID():
            self._finish(SessionState.STOPPED, "stopped: the output segmentation was removed from the scene")
        elif self.label_volume_node is not None and node.GetID() == self.label_volume_node.GetID():
            self._finish(SessionState.STOPPED, "stopped: the received label map volume was removed")

    def _on_scene_closing(self) -> None:
        self._finish(SessionState.STOPPED, "stopped: the scene is being closed")

    # -- KPI ------------------------------------------------------------------------------------------
    def _read_kpi(self) -> None:
        """Feed the newest KPI STRING (a text node, named by the label map's ``KpiDevice``) to ``kpi``."""
        node = self.label_volume_node
        if node is None:
            return
        name = node.GetAttribute(protocol.SLICER_METADATA_PREFIX + protocol.META_KPI_DEVICE)
        text_node = self.scene.GetFirstNode(name, "vtkMRMLTextNode") if name else None
        if text_node is None or text_node.GetMTime() == self._kpi_mtime:
            return
        self._kpi_mtime = text_node.GetMTime()
        try:
            record = FrameRecord.from_dict(protocol.parse_kpi_string(text_node.GetText() or ""))
        except (ValueError, TypeError) as exc:
            LOG.debug("remote session: not a KPI record in %s: %s", name, exc)
            return
        if record.frame == self._kpi_frame:
            return
        self._kpi_frame = record.frame
        if record.frame in self._write_ms:
            record.stage_ms["mrml"] = self._write_ms[record.frame]
        self.kpi.add(record)
        if self.kpi_sink is not None:
            safe_log_kpi(record, self.kpi_sink)

    # -- state ----------------------------------------------------------------------------------------
    def _receiving_message(self) -> str:
        node = self.label_volume_node
        if node is None:
            return "waiting for label maps from the gateway"
        return f"receiving label maps from the gateway in {mrml._node_label(node)}"

    def _finish(self, state: SessionState, reason: str) -> None:
        if self.state not in (SessionState.RUNNING, SessionState.IDLE):
            return
        self.state = state
        self._observers.remove_all()
        self._watched.clear()
        if self._pending is not None:
            self._pending = None
            self.frames_dropped += 1
        self._set_state(state, reason)

    def _set_state(self, state: SessionState, message: str) -> None:
        self.state = state
        self.status_message = message
        (LOG.error if state == SessionState.ERROR else LOG.info)("remote session: %s", message)
        if self.status_callback is not None:
            try:
                self.status_callback(message)
            except Exception:  # noqa: BLE001 - a display callback must not break the session
                LOG.exception("status callback failed")
