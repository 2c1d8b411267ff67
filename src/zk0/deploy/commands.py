"""The command lines of the processes a deployment runs: Flower's SuperLink and SuperNode, zk0's Fleet
proxy, supervisor and resident worker, and the environment they run in."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from zk0.deploy.server_folder import control_address, server_settings
from zk0.deploy.supernode import LOST

BIN = Path(sys.executable).parent


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment of Flower processes: our venv first (SuperLink spawns Flower executables from PATH),
    Flower's home in the zk0 folder, no telemetry, no dependency installs."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def superlink_command(folder: Path, insecure: bool) -> list[str]:
    """``flower-superlink`` on loopback only, with TLS, SuperNode authentication, a state database and no
    dependency installs."""
    settings = server_settings(folder)
    cmd = [str(BIN / "flower-superlink"), "--isolation", "subprocess", "--host", "127.0.0.1",
           "--port", str(settings.control_port), "--database", str(folder / "state.db"),
           "--disable-runtime-dependency-installation"]
    if insecure:  # Flower refuses node authentication without TLS
        return [*cmd, "--insecure"]
    return [*cmd, "--ssl-ca-certfile", str(folder / "ca.crt"), "--ssl-certfile", str(folder / "server.crt"),
            "--ssl-keyfile", str(folder / "server.key"), "--enable-supernode-auth"]


def fleet_proxy_command(folder: Path, insecure: bool) -> list[str]:
    """:mod:`zk0.deploy.fleet_proxy` on the public ``bind:port``, serving the SuperLink's certificate and checking the
    loopback SuperLink's against the CA."""
    settings = server_settings(folder)
    scheme = "http" if insecure else "https"
    cmd = [sys.executable, "-m", "zk0.deploy.fleet_proxy", "--host", settings.bind, "--port", str(settings.port),
           "--upstream", f"{scheme}://{control_address(settings)}"]
    if insecure:
        return cmd
    return [*cmd, "--certfile", str(folder / "server.crt"), "--keyfile", str(folder / "server.key"),
            "--cafile", str(folder / "ca.crt")]


def supernode_command(server: str, dataset: str, ca: Path | None, key: Path | None, appio_port: int,
                      resident_secret: Path | None, cameras: str = "") -> list[str]:
    """``flower-supernode`` for one dataset, which reaches the ClientApp as node config ``dataset`` and ``cameras``
    (dataset camera -> policy camera, as :func:`zk0.registry.format_camera_map` writes it).

    Flower parses ``--node-config`` as space-separated TOML ``key=value`` pairs: values are quoted as
    JSON strings, which are TOML strings too.

    With ``resident_secret`` it leaves ClientApps to the zk0 worker (``--isolation process``)
    and hands tasks only to a caller that proves it holds that secret.

    It runs as :mod:`zk0.deploy.supernode` under :mod:`zk0.deploy.supervise`: a SuperNode whose connection ends
    after it joined is started again (it rejoins); one the SuperLink refuses is not.
    """
    node_config = f"dataset={json.dumps(dataset)} cameras={json.dumps(cameras)}"
    cmd = [sys.executable, "-m", "zk0.deploy.supervise", "--restart-on", str(LOST), "--", sys.executable, "-m",
           "zk0.deploy.supernode", "--superlink", server, "--node-config", node_config,
           "--host", "127.0.0.1", "--port", str(appio_port)]
    if resident_secret:
        cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(resident_secret)]
    if ca is None:
        return [*cmd, "--insecure"]
    cmd += ["--root-certificates", str(ca)]
    return [*cmd, "--auth-supernode-private-key", str(key)] if key else cmd


def resident_command(appio_port: int, supernode_pid: int, secret: Path) -> list[str]:
    """The long-lived zk0 ClientApp worker serving the SuperNode's runtime API on loopback, under
    :mod:`zk0.deploy.supervise`, which restarts it if it dies while the SuperNode lives."""
    worker = [sys.executable, "-m", "zk0.deploy.resident", "--appio-api-address", f"127.0.0.1:{appio_port}",
              "--insecure",
              "--parent-pid", str(supernode_pid), "--superexec-auth-secret-file", str(secret)]
    return [sys.executable, "-m", "zk0.deploy.supervise", "--parent-pid", str(supernode_pid), "--", *worker]
