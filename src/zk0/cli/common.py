"""What the ``zk0`` commands share: one way to fail, run-config overrides, and the checks made in seconds
(before torch, Ray or a SuperLink) that a run can start.

Nothing here imports torch, LeRobot or Flower at module level: bad input must be refused before
the training stack loads (about ten seconds; minutes on a loaded machine).
"""

from __future__ import annotations

import ctypes
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
    overrides = dict(overrides)
    try:
        if resume is not None:
            overrides = resume_overrides(resume, overrides)
        if isinstance(overrides.get("registry"), str) and overrides["registry"]:
            overrides["registry"] = str(Path(overrides["registry"]).expanduser().resolve())
        cfg = RunConfig.from_run_config(app_defaults() | overrides)
    except ConfigError as err:
        fail(err)
    if cfg.tracking.resume_from and not Path(cfg.tracking.resume_from).expanduser().is_dir():
        fail(f"run-config resume-from={cfg.tracking.resume_from!r}: no such folder; pass a run folder made by zk0")
    return overrides, cfg


def app_defaults() -> dict:
    """The app's ``[tool.flwr.app.config]``, flattened as Flower's ``get_fused_config_from_dir`` flattens it.

    Read here because Flower's reader imports Flower's server and simulation packages: half a
    second before a misspelt key could be named.
    """
    from zk0.registry import default_pyproject

    with default_pyproject().open("rb") as f:
        return _flatten(tomllib.load(f)["tool"]["flwr"]["app"].get("config", {}))


def _flatten(table: dict, prefix: str = "") -> dict:
    """Nested tables as dotted keys (``a.b = 1``), as Flower flattens run configs."""
    flat = {}
    for key, value in table.items():
        name = f"{prefix}.{key}" if prefix else key
        flat.update(_flatten(value, name) if isinstance(value, dict) else {name: value})
    return flat


def check_setup(cfg: RunConfig, clients: int | None) -> None:
    """Model, registry and datasets, in seconds, before Ray or a SuperLink is involved.

    ``clients``: how many of the registry's client datasets run on this machine (simulation,
    baselines); their data is opened, checked against the policy and sample frames decoded.
    Deployment (``None``) checks only the server's evaluation sets: clients check their own.
    """
    from zk0.registry import RegistryError, load_registry

    try:
        registry = load_registry(cfg.data.datasets, cfg.data.registry)
    except RegistryError as err:
        fail(err)
    from zk0.model_source import ModelUnavailable, require_model

    try:
        require_model(cfg.model.model_name)  # before the seconds that torch and LeRobot take to import
    except ModelUnavailable as err:
        fail(err)
    require_cuda(cfg, clients_here=clients is not None)
    from zk0.checkpoint import ResumeError, RunFolder
    from zk0.data import DatasetError, preflight
    from zk0.logs import quiet_libraries
    from zk0.policy import policy_config

    quiet_libraries()  # recording embedded datasets here would print FFmpeg's statistics

    try:
        if cfg.tracking.resume_from:
            RunFolder.existing(cfg.tracking.resume_from)
        policy_cfg = policy_config(cfg)
        for entry in registry.clients[:clients or 0]:
            preflight(entry, policy_cfg, training=True)  # embedded ones are recorded here, once, before clients start
        for entry in registry.server_eval:
            preflight(entry, policy_cfg, training=False)
    except (DatasetError, ModelUnavailable, ResumeError) as err:
        fail(err)


def require_cuda(cfg: RunConfig, clients_here: bool) -> None:
    """``cuda`` where this machine runs it (the server; clients too in simulation) needs a visible GPU.

    Without a CUDA driver library no GPU can be visible, which is known without importing torch.
    """
    wanted = [("server-device", cfg.eval.server_device)] + ([("device", cfg.train.device)] if clients_here else [])
    for key, value in wanted:
        if value == "cuda" and not _cuda_visible():
            fail(ConfigError(f"run-config {key}='cuda' but no CUDA GPU is visible here; use 'auto' or 'cpu'"))


def _cuda_visible() -> bool:
    """Whether torch sees a CUDA GPU; a machine without the driver library answers at once."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    import torch

    return torch.cuda.is_available()


def registry_clients(cfg: RunConfig, requested: int | None = None) -> int:
    """How many of the registry profile's clients run here: ``requested`` (``--num-clients``), or all of them."""
    from zk0.registry import RegistryError, load_registry

    try:
        available = len(load_registry(cfg.data.datasets, cfg.data.registry).clients)
    except RegistryError as err:
        fail(err)
    if requested and requested > available:
        fail(f"--num-clients {requested} exceeds the {available} clients of profile {cfg.data.datasets!r}")
    return requested or available


def require_dataset_found(uri: str, option: str = "dataset") -> None:
    """Fail in one line when ``uri`` names nothing that exists here, before LeRobot loads to open it.

    Checks only what needs no library: the scheme, a local folder's ``meta/info.json`` and a
    simulator task's name. Hub datasets, schemas and frames are checked where they are opened.
    """
    from zk0.registry import SCHEMES, DatasetEntry

    entry = DatasetEntry(uri=uri)
    if entry.scheme not in SCHEMES:
        fail(f"{option} {uri!r}: the scheme must be hf:, local: or embedded:")
    root = Path(entry.target).expanduser()
    if entry.scheme == "local" and not (root / "meta" / "info.json").is_file():
        fail(f"{option} {uri!r}: {root} is not a LeRobotDataset folder (no meta/info.json)")
    if entry.scheme == "embedded":
        require_simulator_tasks([entry.target], f"{option} {uri!r}: ")


def require_simulator_tasks(names: list[str], context: str = "") -> None:
    """Fail in one line on a name that is not a simulator task (loads MuJoCo's scenes, not torch)."""
    from zk0.sim.scene import TASKS

    if unknown := [name for name in names if name not in TASKS]:
        fail(f"{context}unknown simulator task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
