"""``ultramotion-igt bench mrml``: per-frame segmentation node update, three ways, side by side.

One frame's result (by default an 820x616 frame with 2, 3 and 4 target masks) is written into a
segmentation node:

- ``in-place`` (`UltramotionIGTLib.slicer.mrml.SegmentationWriter`, what the live session uses): each
  segment keeps one vtkOrientedImageData with the frame's geometry; the mask is copied into it and
  the image is marked modified. No node, no image allocated per frame.
- ``logic-copy``: the static ``vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment`` with
  one reused vtkOrientedImageData per segment (the module logic copies it into the segment).
- ``naive``: what ``slicer.util.updateSegmentBinaryLabelmapFromArray`` does, per segment: a
  temporary labelmap volume node is added to the scene, filled, imported with
  ``ImportLabelmapToSegmentationNode`` and removed again.

Runs on slicer-core (a standalone scene initialised like Slicer's) or inside Slicer (its scene).
No views exist on slicer-core, so this is the MRML update alone; rendering is not included.
Prints median / p95 / mean milliseconds per frame and the ratios to ``in-place``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from UltramotionIGTLib.core.packet import HostResult


def _masks(shape: tuple[int, int], n_segments: int, n_variants: int, seed: int) -> list[np.ndarray]:
    """``n_variants`` mask stacks (n_segments x H x W bool) of moving ellipses, made before timing."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    centres = rng.uniform((0.2 * h, 0.2 * w), (0.8 * h, 0.8 * w), size=(n_segments, 2))
    radii = rng.uniform((0.04 * h, 0.04 * w), (0.15 * h, 0.15 * w), size=(n_segments, 2))
    out = []
    for v in range(n_variants):
        shift = 6.0 * np.array([np.sin(v / 3.0), np.cos(v / 5.0)])
        stack = np.stack(
            [
                (((yy - c[0] - shift[0]) / r[0]) ** 2 + ((xx - c[1] - shift[1]) / r[1]) ** 2) <= 1.0
                for c, r in zip(centres, radii, strict=True)
            ]
        )
        out.append(stack)
    return out


def _result(masks: np.ndarray, frame_index: int) -> HostResult:
    m = masks.shape[0]
    return HostResult(
        frame_index=frame_index,
        image_size=masks.shape[1:],
        boxes=np.zeros((m, 4), np.float32),
        scores=np.full(m, 0.9, np.float32),
        labels=np.arange(m, dtype=np.int64) % 2,
        centroids=np.zeros((m, 2), np.float32),
        areas=masks.sum(axis=(1, 2)).astype(np.float32),
        track_ids=np.arange(m, dtype=np.int64),
        masks=masks,
    )


def _time(update: Callable[[int], None], frames: int, warmup: int) -> np.ndarray:
    for i in range(warmup):
        update(i)
    times = np.empty(frames)
    for i in range(frames):
        t0 = time.perf_counter()
        update(warmup + i)
        times[i] = (time.perf_counter() - t0) * 1000.0
    return times


def _stats(times: np.ndarray) -> dict[str, float]:
    return {
        "median_ms": float(np.median(times)),
        "p95_ms": float(np.percentile(times, 95)),
        "mean_ms": float(times.mean()),
        "frames": int(times.size),
    }


def configure(parser: argparse.ArgumentParser) -> None:
    from UltramotionIGTLib.tools.options import describe_from_doc, positive_int

    describe_from_doc(parser, __doc__)
    parser.add_argument(
        "--frames",
        type=positive_int,
        default=300,
        metavar="N",
        help="timed frames for in-place and logic-copy (default 300)",
    )
    parser.add_argument(
        "--naive-frames",
        type=positive_int,
        default=60,
        metavar="N",
        help="timed frames for naive (default 60)",
    )
    parser.add_argument(
        "--segments",
        type=positive_int,
        nargs="+",
        default=[2, 3, 4],
        metavar="N",
        help="targets (segments) per frame; one measurement per value (default 2 3 4)",
    )
    parser.add_argument(
        "--height", type=positive_int, default=616, metavar="PX", help="frame rows (default 616)"
    )
    parser.add_argument(
        "--width", type=positive_int, default=820, metavar="PX", help="frame columns (default 820)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")


