"""The deployment CLI's checks that need no Flower process: `zk0 client start` refusing data or
options before anything starts, commands naming a stopped SuperLink at once, node names, node config.

The end-to-end federation is in tests/test_deploy.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import synthetic
from flwr.common.config import parse_config_args
from typer.testing import CliRunner
from waits import deadline, wait_for

from zk0.deploy import commands, node_folder, processes, server_folder
from zk0.cli.app import app
from zk0.cli.deploy import check_node_data
from zk0.registry import DatasetEntry, format_camera_map, parse_camera_map

HEAVY = ("torch", "lerobot")  # what a fail path that only parses options must not import


def error_lines(stderr: str) -> list[str]:
    """The lines a user sees on stderr (``-X importtime`` lines aside)."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("import time:")]


@pytest.fixture(scope="module")
def top_only(tmp_path_factory) -> Path:
    """A dataset whose one camera, ``top``, is not a camera of the tiny policy (front, wrist)."""
    return synthetic.generate(synthetic.TASKS["red-left"], tmp_path_factory.mktemp("data") / "top-only",
                              episodes=2, frames=8, image_size=32, seed=0, cameras=("top",))


@pytest.mark.parametrize("options, expected", [
    (["--insecure", "--camera", "top"], "error: --camera: camera mapping 'top' is not DATASET_KEY=POLICY_KEY"),
    (["--insecure", "--dataset", "ftp:x"], "error: --dataset 'ftp:x': the scheme must be"),
    (["--ca", "missing.crt"], "error: --ca missing.crt: the federation's ca.crt is required"),
    (["--ca", "{ca}"], "error: node key {dir}/node_key not found"),
], ids=["camera-syntax", "dataset-scheme", "no-ca", "no-key"])
def test_client_start_refuses_bad_options_in_one_line_before_heavy_imports(tmp_path, options, expected):
    (tmp_path / "ca.crt").write_text("not used")
    folder = tmp_path / "node"
    options = [o.format(ca=tmp_path / "ca.crt") for o in options]
    args = ["client", "start", "-d", str(folder), "--server", "127.0.0.1:1", "--dataset", "embedded:red-pick", *options]
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "zk0", *args], capture_output=True, text=True,
                          timeout=deadline())
    lines = error_lines(proc.stderr)
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(expected.format(dir=folder)), lines
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert not imported & set(HEAVY), "options are checked before torch and LeRobot load"
    assert not folder.exists(), "nothing is written before the checks pass"


@pytest.mark.parametrize("cameras, expected", [
    ([], "no dataset camera feeds the policy"),
    (["side=observation.images.front"], "camera mapping names 'observation.images.side', which is not a camera of"),
    (["top=observation.image"], "camera mapping sends 'observation.images.top' to 'observation.image', which is not"),
], ids=["unmapped", "absent-camera", "not-a-policy-camera"])
def test_client_start_refuses_data_no_policy_camera_can_see(tmp_path, top_only, cameras, expected):
    folder = tmp_path / "node"
    node_folder.keygen(folder)
    (tmp_path / "ca.crt").write_text("checked by the SuperNode only")
    args = ["client", "start", "-d", str(folder), "--server", "127.0.0.1:1", "--ca", str(tmp_path / "ca.crt"),
            "--dataset", f"local:{top_only}", *[arg for cam in cameras for arg in ("--camera", cam)]]
    result = CliRunner().invoke(app, args)
    lines = error_lines(result.stderr)
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert expected in lines[0] and lines[0].startswith("error: dataset "), lines
    assert not (folder / "pids").exists(), "no process starts on data that cannot train"


def test_a_remapped_camera_is_checked_described_and_reaches_the_node_config(tmp_path, capsys):
    root = synthetic.generate(synthetic.TASKS["green-right"], tmp_path / "renamed", episodes=2, frames=8,
                              image_size=32, seed=1, cameras=("top", "wrist"))
    entry = DatasetEntry(uri=f"local:{root}", cameras=parse_camera_map(["top=observation.images.front"]))
    renames = check_node_data(entry, "tiny")
    assert renames == {"observation.images.top": "observation.images.front"}
    described = capsys.readouterr().out
    assert "observation.images.top -> observation.images.front" in described
    assert "observation.images.wrist -> observation.images.wrist" in described
    cmd = commands.supernode_command("127.0.0.1:1", entry.uri, None, None, 1, None, format_camera_map(renames))
    node_config = parse_config_args([cmd[cmd.index("--node-config") + 1]])  # as flower-supernode parses it
    assert node_config["dataset"] == entry.uri and parse_camera_map(node_config["cameras"]) == renames


