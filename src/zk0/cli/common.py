"""What the ``zk0`` commands share: one way to fail, run-config overrides, and the checks made in seconds
(before torch, Ray or a SuperLink) that a run can start."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from zk0.config import ConfigError, RunConfig, resume_overrides

RunConfigOpt = Annotated[list[str] | None, typer.Option(
    "--run-config", "-c", help="Run-config overrides: 'key=value key2=value2' (TOML values; bare words are strings).")]


def fail(reason: str | Exception) -> NoReturn:
    """End the command with one red line on stderr and exit code 1."""
    typer.secho(f"error: {reason}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


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
            overrides = resume_overrides(resume, overrides)
        if isinstance(overrides.get("registry"), str) and overrides["registry"]:
            overrides["registry"] = str(Path(overrides["registry"]).expanduser().resolve())
        defaults = get_fused_config_from_dir(default_pyproject().parent, {})
        cfg = RunConfig.from_run_config(defaults | overrides)
    except ConfigError as err:
        fail(err)
    return overrides, cfg


def check_setup(cfg: RunConfig, clients: int | None) -> None:
    """Model, registry and datasets, in seconds, before Ray or a SuperLink is involved.

    ``clients``: how many of the registry's client datasets run on this machine (simulation,
    baselines); their data is opened, checked against the policy and sample frames decoded.
    Deployment (``None``) checks only the server's evaluation sets: clients check their own.
    """
    from zk0.registry import RegistryError, load_registry

    try:
        registry = load_registry(cfg.data.datasets, cfg.data.registry)
        if clients is not None and clients > len(registry.clients):
            raise RegistryError(f"--num-clients {clients} exceeds the {len(registry.clients)} clients of profile "
                                f"{cfg.data.datasets!r}")
    except RegistryError as err:
        fail(err)
    from zk0.checkpoint import ResumeError, RunFolder
    from zk0.data import DatasetError, preflight
    from zk0.logs import quiet_libraries
    from zk0.policy import ModelUnavailable, policy_config

    quiet_libraries()  # recording embedded datasets here would print FFmpeg's statistics

    try:
        if cfg.tracking.resume_from:
            RunFolder.existing(cfg.tracking.resume_from)
        require_cuda(cfg, clients_here=clients is not None)
        policy_cfg = policy_config(cfg)
        for entry in registry.clients[:clients or 0]:
            preflight(entry, policy_cfg, training=True)  # embedded ones are recorded here, once, before clients start
        for entry in registry.server_eval:
            preflight(entry, policy_cfg, training=False)
    except (DatasetError, ModelUnavailable, ResumeError) as err:
        fail(err)


def require_cuda(cfg: RunConfig, clients_here: bool) -> None:
    """``cuda`` where this machine runs it (the server; clients too in simulation) needs a visible GPU."""
    import torch

    wanted = [("server-device", cfg.eval.server_device)] + ([("device", cfg.train.device)] if clients_here else [])
    for key, value in wanted:
        if value == "cuda" and not torch.cuda.is_available():
            fail(ConfigError(f"run-config {key}='cuda' but no CUDA GPU is visible here; use 'auto' or 'cpu'"))


def registry_clients(cfg: RunConfig) -> int:
    """How many clients the run config's registry profile lists."""
    from zk0.registry import RegistryError, load_registry

    try:
        return len(load_registry(cfg.data.datasets, cfg.data.registry).clients)
    except RegistryError as err:
        fail(err)
