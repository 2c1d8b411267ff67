"""The ``zk0`` command line."""

from __future__ import annotations

import json
import random
import tomllib
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Federated SmolVLA training across private SO-100/SO-101 datasets (Flower + LeRobot).")

RunConfigOpt = Annotated[list[str] | None, typer.Option(
    "--run-config", "-c", help="Run-config overrides: 'key=value key2=value2' (TOML values; bare words are strings).")]


@app.callback()
def _root() -> None:
    """zk0: federated SmolVLA training (run `zk0 COMMAND --help`)."""


def parse_overrides(items: list[str] | None) -> dict:
    """``["num-server-rounds=5 strategy=fedavg"]`` -> ``{"num-server-rounds": 5, "strategy": "fedavg"}``."""
    import shlex

    out = {}
    for token in shlex.split(" ".join(items or [])):
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{token!r} is not key=value", param_hint="--run-config")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value  # a bare word: a string such as strategy=fedavg
    return out


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def preflight(overrides: dict, resume: Path | None, local_clients: bool) -> dict:
    """Check config, model and datasets in seconds, before Ray or a SuperLink is involved.

    Returns the run-config overrides to submit: ``overrides`` for a new run; for ``resume``,
    the run's own saved config plus ``resume-from`` (only run-independent keys may change).
    """
    from flwr.common.config import get_fused_config_from_dir

    from zk0.checkpoint import RESUME_FREE_KEYS, ResumeError, RunFolder
    from zk0.config import ConfigError, RunConfig
    from zk0.data import DatasetError, open_metadata
    from zk0.policy import ModelUnavailable, require_model
    from zk0.registry import RegistryError, default_pyproject, load_registry

    try:
        if resume is not None:
            run = RunFolder.existing(str(resume))
            if fixed := sorted(set(overrides) - set(RESUME_FREE_KEYS)):
                raise ResumeError(f"--resume continues with the run's own config; {', '.join(fixed)} cannot change")
            saved = json.loads((run.root / "config.json").read_text())["run-config"]
            overrides = saved | overrides | {"resume-from": str(run.root)}
        cfg = RunConfig.from_run_config(get_fused_config_from_dir(default_pyproject().parent, overrides))
        registry = load_registry(cfg.datasets)
        require_model(cfg.model_name)
        for entry in (*(registry.clients if local_clients else ()), *registry.server_eval):
            open_metadata(entry)  # reachable? (embedded ones are generated here, once, before clients start)
    except (ConfigError, RegistryError, DatasetError, ModelUnavailable, ResumeError) as err:
        _fail(err)
    return overrides


@app.command()
def simulate(
    run_config: RunConfigOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder that receives the run folder.")] = Path("outputs"),
    num_clients: Annotated[int | None, typer.Option(
        "--num-clients", "-n", help="Simulated SuperNodes (default: the clients of the registry profile).")] = None,
    resume: Annotated[Path | None, typer.Option(
        help="A run folder to continue from its last completed round, with its own config.")] = None,
) -> None:
    """Run a federated simulation on Flower's simulation engine (Ray), as `flwr run .` does."""
    from flwr.common.config import get_fused_config_from_dir

    from zk0.config import ConfigError, RunConfig
    from zk0.registry import RegistryError, default_pyproject, load_registry

    overrides = parse_overrides(run_config)
    if resume is None:
        overrides["output-dir"] = str(output.expanduser().resolve())
    app_dir = default_pyproject().parent
    fused = get_fused_config_from_dir(app_dir, preflight(overrides, resume, local_clients=True))
    cfg = RunConfig.from_run_config(fused)
    clients = load_registry(cfg.datasets).clients
    n = num_clients or len(clients)
    if n > len(clients):
        _fail(RegistryError(f"--num-clients {n} exceeds the {len(clients)} clients of profile {cfg.datasets!r}"))
    if n < max(cfg.min_train_nodes, cfg.min_evaluate_nodes):
        _fail(ConfigError(f"--num-clients {n} is below min-train-nodes={cfg.min_train_nodes} / min-evaluate-nodes="
                          f"{cfg.min_evaluate_nodes}: the server would wait for clients that never come"))
    before = set(Path(cfg.output_dir).glob("*")) if Path(cfg.output_dir).exists() else set()
    _run_simulation(app_dir, fused, n)
    created = sorted(set(Path(cfg.output_dir).glob("*")) - before)
    run_dir = Path(cfg.resume_from) if cfg.resume_from else (created[-1] if created else None)
    if run_dir is not None:
        typer.secho(f"run folder: {run_dir}", fg=typer.colors.GREEN)


