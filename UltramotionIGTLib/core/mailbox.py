"""`LatestFrameMailbox`: the one-slot hand-over between a producer and a worker thread. Standard library only.

Live streams must never build a queue: a producer that is faster than the consumer replaces the item
waiting in the slot (newest wins) and counts the replaced one as dropped. Used by the OpenIGTLink
gateway (`UltramotionIGTLib.services.gateway`) and the Slicer live session's worker
(`UltramotionIGTLib.slicer.sessions`), in both directions (frames to the worker, results back).
"""

from __future__ import annotations

import threading
from typing import Any


class LatestFrameMailbox:
    """A one-slot mailbox: ``put`` replaces what is there (and returns it), ``take`` waits for an item.

    Thread-safe; ``None`` is not an item (it means "nothing").
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None

    def put(self, item: Any) -> Any:
        """Store ``item``; returns the item it replaced (not yet taken), or None."""
        with self._cond:
            replaced, self._item = self._item, item
            self._cond.notify()
        return replaced

    def take(self, timeout: float | None = None) -> Any:
        """The item (emptying the slot), waiting up to ``timeout`` s; None when none came."""
        with self._cond:
            if self._item is None:
                self._cond.wait(timeout)
            item, self._item = self._item, None
        return item
