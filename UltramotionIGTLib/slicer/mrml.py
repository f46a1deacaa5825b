"""The MRML bridge: the only library code that touches MRML (volume, segmentation, markups, sequences).

It runs unchanged inside 3D Slicer and against ``slicer-core`` from PyPI (the real MRML and
vtkSegmentationCore C++ libraries, no Qt), which is how the tests exercise it. ``slicer``, ``vtk``
and MRML are imported inside the functions, never at module scope, so ``import
UltramotionIGTLib.slicer.mrml`` is cheap and works without Slicer.

Conventions (all of them MRML's):

- A frame is a volume with one slice. Its vtkImageData has dimensions (W, H, 1); the numpy view has
  shape (1, H, W) (or (1, H, W, C) for a vector volume), so ``frame[j, i]`` is voxel IJK ``(i, j, 0)``
  (offset by the image extent's start, normally 0).
- A volume node's geometry lives in the node (``GetIJKToRASMatrix``: spacing, origin and direction),
  not in its vtkImageData. `FrameGeometry` carries that 4x4 matrix plus the extent.
- Masks from a `HostResult` are MxHxW in the frame's pixel grid. `SegmentationWriter` stores each
  mask in a vtkOrientedImageData whose image-to-world matrix *is* the frame's IJK-to-RAS, so a mask
  voxel and the frame voxel under it have the same RAS position by construction (the tests check it
  voxel by voxel). Coordinates are the node's local RAS: a segmentation shown with a volume must have
  the same parent transform (`LiveSession` / `ReplaySession` set it).
- Per-frame updates write into the same vtkOrientedImageData objects in place and call
  ``Modified()`` on them; vtkSegmentation observes its segments' source representation and forwards
  ``SourceRepresentationModified`` to the views. No node is created per frame.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from UltramotionIGTLib.errors import UnsupportedImageTypeError

if TYPE_CHECKING:
    import torch

    from UltramotionIGTLib.core.packet import HostResult

BINARY_LABELMAP = "Binary labelmap"

#: Tag set on every segment a `SegmentationWriter` creates (value "1"), so that a later writer on
#: the same node can tell its predecessors' stale segments from segments a user made.
SEGMENT_TAG = "UltramotionIGT.target"

#: Tag holding a segment's visibility state (``VISIBLE``, ``RELOCALIZING`` or ``LOST``), set by
#: `SegmentationWriter` each frame the state changes: it travels with the segment into saved scenes and
#: recorded sequences.
VISIBILITY_TAG = "UltramotionIGT.visibility"
#: 2-D fill opacity of a RELOCALIZING segment (its outline stays opaque): drawn dimmed.
RELOCALIZING_FILL_OPACITY = 0.3

#: Node attributes that may carry the acquisition time of a frame received over OpenIGTLink, in the
#: order they are tried. SlicerOpenIGTLink (vtkMRMLIGTLConnectorNode) copies every header-v2 metadata
#: entry ``K`` of an incoming message onto the node as the attribute ``"OpenIGTLink." + K``; it does
#: not copy the message header's own timestamp. PlusServer sends each tracked frame's fields as
#: metadata, including ``Timestamp`` (the frame's acquisition time, in PLUS's own clock), which thus
#: arrives as ``OpenIGTLink.Timestamp``. The other names are common spellings of other senders.
TIMESTAMP_ATTRIBUTES: tuple[str, ...] = (
    "OpenIGTLink.Timestamp",
    "OpenIGTLink.timestamp",
    "OpenIGTLink.AcquisitionTimestamp",
    "OpenIGTLink.AcquisitionTime",
)


# -- scene ----------------------------------------------------------------------------------------


@dataclass
class MrmlContext:
    """A scene plus the module logics that make it behave like Slicer's (keeps them alive).

    ``logics``: module name -> logic object (``Volumes``, ``Segmentations``, ``Sequences``,
    ``Markups``, ``SubjectHierarchy`` ...). In Slicer these are ``slicer.modules.<name>.logic()``.
    """

    scene: Any
    app_logic: Any = None
    logics: dict[str, Any] = field(default_factory=dict)

    def logic(self, name: str) -> Any:
        return self.logics.get(name)

    def close(self) -> None:
        """Clear the scene and detach the logics (standalone scenes only)."""
        if self.scene is not None:
            self.scene.Clear(True)
        for logic in self.logics.values():
            logic.SetMRMLScene(None)
        if self.app_logic is not None:
            self.app_logic.SetMRMLScene(None)


def slicer_application_context() -> MrmlContext | None:
    """The running Slicer application's scene and logics, or None outside the Slicer application."""
    import slicer

    scene = getattr(slicer, "mrmlScene", None)
    if scene is None or not hasattr(slicer, "modules"):
        return None
    logics = {}
    for name in ("volumes", "segmentations", "sequences", "markups", "subjecthierarchy"):
        module = getattr(slicer.modules, name, None)
        if module is not None:
            logics[module.name] = module.logic()
    return MrmlContext(scene=scene, app_logic=slicer.app.applicationLogic(), logics=logics)


