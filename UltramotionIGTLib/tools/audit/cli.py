"""``ultramotion-igt audit``: static (AST) and runtime GPU->CPU transfer audit.

Static (a fast lint over the source)::

    ultramotion-igt audit [PATHS] [--format md|json] [--hot-path 'GLOB'...] [--entry FILE:FUNC]
                          [--not-hot FILE:FUNC...] [--fail-on critical|medium|minor] [--output FILE]

Runtime (the measure: runs the real per-frame loop `Pipeline.run`; models from --pack,
--detector/--sam or --random-models, else the shipped demo pack; input from --input, else the
synthetic phantom cycling empty / crowded / moving scenes)::

    ultramotion-igt audit --runtime [--frames N] [--warmup N] [--legacy | --compare] [--input FILE]
                          [--pack P | --detector DIR --sam CKPT | --random-models] [--device D]
                          [--fail-on undeclared]

Exit status: 0; 1 when ``--fail-on`` finds something (the findings are listed on stderr, each with
its ``file:line``); 2 for a usage or input error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from UltramotionIGTLib.errors import InputFileError, UsageError

EXIT_FINDINGS = 1
_LIB_DIR = Path(__file__).resolve().parents[2]


def configure(parser: argparse.ArgumentParser) -> None:
    from UltramotionIGTLib.tools.audit.static import DEFAULT_ENTRIES, DEFAULT_NOT_HOT
    from UltramotionIGTLib.tools.options import (
        add_model_arguments,
        add_pipeline_arguments,
        non_negative_int,
        positive_int,
    )

    parser.description = (
        "GPU->CPU transfer audit. Static (default): scan Python files for explicit hops, implicit "
        "host syncs and round trips, with severities from the per-frame call graph. Runtime "
        "(--runtime): run the pipeline and count hops and syncs per frame with their origin. "
        "Exit 1 when --fail-on finds something."
    )
    parser.add_argument(
        "paths", nargs="*", help="files or folders to scan (default: the UltramotionIGTLib package)"
    )
    parser.add_argument("--format", choices=("md", "json"), default="md", help="report format (default md)")
    parser.add_argument("--output", "-o", metavar="FILE", help="write the report to FILE instead of stdout")
    parser.add_argument(
        "--fail-on",
        choices=("critical", "medium", "minor", "undeclared"),
        help="exit 1 when a static finding of this severity or worse exists (critical: the lint gate), "
        "or, with --runtime, when the GPU-resident run makes any undeclared sync, copy or blocking upload, "
        "or overruns a declaration's max_syncs ('undeclared'), naming file:line",
    )
    st = parser.add_argument_group("static audit")
    st.add_argument(
        "--hot-path",
        nargs="+",
        action="extend",
        default=[],
        metavar="PATTERN",
        help="globs on FILE:FUNCTION whose functions (and their callees) are per-frame hot, e.g. "
        "'*/assignment.py:*' (put them after the paths)",
    )
    st.add_argument(
        "--entry",
        action="append",
        default=None,
        metavar="FILE:FUNC",
        help=f"per-frame entry point(s) of the call graph (default: {' '.join(DEFAULT_ENTRIES)})",
    )
    st.add_argument(
        "--not-hot",
        nargs="+",
        action="extend",
        default=None,
        metavar="FILE:FUNC",
        help="FILE:FUNC names the hot path does not enter (FUNC may be * for a whole file); replaces the "
        f"default list: {' '.join(DEFAULT_NOT_HOT)}",
    )
    st.add_argument(
        "--root", metavar="DIR", help="report file names relative to DIR (default: the current folder)"
    )
    st.add_argument(
        "--top", type=int, default=10, metavar="N", help="files in the top-files table (default 10)"
    )
    rt = parser.add_argument_group("runtime audit")
    rt.add_argument(
        "--runtime",
        action="store_true",
        help="run the pipeline and count syncs, copies and blocking uploads per frame",
    )
    rt.add_argument(
        "--frames", type=positive_int, default=120, metavar="N", help="frames counted (default 120)"
    )
    rt.add_argument(
        "--warmup",
        type=non_negative_int,
        default=1,
        metavar="N",
        help="frames run before counting starts (default 1)",
    )
    rt.add_argument(
        "--input",
        metavar="FILE",
        help="recording or image file (default: the synthetic phantom, cycling empty / crowded / moving "
        "scenes of 10 frames)",
    )
    rt.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    rt.add_argument(
        "--compare", action="store_true", help="audit the legacy and the GPU-resident path side by side"
    )
    add_model_arguments(parser, random_models=True)
    add_pipeline_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """The static audit, or the runtime audit with ``--runtime``; the exit status (module doc)."""
    if args.runtime:
        if args.fail_on not in (None, "undeclared"):
            raise UsageError(
                f"--fail-on {args.fail_on} is for the static audit; with --runtime use undeclared"
            )
        return _runtime_main(args)
    if args.fail_on == "undeclared":
        raise UsageError("--fail-on undeclared needs --runtime")
    return _static_main(args)


# ---------------------------------------------------------------------------------------------------
# static


def _static_main(args: argparse.Namespace) -> int:
    from UltramotionIGTLib.tools.audit.report import static_json, static_markdown
    from UltramotionIGTLib.tools.audit.static import DEFAULT_ENTRIES, DEFAULT_NOT_HOT, scan_paths

    paths = args.paths or [_default_path()]
    for p in paths:
        if not Path(p).exists():
            raise InputFileError(f"audit: {p} does not exist: give Python files or folders to scan")
    result = scan_paths(
        paths,
        root=args.root,
        entries=args.entry if args.entry is not None else DEFAULT_ENTRIES,
        hot_path=args.hot_path,
        not_hot=args.not_hot if args.not_hot is not None else DEFAULT_NOT_HOT,
    )
    text = static_json(result) if args.format == "json" else static_markdown(result, top=args.top)
    _emit(text, args.output)
    if args.fail_on and (result.unresolved_entries or not result.hot_functions):
        # a gate that finds no per-frame entry point has checked nothing: that is a failure, not a pass
        missing = ", ".join(result.unresolved_entries) or "none of the entries"
        raise InputFileError(
            f"audit: per-frame entry point not found in the scanned files ({missing}): "
            "run from the repository root or pass --entry FILE:FUNC"
        )
    if args.fail_on:
        order = ("critical", "medium", "minor")
        worst = set(order[: order.index(args.fail_on) + 1])
        failing = [f for f in result.findings if f.severity in worst]
        if failing:
            print(
                f"audit: {len(failing)} finding(s) of severity {'/'.join(sorted(worst))}:",
                file=sys.stderr,
            )
            for f in failing:
                print(
                    f"  {f.file}:{f.line}: [{f.severity}] {f.label} in {f.function}: {f.code}",
                    file=sys.stderr,
                )
            return EXIT_FINDINGS
    return 0


def _default_path() -> str:
    """The UltramotionIGTLib package, relative to the current folder when it lies under it."""
    try:
        return _LIB_DIR.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(_LIB_DIR)


def _emit(text: str, output: str | None) -> None:
    if output:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")
        print(f"audit: report written to {path}", file=sys.stderr)
    else:
        print(text)


# ---------------------------------------------------------------------------------------------------
# runtime

#: the phantom scenes the runtime audit cycles through, ``SCENE_FRAMES`` frames each
SCENES = ("empty", "crowded", "moving")
SCENE_FRAMES = 10


def mixed_scene_frames(n: int, seed: int = 0) -> tuple[list[Any], list[str], list[int]]:
    """``n`` phantom frames cycling through `SCENES`, `SCENE_FRAMES` frames each.

    ``empty``: no vessel, no needle; ``crowded``: three vessels and a needle; ``moving``: the default
    anatomy with a wide, fast probe sweep, so targets leave the view and come back. Every switch
    of scene makes targets appear or vanish at once. Returns (HxW uint8 frames, scene name per
    frame, ground-truth target count per frame).
    """
    from UltramotionIGTLib.tools.phantom import PhantomConfig, PhantomStream

    configs = {
        "empty": PhantomConfig(n_vessels=(0, 0), needle_probability=0.0),
        "crowded": PhantomConfig(n_vessels=(3, 3), needle_probability=1.0, needle_episode_s=3.0),
        "moving": PhantomConfig(probe_range_mm=12.0, probe_speed_mm_s=10.0),
    }
    streams = {
        name: PhantomStream(cfg, seed=seed + i, n_frames=max(n, 1))
        for i, (name, cfg) in enumerate(configs.items())
    }
    frames, scenes, targets = [], [], []
    for i in range(n):
        name = SCENES[(i // SCENE_FRAMES) % len(SCENES)]
        frame = streams[name].frame(i)
        frames.append(frame.image)
        scenes.append(name)
        targets.append(len(frame.labels))
    return frames, scenes, targets


def _load_frames(args: argparse.Namespace) -> tuple[list[Any], list[str] | None, list[int] | None]:
    n = args.frames + max(args.warmup, 0)
    if args.frames <= 0:
        raise InputFileError(f"--frames must be >= 1, got {args.frames}")
    if args.input:
        from UltramotionIGTLib.io import read_sequence

        frames = read_sequence(args.input).frames
        if len(frames) == 0:
            raise InputFileError(f"{args.input} holds no frames")
        return [frames[i % len(frames)] for i in range(n)], None, None
    return mixed_scene_frames(n, seed=args.seed)


def run_runtime_audit(
    pipeline: Any, frames: Sequence[Any], warmup: int = 1
) -> tuple[Any, list[Any], list[dict]]:
    """Audit the per-frame loop `Pipeline.run` (process, host copy, KPI record) on ``frames``.

    The first ``warmup`` frames run inside the audit but before any audited frame (their events are
    listed as set-up). Returns (`RuntimeAuditResult`, host results, KPI records of the audited frames).
    """
    import os

    from UltramotionIGTLib.core.kpi import FanoutKpiSink, JsonlKpiSink, KpiAggregator
    from UltramotionIGTLib.tools.audit.runtime import RuntimeTransferAudit

    # the sinks run's frame loop uses: the records are serialised and aggregated as in a real run
    jsonl = JsonlKpiSink(os.devnull)
    sink = FanoutKpiSink(jsonl, KpiAggregator(window=None))
    try:
        with RuntimeTransferAudit(pipeline.device, cuda_profiler=True) as audit:  # the profiler: CUDA only
            for _ in pipeline.run(frames[:warmup], sink=sink):
                pass
            done = list(pipeline.run(frames[warmup:], audit=audit, sink=sink))
    finally:
        jsonl.close()
    return audit.result, [result for _, result, _ in done], [record for _, _, record in done]


def _scene_summary(scenes: list[str] | None, targets: list[int] | None, results: list[Any]) -> list[dict]:
    if scenes is None or targets is None:
        return []
    out = []
    for name in SCENES:
        idx = [i for i, s in enumerate(scenes) if s == name]
        if not idx:
            continue
        found = [len(results[i]) for i in idx]
        truth = [targets[i] for i in idx]
        out.append(
            {
                "scene": name,
                "frames": len(idx),
                "true_targets": [min(truth), max(truth)],
                "found_targets": [min(found), max(found)],
            }
        )
    return out


def _runtime_main(args: argparse.Namespace) -> int:
    from UltramotionIGTLib.tools.audit.report import gate_lines, runtime_compare_markdown
    from UltramotionIGTLib.tools.benchmarks.legacy import build_pipeline
    from UltramotionIGTLib.tools.options import pipeline_config_from_args, resolve_model_source

    frames, scenes, targets = _load_frames(args)
    warmup = max(args.warmup, 0)
    modes = ["legacy", "gpu_resident"] if args.compare else (["legacy"] if args.legacy else ["gpu_resident"])
    results: dict[str, Any] = {}
    scene_rows: dict[str, list[dict]] = {}
    source = resolve_model_source(args)
    config = pipeline_config_from_args(args)
    detector, segmenter = source.load(config.device)
    for mode in modes:
        pipeline = build_pipeline(detector, segmenter, config, legacy=mode == "legacy")
        result, host_results, _ = run_runtime_audit(pipeline, frames, warmup=warmup)
        results[mode] = result
        audited = scenes[warmup:] if scenes else None
        scene_rows[mode] = _scene_summary(audited, targets[warmup:] if targets else None, host_results)
    input_name = args.input or f"synthetic phantom, mixed scenes {'/'.join(SCENES)} (seed {args.seed})"
    if args.format == "json":
        text = json.dumps(
            {
                "tool": "ultramotion-igt audit",
                "kind": "runtime",
                "input": input_name,
                "warmup": warmup,
                "models": {
                    "detector": str(source.detector),
                    "sam": str(source.sam),
                    "sam_type": source.sam_type,
                    "source": source.describe(),
                },
                "scenes": scene_rows,
                "runs": {mode: r.to_dict() for mode, r in results.items()},
            },
            indent=2,
        )
    else:
        parts = [
            "# GPU->CPU transfer audit (runtime)",
            "",
            f"Input: {input_name}; {args.frames} frames after {warmup} warm-up; models: {source.describe()}.",
            "",
        ]
        rows = scene_rows.get("gpu_resident") or next(iter(scene_rows.values()), [])
        if rows:
            parts += [
                "| Scene | Frames | True targets (min-max) | Targets found (min-max) |",
                "|---|---:|---|---|",
            ]
            parts += [
                f"| {r['scene']} | {r['frames']} | {r['true_targets'][0]}-{r['true_targets'][1]} | "
                f"{r['found_targets'][0]}-{r['found_targets'][1]} |"
                for r in rows
            ]
            parts.append("")
        if len(results) > 1:
            parts.append(runtime_compare_markdown(results))
        for mode, r in results.items():
            parts.append(r.to_markdown(title=f"{mode} path"))
        text = "\n".join(parts)
    _emit(text, args.output)
    if args.fail_on == "undeclared":
        checked_mode = "gpu_resident" if "gpu_resident" in results else modes[0]
        failing = gate_lines(results[checked_mode])
        if failing:
            n = len(results[checked_mode].failures())
            print(
                f"audit: {n} undeclared or over-budget sync/copy/upload event(s) in the {checked_mode} path "
                f"over {args.frames} frames:",
                file=sys.stderr,
            )
            for line in failing:
                print(f"  {line}", file=sys.stderr)
            return EXIT_FINDINGS
    return 0
