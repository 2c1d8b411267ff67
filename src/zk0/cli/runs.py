"""``zk0 run/status/logs/stop``: submit the zk0 app to a federation and watch it, through Flower's ``flwr`` CLI
with ``FLWR_HOME`` inside the server folder."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Annotated

import typer

from zk0.cli.deploy import DEFAULT_SERVER, ServerDir, flwr, superlink
from zk0.deploy import commands, server_folder

FINISHED = "finished"
UNKNOWN_RUN = "Run ID not found"  # Flower 1.42's reason for a run id the SuperLink does not have
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # terminal colour codes Flower's logger always writes


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
