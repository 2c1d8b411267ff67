"""A real federation through the zk0 CLI loses a node mid-round, then its SuperLink (SIGKILL) and a node's
worker; ``zk0 run --resume`` finishes the run in the same folder.

Its own loopback federation (:func:`loopback.federation_up`), so it runs beside test_deploy.py.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from loopback import FAST, alive, child_pids, federation_up, zk0
from waits import deadline, wait_for

from zk0.audit import read_audit
from zk0.deploy import processes, server_folder
from zk0.tracking import read_metrics

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    with federation_up(tmp_path_factory.mktemp("federation")) as fed:
        yield fed


def test_a_node_dies_mid_round_then_the_server_dies_and_the_run_resumes(federation):
    """Three nodes: one dies in round 1 and the round finishes with the other two; the SuperLink is
    killed after round 1 and `zk0 run --resume` finishes the run in the same folder."""
    federation.start_client(2)
    before = set(federation.runs())
    zk0("run", "-d", str(federation.server), "--detach", "-c",
        f"num-server-rounds=3 min-train-nodes=2 min-evaluate-nodes=2 {FAST}")
    run_dir = wait_for(lambda: next(iter(set(federation.runs()) - before), None), "the run folder")
    wait_for(lambda: any(a["phase"] == "train" and a["round"] == 1 for a in read_audit(run_dir)),
             "round 1 training to start")
    for name in ("clientapp", "supernode"):
        assert processes.stop(federation.root / "node2", name, timeout=10)
    wait_for(lambda: (run_dir / "server_state.pt").exists() and
             any(r.get("event") == "round" and r["round"] == 1 for r in read_metrics(run_dir / "metrics.jsonl")),
             "round 1 to complete")
    serverapps = server_folder.serverapp_processes(server_folder.server_settings(federation.server))
    assert any(b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes() for pid in serverapps)
    os.kill(processes.running_pid(federation.server, "superlink"), signal.SIGKILL)
    refused = zk0("server", "start", "-d", str(federation.server), check=False)
    assert refused.returncode == 1 and "`zk0 server stop -d" in refused.stderr
    zk0("server", "stop", "-d", str(federation.server))
    assert not [pid for pid in serverapps if alive(pid)], "no ServerApp outlives its killed SuperLink"
    assert torch.load(run_dir / "server_state.pt", weights_only=True)["server_round"] < 3
    zk0("server", "start", "-d", str(federation.server))  # same state database: the nodes stay registered
    supervisor = processes.running_pid(federation.root / "node0", "clientapp")
    (worker,) = child_pids(supervisor)
    os.kill(worker, signal.SIGKILL)  # node 0's worker dies; its supervisor starts another
    wait_for(lambda: [pid for pid in child_pids(supervisor) if pid != worker], "a restarted worker")
    proc = zk0("run", "-d", str(federation.server), "--resume", str(run_dir), timeout=deadline())
    assert "finished:completed" in proc.stdout
    records = read_metrics(run_dir / "metrics.jsonl")
    assert sorted(r["round"] for r in records if r.get("event") == "round") == [0, 1, 2, 3]
    for server_round in (1, 2, 3):
        assert len([r for r in records if r["source"] == "client" and r["round"] == server_round]) == 2
    node0 = {r["node"] for r in records if r["source"] == "client" and r.get("dataset") == "red-pick"}
    assert len(node0) == 1 and {r["round"] for r in records if r.get("node") in node0 and "train-loss" in r} == {
        1, 2, 3}, "node 0 trains in the rounds after its worker was killed"
    assert "was killed by SIGKILL" in (federation.root / "node0" / "logs" / "clientapp.log").read_text()
    lost = [a for a in read_audit(run_dir) if a["round"] == 1 and a["phase"] == "train"
            and a["direction"] in ("missing", "received") and a.get("status") != "accepted"]
    assert len(lost) == 1, lost
    assert len((run_dir / "flower-runs.txt").read_text().split()) == 2
    assert json.loads((run_dir / "config.json").read_text())["run-config"]["num-server-rounds"] == 3
