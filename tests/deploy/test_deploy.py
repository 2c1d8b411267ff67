"""A real federation through the zk0 CLI: SuperLink with TLS and node authentication, SuperNodes
with resident ClientApps (one on a dataset whose cameras are named otherwise), refused strangers and
outsiders, a run that fails. A node dying mid-round and a server killed and resumed: test_deploy_resume.py.

Everything binds 127.0.0.1; every process is started and stopped through PID files.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from loopback import DATASETS, FAST, NAMES, RENAMED, ZK0, federation_up, zk0
from waits import deadline, wait_for

from zk0.deploy import commands, processes, server_folder
from zk0.audit import read_audit
from zk0.registry import default_pyproject
from zk0.tracking import read_metrics

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """The loopback federation of :func:`loopback.federation_up`, shared by this file's tests."""
    with federation_up(tmp_path_factory.mktemp("federation")) as fed:
        yield fed


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
