"""GPU->CPU transfer audit: measured, not claimed.

- `RuntimeTransferAudit` (runtime, the measure): every host sync, device-to-host copy and blocking
  upload per frame, seen at torch's dispatcher (and at the Python level for what never reaches it),
  with its origin; declared hops (`UltramotionIGTLib.core.hostsync.allowed_host_transfer`) apart,
  each within its ``max_syncs`` budget or an overrun. Per thread; nothing in torch is patched.
- `scan_paths` (static, on the Python AST, a fast lint): explicit hops, implicit host syncs, round
  trips, with a severity from the per-frame call graph; ``.detach()`` listed apart as not a transfer.
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
    "FrameCounts",
]


def __getattr__(name: str) -> Any:
    if name in ("RuntimeTransferAudit", "RuntimeAuditResult", "HopEvent", "FrameCounts"):
        from UltramotionIGTLib.tools.audit import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
