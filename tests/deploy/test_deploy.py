"""A real federation through the zk0 CLI: SuperLink with TLS and node authentication, SuperNodes
with resident ClientApps (one on a dataset whose cameras are named otherwise), refused strangers,
a node dying mid-round, a server killed and resumed.

Everything binds 127.0.0.1; every process is started and stopped through PID files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import synthetic
import torch
from waits import deadline, wait_for

from zk0.deploy import commands, processes, server_folder
from zk0.audit import read_audit
from zk0.registry import default_pyproject
from zk0.tracking import read_metrics

pytestmark = pytest.mark.e2e
ZK0 = str(Path(sys.executable).parent / "zk0")
# round-timeout: a generous deadline, not a guess (a loaded machine answers late); dead nodes are found by heartbeat
FAST = "local-steps=2 batch-size=4 eval-batches=1 round-timeout=300 min-stats-clients=2"
DATASETS = ["embedded:red-pick", "embedded:blue-pick-small", "embedded:green-place-left"]
NAMES = ["alice", "bob", "carol"]
RENAMED = "top-camera"  # node 1's dataset: cameras top and wrist; the policy's are front and wrist


def zk0(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([ZK0, *args], capture_output=True, text=True, timeout=timeout)
    assert not check or proc.returncode == 0, f"zk0 {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def child_pids(parent: int) -> list[int]:
    """PIDs of the live children of ``parent``."""
    return [int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat") if _stat(stat)[1:2] == [str(parent)]
            and _stat(stat)[0] != "Z"]


def _stat(path: Path) -> list[str]:
    """State, ppid, pgid, … of a /proc/PID/stat ([] once the process is gone)."""
    try:
        return path.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def alive(pid: int) -> bool:
    return _stat(Path(f"/proc/{pid}/stat"))[:1] not in ([], ["Z"])


class Federation:
    """A server folder and client folders under one temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root, self.server = root, root / "server"
        self.port = processes.free_port()
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
                processes.stop(folder, name)
        processes.stop(self.server, "fleet-proxy")
        processes.stop(self.server, "superlink")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """SuperLink (TLS + node auth) with three named, registered keys; nodes 0 and 1 online, node 1 on a local
    dataset whose ``top`` camera feeds the policy's ``front`` through ``--camera``."""
    fed = Federation(tmp_path_factory.mktemp("federation"))
    renamed = synthetic.generate(synthetic.TASKS["blue-center"], fed.root / RENAMED, episodes=4, frames=20,
                                 image_size=64, seed=7, cameras=("top", "wrist"))
    try:
        zk0("server", "init", str(fed.server), "--port", str(fed.port), "--control-port", str(processes.free_port()))
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


def outsider_flwr(federation, home: Path, *args: str) -> str:
    """``flwr ARGS`` as someone holding only ``ca.crt`` and the public address; its output (it must fail)."""
    home.mkdir(exist_ok=True)
    server_folder.write_connection(home, f"127.0.0.1:{federation.port}", federation.server / "ca.crt")
    proc = subprocess.run([str(commands.BIN / "flwr"), *args, "--format", "json"], env=commands.flower_env(home),
                          capture_output=True, text=True, timeout=deadline())
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 or '"success": false' in out, f"flwr {' '.join(args)} was not refused:\n{out}"
    return out


def listening_hosts(port: int) -> set[str]:
    """The local addresses with a socket listening on ``port`` (from /proc/net/tcp and tcp6)."""
    hosts = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                hosts.add("127.0.0.1" if address == "0100007F" else address)
    return hosts


