"""``zk0 server …``, ``zk0 client …``, ``zk0 run/status/logs/stop``: a federation on Flower's Deployment Engine.

The operator's commands act on a server folder (``--dir``, default ``./zk0-server``), a robot
owner's on a client folder (default ``./zk0-client``); see :mod:`zk0.deploy` for their layout.
Runs are submitted and watched through Flower's own ``flwr`` CLI with ``FLWR_HOME`` inside
the server folder.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Annotated

import typer

from zk0.cli.common import fail
from zk0.deploy import commands, node_folder, processes, server_folder
from zk0.registry import SCHEMES, DatasetEntry, RegistryError, format_camera_map, parse_camera_map

server_app = typer.Typer(no_args_is_help=True, help="Server operator: certificates, SuperLink, robot owners' keys.")
client_app = typer.Typer(no_args_is_help=True, help="Robot owner: node key and the SuperNode for one dataset.")

ServerDir = Annotated[Path, typer.Option("--dir", "-d", help="The server folder made by `zk0 server init`.")]
ClientDir = Annotated[Path, typer.Option("--dir", "-d", help="This node's folder (key, PID files, logs).")]
DEFAULT_SERVER, DEFAULT_CLIENT = Path("zk0-server"), Path("zk0-client")
FINISHED = "finished"
FLWR_TIMEOUT = 600.0  # a `flwr` call: `flwr --version` alone took 26 s on a loaded 2-core machine
UNKNOWN_RUN = "Run ID not found"  # Flower 1.42's reasons: a run id the SuperLink does not have,
KNOWN_KEY = "Public key already in use"  # a node key registered before
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # terminal colour codes Flower's logger always writes
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
    port: Annotated[int, typer.Option(help="The port robot owners dial: the Fleet API, and nothing else.")] = 9092,
    control_port: Annotated[int | None, typer.Option(
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
        processes.wait_listening(folder, "superlink", "127.0.0.1", settings.control_port, timeout=60)
        processes.start(folder, "fleet-proxy", commands.fleet_proxy_command(folder, insecure), env)
        processes.wait_listening(folder, "fleet-proxy", server_folder.local_host(settings), settings.port, timeout=60)
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
    if entry.scheme not in SCHEMES:
        fail(f"--dataset {dataset!r}: the scheme must be hf:, local: or embedded:")
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
            processes.wait_listening(folder, "supernode", "127.0.0.1", appio, timeout=60)
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
    from zk0.data import DatasetError, describe_cameras, open_metadata, preflight
    from zk0.policy import ModelUnavailable, policy_config

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


# --- runs ----------------------------------------------------------------------------------


def submit(
    run_config: Annotated[list[str] | None, typer.Option(
        "--run-config", "-c", help="Run-config overrides: 'key=value …' (TOML values; bare words are strings).")] = None,
    resume: Annotated[Path | None, typer.Option(
        help="A run folder to continue from its last completed round, with its own config.")] = None,
    folder: ServerDir = DEFAULT_SERVER,
    detach: Annotated[bool, typer.Option("--detach", help="Submit and return; watch with `zk0 status`.")] = False,
) -> None:
    """Submit the zk0 app to the federation; follow its log and exit non-zero unless it completes."""
    from zk0.cli.common import check_setup, parse_overrides, settle_config

    folder = superlink(folder)
    overrides = parse_overrides(run_config)
    if resume is None:
        overrides.setdefault("output-dir", str(folder / "runs"))
    config, cfg = settle_config(overrides, resume)
    check_setup(cfg, None)
    config_file = folder / "logs" / f"run-config-{time.strftime('%Y%m%d-%H%M%S')}.toml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in config.items()))
    from zk0.registry import default_pyproject

    app_dir = str(default_pyproject().parent)
    reply = flwr(folder, "run", app_dir, server_folder.CONNECTION, "--run-config", str(config_file))
    run_id = int(reply["run-id"])
    typer.echo(f"run {run_id} submitted")
    if not detach:
        status = follow(folder, run_id)
        typer.echo(f"run {run_id}: {status}")
        if status != f"{FINISHED}:completed":
            raise typer.Exit(1)


def _toml(value: object) -> str:
    """A run-config scalar as TOML (JSON's strings and numbers are valid TOML)."""
    return ("true" if value else "false") if isinstance(value, bool) else json.dumps(value)


def run_status(folder: Path, run_id: int) -> str:
    """The run's status as Flower reports it (e.g. ``finished:completed``); an unknown run ends the command."""
    unknown = f"run {run_id} is not a run of the SuperLink in {folder}; `zk0 status -d {folder}` lists its runs"
    (row,) = flwr(folder, "ls", server_folder.CONNECTION, "--run-id", str(run_id), known={UNKNOWN_RUN: unknown})["runs"]
    return row["status"]


def follow(folder: Path, run_id: int, poll: float = 3.0) -> str:
    """Stream the run's log until the SuperLink reports it finished; its final status."""
    logs = subprocess.Popen([str(commands.BIN / "flwr"), "log", str(run_id), server_folder.CONNECTION, "--stream"],
                            env=commands.flower_env(folder / "flwr"))
    try:
        while not (status := run_status(folder, run_id)).startswith(FINISHED):
            time.sleep(poll)
        time.sleep(poll)  # let the last log lines arrive
    finally:
        logs.terminate()
        logs.wait(timeout=30)
    return status


def status(folder: ServerDir = DEFAULT_SERVER) -> None:
    """Runs (status, last round, bytes) and nodes (online/offline) of the federation."""
    from zk0.report import human_bytes

    folder = superlink(folder)
    progress = run_progress(folder / "runs")
    typer.echo("runs:")
    for run in flwr(folder, "ls", server_folder.CONNECTION)["runs"]:
        done = progress.get(int(run["run-id"]), {})
        rounds = f"round {done['round']}" if "round" in done else "no round yet"
        moved = f"sent {human_bytes(done.get('sent', 0))}, received {human_bytes(done.get('received', 0))}"
        typer.echo(f"  {run['run-id']}  {run['status']:<22} {rounds:<12} {moved}  {done.get('folder', '')}")
    typer.echo("nodes:")
    names = server_folder.node_names(folder)
    for node in flwr(folder, "supernode", "ls", server_folder.CONNECTION)["nodes"]:
        typer.echo(f"  {node['node-id']}  {node['status']:<10} {names.get(node['node-id'], '')}")


def run_progress(runs: Path) -> dict[int, dict]:
    """Per Flower run id: the run folder, its last completed round and the bytes moved so far."""
    from zk0.tracking import read_metrics

    out: dict[int, dict] = {}
    for ids in runs.glob("*/flower-runs.txt"):
        rounds = [r for r in read_metrics(ids.parent / "metrics.jsonl") if r.get("event") == "round"]
        summary = {"folder": str(ids.parent), "sent": sum(r["bytes-down"] for r in rounds),
                   "received": sum(r["bytes-up"] for r in rounds)}
        if rounds:
            summary["round"] = rounds[-1]["round"]
        for run_id in ids.read_text().split():
            out[int(run_id)] = summary
    return out


def logs(
    run_id: Annotated[int, typer.Argument(help="The run id (`zk0 status`).")],
    folder: ServerDir = DEFAULT_SERVER,
    follow_: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming new lines.")] = False,
) -> None:
    """Print a run's ServerApp log, without Flower's terminal colour codes (it is often piped to a file)."""
    folder = superlink(folder)
    proc = subprocess.Popen([str(commands.BIN / "flwr"), "log", str(run_id), server_folder.CONNECTION,
                             "--stream" if follow_ else "--show"], env=commands.flower_env(folder / "flwr"),
                            stdout=subprocess.PIPE, text=True, errors="replace")
    for line in proc.stdout:
        typer.echo(ANSI.sub("", line), nl=False)
    raise typer.Exit(proc.wait())


def stop_run(
    run_id: Annotated[int, typer.Argument(help="The run id (`zk0 status`).")],
    folder: ServerDir = DEFAULT_SERVER,
) -> None:
    """Stop a run; its run folder keeps everything up to the last completed round (resume with --resume).

    A run that already finished is left as it is, and says so: nothing is wrong.
    """
    folder = superlink(folder)
    if (state := run_status(folder, run_id)).startswith(FINISHED):
        typer.echo(f"run {run_id} already finished ({state})")
        return
    flwr(folder, "stop", str(run_id), server_folder.CONNECTION)
    typer.echo(f"run {run_id} stopped")
