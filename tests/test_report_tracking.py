"""zk0.report (progress lines, summary table) and zk0.tracking (metrics.jsonl, charts, W&B switch)."""

from __future__ import annotations

import sys
import json

import pytest

from zk0.config import ConfigError, RunConfig
from zk0.report import human_bytes, progress_line, summary_table
from zk0.tracking import Tracker, read_metrics, write_charts


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (512, "512 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (5 * 1024**2, "5.0 MiB"), (3 * 1024**3, "3.0 GiB"), (2048 * 1024**3, "2048.0 GiB"),
])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


def test_progress_line():
    line = progress_line(2, 3, {"train-loss": 0.81234, "server-eval-mae": 1.5, "bytes-down": 2048,
                                "rejected": 1, "seconds": 12.34})
    assert line.startswith("zk0 round 2/3")
    assert "client train loss 0.8123" in line
    assert "unseen MAE 1.5000" in line
    assert "sent 2.0 KiB" in line
    assert "rejected 1" in line
    assert "12.3s" in line
    assert "held-out loss" not in line  # absent metrics are left out


def test_summary_table():
    rows = [{"round": 1, "train-loss": 1.25, "bytes-down": 1024, "rejected": 0},
            {"round": 2, "train-loss": 0.5, "server-eval-loss": 0.75, "rejected": 2}]
    lines = summary_table(rows)
    text = "\n".join(lines)
    assert "zk0 run summary" in text
    assert "client train loss" in text and "unseen loss" in text  # header
    assert "1.2500" in text and "0.5000" in text and "0.7500" in text and "1.0 KiB" in text
    header = [line for line in lines if "round" in line and "client train loss" in line]
    assert len(header) == 1
    body = [line for line in lines if line.startswith("│")]
    assert len(body) == len(rows)
    assert body[0].split("│")[1].strip() == "1" and body[1].split("│")[1].strip() == "2"
    assert "–" in body[0]  # a missing value is shown as a dash
    assert len(summary_table([])) < len(lines)


def test_tracker_writes_jsonl_and_summarises(tmp_path):
    tracker = Tracker(tmp_path, RunConfig())
    tracker.log({"round": 1, "source": "client", "dataset": "a", "train-loss": 1.0})
    tracker.log({"round": 1, "source": "client", "dataset": "b", "train-loss": 3.0})
    tracker.log({"round": 1, "source": "client-eval", "dataset": "a", "eval-loss": 0.5, "eval-action-mae": 2.0})
    tracker.log({"round": 1, "source": "server", "event": "rejected-update", "node": 5, "reason": "digest"})
    tracker.log({"round": 1, "source": "server", "event": "rejected-update", "node": 6, "reason": "norm"})
    tracker.log({"round": 1, "source": "server", "dataset": "u", "eval-loss": 0.25, "eval-action-mae": 4.0})
    tracker.log({"round": 1, "source": "server", "event": "round", "bytes-down": 100, "bytes-up": 50,
                 "seconds": 1.5})
    tracker.log({"round": 2, "source": "client", "dataset": "a", "train-loss": 10.0})
    tracker.close()

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8
    records = [json.loads(line) for line in lines]
    assert all(isinstance(r["time"], float) and "round" in r and "source" in r for r in records)
    assert records[0]["train-loss"] == 1.0 and records[0]["dataset"] == "a"
    assert read_metrics(tmp_path / "metrics.jsonl") == records == tracker.records

    r1 = tracker.round_summary(1)
    assert r1["train-loss"] == pytest.approx(2.0)  # mean over clients
    assert r1["client-eval-loss"] == 0.5 and r1["client-eval-mae"] == 2.0
    assert r1["server-eval-loss"] == 0.25 and r1["server-eval-mae"] == 4.0
    assert r1["rejected"] == 2
    assert (r1["bytes-down"], r1["bytes-up"], r1["seconds"]) == (100, 50, 1.5)
    r2 = tracker.round_summary(2)
    assert r2 == {"train-loss": 10.0, "rejected": 0}
    assert tracker.round_summary(3) == {"rejected": 0}


def test_tracker_appends(tmp_path):
    Tracker(tmp_path, RunConfig()).log({"round": 1, "source": "server", "x": 1})
    Tracker(tmp_path, RunConfig()).log({"round": 2, "source": "server", "x": 2})
    assert [r["x"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_read_metrics_missing_file(tmp_path):
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_write_charts(tmp_path):
    tracker = Tracker(tmp_path, RunConfig())
    for rnd in (1, 2, 3):
        for ds in ("a", "b"):
            tracker.log({"round": rnd, "source": "client", "dataset": ds, "train-loss": 1.0 / rnd})
            tracker.log({"round": rnd, "source": "client-eval", "dataset": ds, "eval-loss": 2.0 / rnd,
                         "eval-action-mae": 3.0 / rnd})
        tracker.log({"round": rnd, "source": "server", "dataset": "u", "eval-loss": 1.5 / rnd,
                     "eval-action-mae": 2.5 / rnd})
    written = write_charts(tmp_path)
    names = {p.name for p in written}
    assert {"train_loss.png", "eval_loss.png", "eval_action_mae.png"} == names
    for path in written:
        assert path.parent == tmp_path / "charts"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 1000


def test_write_charts_without_metrics(tmp_path):
    assert write_charts(tmp_path) == []


def test_wandb_requested_but_not_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(ConfigError) as err:
        Tracker(tmp_path, RunConfig.flat(use_wandb=True))
    assert "pip install" in str(err.value)
    assert "wandb" in str(err.value)


def test_wandb_logs_offline_into_the_run_folder_without_an_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = Tracker(tmp_path, RunConfig.flat(use_wandb=True))
    tracker.log({"round": 0, "source": "server", "dataset": "unseen", "eval-loss": 1.5})
    tracker.log({"round": 1, "source": "client", "partition": 0, "train-loss": 1.25})
    tracker.close()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert next(run.glob("*.wandb")).stat().st_size > 0
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 2


def test_charts_name_the_run_and_its_strategy(tmp_path):
    from zk0.tracking import run_label, write_charts

    run = tmp_path / "20261129-000000-fedavg-7"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"run-config": {"strategy": "fedavg"}}))
    records = [{"round": r, "source": "client-eval", "dataset": "a", "eval-loss": 1.0, "eval-action-mae": 2.0}
               for r in (0, 1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert sorted(p.name for p in write_charts(run)) == ["eval_action_mae.png", "eval_loss.png"]
    assert run_label(run) == "fedavg, 20261129-000000-fedavg-7"
