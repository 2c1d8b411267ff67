"""``zk0 server …`` and ``zk0 client …``: a federation on Flower's Deployment Engine.

The operator's commands act on a server folder (``--dir``, default ``./zk0-server``), a robot
owner's on a client folder (default ``./zk0-client``); see :mod:`zk0.deploy` for their layout.
Runs are submitted and watched by :mod:`zk0.cli.runs`, through the same ``flwr`` helper.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Annotated

import typer

from zk0.cli.common import fail, require_dataset_found
from zk0.deploy import commands, node_folder, processes, server_folder
from zk0.registry import DatasetEntry, RegistryError, format_camera_map, parse_camera_map

server_app = typer.Typer(no_args_is_help=True, help="Server operator: certificates, SuperLink, robot owners' keys.")
client_app = typer.Typer(no_args_is_help=True, help="Robot owner: node key and the SuperNode for one dataset.")

ServerDir = Annotated[Path, typer.Option("--dir", "-d", help="The server folder made by `zk0 server init`.")]
ClientDir = Annotated[Path, typer.Option("--dir", "-d", help="This node's folder (key, PID files, logs).")]
DEFAULT_SERVER, DEFAULT_CLIENT = Path("zk0-server"), Path("zk0-client")
FLWR_TIMEOUT = 600.0  # a `flwr` call: `flwr --version` alone took 26 s on a loaded 2-core machine
LISTEN_TIMEOUT = 600.0  # a started process's port: a process that exits is reported at once, so only load waits
KNOWN_KEY = "Public key already in use"  # Flower 1.42's reason for a node key registered before
SERVER_PROCESSES = ("superlink", "fleet-proxy")  # started in this order, stopped in reverse


def superlink(folder: Path) -> Path:
    """The resolved server folder once its SuperLink answers: a stopped one is named in a second, in one line."""
    folder = folder.resolve()
    try:
        server_folder.require_superlink(folder)
    except processes.DeployError as err:
        fail(str(err))
    return folder


def flwr(folder: Path, *args: str, timeout: float = FLWR_TIMEOUT, known: dict[str, str] | None = None) -> dict:
    """Run ``flwr ARGS --format json`` against the server folder's connection; its JSON reply.

    A failure ends the command with Flower's reason (the last line of its message), or with the line
    ``known`` gives for a reason containing one of its keys; a ``flwr`` that does not answer within
    ``timeout`` ends it with one line too.
    """
    try:
        proc = subprocess.run([str(commands.BIN / "flwr"), *args, "--format", "json"],
                              env=commands.flower_env(folder / "flwr"), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        fail(f"flwr {args[0]} did not answer within {timeout:.0f}s (is the machine overloaded?); try again")
    try:
        reply = json.loads(proc.stdout[proc.stdout.find("{"):])
    except json.JSONDecodeError:
        reply = {"success": False, "error-message": proc.stderr or proc.stdout}
    if proc.returncode or not reply.get("success", False):
        lines = [line.strip() for line in str(reply.get("error-message", "")).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit code {proc.returncode}"
        default = f"flwr {' '.join(args)} failed: {reason}"
        fail(next((line for key, line in (known or {}).items() if key in reason), default))
    return reply


# --- server operator -------------------------------------------------------------------


@server_app.command("init")
def server_init(
    folder: Annotated[Path, typer.Argument(help="New folder for the CA, certificates, state and runs.")] = DEFAULT_SERVER,
    host: Annotated[list[str] | None, typer.Option(
        "--host", help="Name or IP robot owners dial (repeat for several); loopback is always added.")] = None,
    bind: Annotated[str, typer.Option(
        help="Address the Fleet proxy listens on (0.0.0.0: all interfaces); the SuperLink stays on 127.0.0.1.")]
        = "127.0.0.1",
    port: Annotated[int, typer.Option(
        min=1, max=65535, help="The port robot owners dial: the Fleet API, and nothing else.")] = 9092,
    control_port: Annotated[int | None, typer.Option(min=1, max=65535,
        help="The SuperLink's own port, on 127.0.0.1 only: the operator's Control API (default: port + 1).")] = None,
    ca_dir: Annotated[Path | None, typer.Option(
        help="Where the CA's private key goes (default: FOLDER-ca beside the server folder); keep it offline.")] = None,
) -> None:
    """Create the federation's CA, the SuperLink's TLS certificate and the `flwr` connection `zk0`."""
    folder = folder.resolve()
    ca_dir = (ca_dir or server_folder.default_ca_dir(folder)).resolve()
    try:
        settings = server_folder.init_server(folder, host or [], bind, port, ca_dir, control_port)
    except processes.DeployError as err:
        fail(str(err))
    typer.echo(f"server folder {folder}: certificate for {', '.join(settings.hosts)}; nodes will dial {bind}:{port} "
               f"(Fleet API only); the Control API stays on {server_folder.control_address(settings)}")
    typer.echo(f"CA key in {ca_dir / 'ca.key'}: move that folder offline (it only signs server certificates)")
    typer.echo(f"give robot owners {folder / 'ca.crt'}; next: zk0 server start -d {folder}")


@server_app.command("start")
def server_start(
    folder: ServerDir = DEFAULT_SERVER,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="No TLS and no node authentication: anyone who reaches the port can join. Tests only.")] = False,
) -> None:
    """Start `flower-superlink` on loopback (TLS, SuperNode authentication, a persistent state database) and
    the Fleet proxy that alone faces the network."""
    folder = folder.resolve()
    try:
        settings = server_folder.server_settings(folder)
        for name in SERVER_PROCESSES:
            if (running := processes.running_pid(folder, name)) is not None:
                fail(f"{name} already runs from {folder} (PID {running}); `zk0 server stop -d {folder}` first")
            if (group := processes.orphaned_group(folder, name)) is not None:
                fail(f"processes of a {name} that died still run (process group {group}, e.g. a ServerApp): "
                     f"`zk0 server stop -d {folder}` ends them")
        if leftover := server_folder.serverapp_processes(settings):
            fail(f"ServerApp processes of a SuperLink that died still run (PIDs {', '.join(map(str, leftover))}); "
                 f"they exit within seconds by themselves, or `zk0 server stop -d {folder}` ends them")
        server_folder.require_no_ca_key(folder)
        if insecure:
            typer.secho("warning: --insecure: traffic is unencrypted and any SuperNode may join", fg="yellow", err=True)
        ca = None if insecure else folder / "ca.crt"
        server_folder.write_connection(folder / "flwr", server_folder.control_address(settings), ca)
        pid = start_server_processes(folder, settings, insecure)
    except processes.DeployError as err:
        fail(str(err))
    typer.echo(f"SuperLink running (PID {pid}) on {server_folder.control_address(settings)} (Control API: this machine "
               f"only); nodes dial {settings.bind}:{settings.port} (Fleet API only); logs in {folder / 'logs'}")


def start_server_processes(folder: Path, settings: server_folder.ServerSettings, insecure: bool) -> int:
    """The SuperLink, then the Fleet proxy in front of it; the SuperLink's PID. Both or neither keep running."""
    env = commands.flower_env(folder / "flwr")
    pid = processes.start(folder, "superlink", commands.superlink_command(folder, insecure), env)
    try:
        processes.wait_listening(folder, "superlink", "127.0.0.1", settings.control_port, LISTEN_TIMEOUT)
        processes.start(folder, "fleet-proxy", commands.fleet_proxy_command(folder, insecure), env)
        processes.wait_listening(folder, "fleet-proxy", server_folder.local_host(settings), settings.port,
                                 LISTEN_TIMEOUT)
    except processes.DeployError:
        for name in reversed(SERVER_PROCESSES):
            processes.stop(folder, name)
        raise
    return pid


