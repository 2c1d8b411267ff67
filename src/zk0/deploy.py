"""Deployment on Flower's Deployment Engine: certificates, node keys, SuperLink and SuperNode processes.

The server operator's folder (``zk0 server init DIR``), owner-only (0700)::

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
refuses a server folder that holds a ``ca.key``. Every process zk0 starts runs with umask 077,
so what it writes (``state.db``, logs, run folders) is the owner's alone.

A robot owner's folder (``zk0 client keygen DIR``) holds ``node_key`` / ``node_key.pub`` (an
ECDSA P-384 key pair in OpenSSH format, as Flower's SuperNode authentication expects) and
the ``pids/`` and ``logs/`` of the SuperNode it runs.

Only the Fleet API faces the network. The SuperLink (Fleet, Control and Runtime APIs on one
port in Flower 1.42, with no user authentication on Control) listens on ``127.0.0.1:control_port``,
where the operator's ``flwr`` and the ServerApps reach it; :mod:`zk0.fleet_proxy` listens on
``bind:port`` and forwards only the Fleet paths SuperNodes call.

Processes are started in their own session and found again only through their PID file,
checked against ``/proc/<pid>/cmdline``, never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from zk0.pki import make_ca, make_server_cert, write_cert, write_key, write_private
from zk0.supernode import LOST

CONNECTION = "zk0"
BIN = Path(sys.executable).parent
NODES = "nodes.json"


class DeployError(RuntimeError):
    """A deployment step that cannot go on; the message names the file or process and the fix."""


# --- node keys ---------------------------------------------------------------------------


def keygen(folder: Path) -> str:
    """Write a SuperNode key pair into ``folder``; return the public key line to send to the operator."""
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / "node_key", folder / "node_key.pub"
    if private.exists():
        raise DeployError(f"{private} exists; keep using it (its public key is in {public}) or choose another folder")
    key = ec.generate_private_key(ec.SECP384R1())
    write_key(private, key, serialization.PrivateFormat.OpenSSH)
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    public.write_text(f"{line} zk0-node\n")
    return public.read_text().strip()


# --- the server operator's folder -------------------------------------------------------


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
    """:mod:`zk0.fleet_proxy` on the public ``bind:port``, serving the SuperLink's certificate and checking the
    loopback SuperLink's against the CA."""
    settings = server_settings(folder)
    scheme = "http" if insecure else "https"
    cmd = [sys.executable, "-m", "zk0.fleet_proxy", "--host", settings.bind, "--port", str(settings.port),
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

    It runs as :mod:`zk0.supernode` under :mod:`zk0.supervise`: a SuperNode whose connection ends
    after it joined is started again (it rejoins); one the SuperLink refuses is not.
    """
    node_config = f"dataset={json.dumps(dataset)} cameras={json.dumps(cameras)}"
    cmd = [sys.executable, "-m", "zk0.supervise", "--restart-on", str(LOST), "--", sys.executable, "-m",
           "zk0.supernode", "--superlink", server, "--node-config", node_config,
           "--host", "127.0.0.1", "--port", str(appio_port)]
    if resident_secret:
        cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(resident_secret)]
    if ca is None:
        return [*cmd, "--insecure"]
    cmd += ["--root-certificates", str(ca)]
    return [*cmd, "--auth-supernode-private-key", str(key)] if key else cmd


def resident_command(appio_port: int, supernode_pid: int, secret: Path) -> list[str]:
    """The long-lived zk0 ClientApp worker serving the SuperNode's runtime API on loopback, under
    :mod:`zk0.supervise`, which restarts it if it dies while the SuperNode lives."""
    worker = [sys.executable, "-m", "zk0.resident", "--appio-api-address", f"127.0.0.1:{appio_port}", "--insecure",
              "--parent-pid", str(supernode_pid), "--superexec-auth-secret-file", str(secret)]
    return [sys.executable, "-m", "zk0.supervise", "--parent-pid", str(supernode_pid), "--", *worker]


def runtime_secret(folder: Path) -> Path:
    """A fresh random secret (mode 600) shared by a SuperNode and its worker, so no other local
    process can take the node's tasks from its loopback runtime API."""
    path = folder / "runtime.secret"
    write_private(path, os.urandom(32))
    return path


# --- processes ---------------------------------------------------------------------------


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment of Flower processes: our venv first (SuperLink spawns Flower executables from PATH),
    Flower's home in the zk0 folder, no telemetry, no dependency installs."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def start(folder: Path, name: str, cmd: list[str], env: dict[str, str]) -> int:
    """Start ``cmd`` detached in its own session, logging to ``logs/<name>.log``; record ``pids/<name>.pid``."""
    if (pid := running_pid(folder, name)) is not None:
        raise DeployError(f"{name} already runs with PID {pid} (from {folder / 'pids' / name}.pid); "
                          f"stop it first")
    (folder / "pids").mkdir(parents=True, exist_ok=True)
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    log_path = folder / "logs" / f"{name}.log"
    offset = log_path.stat().st_size if log_path.exists() else 0  # this launch's lines start here
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, umask=0o077)
    program = cmd[2] if len(cmd) > 2 and cmd[1] == "-m" else Path(cmd[0]).name  # python -m zk0.resident
    record = {"pid": proc.pid, "program": program, "started": _start_time(proc.pid), "log-offset": offset}
    (folder / "pids" / f"{name}.pid").write_text(json.dumps(record) + "\n")
    deadline = time.monotonic() + 10
    while running_pid(folder, name) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # until the child has exec'd the program its PID file names
    return proc.pid


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot: a reused PID has another one."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _record(folder: Path, name: str) -> dict | None:
    path = folder / "pids" / f"{name}.pid"
    return json.loads(path.read_text()) if path.is_file() else None


