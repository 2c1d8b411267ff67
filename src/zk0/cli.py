"""The ``zk0`` command line."""

from __future__ import annotations

import json
import random
import tomllib
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from zk0.config import BASELINE_MODES, RESUME_FREE_KEYS, ConfigError, RunConfig

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


def _fail(err: Exception) -> NoReturn:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def settle_config(overrides: dict, resume: Path | None) -> tuple[dict, RunConfig]:
    """The overrides to submit and the run config they make, checked in a second (no torch, no Ray).

    For ``resume`` the overrides are the run's own saved config plus ``resume-from`` (only
    run-independent keys may change). A relative ``registry`` path is made absolute, since the
    apps that read it do not run in this folder.
    """
    from flwr.common.config import get_fused_config_from_dir

    from zk0.registry import default_pyproject

    overrides = dict(overrides)
    try:
        if resume is not None:
            if fixed := sorted(set(overrides) - set(RESUME_FREE_KEYS)):
                raise ConfigError(f"--resume continues with the run's own config; {', '.join(fixed)} cannot change")
            overrides = _saved_run_config(resume) | overrides | {"resume-from": str(resume.expanduser().resolve())}
        if isinstance(overrides.get("registry"), str) and overrides["registry"]:
            overrides["registry"] = str(Path(overrides["registry"]).expanduser().resolve())
        defaults = get_fused_config_from_dir(default_pyproject().parent, {})
        cfg = RunConfig.from_run_config(defaults | overrides)
    except ConfigError as err:
        _fail(err)
    return overrides, cfg


def _saved_run_config(run_dir: Path) -> dict:
    """The run config a run folder was started with (its ``config.json``)."""
    path = run_dir.expanduser().resolve() / "config.json"
    try:
        return json.loads(path.read_text())["run-config"]
    except (OSError, ValueError, KeyError):
        raise ConfigError(f"--resume {run_dir}: no readable config.json there; pass a run folder made by zk0") from None


def check_setup(cfg: RunConfig, clients: int | None) -> None:
    """Model, registry and datasets, in seconds, before Ray or a SuperLink is involved.

    ``clients``: how many of the registry's client datasets run on this machine (simulation,
    baselines); their data is opened, checked against the policy and sample frames decoded.
    Deployment (``None``) checks only the server's evaluation sets: clients check their own.
    """
    from zk0.registry import RegistryError, load_registry

    try:
        registry = load_registry(cfg.datasets, cfg.registry)
        if clients is not None and clients > len(registry.clients):
            raise RegistryError(f"--num-clients {clients} exceeds the {len(registry.clients)} clients of profile "
                                f"{cfg.datasets!r}")
    except RegistryError as err:
        _fail(err)
    from zk0.checkpoint import ResumeError, RunFolder
    from zk0.data import DatasetError, preflight
    from zk0.policy import ModelUnavailable, policy_config

    try:
        if cfg.resume_from:
            RunFolder.existing(cfg.resume_from)
        require_cuda(cfg, clients_here=clients is not None)
        policy_cfg = policy_config(cfg)
        for entry in registry.clients[:clients or 0]:
            preflight(entry, policy_cfg, training=True)  # embedded ones are recorded here, once, before clients start
        for entry in registry.server_eval:
            preflight(entry, policy_cfg, training=False)
    except (DatasetError, ModelUnavailable, ResumeError) as err:
        _fail(err)


def require_cuda(cfg: RunConfig, clients_here: bool) -> None:
    """``cuda`` where this machine runs it (the server; clients too in simulation) needs a visible GPU."""
    import torch

    wanted = [("server-device", cfg.server_device)] + ([("device", cfg.device)] if clients_here else [])
    for key, value in wanted:
        if value == "cuda" and not torch.cuda.is_available():
            _fail(ConfigError(f"run-config {key}='cuda' but no CUDA GPU is visible here; use 'auto' or 'cpu'"))


def registry_clients(cfg: RunConfig) -> int:
    """How many clients the run config's registry profile lists."""
    from zk0.registry import RegistryError, load_registry

    try:
        return len(load_registry(cfg.datasets, cfg.registry).clients)
    except RegistryError as err:
        _fail(err)


