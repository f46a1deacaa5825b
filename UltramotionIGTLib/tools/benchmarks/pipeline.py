"""``ultramotion-igt bench pipeline``: the per-frame path in several configurations, side by side, one run.

Columns: ``legacy`` (the in-house CPU-hop habits, fp32 eager; off with --no-legacy), ``fp32 eager``
(the GPU-resident path in fp32, segment_anything's explicit attention, no compilation: the base of
every ratio), then with --precision P the resident path in P (attention from --sam-attention), and
with --compile the same compiled (torch.compile, static shapes; compiled before timing). Every
column has its own copy of the models, loaded once. Frames alternate between the columns so that
machine load drifts affect all equally; the resident columns stage each next frame's host-to-device
copy on a transfer stream while the current one computes (`Pipeline.submit`).

Prints per stage p50 (and p95/p99/max per column), FPS and the ratio to fp32 eager, peak device
memory per frame (CUDA), and the runtime transfer audit of each column in a separate pass (so that
counting never slows the timed pass): host syncs per frame, and on CUDA the sync-debug-mode warnings
and the profiler's device-to-host memcpy count.
Also prints the visibility stage's share of the fp32-eager resident path's frame time (its scores
and state machine, `UltramotionIGTLib.core.visibility`).

``--vs-detector DIR`` compares two detectors instead (e.g. an 80-class COCO head against a 2-class
one): the columns are ``detector`` (the model source's) and ``vs_detector`` (DIR), both on the
GPU-resident path with the same SAM, prompt budget (--max-prompts) and acceleration options, on the
same interleaved frames; the ratio printed is the cost of DIR's column over the detector's.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from UltramotionIGTLib.tools.benchmarks.common import (
    add_bench_arguments,
    device_name,
    device_sync,
    load_frames,
    table,
    timed,
)

BASE = "gpu_resident"  # fp32 eager, the base of the ratios (the JSON key of earlier reports)
#: percentiles reported per stage; 100 is the maximum
QUANTILES = (50, 95, 99, 100)
AUDITED_FRAMES = 5


def configure(parser: argparse.ArgumentParser) -> None:
    from UltramotionIGTLib.tools.options import (
        add_acceleration_arguments,
        add_max_prompts_argument,
        describe_from_doc,
    )

    describe_from_doc(parser, __doc__)
    add_bench_arguments(parser)
    group = parser.add_argument_group("columns")
    add_acceleration_arguments(group, precision_default=None)
    group.add_argument("--no-legacy", action="store_true", help="leave out the legacy column")
    group.add_argument(
        "--vs-detector",
        metavar="DIR",
        default=None,
        help="a second D-FINE folder: the columns become the two detectors on the GPU-resident path "
        "(same SAM, frames and options; the ratio is DIR's cost over the first detector's)",
    )
    add_max_prompts_argument(group)
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    parser.add_argument("--json-out", metavar="FILE", help="also write the JSON report to FILE")


def variants(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Column name -> `PipelineConfig` overrides (plus ``legacy``), in display order. With
    ``--vs-detector``: the two detectors' columns, in the configuration the acceleration options
    name (fp32 eager by default)."""
    out: dict[str, dict[str, Any]] = {}
    if getattr(args, "vs_detector", None):
        spec = {"precision": args.precision or "fp32", "sam_attention": args.sam_attention}
        if args.compile:
            spec.update(compile=True, compile_mode=args.compile_mode)
        return {"detector": dict(spec), "vs_detector": dict(spec)}
    if not args.no_legacy:
        out["legacy"] = {"precision": "fp32", "sam_attention": "explicit", "legacy": True}
    out[BASE] = {"precision": "fp32", "sam_attention": "explicit"}
    precision = args.precision or "fp32"
    fast = {"precision": precision, "sam_attention": args.sam_attention}
    if args.precision not in (None, "fp32") or args.sam_attention not in ("auto", "explicit"):
        out[label(fast)] = fast
    if args.compile:
        compiled = {**fast, "compile": True, "compile_mode": args.compile_mode}
        out[label(compiled)] = compiled
    return out


