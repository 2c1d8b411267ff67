"""The server operator's folder (``zk0 server init DIR``), owner-only (0700)::

    ca.crt                    the federation's CA certificate (public: robot owners get it)
    server.crt  server.key    the SuperLink's TLS certificate, SANs = the hosts given at init
    server.json               bind address, Fleet port, loopback Control port and hosts chosen at init
    flwr/config.toml          FLWR_HOME of the operator's ``flwr`` CLI: connection ``zk0``
    state.db                  SuperLink state (registered nodes, runs), kept across restarts
    nodes.json                names given to nodes at ``zk0 server add-node``, by node id
    runs/                     run folders (``output-dir`` of ``zk0 run``)
    pids/  logs/              PID files and logs of the processes zk0 started

The CA's private key goes to a separate folder (``DIR-ca/ca.key`` unless ``--ca-dir`` says
otherwise) for the operator to keep offline: anything running in the SuperLink's folder (a
submitted ServerApp) could otherwise read it and mint server certificates. ``zk0 server start``
refuses a server folder that holds a ``ca.key``.

Only the Fleet API faces the network. The SuperLink (Fleet, Control and Runtime APIs on one
port in Flower 1.42, with no user authentication on Control) listens on ``127.0.0.1:control_port``,
where the operator's ``flwr`` and the ServerApps reach it; :mod:`zk0.deploy.fleet_proxy` listens on
``bind:port`` and forwards only the Fleet paths SuperNodes call.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from zk0.deploy.pki import make_ca, make_server_cert, write_cert, write_key, write_private
from zk0.deploy.processes import DeployError, accepts, alive, running_pid

CONNECTION = "zk0"

NODES = "nodes.json"


@dataclass(frozen=True)
class ServerSettings:
    """What ``zk0 server init`` decided: where nodes dial (``bind:port``, the Fleet proxy), where the
    SuperLink itself listens (``127.0.0.1:control_port``), and the names its certificate carries."""

    bind: str
    port: int
    control_port: int
    hosts: list[str]


def default_ca_dir(folder: Path) -> Path:
    """Where ``zk0 server init`` puts the CA key unless told otherwise: beside the server folder, not in it."""
    return folder.with_name(f"{folder.name}-ca")


def init_server(folder: Path, hosts: list[str], bind: str, port: int, ca_dir: Path | None = None,
                control_port: int | None = None) -> ServerSettings:
    """Create the CA (its key in ``ca_dir``, outside the server folder), the SuperLink certificate and the
    operator's Flower connection ``zk0`` (loopback, ``control_port``: default ``port + 1``), in an
    owner-only server folder."""
    ca_dir = (ca_dir or default_ca_dir(folder)).resolve()
    control_port = port + 1 if control_port is None else control_port
    if control_port == port:
        raise DeployError(f"--control-port {control_port} is the Fleet port too; choose another (default: port + 1)")
    if (folder / "server.json").exists():
        raise DeployError(f"{folder} is already a zk0 server folder; use another folder or remove it first")
    if ca_dir == folder.resolve() or folder.resolve() in ca_dir.parents:
        raise DeployError(f"--ca-dir {ca_dir} is inside the server folder; the CA key must live apart from it")
    if (ca_dir / "ca.key").exists():
        raise DeployError(f"{ca_dir / 'ca.key'} exists; choose another --ca-dir or remove it first")
    names = list(dict.fromkeys([*hosts, "127.0.0.1", "localhost"]))  # the operator's own CLI dials loopback
    for path in (folder, ca_dir):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.chmod(0o700)
    ca_key, ca_cert = make_ca()
    key, cert = make_server_cert(ca_key, ca_cert, names)
    write_key(ca_dir / "ca.key", ca_key, serialization.PrivateFormat.PKCS8)
    write_cert(ca_dir / "ca.crt", ca_cert)
    write_cert(folder / "ca.crt", ca_cert)
    write_key(folder / "server.key", key, serialization.PrivateFormat.PKCS8)
    write_cert(folder / "server.crt", cert)
    settings = ServerSettings(bind=bind, port=port, control_port=control_port, hosts=names)
    (folder / "server.json").write_text(json.dumps(asdict(settings), indent=2) + "\n")
    write_connection(folder / "flwr", control_address(settings), folder / "ca.crt")
    return settings


def server_settings(folder: Path) -> ServerSettings:
    path = folder / "server.json"
    if not path.is_file():
        raise DeployError(f"{folder} is not a zk0 server folder (no server.json); run `zk0 server init {folder}`")
    try:
        return ServerSettings(**json.loads(path.read_text()))
    except TypeError:
        raise DeployError(f"{path} was written by an older zk0 (no control_port); run `zk0 server init` in a new "
                          f"folder and register the nodes again") from None


def control_address(settings: ServerSettings) -> str:
    """Where the SuperLink listens, for the operator's ``flwr`` and nothing else: loopback only."""
    return f"127.0.0.1:{settings.control_port}"


