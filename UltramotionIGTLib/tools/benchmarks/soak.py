"""``ultramotion-igt bench soak``: a long recording through ``run``'s frame loop, memory measured.

N frames of the demo phantom (256 x 256, held-out seed) are generated one at a time, so the input
holds no memory, and go through `UltramotionIGTLib.tools.run.process_sequence` -- the frame loop
and the output writers of ``run`` -- into --out. Prints the process's resident memory (RSS) after a
warm-up and at several points up to the end, and the peak RSS, then checks that every frame is in
the outputs: the segmentation's item count (its header) and the frame records of kpi.jsonl.

The acceptance: the RSS at the end is the RSS after the warm-up, give or take what the run keeps by
design (4 bytes per frame and stage for the summary's percentiles, the segment table); nothing
grows with the frames' pixels.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any


def rss_mb() -> float:
    """Resident memory of this process now, MB (Linux ``/proc/self/status`` VmRSS; elsewhere the peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB (``getrusage``; kB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def configure(parser: argparse.ArgumentParser) -> None:
    from UltramotionIGTLib.tools.options import (
        add_model_arguments,
        add_pipeline_arguments,
        describe_from_doc,
        positive_int,
    )

    describe_from_doc(parser, __doc__)
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder of the run")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run's results in --out")
    parser.add_argument(
        "--frames", type=positive_int, default=10_000, metavar="N", help="phantom frames (default 10000)"
    )
    parser.add_argument(
        "--warmup-frames",
        type=positive_int,
        default=100,
        metavar="N",
        help="frames before the first memory reading (default 100)",
    )
    parser.add_argument("--seed", type=int, default=None, help="phantom seed (default: the first held-out)")
    parser.add_argument("--json", metavar="PATH", help="also write the readings as JSON to PATH")
    add_model_arguments(parser, random_models=True)
    add_pipeline_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from UltramotionIGTLib.core.device import resolve_device
    from UltramotionIGTLib.io import UltrasoundSequence
    from UltramotionIGTLib.tools.benchmarks.legacy import build_pipeline
    from UltramotionIGTLib.tools.options import pipeline_config_from_args, resolve_model_source
    from UltramotionIGTLib.tools.outputs import OutputFolder
    from UltramotionIGTLib.tools.phantom import PhantomStream, sequence_seeds
    from UltramotionIGTLib.tools.run import process_sequence
    from UltramotionIGTLib.tools.training.common import HELDOUT_DATASET_SEED, demo_phantom_config

    n = int(args.frames)
    source = resolve_model_source(args)
    config = pipeline_config_from_args(args, source=source)
    device = resolve_device(config.device)
    folder = OutputFolder.open(args.out, args.overwrite)
    try:
        pipeline = build_pipeline(*source.load(device), config, legacy=args.legacy)
    except BaseException:
        folder.release()
        raise
    phantom = demo_phantom_config()
    seed = int(sequence_seeds(HELDOUT_DATASET_SEED, 1)[0]) if args.seed is None else int(args.seed)
    stream = PhantomStream(phantom, seed=seed, n_frames=n)
    spacing = float(phantom.spacing_mm)
    geometry = UltrasoundSequence(frames=[[[0]]], spacing=(spacing, spacing, 1.0))
    first = min(args.warmup_frames, n) - 1
    marks = sorted({first, *(m for m in (int(n * k / 10) - 1 for k in range(1, 11)) if m > first)})
    readings: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def frames():
        for index in range(n):
            yield stream.frame(index).image

    def on_result(index: int, _result: Any) -> None:
        if index in marks:
            readings.append(
                {
                    "frame": index + 1,
                    "rss_mb": rss_mb(),
                    "peak_rss_mb": peak_rss_mb(),
                    "elapsed_s": time.perf_counter() - t0,
                }
            )
            r = readings[-1]
            print(
                f"frame {r['frame']:>6}: RSS {r['rss_mb']:8.1f} MB, peak {r['peak_rss_mb']:8.1f} MB, "
                f"{r['elapsed_s']:7.1f} s",
                file=sys.stderr,
                flush=True,
            )

    summary = process_sequence(
        pipeline,
        frames(),
        (stream.timestamp(i) for i in range(n)),
        geometry,
        folder,
        progress=False,
        source=f"synthetic phantom, seed {seed}, {n} frames generated one at a time",
        on_result=on_result,
        n_frames=n,
    )
    report = _report(args.out, n, readings, summary)
    print(_format(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0 if report["every_frame_present"] else 1


def _report(
    out: str | Path, n: int, readings: list[dict[str, Any]], summary: dict[str, Any]
) -> dict[str, Any]:
    import nrrd

    out = Path(out)
    with open(out / "segmentation.seq.nrrd", "rb") as fh:
        header = nrrd.read_header(fh)
    items = int(header["sizes"][-1])
    frame_records = 0
    with open(out / "kpi.jsonl", encoding="utf-8") as fh:
        for line in fh:
            frame_records += line.startswith('{"event":"frame"')
    start, end = readings[0], readings[-1]
    return {
        "frames": n,
        "segmentation_items": items,
        "kpi_frame_records": frame_records,
        "every_frame_present": items == n and frame_records == n and summary.get("complete") is True,
        "rss_after_warmup_mb": start["rss_mb"],
        "rss_end_mb": end["rss_mb"],
        "rss_growth_mb": end["rss_mb"] - start["rss_mb"],
        "peak_rss_after_warmup_mb": start["peak_rss_mb"],
        "peak_rss_end_mb": end["peak_rss_mb"],
        "fps": summary.get("fps"),
        "segments": len(summary.get("segments", [])),
        "readings": readings,
    }


def _format(report: dict[str, Any]) -> str:
    from UltramotionIGTLib.tools.benchmarks.common import table

    rows = [[r["frame"], r["rss_mb"], r["peak_rss_mb"], r["elapsed_s"]] for r in report["readings"]]
    lines = [
        table(["frame", "RSS MB", "peak RSS MB", "elapsed s"], rows),
        "",
        f"RSS after warm-up {report['rss_after_warmup_mb']:.1f} MB -> end {report['rss_end_mb']:.1f} MB "
        f"(growth {report['rss_growth_mb']:+.1f} MB); peak RSS {report['peak_rss_after_warmup_mb']:.1f} -> "
        f"{report['peak_rss_end_mb']:.1f} MB over {report['frames']} frames ({report['fps']:.1f} FPS, "
        f"{report['segments']} segments)",
        f"every frame present: {report['every_frame_present']} (segmentation items "
        f"{report['segmentation_items']}, kpi.jsonl frame records {report['kpi_frame_records']})",
    ]
    return "\n".join(lines)
