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

EMBEDDED_EPISODES, EMBEDDED_VERSION = 10, 3  # demonstrations per embedded task (the demo's); v3: perturbed approach
SHARD_STRIDE = 10_000  # recording seeds between two shards of one task


def embedded_root(task: str, episodes: int = EMBEDDED_EPISODES, shard: int = 0) -> Path:
    """Where the embedded dataset of simulator task ``task`` (``episodes`` demonstrations of shard ``shard``) is cached."""
    sizes = (f"-{episodes}ep" if episodes != EMBEDDED_EPISODES else "") + (f"-shard{shard}" if shard else "")
    return tiny.cache_root() / "datasets" / f"sim-{task}-{tiny.IMAGE_SIZE}px-v{EMBEDDED_VERSION}{sizes}"


def embedded_seed(task: str, shard: int = 0) -> int:
    """Recording seed of an embedded dataset: distinct per task and shard, far from the evaluation seeds (0, 1, …).

    Attempt ``k`` of a recording is simulated from ``seed + k`` (at most twice the episodes: 4,000), so
    shards 10,000 apart and tasks 100,000 apart never share an episode.
    """
    return 100_000 * (1 + sorted(TASKS).index(task)) + SHARD_STRIDE * shard


@register_source("embedded")
def locate_embedded(entry: DatasetEntry) -> tuple[str, Path]:
    """Repo id and root of an embedded dataset, recording it first when the cache lacks it."""
    if entry.target not in TASKS:
        raise DatasetError(f"dataset {entry.uri!r}: unknown simulator task; known: {', '.join(TASKS)}")
    episodes = entry.episodes or EMBEDDED_EPISODES
    root = embedded_root(entry.target, episodes, entry.shard)
    if not (root / "meta" / "info.json").exists():
        record(entry.target, root, episodes, seed=embedded_seed(entry.target, entry.shard),
               image_size=tiny.IMAGE_SIZE)
    return f"zk0/{entry.target}", root