def require_no_ca_key(folder: Path) -> None:
    """Refuse a server folder that holds the CA's private key (folders made before the CA moved out)."""
    if (folder / "ca.key").exists():
        raise DeployError(f"{folder / 'ca.key'} is in the SuperLink's folder, where a ServerApp can read it: move it "
                          f"to {default_ca_dir(folder)}/ and keep it offline, then start again")


def local_host(settings: ServerSettings) -> str:
    """The address this machine dials to reach its own Fleet proxy (one bound to all interfaces answers on loopback)."""
    return "127.0.0.1" if settings.bind == "0.0.0.0" else settings.bind


def require_superlink(folder: Path) -> ServerSettings:
    """The folder's settings once its SuperLink runs and accepts connections; else one line on how to start it.

    Asked first, because ``flwr run`` against a stopped SuperLink retries for minutes before a traceback.
    """
    settings = server_settings(folder)
    address = control_address(settings)
    listening = accepts("127.0.0.1", settings.control_port)
    if listening and running_pid(folder, "superlink") is not None:
        return settings
    why = (f"{address} is taken by a process not started from this folder" if listening
           else f"nothing listens on {address}")
    raise DeployError(f"no SuperLink is running from {folder} ({why}): start it with `zk0 server start -d {folder}`")


def node_names(folder: Path) -> dict[str, str]:
    """Names given at ``zk0 server add-node``, by node id: Flower 1.42 stores them but its ``flwr supernode ls``
    never shows them."""
    path = folder / NODES
    return json.loads(path.read_text()) if path.is_file() else {}


def name_node(folder: Path, node_id: str, name: str) -> None:
    """Record ``name`` for ``node_id`` in ``nodes.json`` (private: it names the federation's robot owners)."""
    write_private(folder / NODES, (json.dumps(node_names(folder) | {node_id: name}, indent=2) + "\n").encode())


def write_connection(flwr_home: Path, address: str, ca: Path | None) -> None:
    """``$FLWR_HOME/config.toml`` with the default connection ``zk0`` (TLS unless ``ca`` is None)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{ca.resolve()}"' if ca else "insecure = true"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n{security}\n')


def serverapp_processes(settings: ServerSettings) -> list[int]:
    """PIDs of Flower's ServerApp processes (``flwr-serverapp``, ``flower-superexec``) serving this folder's
    SuperLink, found by their program and the loopback Control port they dial.

    The SuperLink starts its SuperExec in a session of its own, so they are not in its process group:
    after a SIGKILL of the SuperLink a running ServerApp lives on for a while (10-15 s measured).
    """
    address = control_address(settings).encode()
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        program = any(part.endswith((b"flwr-serverapp", b"flower-superexec")) for part in args[:2])
        if program and any(address in part for part in args):
            found.append(int(cmdline.parent.name))
    return found


def stop_serverapps(settings: ServerSettings, timeout: float = 30.0) -> list[int]:
    """SIGTERM (then SIGKILL after ``timeout``) the ServerApps :func:`serverapp_processes` finds; their PIDs."""
    pids = serverapp_processes(settings)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while (living := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in living:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids
