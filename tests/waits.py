"""Waiting on a condition with a generous deadline, never a fixed sleep (machines are shared and loaded)."""

from __future__ import annotations

import os
import time

QUIET_DEADLINE = 600.0  # seconds a wait or a subprocess may take on a quiet machine: many times what it needs


def deadline(seconds: float = QUIET_DEADLINE) -> float:
    """``seconds`` scaled by how oversubscribed the cores are now (load average per core, at least 1): at 4x
    load a subprocess takes about 4x as long, and a fixed 600 s guess failed a resume that was merely slow."""
    return seconds * max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))


def wait_for(condition, what: str, timeout: float | None = None, poll: float = 0.1):
    """``condition()``'s first truthy result; fails naming ``what`` after ``timeout`` seconds (default: :func:`deadline`)."""
    timeout = deadline() if timeout is None else timeout
    deadline_at = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline_at, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(poll)
    return result