@pytest.fixture
def stopped_server(tmp_path) -> Path:
    """A server folder made by `zk0 server init` whose SuperLink was never started."""
    folder = tmp_path / "server"
    server_folder.init_server(folder, [], "127.0.0.1", processes.free_port(), control_port=processes.free_port())
    node_folder.keygen(tmp_path / "node")
    return folder


@pytest.mark.parametrize("command", [["run"], ["status"], ["logs", "1"], ["stop", "1"],
                                     ["server", "add-node", "{key}", "--name", "alice"]],
                         ids=["run", "status", "logs", "stop", "add-node"])
def test_commands_name_a_stopped_superlink_at_once(stopped_server, command):
    """`flwr run` would retry for 4 minutes and end in a traceback: zk0's own line says no `flwr` call was made."""
    args = [a.format(key=stopped_server.parent / "node" / "node_key.pub") for a in command]
    proc = subprocess.run([str(Path(sys.executable).parent / "zk0"), *args, "-d", str(stopped_server)],
                          capture_output=True, text=True, timeout=deadline())
    port = server_folder.server_settings(stopped_server).control_port
    assert proc.returncode == 1 and proc.stderr.strip() == (
        f"error: no SuperLink is running from {stopped_server} (nothing listens on 127.0.0.1:{port}): "
        f"start it with `zk0 server start -d {stopped_server}`"), proc.stderr


def test_a_port_taken_by_another_process_is_not_our_superlink(stopped_server):
    import socket

    port = server_folder.server_settings(stopped_server).control_port
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))
        other.listen()
        result = CliRunner().invoke(app, ["status", "-d", str(stopped_server)])
    assert result.exit_code == 1
    assert f"127.0.0.1:{port} is taken by a process not started from this folder" in result.stderr


def test_node_names_are_kept_private_and_merged(tmp_path):
    server_folder.name_node(tmp_path, "11", "alice")
    server_folder.name_node(tmp_path, "22", "bob")
    assert server_folder.node_names(tmp_path) == {"11": "alice", "22": "bob"}
    assert (tmp_path / server_folder.NODES).stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [server_folder.NODES], "no staging file is left behind"


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_server_init_keeps_the_ca_key_out_of_the_server_folder(tmp_path):
    folder = tmp_path / "srv"
    result = CliRunner().invoke(app, ["server", "init", str(folder), "--port", "9"])
    assert result.exit_code == 0, result.output
    ca_dir = tmp_path / "srv-ca"
    assert f"CA key in {ca_dir / 'ca.key'}: move that folder offline" in result.stdout
    assert not (folder / "ca.key").exists() and (ca_dir / "ca.key").is_file()
    assert (folder / "ca.crt").read_bytes() == (ca_dir / "ca.crt").read_bytes()
    assert mode(folder) == mode(ca_dir) == 0o700
    assert mode(ca_dir / "ca.key") == mode(folder / "server.key") == 0o600


def test_only_the_fleet_proxy_listens_on_the_public_address(tmp_path):
    """Whatever ``--bind`` says, the SuperLink (and its unauthenticated Control API) listens on loopback."""
    folder = tmp_path / "srv"
    settings = server_folder.init_server(folder, ["robots.example.org"], "0.0.0.0", 9092)
    assert settings.control_port == 9093 and server_folder.control_address(settings) == "127.0.0.1:9093"
    superlink = commands.superlink_command(folder, insecure=False)
    assert superlink[superlink.index("--host") + 1:superlink.index("--port") + 2] == ["127.0.0.1", "--port", "9093"]
    proxy = commands.fleet_proxy_command(folder, insecure=False)
    assert proxy[proxy.index("--host") + 1:proxy.index("--port") + 2] == ["0.0.0.0", "--port", "9092"]
    assert proxy[proxy.index("--upstream") + 1] == "https://127.0.0.1:9093"
    assert 'address = "127.0.0.1:9093"' in (folder / "flwr" / "config.toml").read_text()
    same = CliRunner().invoke(app, ["server", "init", str(tmp_path / "b"), "--port", "7", "--control-port", "7"])
    assert same.exit_code == 1 and "is the Fleet port too" in same.stderr


