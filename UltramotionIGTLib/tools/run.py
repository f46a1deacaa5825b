"""``ultramotion-igt run`` and ``make-test-models``: recordings in, segmentation sequence + KPIs out.

`process_sequence` (also used by ``demo``) runs the frames and writes the outputs.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from UltramotionIGTLib.errors import UltramotionError
from UltramotionIGTLib.tools.options import (
    add_model_arguments,
    add_pipeline_arguments,
    add_sync_audit_argument,
    is_auto_region,
    pipeline_config_from_args,
    positive_int,
    resolve_model_source,
)

if TYPE_CHECKING:
    from UltramotionIGTLib.tools.outputs import OutputFolder

LOG = logging.getLogger(__name__)

OUTPUT_FILES = ("segmentation.seq.nrrd", "kpi.jsonl", "summary.json", "overlay.png")


def process_sequence(
    pipeline: Any,
    frames: Iterable[Any],
    timestamps: Iterable[Any] | None,
    reference: Any,
    out_dir: str | Path | OutputFolder,
    progress: bool = True,
    source: str = "",
    gif: bool = False,
    sync_audit: bool = False,
    on_result: Callable[[int, Any], None] | None = None,
    overwrite: bool = False,
    inputs: Iterable[Any] = (),
    intensity_window: Any = None,
    n_frames: int | None = None,
    spacing: Any = None,
    poses: Any = None,
) -> dict[str, Any]:
    """Run every frame through ``pipeline`` and write the outputs into ``out_dir`` AS FRAMES ARE
    PROCESSED (`UltramotionIGTLib.tools.outputs`): memory stays flat however long the recording.

    frames: the input frames (a sequence, or any iterable with ``n_frames``), HxW or HxWx3 of any
    real pixel type (mapped by the pipeline's one intensity mapping, `core.intensity`; the window the
    data states goes in as ``intensity_window``, an `IntensityWindow`). timestamps: seconds per frame
    (None, or NaN entries: none). reference: the input's geometry (`UltrasoundSequence` / `Geometry`),
    which every segmentation item gets. out_dir: a folder (checked, locked and refused when it holds
    earlier results unless ``overwrite``; ``inputs`` are never overwritten) or an `OutputFolder`
    already opened (``run`` opens it before loading models).

    Outputs: segmentation.seq.nrrd (one labelmap per input frame, the input's geometry, one segment
    per tracked target and one per class for the untracked detections; label values stable for the
    run, uint8 then uint16/uint32 past 255/65535 segments; index values the timestamps, made distinct
    for Slicer with the fix-ups reported), kpi.jsonl, summary.json (``complete``, the intensity
    window, skipped frames...), overlay.png (a bounded sample of frames) and overlay.gif (the first 40
    frames) when ``gif``. A frame with no finite pixel is reported (``skipped``) and gets an empty
    labelmap. LOST targets are left out of the labelmaps; kpi.jsonl has the tracked targets per
    visibility state and summary.json each segment's states over the frames (`VisibilityTimeline`).
    ``spacing``: (sx, sy) mm per pixel (default: ``reference.spacing`` when it has one, else 1 mm);
    ``poses``: per frame the image-to-reference 4x4 transform in image mm, None entries where
    unknown (default: `sequence_poses` of ``reference``). ``sync_audit``: count host syncs per frame (`RuntimeTransferAudit`, no profiler): each
    frame's KPI record gets ``host_syncs``/``declared_hops`` and the summary ``host_syncs_per_frame``
    and ``declared_hops_per_frame``; off (the default), those fields are absent. ``on_result``:
    called with (frame index, `HostResult`) for each processed frame (nothing else keeps results).

    Ctrl-C or an error mid-run: the outputs are finished with the frames done, summary.json says
    ``"complete": false`` and why, and the exception goes on. Returns the summary written.
    """
    from tqdm import tqdm

    from UltramotionIGTLib.core.kpi import KpiAggregator
    from UltramotionIGTLib.core.packet import UNTRACKED, SegmentTable
    from UltramotionIGTLib.errors import CheckpointError
    from UltramotionIGTLib.io.segmentation import check_segment_name
    from UltramotionIGTLib.tools.outputs import OutputFolder, RunRecorder

    n = int(n_frames) if n_frames is not None else len(frames)  # type: ignore[arg-type]
    for name in pipeline.class_names:
        try:
            check_segment_name(f"{name}-untracked")
        except ValueError as exc:
            raise CheckpointError(
                f"the detector's class name {name!r} cannot name a segment: {exc}"
            ) from None
    folder = out_dir if isinstance(out_dir, OutputFolder) else OutputFolder.open(out_dir, overwrite, inputs)
    pipeline.reset(intensity_window)
    table = SegmentTable()
    kpi = KpiAggregator(window=None)
    stamps = iter(timestamps) if timestamps is not None else itertools.repeat(None)
    try:
        recorder = RunRecorder(folder, source, pipeline.describe(), geometry=reference, frames=n, gif=gif)
    except BaseException:
        folder.release(keep_empty=True)
        raise
    state = {"processed": 0, "t_start": time.perf_counter()}
    if spacing is None and getattr(reference, "spacing", None) is not None:
        spacing = tuple(float(v) for v in reference.spacing[:2])
    if poses is None:
        poses = sequence_poses(reference)
    timeline = VisibilityTimeline()

    def summary() -> dict[str, Any]:
        wall_s = time.perf_counter() - state["t_start"]
        processed = state["processed"]
        syncs = (
            {
                "host_syncs_per_frame": kpi.host_syncs_per_frame(),
                "declared_hops_per_frame": kpi.declared_hops_per_frame(),
            }
            if sync_audit
            else {}
        )
        return {
            "source": source,
            "device": str(pipeline.device),
            "path": pipeline.path,
            "frames_in": n,
            "frames_out": recorder.items,
            "frames_processed": processed,
            "dropped": n - recorder.items,
            "wall_s": wall_s,
            "fps": processed / wall_s if wall_s > 0 else None,
            "latency_ms": {**kpi.stage_ms(), "end_to_end": kpi.end_to_end_ms()},
            **syncs,
            "intensity": pipeline.intensity.describe(),
            "segments": [
                {"value": v, "name": name, "color": list(c), "untracked": name.endswith(f"-{UNTRACKED}")}
                for v, name, c in table.segments()
            ],
            "naming": NAMING_RULE,
            "pipeline": {k: v for k, v in pipeline.describe().items() if k not in ("config", "class_names")},
            "visibility": timeline.to_dict(),
        }

    bar = tqdm(total=n, desc="frames", unit="frame", disable=not progress or n < 2, file=sys.stderr)
    try:
        audit_context: Any = nullcontext()
        if sync_audit:
            from UltramotionIGTLib.tools.audit.runtime import RuntimeTransferAudit

            audit_context = RuntimeTransferAudit(pipeline.device, cuda_profiler=False)
        with audit_context as audit:

            def skipped(index: int, timestamp: float | None, frame: Any, exc: Exception) -> None:
                LOG.warning("frame %d skipped: %s", index, exc)
                recorder.skip(index, timestamp, str(exc))
                recorder.add_item(np.zeros(np.shape(frame)[:2], np.uint8), timestamp, table.segments())
                bar.update(1)

            for frame, result, record in pipeline.run(
                itertools.islice(frames, n),
                itertools.islice(stamps, n),
                audit=audit,
                sink=kpi,
                on_skip=skipped,
                spacing=spacing,
                poses=itertools.islice(poses, n) if poses is not None else None,
            ):
                if audit is not None:  # counts are in the records: keep no frame's events
                    audit.keep_last_frame_only()
                recorder.log(record)
                recorder.add_item(table.labelmap(result), result.timestamp, table.segments())
                recorder.sample(frame, result)
                timeline.add(result)
                state["processed"] += 1
                if on_result is not None:
                    on_result(result.frame_index, result)
                bar.update(1)
    except BaseException as exc:
        bar.close()
        recorder.close_partial(summary(), exc)
        raise
    bar.close()
    return recorder.close(summary())


NAMING_RULE = (
    "one segment per tracked target, '<class>-<id>'; one segment per class, '<class>-untracked', for "
    "the detections without a track id in a frame (tentative targets, or all of them with tracking off)"
)


class VisibilityTimeline:
    """Each segment's visibility state over the frames, run-length coded as results arrive:
    ``{"vessel-3": [[first frame, last frame, "VISIBLE"], [first, last, "RELOCALIZING"], ...]}``
    (frames where a segment is absent are gaps). Empty when the pipeline ran without the visibility
    stage. An untracked segment (several targets) shows its best state."""

    def __init__(self) -> None:
        self._runs: dict[str, list[list[Any]]] = {}

    def add(self, result: Any) -> None:
        if result.states is None:
            return
        frame = int(result.frame_index)
        for name, state in result.segment_states().items():
            runs = self._runs.setdefault(name, [])
            if runs and runs[-1][2] == state and runs[-1][1] == frame - 1:
                runs[-1][1] = frame
            else:
                runs.append([frame, frame, state])

    def to_dict(self) -> dict[str, list[list[Any]]]:
        return {name: [list(run) for run in runs] for name, runs in self._runs.items()}


def sequence_poses(sequence: Any) -> list[Any] | None:
    """Per frame, the image-to-reference pose a recording carries for the visibility stage, or None.

    Uses a PLUS ``ImageToReference`` or ``ImageToTracker`` transform, else ``ProbeToReference`` /
    ``ProbeToTracker`` composed with an ``ImageToProbe`` calibration; PLUS's image coordinates are
    pixels, so each pose is rescaled to image millimetres with the sequence's spacing. A frame whose
    transform status is not OK gets None. Without a calibrated image transform there is no pose (a
    probe pose alone does not say how the image lies in the probe): None.
    """
    import numpy as np

    transforms = getattr(sequence, "transforms", None) or {}
    status = getattr(sequence, "transform_status", None) or {}
    n = len(sequence.frames)

    def ok(name: str) -> np.ndarray:
        return np.asarray(status.get(name, np.ones(n, bool)), dtype=bool)

    poses = valid = None
    for name in ("ImageToReference", "ImageToTracker"):
        if name in transforms:
            poses, valid = transforms[name], ok(name)
            break
    if poses is None and "ImageToProbe" in transforms:
        for name in ("ProbeToReference", "ProbeToTracker"):
            if name in transforms:
                poses = transforms[name] @ transforms["ImageToProbe"]
                valid = ok(name) & ok("ImageToProbe")
                break
    if poses is None:
        return None
    sx, sy = (float(v) for v in sequence.spacing[:2])
    to_pixels = np.diag([1.0 / sx, 1.0 / sy, 1.0, 1.0])
    return [
        (pose @ to_pixels) if good and np.all(np.isfinite(pose)) else None
        for pose, good in zip(poses, valid, strict=True)
    ]


def auto_imaging_region(frames: Any) -> tuple[int, int, int, int]:
    """``--imaging-region auto``: the bounding box of the recording's non-black pixels
    (`core.region.ImagingRegion.from_frames`), decided once before the run and printed; (x, y, w, h)."""
    from UltramotionIGTLib.core.region import ImagingRegion

    region = ImagingRegion.from_frames(frames)
    h, w = (int(v) for v in np.shape(frames)[1:3])
    print(f"imaging region (auto, from the non-black pixels): {region.as_text()} of the {w}x{h} frame")
    return region.as_tuple()


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run detection + segmentation on a PLUS recording (.igs.mha, .seq.mha, .igs.nrrd, .seq.nrrd), a "
        "single .mha/.nrrd image or a .npy array (HxW, NxHxW, HxWx3 or NxHxWx3). Writes "
        + ", ".join(OUTPUT_FILES)
        + " "
        "into --out. Models must be named: the shipped demo pack (--pack demo-phantom) is trained on the "
        "synthetic phantom only, so using it on a real recording is a choice, not a default."
    )
    parser.add_argument("--input", required=True, metavar="FILE", help="recording, image or .npy file")
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output folder (created; refused when it holds an earlier run's results, see --overwrite)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of an earlier run in --out (its files are removed when this run starts)",
    )
    parser.add_argument(
        "--max-frames", type=positive_int, default=None, metavar="N", help="only the first N frames"
    )
    parser.add_argument("--gif", action="store_true", help="also write overlay.gif")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_sync_audit_argument(parser, "kpi.jsonl (host_syncs) and summary.json (host_syncs_per_frame)")
    add_model_arguments(parser, required=True)
    add_pipeline_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Every check that needs no model comes first (options, --out, the recording and its frames),
    then the models load, then the frames run (`process_sequence`)."""
    from UltramotionIGTLib.core.device import resolve_device
    from UltramotionIGTLib.core.intensity import IntensityWindow
    from UltramotionIGTLib.core.pipeline import check_frame_shape
    from UltramotionIGTLib.errors import UnsupportedImageTypeError
    from UltramotionIGTLib.io import read_sequence
    from UltramotionIGTLib.tools.benchmarks.legacy import build_pipeline
    from UltramotionIGTLib.tools.outputs import OutputFolder

    source = resolve_model_source(args)
    config = pipeline_config_from_args(args, source=source, auto_region=True)
    device = resolve_device(config.device)  # fail fast, before reading anything large
    folder = OutputFolder.open(args.out, args.overwrite, inputs=(args.input, source.sam))
    try:
        # the pipeline maps intensities; colour stays colour: the pipeline gives it to 3-channel
        # detectors and luminance to grey ones
        sequence = read_sequence(args.input, color="rgb", intensity="keep")
        if args.max_frames is not None:
            sequence = sequence.subset(range(min(args.max_frames, sequence.n_frames)))
        try:
            check_frame_shape(sequence.frames.shape[1:])
        except UnsupportedImageTypeError as exc:
            raise UnsupportedImageTypeError(f"{args.input}: {exc}") from None
        if is_auto_region(args.imaging_region):
            config.imaging_region = auto_imaging_region(sequence.frames)
        stated = sequence.metadata.get("intensity_window")
        window = IntensityWindow.stated(stated[0], stated[1], str(sequence.frames.dtype)) if stated else None
        # the pipeline alone holds the loaded models: a reduced-precision copy then replaces them
        pipeline = build_pipeline(*source.load(device), config, legacy=args.legacy)
    except BaseException:
        folder.release()
        raise
    summary = process_sequence(
        pipeline,
        sequence.frames,
        sequence.timestamps,
        sequence,
        folder,
        progress=not args.quiet,
        source=str(args.input),
        gif=args.gif,
        sync_audit=args.sync_audit,
        intensity_window=window,
    )
    print(_summary_line(summary, args.out))
    return 0


