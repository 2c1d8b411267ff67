"""Run metrics: ``metrics.jsonl`` (one JSON object per line), charts, and optional W&B.

Every number the run produces goes through :class:`Tracker.log`, so the file, the
charts, the progress lines, the summary table and W&B all show the same values.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path
from statistics import mean

from zk0.config import ConfigError, RunConfig
from zk0.jsonl import append_jsonl, read_jsonl, write_jsonl


class Tracker:
    """Appends metric records to ``metrics.jsonl`` and mirrors them to W&B when enabled."""

    def __init__(self, run_dir: Path, cfg: RunConfig, resume_after: int | None = None) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.records: list[dict] = []
        if resume_after is not None:  # keep completed rounds; drop the partial round that crashed
            self.records = [r for r in read_metrics(self.path) if r["round"] <= resume_after]
            write_jsonl(self.path, self.records)
        self.wandb = _start_wandb(run_dir, cfg) if cfg.tracking.use_wandb else None

    def log(self, record: dict) -> None:
        """Record one event: ``round`` and ``source`` (server|client|client-eval) plus values."""
        record = {"time": round(time.time(), 3), **record}
        self.records.append(record)
        append_jsonl(self.path, record)
        if self.wandb is not None:
            prefix = "/".join(str(record[k]) for k in ("source", "dataset") if k in record)
            values = {f"{prefix}/{k}": v for k, v in record.items()
                      if isinstance(v, (int, float)) and k not in ("round", "time", "node", "partition")}
            self.wandb.log(values, step=record["round"])

    def round_summary(self, server_round: int) -> dict[str, float]:
        """Per-round view for progress lines and the final table (means over clients / datasets)."""
        return round_summary(self.records, server_round)

    def close(self) -> None:
        """Finish the W&B run, if any."""
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(run_dir: Path, cfg: RunConfig):
    try:
        import wandb
    except ImportError:
        raise ConfigError("use-wandb=true but wandb is not installed: pip install -e '.[wandb]'") from None
    if not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")
    return wandb.init(project=cfg.tracking.wandb_project, name=run_dir.name, dir=str(run_dir),
                      config=cfg.to_run_config())


def round_summary(records: list[dict], server_round: int) -> dict[str, float]:
    """One round of ``metrics.jsonl`` records as means over clients / datasets: losses, action MAE, sim success,
    bytes and seconds, rejected updates (what progress lines, tables, reports and ``zk0 push`` show)."""
    rows = [r for r in records if r["round"] == server_round]
    out: dict[str, float] = {}
    for source, key, name in (("client", "train-loss", "train-loss"),
                              ("client-eval", "eval-loss", "client-eval-loss"),
                              ("client-eval", "eval-action-mae", "client-eval-mae"),
                              ("server", "eval-loss", "server-eval-loss"),
                              ("server", "eval-action-mae", "server-eval-mae")):
        values = [r[key] for r in rows if r.get("source") == source and key in r]
        if values:
            out[name] = mean(values)
    successes = [r["success-rate"] for r in rows if r.get("event") == "sim-eval"]
    if successes:
        out["sim-success"] = mean(successes)
    for r in rows:
        if r.get("event") == "round":
            out.update({k: r[k] for k in ("bytes-down", "bytes-up", "seconds") if k in r})
        if r.get("event") == "privacy":
            out["epsilon"] = r["epsilon"]
    out["rejected"] = sum(1 for r in rows if r.get("event") == "rejected-update")
    return out


def read_metrics(path: Path) -> list[dict]:
    """All records of a ``metrics.jsonl`` (none when the run stopped before logging any)."""
    return read_jsonl(path)


def write_charts(run_dir: Path) -> list[Path]:
    """Train loss per client and evaluation metrics per round, as PNGs under ``charts/``.

    Each title names the run and its strategy (charts get copied around), rounds are whole
    numbers, and action MAE carries its unit: the SO-100/SO-101 joints are in degrees.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir / "metrics.jsonl")
    charts = run_dir / "charts"
    charts.mkdir(exist_ok=True)
    run = run_label(run_dir)
    written = []
    series = _series(records, "client", "train-loss")
    if series:
        written.append(_plot(plt, series, f"Training loss per client — {run}", "flow-matching loss",
                             charts / "train_loss.png"))
    series = _series([r for r in records if r.get("event") == "privacy"], "server", "epsilon")
    if series:
        delta = next(r["delta"] for r in records if r.get("event") == "privacy")
        written.append(_plot(plt, {"spent": series["global"]}, f"Privacy spent — {run}", f"ε at δ={delta:g}",
                             charts / "privacy_epsilon.png"))
    series = _series([r for r in records if r.get("event") == "sim-eval"], "server", "success-rate")
    if series:
        written.append(_plot(plt, series, f"Closed-loop success per simulator task — {run}", "success rate",
                             charts / "sim_success.png", ylim=(-0.02, 1.02)))  # a rate: 0 reads as 0, not noise
    for key, title, label in (("eval-loss", "Evaluation loss", "flow-matching loss (fixed noise)"),
                              ("eval-action-mae", "Action error", "action MAE (degrees)")):
        series = {f"unseen task: {k}": v for k, v in _series(records, "server", key).items()}
        series.update({f"held-out: {k}": v for k, v in _series(records, "client-eval", key).items()})
        if series:
            written.append(_plot(plt, series, f"{title} per round — {run}", label,
                                 charts / f"{key.replace('-', '_')}.png"))
    return written


def run_label(run_dir: Path) -> str:
    """``fedprox, run 20261129-214247`` (a baseline: its mode), from the run folder's config.json."""
    path = run_dir / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    kind = config.get("mode") or config.get("run-config", {}).get("strategy", "run")
    return f"{kind}, {run_dir.name}"


def _series(records: list[dict], source: str, key: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in records:
        if r.get("source") == source and key in r:
            out[str(r.get("dataset", "global"))].append((r["round"], r[key]))
    return dict(out)


def _plot(plt, series: dict[str, list[tuple[int, float]]], title: str, ylabel: str, path: Path,
          ylim: tuple[float, float] | None = None) -> Path:
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in sorted(series.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=name)
    ax.set(title=title, xlabel="round", ylabel=ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.title.set_fontsize(10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