@server_app.command("add-node")
def server_add_node(
    public_key: Annotated[Path, typer.Argument(help="A robot owner's node_key.pub (from `zk0 client keygen`).")],
    folder: ServerDir = DEFAULT_SERVER,
    name: Annotated[str | None, typer.Option(help="A name for the node in `zk0 status`.")] = None,
) -> None:
    """Register a robot owner's public key: only registered SuperNodes may connect."""
    if not public_key.is_file():
        fail(f"public key file {public_key} not found; the robot owner gets it from `zk0 client keygen`")
    folder = superlink(folder)
    args = ["supernode", "register", str(public_key.resolve()), server_folder.CONNECTION]
    args += ["--name", name] if name else []
    again = f"{public_key} is already registered with this SuperLink; `zk0 status -d {folder}` lists its nodes"
    node_id = str(flwr(folder, *args, known={KNOWN_KEY: again})["node-id"])
    if name:
        server_folder.name_node(folder, node_id, name)
    typer.echo(f"registered node {node_id}" + (f" ({name})" if name else ""))


@server_app.command("stop")
def server_stop(folder: ServerDir = DEFAULT_SERVER) -> None:
    """Stop the Fleet proxy and the SuperLink started from this folder, and the ServerApps it runs."""
    folder = folder.resolve()
    stopped = [name for name in reversed(SERVER_PROCESSES) if processes.stop(folder, name)]
    try:
        if server_folder.stop_serverapps(server_folder.server_settings(folder)):
            stopped.append("ServerApp processes")
    except processes.DeployError as err:
        fail(str(err))
    typer.echo(f"stopped {', '.join(stopped)}" if stopped else "nothing was running from this folder")


# --- robot owner -------------------------------------------------------------------------


@client_app.command("keygen")
def client_keygen(folder: ClientDir = DEFAULT_CLIENT) -> None:
    """Write this node's key pair and print the public key to send to the server operator."""
    try:
        line = node_folder.keygen(folder.resolve())
    except processes.DeployError as err:
        fail(str(err))
    typer.echo(line)
    typer.echo(f"send {folder.resolve() / 'node_key.pub'} to the operator (`zk0 server add-node`); keep node_key",
               err=True)


