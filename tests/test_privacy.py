"""Differential privacy: clipping, the noise's scale, the accountant's ε, the statistics, the budget stop and resume,
checked on what clients sent and what the server kept."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from federation import final_master, run_federation
from flwr.app import Message, MessageType
from test_resilience import whole_and_resumed

from zk0 import privacy, transport
from zk0.config import ConfigError, RunConfig
from zk0.data import decode_stats
from zk0.policy import build_policy, trainable_state
from zk0.tracking import read_metrics

# ε of k releases of the Gaussian mechanism with noise multiplier σ at δ, as Flower's RdpAccountant reports it
# with its backend, Google's dp-accounting 0.6.0 (flwr[dp]): (σ, k, δ, ε)
LIBRARY_FIGURES = [(0.5, 1, 1e-5, 10.725509696418232), (0.5, 2, 1e-5, 16.512875946682545),
                   (1.0, 11, 1e-5, 20.25918687613612), (2.0, 101, 1e-6, 37.679216196844386),
                   (0.1, 4, 1e-3, 271.83540914171283)]


def dp_config(**values) -> RunConfig:
    return RunConfig.flat(**{"dp": "central", **values})


@pytest.mark.parametrize("sigma,releases,delta,epsilon", LIBRARY_FIGURES)
def test_epsilon_is_the_accountant_librarys_figure(sigma, releases, delta, epsilon):
    accountant = privacy.accountant(dp_config(dp_delta=delta))
    accountant.compose(privacy.release(sigma), releases)
    spent = accountant.get_privacy_spent()
    assert (spent.epsilon, spent.delta, spent.num_releases) == (pytest.approx(epsilon, rel=1e-12), delta, releases)


def test_a_target_epsilon_chooses_the_smallest_noise_that_meets_it():
    cfg = dp_config(dp_target_epsilon=8.0, num_server_rounds=10)
    sigma = privacy.noise_multiplier(cfg)

    def epsilon(multiplier: float) -> float:
        accountant = privacy.accountant(cfg)
        accountant.compose(privacy.release(multiplier), 11)  # the statistics and 10 rounds
        return accountant.get_epsilon(cfg.privacy.dp_delta)
    assert epsilon(sigma) <= 8.0 < epsilon(sigma * 0.999)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_clipping_bounds_the_update_the_server_decodes(dtype):
    cfg = dp_config(dp_clip_norm=0.5, transport_dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    large = {"a": torch.randn(300, 7, generator=generator), "b": torch.randn(1000, generator=generator) * 3}
    small = {name: tensor * 1e-4 for name, tensor in large.items()}
    before = {name: tensor.clone() for name, tensor in small.items()}
    for update in (large, small):
        privacy.privatize_update(update, cfg)
    decoded = transport.decode(transport.encode(large, dtype), dtype)
    assert 0.495 < norm(decoded) <= 0.5  # bf16: clipped 2^-8 tighter, then rounded
    assert all(torch.equal(small[name], before[name]) for name in small), "an update within the bound is unchanged"


def test_local_dp_noise_has_the_stated_scale():
    cfg = dp_config(dp="local", dp_clip_norm=2.0, dp_noise_multiplier=0.5)
    update = {"w": torch.zeros(1_000_000)}
    privacy.privatize_update(update, cfg)
    assert float(update["w"].std()) == pytest.approx(1.0, rel=0.01)  # multiplier x clip norm
    assert abs(float(update["w"].mean())) < 0.005


def test_central_dp_noise_on_the_mean_has_the_stated_scale_and_is_accounted():
    cfg = dp_config(dp_clip_norm=2.0, dp_noise_multiplier=0.5)
    state = privacy.Privacy(cfg)
    mean = {"w": torch.zeros(1_000_000)}
    record = state.release(mean, contributors=4, server_round=1)
    assert float(mean["w"].std()) == pytest.approx(0.25, rel=0.01)  # multiplier x clip norm / contributors
    assert (record["releases"], record["epsilon"]) == (2, pytest.approx(LIBRARY_FIGURES[1][3], rel=1e-12))


def reported(mean: list[float], std: list[float]) -> dict[str, dict[str, np.ndarray]]:
    """A client's stats of one state and one action feature (as data.vector_stats gives them)."""
    values = {"mean": np.array(mean), "std": np.array(std), "min": np.array(mean) - 50,
              "max": np.array(mean) + 50, "count": np.array([500])}
    return {"observation.state": values, "action": values}


def test_dp_stats_clip_each_client_and_carry_noise_of_the_stated_scale():
    cfg = dp_config(dp_noise_multiplier=0.5, dp_stats_bound=100.0)
    honest = [privacy.client_stats(reported([10.0, -20.0], [5.0, 8.0]), cfg) for _ in range(3)]
    hostile = privacy.client_stats(reported([1e6, 1e6], [1e6, 1e6]), cfg)
    assert all(np.array_equal(honest[0]["action"][k], [-100.0, -100.0] if k == "min" else [100.0, 100.0])
               for k in ("min", "max")), "min and max hold no frame's value"
    moments = np.concatenate([np.r_[hostile[key]["mean"], hostile[key]["std"]] for key in sorted(hostile)])
    assert np.linalg.norm(moments) == pytest.approx(100.0), "a client's report is clipped to norm 1 in units of B"
    events: list[dict] = []
    pooled = decode_stats(privacy.pool_stats(honest + [hostile], cfg, events.append, np.random.default_rng(7)))
    noise = 0.5 / 4 * np.random.default_rng(7).standard_normal(8) * 100.0  # multiplier / clients, times B
    clean = (3 * np.array([10.0, -20.0, 5.0, 8.0]) + moments[:4]) / 4
    for i, key in enumerate(sorted(pooled)):
        expected = clean + noise[4 * i:4 * i + 4]
        assert pooled[key]["mean"].numpy() == pytest.approx(expected[:2], abs=1e-4)
        assert pooled[key]["std"].numpy() == pytest.approx(np.maximum(expected[2:], 5.0), abs=1e-4)  # floor: B/20
    assert [(e["round"], e["event"], e["releases"]) for e in events] == [(0, "privacy", 1)]


