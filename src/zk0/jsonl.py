"""JSON Lines files (one JSON object per line): how a run's ``metrics.jsonl`` and ``audit.jsonl`` are kept.

Records are appended one line at a time, so a run that crashes mid-round leaves every
completed line readable.
"""

from __future__ import annotations

import json
from pathlib import Path


def append_jsonl(path: Path, record: dict) -> None:
    """Add ``record`` as the last line of ``path`` (created when missing)."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Replace ``path`` with ``records``, one per line."""
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def read_jsonl(path: Path) -> list[dict]:
    """All records of ``path`` in order; none when it does not exist (nothing was logged yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
