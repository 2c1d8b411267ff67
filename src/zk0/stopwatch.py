"""Seconds per part of a piece of work, so a round's wall time can be split into what it was spent on.

Clients time their training, evaluation and (de)serialization; the server times each part of
a round (sealing, send and wait, verify and aggregate, evaluation, checkpoint). Each part is
measured with ``time.perf_counter`` around that part only, and reported as ``<part>-seconds``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager


class Stopwatch:
    """Accumulated seconds per named part."""

    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Add the time the ``with`` block takes to ``name``."""
        start = time.perf_counter()
        yield
        self.seconds[name] += time.perf_counter() - start

    def record(self) -> dict[str, float]:
        """``{"<part>-seconds": seconds}``, as metric records carry them."""
        return {f"{name}-seconds": round(seconds, 4) for name, seconds in self.seconds.items()}
