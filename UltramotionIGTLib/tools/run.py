"""``ultramotion-igt run`` and ``make-test-models``: recordings in, segmentation sequence + KPIs out."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from UltramotionIGTLib.errors import InputFileError, UltramotionError

OUTPUT_FILES = ("segmentation.seq.nrrd", "kpi.jsonl", "summary.json", "overlay.png")


def add_pipeline_arguments(parser: argparse.ArgumentParser, models_required: bool = True) -> None:
    """The model and pipeline options shared by run, demo, audit --runtime, bench and doctor."""
    parser.add_argument(
        "--detector", required=models_required, help="D-FINE model folder (config.json + safetensors)"
    )
    parser.add_argument(
        "--sam", required=models_required, help="SAM checkpoint (.pth state dict or .safetensors)"
    )
    parser.add_argument(
        "--sam-type", default="auto", help="vit_b | vit_l | vit_h | vit_t_demo | auto (default)"
    )
    parser.add_argument("--device", default="auto", help="auto (default) | cpu | cuda | cuda:N")
    parser.add_argument("--score-threshold", type=float, default=0.3, help="detection score threshold (0.3)")
    parser.add_argument("--max-targets", type=int, default=4, help="SAM prompts per class per frame (4)")
    parser.add_argument("--no-track", action="store_true", help="do not track targets across frames")
    parser.add_argument(
        "--mask-box-margin",
        type=float,
        default=None,
        metavar="PX",
        help="keep each mask within its prompt box plus PX pixels unless SAM is confident beyond it "
        "(probability >= --mask-outside-confidence); default: off",
    )
    parser.add_argument(
        "--mask-outside-confidence",
        type=float,
        default=0.95,
        help="probability a pixel beyond --mask-box-margin needs to stay in its mask (0.95)",
    )
    parser.add_argument(
        "--legacy",
        action="store_true",
        help="legacy path for comparison: gpu_resident=False, sam_as_numpy=True",
    )


def pipeline_config_from_args(args: argparse.Namespace):
    from UltramotionIGTLib.core.pipeline import PipelineConfig

    try:
        return PipelineConfig(
            device=args.device,
            score_threshold=args.score_threshold,
            max_targets_per_class=args.max_targets,
            track=not args.no_track,
            mask_box_margin_px=getattr(args, "mask_box_margin", None),
            mask_outside_confidence=getattr(args, "mask_outside_confidence", 0.95),
        )
    except ValueError as exc:
        raise InputFileError(str(exc)) from exc


def process_sequence(
    pipeline: Any,
    frames: Any,
    timestamps: Any,
    reference: Any,
    out_dir: str | Path,
    progress: bool = True,
    source: str = "",
    gif: bool = False,
    sync_audit: bool = True,
    keep_results: bool = False,
    spacing: Any = None,
    poses: Any = None,
) -> dict[str, Any]:
    """Run every frame through ``pipeline`` and write the standard outputs into ``out_dir``.

    Outputs: segmentation.seq.nrrd (one labelmap per input frame, the input's geometry, one segment
    per tracked target; LOST targets are left out of the labelmaps), kpi.jsonl (with the tracked
    targets per visibility state), summary.json (with each segment's visibility states over the
    frames, see `visibility_timeline`), overlay.png (and overlay.gif when ``gif``).
    ``sync_audit``: count host syncs per frame (`RuntimeTransferAudit`, no profiler) into the KPIs.
    ``spacing``: (sx, sy) mm per pixel (default: ``reference.spacing`` when it has one, else 1 mm);
    ``poses``: N image-to-reference 4x4 transforms in image mm, None entries where unknown (default:
    `sequence_poses` of ``reference``). Returns the summary dict (with the `HostResult` list under
    ``"results"`` when ``keep_results``; it is not written to summary.json).
    """
    from tqdm import tqdm

    from UltramotionIGTLib.core.kpi import (
        FanoutKpiSink,
        FrameRecord,
        JsonlKpiSink,
        KpiAggregator,
        safe_log_kpi,
    )
    from UltramotionIGTLib.core.packet import SegmentTable
    from UltramotionIGTLib.io import write_segmentation_sequence
    from UltramotionIGTLib.tools.audit.runtime import RuntimeTransferAudit
    from UltramotionIGTLib.tools.overlay import save_overlay_gif, save_overlay_grid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = JsonlKpiSink(out / "kpi.jsonl")
    kpi = KpiAggregator(window=None)
    sink = FanoutKpiSink(jsonl, kpi)
    pipeline.reset()
    table = SegmentTable()
    labelmaps, results = [], []
    n = len(frames)
    stamps = list(timestamps) if timestamps is not None else [None] * n
    if spacing is None and getattr(reference, "spacing", None) is not None:
        spacing = tuple(float(v) for v in reference.spacing[:2])
    if poses is None:
        poses = sequence_poses(reference)
    poses = list(poses) if poses is not None else [None] * n
    t_start = time.perf_counter()
    try:
        safe_log_kpi({"event": "start", "source": source, "frames": n, **pipeline.describe()}, sink)
        bar = tqdm(total=n, desc="frames", unit="frame", disable=not progress or n < 2, file=sys.stderr)
        with (
            RuntimeTransferAudit(pipeline.device, cuda_profiler=False)
            if sync_audit
            else nullcontext() as audit
        ):
            for index in range(n):
                t0 = time.perf_counter()
                with audit.frame(index) if audit is not None else nullcontext():
                    result = pipeline.process_frame(
                        frames[index],
                        index,
                        _finite_or_none(stamps[index]),
                        spacing=spacing,
                        pose=poses[index],
                    ).to_host()
                wall_ms = (time.perf_counter() - t0) * 1000.0
                syncs = audit.last_frame.kpi() if audit is not None else {}
                safe_log_kpi(FrameRecord.from_result(result, wall_ms=wall_ms, **syncs), sink)
                labelmaps.append(table.labelmap(result))
                results.append(result)
                bar.update(1)
        bar.close()
        wall_s = time.perf_counter() - t_start
        import numpy as np

        write_segmentation_sequence(
            out / "segmentation.seq.nrrd",
            np.stack(labelmaps),
            reference,
            segments=table.segments(),
            timestamps=timestamps,
        )
        save_overlay_grid(out / "overlay.png", frames, results)
        if gif:
            save_overlay_gif(out / "overlay.gif", frames, results)
        summary = {
            "source": source,
            "device": str(pipeline.device),
            "path": pipeline.path,
            "frames_in": n,
            "frames_out": len(results),
            "dropped": n - len(results),
            "wall_s": wall_s,
            "fps": len(results) / wall_s if wall_s > 0 else None,
            "latency_ms": {**kpi.stage_ms(), "end_to_end": kpi.end_to_end_ms()},
            "host_syncs_per_frame": kpi.host_syncs_per_frame(),
            "declared_hops_per_frame": kpi.declared_hops_per_frame(),
            "segments": [{"value": v, "name": name, "color": list(c)} for v, name, c in table.segments()],
            "visibility": visibility_timeline(results),
            "outputs": sorted(p.name for p in out.iterdir()) + ["summary.json"],
        }
        safe_log_kpi({"event": "summary", **summary}, sink)
    finally:
        jsonl.close()
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if keep_results:
        summary["results"] = results
    return summary


def visibility_timeline(results: Any) -> dict[str, list[list[Any]]]:
    """Each segment's visibility state over the frames, run-length coded: ``{"vessel-3":
    [[first frame, last frame, "VISIBLE"], [first, last, "RELOCALIZING"], ...]}`` (frames where a
    segment is absent are gaps). Empty when the pipeline ran without the visibility stage."""
    out: dict[str, list[list[Any]]] = {}
    for result in results:
        if result.states is None:
            continue
        for name, state in zip(result.segment_names(), result.state_names(), strict=True):
            runs = out.setdefault(name, [])
            frame = int(result.frame_index)
            if runs and runs[-1][2] == state and runs[-1][1] == frame - 1:
                runs[-1][1] = frame
            else:
                runs.append([frame, frame, state])
    return out


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


def _finite_or_none(value: Any) -> float | None:
    """A frame's timestamp, or None where the recording has none (NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def load_pipeline(args: argparse.Namespace) -> Any:
    """The pipeline for run's options: the resident path, or with ``--legacy`` the in-house habits."""
    from UltramotionIGTLib.core.device import resolve_device
    from UltramotionIGTLib.core.pipeline import Pipeline
    from UltramotionIGTLib.tools.benchmarks.legacy import LegacyPipeline

    config = pipeline_config_from_args(args)
    resolve_device(config.device)  # fail fast, before reading anything large
    cls = LegacyPipeline if args.legacy else Pipeline
    return cls.from_paths(args.detector, args.sam, args.sam_type, config)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ultramotion-igt run",
        description=(
            "Run detection + segmentation on a PLUS recording (.igs.mha/.seq.mha/.igs.nrrd/.seq.nrrd), a single "
            ".mha/.nrrd image, or a .npy array. Writes " + ", ".join(OUTPUT_FILES) + " into --out."
        ),
    )
    parser.add_argument("--input", required=True, help="recording or image file")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--max-frames", type=int, default=None, help="process only the first N frames")
    parser.add_argument("--gif", action="store_true", help="also write overlay.gif")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--no-sync-audit", action="store_true", help="do not count host syncs per frame (KPI host_syncs)"
    )
    add_pipeline_arguments(parser)
    args = parser.parse_args(list(argv))

    from UltramotionIGTLib.core.device import resolve_device
    from UltramotionIGTLib.io import read_sequence

    resolve_device(pipeline_config_from_args(args).device)  # fail fast, before reading anything large
    sequence = read_sequence(args.input)
    if args.max_frames is not None:
        if args.max_frames < 1:
            raise InputFileError(f"--max-frames must be >= 1, got {args.max_frames}")
        sequence = sequence.subset(range(min(args.max_frames, sequence.n_frames)))
    pipeline = load_pipeline(args)
    summary = process_sequence(
        pipeline,
        sequence.frames,
        sequence.timestamps,
        sequence,
        args.out,
        progress=not args.quiet,
        source=str(args.input),
        gif=args.gif,
        sync_audit=not args.no_sync_audit,
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
    return ", ".join(parts) + f" -> {out}"


def make_test_models_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ultramotion-igt make-test-models",
        description=(
            "Write small random-weight models in the real checkpoint formats (a D-FINE HF folder and a SAM "
            "checkpoint) for smoke tests. They detect nothing meaningful: use the demo models for that."
        ),
    )
    parser.add_argument("--out", required=True, help="folder to write detector/ and sam/ into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=256, help="detector input size (256)")
    args = parser.parse_args(list(argv))
    from UltramotionIGTLib.core.detector import write_random_detector
    from UltramotionIGTLib.core.sam import write_random_sam_checkpoint

    out = Path(args.out)
    try:
        det = write_random_detector(out / "detector", image_size=args.image_size, seed=args.seed)
        sam = write_random_sam_checkpoint(
            out / "sam" / "sam_vit_t_demo.safetensors", model_type="vit_t_demo", seed=args.seed
        )
    except OSError as exc:
        raise UltramotionError(f"cannot write test models into {out}: {exc}") from exc
    print(f"detector: {det}\nsam:      {sam}")
    return 0
