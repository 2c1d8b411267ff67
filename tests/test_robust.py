"""Robust aggregation: each rule on crafted updates against Flower's own, order-free bits, too few updates, config."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import RUN_ID
from federation import train_reply
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum

from zk0 import robust, transport
from zk0.audit import AuditLog
from zk0.config import ConfigError, RunConfig
from zk0.flower_seams import set_task_identity
from zk0.rounds import RoundState
from zk0.strategy import RoundFailed, SmolVLAStrategy

SHAPES = {"a": (6, 4), "b": (5,)}


def crafted(n: int, seed: int = 0, outlier: float | None = None) -> list[dict[str, torch.Tensor]]:
    """``n`` updates around a common direction; with ``outlier``, the last is the first sign-flipped and scaled."""
    gen = torch.Generator().manual_seed(seed)
    common = {name: torch.randn(shape, generator=gen) * 0.1 for name, shape in SHAPES.items()}
    updates = [{name: t + torch.randn(t.shape, generator=gen) * 0.02 for name, t in common.items()}
               for _ in range(n)]
    if outlier is not None:
        updates[-1] = {name: -outlier * t for name, t in updates[0].items()}
    return updates


def robust_state(tmp_path, events, dtype: str = "fp32", **robust_keys) -> RoundState:
    """Round 1 of a run over ``SHAPES`` with the robust rule of ``robust_keys``."""
    cfg = RunConfig.flat(transport_dtype=dtype, min_train_nodes=1, local_steps=2, batch_size=4, **robust_keys)
    master = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    return RoundState(cfg, master, "stats", "base", AuditLog(tmp_path), events.append, server_round=1)


def replies(state: RoundState, updates: list[dict[str, torch.Tensor]]) -> list[Message]:
    """Train replies of nodes 101.. carrying ``updates`` as their ClientApps seal them, with unequal weights."""
    return [train_reply(state, 101 + i, update, {"num-examples": 1 + i % 8}) for i, update in enumerate(updates)]


def aggregate(state: RoundState, messages: list[Message]) -> dict[str, torch.Tensor]:
    strategy = SmolVLAStrategy(state.cfg, state.wire, RUN_ID)
    mean = strategy.aggregate_train(1, strategy.verify_train(1, messages))
    return {name: t.clone() for name, t in mean.items()}


def flowers(strategy, travelled: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """Flower's strategy over the same values (as model weights: every client started from zeros)."""
    set_task_identity(1, 1, 1)
    messages = [Message(RecordDict({"arrays": ArrayRecord({n: Array(t.numpy()) for n, t in update.items()}),
                                    "metrics": MetricRecord({"num-examples": 1 + i % 8})}),
                        dst_node_id=1, message_type="train") for i, update in enumerate(travelled)]
    arrays, _ = strategy.aggregate_train(1, messages)
    return {name: arrays[name].numpy() for name in SHAPES}


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("n", [4, 5, 6])
@pytest.mark.parametrize(("rule", "flower"), [("median", FedMedian), ("trimmed-mean", FedTrimmedAvg)])
def test_coordinate_wise_rules_give_flowers_aggregate_of_what_travelled(tmp_path, events, server_identity, dtype,
                                                                         n, rule, flower):
    state = robust_state(tmp_path, events, dtype, aggregation=rule, trim_fraction=0.25, byzantine_clients=1)
    messages = replies(state, crafted(n, seed=n, outlier=50.0))
    travelled = [transport.decode(m.content["arrays"], dtype) for m in messages]
    ours = aggregate(state, messages)
    theirs = flowers(flower(beta=0.25) if rule == "trimmed-mean" else flower(), travelled)
    for name in SHAPES:
        assert np.allclose(ours[name].numpy(), theirs[name], rtol=1e-6, atol=1e-8), name
    if rule == "median":  # the middle value, or the mean of the middle two: the same arithmetic as np.median
        assert all(np.array_equal(ours[name].numpy(), theirs[name]) for name in SHAPES)
    hostile = travelled[-1]
    assert all(ours[name].abs().max() < 0.5 * hostile[name].abs().max() for name in SHAPES)


def test_krum_picks_a_benign_update_as_flowers_krum_does(tmp_path, events, server_identity):
    state = robust_state(tmp_path, events, aggregation="krum", byzantine_clients=1)
    messages = replies(state, crafted(5, outlier=3.0))
    travelled = [transport.decode(m.content["arrays"], "fp32") for m in messages]
    ours = aggregate(state, messages)
    (chosen,) = [i for i, update in enumerate(travelled) if all(torch.equal(ours[n], update[n]) for n in SHAPES)]
    assert chosen != 4, "the outlier is never Krum's choice"
    theirs = flowers(Krum(num_malicious_nodes=1), travelled)
    assert all(np.allclose(theirs[name], travelled[chosen][name].numpy(), rtol=1e-6) for name in SHAPES)


