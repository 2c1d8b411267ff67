"""zk0.strategy.round_lr: the per-round learning-rate schedule computed on the server."""

from __future__ import annotations

import pytest

from zk0.config import RunConfig
from zk0.strategy import round_lr


def lrs(cfg: RunConfig) -> list[float]:
    return [round_lr(cfg, r) for r in range(1, cfg.federation.num_server_rounds + 1)]


def non_increasing(values: list[float]) -> bool:
    return all(b <= a + 1e-15 for a, b in zip(values, values[1:]))


def test_constant():
    cfg = RunConfig.flat(lr=1e-3, lr_schedule="constant", num_server_rounds=5)
    assert lrs(cfg) == [1e-3] * 5


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("rounds", [2, 5, 10])
def test_decaying_schedules(schedule, rounds):
    cfg = RunConfig.flat(lr=1e-3, lr_schedule=schedule, num_server_rounds=rounds, lr_min_factor=0.1)
    values = lrs(cfg)
    assert values[0] == pytest.approx(1e-3)
    assert values[-1] == pytest.approx(1e-4)
    assert non_increasing(values)
    assert all(1e-4 - 1e-15 <= v <= 1e-3 + 1e-15 for v in values)
    if rounds > 2:
        assert values[1] < values[0]  # it really decays


def test_linear_is_linear():
    cfg = RunConfig.flat(lr=1.0, lr_schedule="linear", num_server_rounds=5, lr_min_factor=0.0)
    assert lrs(cfg) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_cosine_midpoint():
    cfg = RunConfig.flat(lr=1.0, lr_schedule="cosine", num_server_rounds=5, lr_min_factor=0.0)
    values = lrs(cfg)
    assert values[2] == pytest.approx(0.5)
    assert values[1] == pytest.approx(0.5 * (1 + 2**-0.5))


def test_single_round_uses_peak_lr():
    for schedule in ("constant", "cosine", "linear"):
        assert round_lr(RunConfig.flat(lr=2e-3, lr_schedule=schedule, num_server_rounds=1), 1) == pytest.approx(2e-3)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_warmup_ramps_up_then_schedule(schedule):
    cfg = RunConfig.flat(lr=1e-3, lr_schedule=schedule, num_server_rounds=8, warmup_rounds=3, lr_min_factor=0.1)
    values = lrs(cfg)
    warm = values[:3]
    assert all(0 < v < 1e-3 for v in warm)
    assert warm == sorted(warm) and len(set(warm)) == 3  # strictly increasing
    assert values[3] == pytest.approx(1e-3)  # first round after warm-up is the peak
    assert non_increasing(values[3:])
    if schedule != "constant":
        assert values[-1] == pytest.approx(1e-4)
    else:
        assert values[-1] == pytest.approx(1e-3)


def test_min_factor_one_is_constant():
    cfg = RunConfig.flat(lr=5e-4, lr_schedule="cosine", num_server_rounds=6, lr_min_factor=1.0)
    assert lrs(cfg) == pytest.approx([5e-4] * 6)
