"""Compare runs: federated (FedProx, FedAvg) and baselines (centralized, local) side by side.

Every run folder written by the ServerApp or :mod:`zk0.tools.baseline` has the same
``config.json`` and ``metrics.jsonl`` record shapes, so one reader serves all. Each run is
labelled by its baseline ``mode`` or, for a federated run, its ``strategy``. The table shows
round 0 (the untrained policy, which every run evaluates with the same seeds) and the final
round; the chart shows every evaluated round. Each compared run folder keeps the table
(``compare.json``), so its model cards and ``zk0 report`` show the comparison.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from rich.table import Table

from zk0.registry import DatasetEntry
from zk0.report import table_lines
from zk0.tracking import read_metrics

COLUMNS = [("held-out-loss", "held-out loss"), ("held-out-mae", "held-out MAE"), ("unseen-loss", "unseen loss"),
           ("unseen-mae", "unseen MAE"), ("sim-clients", "sim success (client tasks)"),
           ("sim-unseen", "sim success (unseen tasks)")]
SIM = ("sim-clients", "sim-unseen")


class CompareError(ValueError):
    """A folder that cannot be compared; the message names it and why."""


@dataclass(frozen=True)
class Run:
    """One run's label, folder and metric records."""

    label: str
    folder: Path
    records: list[dict]
    client_tasks: frozenset[str]

    @property
    def last_round(self) -> int:
        """The last round the run completed (a run killed mid-round has records of a partial one)."""
        return max((r["round"] for r in self.records if r.get("event") == "round"), default=0)

    def series(self) -> dict[str, dict[int, float]]:
        """Per-round means of each compared metric, for the rounds where the run logged it."""
        groups: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for record in self.records:
            for metric, value in _metrics_of(record, self.client_tasks):
                groups[metric][record["round"]].append(value)
        return {m: {r: mean(v) for r, v in by_round.items()} for m, by_round in groups.items()}

    def optimizer_steps(self, upto: int) -> int | None:
        """Optimizer steps of all training up to round ``upto`` (None when the run logged none)."""
        steps = [(r["round"], r["steps"]) for r in self.records if r.get("source") == "client" and "steps" in r]
        return sum(s for r, s in steps if r <= upto) if steps else None


def _metrics_of(record: dict, client_tasks: frozenset[str]) -> list[tuple[str, float]]:
    """The compared metrics one record contributes: train loss, held-out, unseen or simulator success."""
    source, event = record.get("source"), record.get("event")
    if source == "client" and "train-loss" in record:
        return [("train-loss", record["train-loss"])]
    if source == "client-eval":
        return [(m, record[k]) for m, k in (("held-out-loss", "eval-loss"), ("held-out-mae", "eval-action-mae"))
                if k in record]
    if source == "server" and event == "sim-eval":
        return [("sim-clients" if record["dataset"] in client_tasks else "sim-unseen", record["success-rate"])]
    if source == "server" and event is None:
        return [(m, record[k]) for m, k in (("unseen-loss", "eval-loss"), ("unseen-mae", "eval-action-mae"))
                if k in record]
    return []


def load_run(folder: Path) -> Run:
    """Read a run folder, or raise :class:`CompareError` saying why it is not a zk0 run."""
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file() or not (folder / "metrics.jsonl").is_file():
        raise CompareError(f"{folder} is not a zk0 run folder: it needs config.json and metrics.jsonl")
    try:
        doc = json.loads((folder / "config.json").read_text())
        label = doc.get("mode") or doc["run-config"]["strategy"]
        clients = frozenset(DatasetEntry(e["uri"]).target for e in doc.get("datasets", {}).get("clients", []))
        records = read_metrics(folder / "metrics.jsonl")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise CompareError(f"{folder} is not a zk0 run folder: unreadable config.json or metrics.jsonl "
                           f"({type(err).__name__}: {err})") from None
    if not records:
        raise CompareError(f"{folder} has no metrics yet: the run stopped before round 0 was evaluated")
    return Run(label, folder, records, clients)


