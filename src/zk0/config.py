"""RunConfig: the one typed, validated view of Flower's run config.

Every value comes from ``context.run_config`` (``[tool.flwr.app.config]`` in
pyproject.toml plus ``--run-config`` overrides), is parsed here once, and is then
passed around as this frozen object. Errors name the key and how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from zk0.config_checks import ConfigError, at_least, choice, coerce, fractions, positive

STRATEGIES = ("fedprox", "fedavg")
SERVER_OPTIMIZERS = ("none", "fedavgm", "fedadam", "fedyogi")
CLIENT_OPTIMIZERS = ("adamw", "sgd")  # local training: the policy preset's AdamW, or plain SGD
AGGREGATIONS = ("mean", "trimmed-mean", "median", "krum")  # how the server combines a round's updates (zk0.robust)
AGGREGATION_WEIGHTS = ("frames", "dataset")  # an update's weight in the mean: frames it trained on, or its dataset's
LR_SCHEDULES = ("constant", "cosine", "linear")
TRANSPORT_DTYPES = ("bf16", "fp32", "int8")
DEVICES = ("auto", "cpu", "cuda")
DP_MODES = ("none", "central", "local")  # differential privacy: off, noise added by the server, or by each client
BASELINE_MODES = ("centralized", "local")


# Keys that may change when a run resumes: none of them changes what the run computes.
RESUME_FREE_KEYS = ("resume-from", "output-dir", "round-timeout", "use-wandb", "num-workers")


@dataclass(frozen=True)
class FederationConfig:
    """Who takes part in a round, how long the server waits, and the FedProx/FedAvg strategy."""

    num_server_rounds: int = 3
    strategy: str = "fedprox"
    proximal_mu: float = 0.01
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    fraction_evaluate: float = 1.0
    min_evaluate_nodes: int = 2
    min_stats_clients: int = 3
    round_timeout: float = 3600.0
    server_optimizer: str = "none"
    server_lr: float = 1.0
    server_momentum: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    server_lr_follows_schedule: bool = False
    aggregation: str = "mean"
    aggregation_weight: str = "frames"
    trim_fraction: float = 0.25
    byzantine_clients: int = 1

    @property
    def effective_mu(self) -> float:
        """The proximal coefficient actually applied: FedAvg is FedProx with mu = 0."""
        return self.proximal_mu if self.strategy == "fedprox" else 0.0

    def validate(self) -> None:
        choice("strategy", self.strategy, STRATEGIES)
        choice("server-optimizer", self.server_optimizer, SERVER_OPTIMIZERS)
        choice("aggregation", self.aggregation, AGGREGATIONS)
        choice("aggregation-weight", self.aggregation_weight, AGGREGATION_WEIGHTS)
        if self.aggregation_weight != "frames" and self.aggregation != "mean":
            raise ConfigError(f"run-config 'aggregation-weight' = {self.aggregation_weight} weights the mean, but "
                              f"aggregation={self.aggregation} ignores weights; use aggregation=mean or "
                              "aggregation-weight=frames")
        self._validate_robust()
        if self.server_lr_follows_schedule and self.server_optimizer == "none":
            raise ConfigError("run-config 'server-lr-follows-schedule' scales the server optimizer's step, but "
                              "server-optimizer=none has none; set server-optimizer (fedadam, fedyogi, fedavgm)")
        fractions(server_momentum=self.server_momentum, server_beta2=self.server_beta2)
        positive(server_lr=self.server_lr, server_tau=self.server_tau)
        at_least(1, num_server_rounds=self.num_server_rounds, min_stats_clients=self.min_stats_clients)
        at_least(0, proximal_mu=self.proximal_mu, min_train_nodes=self.min_train_nodes,
                  min_evaluate_nodes=self.min_evaluate_nodes)
        fractions(fraction_train=self.fraction_train, fraction_evaluate=self.fraction_evaluate)
        if self.round_timeout <= 0:
            raise ConfigError(f"run-config 'round-timeout' must be > 0 seconds, got {self.round_timeout}")

    def _validate_robust(self) -> None:
        """``trim-fraction`` in [0, 0.5) as Flower's ``trim_mean`` requires, and a trimmed mean that trims at all
        when it must withstand hostile clients (whether a round has enough updates is known only in the round)."""
        at_least(0, byzantine_clients=self.byzantine_clients)
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"run-config 'trim-fraction' must be in [0, 0.5), got {self.trim_fraction}")
        if self.aggregation == "trimmed-mean" and self.byzantine_clients and not self.trim_fraction:
            raise ConfigError("run-config 'trim-fraction' = 0 trims nothing, so aggregation=trimmed-mean cannot "
                              f"withstand byzantine-clients={self.byzantine_clients}; set trim-fraction > 0")


@dataclass(frozen=True)
class TrainConfig:
    """A client's local training: steps, batches, the optimizer and its per-round schedule, where it runs."""

    local_steps: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    client_optimizer: str = "adamw"
    lr_schedule: str = "cosine"
    lr_min_factor: float = 0.1
    warmup_rounds: int = 0
    grad_clip_norm: float = 10.0
    device: str = "auto"
    num_workers: int = 0

    def validate(self) -> None:
        choice("client-optimizer", self.client_optimizer, CLIENT_OPTIMIZERS)
        choice("lr-schedule", self.lr_schedule, LR_SCHEDULES)
        choice("device", self.device, DEVICES)
        at_least(1, local_steps=self.local_steps, batch_size=self.batch_size)
        at_least(0, lr=self.lr, grad_clip_norm=self.grad_clip_norm, warmup_rounds=self.warmup_rounds,
                  num_workers=self.num_workers)
        fractions(lr_min_factor=self.lr_min_factor)


