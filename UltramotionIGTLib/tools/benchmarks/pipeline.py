"""``ultramotion-igt bench pipeline``: legacy CPU-hop path vs GPU-resident path, side by side, one run.

Both pipelines share the same models and frames; frames alternate between the two paths so that
machine load drifts affect both equally. Prints FPS, p50/p95 latency per stage, host syncs per
frame (counted by the runtime audit in a separate pass so the counting never slows the timed pass),
and the resident/legacy ratios.

``--vs-detector DIR`` compares two detectors instead (e.g. an 80-class COCO head against the
2-class one): both run the GPU-resident path with the same SAM and settings on the same frames,
interleaved the same way, and the ratio printed is the cost of ``DIR`` over ``--detector``'s.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import numpy as np

from UltramotionIGTLib.tools.benchmarks.common import (
    add_model_arguments,
    device_name,
    device_sync,
    load_frames,
    load_models,
    table,
    temp_dir,
    timed,
)

PATHS = ("legacy", "gpu_resident")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="ultramotion-igt bench pipeline", description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument(
        "--vs-detector",
        default=None,
        help="a second D-FINE folder: compare the two detectors on the GPU-resident path instead",
    )
    parser.add_argument("--max-prompts", type=int, default=8, help="SAM prompts per frame (8)")
    args = parser.parse_args(list(argv))

    from UltramotionIGTLib.core.device import resolve_device
    from UltramotionIGTLib.core.kpi import LatencyStats
    from UltramotionIGTLib.core.pipeline import Pipeline, PipelineConfig
    from UltramotionIGTLib.tools.audit.runtime import RuntimeTransferAudit

    device = resolve_device(args.device)
    sync = device_sync(device)
    frames, source = load_frames(args, args.frames + args.warmup)
    with temp_dir() as tmp:
        from pathlib import Path

        detector, segmenter, models = load_models(args, device, Path(tmp))
    if args.vs_detector:
        from UltramotionIGTLib.core.detector import DFineDetector

        other = DFineDetector.from_pretrained(args.vs_detector, device=device)
        config = PipelineConfig(device=str(device), max_prompts=args.max_prompts)
        runs = {"detector": detector, "vs_detector": other}
        pipelines = {name: Pipeline(det, segmenter, config) for name, det in runs.items()}
        models = (
            f"{models}; vs detector {args.vs_detector} "
            f"({len(detector.class_names)} vs {len(other.class_names)} classes)"
        )
    else:
        pipelines = {
            path: Pipeline(
                detector,
                segmenter,
                PipelineConfig(
                    device=str(device),
                    gpu_resident=path == "gpu_resident",
                    sam_as_numpy=path == "legacy",
                    max_prompts=args.max_prompts,
                ),
            )
            for path in PATHS
        }
    paths = tuple(pipelines)
    stats = {path: LatencyStats() for path in paths}
    wall = {path: [] for path in paths}
    for i, frame in enumerate(frames):
        for path in paths:
            pipe = pipelines[path]
            holder = {}
            ms = timed(
                lambda p=pipe, f=frame, h=holder, i=i: h.update(r=p.process_frame(f, i).to_host()), sync
            )
            if i >= args.warmup:
                wall[path].append(ms)
                stats[path].add({**holder["r"].stage_ms, "end_to_end": ms})
    syncs = {}
    for path in paths:
        pipelines[path].reset()
        with RuntimeTransferAudit(device, cuda_profiler=False) as audit:
            for i, frame in enumerate(frames[: min(5, len(frames))]):
                with audit.frame(i):
                    pipelines[path].process_frame(frame, i).to_host()
        syncs[path] = audit.result.syncs_per_frame

    report = {
        "device": device_name(device),
        "models": models,
        "frames": source,
        "measured_frames": args.frames,
        "paths": {
            path: {
                "fps": 1000.0 / float(np.mean(wall[path])),
                "latency_ms": stats[path].summary(),
                "host_syncs_per_frame": syncs[path],
            }
            for path in paths
        },
    }
    leg, res = (report["paths"][p] for p in paths)
    if args.vs_detector:
        # cost of the second detector's pipeline over the first's (1.0: the same)
        report["cost_ratio"] = {
            "end_to_end_p50": res["latency_ms"]["end_to_end"]["p50"] / leg["latency_ms"]["end_to_end"]["p50"],
            "mean_frame_time": leg["fps"] / res["fps"],
        }
    else:
        report["speedup_fps"] = res["fps"] / leg["fps"]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"device: {report['device']}\nmodels: {models}\nframes: {source}, {args.frames} measured per path "
        f"(+{args.warmup} warm-up), paths interleaved frame by frame\n"
    )
    stages = [s for s in res["latency_ms"] if s != "end_to_end"] + ["end_to_end"]
    rows = []
    for stage in stages:
        a = leg["latency_ms"].get(stage, {}).get("p50")
        b = res["latency_ms"].get(stage, {}).get("p50")
        ratio = (a / b) if a and b else "-"
        rows.append([stage, a if a is not None else "-", b if b is not None else "-", ratio])
    first, second = ("detector", "vs detector") if args.vs_detector else ("legacy", "GPU-resident")
    print(table(["stage (p50 ms)", first, second, f"{first} / {second}"], rows))
    print()
    print(
        table(
            ["path", "FPS", "p95 end-to-end ms", "host syncs / frame"],
            [
                [
                    p,
                    report["paths"][p]["fps"],
                    report["paths"][p]["latency_ms"]["end_to_end"]["p95"],
                    report["paths"][p]["host_syncs_per_frame"],
                ]
                for p in paths
            ],
        )
    )
    if args.vs_detector:
        ratio = report["cost_ratio"]
        print(
            f"\nvs detector / detector cost: {ratio['end_to_end_p50']:.2f}x (end-to-end p50), "
            f"{ratio['mean_frame_time']:.2f}x (mean frame time)"
        )
    else:
        print(f"\nGPU-resident / legacy FPS: {report['speedup_fps']:.2f}x")
    return 0
