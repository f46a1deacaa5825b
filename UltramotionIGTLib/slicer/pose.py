"""The pose of a frame: captured when the frame arrives, given to its mask when the mask is written. Qt-free.

A frame's voxels are in its volume node's local RAS (`mrml.FrameGeometry.ijk_to_ras`); the node's
parent transform chain maps local RAS to world. With tracking (PLUS ``ImageToReference``, an
OpenIGTLink TRANSFORM per frame) that chain moves 30+ times a second, independently of the frames.
A mask shown under the input's own transform would therefore be placed with the pose that holds
when it is *written* (one inference later), not the pose its frame was acquired at: on a moving
probe the mask slides off the anatomy it outlines.

So the live and remote sessions:

1. at frame arrival read `transform_to_world` of the input (the parent chain's 4x4 matrix at that
   instant; re-parenting of the input is followed because the chain is read anew for every frame),
2. at write time give that matrix to `OutputPose`: a linear transform node of ours (``<output>
   pose``), parent of the output segmentation and target points, whose matrix is set in the same
   render-paused block as the masks.

Every mask voxel (i, j) then lies at ``pose @ ijk_to_ras @ (i, j, k0, 1)``: the world position of
the frame voxel under it at arrival, whatever the input's transform did since. The labelmap keeps
the frame's own grid (the segmentation's geometry is the frame's IJK-to-RAS), so the Segment Editor
works on the image grid, and a pose change costs one matrix, not a resampled labelmap. A chain that
is not linear (a grid or B-spline transform) has no 4x4 matrix: the output is then put under the
input's parent transform itself, and follows it (the previous behaviour).

Replay needs none of this: each item of a recording has its own transform in the synchronized
transform sequence, and the result sequence is played by the same browser, so the proxy transform
holds the item's pose whenever its mask is shown (`sessions.ReplaySession`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Node reference role from an output segmentation to the transform node that holds its masks' pose.
POSE_REFERENCE_ROLE = "UltramotionIGT.pose"


def transform_to_world(node: Any) -> np.ndarray | None:
    """The 4x4 (float64) matrix from ``node``'s local RAS to world now: its parent transform chain.

    Identity for a node without a parent transform; None when the chain is not linear.
    """
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    return transform_node_to_world(parent)


def transform_node_to_world(transform_node: Any) -> np.ndarray | None:
    """The 4x4 matrix a transform node applies to its children (its own and its parents' transforms,
    to world); None when the chain is not linear."""
    import vtk

    if not transform_node.IsTransformToWorldLinear():
        return None
    matrix = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


class OutputPose:
    """Places the output nodes of a session with each frame's arrival pose (see the module docstring).

    ``output_node``: the output segmentation; its pose transform node is found through the node
    reference `POSE_REFERENCE_ROLE` (so a restart reuses it) or created in its scene, named
    ``<output name> pose``, on the first frame whose input is transformed. ``place(pose,
    parent_id, nodes)``: ``pose`` from `transform_to_world` at arrival, ``parent_id`` the input's
    parent transform node ID at arrival (used when ``pose`` is None: non-linear chain).
    """

    def __init__(self, output_node: Any) -> None:
        self.output_node = output_node
        self.transform_node: Any = None
        self._matrix: Any = None

    def _pose_node(self) -> Any:
        node = self.transform_node
        if node is not None and node.GetScene() is not None:
            return node
        node = self.output_node.GetNodeReference(POSE_REFERENCE_ROLE)
        if node is None or node.GetScene() is None:
            scene = self.output_node.GetScene()
            node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", f"{self.output_node.GetName()} pose")
            self.output_node.SetNodeReferenceID(POSE_REFERENCE_ROLE, node.GetID())
        self.transform_node = node
        return node

    def place(self, pose: np.ndarray | None, parent_id: str | None, nodes: tuple[Any, ...]) -> None:
        """Put ``nodes`` (the output segmentation, the target points; None entries skipped) where the
        frame was: under our pose node holding ``pose``, under nothing when the input was not
        transformed, or under ``parent_id`` when its chain was not linear."""
        if parent_id is None:
            target_id = None
        elif pose is None:
            target_id = parent_id
        else:
            import vtk

            node = self._pose_node()
            if self._matrix is None:
                self._matrix = vtk.vtkMatrix4x4()
            for r in range(4):
                for c in range(4):
                    self._matrix.SetElement(r, c, float(pose[r, c]))
            node.SetMatrixTransformToParent(self._matrix)
            target_id = node.GetID()
        for output in nodes:
            if output is not None and output.GetTransformNodeID() != target_id:
                output.SetAndObserveTransformNodeID(target_id)