def run(args: argparse.Namespace) -> int:
    import slicer
    import vtk
    from vtk.util import numpy_support

    from UltramotionIGTLib.slicer import mrml

    context = mrml.slicer_application_context() or mrml.create_standalone_context()
    scene = context.scene
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    volumes_logic = context.logic("Volumes")
    shape = (args.height, args.width)
    a = np.deg2rad(20.0)
    directions = np.array([[np.cos(a), -np.sin(a), 0], [0, 0, -1], [np.sin(a), np.cos(a), 0]])
    geometry = mrml.FrameGeometry.from_spacing_origin_directions(
        (0.12, 0.09, 1.0), (-40, 12, 30), directions, shape
    )
    frame = np.random.default_rng(0).integers(0, 255, size=shape, dtype=np.uint8)
    volume = mrml.new_volume_node(scene, frame, geometry, name="bench frame")
    created: list[Any] = [volume]
    rows = []
    try:
        for n_segments in args.segments:
            variants = _masks(shape, n_segments, 16, seed=n_segments)
            results = [_result(m, i) for i, m in enumerate(variants)]

            # in place: the bridge
            seg_a = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"bench in-place {n_segments}")
            created.append(seg_a)
            writer = mrml.SegmentationWriter(seg_a, geometry)
            t_inplace = _time(lambda i, w=writer, r=results: w.write(r[i % len(r)]), args.frames, 10)

            # static module logic, reused oriented images
            seg_b = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"bench logic-copy {n_segments}")
            created.append(seg_b)
            seg_b.CreateDefaultDisplayNodes()
            ids = [seg_b.GetSegmentation().AddEmptySegment(f"s{k}", f"s{k}") for k in range(n_segments)]
            images = []
            for _ in range(n_segments):
                image = slicer.vtkOrientedImageData()
                image.SetExtent(*geometry.extent)
                image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
                image.SetImageToWorldMatrix(geometry.vtk_matrix())
                images.append(
                    (image, numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape))
                )

            def logic_copy(i: int, ids=ids, images=images, variants=variants, seg=seg_b) -> None:
                masks = variants[i % len(variants)]
                for k, segment_id in enumerate(ids):
                    image, view = images[k]
                    np.copyto(view, masks[k], casting="unsafe")
                    image.Modified()
                    logic.SetBinaryLabelmapToSegment(image, seg, segment_id, logic.MODE_REPLACE, None)

            t_logic = _time(logic_copy, args.frames, 10)

            # naive: a temporary labelmap node per segment per frame (slicer.util's way)
            seg_c = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"bench naive {n_segments}")
            created.append(seg_c)
            seg_c.CreateDefaultDisplayNodes()
            seg_c.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            ids_c = [seg_c.GetSegmentation().AddEmptySegment(f"s{k}", f"s{k}") for k in range(n_segments)]

            def naive(i: int, ids=ids_c, variants=variants, seg=seg_c) -> None:
                masks = variants[i % len(variants)]
                for k, segment_id in enumerate(ids):
                    if volumes_logic is not None:
                        labelmap = volumes_logic.CreateAndAddLabelVolume(scene, volume, "__temp__")
                    else:
                        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__temp__")
                    try:
                        mrml.write_frame_to_volume(labelmap, masks[k].astype(np.uint8), geometry)
                        names = vtk.vtkStringArray()
                        names.InsertNextValue(segment_id)
                        if not logic.ImportLabelmapToSegmentationNode(labelmap, seg, names):
                            raise RuntimeError("ImportLabelmapToSegmentationNode failed")
                    finally:
                        scene.RemoveNode(labelmap)

            t_naive = _time(naive, args.naive_frames, 3)

            base = float(np.median(t_inplace))
            for name, times in (("in-place", t_inplace), ("logic-copy", t_logic), ("naive", t_naive)):
                row = {
                    "segments": n_segments,
                    "method": name,
                    **_stats(times),
                    "ratio_vs_in_place": float(np.median(times)) / base if base > 0 else None,
                }
                rows.append(row)
    finally:
        for node in created:
            if node.GetScene() is not None:
                scene.RemoveNode(node)

    print(f"segmentation node update per frame, {args.width}x{args.height} mask, MRML only (no rendering)")
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(
        f"{'segments':>8}  {'method':<11} {'median ms':>10} {'p95 ms':>9} {'mean ms':>9} {'frames':>7}  x in-place"
    )
    for r in rows:
        print(
            f"{r['segments']:>8}  {r['method']:<11} {r['median_ms']:>10.3f} {r['p95_ms']:>9.3f} "
            f"{r['mean_ms']:>9.3f} {r['frames']:>7}  {r['ratio_vs_in_place']:>9.1f}"
        )
    target = [r for r in rows if r["method"] == "in-place"]
    worst = max(r["median_ms"] for r in target)
    print(
        f"in-place median <= {worst:.3f} ms per frame (target: under 2 ms): {'met' if worst < 2.0 else 'NOT met'}"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"benchmark": "mrml", "shape": list(shape), "rows": rows}, fh, indent=2)
    return 0