def label(variant: dict[str, Any]) -> str:
    name = str(variant.get("precision", "fp32"))
    if variant.get("sam_attention", "auto") not in ("auto",):
        name += f" {variant['sam_attention']}"
    if variant.get("compile"):
        mode = variant.get("compile_mode", "default")
        name += "+compile" + ("" if mode == "default" else f"({mode})")
    return name


def _model_bytes(pipeline: Any) -> int:
    total = 0
    for model in (getattr(pipeline.detector, "model", None), getattr(pipeline.segmenter, "model", None)):
        if model is not None:
            total += sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return total


def _peak_frame_mib(pipeline: Any, frames: list, device: Any) -> float | None:
    """Peak device memory a frame needs above what was allocated before it (CUDA; None on CPU)."""
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    for i, frame in enumerate(frames):
        pipeline.process_frame(frame, i).to_host()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _audit(pipeline: Any, frames: list, device: Any) -> dict[str, Any]:
    """The runtime transfer audit of ``frames`` through the timed loop's code (staged copies).

    The audit wraps torch functions, which compiled graphs guard on: the first frame under it
    recompiles them once, so it runs unaudited (set-up) before the counted frames."""
    from UltramotionIGTLib.tools.audit.runtime import RuntimeTransferAudit

    pipeline.reset()
    with RuntimeTransferAudit(device, cuda_profiler=device.type == "cuda") as audit:
        pipeline.process_frame(frames[0], 0).to_host()
        staged = _stage(pipeline, frames[0])
        for i in range(len(frames)):
            with audit.frame(i):
                packet = pipeline.process_frame(staged, i)
                if i + 1 < len(frames):
                    staged = _stage(pipeline, frames[i + 1])
                packet.to_host()
    data = audit.result.to_dict()
    return {
        "host_syncs_per_frame": data["syncs_per_frame"],
        "cuda_sync_warnings_per_frame": data["cuda_sync_warnings_per_frame"],
        "dtoh_memcpy_per_frame": data["dtoh_memcpy_per_frame"],
    }


def _stage(pipeline: Any, frame: Any) -> Any:
    """The next frame, its copy started (resident path) or as it is (legacy: the in-house habits)."""
    return frame if pipeline.path == "legacy" else pipeline.submit(frame)


def _quantiles(values: dict[str, float | None]) -> dict[str, float | None]:
    return {("max" if k == "p100" else k): v for k, v in values.items()}