def running_pid(folder: Path, name: str) -> int | None:
    """The PID recorded for ``name`` if that very process (same start time) still runs its program."""
    if (record := _record(folder, name)) is None:
        return None
    try:
        cmdline = Path(f"/proc/{record['pid']}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    same = _start_time(record["pid"]) == record["started"] and any(record["program"].encode() in part
                                                                    for part in cmdline)
    return record["pid"] if same else None


def stop(folder: Path, name: str, timeout: float = 30.0) -> bool:
    """SIGTERM the process group of ``name`` (SIGKILL after ``timeout``); False if nothing of it was running.

    The group goes too when its leader is already dead: a SuperLink killed with SIGKILL leaves its
    ``flwr-serverapp`` children running, orphaned, in the group it started.
    """
    pid = running_pid(folder, name)
    group = pid if pid is not None else orphaned_group(folder, name)
    (folder / "pids" / f"{name}.pid").unlink(missing_ok=True)
    if group is None:
        return False
    _signal_group(group, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_alive(group):
        _signal_group(group, signal.SIGKILL)
    return True


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
    while (alive := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def orphaned_group(folder: Path, name: str) -> int | None:
    """The process group ``name`` was started in, when its leader is gone but some of the group still runs."""
    record = _record(folder, name)
    if record is None or running_pid(folder, name) is not None or not _group_alive(record["pid"]):
        return None
    return record["pid"]


def _group_alive(group: int) -> bool:
    """Whether any process of the group still runs (zombies aside)."""
    try:
        os.waitpid(group, os.WNOHANG)  # reap the leader if it is our child
    except ChildProcessError:
        pass
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return False


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # started with start_new_session: its group id is its PID
    except ProcessLookupError:
        pass


def wait_listening(folder: Path, name: str, host: str, port: int, timeout: float) -> None:
    """Wait until ``host:port`` accepts connections; fail with the log's tail if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running_pid(folder, name) is None:
            raise _exited(folder, name)
        if accepts(host, port):
            return
        time.sleep(0.3)
    raise DeployError(f"{name} did not listen on {host}:{port} within {timeout:.0f}s; see {folder / 'logs' / name}.log")


def accepts(host: str, port: int, timeout: float = 5.0) -> bool:
    """Whether ``host:port`` accepts a TCP connection now."""
    with socket.socket() as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


def wait_connected(folder: Path, name: str, timeout: float) -> str | None:
    """The node id once the SuperNode ``name`` is accepted by the SuperLink; None if still trying.

    A SuperNode that was refused (unregistered key, untrusted certificate) exits: that becomes
    a :class:`DeployError` with the reason from its log.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if match := re.search(r"SuperNode ID: (\d+)", _this_launch_log(folder, name)):
            return match.group(1)
        if running_pid(folder, name) is None:
            raise _exited(folder, name)
        time.sleep(0.3)
    return None


def why_not_connected(server: str, ca: Path | None) -> str:
    """Why a SuperNode dialling ``server`` (TLS checked against ``ca``, or plain when None) is not accepted,
    found by dialling it the same way: no listener, a TLS mismatch either way, a certificate from
    another CA or for another name, or, when all of that is fine, an unregistered key."""
    host, _, port = server.rpartition(":")
    host = host.strip("[]")
    try:
        sock = socket.create_connection((host, int(port)), timeout=10)
    except (OSError, ValueError) as err:
        return (f"nothing accepts connections at {server} ({getattr(err, 'strerror', None) or err}): is the server "
                f"up, the address right and its port open?")
    with sock:
        if ca is None:
            return _plain_answer(sock, server)
        context = ssl.create_default_context(cafile=str(ca))
        try:
            with context.wrap_socket(sock, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as err:
            if err.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
                return (f"the server's certificate does not name {host}: dial a name the operator gave "
                        f"`zk0 server init --host`, or ask them to add {host}")
            return f"the server's certificate is not signed by {ca} ({err.verify_message}): get the federation's ca.crt"
        except (ssl.SSLError, OSError):
            return f"{server} does not speak TLS (a server started with --insecure?): ask the operator which it is"
    return (f"TLS to {server} works but the SuperLink has not accepted this node: is its key registered "
            f"(`zk0 server add-node`)?")


def _plain_answer(sock: socket.socket, server: str) -> str:
    """What an --insecure node learns from a plain HTTP request: a TLS server answers no HTTP."""
    sock.settimeout(10)
    try:
        sock.sendall(b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: zk0\r\nContent-Length: 0\r\n\r\n")
        answer = sock.recv(64)
    except OSError:
        answer = b""
    if not answer.startswith(b"HTTP/"):
        return f"{server} speaks TLS: start with --ca ca.crt (from the operator) instead of --insecure"
    return f"{server} answers plain HTTP but has not accepted this node; see the SuperNode's log"


def _exited(folder: Path, name: str) -> DeployError:
    """The error for a process that exited: the reasons its log gives (Flower's own error lines)."""
    lines = _this_launch_log(folder, name).splitlines()
    reasons = [line for line in lines if re.search(r"ERROR|Error|Failed|SSL|code: ", line)] or lines[-10:]
    log = folder / "logs" / f"{name}.log"
    return DeployError(f"{name} was refused or failed (log {log}):\n" + "\n".join(reasons[-6:]))


def _this_launch_log(folder: Path, name: str) -> str:
    """The log lines of the latest launch only (logs are appended across restarts)."""
    log = folder / "logs" / f"{name}.log"
    if not log.exists():
        return ""
    record = _record(folder, name) or {}
    with log.open("rb") as f:
        f.seek(record.get("log-offset", 0))
        return f.read().decode(errors="replace")


def free_port() -> int:
    """A free loopback port (for a SuperNode's local runtime API)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
