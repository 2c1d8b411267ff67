"""A real federation through the zk0 CLI: SuperLink with TLS and node authentication, SuperNodes
with resident ClientApps (one on a dataset whose cameras are named otherwise), refused strangers,
a node dying mid-round, a server killed and resumed.

Everything binds 127.0.0.1; every process is started and stopped through PID files.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import synthetic
import torch

from zk0 import deploy
from zk0.audit import read_audit
from zk0.tracking import read_metrics

pytestmark = pytest.mark.e2e
ZK0 = str(Path(sys.executable).parent / "zk0")
FAST = "local-steps=2 batch-size=4 eval-batches=1 round-timeout=90"
DATASETS = ["embedded:red-pick", "embedded:blue-pick-small", "embedded:green-place-left"]
NAMES = ["alice", "bob", "carol"]
RENAMED = "top-camera"  # node 1's dataset: cameras top and wrist; the policy's are front and wrist


def zk0(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([ZK0, *args], capture_output=True, text=True, timeout=timeout)
    assert not check or proc.returncode == 0, f"zk0 {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Federation:
    """A server folder and client folders under one temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root, self.server = root, root / "server"
        self.port = deploy.free_port()
        self.clients: list[Path] = []

    def start_client(self, i: int, *extra: str, dataset: str = "", check: bool = True) -> subprocess.CompletedProcess:
        folder = self.root / f"node{i}"
        self.clients.append(folder)
        return zk0("client", "start", "-d", str(folder), "--server", f"127.0.0.1:{self.port}", "--ca",
                   str(self.server / "ca.crt"), "--dataset", dataset or DATASETS[i % len(DATASETS)], *extra,
                   check=check)

    def runs(self) -> list[Path]:
        return sorted((self.server / "runs").glob("*")) if (self.server / "runs").exists() else []

    def stop_all(self) -> None:
        for folder in self.clients:
            for name in ("clientapp", "supernode"):
                deploy.stop(folder, name)
        deploy.stop(self.server, "superlink")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """SuperLink (TLS + node auth) with three named, registered keys; nodes 0 and 1 online, node 1 on a local
    dataset whose ``top`` camera feeds the policy's ``front`` through ``--camera``."""
    fed = Federation(tmp_path_factory.mktemp("federation"))
    renamed = synthetic.generate(synthetic.TASKS["blue-center"], fed.root / RENAMED, episodes=4, frames=20,
                                 image_size=64, seed=7, cameras=("top", "wrist"))
    try:
        zk0("server", "init", str(fed.server), "--port", str(fed.port))
        zk0("server", "start", "-d", str(fed.server))
        for i in range(3):
            zk0("client", "keygen", "-d", str(fed.root / f"node{i}"))
            zk0("server", "add-node", str(fed.root / f"node{i}" / "node_key.pub"), "-d", str(fed.server),
                "--name", NAMES[i])
        assert "serves" in fed.start_client(0).stdout
        started = fed.start_client(1, "--camera", "top=observation.images.front", dataset=f"local:{renamed}")
        assert "observation.images.top -> observation.images.front" in started.stdout
        yield fed
    finally:
        fed.stop_all()


def test_two_nodes_with_tls_and_node_auth_run_two_rounds(federation):
    proc = zk0("run", "-d", str(federation.server), "-c", f"num-server-rounds=2 {FAST}", timeout=600)
    assert "finished:completed" in proc.stdout
    run_dir = federation.runs()[-1]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert len({r["node"] for r in records if r["source"] == "client" and r["round"] == 2}) == 2
    assert {r["round"] for r in records if r["source"] == "client" and r.get("dataset") == RENAMED
            and "train-loss" in r} == {1, 2}, "the node with remapped cameras trains every round"
    assert (run_dir / "checkpoints" / "round_2" / "model.safetensors").is_file()
    received = [a for a in read_audit(run_dir) if a["phase"] == "train" and a["direction"] == "received"]
    assert len(received) == 4 and all(a["status"] == "accepted" for a in received)
    status = zk0("status", "-d", str(federation.server)).stdout
    assert "finished:completed" in status and "round 2" in status and status.count("online") == 2
    assert all(f"online     {name}" in status for name in NAMES[:2]) and "carol" in status
    run_id = proc.stdout.split("run ", 1)[1].split()[0]
    assert "zk0 round 2/2" in zk0("logs", run_id, "-d", str(federation.server)).stdout
    stop = zk0("stop", run_id, "-d", str(federation.server))
    assert stop.stdout.strip() == f"run {run_id} already finished (finished:completed)"
    unknown = zk0("stop", "1", "-d", str(federation.server), check=False)
    assert unknown.returncode == 1 and unknown.stderr.count("\n") == 1
    assert unknown.stderr.startswith("error: run 1 is not a run of the SuperLink")
    server = federation.server
    assert not (server / "ca.key").exists() and (federation.root / "server-ca" / "ca.key").is_file()
    assert {p.name: p.stat().st_mode & 0o777 for p in (server, server / "state.db", run_dir)} == {
        server.name: 0o700, "state.db": 0o600, run_dir.name: 0o700}, "the server's files are the operator's alone"
    builds = [line for c in federation.clients for line in (c / "logs" / "clientapp.log").read_text().splitlines()
              if "built policy and dataset" in line]
    assert len(builds) == 2, "each resident ClientApp builds its policy and data once per run"


