"""``ultramotion-igt audit``: static (AST) and runtime GPU->CPU transfer audit.

Static::

    ultramotion-igt audit UltramotionIGTLib [--format md|json] [--hot-path 'GLOB'...]
                          [--entry FILE:FUNC] [--not-hot FILE:FUNC...] [--fail-on critical] [--output FILE]

Runtime (runs the real per-frame loop `Pipeline.run`; models from --detector/--sam, else the
shipped demo models, else small random-weight test models written to a temporary folder; input
from --input, else the synthetic phantom cycling empty / crowded / moving scenes)::

    ultramotion-igt audit --runtime [--frames N] [--legacy | --compare] [--input FILE]
                          [--detector DIR --sam CKPT --sam-type T --device D] [--fail-on undeclared]

Exit status: 0; 1 when ``--fail-on`` finds something (the findings are listed on stderr, each with
its ``file:line``); 2 for a usage or input error.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from UltramotionIGTLib.errors import InputFileError

EXIT_FINDINGS = 1
_LIB_DIR = Path(__file__).resolve().parents[2]
_DEMO_DETECTOR = _LIB_DIR.parent / "Resources" / "Models" / "detector"
_DEMO_SAM_DIR = _LIB_DIR.parent / "Resources" / "Models" / "sam"


def build_parser() -> argparse.ArgumentParser:
    from UltramotionIGTLib.tools.audit.static import DEFAULT_ENTRIES, DEFAULT_NOT_HOT
    from UltramotionIGTLib.tools.run import add_pipeline_arguments

    parser = argparse.ArgumentParser(
        prog="ultramotion-igt audit",
        description=(
            "GPU->CPU transfer audit. Static (default): scan Python files for explicit hops, implicit "
            "host syncs and round trips, with severities from the per-frame call graph. Runtime "
            "(--runtime): run the pipeline and count hops and syncs per frame with their origin."
        ),
    )
    parser.add_argument(
        "paths", nargs="*", help="files or folders to scan (default: the UltramotionIGTLib package)"
    )
    parser.add_argument("--format", choices=("md", "json"), default="md", help="report format (md)")
    parser.add_argument("--output", "-o", help="write the report to this file instead of stdout")
    parser.add_argument(
        "--hot-path",
        nargs="+",
        action="extend",
        default=[],
        metavar="PATTERN",
        help="globs on FILE:FUNCTION whose functions (and their callees) are per-frame hot, e.g. "
        "'*/matching.py:GpuHungarianMatcher.*' (put them after the paths)",
    )
    parser.add_argument(
        "--entry",
        action="append",
        default=None,
        metavar="FILE:FUNC",
        help=f"per-frame entry point(s) of the call graph (default: {' '.join(DEFAULT_ENTRIES)})",
    )
    parser.add_argument(
        "--not-hot",
        nargs="+",
        action="extend",
        default=None,
        metavar="PATTERN",
        help="FILE:FUNC names the hot path does not enter (FUNC may be * for a whole file); replaces the "
        f"default list: {' '.join(DEFAULT_NOT_HOT)}",
    )
    parser.add_argument("--root", help="report file names relative to this folder (default: current folder)")
    parser.add_argument("--top", type=int, default=10, help="files in the top-files table (10)")
    parser.add_argument(
        "--fail-on",
        choices=("critical", "medium", "minor", "undeclared"),
        help="exit 1 when a static finding of this severity or worse exists (critical: the lint gate), "
        "or, with --runtime, when the GPU-resident run makes any undeclared sync, copy or blocking upload, "
        "or overruns a declaration's max_syncs ('undeclared'), naming file:line",
    )
    rt = parser.add_argument_group("runtime audit")
    rt.add_argument("--runtime", action="store_true", help="run the pipeline and count hops per frame")
    rt.add_argument("--frames", type=int, default=120, help="frames to audit (120)")
    rt.add_argument("--warmup", type=int, default=1, help="frames run before counting starts (1)")
    rt.add_argument(
        "--input",
        help="recording or image file (default: the synthetic phantom, cycling empty / crowded / moving "
        f"scenes of {SCENE_FRAMES} frames)",
    )
    rt.add_argument("--seed", type=int, default=0, help="phantom seed (0)")
    rt.add_argument(
        "--compare", action="store_true", help="audit the legacy and the GPU-resident path side by side"
    )
    add_pipeline_arguments(rt, models_required=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ultramotion-igt audit``; returns the exit status."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.runtime:
        if args.fail_on not in (None, "undeclared"):
            raise InputFileError(
                f"--fail-on {args.fail_on} is for the static audit; with --runtime use undeclared"
            )
        return _runtime_main(args)
    if args.fail_on == "undeclared":
        raise InputFileError("--fail-on undeclared needs --runtime")
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


def _find_models(args: argparse.Namespace, tmp: Path) -> tuple[str, str, str, str]:
    """(detector dir, sam checkpoint, sam type, where they came from)."""
    if bool(args.detector) != bool(args.sam):
        raise InputFileError("give both --detector and --sam, or neither (then the demo models are used)")
    if args.detector:
        return args.detector, args.sam, args.sam_type, "given"
    sams = sorted(p for p in _DEMO_SAM_DIR.glob("*") if p.suffix in (".safetensors", ".pth", ".pt"))
    if (_DEMO_DETECTOR / "config.json").is_file() and sams:
        return str(_DEMO_DETECTOR), str(sams[0]), args.sam_type, "shipped demo models"
    from UltramotionIGTLib.core.detector import write_random_detector
    from UltramotionIGTLib.core.sam import write_random_sam_checkpoint

    det = write_random_detector(tmp / "detector", seed=0)
    sam = write_random_sam_checkpoint(
        tmp / "sam" / "sam_vit_t_demo.safetensors", model_type="vit_t_demo", seed=0
    )
    return str(det), str(sam), "vit_t_demo", "random-weight test models (no demo models found)"


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


def build_pipeline(detector: str, sam: str, sam_type: str, config: Any, legacy: bool = False) -> Any:
    """The pipeline the runtime audit runs: GPU-resident, or (``legacy``) the in-house habits.

    The one place that knows how the legacy path is built.
    """
    from dataclasses import replace

    from UltramotionIGTLib.core.pipeline import Pipeline

    if legacy:
        config = replace(config, gpu_resident=False, sam_as_numpy=True)
    return Pipeline.from_paths(detector, sam, sam_type=sam_type, config=config)


def run_runtime_audit(
    pipeline: Any, frames: Sequence[Any], warmup: int = 1
) -> tuple[Any, list[Any], list[dict]]:
    """Audit the per-frame loop `Pipeline.run` (process, host copy, KPI record) on ``frames``.

    The first ``warmup`` frames run inside the audit but before any audited frame (their events are
    listed as set-up). Returns (`RuntimeAuditResult`, host results, KPI records of the audited frames).
    """
    from UltramotionIGTLib.core.kpi import MemoryKpiSink
    from UltramotionIGTLib.tools.audit.runtime import RuntimeTransferAudit

    sink = MemoryKpiSink()
    pipeline.kpi_sink = None
    with RuntimeTransferAudit(pipeline.device, cuda_profiler=True) as audit:  # the profiler: CUDA only
        for _ in pipeline.run(frames[:warmup]):
            pass
        pipeline.kpi_sink = sink
        results = list(pipeline.run(frames[warmup:], audit=audit))
    pipeline.kpi_sink = None
    return audit.result, results, sink.records


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
    from UltramotionIGTLib.tools.run import pipeline_config_from_args

    frames, scenes, targets = _load_frames(args)
    warmup = max(args.warmup, 0)
    modes = ["legacy", "gpu_resident"] if args.compare else (["legacy"] if args.legacy else ["gpu_resident"])
    results: dict[str, Any] = {}
    scene_rows: dict[str, list[dict]] = {}
    args.legacy = False
    config = pipeline_config_from_args(args)
    with tempfile.TemporaryDirectory(prefix="ultramotion-audit-") as tmp:
        detector, sam, sam_type, source = _find_models(args, Path(tmp))
        for mode in modes:
            pipeline = build_pipeline(detector, sam, sam_type, config, legacy=mode == "legacy")
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
                "models": {"detector": detector, "sam": sam, "sam_type": sam_type, "source": source},
                "scenes": scene_rows,
                "runs": {mode: r.to_dict() for mode, r in results.items()},
            },
            indent=2,
        )
    else:
        parts = [
            "# GPU->CPU transfer audit (runtime)",
            "",
            f"Input: {input_name}; {args.frames} frames after {warmup} warm-up; models: {source}.",
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