def test_server_init_refuses_a_ca_dir_inside_the_server_folder(tmp_path):
    result = CliRunner().invoke(app, ["server", "init", str(tmp_path / "srv"), "--ca-dir", str(tmp_path / "srv" / "ca")])
    assert result.exit_code == 1 and "is inside the server folder" in result.stderr
    assert not (tmp_path / "srv" / "server.json").exists()


def test_server_start_refuses_a_folder_holding_the_ca_key(tmp_path):
    folder = tmp_path / "srv"
    server_folder.init_server(folder, [], "127.0.0.1", processes.free_port(), control_port=processes.free_port())
    (tmp_path / "srv-ca" / "ca.key").rename(folder / "ca.key")  # as folders made before the CA moved out
    result = CliRunner().invoke(app, ["server", "start", "-d", str(folder)])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "ca.key is in the SuperLink's folder" in result.stderr and "srv-ca/" in result.stderr
    assert processes.running_pid(folder, "superlink") is None


def test_processes_zk0_starts_create_owner_only_files(tmp_path):
    folder = tmp_path / "proc"
    folder.mkdir()
    script = "open('made-by-child', 'w').write('x')"
    processes.start(folder, "child", [sys.executable, "-c", script], {"PATH": "/usr/bin:/bin"})
    made = wait_for(lambda: (folder / "made-by-child").exists() and folder / "made-by-child", "the child's file")
    assert mode(made) == 0o600


def group_members(group: int) -> list[int]:
    """PIDs in process group ``group`` (processes that exit while we look are skipped)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[2] == str(group):
                members.append(int(stat.parent.name))
        except OSError:
            continue
    return members


def test_a_dead_leaders_orphans_are_refused_then_stopped(tmp_path):
    """A SuperLink killed with SIGKILL leaves its children (ServerApps) in its process group."""
    folder = tmp_path / "srv"
    server_folder.init_server(folder, [], "127.0.0.1", processes.free_port(), control_port=processes.free_port())
    child = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); " \
            "time.sleep(600)"
    leader = processes.start(folder, "superlink", [sys.executable, "-c", child], {"PATH": "/usr/bin:/bin"})
    wait_for(lambda: len(group_members(leader)) >= 2, "the leader's child to start")
    os.kill(leader, signal.SIGKILL)
    processes._group_alive(leader)  # reap the leader (our child in this test)
    assert processes.running_pid(folder, "superlink") is None and processes.orphaned_group(folder, "superlink") == leader
    refused = CliRunner().invoke(app, ["server", "start", "-d", str(folder)])
    assert refused.exit_code == 1 and f"process group {leader}" in refused.stderr
    assert processes.stop(folder, "superlink", timeout=deadline())
    assert not processes._group_alive(leader) and processes.orphaned_group(folder, "superlink") is None


def test_serverapps_of_this_superlink_are_found_by_their_control_port_and_stopped(tmp_path):
    """Flower's SuperExec runs in a session of its own, outside the SuperLink's process group."""
    settings = server_folder.init_server(tmp_path / "srv", [], "127.0.0.1", processes.free_port(),
                                         control_port=processes.free_port())
    fake = tmp_path / "flwr-serverapp"
    fake.write_text("import time\ntime.sleep(600)\n")
    address = server_folder.control_address(settings)
    ours = subprocess.Popen([sys.executable, str(fake), "--runtime-api-address", address])
    other = subprocess.Popen([sys.executable, str(fake), "--runtime-api-address", "127.0.0.1:1"])
    try:
        wait_for(lambda: server_folder.serverapp_processes(settings) == [ours.pid], "our fake ServerApp to be found")
        assert server_folder.stop_serverapps(settings) == [ours.pid]
        assert ours.wait(timeout=deadline()) == -signal.SIGTERM and other.poll() is None
    finally:
        ours.kill()
        other.kill()
