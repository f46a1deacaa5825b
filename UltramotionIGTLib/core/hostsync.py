"""Declared host transfers, each with a budget.

Code that moves data between host and device on purpose (the pipeline's one upload of the frame,
its one download at the edge) wraps the move in::

    with allowed_host_transfer("ResultPacket.to_host", max_syncs=2):
        ...

``max_syncs`` is how many host syncs, device-to-host copies and blocking uploads one pass through
the block may make. The runtime transfer audit (`UltramotionIGTLib.tools.audit.runtime`) charges
each event inside the block to the innermost active declaration: events within the budget are
listed as declared, each one past it is a budget overrun (a finding, like an undeclared sync).
Without an active audit a declaration costs a list append and a pop.

Declarations are per thread (one stack per thread), as is the audit.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

_state = threading.local()


@dataclass
class HostTransfer:
    """One active pass through an `allowed_host_transfer` block.

    ``reason``: the declaration's name; ``max_syncs``: its budget per pass; ``used``: events the
    audit charged to this pass so far (0 when no audit runs).
    """

    reason: str
    max_syncs: int
    used: int = 0


def _stack() -> list[HostTransfer]:
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    return stack


@contextmanager
def allowed_host_transfer(reason: str, *, max_syncs: int = 0) -> Iterator[HostTransfer]:
    """Declare that the block moves data between host and device on purpose, and how often.

    ``reason``: a short name shown in audit reports (``"ResultPacket.to_host"``). ``max_syncs``:
    the most syncs/copies one pass may make (default 0: a declaration that states no budget
    allows nothing; a block that only touches host tensors needs none). Raises ``ValueError`` for
    a negative or non-integer budget. Yields the pass's `HostTransfer` record.
    """
    if isinstance(max_syncs, bool) or not isinstance(max_syncs, int) or max_syncs < 0:
        raise ValueError(
            f"allowed_host_transfer({reason!r}): max_syncs must be an int >= 0, got {max_syncs!r}"
        )
    record = HostTransfer(str(reason), max_syncs)
    stack = _stack()
    stack.append(record)
    try:
        yield record
    finally:
        stack.pop()


def current_declaration() -> HostTransfer | None:
    """The innermost active declaration on this thread, or None."""
    stack = _stack()
    return stack[-1] if stack else None


def current_allowed_transfer() -> str | None:
    """The innermost active declaration's reason on this thread, or None."""
    record = current_declaration()
    return record.reason if record is not None else None
