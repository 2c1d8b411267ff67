"""Waiting on a condition with a generous deadline, never a fixed sleep (machines are shared and loaded)."""

from __future__ import annotations

import time


def wait_for(condition, what: str, timeout: float = 600, poll: float = 0.1):
    """``condition()``'s first truthy result; fails naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(poll)
    return result
