"""Declared host transfers.

Code that hands data from the device to the host on purpose (the pipeline's single hop at the edge)
wraps it in ``allowed_host_transfer("ResultPacket.to_host")``. The runtime transfer audit reads the
active declaration (`current_allowed_transfer`) and lists such hops apart from unintended ones.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_state = threading.local()


def _stack() -> list[str]:
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    return stack


@contextmanager
def allowed_host_transfer(reason: str) -> Iterator[None]:
    """Declare that device-to-host hops inside this block are intended, naming why."""
    stack = _stack()
    stack.append(reason)
    try:
        yield
    finally:
        stack.pop()


def current_allowed_transfer() -> str | None:
    """The innermost active declaration on this thread, or None."""
    stack = _stack()
    return stack[-1] if stack else None