def _run_simulation(app_dir: Path, run_config: dict, num_supernodes: int) -> None:
    """Flower's simulation runtime, as the SuperLink's simulation process invokes it for `flwr run`."""
    from flwr.app import Context, RecordDict
    from flwr.supercore.telemetry import EventType
    from flwr.simulation.run_simulation import _run_simulation as run

    context = Context(run_id=random.getrandbits(63), node_id=0, node_config={}, state=RecordDict(),
                      run_config=run_config)
    backend = {"init_args": {"include_dashboard": False, "_node_ip_address": "127.0.0.1"},
               "client_resources": {"num_cpus": 2, "num_gpus": 0.0}}
    run(num_supernodes=num_supernodes, server_app_attr="zk0.server_app:app", client_app_attr="zk0.client_app:app",
        backend_config=backend, app_dir=str(app_dir), server_app_context=context, is_app=True,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE)


@app.command()
def baseline(
    mode: Annotated[str, typer.Option(
        "--mode", "-m", help="centralized: every client's training episodes pooled; local: each client alone.")],
    run_config: RunConfigOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder that receives the run folder.")] = Path("outputs"),
    num_clients: Annotated[int | None, typer.Option(
        "--num-clients", "-n", help="The first N registry clients, as `zk0 simulate -n N` (default: all).")] = None,
) -> None:
    """Train a baseline from a federated run's config: same split, optimizer steps, seeds and evaluation."""
    from flwr.common.config import get_fused_config_from_dir

    from zk0.baseline import MODES, run_baseline
    from zk0.config import ConfigError, RunConfig
    from zk0.data import DatasetError
    from zk0.registry import RegistryError, default_pyproject

    if mode not in MODES:
        _fail(ConfigError(f"--mode must be one of {'|'.join(MODES)}, got {mode!r}"))
    overrides = parse_overrides(run_config) | {"output-dir": str(output.expanduser().resolve())}
    fused = get_fused_config_from_dir(default_pyproject().parent, preflight(overrides, None, local_clients=True))
    try:
        run_dir = run_baseline(RunConfig.from_run_config(fused), mode, num_clients)
    except (ConfigError, RegistryError, DatasetError) as err:
        _fail(err)
    typer.secho(f"run folder: {run_dir}", fg=typer.colors.GREEN)


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folders: federated runs and baselines.")],
    chart: Annotated[Path, typer.Option("--chart", help="Where the PNG chart goes.")] = Path("compare.png"),
) -> None:
    """One table (round 0 and final round) and one chart: FedProx, FedAvg, centralized and local runs."""
    from zk0.compare import CompareError, compare as compare_runs

    try:
        lines = compare_runs(run_dirs, chart)
    except CompareError as err:
        _fail(err)
    for line in lines:
        typer.echo(line)
    typer.secho(f"chart: {chart}", fg=typer.colors.GREEN)


def _register_subcommands() -> None:
    from zk0 import cli_data, cli_deploy

    app.add_typer(cli_data.data_app, name="data")
    app.command("eval")(cli_data.evaluate)
    app.add_typer(cli_deploy.server_app, name="server")
    app.add_typer(cli_deploy.client_app, name="client")
    app.command("run")(cli_deploy.submit)
    app.command("status")(cli_deploy.status)
    app.command("logs")(cli_deploy.logs)
    app.command("stop")(cli_deploy.stop_run)


_register_subcommands()


def main() -> None:
    """Entry point for ``python -m zk0``."""
    app()
