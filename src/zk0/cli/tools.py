"""``zk0 baseline`` and ``zk0 compare``: the non-federated references and the table that sets them side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zk0.cli.common import RunConfigOpt, check_setup, fail, parse_overrides, registry_clients, settle_config
from zk0.config import BASELINE_MODES, ConfigError


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
        fail(ConfigError(f"--mode must be one of {'|'.join(BASELINE_MODES)}, got {mode!r}"))
    overrides = parse_overrides(run_config) | {"output-dir": str(output.expanduser().resolve())}
    _, cfg = settle_config(overrides, None)
    check_setup(cfg, registry_clients(cfg, num_clients))
    from zk0.tools.baseline import run_baseline
    from zk0.data import DatasetError
    from zk0.registry import RegistryError

    try:
        run_dir = run_baseline(cfg, mode, num_clients)
    except (ConfigError, RegistryError, DatasetError) as err:
        fail(err)
    typer.secho(f"run folder: {run_dir}", fg=typer.colors.GREEN)


def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folders: federated runs and baselines.")],
    chart: Annotated[Path, typer.Option("--chart", help="Where the PNG chart goes.")] = Path("compare.png"),
) -> None:
    """One table (round 0 and final round) and one chart: FedProx, FedAvg, centralized and local runs."""
    from zk0.tools.compare import CompareError, compare as compare_runs

    try:
        lines = compare_runs(run_dirs, chart)
    except CompareError as err:
        fail(err)
    for line in lines:
        typer.echo(line)
    typer.secho(f"chart: {chart}", fg=typer.colors.GREEN)


def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (zk0 simulate, zk0 run or a baseline).")],
    out: Annotated[Path | None, typer.Option("--out", help="Where the page goes (default: RUN_DIR/report.html).")]
        = None,
) -> None:
    """One self-contained HTML page of a run: who trained, metrics per dataset and round, charts, rejected replies."""
    run_dir = run_dir.expanduser().resolve()
    if not (run_dir / "config.json").is_file() or not (run_dir / "metrics.jsonl").is_file():
        fail(f"{run_dir} is not a run folder (no config.json and metrics.jsonl); pass one made by zk0")
    from zk0.tools.run_report import write_report  # torch and Flower: after the folder is known to be a run

    typer.secho(f"report: {write_report(run_dir, out)}", fg=typer.colors.GREEN)