@dataclass(frozen=True)
class TuningConfig:
    """The seed's dynamic tuning (:mod:`zk0.tuning`): mu and the lr factor follow the federation's held-out loss."""

    adaptive_mu: bool = False
    mu_min: float = 0.001
    mu_max: float = 1.0
    mu_factor: float = 2.0
    dynamic_lr: bool = False
    lr_plateau_patience: int = 2
    lr_plateau_factor: float = 0.5
    lr_plateau_threshold: float = 0.01

    def validate(self) -> None:
        positive(mu_min=self.mu_min)
        if self.mu_max < self.mu_min:
            raise ConfigError(f"run-config 'mu-max' ({self.mu_max}) must be >= 'mu-min' ({self.mu_min})")
        if self.mu_factor <= 1:
            raise ConfigError(f"run-config 'mu-factor' must be > 1, got {self.mu_factor}")
        at_least(1, lr_plateau_patience=self.lr_plateau_patience)
        fractions(lr_plateau_threshold=self.lr_plateau_threshold)
        if not 0 < self.lr_plateau_factor < 1:
            raise ConfigError(f"run-config 'lr-plateau-factor' must be in (0, 1), got {self.lr_plateau_factor}")


@dataclass(frozen=True)
class ModelConfig:
    """The policy every party builds: the base model and its action chunk."""

    model_name: str = "tiny"
    chunk_size: int = 10

    def validate(self) -> None:
        at_least(1, chunk_size=self.chunk_size)
        if not self.model_name:
            raise ConfigError("run-config 'model-name' is empty; use \"tiny\" or a hub id / local folder")


@dataclass(frozen=True)
class DataConfig:
    """Which datasets (registry profile and file) and how each is split into training and held-out episodes."""

    datasets: str = "embedded"
    registry: str = ""
    held_out_fraction: float = 0.2
    split_seed: int = 0

    def validate(self) -> None:
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ConfigError(f"run-config 'held-out-fraction' must be in (0, 1), got {self.held_out_fraction}")


@dataclass(frozen=True)
class EvalConfig:
    """Offline (held-out and unseen datasets) and closed-loop (simulator) evaluation, and the server's device."""

    eval_every: int = 1
    eval_batches: int = 4
    sim_eval_every: int = 0
    sim_eval_episodes: int = 5
    server_device: str = "auto"

    def validate(self) -> None:
        choice("server-device", self.server_device, DEVICES)
        at_least(1, eval_every=self.eval_every, eval_batches=self.eval_batches,
                  sim_eval_episodes=self.sim_eval_episodes)
        at_least(0, sim_eval_every=self.sim_eval_every)


@dataclass(frozen=True)
class TransportConfig:
    """What crosses the wire: the tensors' dtype and the update norm the server accepts."""

    transport_dtype: str = "bf16"
    max_update_norm: float = 1000.0

    def validate(self) -> None:
        choice("transport-dtype", self.transport_dtype, TRANSPORT_DTYPES)
        at_least(0, max_update_norm=self.max_update_norm)


@dataclass(frozen=True)
class TrackingConfig:
    """Where a run's folder goes, how often it checkpoints, W&B, and the run folder it resumes."""

    output_dir: str = "outputs"
    checkpoint_interval: int = 5
    hf_repo_id: str = ""
    use_wandb: bool = False
    wandb_project: str = "zk0"
    resume_from: str = ""

    def validate(self) -> None:
        at_least(1, checkpoint_interval=self.checkpoint_interval)


@dataclass(frozen=True)
class DpConfig:
    """Differential privacy (:mod:`zk0.privacy`): who adds Gaussian noise, to updates clipped to what norm, and the
    budget the accountant holds the run to."""

    dp: str = "none"
    dp_clip_norm: float = 1.0
    dp_noise_multiplier: float = 1.0
    dp_target_epsilon: float = 0.0
    dp_delta: float = 1e-5
    dp_max_epsilon: float = 0.0
    dp_stats_bound: float = 180.0

    def validate(self) -> None:
        choice("dp", self.dp, DP_MODES)
        positive(dp_clip_norm=self.dp_clip_norm, dp_stats_bound=self.dp_stats_bound)
        at_least(0, dp_target_epsilon=self.dp_target_epsilon, dp_max_epsilon=self.dp_max_epsilon)
        if self.dp_target_epsilon == 0:
            positive(dp_noise_multiplier=self.dp_noise_multiplier)
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"run-config 'dp-delta' must be in (0, 1), got {self.dp_delta}")

    def fits(self, transport_dtype: str, aggregation: str, aggregation_weight: str) -> None:
        """DP needs updates whose norm the clipping bounds, averaged with equal weight."""
        if self.dp == "none":
            return
        if transport_dtype == "int8":
            raise ConfigError("dp needs transport-dtype bf16 or fp32: int8's error feedback carries part of earlier "
                              "updates into later ones, so dp-clip-norm would not bound a round's update")
        if aggregation != "mean":
            raise ConfigError(f"dp needs aggregation=mean: the noise is calibrated to the mean's sensitivity "
                              f"(dp-clip-norm / clients), not {aggregation}'s")
        if aggregation_weight != "frames":
            raise ConfigError("dp needs aggregation-weight=frames: the accounting assumes every client weighs the "
                              "same in the mean, and a node claiming a large dataset would outweigh the others")


