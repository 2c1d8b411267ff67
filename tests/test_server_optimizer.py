"""Server optimizers: a known sequence of averaged updates gives what Flower's own strategies give."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvgM, FedYogi

from zk0.flower_seams import set_task_identity
from zk0.server_optimizer import ServerOptimizer

ROUNDS = 4


def deltas(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """A known sequence of averaged client updates, one per round, of varying sign and size."""
    g = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(3, 4, generator=g) * 0.1 * (r + 1), "b": torch.randn(5, generator=g) * 0.01}
            for r in range(ROUNDS)]


def start() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}


def reply(weights: dict[str, np.ndarray]) -> Message:
    """One client's train reply carrying ``weights``: Flower's FedAvg averages it to exactly these."""
    set_task_identity(1, 1, 1)  # Flower's messages take their run and sender from the process's task
    content = RecordDict({"arrays": ArrayRecord({n: Array(w) for n, w in weights.items()}),
                          "metrics": MetricRecord({"num-examples": 1})})
    return Message(content, dst_node_id=1, message_type="train")


def flower_trajectory(strategy) -> list[dict[str, np.ndarray]]:
    """Flower's strategy fed the same sequence: each round the single reply is ``current + delta``."""
    current = {n: t.numpy().astype(np.float32) for n, t in start().items()}
    out = []
    for server_round, delta in enumerate(deltas(), start=1):
        strategy.current_arrays = (ArrayRecord({n: Array(w) for n, w in current.items()})
                                   if isinstance(strategy, FedAvgM) else dict(current))
        trained = {n: (current[n] + delta[n].numpy()).astype(np.float32) for n in current}
        arrays, _ = strategy.aggregate_train(server_round, [reply(trained)])
        current = {n: np.asarray(arrays[n].numpy(), dtype=np.float32) for n in current}
        out.append(current)
    return out


def zk0_trajectory(optimizer: ServerOptimizer) -> list[dict[str, np.ndarray]]:
    master = start()
    out = []
    for server_round, delta in enumerate(deltas(), start=1):
        optimizer.step(master, delta, server_round)
        out.append({n: t.numpy().copy() for n, t in master.items()})
    return out


@pytest.mark.parametrize(("ours", "flowers"), [
    (ServerOptimizer("fedavgm", lr=0.7, beta_1=0.9), FedAvgM(server_learning_rate=0.7, server_momentum=0.9)),
    (ServerOptimizer("fedadam", lr=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3), FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99,
                                                                                   tau=1e-3)),
    (ServerOptimizer("fedyogi", lr=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3), FedYogi(eta=0.01, beta_1=0.9,
                                                                                    beta_2=0.99, tau=1e-3)),
], ids=["fedavgm", "fedadam", "fedyogi"])
def test_matches_flowers_strategy(ours, flowers):
    for round_ours, round_flower in zip(zk0_trajectory(ours), flower_trajectory(flowers), strict=True):
        for name in round_ours:
            np.testing.assert_allclose(round_ours[name], round_flower[name], rtol=1e-5, atol=1e-6)


def test_none_adds_the_delta_and_momentum_zero_is_fedavg():
    plain, momentum_free = zk0_trajectory(ServerOptimizer("none")), zk0_trajectory(ServerOptimizer("fedavgm",
                                                                                                   beta_1=0.0))
    expected = start()
    for server_round, delta in enumerate(deltas()):
        for name in expected:
            expected[name] = expected[name] + delta[name]
            np.testing.assert_array_equal(plain[server_round][name], expected[name].numpy())
            np.testing.assert_allclose(momentum_free[server_round][name], expected[name].numpy(), rtol=1e-6)


def test_adam_moves_differently_from_plain_averaging():
    """The optimizer is really applied: FedAdam's trajectory is not FedAvg's."""
    adam, plain = zk0_trajectory(ServerOptimizer("fedadam", lr=0.1)), zk0_trajectory(ServerOptimizer("none"))
    assert not np.allclose(adam[-1]["a"], plain[-1]["a"])


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
def test_an_lr_factor_scales_each_step_as_that_smaller_lr_would(name):
    """server-lr-follows-schedule passes the round's factor: each round's step is that of lr x factor."""
    scaled, master = ServerOptimizer(name, lr=0.2), start()
    for server_round, (delta, factor) in enumerate(zip(deltas(), [1.0, 0.5, 0.25, 0.1]), start=1):
        before, expected = scaled.state_dict(), {n: t.clone() for n, t in master.items()}
        ServerOptimizer(name, lr=0.2 * factor, moments=before).step(expected, delta, server_round)
        scaled.step(master, delta, server_round, factor)
        for n in master:
            assert torch.equal(master[n], expected[n]), (server_round, n)
    plain = zk0_trajectory(ServerOptimizer(name, lr=0.2))[-1]
    assert not np.allclose(master["a"].numpy(), plain["a"]), "the factors changed the trajectory"


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
def test_state_dict_resumes_bit_identically(name):
    """Two rounds, save, a fresh optimizer loads the state, two more rounds: the same bits as four in one go."""
    whole = zk0_trajectory(ServerOptimizer(name, lr=0.05))[-1]
    first = ServerOptimizer(name, lr=0.05)
    master = start()
    sequence = deltas()
    for server_round, delta in enumerate(sequence[:2], start=1):
        first.step(master, delta, server_round)
    resumed = ServerOptimizer(name, lr=0.05)
    resumed.load_state_dict(first.state_dict())
    for server_round, delta in enumerate(sequence[2:], start=3):
        resumed.step(master, delta, server_round)
    for n in whole:
        assert torch.equal(master[n], torch.from_numpy(whole[n]))


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="server-optimizer must be one of"):
        ServerOptimizer("sgd")
