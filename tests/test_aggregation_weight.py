"""``aggregation-weight``: the mean weights each update by the frames it trained on, or by its node's dataset."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import RUN_ID
from federation import final_master, run_federation, small_update, train_reply
from flwr.app import Message, MessageType

from zk0 import transport
from zk0.audit import read_audit
from zk0.config import ConfigError, RunConfig
from zk0.rounds import RoundState
from zk0.server_app import receive_train
from zk0.strategy import MAX_NODE_FRAMES, SmolVLAStrategy
from zk0.tracking import read_metrics

DATASETS = {101: 400, 102: 100, 103: 100}  # node: its training set's frames (one holds 4x the others')


def replies(state: RoundState, datasets: dict[int, object]) -> list[Message]:
    """A train reply per node, each trained on 8 frames and claiming its ``datasets`` frames (None: no claim)."""
    return [train_reply(state, node, small_update(node), {"num-examples": 8} | (
        {} if frames is None else {"dataset-frames": frames})) for node, frames in datasets.items()]


def moved_by(state: RoundState, messages: list[Message], weights: dict[int, int]) -> bool:
    """Whether the round moved the global tensors by the updates' mean weighted by ``weights``."""
    before = {name: tensor.clone() for name, tensor in state.master.items()}
    receive_train(SmolVLAStrategy(state.cfg, state.wire, RUN_ID), state, messages)
    reference = weighted_mean(weights)
    return all(torch.allclose(state.master[name], before[name] + reference[name], rtol=1e-6, atol=1e-7)
               for name in before)


def weighted_mean(weights: dict[int, int]) -> dict[str, torch.Tensor]:
    """The nodes' updates (``small_update(node)``) averaged with ``weights``."""
    total = sum(weights.values())
    return {name: sum(small_update(node)[name] * (w / total) for node, w in weights.items()) for name in ("a", "b")}


@pytest.mark.parametrize("weighting, expected", [("frames", {node: 8 for node in DATASETS}), ("dataset", DATASETS)])
def test_the_mean_and_the_audit_follow_the_chosen_weights(make_round_state, tmp_path, weighting, expected):
    state = make_round_state(aggregation_weight=weighting)
    assert moved_by(state, replies(state, DATASETS), expected)
    audited = {a["node"]: a["weight"] for a in read_audit(tmp_path) if a.get("status") == "accepted"}
    assert audited == expected


def test_central_dp_weighs_every_update_the_same(make_round_state, tmp_path):
    state = make_round_state(dp="central")
    receive_train(SmolVLAStrategy(state.cfg, state.wire, RUN_ID), state, replies(state, DATASETS))
    assert {a["node"]: a["weight"] for a in read_audit(tmp_path) if a.get("status") == "accepted"} == {
        node: 1 for node in DATASETS}


@pytest.mark.parametrize("claim", [None, math.nan, math.inf, 0, -5, 2.5, MAX_NODE_FRAMES + 1])
def test_an_implausible_dataset_claim_costs_that_reply_only(make_round_state, tmp_path, events, claim):
    state = make_round_state(aggregation_weight="dataset")
    messages = replies(state, {**DATASETS, 103: claim})
    assert moved_by(state, messages, {101: 400, 102: 100})
    (refused,) = [e for e in events if e.get("event") == "rejected-update"]
    assert refused["node"] == 103 and refused["reason"].startswith(
        f"dataset-frames must be a whole number in 1..{MAX_NODE_FRAMES}, got ")


def test_frames_weighting_needs_no_dataset_claim(make_round_state, tmp_path, events):
    state = make_round_state()
    messages = replies(state, dict.fromkeys(DATASETS))
    assert moved_by(state, messages, {node: 8 for node in DATASETS})
    assert not [e for e in events if e.get("event") == "rejected-update"]


@pytest.mark.parametrize("keys, message", [
    ({"aggregation_weight": "examples"}, r"'aggregation-weight' must be one of frames\|dataset, got 'examples'"),
    ({"aggregation_weight": "dataset", "aggregation": "krum"},
     "aggregation-weight' = dataset weights the mean, but aggregation=krum ignores weights"),
    ({"aggregation_weight": "dataset", "dp": "local"}, "dp needs aggregation-weight=frames"),
])
def test_weights_that_would_not_be_used_as_asked_are_refused(keys, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.flat(**keys)


def test_a_run_weighs_each_clients_update_by_the_dataset_it_reports(run_config):
    """Through the unchanged apps: each client reports its training set's frames (client records), the server
    weighs its update by them (audit), and the global model moves by exactly that weighted mean."""
    updates: dict[int, dict[str, torch.Tensor]] = {}

    def keep_update(reply: Message) -> Message:
        if reply.metadata.message_type == MessageType.TRAIN and not reply.has_error():
            updates[reply.metadata.src_node_id] = transport.decode(reply.content["arrays"], "fp32")
        return reply

    config = run_config(num_server_rounds=1, transport_dtype="fp32", aggregation_weight="dataset", eval_every=10)
    run_dir, grid = run_federation(config, num_nodes=3, intercept=keep_update)
    records = read_metrics(run_dir / "metrics.jsonl")
    reported = {r["partition"]: r["dataset-frames"] for r in records if r.get("source") == "client" and r["round"] == 1}
    trained = {r["partition"]: r["num-examples"] for r in records if r.get("source") == "client" and r["round"] == 1}
    assert len(set(reported.values())) > 1 and all(reported[p] > trained[p] for p in reported)
    node_of = {r["partition"]: r["node"] for r in records if r.get("event") == "client-dataset"}
    weights = {a["node"]: a["weight"] for a in read_audit(run_dir) if a.get("phase") == "train"
               and a.get("status") == "accepted"}
    assert weights == {node_of[p]: frames for p, frames in reported.items()}
    sent = next(transport.decode(m.content["arrays"], "fp32") for m in grid.sent
                if m.metadata.message_type == MessageType.TRAIN)
    total = sum(weights.values())
    expected = {n: sent[n] + sum(updates[node][n] * (w / total) for node, w in weights.items()) for n in sent}
    after = final_master(run_dir)
    assert all(torch.allclose(after[n], expected[n], rtol=1e-5, atol=1e-7) for n in sent)
