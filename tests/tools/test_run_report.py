"""`zk0 report`: one self-contained page built from the run folder's own records."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from zk0.cli.app import app

HOSTILE = "<script>alert(1)</script>"


def fabricated_run(root: Path) -> Path:
    """Two rounds; client b drops out of round 2; one rejected and one missing reply; sim success; a chart."""
    run = root / "run"
    (run / "charts").mkdir(parents=True)
    (run / "charts" / "eval_loss.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    (run / "sim").mkdir()
    (run / "sim" / "red-pick.mp4").write_bytes(b"mp4")
    (run / "config.json").write_text(json.dumps({"run-config": {"strategy": "fedavg", "num-server-rounds": 2,
                                                                "model-name": "tiny"}}))
    records = [{"round": r, "source": "server", "event": "round", "seconds": 1.0} for r in (0, 1, 2)]
    records += [{"round": 1, "source": "client", "dataset": d, "train-loss": 1.5} for d in ("a", HOSTILE)]
    records += [{"round": 2, "source": "client", "dataset": "a", "train-loss": 1.25}]
    records += [{"round": r, "source": "client-eval", "dataset": "a", "eval-loss": l, "eval-action-mae": m}
                for r, l, m in ((0, 2.0, 20.0), (2, 1.0, 10.0))]
    records += [{"round": 2, "source": "server", "event": "sim-eval", "dataset": "red-pick", "success-rate": 0.4}]
    records += [{"round": 0, "source": "server", "event": "federation", "nodes": 2, "reported": 2,
                 "runtime": "deployment"},
                {"round": 0, "source": "server", "event": "client-dataset", "node": 11, "partition": -1, "dataset": "a",
                 "robot-type": "so101_follower", "fps": 30, "tasks": ["pick <it>", "place it"], "num-tasks": 2,
                 "train-episodes": 8, "held-out-episodes": 2}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    audit = [{"time": 1, "run-id": 7, "attempt": 1, "round": 1, "phase": "train", "node": 11, "direction": "received",
              "status": "rejected", "reason": "update norm 4.4e+04 exceeds max-update-norm=1000"},
             {"time": 2, "run-id": 7, "attempt": 1, "round": 2, "phase": "train", "node": 12, "direction": "missing"},
             {"time": 3, "run-id": 7, "attempt": 1, "round": 2, "phase": "train", "node": 11, "direction": "received",
              "status": "accepted"}]
    (run / "audit.jsonl").write_text("".join(json.dumps(a) + "\n" for a in audit))
    return run


def test_the_page_says_what_happened(tmp_path):
    run = fabricated_run(tmp_path)
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    page = (run / "report.html").read_text()
    assert "fedavg, in a deployment, model tiny, 2 of 2 rounds" in page
    assert "<td class=n>1</td><td class=n>2</td>" in page and "<td class=n>2</td><td class=n>1</td><td>a</td>" in page
    assert "<td>held-out MAE (deg)</td><td class=n>20</td><td class=n>10</td>" in page
    assert "<td>sim success</td><td>—</td><td class=n>0.4</td>" in page
    assert "update norm 4.4e+04 exceeds max-update-norm=1000" in page and "<td>missing</td>" in page
    assert page.count("<td>accepted</td>") == 0, "only rejected and missing replies are listed"
    assert 'src="data:image/png;base64,' in page and 'href="sim/red-pick.mp4"' in page
    assert HOSTILE not in page and "&lt;script&gt;" in page
    assert "<td>num-server-rounds</td><td class=n>2</td>" in page
    assert ("<td>a</td><td>so101_follower</td><td class=n>30</td><td>pick &lt;it&gt;; place it</td><td class=n>8</td>"
            "<td class=n>2</td>") in page
    assert "<td>a</td><td>unseen (server)</td>" not in page, "a client's dataset facts are no metrics row"
    assert "Baseline comparison" not in page


def test_the_page_shows_the_compare_table_that_included_the_run(tmp_path):
    run = fabricated_run(tmp_path)
    table = {"compared": "2026-11-30 10:00", "columns": [["held-out-mae", "held-out MAE"]],
             "runs": [{"folder": "run", "mode": "fedavg", "rows": [{"round": 2, "held-out-mae": 10.0,
                                                                    "optimizer-steps": 16}]},
                      {"folder": "other", "mode": "local", "rows": [{"round": 2, "held-out-mae": 12.5,
                                                                     "optimizer-steps": 16}]}]}
    (run / "compare.json").write_text(json.dumps(table))
    assert CliRunner().invoke(app, ["report", str(run)]).exit_code == 0
    page = (run / "report.html").read_text()
    assert "<h2>Baseline comparison</h2>" in page and "<th>held-out MAE</th>" in page
    assert "<td>this run</td><td>fedavg</td><td class=n>2</td><td class=n>10</td><td class=n>16</td>" in page
    assert "<td>other</td><td>local</td><td class=n>2</td><td class=n>12.5</td>" in page


def test_a_folder_that_is_no_run_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "is not a run folder" in result.stderr
