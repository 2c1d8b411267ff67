"""RunConfig: the one typed, validated view of Flower's run config.

Every value comes from ``context.run_config`` (``[tool.flwr.app.config]`` in
pyproject.toml plus ``--run-config`` overrides), is parsed here once, and is then
passed around as this frozen object. Errors name the key and how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

STRATEGIES = ("fedprox", "fedavg")
LR_SCHEDULES = ("constant", "cosine", "linear")
TRANSPORT_DTYPES = ("bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
BASELINE_MODES = ("centralized", "local")
MAX_INT = 10**9  # no count, seed or size of a run comes near this


# Keys that may change when a run resumes: none of them changes what the run computes.
RESUME_FREE_KEYS = ("resume-from", "output-dir", "round-timeout", "use-wandb", "num-workers")


class ConfigError(ValueError):
    """A run-config value that cannot be used; the message names the key and the fix."""


@dataclass(frozen=True)
class RunConfig:
    """Validated run configuration (field ``foo_bar`` is run-config key ``foo-bar``)."""

    num_server_rounds: int = 3
    strategy: str = "fedprox"
    proximal_mu: float = 0.01
    local_steps: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    lr_min_factor: float = 0.1
    warmup_rounds: int = 0
    grad_clip_norm: float = 10.0
    seed: int = 42
    model_name: str = "tiny"
    chunk_size: int = 10
    device: str = "auto"
    server_device: str = "auto"
    transport_dtype: str = "bf16"
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    fraction_evaluate: float = 1.0
    min_evaluate_nodes: int = 2
    min_stats_clients: int = 3
    round_timeout: float = 3600.0
    max_update_norm: float = 1000.0
    eval_every: int = 1
    eval_batches: int = 4
    sim_eval_every: int = 0
    sim_eval_episodes: int = 5
    held_out_fraction: float = 0.2
    split_seed: int = 0
    checkpoint_interval: int = 5
    datasets: str = "embedded"
    registry: str = ""
    num_workers: int = 0
    output_dir: str = "outputs"
    use_wandb: bool = False
    wandb_project: str = "zk0"
    resume_from: str = ""

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Parse and validate Flower's run config; unknown keys are rejected."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        values = {}
        for key, raw in run_config.items():
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted(known))}"
                raise ConfigError(f"unknown run-config key {key!r}; {hint}")
            values[known[key].name] = _coerce(key, raw, known[key].type)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def to_run_config(self) -> dict[str, Any]:
        """The config as Flower run-config keys (for config.json and the model card)."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    @property
    def effective_mu(self) -> float:
        """The proximal coefficient actually applied: FedAvg is FedProx with mu = 0."""
        return self.proximal_mu if self.strategy == "fedprox" else 0.0

    def evaluates(self, server_round: int) -> bool:
        """Offline evaluation rounds: round 0, every ``eval-every`` rounds and the last round."""
        return server_round % self.eval_every == 0 or server_round == self.num_server_rounds

    def sim_evaluates(self, server_round: int) -> bool:
        """Closed-loop rounds: round 0, every ``sim-eval-every`` rounds and the last (never when 0)."""
        return self.sim_eval_every > 0 and (server_round % self.sim_eval_every == 0
                                            or server_round == self.num_server_rounds)

    def checkpoints(self, server_round: int) -> bool:
        """Checkpoint rounds: every ``checkpoint-interval`` rounds and the last round (never round 0)."""
        return server_round > 0 and (server_round % self.checkpoint_interval == 0
                                     or server_round == self.num_server_rounds)

    def validate(self) -> None:
        """Check ranges and choices; raise :class:`ConfigError` naming the first bad key."""
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("lr-schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("transport-dtype", self.transport_dtype, TRANSPORT_DTYPES)
        _choice("device", self.device, DEVICES)
        _choice("server-device", self.server_device, DEVICES)
        for key in ("num-server-rounds", "local-steps", "batch-size", "chunk-size", "eval-every",
                    "eval-batches", "checkpoint-interval", "sim-eval-episodes", "min-stats-clients"):
            if getattr(self, key.replace("-", "_")) < 1:
                raise ConfigError(f"run-config {key!r} must be >= 1, got {getattr(self, key.replace('-', '_'))}")
        for key in ("proximal-mu", "lr", "grad-clip-norm", "warmup-rounds", "min-train-nodes",
                    "min-evaluate-nodes", "num-workers", "max-update-norm", "sim-eval-every"):
            if getattr(self, key.replace("-", "_")) < 0:
                raise ConfigError(f"run-config {key!r} must be >= 0, got {getattr(self, key.replace('-', '_'))}")
        for key in ("fraction-train", "fraction-evaluate", "lr-min-factor"):
            if not 0.0 <= getattr(self, key.replace("-", "_")) <= 1.0:
                raise ConfigError(f"run-config {key!r} must be in [0, 1], got {getattr(self, key.replace('-', '_'))}")
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ConfigError(f"run-config 'held-out-fraction' must be in (0, 1), got {self.held_out_fraction}")
        if self.round_timeout <= 0:
            raise ConfigError(f"run-config 'round-timeout' must be > 0 seconds, got {self.round_timeout}")
        if not self.model_name:
            raise ConfigError("run-config 'model-name' is empty; use \"tiny\" or a hub id / local folder")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"run-config {key!r} must be one of {'|'.join(choices)}, got {value!r}")


def _coerce(key: str, raw: Any, type_name: str) -> Any:
    """Convert a TOML value to the field's type, refusing lossy or surprising conversions.

    NaN and infinities are refused: ``max-update-norm=nan`` would silently turn a check off and
    ``lr=nan`` would fail every client. Integers are bounded so a mistyped count cannot start a
    run that never ends.
    """
    if type_name == "bool":
        if isinstance(raw, bool):
            return raw
    elif type_name == "int":
        if isinstance(raw, int) and not isinstance(raw, bool):
            if abs(raw) > MAX_INT:
                raise ConfigError(f"run-config {key!r} is out of range: {raw} (at most {MAX_INT})")
            return raw
    elif type_name == "float":
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            if not math.isfinite(raw):
                raise ConfigError(f"run-config {key!r} must be a finite number, got {raw}")
            return float(raw)
    elif type_name == "str":
        if isinstance(raw, str):
            return raw
    raise ConfigError(f"run-config {key!r} must be {type_name}, got {raw!r} ({type(raw).__name__})")