def create_standalone_context() -> MrmlContext:
    """A new scene initialised the way Slicer's application does, for slicer-core (no Qt).

    Creates a vtkMRMLScene and a vtkSlicerApplicationLogic, then for each module we need creates its
    logic, gives it the application logic, the scene (which registers the module's MRML node classes,
    e.g. vtkMRMLSegmentationNode, vtkMRMLSequenceNode) and registers it with the application logic
    under the module name, as qSlicerCoreApplication / qSlicerAbstractCoreModule do.
    """
    import slicer
    import vtk

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    color_logic = app_logic.GetColorLogic()
    if color_logic is not None:
        color_logic.SetMRMLScene(scene)  # adds the default colour tables
        app_logic.SetModuleLogic("Colors", color_logic)  # the Volumes logic looks it up by this name
    app_logic.SetSliceLogics(vtk.vtkCollection())
    app_logic.SetViewLogics(vtk.vtkCollection())
    logic_classes = (
        ("Volumes", "vtkSlicerVolumesLogic"),
        ("Segmentations", "vtkSlicerSegmentationsModuleLogic"),
        ("Sequences", "vtkSlicerSequencesLogic"),
        ("Markups", "vtkSlicerMarkupsLogic"),
        ("SubjectHierarchy", "vtkSlicerSubjectHierarchyModuleLogic"),
    )
    logics: dict[str, Any] = {}
    for name, class_name in logic_classes:
        cls = getattr(slicer, class_name, None)
        if cls is None:
            continue
        logic = cls()
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        app_logic.SetModuleLogic(name, logic)
        logics[name] = logic
    return MrmlContext(scene=scene, app_logic=app_logic, logics=logics)


