"""``ultramotion-igt bench pipeline``: legacy CPU-hop path vs GPU-resident path, side by side, one run.

Both pipelines share the same models and frames; frames alternate between the two paths so that
machine load drifts affect both equally. Prints FPS, p50/p95 latency per stage, host syncs per
frame (counted by the runtime audit in a separate pass so the counting never slows the timed pass),
the resident/legacy ratios, and the visibility stage's share of the resident path's frame time
(its scores and state machine, `UltramotionIGTLib.core.visibility`).
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
    args = parser.parse_args(list(argv))

    from UltramotionIGTLib.core.device import resolve_device
    from UltramotionIGTLib.core.kpi import FrameRecord, KpiAggregator
    from UltramotionIGTLib.core.pipeline import PipelineConfig
    from UltramotionIGTLib.tools.audit.runtime import RuntimeTransferAudit
    from UltramotionIGTLib.tools.benchmarks.legacy import build_pipeline

    device = resolve_device(args.device)
    sync = device_sync(device)
    frames, source = load_frames(args, args.frames + args.warmup)
    with temp_dir() as tmp:
        from pathlib import Path

        detector, segmenter, models = load_models(args, device, Path(tmp))
    pipelines = {
        path: build_pipeline(detector, segmenter, PipelineConfig(device=str(device)), legacy=path == "legacy")
        for path in PATHS
    }
    stats = {path: KpiAggregator(window=None) for path in PATHS}
    wall = {path: [] for path in PATHS}
    for i, frame in enumerate(frames):
        for path in PATHS:
            pipe = pipelines[path]
            holder = {}
            ms = timed(
                lambda p=pipe, f=frame, h=holder, i=i: h.update(r=p.process_frame(f, i).to_host()), sync
            )
            if i >= args.warmup:
                wall[path].append(ms)
                stats[path].add(FrameRecord.from_result(holder["r"], wall_ms=ms))
    syncs = {}
    for path in PATHS:
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
                "latency_ms": {**stats[path].stage_ms(), "end_to_end": stats[path].end_to_end_ms()},
                "host_syncs_per_frame": syncs[path],
            }
            for path in PATHS
        },
    }
    leg, res = report["paths"]["legacy"], report["paths"]["gpu_resident"]
    report["speedup_fps"] = res["fps"] / leg["fps"]
    vis_p50 = res["latency_ms"].get("visibility", {}).get("p50")
    e2e_p50 = res["latency_ms"]["end_to_end"].get("p50")
    report["visibility_share"] = vis_p50 / e2e_p50 if vis_p50 is not None and e2e_p50 else None
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
    print(table(["stage (p50 ms)", "legacy", "GPU-resident", "legacy / resident"], rows))
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
                for p in PATHS
            ],
        )
    )
    print(f"\nGPU-resident / legacy FPS: {report['speedup_fps']:.2f}x")
    if report["visibility_share"] is not None:
        print(
            f"visibility stage (scores + state machine): p50 {vis_p50:.2f} ms = "
            f"{100.0 * report['visibility_share']:.1f} % of the GPU-resident end-to-end p50 ({e2e_p50:.1f} ms)"
        )
    return 0
