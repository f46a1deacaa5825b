"""``ultramotion-igt run`` and ``make-test-models``: recordings in, segmentation sequence + KPIs out.

`process_sequence` (also used by ``demo``) runs the frames and writes the outputs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from UltramotionIGTLib.errors import UltramotionError
from UltramotionIGTLib.tools.options import (
    add_model_arguments,
    add_pipeline_arguments,
    pipeline_config_from_args,
    positive_int,
    resolve_model_source,
)

OUTPUT_FILES = ("segmentation.seq.nrrd", "kpi.jsonl", "summary.json", "overlay.png")


def process_sequence(
    pipeline: Any,
    frames: Any,
    timestamps: Any,
    reference: Any,
    out_dir: str | Path,
    progress: bool = True,
    source: str = "",
    gif: bool = False,
    sync_audit: bool = False,
    keep_results: bool = False,
) -> dict[str, Any]:
    """Run every frame through ``pipeline`` and write the standard outputs into ``out_dir``.

    Outputs: segmentation.seq.nrrd (one labelmap per input frame, the input's geometry, one segment
    per tracked target), kpi.jsonl, summary.json, overlay.png (and overlay.gif when ``gif``).
    ``sync_audit``: count host syncs per frame (`RuntimeTransferAudit`, no profiler): each frame's
    KPI record gets ``host_syncs``/``declared_hops`` and the summary ``host_syncs_per_frame`` and
    ``declared_hops_per_frame``. Off (the default), no audit is created and those fields are absent.
    Returns the summary dict (with the `HostResult` list under ``"results"`` when ``keep_results``;
    it is not written to summary.json).
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
    t_start = time.perf_counter()
    try:
        safe_log_kpi({"event": "start", "source": source, "frames": n, **pipeline.describe()}, sink)
        bar = tqdm(total=n, desc="frames", unit="frame", disable=not progress or n < 2, file=sys.stderr)
        audit_context: Any = nullcontext()
        if sync_audit:
            from UltramotionIGTLib.tools.audit.runtime import RuntimeTransferAudit

            audit_context = RuntimeTransferAudit(pipeline.device, cuda_profiler=False)
        if n:
            pipeline.warmup(frames[0], progress=progress)  # precision check, compilation: before timing
        with audit_context as audit:
            staged = pipeline.submit(frames[0]) if n else None
            for index in range(n):
                t0 = time.perf_counter()
                with audit.frame(index) if audit is not None else nullcontext():
                    packet = pipeline.process_frame(staged, index, _finite_or_none(stamps[index]))
                    if index + 1 < n:  # the next frame's copy overlaps this frame's compute
                        staged = pipeline.submit(frames[index + 1])
                    result = packet.to_host()
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
        syncs = (
            {
                "host_syncs_per_frame": kpi.host_syncs_per_frame(),
                "declared_hops_per_frame": kpi.declared_hops_per_frame(),
            }
            if sync_audit
            else {}
        )
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
            **syncs,
            "pipeline": {k: v for k, v in pipeline.describe().items() if k not in ("config", "class_names")},
            "segments": [{"value": v, "name": name, "color": list(c)} for v, name, c in table.segments()],
            "outputs": sorted(p.name for p in out.iterdir()) + ["summary.json"],
        }
        safe_log_kpi({"event": "summary", **summary}, sink)
    finally:
        jsonl.close()
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if keep_results:
        summary["results"] = results
    return summary


def _finite_or_none(value: Any) -> float | None:
    """A frame's timestamp, or None where the recording has none (NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


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
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument(
        "--max-frames", type=positive_int, default=None, metavar="N", help="only the first N frames"
    )
    parser.add_argument("--gif", action="store_true", help="also write overlay.gif")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--sync-audit",
        action="store_true",
        help="count host syncs per frame (runtime audit, no profiler): host_syncs in kpi.jsonl, "
        "host_syncs_per_frame in summary.json (off by default: the counting wraps torch calls)",
    )
    add_model_arguments(parser, required=True)
    add_pipeline_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from UltramotionIGTLib.core.device import resolve_device
    from UltramotionIGTLib.io import read_sequence
    from UltramotionIGTLib.tools.benchmarks.legacy import build_pipeline

    source = resolve_model_source(args)
    config = pipeline_config_from_args(args)
    device = resolve_device(config.device)  # fail fast, before reading anything large
    sequence = read_sequence(args.input)
    if args.max_frames is not None:
        sequence = sequence.subset(range(min(args.max_frames, sequence.n_frames)))
    # the pipeline alone holds the loaded models: a reduced-precision copy then replaces them
    pipeline = build_pipeline(*source.load(device), config, legacy=args.legacy)
    summary = process_sequence(
        pipeline,
        sequence.frames,
        sequence.timestamps,
        sequence,
        args.out,
        progress=not args.quiet,
        source=str(args.input),
        gif=args.gif,
        sync_audit=args.sync_audit,
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