def _summary_line(summary: dict[str, Any], out: str | Path) -> str:
    p50 = summary["latency_ms"].get("end_to_end", {}).get("p50")
    parts = [
        f"{summary['frames_out']}/{summary['frames_in']} frames on {summary['device']} ({summary['path']})"
    ]
    if summary.get("fps"):
        parts.append(f"{summary['fps']:.1f} FPS")
    if p50 is not None:
        parts.append(f"end-to-end p50 {p50:.1f} ms")
    if summary.get("host_syncs_per_frame") is not None:
        parts.append(f"{summary['host_syncs_per_frame']:.1f} host syncs/frame")
    if summary.get("skipped"):
        parts.append(f"{len(summary['skipped'])} frame(s) skipped (no finite pixel)")
    fixups = (summary.get("segmentation") or {}).get("index_fixups") or []
    if fixups:
        parts.append(f"{len(fixups)} repeated timestamp(s) moved in the index")
    return ", ".join(parts) + f" -> {out}"


def configure_make_test_models(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write small random-weight models in the real checkpoint formats (a D-FINE Hugging Face folder "
        "in OUT/detector and a vit_t_demo SAM .safetensors in OUT/sam) for smoke tests. They detect "
        "nothing meaningful: use the demo pack for that."
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write detector/ and sam/ into")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    parser.add_argument(
        "--image-size",
        type=int,
        default=256,
        metavar="PX",
        help="detector input size in pixels (default 256)",
    )
    parser.add_argument(
        "--real-size",
        action="store_true",
        help="instead: random-weight models in the production architectures, for timing (D-FINE-S and -L "
        "folders, SAM ViT-B 1024 and MobileSAM checkpoints; about 0.6 GB; tools/benchmarks/realsize.py)",
    )


def run_make_test_models(args: argparse.Namespace) -> int:
    from UltramotionIGTLib.core.detector import write_random_detector
    from UltramotionIGTLib.core.sam import write_random_sam_checkpoint

    out = Path(args.out)
    if args.real_size:
        from UltramotionIGTLib.tools.benchmarks.realsize import write_real_size_models

        try:
            written = write_real_size_models(out, seed=args.seed)
        except OSError as exc:
            raise UltramotionError(f"cannot write real-size test models into {out}: {exc}") from exc
        print("\n".join(f"{name}: {path}" for name, path in written.items()))
        return 0
    try:
        det = write_random_detector(out / "detector", image_size=args.image_size, seed=args.seed)
        sam = write_random_sam_checkpoint(
            out / "sam" / "sam_vit_t_demo.safetensors", model_type="vit_t_demo", seed=args.seed
        )
    except OSError as exc:
        raise UltramotionError(f"cannot write test models into {out}: {exc}") from exc
    print(f"detector: {det}\nsam:      {sam}")
    return 0