def test_zk0_run_exits_nonzero_when_the_run_fails(federation):
    """Three nodes required, two online: the ServerApp gives up after round-timeout and the run fails."""
    proc = zk0("run", "-d", str(federation.server), "-c", "min-train-nodes=3 round-timeout=5", timeout=300,
               check=False)
    assert proc.returncode == 1 and "finished:failed" in proc.stdout, proc.stdout[-2000:]


def test_a_node_with_an_unregistered_key_is_refused(federation, tmp_path):
    zk0("client", "keygen", "-d", str(tmp_path / "stranger"))
    proc = zk0("client", "start", "-d", str(tmp_path / "stranger"), "--server", f"127.0.0.1:{federation.port}",
               "--ca", str(federation.server / "ca.crt"), "--dataset", DATASETS[0], check=False)
    assert proc.returncode == 1 and "refused" in proc.stderr and "Failed to activate SuperNode" in proc.stderr
    assert deploy.running_pid(tmp_path / "stranger", "supernode") is None


def test_a_node_trusting_another_ca_cannot_connect(federation, tmp_path):
    deploy.init_server(tmp_path / "other", [], "127.0.0.1", 1)
    proc = zk0("client", "start", "-d", str(federation.root / "node2"), "--server", f"127.0.0.1:{federation.port}",
               "--ca", str(tmp_path / "other" / "ca.crt"), "--dataset", DATASETS[2], check=False)
    assert proc.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in proc.stderr


def test_insecure_is_explicit_and_warns(tmp_path):
    proc = zk0("server", "start", "-d", str(tmp_path / "none"), check=False)
    assert proc.returncode == 1 and "not a zk0 server folder" in proc.stderr
    zk0("server", "init", str(tmp_path / "srv"), "--port", str(deploy.free_port()))
    try:
        proc = zk0("server", "start", "-d", str(tmp_path / "srv"), "--insecure")
        assert "warning: --insecure" in proc.stderr
        assert "--insecure" in Path(f"/proc/{deploy.running_pid(tmp_path / 'srv', 'superlink')}/cmdline").read_text()
    finally:
        zk0("server", "stop", "-d", str(tmp_path / "srv"))


def test_a_node_dies_mid_round_then_the_server_dies_and_the_run_resumes(federation):
    """Three nodes: one dies in round 1 and the round finishes with the other two; the SuperLink is
    killed after round 1 and `zk0 run --resume` finishes the run in the same folder."""
    federation.start_client(2)
    before = set(federation.runs())
    zk0("run", "-d", str(federation.server), "--detach", "-c",
        f"num-server-rounds=3 min-train-nodes=2 min-evaluate-nodes=2 {FAST}")
    run_dir = wait_for(lambda: next(iter(set(federation.runs()) - before), None), 120, "the run folder")
    wait_for(lambda: any(a["phase"] == "train" and a["round"] == 1 for a in read_audit(run_dir)), 180,
             "round 1 training to start")
    for name in ("clientapp", "supernode"):
        assert deploy.stop(federation.root / "node2", name, timeout=10)
    wait_for(lambda: (run_dir / "server_state.pt").exists() and
             any(r.get("event") == "round" and r["round"] == 1 for r in read_metrics(run_dir / "metrics.jsonl")),
             300, "round 1 to complete")
    zk0("server", "stop", "-d", str(federation.server))  # the ServerApp dies with its SuperLink
    assert torch.load(run_dir / "server_state.pt", weights_only=True)["server_round"] < 3
    zk0("server", "start", "-d", str(federation.server))  # same state database: the nodes stay registered
    proc = zk0("run", "-d", str(federation.server), "--resume", str(run_dir), timeout=600)
    assert "finished:completed" in proc.stdout
    records = read_metrics(run_dir / "metrics.jsonl")
    assert sorted(r["round"] for r in records if r.get("event") == "round") == [0, 1, 2, 3]
    for server_round in (1, 2, 3):
        assert len([r for r in records if r["source"] == "client" and r["round"] == server_round]) == 2
    lost = [a for a in read_audit(run_dir) if a["round"] == 1 and a["phase"] == "train"
            and a["direction"] in ("missing", "received") and a.get("status") != "accepted"]
    assert len(lost) == 1, lost
    assert len((run_dir / "flower-runs.txt").read_text().split()) == 2
    assert json.loads((run_dir / "config.json").read_text())["run-config"]["num-server-rounds"] == 3
