"""Server optimizers and dynamic tuning in the real ServerApp/ClientApp (in one process): what clients and the
global model actually got."""

from __future__ import annotations

import pytest
import torch
from federation import final_master, run_federation
from flwr.app import Message, MessageType
from test_resilience import whole_and_resumed

from zk0 import transport
from zk0.config import RunConfig
from zk0.policy import build_policy, trainable_state
from zk0.server_optimizer import ServerOptimizer
from zk0.strategy import round_lr, schedule_factor
from zk0.tracking import read_metrics
from zk0.tuning import Tuning


def recording(replies: list[Message]):
    """Intercept that keeps every accepted-looking train reply (the updates the server aggregates)."""
    def intercept(reply: Message) -> Message:
        if reply.metadata.message_type == MessageType.TRAIN and not reply.has_error():
            replies.append(reply)
        return reply
    return intercept


@pytest.mark.parametrize("optimizer", ["fedadam", "fedavgm"])
def test_the_global_model_moves_by_the_server_optimizers_step(run_config, optimizer):
    """One round: global = initial + the optimizer's step on the clients' num-examples-weighted mean update."""
    config = run_config(num_server_rounds=1, server_optimizer=optimizer, server_lr=0.05, transport_dtype="fp32")
    replies: list[Message] = []
    run_dir, _ = run_federation(config, intercept=recording(replies))
    cfg = RunConfig.from_run_config(config)
    initial = {n: t.detach().float().clone() for n, t in trainable_state(build_policy(cfg)).items()}
    weights = [float(r.content["metrics"]["num-examples"]) for r in replies]
    updates = [transport.decode(r.content["arrays"], "fp32") for r in replies]
    mean = {n: sum(u[n] * (w / sum(weights)) for u, w in zip(updates, weights)) for n in initial}
    expected = {n: t.clone() for n, t in initial.items()}
    fed = cfg.federation
    ServerOptimizer(optimizer, lr=0.05, beta_1=fed.server_momentum, beta_2=fed.server_beta2,
                    tau=fed.server_tau).step(expected, mean, 1)
    got = final_master(run_dir)
    assert len(replies) == 2
    for n in initial:
        assert torch.allclose(got[n], expected[n], atol=1e-6), n
    plain = {n: initial[n] + mean[n] for n in initial}
    assert any(not torch.allclose(got[n], plain[n], atol=1e-6) for n in initial), "the optimizer was applied"


def test_a_server_lr_that_follows_the_schedule_scales_every_rounds_step(run_config):
    """server-lr-follows-schedule: round r's server step is FedAdam's at server-lr x the lr schedule's factor."""
    config = run_config(num_server_rounds=2, server_optimizer="fedadam", server_lr=0.05, transport_dtype="fp32",
                        server_lr_follows_schedule=True, lr_schedule="cosine", lr_min_factor=0.2)
    replies: list[Message] = []
    run_dir, _ = run_federation(config, intercept=recording(replies))
    cfg = RunConfig.from_run_config(config)
    assert [schedule_factor(cfg, r) for r in (1, 2)] == pytest.approx([1.0, 0.2])
    initial = {n: t.detach().float().clone() for n, t in trainable_state(build_policy(cfg)).items()}
    fed = cfg.federation
    scheduled, constant = ({n: t.clone() for n, t in initial.items()} for _ in range(2))
    optimizers = [ServerOptimizer("fedadam", lr=0.05, beta_1=fed.server_momentum, beta_2=fed.server_beta2,
                                  tau=fed.server_tau) for _ in range(2)]
    for server_round in (1, 2):
        got = [r for r in replies if r.content["payload"]["server-round"] == server_round]
        weights = [float(r.content["metrics"]["num-examples"]) for r in got]
        updates = [transport.decode(r.content["arrays"], "fp32") for r in got]
        mean = {n: sum(u[n] * (w / sum(weights)) for u, w in zip(updates, weights)) for n in initial}
        assert len(got) == 2
        optimizers[0].step(scheduled, mean, server_round, schedule_factor(cfg, server_round))
        optimizers[1].step(constant, mean, server_round)
    final = final_master(run_dir)
    assert all(torch.allclose(final[n], scheduled[n], atol=1e-6) for n in initial)
    assert any(not torch.allclose(final[n], constant[n], atol=1e-6) for n in initial), "round 2's step was scaled"