def test_two_nodes_run_two_rounds_while_an_outsider_with_ca_crt_is_refused_everything(federation, tmp_path):
    """TLS, node authentication and named nodes; meanwhile someone holding ``ca.crt`` dials the public port
    and tries the Control API: list runs, register a key, stop the run, unregister a node, submit an app."""
    before = set(federation.runs())
    output = (tmp_path / "operator.log").open("w+")  # a file, not a pipe: the streamed run log must never block
    operator = subprocess.Popen([ZK0, "run", "-d", str(federation.server), "-c", f"num-server-rounds=2 {FAST}"],
                                stdout=output, stderr=subprocess.STDOUT, text=True)
    run_dir = wait_for(lambda: next(iter(set(federation.runs()) - before), None), "the run folder")
    run_id = wait_for(lambda: (run_dir / "flower-runs.txt").exists() and (run_dir / "flower-runs.txt").read_text()
                      .split()[-1], "the run id")
    zk0("client", "keygen", "-d", str(tmp_path / "intruder"))
    home, app = tmp_path / "flwr", str(default_pyproject().parent)
    node_id = next(k for k, name in server_folder.node_names(federation.server).items() if name == NAMES[0])
    refusals = [outsider_flwr(federation, home, "ls", server_folder.CONNECTION),
                outsider_flwr(federation, home, "supernode", "register", str(tmp_path / "intruder" / "node_key.pub"),
                              server_folder.CONNECTION),
                outsider_flwr(federation, home, "stop", run_id, server_folder.CONNECTION),
                outsider_flwr(federation, home, "supernode", "unregister", node_id, server_folder.CONNECTION),
                outsider_flwr(federation, home, "run", app, server_folder.CONNECTION)]
    assert all("not exposed" in out for out in refusals), refusals
    operator.wait(timeout=deadline(900))
    stdout = (tmp_path / "operator.log").read_text()
    assert operator.returncode == 0 and "finished:completed" in stdout, stdout[-3000:]
    refused = [line for line in (federation.server / "logs" / "fleet-proxy.log").read_text().splitlines()
               if "/v1/control/" in line]
    assert len(refused) >= 5 and all("404" in line for line in refused), refused
    assert listening_hosts(server_folder.server_settings(federation.server).control_port) == {"127.0.0.1"}
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
    assert status.split("nodes:")[1].count("\n  ") == 3, "the intruder's key was never registered"
    assert status.split("runs:")[1].split("nodes:")[0].count("\n  ") == 1, "the intruder submitted no run"
    server_log = zk0("logs", run_id, "-d", str(federation.server)).stdout
    assert "zk0 round 2/2" in server_log and "\x1b[" not in server_log, "the log comes without colour codes"
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
    proc = zk0("run", "-d", str(federation.server), "-c", "min-train-nodes=3 round-timeout=5", check=False)
    assert proc.returncode == 1 and "finished:failed" in proc.stdout, proc.stdout[-2000:]


def test_a_node_with_an_unregistered_key_is_refused(federation, tmp_path):
    zk0("client", "keygen", "-d", str(tmp_path / "stranger"))
    proc = zk0("client", "start", "-d", str(tmp_path / "stranger"), "--server", f"127.0.0.1:{federation.port}",
               "--ca", str(federation.server / "ca.crt"), "--dataset", DATASETS[0], check=False)
    assert proc.returncode == 1 and "refused" in proc.stderr and "Failed to activate SuperNode" in proc.stderr
    assert processes.running_pid(tmp_path / "stranger", "supernode") is None


def test_an_insecure_node_is_told_the_server_speaks_tls(federation, tmp_path):
    proc = zk0("client", "start", "-d", str(tmp_path / "plain"), "--server", f"127.0.0.1:{federation.port}",
               "--insecure", "--dataset", DATASETS[0], "--wait", "15", check=False)
    assert proc.returncode == 1 and "speaks TLS: start with --ca ca.crt" in proc.stderr, proc.stderr
    assert processes.running_pid(tmp_path / "plain", "supernode") is None


def test_a_node_trusting_another_ca_cannot_connect(federation, tmp_path):
    server_folder.init_server(tmp_path / "other", [], "127.0.0.1", 1)
    proc = zk0("client", "start", "-d", str(federation.root / "node2"), "--server", f"127.0.0.1:{federation.port}",
               "--ca", str(tmp_path / "other" / "ca.crt"), "--dataset", DATASETS[2], check=False)
    assert proc.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in proc.stderr


def test_insecure_is_explicit_and_warns(tmp_path):
    proc = zk0("server", "start", "-d", str(tmp_path / "none"), check=False)
    assert proc.returncode == 1 and "not a zk0 server folder" in proc.stderr
    zk0("server", "init", str(tmp_path / "srv"), "--port", str(processes.free_port()), "--control-port",
        str(processes.free_port()))
    try:
        proc = zk0("server", "start", "-d", str(tmp_path / "srv"), "--insecure")
        assert "warning: --insecure" in proc.stderr
        assert "--insecure" in Path(f"/proc/{processes.running_pid(tmp_path / 'srv', 'superlink')}/cmdline").read_text()
        assert processes.running_pid(tmp_path / "srv", "fleet-proxy") is not None
        zk0("client", "keygen", "-d", str(tmp_path / "node"))
        port = server_folder.server_settings(tmp_path / "srv").port
        proc = zk0("client", "start", "-d", str(tmp_path / "node"), "--server", f"127.0.0.1:{port}", "--ca",
                   str(tmp_path / "srv" / "ca.crt"), "--dataset", DATASETS[0], "--wait", "15", check=False)
        assert proc.returncode == 1 and "does not speak TLS (a server started with --insecure?)" in proc.stderr
        assert processes.running_pid(tmp_path / "node", "supernode") is None, "a node that cannot connect is stopped"
    finally:
        zk0("server", "stop", "-d", str(tmp_path / "srv"))


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
    (worker,) = [pid for pid in child_pids(supervisor)]
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
