"""The Slicer side of the OpenIGTLink gateway: received label maps into a segmentation node. No torch, no Qt.

When the module runs as a client of ``ultramotion-igt serve`` (a vtkMRMLIGTLConnectorNode, client
type, on the gateway's port), SlicerOpenIGTLink keeps one node per device name (see
`UltramotionIGTLib.services.protocol` for what is sent):

- a scalar volume ``<output>``: the label map, with the input frame's IJK-to-RAS, and every IMAGE
  metadata entry ``K`` as the attribute ``OpenIGTLink.K`` (segment names, colours, label values);
- a linear transform ``<output>``: the frame's pose;
- a markups point list ``<output>_Targets`` and a text node ``<output>_KPI`` (the KPI JSON,
  `protocol.parse_kpi_string`, which feeds `UltramotionIGTLib.slicer.indicators.KpiTracker`).

`GatewaySegmentationUpdater.update(label_volume)` turns the label volume into one segment per
target (named ``vessel-3``, coloured by class, voxel for voxel on the frame) through
`UltramotionIGTLib.slicer.mrml.SegmentationWriter`, in place, with no node created per frame.
`host_result_from_volume` / `host_result_from_message` give the same data as a `HostResult` (for a
volume node, or a pyigtl ``ImageMessage`` received without Slicer).
"""

from __future__ import annotations

from typing import Any

from UltramotionIGTLib.services import protocol
from UltramotionIGTLib.slicer import mrml


def metadata_from_node(node: Any, prefix: str = protocol.SLICER_METADATA_PREFIX) -> dict[str, str]:
    """The OpenIGTLink metadata SlicerOpenIGTLink stored on ``node`` (attributes ``<prefix><key>``)."""
    return protocol.metadata_from_attributes(
        {name: node.GetAttribute(name) for name in node.GetAttributeNames()}, prefix
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


class GatewaySegmentationUpdater:
    """Keeps a segmentation node showing the newest label map received from the gateway.

    ``segmentation_node``: vtkMRMLSegmentationNode to fill (segments tagged as the writer's own;
    a user's segments are left alone). Call `update` whenever the label volume is modified (its
    ``ImageDataModifiedEvent``), on the main thread. The segmentation takes the label volume's
    parent transform (the masks are in that volume's coordinates).
    """

    def __init__(self, segmentation_node: Any) -> None:
        self.segmentation_node = segmentation_node
        self.writer: mrml.SegmentationWriter | None = None
        self.last_result: Any = None

    def update(self, label_volume_node: Any) -> list[str]:
        """Write the label volume's segments; returns the segment ids, in metadata order."""
        geometry = mrml.geometry_from_volume(label_volume_node)
        result = host_result_from_volume(label_volume_node)
        if self.writer is None:
            self.writer = mrml.SegmentationWriter(self.segmentation_node, geometry)
        elif not geometry.is_same(self.writer.geometry):
            self.writer.set_geometry(geometry)
        transform_id = label_volume_node.GetTransformNodeID()
        if transform_id != self.segmentation_node.GetTransformNodeID():
            self.segmentation_node.SetAndObserveTransformNodeID(transform_id)
        self.last_result = result
        return self.writer.write(result)