def test_the_client_optimizer_reaches_the_clients(run_config, monkeypatch):
    """client-optimizer=sgd: every client's local training builds plain SGD at the round's lr, never AdamW."""
    built: list[tuple[str, float]] = []

    class SpySGD(torch.optim.SGD):
        def __init__(self, params, lr):
            built.append(("sgd", lr))
            super().__init__(params, lr=lr)

    class SpyAdamW(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            built.append(("adamw", kwargs["lr"]))
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "SGD", SpySGD)
    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    config = run_config(num_server_rounds=2, client_optimizer="sgd")
    run_dir, _ = run_federation(config)
    used = sorted(("sgd", r["lr"]) for r in read_metrics(run_dir / "metrics.jsonl") if r["source"] == "client")
    assert len(used) == 4 and sorted(built) == used


def test_adaptive_mu_and_plateau_lr_reach_the_clients(run_config):
    """What each client trained with (its own records) is what the tuning decided from the held-out losses."""
    config = run_config(num_server_rounds=3, adaptive_mu=True, mu_factor=2.0, dynamic_lr=True,
                        lr_plateau_patience=1, lr_plateau_threshold=0.99)  # every evaluation after the first: plateau
    run_dir, _ = run_federation(config)
    cfg = RunConfig.from_run_config(config)
    records = read_metrics(run_dir / "metrics.jsonl")
    expected, tuning = {}, Tuning(mu=cfg.federation.effective_mu)
    for server_round in range(cfg.federation.num_server_rounds + 1):
        expected[server_round] = (round_lr(cfg, server_round) * tuning.lr_factor, tuning.mu)
        losses = [r["eval-loss"] for r in records if r["source"] == "client-eval" and r["round"] == server_round]
        tuning.observe(sum(losses) / len(losses), cfg.tuning)
    for server_round in (1, 2, 3):
        used = [(r["lr"], r["proximal-mu"]) for r in records if r["source"] == "client" and r["round"] == server_round]
        assert len(used) == 2 and all(pair == pytest.approx(expected[server_round]) for pair in used), server_round
    assert [expected[r][0] / round_lr(cfg, r) for r in (1, 2, 3)] == pytest.approx([1.0, 0.5, 0.25])
    assert len({expected[r][1] for r in (1, 2, 3)}) > 1, "mu moved with the held-out loss"
    logged = [(r["round"], r["proximal-mu"], r["lr-factor"]) for r in records if r.get("event") == "tuning"]
    assert [round_ for round_, _, _ in logged] == [0, 1, 2, 3]


def test_a_resumed_run_keeps_the_optimizer_and_tuning_state_bit_identically(run_config, tmp_path):
    knobs = {"num_server_rounds": 3, "server_optimizer": "fedyogi", "server_lr": 0.02, "adaptive_mu": True,
             "dynamic_lr": True, "lr_plateau_patience": 1, "server_lr_follows_schedule": True}
    whole, resumed = whole_and_resumed(run_config, tmp_path, 3, **knobs)
    a, b = final_master(whole), final_master(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    saved = torch.load(resumed / "server_state.pt", weights_only=True)["tuned"]
    assert set(saved["server-optimizer"]) == {"m", "v"}
    lrs = [[r["lr"] for r in read_metrics(run / "metrics.jsonl") if r["source"] == "client" and r["round"] == 3]
           for run in (whole, resumed)]
    assert lrs[0] == lrs[1]