@pytest.mark.parametrize("values,problem", [({"transport_dtype": "int8"}, "int8"),
                                            ({"aggregation": "median", "byzantine_clients": 1}, "aggregation=mean"),
                                            ({"dp_delta": 1.0}, "dp-delta"), ({"dp": "server"}, "dp")])
def test_configs_dp_cannot_keep_its_promise_with_are_refused(values, problem):
    with pytest.raises(ConfigError, match=problem):
        dp_config(**values)


def recording(replies: list[Message]):
    """Intercept that keeps every train and query reply."""
    def intercept(reply: Message) -> Message:
        if reply.metadata.message_type in (MessageType.TRAIN, MessageType.QUERY) and not reply.has_error():
            replies.append(reply)
        return reply
    return intercept


def norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors.values()))


def test_a_central_dp_round_clips_noises_accounts_and_says_so(run_config):
    """One round with two clients: each update on the wire is clipped, the global model moved by their equal-weight
    mean plus noise of the stated scale, the stats are noised, and ε is in the records, the summary and the card."""
    knobs = {"dp": "central", "dp_clip_norm": 0.1, "dp_noise_multiplier": 0.5, "num_server_rounds": 1,
             "transport_dtype": "fp32"}
    replies: list[Message] = []
    run_dir, _ = run_federation(run_config(**knobs), intercept=recording(replies))
    cfg = RunConfig.from_run_config(run_config(**knobs))
    updates = [transport.decode(r.content["arrays"], "fp32") for r in replies if r.metadata.message_type == "train"]
    assert len(updates) == 2 and all(norm(update) <= 0.1 * (1 + 1e-6) for update in updates)
    assert any(norm(update) > 0.0999 for update in updates), "round 1's updates are larger than the bound"
    initial = {n: t.detach().float() for n, t in trainable_state(build_policy(cfg)).items()}
    noise = torch.cat([(final_master(run_dir)[n] - initial[n] - (updates[0][n] + updates[1][n]) / 2).flatten()
                       for n in initial])
    assert float(noise.std()) == pytest.approx(0.5 * 0.1 / 2, rel=0.02) and abs(float(noise.mean())) < 1e-3

    reports = [json.loads(r.content["stats"]["norm-stats"]) for r in replies if r.metadata.message_type == "query"]
    bound = cfg.privacy.dp_stats_bound
    assert all(report[key]["max"] == [bound] * 6 for report in reports for key in report)
    clean = np.mean([report["action"]["mean"] for report in reports], axis=0)
    pooled = decode_stats(torch.load(run_dir / "server_state.pt", weights_only=True)["norm_stats"])
    offset = (pooled["action"]["mean"].numpy() - clean) / (0.5 * bound / 2)  # in units of the noise's std
    assert 0 < np.abs(offset).max() < 6, "the seeded run's pooled means carry noise of the stated scale"

    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "privacy"]
    assert [(r["round"], r["epsilon"]) for r in records] == [(0, pytest.approx(LIBRARY_FIGURES[0][3])),
                                                            (1, pytest.approx(LIBRARY_FIGURES[1][3]))]
    card = (run_dir / "checkpoints" / "round_1" / "README.md").read_text()
    assert "ε = 16.51" in card and "δ = 1e-05" in card
    assert "ε" in (run_dir / "zk0.log").read_text()


def test_the_budget_stops_the_run_after_the_last_round_it_affords(run_config):
    """dp-max-epsilon between 2 and 3 releases: round 1 runs, round 2 would exceed it, so round 1 is the final round:
    evaluated, checkpointed, one line saying why."""
    config = run_config(dp="central", dp_clip_norm=0.1, dp_noise_multiplier=0.5, num_server_rounds=3,
                        checkpoint_interval=5, dp_max_epsilon=20.0)
    run_dir, _ = run_federation(config)
    records = read_metrics(run_dir / "metrics.jsonl")
    assert max(r["round"] for r in records) == 1
    assert [r["epsilon"] for r in records if r.get("event") == "privacy"][-1] <= 20.0
    assert any(r["round"] == 1 and r["source"] == "client-eval" for r in records), "the final round is evaluated"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["round_1"]
    stops = [line for line in (run_dir / "zk0.log").read_text().splitlines() if "dp-max-epsilon" in line]
    assert len(stops) == 1 and "stopping after round 1 of 3: round 2 would spend ε=21.4" in stops[0]


def test_a_resumed_dp_run_keeps_the_accountant_and_the_noise_bit_identically(run_config, tmp_path, monkeypatch):
    """Fixed seeds stand in for the operating system's, so an uninterrupted run is the reference: the resumed run
    adds round 3's noise from the saved generator, not a fresh one."""
    monkeypatch.setattr(privacy, "secret_generator", lambda: torch.Generator().manual_seed(5))
    monkeypatch.setattr(privacy, "_numpy_generator", lambda: np.random.default_rng(5))
    knobs = {"dp": "central", "dp_clip_norm": 0.1, "dp_noise_multiplier": 0.5, "num_server_rounds": 3}
    whole, resumed = whole_and_resumed(run_config, tmp_path, 3, **knobs)
    a, b = final_master(whole), final_master(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    saved = [torch.load(run / "server_state.pt", weights_only=True)["privacy"]["accountant"]
             for run in (whole, resumed)]
    assert saved[0] == saved[1] and sum(c["count"] for c in saved[1]["compositions"]) == 4