def run(args: argparse.Namespace) -> int:
    import copy

    from UltramotionIGTLib.core.device import resolve_device
    from UltramotionIGTLib.core.kpi import FrameRecord, KpiAggregator
    from UltramotionIGTLib.core.pipeline import PipelineConfig
    from UltramotionIGTLib.tools.benchmarks.legacy import build_pipeline
    from UltramotionIGTLib.tools.options import resolve_model_source

    source = resolve_model_source(args)
    device = resolve_device(args.device)
    sync = device_sync(device)
    frames, frames_source = load_frames(args, args.frames + args.warmup)
    detector, segmenter = source.load(device)
    models = source.describe()
    columns = variants(args)
    detectors = {name: detector for name in columns}
    base_name = BASE
    if args.vs_detector:
        from UltramotionIGTLib.core.detector import DFineDetector

        other = DFineDetector.from_pretrained(args.vs_detector, device=device)
        detectors["vs_detector"] = other
        base_name = "detector"
        models = (
            f"{models}; vs detector {args.vs_detector} "
            f"({len(detector.class_names)} vs {len(other.class_names)} classes)"
        )
    pipelines = {}
    for name, spec in columns.items():
        spec = dict(spec)
        legacy = spec.pop("legacy", False)
        config = PipelineConfig(device=str(device), max_prompts=args.max_prompts, **spec)
        # each column its own models: a copy per column, so that none can affect another
        pipelines[name] = build_pipeline(
            copy.deepcopy(detectors[name]), copy.deepcopy(segmenter), config, legacy
        )
        pipelines[name].warmup(frames[0], progress=not args.json)
    del detector, segmenter, detectors

    stats = {name: KpiAggregator(window=None) for name in columns}
    wall: dict[str, list[float]] = {name: [] for name in columns}
    staged = {name: _stage(p, frames[0]) for name, p in pipelines.items()}
    for i in range(len(frames)):
        for name, pipe in pipelines.items():
            holder: dict[str, Any] = {}

            def one(pipe: Any = pipe, name: str = name, i: int = i, holder: dict = holder) -> None:
                packet = pipe.process_frame(staged[name], i)
                if i + 1 < len(frames):
                    staged[name] = _stage(pipe, frames[i + 1])
                holder["r"] = packet.to_host()

            ms = timed(one, sync)
            if i >= args.warmup:
                wall[name].append(ms)
                stats[name].add(FrameRecord.from_result(holder["r"], wall_ms=ms))

    audited = frames[: min(AUDITED_FRAMES, len(frames))]
    report_paths = {}
    for name, pipe in pipelines.items():
        described = pipe.describe()  # before the audit pass, whose instrumentation recompiles graphs
        audit = _audit(pipe, audited, device)
        report_paths[name] = {
            "fps": 1000.0 / float(np.mean(wall[name])),
            "latency_ms": {
                **{s: _quantiles(v) for s, v in stats[name].stage_ms(QUANTILES).items()},
                "end_to_end": _quantiles(stats[name].end_to_end_ms(QUANTILES)),
            },
            **audit,
            "peak_frame_mib": _peak_frame_mib(pipe, audited, device),
            "weights_mib": _model_bytes(pipe) / 2**20,
            "precision": described["precision"],
            "precision_notes": described["precision_notes"],
            "sam_attention": described["sam_attention"],
            "compile": described["compile"],
        }
    base = report_paths[base_name]
    report = {
        "device": device_name(device),
        "models": models,
        "frames": frames_source,
        "measured_frames": args.frames,
        "paths": report_paths,
        "base": base_name,
        "ratio_to_fp32_eager": {
            name: {
                "fps": r["fps"] / base["fps"],
                "end_to_end_p50": base["latency_ms"]["end_to_end"]["p50"]
                / r["latency_ms"]["end_to_end"]["p50"],
            }
            for name, r in report_paths.items()
        },
    }
    if "legacy" in report_paths:
        report["speedup_fps"] = base["fps"] / report_paths["legacy"]["fps"]
    if args.vs_detector:
        vs = report_paths["vs_detector"]
        # the cost of the second detector's column over the first's (1.0: the same)
        report["cost_ratio"] = {
            "end_to_end_p50": vs["latency_ms"]["end_to_end"]["p50"] / base["latency_ms"]["end_to_end"]["p50"],
            "mean_frame_time": base["fps"] / vs["fps"],
        }
    if args.json_out:
        from pathlib import Path

        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    vis_p50 = base["latency_ms"].get("visibility", {}).get("p50")
    e2e_p50 = base["latency_ms"].get("end_to_end", {}).get("p50")
    report["visibility_share"] = vis_p50 / e2e_p50 if vis_p50 is not None and e2e_p50 else None
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(_text(report, args))
    return 0


def _fmt(value: Any, digits: int = 2) -> Any:
    return "-" if value is None else (round(value, digits) if isinstance(value, float) else value)


