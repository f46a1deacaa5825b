"""``ultramotion-igt run`` and ``make-test-models``: recordings in, segmentation sequence + KPIs out."""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument(
        "--max-prompts",
        type=int,
        default=8,
        help="SAM prompts per frame over all classes, the fixed budget that sets the cost (8)",
    )
    parser.add_argument(
        "--max-targets",
        type=int,
        default=4,
        help="at most this many of those prompts per class; 0: no per-class cap (4)",
    )
    parser.add_argument(
        "--imaging-region",
        default=None,
        metavar="auto|X,Y,W,H",
        help="run the models on this part of the frame only (PLUS clip rectangle: origin X,Y and size W,H "
        "in pixels), or auto: the bounding box of the non-black pixels of the recording (default: the "
        "whole frame)",
    )
    parser.add_argument("--no-track", action="store_true", help="do not track targets across frames")
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
            max_targets_per_class=args.max_targets or None,
            max_prompts=args.max_prompts,
            imaging_region=_region_arg(getattr(args, "imaging_region", None)),
            gpu_resident=not args.legacy,
            sam_as_numpy=args.legacy,
            track=not args.no_track,
        )
    except ValueError as exc:
        raise InputFileError(str(exc)) from exc


def _region_arg(text: str | None) -> tuple[int, int, int, int] | None:
    """``--imaging-region`` X,Y,W,H -> a tuple; None for none or ``auto`` (decided from the frames)."""
    if text is None or str(text).strip().lower() == "auto":
        return None
    from UltramotionIGTLib.core.region import ImagingRegion

    return ImagingRegion.parse(text).as_tuple()


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
) -> dict[str, Any]:
    """Run every frame through ``pipeline`` and write the standard outputs into ``out_dir``.

    Outputs: segmentation.seq.nrrd (one labelmap per input frame, the input's geometry, one segment
    per tracked target), kpi.jsonl, summary.json, overlay.png (and overlay.gif when ``gif``).
    ``sync_audit``: count host syncs per frame (`RuntimeTransferAudit`, no profiler) into the KPIs.
    Returns the summary dict (with the `HostResult` list under ``"results"`` when ``keep_results``;
    it is not written to summary.json).
    """
    from tqdm import tqdm

    from UltramotionIGTLib.core.kpi import JsonlKpiSink, format_kpi, safe_log_kpi
    from UltramotionIGTLib.core.packet import SegmentTable
    from UltramotionIGTLib.io import write_segmentation_sequence
    from UltramotionIGTLib.tools.audit.runtime import RuntimeTransferAudit
    from UltramotionIGTLib.tools.overlay import save_overlay_gif, save_overlay_grid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sink = JsonlKpiSink(out / "kpi.jsonl")
    pipeline.kpi_sink = sink
    pipeline.reset()
    table = SegmentTable()
    labelmaps, results = [], []
    n = len(frames)
    t_start = time.perf_counter()
    try:
        safe_log_kpi(
            format_kpi({"event": "start", "source": source, "frames": n, **pipeline.describe()}), sink
        )
        bar = tqdm(total=n, desc="frames", unit="frame", disable=not progress or n < 2, file=sys.stderr)
        with (
            RuntimeTransferAudit(pipeline.device, cuda_profiler=False)
            if sync_audit
            else nullcontext() as audit
        ):
            for result in pipeline.run(frames, timestamps, audit=audit):
                labelmaps.append(table.labelmap(result))
                results.append(result)
                bar.update(1)
        bar.close()
        audit_result = audit.result if audit is not None else None
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
            "path": "legacy" if pipeline.config.legacy else "gpu_resident",
            "frames_in": n,
            "frames_out": len(results),
            "dropped": n - len(results),
            "wall_s": wall_s,
            "fps": len(results) / wall_s if wall_s > 0 else None,
            "latency_ms": pipeline.latency.summary(),
            "host_syncs_per_frame": audit_result.syncs_per_frame if audit_result else None,
            "declared_hops_per_frame": audit_result.declared_per_frame if audit_result else None,
            "segments": [{"value": v, "name": name, "color": list(c)} for v, name, c in table.segments()],
            "outputs": sorted(p.name for p in out.iterdir()) + ["summary.json"],
        }
        safe_log_kpi(format_kpi({"event": "summary", **summary}), sink)
    finally:
        sink.close()
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if keep_results:
        summary["results"] = results
    return summary


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
    from UltramotionIGTLib.core.pipeline import Pipeline
    from UltramotionIGTLib.io import read_sequence

    config = pipeline_config_from_args(args)
    resolve_device(config.device)  # fail fast, before reading anything large
    # colour stays colour: the pipeline gives it to 3-channel models and luminance to grey ones
    sequence = read_sequence(args.input, color="rgb")
    if args.max_frames is not None:
        if args.max_frames < 1:
            raise InputFileError(f"--max-frames must be >= 1, got {args.max_frames}")
        sequence = sequence.subset(range(min(args.max_frames, sequence.n_frames)))
    if str(args.imaging_region or "").strip().lower() == "auto":
        from UltramotionIGTLib.core.region import ImagingRegion

        region = ImagingRegion.from_frames(sequence.frames)
        config.imaging_region = region.as_tuple()
        h, w = sequence.frame_shape
        print(f"imaging region (auto, from the non-black pixels): {region.as_text()} of the {w}x{h} frame")
    pipeline = Pipeline.from_paths(args.detector, args.sam, args.sam_type, config)
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
