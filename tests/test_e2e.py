"""End to end through Flower's own entry points: `flwr run` against a simulation SuperLink,
and `zk0 simulate`. Everything binds 127.0.0.1; every process is stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from waits import deadline, wait_for

from zk0.deploy.processes import free_port
from zk0.tracking import read_metrics

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.e2e


def env_for(tmp_path: Path) -> dict[str, str]:
    """Flower's home (connections) inside the test folder; our venv first on PATH."""
    return {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "PATH": f"{BIN}:{os.environ['PATH']}",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def client_app_niceness(session: int) -> set[int]:
    """The nice values of the Ray workers running ClientApps in the process session ``session``."""
    seen = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[3]) == session and b"ClientAppActor" in cmdline:  # fields after "(comm)": state is [0]
            seen.add(int(fields[16]))
    return seen


@pytest.fixture
def superlink(tmp_path):
    """A simulation SuperLink on a free loopback port, with a connection named `e2e`."""
    port = free_port()
    env = {**env_for(tmp_path), "RAY_worker_niceness": "0"}  # as the README says: clients not starved under load
    (tmp_path / "flwr").mkdir()
    (tmp_path / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "e2e"\n\n[superlink.e2e]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    log = (tmp_path / "superlink.log").open("w")
    proc = subprocess.Popen([str(BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                             "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    def listening() -> bool:
        assert proc.poll() is None, (tmp_path / "superlink.log").read_text()[-2000:]
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, f"the SuperLink to listen on 127.0.0.1:{port}")
    yield env
    os.killpg(proc.pid, signal.SIGTERM)  # its SuperExec watches this PID and exits with it
    try:
        proc.wait(timeout=deadline(30))  # a graceful stop, longer on a loaded machine
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=deadline(10))
    log.close()


def test_flwr_run_simulation(superlink, tmp_path):
    out = tmp_path / "outputs"
    run_config = f"num-server-rounds=2 local-steps=2 batch-size=4 eval-batches=1 min-stats-clients=2 output-dir='{out}'"
    subprocess.run([str(BIN / "flwr"), "run", str(ROOT), "e2e", "--stream", "--federation-config", "num-supernodes=2",
                    "--run-config", run_config], env=superlink, check=True, timeout=deadline(),
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # `flwr run --stream` exits 0 even when the run failed: ask the SuperLink for the run's status.
    listing = subprocess.run([str(BIN / "flwr"), "ls", "e2e", "--format", "json"], env=superlink, check=True,
                             timeout=deadline(), capture_output=True, text=True)
    runs = json.loads(listing.stdout)["runs"]
    assert [r["status"] for r in runs] == ["finished:completed"]
    (run_dir,) = out.iterdir()
    records = read_metrics(run_dir / "metrics.jsonl")
    assert {r["partition"] for r in records if r["source"] == "client"} == {0, 1}
    assert (run_dir / "checkpoints" / "round_2" / "model.safetensors").is_file()


def test_zk0_simulate_rejects_bad_config_in_one_line(tmp_path):
    proc = subprocess.run([str(BIN / "zk0"), "simulate", "--output", str(tmp_path), "--run-config", "strategy=fedsgd"],
                          env=env_for(tmp_path), timeout=deadline(), capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: run-config 'strategy' must be one of fedprox|fedavg, got 'fedsgd'"]


def test_zk0_simulate_fails_fast_on_an_unreachable_hub_model(tmp_path):
    proc = subprocess.run([str(BIN / "zk0"), "simulate", "--output", str(tmp_path), "--run-config",
                           "model-name=lerobot/smolvla_base"], env=env_for(tmp_path), timeout=deadline(),
                          capture_output=True, text=True)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert "lerobot/smolvla_base" in line and "HF_HUB_OFFLINE" in line


def test_zk0_simulate_refuses_fewer_clients_than_the_minimum(tmp_path):
    proc = subprocess.run([str(BIN / "zk0"), "simulate", "--num-clients", "1", "--output", str(tmp_path)],
                          env=env_for(tmp_path), timeout=deadline(), capture_output=True, text=True)
    assert proc.returncode == 1 and "min-train-nodes=2" in proc.stderr


def test_zk0_simulate_on_owners_data_killed_and_resumed(tmp_path, lab_registry, smolvla_base_folder):
    """The real user's path: their registry file, 2- and 3-camera datasets mapped onto 2 of a
    smolvla_base-format model's 3 cameras, overrides every simulated client must follow; the
    simulation is killed after round 1 and resumed with the run's own config."""
    out = tmp_path / "outputs"
    args = [str(BIN / "zk0"), "simulate", "--output", str(out), "--client-cpus", "1", "--run-config",
            f"num-server-rounds=3 local-steps=2 batch-size=4 eval-batches=1 chunk-size=5 strategy=fedavg "
            f"datasets='lab' registry='{lab_registry}' model-name='{smolvla_base_folder}' min-stats-clients=2"]
    proc = subprocess.Popen(args, env=env_for(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, cwd=tmp_path)
    niceness = set()
    def round_1_done() -> bool:
        assert proc.poll() is None, "the simulation exited before it finished round 1"
        niceness.update(client_app_niceness(proc.pid))
        return any(r.get("event") == "round" and r["round"] == 1
                   for path in out.glob("*/metrics.jsonl") for r in read_metrics(path))

    try:
        wait_for(round_1_done, "the simulation to finish round 1")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # Ray's workers die with the session
        proc.wait(timeout=deadline())
    (run_dir,) = out.iterdir()
    assert niceness == {0}, f"Ray's ClientApp workers ran at nice {niceness}: starved beside other work"
    assert "fedavg" in run_dir.name
    assert json.loads((run_dir / "config.json").read_text())["run-config"]["strategy"] == "fedavg"
    assert torch.load(run_dir / "server_state.pt", weights_only=True)["server_round"] < 3
    bad = subprocess.run([str(BIN / "zk0"), "simulate", "--resume", str(run_dir), "-c", "lr=0.5"],
                         env=env_for(tmp_path), timeout=deadline(), capture_output=True, text=True)
    assert bad.returncode == 1 and "lr cannot change" in bad.stderr
    done = subprocess.run([str(BIN / "zk0"), "simulate", "--client-cpus", "1", "--resume", str(run_dir)],
                          env=env_for(tmp_path), timeout=deadline(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"run folder: {run_dir}" in done.stdout and "zk0 run summary" in done.stderr + done.stdout
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in records if r.get("event") == "round"] == [0, 1, 2, 3]
    trained = [r for r in records if r["source"] == "client"]
    assert {(r["round"], r["dataset"]) for r in trained} == {(n, d) for n in (1, 2, 3)
                                                              for d in ("arm-top-wrist", "arm-three-cams")}
    assert all(r["steps"] == 2 and r["num-examples"] == 8 for r in trained)  # the overrides, before and after resume
    doc = json.loads((run_dir / "config.json").read_text())
    assert {r["base"] for r in trained} == {doc["base-fingerprint"][:16]}  # the model the run names, on every client
    assert [r["round"] for r in records if r.get("dataset") == "arm-gripper-only"] == [0, 1, 2, 3]
    saved = json.loads((run_dir / "checkpoints" / "round_3" / "config.json").read_text())
    assert saved["chunk_size"] == 5 and "observation.image3" in saved["input_features"]
