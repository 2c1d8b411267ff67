"""``zk0 report RUN_DIR``: one self-contained HTML page of a run, for people who would rather not read JSONL.

It shows what really happened, from the run folder's own records: simulation or deployment, who
trained in which round and what each client said about its dataset (robot, fps, tasks, episodes),
the held-out and unseen metrics per dataset and round (round 0 against the last), the charts
(embedded), closed-loop success with links to the rollout videos, the ``zk0 compare`` table when one
included this run, every rejected or missing reply from the audit, and the run config. Nothing is
fetched: the page opens offline.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

from zk0.audit import read_audit
from zk0.model_card import client_facts, federation, read_comparison
from zk0.tracking import read_metrics, round_summary

STYLE = """body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:72rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1.5rem}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}img{max-width:48%;margin:.5%}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem}.muted{color:#777}"""
RUNTIMES = {"simulation": ", in simulation", "deployment": ", in a deployment"}  # as the header says it
METRICS = (("client-eval-loss", "held-out loss"), ("client-eval-mae", "held-out MAE (deg)"),
           ("server-eval-loss", "unseen loss"), ("server-eval-mae", "unseen MAE (deg)"), ("sim-success", "sim success"))


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the page (default ``RUN_DIR/report.html``) and return its path."""
    config = json.loads((run_dir / "config.json").read_text())
    records = read_metrics(run_dir / "metrics.jsonl")
    audit = read_audit(run_dir) if (run_dir / "audit.jsonl").exists() else []
    sections = [_header(run_dir, config, records), _summary(records), _participants(records), _datasets(records),
                _charts(run_dir), _per_dataset(records), _sim(run_dir, records), _comparison(run_dir), _replies(audit),
                _config(config)]
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>zk0 run {html.escape(run_dir.name)}"
            f"</title><style>{STYLE}</style></head><body>{''.join(sections)}</body></html>\n")
    out = out or run_dir / "report.html"
    out.write_text(page)
    return out


def _table(head: list[str], rows: list[list[object]]) -> str:
    cells = "".join(f"<tr>{''.join(_cell(v) for v in row)}</tr>" for row in rows)
    return f"<table><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in head)}</tr>{cells}</table>"


def _cell(value: object) -> str:
    """A table cell: numbers right-aligned (floats to 4 significant digits), a dash for nothing measured."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"<td class=n>{value:.4g}</td>" if isinstance(value, float) else f"<td class=n>{value}</td>"
    return f"<td>{html.escape('—' if value is None else str(value))}</td>"


def _rounds(records: list[dict]) -> list[int]:
    return sorted({r["round"] for r in records if r.get("event") == "round"})


def _header(run_dir: Path, config: dict, records: list[dict]) -> str:
    run_config = config.get("run-config", {})
    rounds = _rounds(records)
    kind = config.get("mode", run_config.get("strategy", "?"))
    done = f"{rounds[-1]} of {run_config.get('num-server-rounds', '?')} rounds" if rounds else "no round completed"
    where = RUNTIMES.get(federation(records).get("runtime"), "")
    return (f"<h1>zk0 run {html.escape(run_dir.name)}</h1><p>{html.escape(str(kind))}{where}, model "
            f"{html.escape(str(run_config.get('model-name', '?')))}, {done}. <span class=muted>Report written "
            f"{time.strftime('%Y-%m-%d %H:%M')} from the run folder's records; the raw data never left its owners."
            f"</span></p>")


def _summary(records: list[dict]) -> str:
    rounds = _rounds(records)
    if not rounds:
        return "<h2>Summary</h2><p>No round completed.</p>"
    first, last = (round_summary(records, r) for r in (rounds[0], rounds[-1]))
    rows = [[label, first.get(key), last.get(key)] for key, label in METRICS]
    return f"<h2>Summary: round {rounds[0]} against round {rounds[-1]}</h2>" + _table(
        ["metric", f"round {rounds[0]}", f"round {rounds[-1]}"], rows)


def _participants(records: list[dict]) -> str:
    rows = []
    for server_round in sorted({r["round"] for r in records if r.get("source") == "client"}):
        trained = sorted({r.get("dataset", "?") for r in records if r["round"] == server_round
                          and r.get("source") == "client"})
        rows.append([server_round, len(trained), ", ".join(trained)])
    return "<h2>Who trained</h2>" + _table(["round", "clients", "datasets"], rows)


def _datasets(records: list[dict]) -> str:
    """What each client that trained said about its dataset in the query phase."""
    trained = sorted({r["dataset"] for r in records if r.get("source") == "client" and "dataset" in r})
    facts = client_facts(records)
    if not facts:
        return ("<h2>Their datasets</h2><p>Not recorded: robot type, fps, tasks and episode counts come from the "
                "clients' round-0 query replies, which a baseline does not have.</p>")
    rows = [[name, fact.get("robot-type") or None, fact.get("fps"), "; ".join(fact.get("tasks", [])) or None,
             fact.get("train-episodes"), fact.get("held-out-episodes")]
            for name, fact in ((name, facts.get(name, {})) for name in trained)]
    return "<h2>Their datasets, as each client described it</h2>" + _table(
        ["dataset", "robot type", "fps", "tasks", "train episodes", "held-out episodes"], rows)


def _comparison(run_dir: Path) -> str:
    """The ``zk0 compare`` table that included this run, when there is one."""
    table = read_comparison(run_dir)
    if not table:
        return ""
    rows = [["this run" if run["folder"] == run_dir.name else run["folder"], run["mode"], row["round"],
             *(row.get(key) for key, _ in table["columns"]), row.get("optimizer-steps")]
            for run in table["runs"] for row in run["rows"]]
    return (f"<h2>Baseline comparison</h2><p class=muted>zk0 compare, {html.escape(table['compared'])}: means over "
            f"held-out episodes, unseen-task sets and simulator tasks.</p>"
            + _table(["run", "mode", "round", *(label for _, label in table["columns"]), "optimizer steps"], rows))


def _charts(run_dir: Path) -> str:
    images = "".join(f'<img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
                     f'{base64.b64encode(p.read_bytes()).decode()}">'
                     for p in sorted((run_dir / "charts").glob("*.png")))
    return "<h2>Charts</h2>" + (images or "<p>No charts were written.</p>")


def _per_dataset(records: list[dict]) -> str:
    keyed: dict[tuple[str, str, int], dict[str, float]] = {}
    for r in records:
        if "dataset" in r and "event" not in r:  # metrics, not events (sim success, client datasets)
            where = "unseen (server)" if r.get("source") == "server" else "held-out (client)"
            row = keyed.setdefault((r["dataset"], where, r["round"]), {})
            for key in ("train-loss", "eval-loss", "eval-action-mae"):
                if key in r:
                    row[key] = r[key]
    rows = [[dataset, where, server_round, v.get("train-loss"), v.get("eval-loss"), v.get("eval-action-mae")]
            for (dataset, where, server_round), v in sorted(keyed.items())]
    return "<h2>Per dataset and round</h2>" + _table(["dataset", "evaluated as", "round", "train loss", "eval loss",
                                                       "eval MAE (deg)"], rows)


def _sim(run_dir: Path, records: list[dict]) -> str:
    rows = [[r["round"], r.get("dataset", "?"), r["success-rate"]] for r in records if r.get("event") == "sim-eval"]
    if not rows:
        return "<h2>Closed-loop success</h2><p>Not measured in this run (sim-eval-every = 0).</p>"
    links = [html.escape(str(p.relative_to(run_dir))) for p in sorted(run_dir.rglob("*.mp4"))]
    videos = "".join(f'<li><a href="{link}">{link}</a></li>' for link in links)
    return ("<h2>Closed-loop success</h2>" + _table(["round", "task", "success"], rows)
            + (f"<p>Rollout videos:</p><ul>{videos}</ul>" if videos else ""))


def _replies(audit: list[dict]) -> str:
    bad = [[a["round"], a["phase"], a["node"], a["direction"], a.get("status"), a.get("reason")] for a in audit
           if a["direction"] == "missing" or a.get("status") == "rejected"]
    body = _table(["round", "phase", "node", "direction", "status", "reason"], bad) if bad else \
        "<p>None: every reply arrived and was accepted.</p>"
    return "<h2>Rejected and missing replies</h2>" + body


def _config(config: dict) -> str:
    rows = [[key, value] for key, value in config.get("run-config", {}).items()]
    return "<h2>Run config</h2>" + _table(["key", "value"], rows)