GROUPS = {"federation": FederationConfig, "train": TrainConfig, "tuning": TuningConfig, "model": ModelConfig,
          "data": DataConfig, "eval": EvalConfig, "transport": TransportConfig, "tracking": TrackingConfig,
          "privacy": DpConfig}


@dataclass(frozen=True)
class RunConfig:
    """Validated run configuration, grouped by concern as LeRobot groups its configs.

    Outside, it stays Flower's flat run config: key ``foo-bar`` is field ``foo_bar`` of one group
    (``seed`` sits at the top: it seeds the split, the initial policy and every round).
    """

    seed: int = 42
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    privacy: DpConfig = field(default_factory=DpConfig)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Parse and validate Flower's run config; unknown keys are rejected."""
        known = _flat_fields()
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted(known))}"
                raise ConfigError(f"unknown run-config key {key!r}; {hint}")
            values[key] = coerce(key, raw, known[key][1].type)
        return cls.flat(**{key.replace("-", "_"): value for key, value in values.items()})

    @classmethod
    def flat(cls, **values: Any) -> RunConfig:
        """A validated config from flat field names (``lr=1e-3, num_server_rounds=5``), as the run config has them."""
        known = _flat_fields()
        grouped: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
        top = {}
        for name, value in values.items():
            key = name.replace("_", "-")
            if key not in known:
                raise ConfigError(f"unknown run-config key {key!r}")
            group = known[key][0]
            if group is None:
                top[name] = value
            else:
                grouped[group][name] = value
        cfg = cls(**top, **{group: GROUPS[group](**fields_) for group, fields_ in grouped.items()})
        cfg.validate()
        return cfg

    def to_run_config(self) -> dict[str, Any]:
        """The config as Flower run-config keys (for config.json and the model card)."""
        flat = {"seed": self.seed}
        for group in GROUPS:
            flat.update(dataclasses.asdict(getattr(self, group)))
        return {k.replace("_", "-"): v for k, v in flat.items()}

    def evaluates(self, server_round: int) -> bool:
        """Offline evaluation rounds: round 0, every ``eval-every`` rounds and the last round."""
        return server_round % self.eval.eval_every == 0 or server_round == self.federation.num_server_rounds

    def sim_evaluates(self, server_round: int) -> bool:
        """Closed-loop rounds: round 0, every ``sim-eval-every`` rounds and the last (never when 0)."""
        every = self.eval.sim_eval_every
        return every > 0 and (server_round % every == 0 or server_round == self.federation.num_server_rounds)

    def checkpoints(self, server_round: int) -> bool:
        """Checkpoint rounds: every ``checkpoint-interval`` rounds and the last round (never round 0)."""
        return server_round > 0 and (server_round % self.tracking.checkpoint_interval == 0
                                     or server_round == self.federation.num_server_rounds)

    def validate(self) -> None:
        """Check ranges and choices group by group; raise :class:`ConfigError` naming the first bad key."""
        for group in GROUPS:
            getattr(self, group).validate()
        fed = self.federation
        self.privacy.fits(self.transport.transport_dtype, fed.aggregation, fed.aggregation_weight)


def _flat_fields() -> dict[str, tuple[str | None, dataclasses.Field]]:
    """Flat run-config key -> (its group, or None for a top-level field; the dataclass field)."""
    out: dict[str, tuple[str | None, dataclasses.Field]] = {
        f.name.replace("_", "-"): (None, f) for f in fields(RunConfig) if f.name not in GROUPS}
    for group, kind in GROUPS.items():
        out.update({f.name.replace("_", "-"): (group, f) for f in fields(kind)})
    return out


def resume_overrides(run_dir: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The overrides that resume the run in ``run_dir``: its own saved config (``config.json``), the keys of
    ``overrides`` that cannot change what the run computes, and ``resume-from``."""
    if fixed := sorted(set(overrides) - set(RESUME_FREE_KEYS)):
        raise ConfigError(f"--resume continues with the run's own config; {', '.join(fixed)} cannot change")
    path = run_dir.expanduser().resolve() / "config.json"
    try:
        saved = json.loads(path.read_text())["run-config"]
    except (OSError, ValueError, KeyError):
        raise ConfigError(f"--resume {run_dir}: no readable config.json there; pass a run folder made by zk0") from None
    return saved | dict(overrides) | {"resume-from": str(run_dir.expanduser().resolve())}
