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
        "`UltramotionIGTLib/audit/static.py`)  ",
        f"**Hot-path entries:** {', '.join(f'`{e}`' for e in result.entries) or 'none'}"
        + (f"; globs {', '.join(f'`{p}`' for p in result.hot_patterns)}" if result.hot_patterns else "")
        + (
            f"; not entered: {', '.join(f'`{p}`' for p in result.not_hot_patterns)}"
            if result.not_hot_patterns
            else ""
        ),
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
        "Types are guessed from the code (names assigned from torch calls, `torch.Tensor` annotations, "
        "tensor attributes of classes); a sync on a value whose type the scan cannot tell is missed, and "
        "a method-name call can be counted on a non-tensor. Syncs inside third-party code (transformers, "
        "segment-anything, torchvision) are not scanned. Measure with `ultramotion-igt audit --runtime`.",
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
    """A runtime audit as Markdown: per-frame counts, totals, the by-origin table."""
    d = result.to_dict()
    lines = [
        f"## {title or 'Runtime transfer audit'}",
        "",
        f"- Device: `{d['device']}` ({d['device_name']}); mode: {d['mode']}",
        f"- Frames audited: {d['frames']}",
        f"- **Undeclared host syncs + device-to-host copies per frame (mean): {d['syncs_per_frame']:.2f}**",
        f"- Declared hops per frame (mean): {d['declared_per_frame']:.2f}",
        f"- Outside frames (set-up): {d['outside_frames']['undeclared']} undeclared, "
        f"{d['outside_frames']['declared']} declared",
    ]
    if d.get("cuda_sync_warnings_per_frame") is not None:
        lines.append(f"- CUDA sync-debug warnings per frame (mean): {d['cuda_sync_warnings_per_frame']:.2f}")
    if d.get("dtoh_memcpy_per_frame") is not None:
        lines.append(f"- Profiler `Memcpy DtoH` events per frame (mean): {d['dtoh_memcpy_per_frame']:.2f}")
    if d.get("notes"):
        lines += [f"- Note: {n}" for n in d["notes"]]
    lines += ["", "| Category | Undeclared | Declared |", "|---|---:|---:|"]
    for cat, counts in d["by_category"].items():
        lines.append(f"| `{cat}` | {counts['undeclared']} | {counts['declared']} |")
    lines += [
        "",
        "| Origin | Ours? | Category | Count | Declared as | Called from our code |",
        "|---|---|---|---:|---|---|",
    ]
    for row in d["by_origin"][:top]:
        lines.append(
            f"| `{row['origin']}` | {'ours' if row['ours'] else 'third-party'} | `{row['category']}` | "
            f"{row['count']} | {row['declared'] or '-'} | {('`' + row['our_frame'] + '`') if row['our_frame'] else '-'} |"
        )
    if len(d["by_origin"]) > top:
        lines.append(f"| ... {len(d['by_origin']) - top} more origins | | | | | |")
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
    row("**undeclared syncs + D2H per frame**", lambda d: f"**{d['syncs_per_frame']:.2f}**")
    row("declared hops per frame", lambda d: f"{d['declared_per_frame']:.2f}")
    cats = sorted({c for d in dicts.values() for c in d["by_category"]})

    def cat_cell(d: dict[str, Any], c: str) -> str:
        counts = d["by_category"].get(c, {})
        undeclared, declared = counts.get("undeclared", 0), counts.get("declared", 0)
        return f"{undeclared} (+{declared} declared)" if declared else str(undeclared)

    for cat in cats:
        row(f"`{cat}`, all frames", lambda d, c=cat: cat_cell(d, c))
    if any(d.get("dtoh_memcpy_per_frame") is not None for d in dicts.values()):
        row(
            "`Memcpy DtoH` per frame",
            lambda d: (
                f"{d['dtoh_memcpy_per_frame']:.2f}" if d.get("dtoh_memcpy_per_frame") is not None else "-"
            ),
        )
    if any(d.get("cuda_sync_warnings_per_frame") is not None for d in dicts.values()):
        row(
            "CUDA sync warnings per frame",
            lambda d: (
                f"{d['cuda_sync_warnings_per_frame']:.2f}"
                if d.get("cuda_sync_warnings_per_frame") is not None
                else "-"
            ),
        )
    lines.append("")
    return "\n".join(lines)