def _text(report: dict[str, Any], args: argparse.Namespace) -> str:
    paths = report["paths"]
    names = list(paths)
    base_name = report["base"]
    title = {BASE: "fp32 eager", "vs_detector": "vs detector"}
    base_title = title.get(base_name, base_name)
    lines = [
        f"device: {report['device']}\nmodels: {report['models']}\nframes: {report['frames']}, "
        f"{args.frames} measured per column (+{args.warmup} warm-up), columns interleaved frame by frame\n"
    ]
    stages = [s for s in paths[base_name]["latency_ms"] if s != "end_to_end"] + ["end_to_end"]
    others = [n for n in names if n != base_name]
    rows = []
    for stage in stages:
        p50 = {n: paths[n]["latency_ms"].get(stage, {}).get("p50") for n in names}
        ratios = [(p50[base_name] / p50[n]) if p50[base_name] and p50[n] else "-" for n in others]
        rows.append([stage, *(_fmt(p50[n]) for n in names), *ratios])
    headers = [
        "stage (p50 ms)",
        *(title.get(n, n) for n in names),
        *(f"{base_title} / {title.get(n, n)}" for n in others),
    ]
    lines += [table(headers, rows), ""]
    rows = []
    for n in names:
        r, e2e = paths[n], paths[n]["latency_ms"]["end_to_end"]
        rows.append(
            [
                title.get(n, n),
                r["fps"],
                report["ratio_to_fp32_eager"][n]["fps"],
                *(_fmt(e2e[q]) for q in ("p50", "p95", "p99", "max")),
                _fmt(r["peak_frame_mib"], 1),
                _fmt(r["weights_mib"], 1),
                r["host_syncs_per_frame"],
                _fmt(r["cuda_sync_warnings_per_frame"]),
                _fmt(r["dtoh_memcpy_per_frame"]),
                f"det {r['precision']['detector']}, sam {r['precision']['sam']}",
            ]
        )
    headers = [
        "column", "FPS", f"FPS / {base_title}", "e2e p50", "p95", "p99", "max", "peak MiB/frame",
        "weights MiB", "host syncs/frame", "CUDA sync warnings/frame", "DtoH memcpy/frame", "precision",
    ]  # fmt: skip
    lines += [table(headers, rows), ""]
    for n in names:
        rows = [
            [
                stage,
                *(_fmt(paths[n]["latency_ms"].get(stage, {}).get(q)) for q in ("p50", "p95", "p99", "max")),
            ]
            for stage in stages
        ]
        lines += [
            f"{title.get(n, n)} (ms per stage):",
            table(["stage", "p50", "p95", "p99", "max"], rows),
            "",
        ]
        for note in paths[n]["precision_notes"]:
            lines.append(f"note ({title.get(n, n)}): {note}")
        if paths[n]["compile"].get("enabled"):
            lines.append(f"compile ({title.get(n, n)}): {paths[n]['compile']}")
    if "speedup_fps" in report:
        lines.append(f"GPU-resident (fp32 eager) / legacy FPS: {report['speedup_fps']:.2f}x")
    for n in others:
        if n != "legacy":
            ratio = report["ratio_to_fp32_eager"][n]
            lines.append(
                f"{title.get(n, n)} / {base_title}: FPS {ratio['fps']:.2f}x, end-to-end p50 "
                f"{ratio['end_to_end_p50']:.2f}x"
            )
    if "cost_ratio" in report:
        ratio = report["cost_ratio"]
        lines.append(
            f"vs detector / detector cost: {ratio['end_to_end_p50']:.2f}x (end-to-end p50), "
            f"{ratio['mean_frame_time']:.2f}x (mean frame time)"
        )
    share = report.get("visibility_share")
    if share is not None:
        vis = paths[base_name]["latency_ms"]["visibility"]["p50"]
        e2e = paths[base_name]["latency_ms"]["end_to_end"]["p50"]
        lines.append(
            f"visibility stage (scores + state machine): p50 {vis:.2f} ms = {100.0 * share:.1f} % of the "
            f"{base_title} end-to-end p50 ({e2e:.1f} ms)"
        )
    return "\n".join(lines)
