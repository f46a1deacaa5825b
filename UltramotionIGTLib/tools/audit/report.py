"""Markdown and JSON rendering of the static and runtime transfer audits.

The static Markdown report keeps the shape users know from the in-house audit summary (totals, by
severity, by category, top files, the critical list with ``file:line`` and the code), with what it
got wrong fixed: ``.detach()`` is listed apart as not a transfer, implicit syncs have their own
categories, and nothing is claimed that was not counted.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from UltramotionIGTLib.tools.audit.static import CATEGORIES, SEVERITIES

if TYPE_CHECKING:
    from UltramotionIGTLib.tools.audit.runtime import RuntimeAuditResult
    from UltramotionIGTLib.tools.audit.static import Finding, StaticAuditResult

_SEVERITY_NOTES = {
    "critical": "in the per-frame hot path: each one costs every frame",
    "medium": "inference code outside the hot path",
    "minor": "training, test or benchmark code",
    "declared": "inside `allowed_host_transfer(...)`: intended hops",
    "info": "`.detach()`: not a transfer, listed apart",
}


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.0f}%" if whole else "-"


def _code(text: str) -> str:
    return "`" + text.replace("`", "'") + "`" if text else ""


def _finding_row(f: Finding) -> str:
    reason = f" ({f.declared_reason})" if f.declared else ""
    return f"| `{f.file}:{f.line}` | `{f.function}` | {CATEGORIES[f.category][1]}{reason} | {_code(f.code)} |"


def static_markdown(result: StaticAuditResult, *, top: int = 10, generated: str | None = None) -> str:
    """The static audit as a Markdown report (totals, severities, categories, files, critical list)."""
    generated = generated or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sev = result.by_severity()
    cat = result.by_category()
    kinds = result.by_kind()
    transfers = result.transfers
    total = len(transfers)
    declared = [f for f in result.findings if f.declared]
    lines = [
        "# GPU->CPU transfer audit (static)",
        "",
        f"**Generated:** {generated}  ",
        f"**Scanned:** {', '.join(f'`{p}`' for p in result.paths)} ({result.files_scanned} files)  ",
        "**Tool:** `ultramotion-igt audit` (Python AST; heuristics documented in "
        "`UltramotionIGTLib/tools/audit/static.py`)  ",
        f"**Hot-path entries:** {', '.join(f'`{e}`' for e in result.entries) or 'none'}"
        + (f"; globs {', '.join(f'`{p}`' for p in result.hot_patterns)}" if result.hot_patterns else "")
        + (
            f"; not entered: {', '.join(f'`{p}`' for p in result.not_hot_patterns)}"
            if result.not_hot_patterns
            else ""
        ),
        "",
    ]
    if result.unmatched_not_hot:
        lines += [
            f"> Not-hot names that match no function: {', '.join(f'`{e}`' for e in result.unmatched_not_hot)}"
            " -- update the list.",
            "",
        ]
    if result.unresolved_entries:
        lines += [
            f"> Entry not found in the scanned files: {', '.join(f'`{e}`' for e in result.unresolved_entries)}"
            " -- no function is marked hot from it.",
            "",
        ]
    lines += [
        "## Totals",
        "",
        f"- **Findings (hops + syncs + round trips):** {total}",
        f"  - explicit device-to-host hops: {kinds['hop']}",
        f"  - implicit host syncs: {kinds['sync']}",
        f"  - GPU->CPU->GPU round trips: {kinds['round_trip']}",
        f"- **Critical (hot path, undeclared):** {sev['critical']}",
        f"- **Declared** (`allowed_host_transfer`): {len(declared)}",
        f"- **`.detach()`** (not a transfer, listed apart): {cat['detach']}",
        f"- Hot-path functions: {len(result.hot_functions)}",
        "",
        "## By severity",
        "",
        "| Severity | Count | Share | Meaning |",
        "|---|---:|---:|---|",
    ]
    for s in SEVERITIES:
        if s == "info":
            continue
        lines.append(f"| {s} | {sev[s]} | {_pct(sev[s], total)} | {_SEVERITY_NOTES[s]} |")
    lines += [
        "",
        "## By category",
        "",
        "| Category | Kind | Count | Share | Why it matters |",
        "|---|---|---:|---:|---|",
    ]
    for key, (kind, label, note) in CATEGORIES.items():
        if key == "detach":
            continue
        lines.append(
            f"| `{label}` | {kind.replace('_', ' ')} | {cat[key]} | {_pct(cat[key], total)} | {note} |"
        )
    lines.append(f"| `.detach()` | not a transfer | {cat['detach']} | - | {CATEGORIES['detach'][2]} |")
    by_file = result.by_file()
    lines += ["", f"## By file (top {min(top, len(by_file))})", ""]
    if by_file:
        lines += ["| File | Findings | Critical | Declared |", "|---|---:|---:|---:|"]
        for file, count in list(by_file.items())[:top]:
            crit = sum(1 for f in transfers if f.file == file and f.severity == "critical")
            decl = sum(1 for f in transfers if f.file == file and f.declared)
            lines.append(f"| `{file}` | {count} | {crit} | {decl} |")
    else:
        lines.append("No findings.")
    critical = result.critical()
    lines += ["", f"## Critical findings ({len(critical)})", ""]
    if critical:
        lines += ["| Where | Function | Category | Code |", "|---|---|---|---|"]
        lines += [_finding_row(f) for f in critical]
    else:
        lines.append("None: no undeclared hop or sync was found in the hot path.")
    if declared:
        lines += ["", f"## Declared hops ({len(declared)})", "", "| Where | Function | Category | Code |"]
        lines += ["|---|---|---|---|"] + [_finding_row(f) for f in declared]
    if result.parse_errors:
        lines += ["", "## Files that could not be parsed", ""] + [f"- {e}" for e in result.parse_errors]
    lines += [
        "",
        "## What a static scan cannot see",
        "",
        "This is a fast lint, not the measure: types are guessed from the code (torch calls, `torch.Tensor` "
        'annotations of parameters and returns, a "Returns ... tensors" docstring, tensor attributes of '
        "classes, also made with `setattr`); a sync on a value whose type the scan cannot tell is missed "
        "(a tensor in a container, returned by an unannotated function, passed through a callback), and a "
        "method-name call can be counted on a non-tensor. Ops that sync inside their kernels (`bincount`, "
        "`histc`, `nms`, linalg checks), uploads, syncs inside third-party code (transformers, "
        "segment-anything, torchvision) and which branch runs are not seen. "
        "Measure with `ultramotion-igt audit --runtime`.",
        "",
    ]
    return "\n".join(lines)


def static_json(result: StaticAuditResult, *, generated: str | None = None, indent: int | None = 2) -> str:
    """The static audit as JSON: the same totals and tables, and one object per finding."""
    data = {"tool": "ultramotion-igt audit", "kind": "static"}
    data["generated"] = generated or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    data.update(result.to_dict())
    return json.dumps(data, indent=indent)


# ---------------------------------------------------------------------------------------------------
# runtime


def runtime_markdown(result: RuntimeAuditResult, *, title: str | None = None, top: int = 15) -> str:
    """A runtime audit as Markdown: per-frame means, categories, budgets, the by-origin table."""
    from UltramotionIGTLib.tools.audit.runtime import CATEGORIES as RUNTIME_CATEGORIES

    d = result.to_dict()
    totals = d["totals"]
    lines = [
        f"## {title or 'Runtime transfer audit'}",
        "",
        f"- Device: `{d['device']}` ({d['device_name']}); mode: {d['mode']}",
        f"- Frames audited: {d['frames']}",
        "- **Undeclared syncs + device-to-host copies + blocking uploads per frame (mean): "
        f"{d['syncs_per_frame']:.2f}** (most in one frame: {d['max_syncs_in_a_frame']}; "
        f"budget overruns per frame: {d['overruns_per_frame']:.2f})",
        f"- Declared, within budget, per frame (mean): {d['declared_per_frame']:.2f}",
        f"- Blocking uploads per frame, declared or not (mean): {d['uploads_per_frame']:.2f}",
        f"- Set-up (warm-up, before the first frame): {totals['setup_undeclared']} undeclared, "
        f"{totals['setup_declared']} declared; between frames, undeclared or over budget: "
        f"{totals['between_frames_failing']}",
    ]
    for key, label in (
        ("cuda_sync_warnings_per_frame", "CUDA sync-debug warnings per frame, undeclared (mean)"),
        ("dtoh_memcpy_per_frame", "Profiler `Memcpy DtoH` events per frame (mean)"),
        ("htod_memcpy_per_frame", "Profiler `Memcpy HtoD` events per frame (mean)"),
        ("cuda_runtime_syncs_per_frame", "Synchronising CUDA runtime calls per frame (mean)"),
    ):
        if d.get(key) is not None:
            lines.append(f"- {label}: {d[key]:.2f}")
    lines += [f"- Note: {n}" for n in d.get("notes", [])]
    lines += ["", "| Category | Kind | Undeclared | Declared | Over budget |", "|---|---|---:|---:|---:|"]
    for cat, counts in d["by_category"].items():
        lines.append(
            f"| `{cat}` | {RUNTIME_CATEGORIES[cat][0]} | {counts['undeclared']} | {counts['declared']} | "
            f"{counts['over_budget']} |"
        )
    if d["budgets"]:
        lines += ["", "| Declaration | `max_syncs` per pass | Most used in one pass |", "|---|---:|---:|"]
        for reason, b in sorted(d["budgets"].items()):
            lines.append(f"| {reason} | {b['max_syncs']} | {b['max_used']} |")
    lines += [
        "",
        "| Origin | Ours? | Category | Op | Count | Frames | Declared as | Called from our code |",
        "|---|---|---|---|---:|---:|---|---|",
    ]
    for row in d["by_origin"][:top]:
        declared = row["declared"] or "-"
        if row["over_budget"]:
            declared += " (**over budget**)"
        lines.append(
            f"| `{row['origin']}` | {'ours' if row['ours'] else 'third-party'} | `{row['category']}` | "
            f"`{row['op']}` | {row['count']} | {row['frames']} | {declared} | "
            f"{('`' + row['our_frame'] + '`') if row['our_frame'] else '-'} |"
        )
    if len(d["by_origin"]) > top:
        lines.append(f"| ... {len(d['by_origin']) - top} more origins | | | | | | | |")
    lines.append("")
    return "\n".join(lines)


def runtime_compare_markdown(results: Mapping[str, RuntimeAuditResult]) -> str:
    """Side-by-side table of several runtime audits (e.g. legacy vs GPU-resident)."""
    names = list(results)
    dicts = {n: results[n].to_dict() for n in names}
    lines = [
        "## Runtime transfer audit, side by side",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]

    def row(label: str, fn: Any) -> None:
        lines.append(f"| {label} | " + " | ".join(fn(dicts[n]) for n in names) + " |")

    row("device", lambda d: f"`{d['device']}`")
    row("frames", lambda d: str(d["frames"]))
    row("**undeclared syncs + copies + uploads per frame**", lambda d: f"**{d['syncs_per_frame']:.2f}**")
    row("most in one frame", lambda d: str(d["max_syncs_in_a_frame"]))
    row("budget overruns per frame", lambda d: f"{d['overruns_per_frame']:.2f}")
    row("declared per frame (within budget)", lambda d: f"{d['declared_per_frame']:.2f}")
    row("blocking uploads per frame (all)", lambda d: f"{d['uploads_per_frame']:.2f}")
    cats = sorted({c for d in dicts.values() for c in d["by_category"]})

    def cat_cell(d: dict[str, Any], c: str) -> str:
        counts = d["by_category"].get(c, {})
        undeclared, declared = counts.get("undeclared", 0), counts.get("declared", 0)
        over = counts.get("over_budget", 0)
        text = str(undeclared)
        if declared:
            text += f" (+{declared} declared)"
        if over:
            text += f" (+{over} over budget)"
        return text

    for cat in cats:
        row(f"`{cat}`, all frames", lambda d, c=cat: cat_cell(d, c))
    for key, label in (
        ("cuda_sync_warnings_per_frame", "CUDA sync warnings per frame"),
        ("dtoh_memcpy_per_frame", "`Memcpy DtoH` per frame"),
        ("htod_memcpy_per_frame", "`Memcpy HtoD` per frame"),
        ("cuda_runtime_syncs_per_frame", "sync runtime calls per frame"),
    ):
        if any(d.get(key) is not None for d in dicts.values()):
            row(label, lambda d, k=key: f"{d[k]:.2f}" if d.get(k) is not None else "-")
    lines.append("")
    return "\n".join(lines)


def gate_lines(result: RuntimeAuditResult) -> list[str]:
    """One line per failing origin (undeclared or over budget, after set-up), ``file:line`` first."""
    rows = result.by_origin(phases=("frame", "between"))
    out = []
    for row in rows:
        if row["declared"] is not None and not row["over_budget"]:
            continue
        party = "ours" if row["ours"] else f"third-party, called from {row['our_frame'] or '?'}"
        why = (
            f"over the budget of {row['declared']!r} (max_syncs={result.budgets.get(row['declared'], {}).get('max_syncs')})"
            if row["over_budget"]
            else "undeclared"
        )
        where = (
            f"in {row['frames']} frame(s), first {row['first_frame']}" if row["frames"] else "between frames"
        )
        out.append(
            f"{row['origin']}: {row['category']} ({row['op']}) x{row['count']} {where}; {why} ({party})"
        )
    return out
