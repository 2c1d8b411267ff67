"""``embedded:<task>`` datasets: expert demonstrations recorded in the simulator on first use, then cached.

:mod:`zk0.data` imports this module only when an ``embedded:`` URI is opened, so nodes that
train on hub or local datasets never load MuJoCo.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from zk0 import tiny
from zk0.data import DatasetError, register_source
from zk0.sim.record import record
from zk0.sim.scene import TASKS

if TYPE_CHECKING:
    from zk0.registry import DatasetEntry

EMBEDDED_EPISODES, EMBEDDED_VERSION = 10, 1  # expert demonstrations per embedded task


def embedded_root(task: str) -> Path:
    """Where the embedded dataset of simulator task ``task`` is cached."""
    return tiny.cache_root() / "datasets" / f"sim-{task}-{tiny.IMAGE_SIZE}px-v{EMBEDDED_VERSION}"


def embedded_seed(task: str) -> int:
    """Recording seed of an embedded dataset: distinct per task, far from the evaluation seeds (0, 1, …)."""
    return 100_000 * (1 + sorted(TASKS).index(task))


@register_source("embedded")
def locate_embedded(entry: DatasetEntry) -> tuple[str, Path]:
    """Repo id and root of an embedded dataset, recording it first when the cache lacks it."""
    if entry.target not in TASKS:
        raise DatasetError(f"dataset {entry.uri!r}: unknown simulator task; known: {', '.join(TASKS)}")
    root = embedded_root(entry.target)
    if not (root / "meta" / "info.json").exists():
        record(entry.target, root, EMBEDDED_EPISODES, seed=embedded_seed(entry.target), image_size=tiny.IMAGE_SIZE)
    return f"zk0/{entry.target}", root