@client_app.command("start")
def client_start(
    server: Annotated[str, typer.Option(help="The SuperLink as HOST:PORT.")],
    dataset: Annotated[str, typer.Option(help="This node's data: hf:user/name or local:/path (or embedded:task).")],
    camera: Annotated[list[str] | None, typer.Option(
        help="Feed a dataset camera to a policy camera: DATASET_KEY=POLICY_KEY, e.g. top=observation.image "
             "(short dataset names get observation.images.); repeat for several.")] = None,
    model: Annotated[str | None, typer.Option(
        help="The federation's base model (run-config model-name: tiny, smolvla-size, a hub id or a folder), "
             "to check the dataset against; default: the app's.")] = None,
    ca: Annotated[Path | None, typer.Option(help="The federation's ca.crt, from the operator.")] = None,
    key: Annotated[Path | None, typer.Option(help="This node's private key (default: DIR/node_key).")] = None,
    folder: ClientDir = DEFAULT_CLIENT,
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS, no key (only with an --insecure server).")] = False,
    resident: Annotated[bool, typer.Option(
        help="Keep one ClientApp process with the policy and data loaded across rounds.")] = True,
    wait: Annotated[float, typer.Option(
        help="Seconds to wait for the SuperLink to accept this node; then it stops and says why.")] = 120.0,
) -> None:
    """Start a SuperNode serving one dataset to the federation, once the dataset is checked against the policy."""
    folder = folder.resolve()
    if (running := processes.running_pid(folder, "supernode")) is not None:
        fail(f"a SuperNode already runs from {folder} (PID {running}); `zk0 client stop -d {folder}` first")
    try:
        entry = DatasetEntry(uri=dataset, cameras=parse_camera_map(camera or []))
    except RegistryError as err:
        fail(f"--camera: {err}")
    require_dataset_found(dataset, "--dataset")
    if insecure:
        typer.secho("warning: --insecure: traffic to the server is unencrypted and unauthenticated", fg="yellow",
                    err=True)
        ca = key = None
    else:
        key = (key or folder / "node_key").resolve()
        if ca is None or not ca.is_file():
            fail(f"--ca {ca}: the federation's ca.crt is required (ask the operator), or pass --insecure")
        if not key.is_file():
            fail(f"node key {key} not found; run `zk0 client keygen -d {folder}` and send node_key.pub to the operator")
        ca = ca.resolve()
    cameras = format_camera_map(check_node_data(entry, model))
    appio = processes.free_port()
    env = commands.flower_env(folder / "flwr")
    folder.mkdir(parents=True, exist_ok=True)
    secret = node_folder.runtime_secret(folder) if resident else None
    started: list[str] = []
    try:
        pid = processes.start(folder, "supernode",
                           commands.supernode_command(server, dataset, ca, key, appio, secret, cameras), env)
        started.append("supernode")
        if secret:
            processes.wait_listening(folder, "supernode", "127.0.0.1", appio, LISTEN_TIMEOUT)
            processes.start(folder, "clientapp", commands.resident_command(appio, pid, secret), env)
            started.append("clientapp")
        node_id = node_folder.wait_connected(folder, "supernode", wait)
        if node_id is None:
            raise processes.DeployError(f"not connected to {server} within {wait:.0f}s, stopped")
    except processes.DeployError as err:
        for name in reversed(started):  # only what this call started
            processes.stop(folder, name)
        fail(f"{err}\nwhy: {node_folder.why_not_connected(server, ca)}")
    typer.echo(f"SuperNode {node_id} (PID {pid}) serves {dataset} to {server}; logs in {folder / 'logs'}")


def check_node_data(entry: DatasetEntry, model: str | None) -> dict[str, str]:
    """The entry's camera renames, once its dataset passed every check training makes, in seconds.

    Run before any process starts: a node whose data cannot train (shapes, fps, no camera feeding
    the policy, a video that does not decode, under 2 episodes) would fail every round, and its
    owner would see it only in the server's log.
    """
    from zk0.cli.common import settle_config

    _, cfg = settle_config({"model-name": model} if model else {}, None)
    from zk0.model_source import ModelUnavailable, require_model

    try:
        require_model(cfg.model.model_name)  # in seconds: before torch and LeRobot import
    except ModelUnavailable as err:
        fail(str(err))
    from zk0.data import DatasetError, describe_cameras, open_metadata, preflight
    from zk0.policy import policy_config

    try:
        policy_cfg = policy_config(cfg)
        checked = preflight(entry, policy_cfg, training=True)
        meta = open_metadata(checked)
    except (DatasetError, ModelUnavailable) as err:
        fail(str(err))
    typer.echo(f"cameras (dataset -> policy): {describe_cameras(checked.cameras, meta, policy_cfg)}")
    return checked.cameras


@client_app.command("stop")
def client_stop(folder: ClientDir = DEFAULT_CLIENT) -> None:
    """Stop this folder's SuperNode and its resident ClientApp."""
    folder = folder.resolve()
    stopped = [name for name in ("clientapp", "supernode") if processes.stop(folder, name)]
    typer.echo(f"stopped {', '.join(stopped)}" if stopped else "nothing was running from this folder")