def compare(run_dirs: list[Path], chart: Path) -> list[str]:
    """Round 0 and final-round metrics of every run as table lines; one PNG chart written to ``chart``.

    The table also goes, as ``compare.json``, into every compared run folder, and each of their
    checkpoints' model cards is written again with it (:func:`zk0.model_card.refresh_cards`).
    """
    if not run_dirs:
        raise CompareError("give at least one run folder to compare")
    runs = [load_run(d) for d in run_dirs]
    write_chart(runs, chart)
    data = comparison(runs)
    record_in_runs(runs, data)
    return table(data)


def comparison(runs: list[Run]) -> dict:
    """The compared columns (simulator success only where a run measured it) and, per run, round 0 and its
    final round: what the table shows and ``compare.json`` holds."""
    series = [run.series() for run in runs]
    columns = [(k, label) for k, label in COLUMNS if k not in SIM or any(k in s for s in series)]
    return {"compared": time.strftime("%Y-%m-%d %H:%M"), "columns": columns,
            "runs": [{"folder": run.folder.name, "mode": run.label,
                      "rows": [{"round": r, **{k: values.get(k, {}).get(r) for k, _ in columns},
                                "optimizer-steps": run.optimizer_steps(r)} for r in sorted({0, run.last_round})]}
                     for run, values in zip(runs, series)]}


def record_in_runs(runs: list[Run], data: dict) -> None:
    """``compare.json`` in every compared run folder, and their checkpoints' cards written again to show it."""
    from zk0.model_card import COMPARISON, refresh_cards

    for run in runs:
        (run.folder / COMPARISON).write_text(json.dumps(data, indent=2) + "\n")
        refresh_cards(run.folder)


def table(data: dict) -> list[str]:
    """Two rows per run (round 0 and its final round), rendered with rich as in the run summary."""
    out = Table(title="zk0 comparison (means over client held-out sets / unseen sets / simulator tasks)")
    for header in ("run", "mode", "round", *(label for _, label in data["columns"]), "optimizer steps"):
        out.add_column(header, justify="left" if header in ("run", "mode") else "right")
    for run in data["runs"]:
        for row in run["rows"]:
            steps = row["optimizer-steps"]
            out.add_row(run["folder"], run["mode"], str(row["round"]), *(_cell(row[k]) for k, _ in data["columns"]),
                        "–" if steps is None else str(steps))
        out.add_section()
    return table_lines(out, width=200)


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


PANELS = [(("held-out-mae",), "held-out action MAE"), (("unseen-mae",), "unseen action MAE"),
          (SIM, "sim success rate (solid: client tasks, dashed: unseen)"), (("train-loss",), "train loss")]


def write_chart(runs: list[Run], path: Path) -> Path:
    """2×2 panels over rounds (held-out MAE, unseen MAE, sim success, train loss), one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    series = [run.series() for run in runs]
    for ax, (metrics, title) in zip(axes.flat, PANELS):
        for i, (values, label) in enumerate(zip(series, _legend_labels(runs))):
            drawn = [(sorted(values[m].items()), style) for m, style in zip(metrics, ("-", "--")) if m in values]
            for j, (points, style) in enumerate(drawn):
                ax.plot(*zip(*points), style, marker="o", color=plt.cm.tab10(i % 10), label=None if j else label)
        _finish(ax, title)
    fig.tight_layout()
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _finish(ax, title: str) -> None:
    """Title, integer rounds, grid and legend; a note instead when no run logged the metric."""
    from matplotlib.ticker import MaxNLocator

    ax.set(title=title, xlabel="round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "not evaluated", ha="center", va="center", transform=ax.transAxes)


def _legend_labels(runs: list[Run]) -> list[str]:
    """Each run's label, with its folder name where two runs share a label."""
    counts = defaultdict(int)
    for run in runs:
        counts[run.label] += 1
    return [run.label if counts[run.label] == 1 else f"{run.label} ({run.folder.name})" for run in runs]
