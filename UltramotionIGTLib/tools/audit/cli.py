"""``ultramotion-igt audit``: static (AST) and runtime GPU->CPU transfer audit.

Static::

    ultramotion-igt audit [PATHS] [--format md|json] [--hot-path PATTERN...] [--entry FILE:FUNC]
                          [--not-hot PATTERN...] [--fail-on critical|medium|minor] [--output FILE]

Runtime (runs the real pipeline on the synthetic phantom or a recording; models from --pack,
--detector/--sam or --random-models, else the shipped demo pack)::

    ultramotion-igt audit --runtime [--frames N] [--warmup N] [--legacy | --compare] [--input FILE]
                          [--pack P | --detector DIR --sam CKPT | --random-models] [--device D]
                          [--fail-on undeclared]

Exit status: 0; 1 when ``--fail-on`` finds something (the findings are listed on stderr); 2 for a
usage or input error.
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
        help="exit 1 when a static finding of this severity or worse exists (critical: the CI gate), "
        "or, with --runtime, when the GPU-resident run has undeclared hops (undeclared)",
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
        help=f"per-frame entry point(s) of the call graph (default {' '.join(DEFAULT_ENTRIES)})",
    )
    st.add_argument(
        "--not-hot",
        nargs="+",
        action="extend",
        default=None,
        metavar="PATTERN",
        help=f"globs the hot path does not enter (default {' '.join(DEFAULT_NOT_HOT)})",
    )
    st.add_argument(
        "--root", metavar="DIR", help="report file names relative to DIR (default: the current folder)"
    )
    st.add_argument(
        "--top", type=int, default=10, metavar="N", help="files in the top-files table (default 10)"
    )
    rt = parser.add_argument_group("runtime audit")
    rt.add_argument(
        "--runtime", action="store_true", help="run the pipeline and count hops and syncs per frame"
    )
    rt.add_argument(
        "--frames", type=positive_int, default=10, metavar="N", help="frames counted (default 10)"
    )
    rt.add_argument(
        "--warmup",
        type=non_negative_int,
        default=1,
        metavar="N",
        help="frames run before counting starts (default 1)",
    )
    rt.add_argument(
        "--input", metavar="FILE", help="recording or image file (default: the synthetic phantom stream)"
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


def _load_frames(args: argparse.Namespace) -> list[Any]:
    n = args.frames + max(args.warmup, 0)
    if n <= 0 or args.frames <= 0:
        raise InputFileError(f"--frames must be >= 1, got {args.frames}")
    if args.input:
        from UltramotionIGTLib.io import read_sequence

        frames = read_sequence(args.input).frames
        if len(frames) == 0:
            raise InputFileError(f"{args.input} holds no frames")
        return [frames[i % len(frames)] for i in range(n)]
    from UltramotionIGTLib.tools.phantom import PhantomStream

    stream = PhantomStream(seed=args.seed, n_frames=n)
    return [stream.frame(i).image for i in range(n)]


def run_runtime_audit(pipeline: Any, frames: Sequence[Any], warmup: int = 1) -> Any:
    """Audit ``pipeline.process_frame`` + ``to_host()`` on ``frames`` (the first ``warmup`` uncounted).

    Returns a `RuntimeAuditResult`; warm-up frames run inside the audit but outside any frame, so
    their hops are listed as set-up.
    """
    from UltramotionIGTLib.tools.audit.runtime import RuntimeTransferAudit

    with RuntimeTransferAudit(pipeline.device) as audit:
        for i, frame in enumerate(frames):
            if i < warmup:
                pipeline.process_frame(frame, i).to_host()
                continue
            with audit.frame(i - warmup):
                pipeline.process_frame(frame, i).to_host()
    return audit.result


def _runtime_main(args: argparse.Namespace) -> int:
    from UltramotionIGTLib.tools.audit.report import runtime_compare_markdown
    from UltramotionIGTLib.tools.benchmarks.legacy import build_pipeline
    from UltramotionIGTLib.tools.options import pipeline_config_from_args, resolve_model_source

    source = resolve_model_source(args)
    frames = _load_frames(args)
    modes = ["legacy", "gpu_resident"] if args.compare else (["legacy"] if args.legacy else ["gpu_resident"])
    results: dict[str, Any] = {}
    config = pipeline_config_from_args(args)
    detector, segmenter = source.load(config.device)
    for mode in modes:
        pipeline = build_pipeline(detector, segmenter, config, legacy=mode == "legacy")
        results[mode] = run_runtime_audit(pipeline, frames, warmup=max(args.warmup, 0))
    input_name = args.input or f"synthetic phantom (seed {args.seed})"
    if args.format == "json":
        text = json.dumps(
            {
                "tool": "ultramotion-igt audit",
                "kind": "runtime",
                "input": input_name,
                "models": {
                    "detector": str(source.detector),
                    "sam": str(source.sam),
                    "sam_type": source.sam_type,
                    "source": source.describe(),
                },
                "runs": {mode: r.to_dict() for mode, r in results.items()},
            },
            indent=2,
        )
    else:
        parts = [
            "# GPU->CPU transfer audit (runtime)",
            "",
            f"Input: {input_name}; {args.frames} frames after {max(args.warmup, 0)} warm-up; "
            f"models: {source.describe()}.",
            "",
        ]
        if len(results) > 1:
            parts.append(runtime_compare_markdown(results))
        for mode, r in results.items():
            parts.append(r.to_markdown(title=f"{mode} path (gpu_resident={mode != 'legacy'})"))
        text = "\n".join(parts)
    _emit(text, args.output)
    if args.fail_on == "undeclared":
        checked = results.get("gpu_resident")
        if checked is not None and checked.totals["undeclared"]:
            print(
                f"audit: {checked.totals['undeclared']} undeclared hop(s) in the GPU-resident path:",
                file=sys.stderr,
            )
            for row in checked.by_origin():
                if row["declared"] is None:
                    party = "ours" if row["ours"] else f"third-party, called from {row['our_frame']}"
                    print(f"  {row['origin']}: {row['category']} x{row['count']} ({party})", file=sys.stderr)
            return EXIT_FINDINGS
    return 0
