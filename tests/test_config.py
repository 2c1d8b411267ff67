"""zk0.config.RunConfig: parsing Flower's run config, type checks, choices, ranges."""

from __future__ import annotations

import dataclasses

import pytest

from zk0.config import ConfigError, RunConfig


def test_defaults_parse_from_pyproject(run_config):
    raw = run_config()
    cfg = RunConfig.from_run_config(raw)
    # values from [tool.flwr.app.config] in pyproject.toml
    assert cfg.federation.num_server_rounds == 3
    assert cfg.federation.strategy == "fedprox"
    assert cfg.federation.proximal_mu == pytest.approx(0.01)
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.lr_schedule == "cosine"
    assert cfg.model.model_name == "tiny"
    assert cfg.transport.transport_dtype == "bf16"
    assert cfg.data.datasets == "embedded"
    assert cfg.tracking.use_wandb is False
    # the fixture's FAST overrides went through
    assert cfg.train.local_steps == 2
    assert cfg.train.batch_size == 4
    assert cfg.eval.eval_batches == 1
    assert cfg.tracking.output_dir == raw["output-dir"]
    # every pyproject key is a RunConfig field
    assert set(raw) == set(RunConfig().to_run_config())


def test_pyproject_defaults_agree_with_dataclass_defaults(run_config):
    raw = run_config(**{"local-steps": 20, "batch-size": 8, "eval-batches": 4, "min-stats-clients": 3,
                        "output-dir": "outputs"})
    assert RunConfig.from_run_config(raw) == RunConfig()


def test_overrides_by_key_or_python_name(run_config):
    cfg = RunConfig.from_run_config(run_config(**{"num-server-rounds": 5}, lr_schedule="linear"))
    assert cfg.federation.num_server_rounds == 5
    assert cfg.train.lr_schedule == "linear"


def test_int_accepted_for_float_field(run_config):
    cfg = RunConfig.from_run_config(run_config(lr=1))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_unknown_key_rejected_and_named(run_config):
    raw = run_config()
    raw["num-rounds"] = 3
    with pytest.raises(ConfigError, match="num-rounds"):
        RunConfig.from_run_config(raw)


@pytest.mark.parametrize("key, value, message", [
    ("lr", float("nan"), "'lr' must be a finite number, got nan"),
    ("max-update-norm", float("nan"), "'max-update-norm' must be a finite number"),
    ("round-timeout", float("inf"), "'round-timeout' must be a finite number, got inf"),
    ("proximal-mu", float("-inf"), "'proximal-mu' must be a finite number"),
    ("num-server-rounds", 99999999999999999999999, "'num-server-rounds' is out of range"),
    ("seed", -(10**12), "'seed' is out of range"),
])
def test_non_finite_and_huge_values_are_refused(run_config, key, value, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_run_config(run_config(**{key: value}))


def test_misspelt_key_gets_the_closest_suggestion(run_config):
    raw = run_config()
    raw["num-server-round"] = 3
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config(raw)
    assert str(err.value) == "unknown run-config key 'num-server-round'; did you mean 'num-server-rounds'?"


@pytest.mark.parametrize("key, value", [
    ("num-server-rounds", "3"),     # string for int
    ("num-server-rounds", True),    # bool for int
    ("num-server-rounds", 3.0),     # float for int
    ("lr", "1e-3"),                 # string for float
    ("lr", False),                  # bool for float
    ("use-wandb", 1),               # int for bool
    ("strategy", 1),                # int for str
])
def test_wrong_type_rejected(run_config, key, value):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config(run_config(**{key: value}))
    assert repr(key) in str(err.value)


def test_bad_choice_names_key_and_choices(run_config):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config(run_config(strategy="fedsgd"))
    message = str(err.value)
    assert "'strategy'" in message
    assert "fedprox" in message and "fedavg" in message
    assert "fedsgd" in message


@pytest.mark.parametrize("key, value", [
    ("lr-schedule", "step"), ("transport-dtype", "fp16"), ("device", "tpu"), ("server-device", "gpu"),
    ("client-optimizer", "adam"),
])
def test_other_choices_validated(run_config, key, value):
    with pytest.raises(ConfigError, match=repr(key)):
        RunConfig.from_run_config(run_config(**{key: value}))


def test_a_server_lr_schedule_needs_a_server_optimizer(run_config):
    with pytest.raises(ConfigError, match="'server-lr-follows-schedule'.*server-optimizer=none"):
        RunConfig.from_run_config(run_config(server_lr_follows_schedule=True))
    assert RunConfig.from_run_config(run_config(server_lr_follows_schedule=True, server_optimizer="fedadam"))


@pytest.mark.parametrize("key, value", [
    ("held-out-fraction", 0.0),
    ("held-out-fraction", 1.0),
    ("local-steps", 0),
    ("num-server-rounds", 0),
    ("batch-size", -1),
    ("fraction-train", 1.5),
    ("fraction-evaluate", -0.1),
    ("lr-min-factor", 2.0),
    ("proximal-mu", -0.1),
    ("lr", -1e-3),
    ("round-timeout", 0.0),
    ("model-name", ""),
])
def test_ranges_rejected(run_config, key, value):
    with pytest.raises(ConfigError, match=repr(key)):
        RunConfig.from_run_config(run_config(**{key: value}))


@pytest.mark.parametrize("key, value", [
    ("held-out-fraction", 0.5), ("fraction-train", 1.0), ("fraction-train", 0.0), ("proximal-mu", 0.0),
])
def test_range_boundaries_accepted(run_config, key, value):
    cfg = RunConfig.from_run_config(run_config(**{key: value}))
    assert cfg.to_run_config()[key] == value


def test_effective_mu():
    assert RunConfig.flat(strategy="fedavg", proximal_mu=0.5).federation.effective_mu == 0.0
    assert RunConfig.flat(strategy="fedprox", proximal_mu=0.5).federation.effective_mu == 0.5


def test_to_run_config_round_trips(run_config):
    cfg = RunConfig.from_run_config(run_config(strategy="fedavg", lr=3e-4, seed=7, **{"use-wandb": False}))
    raw = cfg.to_run_config()
    assert raw["strategy"] == "fedavg" and raw["seed"] == 7 and raw["num-server-rounds"] == 3
    assert all("_" not in key for key in raw)
    assert RunConfig.from_run_config(raw) == cfg


def test_run_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().train.lr = 1.0  # type: ignore[misc]


def test_round_schedules():
    cfg = RunConfig.flat(num_server_rounds=7, eval_every=3, sim_eval_every=5, checkpoint_interval=2)
    assert [r for r in range(8) if cfg.evaluates(r)] == [0, 3, 6, 7]
    assert [r for r in range(8) if cfg.sim_evaluates(r)] == [0, 5, 7]
    assert [r for r in range(8) if cfg.checkpoints(r)] == [2, 4, 6, 7]
    assert not any(RunConfig.flat(sim_eval_every=0).sim_evaluates(r) for r in range(4))
