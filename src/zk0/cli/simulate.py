"""``zk0 simulate``: the ServerApp and ClientApps on Flower's simulation runtime (Ray), as ``flwr run`` runs them."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Annotated

import typer

from zk0.cli.common import RunConfigOpt, check_setup, fail, parse_overrides, registry_clients, settle_config
from zk0.config import ConfigError, RunConfig
from zk0.logs import quiet_simulation_runtime

# Ray starts its workers, which run every ClientApp (all the training), at nice 15: beside any other work on the
# machine they starve (a test's round took 17 min beside three busy processes). Normal priority.
RAY_SYSTEM = {"worker_niceness": 0}


def simulate(
    run_config: RunConfigOpt = None,
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Folder that receives the run folder.")] = Path("outputs"),
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
    if client_cpus <= 0 or (client_gpus is not None and client_gpus < 0):
        fail(ConfigError("--client-cpus must be > 0 and --client-gpus >= 0"))
    overrides = parse_overrides(run_config)
    if resume is None:
        overrides["output-dir"] = str(output.expanduser().resolve())
    overrides, cfg = settle_config(overrides, resume)
    n = registry_clients(cfg, num_clients)
    fed = cfg.federation
    if n < max(fed.min_train_nodes, fed.min_evaluate_nodes, fed.min_stats_clients, 1):
        fail(ConfigError(f"--num-clients {n} is below min-train-nodes={fed.min_train_nodes} / min-evaluate-nodes="
                         f"{fed.min_evaluate_nodes} / min-stats-clients={fed.min_stats_clients}: the server would "
                         f"wait for clients that never come"))
    check_setup(cfg, n)
    resources = {"num_cpus": client_cpus, "num_gpus": client_gpu_share(cfg, n, client_gpus)}
    before = set(Path(cfg.tracking.output_dir).glob("*")) if Path(cfg.tracking.output_dir).exists() else set()
    quiet_simulation_runtime()
    _run_simulation(overrides, n, resources)
    created = sorted(set(Path(cfg.tracking.output_dir).glob("*")) - before)
    run_dir = Path(cfg.tracking.resume_from) if cfg.tracking.resume_from else (created[-1] if created else None)
    if run_dir is not None:
        typer.secho(f"run folder: {run_dir}", fg=typer.colors.GREEN)


def client_gpu_share(cfg: RunConfig, num_clients: int, requested: float | None) -> float:
    """Each Ray client actor's ``num_gpus``: Ray hides GPUs from actors given none (CUDA_VISIBLE_DEVICES='')."""
    if cfg.train.device == "cpu":
        return 0.0 if requested is None else requested
    import torch

    gpus = torch.cuda.device_count()
    if cfg.train.device == "cuda" and not gpus:
        fail(ConfigError("run-config device='cuda' but no CUDA GPU is visible here; use 'auto' or 'cpu'"))
    share = (min(1.0, 1.0 / num_clients) if gpus else 0.0) if requested is None else requested
    if share > 0 and not gpus:
        fail(ConfigError(f"--client-gpus {share} but no CUDA GPU is visible; use --client-gpus 0"))
    if cfg.train.device == "cuda" and share == 0:
        fail(ConfigError("run-config device='cuda' but clients get no GPU (--client-gpus 0); Ray would hide it"))
    return share


def _run_simulation(overrides: dict, num_supernodes: int, client_resources: dict) -> None:
    """Flower's simulation runtime, as the SuperLink's simulation process invokes it for `flwr run`.

    The run carries the overrides, so every ClientApp's ``context.run_config`` is the same
    fused config the ServerApp gets (an empty run would give clients the pyproject defaults).
    """
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir

    from zk0.flower_seams import run_simulation
    from zk0.registry import default_pyproject

    app_dir = default_pyproject().parent
    context = Context(run_id=random.getrandbits(63), node_id=0, node_config={}, state=RecordDict(),
                      run_config=get_fused_config_from_dir(app_dir, overrides))
    backend = {"init_args": {"include_dashboard": False, "_node_ip_address": "127.0.0.1", "_system_config": RAY_SYSTEM},
               "client_resources": client_resources}
    run_simulation(context, overrides, num_supernodes, backend, str(app_dir), server_app_attr="zk0.server_app:app",
                   client_app_attr="zk0.client_app:app")