# -- geometry -------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FrameGeometry:
    """Where a frame's voxels are: IJK-to-RAS (4x4, float64) and the image extent.

    ``ijk_to_ras`` holds spacing, origin and direction: column c of its 3x3 block is the direction
    of axis c times the spacing along it; its last column is the origin (RAS of voxel IJK (0,0,0)).
    ``extent`` is VTK's (i0, i1, j0, j1, k0, k1), inclusive; a 2D frame has k0 == k1.
    """

    ijk_to_ras: np.ndarray
    extent: tuple[int, int, int, int, int, int]

    @classmethod
    def from_matrix(cls, ijk_to_ras: Any, shape: Sequence[int]) -> FrameGeometry:
        """From a 4x4 matrix (numpy or vtkMatrix4x4) and a frame shape (H, W) or (D, H, W)."""
        matrix = _to_numpy_matrix(ijk_to_ras)
        dims = tuple(int(s) for s in shape)
        d, h, w = (1, *dims) if len(dims) == 2 else dims
        return cls(matrix, (0, w - 1, 0, h - 1, 0, d - 1))

    @classmethod
    def from_spacing_origin_directions(
        cls, spacing: Sequence[float], origin: Sequence[float], directions: Any, shape: Sequence[int]
    ) -> FrameGeometry:
        """``directions``: 3x3, column c = unit direction of IJK axis c in RAS."""
        matrix = np.eye(4)
        matrix[:3, :3] = (
            np.asarray(directions, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)[None, :]
        )
        matrix[:3, 3] = np.asarray(origin, dtype=np.float64)
        return cls.from_matrix(matrix, shape)

    @property
    def dimensions(self) -> tuple[int, int, int]:
        """(W, H, D): VTK order."""
        e = self.extent
        return (e[1] - e[0] + 1, e[3] - e[2] + 1, e[5] - e[4] + 1)

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of one slice: numpy order of a frame."""
        w, h, _ = self.dimensions
        return (h, w)

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def origin(self) -> np.ndarray:
        """RAS of voxel IJK (0, 0, 0) (not of the extent's first voxel when the extent starts elsewhere)."""
        return self.ijk_to_ras[:3, 3].copy()

    @property
    def directions(self) -> np.ndarray:
        """3x3; column c is the unit direction of IJK axis c in RAS."""
        return self.ijk_to_ras[:3, :3] / self.spacing[None, :]

    def ijk_to_ras_points(self, ijk: Any) -> np.ndarray:
        """Nx3 IJK (continuous; integer = voxel centre) -> Nx3 RAS."""
        pts = np.asarray(ijk, dtype=np.float64).reshape(-1, 3)
        return pts @ self.ijk_to_ras[:3, :3].T + self.ijk_to_ras[:3, 3]

    def ras_to_ijk_points(self, ras: Any) -> np.ndarray:
        """Nx3 RAS -> Nx3 continuous IJK."""
        pts = np.asarray(ras, dtype=np.float64).reshape(-1, 3)
        inv = np.linalg.inv(self.ijk_to_ras)
        return pts @ inv[:3, :3].T + inv[:3, 3]

    def pixel_to_ras(self, xy: Any) -> np.ndarray:
        """Nx2 (x = column, y = row) pixel positions of the frame array -> Nx3 RAS (slice k0)."""
        pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        ijk = np.empty((pts.shape[0], 3))
        ijk[:, 0] = pts[:, 0] + self.extent[0]
        ijk[:, 1] = pts[:, 1] + self.extent[2]
        ijk[:, 2] = self.extent[4]
        return self.ijk_to_ras_points(ijk)

    def same_grid(self, other: FrameGeometry, rtol: float = 1e-6, atol: float = 1e-9) -> bool:
        """Same dimensions, spacing and direction (the origin may differ)."""
        return (
            self.dimensions == other.dimensions
            and np.allclose(self.spacing, other.spacing, rtol=rtol, atol=atol)
            and np.allclose(self.directions, other.directions, rtol=rtol, atol=1e-6)
        )

    def is_same(self, other: FrameGeometry | None, atol: float = 1e-9) -> bool:
        """Same extent and IJK-to-RAS (within ``atol``)."""
        return (
            other is not None
            and self.extent == other.extent
            and np.allclose(self.ijk_to_ras, other.ijk_to_ras, rtol=0.0, atol=atol)
        )

    def describe_difference(self, other: FrameGeometry) -> str:
        """Human-readable list of what differs from ``other`` (empty when equal)."""
        diffs = []
        if self.dimensions != other.dimensions:
            diffs.append(f"dimensions {other.dimensions} -> {self.dimensions}")
        if not np.allclose(self.spacing, other.spacing, rtol=1e-6, atol=1e-9):
            diffs.append(f"spacing {_fmt(other.spacing)} -> {_fmt(self.spacing)}")
        if not np.allclose(self.directions, other.directions, atol=1e-6):
            diffs.append("direction changed")
        if not np.allclose(self.origin, other.origin, atol=1e-6):
            diffs.append(f"origin {_fmt(other.origin)} -> {_fmt(self.origin)}")
        return ", ".join(diffs)

    def vtk_matrix(self) -> Any:
        """The IJK-to-RAS matrix as a new vtkMatrix4x4."""
        import vtk

        matrix = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                matrix.SetElement(r, c, float(self.ijk_to_ras[r, c]))
        return matrix


def _fmt(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _to_numpy_matrix(matrix: Any) -> np.ndarray:
    if hasattr(matrix, "GetElement"):
        return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)
    out = np.asarray(matrix, dtype=np.float64)
    if out.shape != (4, 4):
        raise ValueError(f"IJK-to-RAS must be 4x4, got shape {out.shape}")
    return out.copy()


def geometry_from_volume(volume_node: Any) -> FrameGeometry:
    """The frame geometry of a volume node (IJK-to-RAS of the node, extent of its image data)."""
    import vtk

    image = volume_node.GetImageData()
    if image is None:
        raise UnsupportedImageTypeError(f"volume node {_node_label(volume_node)} has no image data yet")
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return FrameGeometry(_to_numpy_matrix(matrix), tuple(int(v) for v in image.GetExtent()))


def _node_label(node: Any) -> str:
    try:
        return f"'{node.GetName()}' ({node.GetID()})"
    except AttributeError:
        return repr(node)


# -- frames ---------------------------------------------------------------------------------------


def array_from_volume(volume_node: Any) -> np.ndarray:
    """Zero-copy numpy view of a volume's voxels: DxHxW, or DxHxWxC for multi-component images.

    The view shares memory with the node's vtkImageData: valid until the image data is replaced or
    reallocated; copy it to keep it.
    """
    from vtk.util import numpy_support

    image = volume_node.GetImageData()
    if image is None:
        raise UnsupportedImageTypeError(f"volume node {_node_label(volume_node)} has no image data yet")
    scalars = image.GetPointData().GetScalars()
    if scalars is None:
        raise UnsupportedImageTypeError(f"volume node {_node_label(volume_node)} has no scalar voxels")
    w, h, d = image.GetDimensions()
    components = scalars.GetNumberOfComponents()
    array = numpy_support.vtk_to_numpy(scalars)
    shape = (d, h, w) if components == 1 else (d, h, w, components)
    return array.reshape(shape)


def frame_from_volume(volume_node: Any) -> np.ndarray:
    """The frame of a one-slice volume node as a zero-copy numpy view: HxW, or HxWx3 for colour.

    Scalar volumes give HxW; vector volumes (RGB, e.g. colour Doppler over OpenIGTLink) HxWx3 (an
    alpha channel is dropped, still as a view). Raises `UnsupportedImageTypeError` for volumes with
    more than one slice (a frame is a 2D image) or without image data.
    """
    array = array_from_volume(volume_node)
    if array.shape[0] != 1:
        raise UnsupportedImageTypeError(
            f"volume node {_node_label(volume_node)} has {array.shape[0]} slices; live segmentation "
            "works on 2D frames (a volume with one slice): select an ultrasound image node"
        )
    frame = array[0]
    if frame.ndim == 3:
        if frame.shape[2] == 4:
            frame = frame[..., :3]
        elif frame.shape[2] not in (1, 3):
            raise UnsupportedImageTypeError(
                f"volume node {_node_label(volume_node)} has {frame.shape[2]} components per voxel; "
                "expected 1 (grayscale) or 3/4 (RGB/RGBA)"
            )
        if frame.shape[2] == 1:
            frame = frame[..., 0]
    return frame


def tensor_from_volume(volume_node: Any, device: Any = None) -> torch.Tensor:
    """The frame as a torch tensor (HxW or HxWx3). Zero-copy on the CPU; one copy to ``device``."""
    import torch

    tensor = torch.from_numpy(frame_from_volume(volume_node))
    return tensor if device is None else tensor.to(device)


def write_frame_to_volume(volume_node: Any, frame: np.ndarray, geometry: FrameGeometry | None = None) -> None:
    """Put an HxW (or HxWxC) frame into a volume node the way a streaming source does.

    When the node already holds image data of the same shape and type the voxels are overwritten in
    place and the image data is marked modified (one ``ImageDataModifiedEvent``, like OpenIGTLink);
    otherwise new image data is set. ``geometry`` (optional) sets the node's IJK-to-RAS.
    """
    import vtk
    from vtk.util import numpy_support

    frame = np.asarray(frame)
    if frame.ndim not in (2, 3):
        raise ValueError(f"frame must be HxW or HxWxC, got shape {frame.shape}")
    h, w = frame.shape[:2]
    components = 1 if frame.ndim == 2 else frame.shape[2]
    wasModifying = volume_node.StartModify()
    try:
        if geometry is not None:
            volume_node.SetIJKToRASMatrix(geometry.vtk_matrix())
        image = volume_node.GetImageData()
        vtk_type = numpy_support.get_vtk_array_type(frame.dtype)
        if (
            image is not None
            and image.GetDimensions() == (w, h, 1)
            and image.GetNumberOfScalarComponents() == components
            and image.GetScalarType() == vtk_type
        ):
            array_from_volume(volume_node).reshape(frame.shape)[...] = frame
            image.Modified()
        else:
            image = vtk.vtkImageData()
            image.SetDimensions(w, h, 1)
            image.AllocateScalars(vtk_type, components)
            numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(frame.shape)[...] = frame
            volume_node.SetAndObserveImageData(image)
    finally:
        volume_node.EndModify(wasModifying)


def new_volume_node(
    scene: Any, frame: np.ndarray, geometry: FrameGeometry | None = None, name: str = "Image"
) -> Any:
    """Add a scalar (HxW) or vector (HxWx3) volume node holding ``frame`` to ``scene``."""
    class_name = "vtkMRMLVectorVolumeNode" if np.asarray(frame).ndim == 3 else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(class_name, name)
    write_frame_to_volume(node, frame, geometry)
    return node


# -- acquisition time -----------------------------------------------------------------------------


def acquisition_timestamp(node: Any, attribute_names: Sequence[str] = TIMESTAMP_ATTRIBUTES) -> float | None:
    """The frame's acquisition time (seconds) from OpenIGTLink metadata attributes, or None.

    The clock is the sender's (PLUS: its own system clock, not Unix time); `LiveSession` decides how
    to compare it with arrival time.
    """
    for name in attribute_names:
        value = node.GetAttribute(name)
        if value:
            try:
                stamp = float(value)
            except ValueError:
                continue
            if math.isfinite(stamp):
                return stamp
    return None


# -- segmentation ---------------------------------------------------------------------------------


class SegmentationWriter:
    """Writes `HostResult` masks into a segmentation node, one segment per target, in place.

    ``segmentation_node``: vtkMRMLSegmentationNode (in a scene or not). ``reference``: the frame's
    `FrameGeometry` or the volume node the masks were computed from. Segments follow the one naming
    rule (`UltramotionIGTLib.core.packet.segment_name`): one per tracked target (``vessel-3``), one per
    class for its untracked detections (``vessel-untracked``, their masks merged), as
    `HostResult.segments` gives them; colours are the class colours.

    Each segment owns one vtkOrientedImageData (uint8, 0/1, label value 1) with the frame's extent
    and IJK-to-RAS; ``write`` copies each mask into it and marks it modified. Images of disappeared
    targets go back to a pool and are reused for new targets: no allocation and no temporary node per
    frame. Segments are tagged `SEGMENT_TAG`; with ``remove_stale`` (default) tagged segments left
    by an earlier writer (a previous run) are removed at construction. Segments without the tag (a
    user's own) are left alone, unless a target's id collides with one (it is then taken over).

    Visibility: each segment's state is in its `VISIBILITY_TAG` tag; where the node has a display
    node, LOST segments are hidden and RELOCALIZING ones drawn dimmed (2-D fill opacity
    `RELOCALIZING_FILL_OPACITY`, outline kept). Display properties change only when a state does.
    """

    def __init__(
        self,
        segmentation_node: Any,
        reference: FrameGeometry | Any,
        create_display_node: bool = True,
        remove_stale: bool = True,
    ) -> None:
        self.segmentation_node = segmentation_node
        self._images: dict[str, tuple[Any, np.ndarray]] = {}
        self._pool: list[tuple[Any, np.ndarray]] = []
        self._states: dict[str, str] = {}
        self.geometry: FrameGeometry | None = None
        if remove_stale:
            segmentation = segmentation_node.GetSegmentation()
            stale = [
                segmentation.GetNthSegmentID(i)
                for i in range(segmentation.GetNumberOfSegments())
                if segmentation.GetNthSegment(i).HasTag(SEGMENT_TAG)
            ]
            for segment_id in stale:
                segmentation.RemoveSegment(segment_id)
        if (
            create_display_node
            and segmentation_node.GetScene() is not None
            and segmentation_node.GetDisplayNode() is None
        ):
            segmentation_node.CreateDefaultDisplayNodes()
        self.set_geometry(
            reference if isinstance(reference, FrameGeometry) else geometry_from_volume(reference)
        )

    @property
    def segment_ids(self) -> list[str]:
        """Ids of the segments this writer currently maintains."""
        return list(self._images)

    def set_geometry(self, geometry: FrameGeometry) -> None:
        """Use a new frame geometry. Same dimensions: images are re-oriented in place; otherwise
        they are reallocated (and the pool emptied)."""
        if self.geometry is not None and self.geometry.dimensions != geometry.dimensions:
            self._pool.clear()
            for segment_id in list(self._images):
                image, _ = self._images.pop(segment_id)
                self._images[segment_id] = self._allocate(geometry)
                self._attach(segment_id, self._images[segment_id][0])
        self.geometry = geometry
        matrix = geometry.vtk_matrix()
        for image, _ in (*self._images.values(), *self._pool):
            image.SetImageToWorldMatrix(matrix)
        self._set_reference_geometry()

    def _set_reference_geometry(self) -> None:
        import slicer

        converter = slicer.vtkSegmentationConverter
        template = slicer.vtkOrientedImageData()
        template.SetExtent(*self.geometry.extent)
        template.SetImageToWorldMatrix(self.geometry.vtk_matrix())
        segmentation = self.segmentation_node.GetSegmentation()
        segmentation.SetConversionParameter(
            converter.GetReferenceImageGeometryParameterName(), converter.SerializeImageGeometry(template)
        )

    def _allocate(self, geometry: FrameGeometry) -> tuple[Any, np.ndarray]:
        import slicer
        import vtk
        from vtk.util import numpy_support

        image = slicer.vtkOrientedImageData()
        image.SetExtent(*geometry.extent)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        image.SetImageToWorldMatrix(geometry.vtk_matrix())
        w, h, d = geometry.dimensions
        view = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(d, h, w)[0]
        view[...] = 0
        return image, view

    def _attach(self, segment_id: str, image: Any) -> None:
        segment = self.segmentation_node.GetSegmentation().GetSegment(segment_id)
        if segment is not None:
            segment.SetLabelValue(1)
            segment.AddRepresentation(BINARY_LABELMAP, image)

    def write(self, result: HostResult) -> list[str]:
        """Make the segmentation show ``result``: its segments (`HostResult.segments`), others removed.

        ``result.masks``: MxHxW bool/uint8, H and W equal to the reference geometry's. Returns the
        segment ids in `HostResult.segments` order.
        """
        masks = np.asarray(result.masks)
        h, w = self.geometry.shape
        if masks.ndim != 3 or masks.shape[1:] != (h, w):
            raise ValueError(
                f"masks of shape {masks.shape} do not match the frame geometry (M x {h} x {w}): "
                "was the result computed on another frame?"
            )
        segments = result.segments()
        names = [name for name, _, _ in segments]
        states = result.segment_states()  # an untracked segment merges targets: their best state
        segmentation = self.segmentation_node.GetSegmentation()
        keep = set(names)
        for segment_id in [s for s in self._images if s not in keep]:
            self._pool.append(self._images.pop(segment_id))
            self._states.pop(segment_id, None)
            if segmentation.GetSegment(segment_id) is not None:
                segmentation.RemoveSegment(segment_id)
        for segment_id, color, mask in segments:
            entry = self._images.get(segment_id)
            segment = segmentation.GetSegment(segment_id)
            if entry is None:
                entry = self._pool.pop() if self._pool else self._allocate(self.geometry)
                self._images[segment_id] = entry
            image, view = entry
            np.copyto(view, mask, casting="unsafe")
            if segment is None:
                segmentation.AddEmptySegment(segment_id, segment_id, list(color))
                segmentation.GetSegment(segment_id).SetTag(SEGMENT_TAG, "1")
                self._attach(segment_id, image)
            elif segment.GetRepresentation(BINARY_LABELMAP) is not image:
                # created elsewhere, or the segment editor swapped in a shared labelmap: take it back
                self._attach(segment_id, image)
            if segment is None or self._states.get(segment_id) != states[segment_id]:
                self._show_state(segment_id, states[segment_id])
            image.Modified()
        return names

    def _show_state(self, segment_id: str, state: str) -> None:
        """Tag the segment with its visibility state; hide it (LOST) or dim it (RELOCALIZING)."""
        self._states[segment_id] = state
        self.segmentation_node.GetSegmentation().GetSegment(segment_id).SetTag(VISIBILITY_TAG, state)
        display = self.segmentation_node.GetDisplayNode()
        if display is not None:
            display.SetSegmentVisibility(segment_id, state != "LOST")
            display.SetSegmentOpacity2DFill(
                segment_id, RELOCALIZING_FILL_OPACITY if state == "RELOCALIZING" else 1.0
            )

    def clear(self) -> None:
        """Remove the segments this writer maintains."""
        segmentation = self.segmentation_node.GetSegmentation()
        self._states.clear()
        for segment_id in list(self._images):
            self._pool.append(self._images.pop(segment_id))
            if segmentation.GetSegment(segment_id) is not None:
                segmentation.RemoveSegment(segment_id)


class TargetPointsWriter:
    """Target points (weighted centroids) of a `HostResult` into a markups fiducial node, in place.

    One control point per shown target (not LOST) with a finite centroid, labelled with the segment
    name, at the RAS position of pixel (x, y) = ``result.centroids[m]`` under ``geometry``. Existing
    control points are moved and relabelled; extra ones removed.
    """

    def __init__(self, markups_node: Any, geometry: FrameGeometry) -> None:
        self.markups_node = markups_node
        self.geometry = geometry

    def write(self, result: HostResult) -> int:
        """Returns the number of points written."""
        centroids = np.asarray(result.centroids, dtype=np.float64).reshape(-1, 2)
        names = result.segment_names()
        finite = np.isfinite(centroids).all(axis=1) & result.shown
        ras = self.geometry.pixel_to_ras(centroids[finite]) if finite.any() else np.zeros((0, 3))
        labels = [name for name, ok in zip(names, finite, strict=True) if ok]
        node = self.markups_node
        was_modifying = node.StartModify()
        try:
            while node.GetNumberOfControlPoints() > len(labels):
                node.RemoveNthControlPoint(node.GetNumberOfControlPoints() - 1)
            for index, (label, point) in enumerate(zip(labels, ras, strict=True)):
                position = [float(v) for v in point]
                if index < node.GetNumberOfControlPoints():
                    node.SetNthControlPointPosition(index, *position)
                    node.SetNthControlPointLabel(index, label)
                else:
                    node.AddControlPoint(position, label)
        finally:
            node.EndModify(was_modifying)
        return len(labels)


# -- sequences ------------------------------------------------------------------------------------


def volume_sequence_from_frames(
    scene: Any,
    frames: Iterable[np.ndarray],
    geometry: FrameGeometry | Iterable[FrameGeometry],
    index_values: Iterable[Any] | None = None,
    name: str = "Image",
    index_name: str = "time",
    index_unit: str = "s",
) -> Any:
    """A vtkMRMLSequenceNode of volume nodes, one per frame (HxW or HxWx3), added to ``scene``.

    ``geometry``: one `FrameGeometry` for all frames, or one per frame. ``index_values``: e.g. the
    recording's timestamps (default: frame numbers). Values are stored as text, as Sequences does.
    """
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    sequence.SetIndexName(index_name)
    sequence.SetIndexUnit(index_unit)
    sequence.SetIndexType(sequence.NumericIndex)
    geometries = None if isinstance(geometry, FrameGeometry) else iter(geometry)
    values = iter(index_values) if index_values is not None else None
    template = None
    for number, frame in enumerate(frames):
        frame_geometry = geometry if geometries is None else next(geometries)
        if template is None:
            import slicer

            template = (
                slicer.vtkMRMLVectorVolumeNode()
                if np.asarray(frame).ndim == 3
                else slicer.vtkMRMLScalarVolumeNode()
            )
        # a fresh image per frame: the sequence deep-copies the node, but keeping frames independent
        # also keeps the in-place fast path of write_frame_to_volume from aliasing items
        template.SetAndObserveImageData(None)
        write_frame_to_volume(template, frame, frame_geometry)
        value = next(values) if values is not None else number
        sequence.SetDataNodeAtValue(template, _index_text(value))
    return sequence


def _index_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".") if math.isfinite(value) else str(value)
    return str(value)


def browser_nodes_for_sequence(scene: Any, sequence_node: Any) -> list[Any]:
    """Sequence browser nodes in ``scene`` that play ``sequence_node`` (no Sequences logic needed)."""
    browsers = []
    collection = scene.GetNodesByClass("vtkMRMLSequenceBrowserNode")
    for i in range(collection.GetNumberOfItems()):
        browser = collection.GetItemAsObject(i)
        if browser.IsSynchronizedSequenceNode(sequence_node, True):
            browsers.append(browser)
    return browsers


def now() -> float:
    """Wall-clock time in seconds (Unix epoch), the arrival clock of live frames."""
    return time.time()
