"""Adaptive mu and plateau lr: how they react to a known sequence of held-out losses."""

from __future__ import annotations

import pytest

from zk0.config import TuningConfig
from zk0.tuning import Tuning


def run(losses, rules, mu=0.01):
    tuning = Tuning(mu=mu)
    trace = []
    for loss in losses:
        tuning.observe(loss, rules)
        trace.append((tuning.mu, tuning.lr_factor))
    return tuning, trace


def test_adaptive_mu_rises_with_the_loss_falls_with_it_within_bounds():
    rules = TuningConfig(adaptive_mu=True, mu_min=0.005, mu_max=0.04, mu_factor=2.0)
    _, trace = run([1.0, 1.2, 1.3, 1.4, 1.0, 0.9, 0.8, 0.7], rules)
    mus = [mu for mu, _ in trace]
    assert mus == pytest.approx([0.01, 0.02, 0.04, 0.04, 0.02, 0.01, 0.005, 0.005])


def test_mu_stays_fixed_unless_adaptive_and_zero_stays_zero():
    assert [mu for mu, _ in run([1.0, 2.0, 3.0], TuningConfig())[1]] == [0.01, 0.01, 0.01]
    assert [mu for mu, _ in run([1.0, 2.0, 3.0], TuningConfig(adaptive_mu=True), mu=0.0)[1]] == [0.0, 0.0, 0.0]


def test_plateau_halves_the_lr_after_patience_evaluations_without_improvement():
    rules = TuningConfig(dynamic_lr=True, lr_plateau_patience=2, lr_plateau_factor=0.5, lr_plateau_threshold=0.01)
    losses = [1.0, 0.9, 0.899, 0.9, 0.95, 0.8, 0.8, 0.8]
    factors = [factor for _, factor in run(losses, rules)[1]]
    # 0.899 is within 1 % of 0.9 (stale 1), 0.9 (stale 2): halve; 0.95 (1), 0.8 improves (0), then 2 stale: halve
    assert factors == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25]


def test_lr_factor_stays_one_without_dynamic_lr():
    assert {factor for _, factor in run([1.0, 1.0, 1.0, 1.0, 1.0], TuningConfig())[1]} == {1.0}


def test_observe_says_what_changed():
    tuning = Tuning(mu=0.01)
    rules = TuningConfig(adaptive_mu=True, dynamic_lr=True, lr_plateau_patience=1)
    assert tuning.observe(1.0, rules) == []
    changes = tuning.observe(1.5, rules)
    assert any("proximal mu 0.01 -> 0.02" in c and "rose" in c for c in changes)
    assert any(c.startswith("lr factor -> 0.5") for c in changes)


def test_state_round_trips():
    tuning, _ = run([1.0, 1.3, 1.2], TuningConfig(adaptive_mu=True, dynamic_lr=True))
    again = Tuning.from_state_dict(tuning.state_dict())
    assert again == tuning
    rules = TuningConfig(adaptive_mu=True, dynamic_lr=True)
    assert again.observe(1.25, rules) == tuning.observe(1.25, rules) and again == tuning