def test_krum_scores_by_the_n_minus_f_minus_2_nearest(server_identity):
    """Two colluding updates sit together, far from three spread honest ones: with f=1 Krum scores each by its
    2 nearest, so a colluder (1 near neighbour + 1 far) loses to the honest update at the centre; with f=0, by its
    3 nearest, where the far colluders count against the centre more than against an honest neighbour."""
    points = [torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0]),
              torch.tensor([10.0, 10.0]), torch.tensor([10.0, 10.1])]
    records = [transport.encode({"w": p}, "fp32") for p in points]
    distances = robust.pairwise_distances(records, "fp32", {"w": (2,)})
    assert distances[0][1] == pytest.approx(1.0) and distances[3][4] == pytest.approx(0.01, rel=1e-5)
    assert robust.krum_choice(records, "fp32", {"w": (2,)}, byzantine=1) == 0
    assert robust.krum_choice(records, "fp32", {"w": (2,)}, byzantine=0) == 1, "3 nearest: a colluder counts"
    assert robust.krum_choice(records[:4] + records[:1], "fp32", {"w": (2,)}, byzantine=1) == 0, "a tie: the first"


@pytest.mark.parametrize("rule", ["trimmed-mean", "median", "krum"])
def test_any_arrival_order_gives_the_same_bits(tmp_path, events, server_identity, rule):
    state = robust_state(tmp_path, events, "bf16", aggregation=rule, byzantine_clients=1)
    messages = replies(state, crafted(5, seed=3, outlier=10.0))
    results = [aggregate(state, list(order)) for order in itertools.islice(itertools.permutations(messages), 0, 120, 7)]
    assert all(torch.equal(result[n], results[0][n]) for result in results[1:] for n in SHAPES)


@pytest.mark.parametrize(("keys", "valid", "needs"), [
    ({"aggregation": "krum", "byzantine_clients": 1}, 4, "it needs 5;"),
    ({"aggregation": "median", "byzantine_clients": 2}, 4, "it needs 5;"),
    ({"aggregation": "trimmed-mean", "trim_fraction": 0.25, "byzantine_clients": 1}, 3,
     "it needs 4 (trim-fraction=0.25 drops 0 of 3 at each end);"),
])
def test_a_round_with_too_few_updates_for_the_rule_fails_naming_the_keys(tmp_path, events, server_identity, keys,
                                                                          valid, needs):
    state = robust_state(tmp_path, events, **keys)
    with pytest.raises(RoundFailed) as failed:
        aggregate(state, replies(state, crafted(valid)))
    message = str(failed.value)
    assert f"{valid} valid update(s), too few for aggregation={keys['aggregation']}" in message
    assert needs in message and f"byzantine-clients={keys['byzantine_clients']}" in message and "\n" not in message


def test_min_updates_is_the_fewest_that_trim_enough():
    for fraction in (0.05, 0.1, 0.2, 0.25, 0.3, 1 / 3, 0.45, 0.49):
        for hostile in range(1, 6):
            fewest = next(n for n in itertools.count(1) if int(fraction * n) >= hostile)
            assert robust.min_updates("trimmed-mean", hostile, fraction) == fewest, (fraction, hostile)
    assert robust.min_updates("trimmed-mean", 0, 0.0) == robust.min_updates("mean", 3, 0.25) == 1
    assert (robust.min_updates("median", 1, 0.25), robust.min_updates("krum", 2, 0.25)) == (3, 7)


@pytest.mark.parametrize(("keys", "message"), [
    ({"aggregation": "trimmed_mean"}, "'aggregation' must be one of mean|trimmed-mean|median|krum"),
    ({"trim_fraction": 0.5}, "'trim-fraction' must be in [0, 0.5)"),
    ({"trim_fraction": -0.1}, "'trim-fraction' must be in [0, 0.5)"),
    ({"byzantine_clients": -1}, "'byzantine-clients' must be >= 0"),
    ({"aggregation": "trimmed-mean", "trim_fraction": 0.0}, "trim-fraction' = 0 trims nothing"),
])
def test_bad_robust_keys_are_refused_in_one_line(keys, message):
    with pytest.raises(ConfigError) as refused:
        RunConfig.flat(**keys)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_trimmed_mean_without_hostile_clients_may_trim_nothing(tmp_path, events, server_identity):
    state = robust_state(tmp_path, events, aggregation="trimmed-mean", trim_fraction=0.0, byzantine_clients=0)
    messages = replies(state, crafted(3))
    travelled = [transport.decode(m.content["arrays"], "fp32") for m in messages]
    ours = aggregate(state, messages)
    assert all(torch.allclose(ours[n], sum(t[n] for t in travelled) / 3, rtol=1e-6) for n in SHAPES)
