"""Human-readable progress lines and the end-of-run summary table."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

COLUMNS = [("round", "round"), ("train-loss", "client train loss"), ("client-eval-loss", "held-out loss"),
           ("client-eval-mae", "held-out MAE"), ("server-eval-loss", "unseen loss"),
           ("server-eval-mae", "unseen MAE"), ("sim-success", "sim success"), ("bytes-down", "sent"),
           ("bytes-up", "received"), ("rejected", "rejected"), ("epsilon", "ε")]
OPTIONAL = {"epsilon"}  # columns a run without them leaves out (ε: dp runs)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _cell(key: str, value: float | None) -> str:
    if value is None:
        return "–"
    if key in ("bytes-down", "bytes-up"):
        return human_bytes(value)
    if key in ("round", "rejected"):
        return str(int(value))
    return f"{value:.4f}"


def progress_line(server_round: int, num_rounds: int, summary: dict[str, float]) -> str:
    """One line per finished round, e.g. ``round 2/3 | client train loss 0.81 | ...``."""
    parts = [f"round {server_round}/{num_rounds}"]
    parts += [f"{label} {_cell(key, summary[key])}" for key, label in COLUMNS[1:] if key in summary]
    if "seconds" in summary:
        parts.append(f"{summary['seconds']:.1f}s")
    return "zk0 " + " | ".join(parts)


def summary_table(rows: list[dict[str, float]]) -> list[str]:
    """The per-round summary as text lines (rendered with rich, logged line by line)."""
    table = Table(title="zk0 run summary (means over clients / datasets)")
    columns = [(key, label) for key, label in COLUMNS if key not in OPTIONAL or any(key in row for row in rows)]
    for _, label in columns:
        table.add_column(label, justify="right")
    for row in rows:
        table.add_row(*[_cell(key, row.get(key)) for key, _ in columns])
    return table_lines(table, width=160)


def table_lines(table: Table, width: int) -> list[str]:
    """A rich table as plain text lines (no colour codes): they go to logs and terminals alike."""
    buffer = io.StringIO()
    Console(width=width, file=buffer, color_system=None).print(table)
    return buffer.getvalue().rstrip().splitlines()