@app.command()
def simulate(
    run_config: RunConfigOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder that receives the run folder.")] = Path("outputs"),
    num_clients: Annotated[int | None, typer.Option(
        "--num-clients", "-n", help="Simulated SuperNodes (default: the clients of the registry profile).")] = None,
    resume: Annotated[Path | None, typer.Option(
        help="A run folder to continue from its last completed round, with its own config.")] = None,
    client_cpus: Annotated[float, typer.Option(
        help="CPU cores each simulated client reserves (clients that fit run in parallel).")] = 2.0,
    client_gpus: Annotated[float | None, typer.Option(
        help="GPU share of each client, e.g. 0.25: four clients share one GPU (default: 1/clients with a "
             "CUDA GPU and device auto|cuda, else 0).")] = None,
) -> None:
    """Run a federated simulation on Flower's simulation engine (Ray), as `flwr run .` does."""
    overrides = parse_overrides(run_config)
    if resume is None:
        overrides["output-dir"] = str(output.expanduser().resolve())
    overrides, cfg = settle_config(overrides, resume)
    n = num_clients or registry_clients(cfg)
    if n < max(cfg.min_train_nodes, cfg.min_evaluate_nodes, cfg.min_stats_clients, 1):
        _fail(ConfigError(f"--num-clients {n} is below min-train-nodes={cfg.min_train_nodes} / min-evaluate-nodes="
                          f"{cfg.min_evaluate_nodes} / min-stats-clients={cfg.min_stats_clients}: the server would "
                          f"wait for clients that never come"))
    if client_cpus <= 0 or (client_gpus is not None and client_gpus < 0):
        _fail(ConfigError("--client-cpus must be > 0 and --client-gpus >= 0"))
    resources = {"num_cpus": client_cpus, "num_gpus": client_gpu_share(cfg, n, client_gpus)}
    check_setup(cfg, n)
    before = set(Path(cfg.output_dir).glob("*")) if Path(cfg.output_dir).exists() else set()
    _run_simulation(overrides, n, resources)
    created = sorted(set(Path(cfg.output_dir).glob("*")) - before)
    run_dir = Path(cfg.resume_from) if cfg.resume_from else (created[-1] if created else None)
    if run_dir is not None:
        typer.secho(f"run folder: {run_dir}", fg=typer.colors.GREEN)


def client_gpu_share(cfg: RunConfig, num_clients: int, requested: float | None) -> float:
    """Each Ray client actor's ``num_gpus``: Ray hides GPUs from actors given none (CUDA_VISIBLE_DEVICES='')."""
    if cfg.device == "cpu":
        return 0.0 if requested is None else requested
    import torch

    gpus = torch.cuda.device_count()
    if cfg.device == "cuda" and not gpus:
        _fail(ConfigError("run-config device='cuda' but no CUDA GPU is visible here; use 'auto' or 'cpu'"))
    share = (min(1.0, 1.0 / num_clients) if gpus else 0.0) if requested is None else requested
    if share > 0 and not gpus:
        _fail(ConfigError(f"--client-gpus {share} but no CUDA GPU is visible; use --client-gpus 0"))
    if cfg.device == "cuda" and share == 0:
        _fail(ConfigError("run-config device='cuda' but clients get no GPU (--client-gpus 0); Ray would hide it"))
    return share


def _run_simulation(overrides: dict, num_supernodes: int, client_resources: dict) -> None:
    """Flower's simulation runtime, as the SuperLink's simulation process invokes it for `flwr run`.

    The run carries the overrides, so every ClientApp's ``context.run_config`` is the same
    fused config the ServerApp gets (an empty run would give clients the pyproject defaults).
    """
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation as run  # private: no public API takes a Run
    from flwr.supercore.constant import NOOP_FEDERATION_ID  # private: the federation a local simulation runs in
    from flwr.supercore.run import Run  # private: the Run whose override_config the clients' contexts fuse
    from flwr.supercore.task_identity import TaskIdentity  # private: set as flwr's legacy entry point does
    from flwr.supercore.telemetry import EventType

    from zk0.registry import default_pyproject

    app_dir = default_pyproject().parent
    run_id = random.getrandbits(63)
    flower_run = Run.create_empty(run_id)
    flower_run.override_config = overrides
    flower_run.primary_task_id = random.getrandbits(63)
    flower_run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(),
                      run_config=get_fused_config_from_dir(app_dir, overrides))
    backend = {"init_args": {"include_dashboard": False, "_node_ip_address": "127.0.0.1"},
               "client_resources": client_resources}
    run(num_supernodes=num_supernodes, server_app_attr="zk0.server_app:app", client_app_attr="zk0.client_app:app",
        backend_config=backend, app_dir=str(app_dir), server_app_context=context, run=flower_run, is_app=True,
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
    if mode not in BASELINE_MODES:
        _fail(ConfigError(f"--mode must be one of {'|'.join(BASELINE_MODES)}, got {mode!r}"))
    overrides = parse_overrides(run_config) | {"output-dir": str(output.expanduser().resolve())}
    _, cfg = settle_config(overrides, None)
    check_setup(cfg, num_clients or registry_clients(cfg))
    from zk0.baseline import run_baseline
    from zk0.data import DatasetError
    from zk0.registry import RegistryError

    try:
        run_dir = run_baseline(cfg, mode, num_clients)
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
