"""GPU->CPU transfer audit: measured, not claimed.

- `scan_paths` (static, on the Python AST): explicit hops, implicit host syncs, round trips, with a
  severity from the per-frame call graph; ``.detach()`` listed apart as not a transfer.
- `RuntimeTransferAudit` (runtime): counts host syncs and device-to-host copies per frame with their
  origin, declared hops (`UltramotionIGTLib.core.hostsync.allowed_host_transfer`) apart.
- ``ultramotion-igt audit`` (`UltramotionIGTLib.tools.audit.cli`): both, as Markdown or JSON.

The runtime part imports torch; it is loaded on first use so that the static scan works without it.
"""

from __future__ import annotations

from typing import Any

from UltramotionIGTLib.tools.audit.static import CATEGORIES, Finding, StaticAuditResult, scan_paths

__all__ = [
    "CATEGORIES",
    "Finding",
    "StaticAuditResult",
    "scan_paths",
    "RuntimeTransferAudit",
    "RuntimeAuditResult",
    "HopEvent",
    "FrameRecord",
]


def __getattr__(name: str) -> Any:
    if name in ("RuntimeTransferAudit", "RuntimeAuditResult", "HopEvent", "FrameRecord"):
        from UltramotionIGTLib.tools.audit import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
