"""A node's ``num-examples`` and reply fields are untrusted: bad ones cost that reply, never the global model."""

from __future__ import annotations

import math

import pytest
import torch
from federation import final_master, request, run_federation, small_update, train_reply
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from zk0 import transport
from zk0.audit import read_audit
from zk0.rounds import RoundState
from zk0.server_app import receive_evaluate, receive_train
from zk0.strategy import SmolVLAStrategy, num_examples
from zk0.tracking import read_metrics

FORGED = {(1, 102): math.nan, (1, 103): math.inf, (2, 102): -8, (2, 103): 1e30}  # (round, node): num-examples


def forge_num_examples(good: dict[int, dict[str, torch.Tensor]]):
    """Intercept: set the ``FORGED`` weights in transit; keep node 101's honest update of each round in ``good``."""
    def intercept(reply: Message) -> Message:
        if reply.metadata.message_type != MessageType.TRAIN or reply.has_error():
            return reply
        key = (int(reply.content["payload"]["server-round"]), reply.metadata.src_node_id)
        if key in FORGED:
            reply.content["metrics"]["num-examples"] = FORGED[key]
        else:
            good[key[0]] = transport.decode(reply.content["arrays"], "fp32")
        return reply
    return intercept


def test_forged_weights_are_rejected_and_the_honest_update_is_applied_exactly(run_config):
    good: dict[int, dict[str, torch.Tensor]] = {}
    config = run_config(num_server_rounds=2, min_train_nodes=1, transport_dtype="fp32", eval_every=10)
    run_dir, grid = run_federation(config, num_nodes=3, intercept=forge_num_examples(good))
    sent = {int(m.content["config"]["server-round"]): transport.decode(m.content["arrays"], "fp32")
            for m in grid.sent if m.metadata.message_type == MessageType.TRAIN and m.metadata.dst_node_id == 101}
    after = {1: sent[2], 2: final_master(run_dir)}
    for server_round in (1, 2):
        assert all(torch.equal(after[server_round][n], sent[server_round][n] + good[server_round][n]) for n in sent[1])
    rejected = sorted((r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "rejected-update"),
                      key=lambda r: (r["round"], r["node"]))
    assert [(r["round"], r["node"]) for r in rejected] == list(FORGED)
    for record, claimed in zip(rejected, ("nan", "inf", "-8", "1e+30")):
        assert record["reason"] == f"num-examples must be a whole number in 1..8, got {claimed}"
    audited = [a for a in read_audit(run_dir) if a["direction"] == "received" and a["status"] == "rejected"]
    assert sorted((a["round"], a["node"], a["reason"]) for a in audited) == [(r["round"], r["node"], r["reason"])
                                                                              for r in rejected]


def rejected_reasons(events: list[dict]) -> list[str]:
    return [e["reason"] for e in events if e.get("event") == "rejected-update"]


def aggregate_with_an_honest_update(strategy: SmolVLAStrategy, round_state: RoundState, bad: Message) -> None:
    """Aggregate ``bad`` next to an honest reply and check the global tensors moved by exactly the honest update."""
    before = {n: t.clone() for n, t in round_state.master.items()}
    honest = small_update(0)
    receive_train(strategy, round_state, [bad, train_reply(round_state, 101, honest)])
    assert all(torch.equal(round_state.master[n], before[n] + honest[n]) for n in before)


@pytest.mark.parametrize("claimed", [math.nan, math.inf, -math.inf, -8, 0, 8.5, 9, 1e30, 10**30, [8]])
def test_num_examples_that_is_no_whole_frame_count_the_steps_allow_is_rejected(strategy, round_state, events,
                                                                                claimed):
    bad = train_reply(round_state, 102, small_update(1), {"num-examples": claimed})
    aggregate_with_an_honest_update(strategy, round_state, bad)
    (reason,) = rejected_reasons(events)
    assert "num-examples" in reason or "single numbers" in reason
    assert [e["node"] for e in events if e["source"] == "client"] == [101]


@pytest.mark.parametrize("claimed", [True, "8", None, 8.5, math.nan])
def test_num_examples_rejects_what_is_not_a_whole_number(claimed):
    with pytest.raises(transport.PayloadError, match=r"num-examples must be a whole number in 1\.\.8"):
        num_examples({"num-examples": claimed}, 8)


def test_integral_float_num_examples_is_accepted(strategy, round_state, events):
    assert num_examples(MetricRecord({"num-examples": 8.0}), 8) == 8
    updates = [small_update(1), small_update(2)]
    before = {n: t.clone() for n, t in round_state.master.items()}
    receive_train(strategy, round_state, [train_reply(round_state, 101, updates[0], {"num-examples": 8.0}),
                                          train_reply(round_state, 102, updates[1], {"num-examples": 2})])
    assert rejected_reasons(events) == []
    expected = {n: before[n] + (updates[0][n] * 0.8 + updates[1][n] * 0.2) for n in before}
    assert all(torch.allclose(round_state.master[n], expected[n]) for n in before)


def without(reply: Message, record: str, key: str | None = None) -> Message:
    """``reply`` with a record, or one key of it, removed in transit."""
    if key is None:
        del reply.content[record]
    else:
        del reply.content[record][key]
    return reply


@pytest.mark.parametrize(("break_it", "expected"), [
    (lambda r: without(r, "payload"), "malformed reply: KeyError: 'payload'"),
    (lambda r: without(r, "metrics"), "malformed reply: KeyError: 'metrics'"),
    (lambda r: without(r, "arrays"), "malformed reply: KeyError: 'arrays'"),
    (lambda r: without(r, "metrics", "num-examples"), "got None"),
    (lambda r: without(r, "payload", "dataset"), "malformed reply: KeyError: 'dataset'"),
    (lambda r: without(r, "payload", "payload-digest"), "malformed reply: KeyError: 'payload-digest'"),
])
def test_a_reply_missing_a_field_is_rejected_and_the_round_goes_on(strategy, round_state, events, break_it,
                                                                   expected):
    aggregate_with_an_honest_update(strategy, round_state, break_it(train_reply(round_state, 102, small_update(1))))
    (reason,) = rejected_reasons(events)
    assert expected in reason and "\n" not in reason


def test_a_reply_whose_partition_id_is_not_a_number_is_rejected_before_ordering(strategy, round_state, events):
    bad = train_reply(round_state, 102, small_update(1))
    bad.content["payload"]["partition-id"] = "first"
    aggregate_with_an_honest_update(strategy, round_state, bad)
    assert rejected_reasons(events) == ["payload needs a whole-number partition-id and a dataset name"]


def test_metrics_cannot_overwrite_the_servers_fields(strategy, round_state, events):
    receive_train(strategy, round_state, [train_reply(round_state, 101, small_update(1),
                                                      {"round": 99, "node": 7, "partition": 5})])
    (event,) = [e for e in events if e["source"] == "client"]
    assert (event["round"], event["node"], event["partition"]) == (1, 101, 0)


def eval_reply(node: int, frames: float) -> Message:
    metrics = MetricRecord({"eval-loss": float(node), "num-examples": frames})
    payload = ConfigRecord({"partition-id": node - 101, "dataset": f"set-{node}", "server-round": 1})
    return Message(RecordDict({"metrics": metrics, "payload": payload}), reply_to=request(node, MessageType.EVALUATE))


def test_evaluate_replies_are_checked_the_same_way(strategy, round_state, events):
    error = Message(Error(code=1, reason="boom"), reply_to=request(104, MessageType.EVALUATE))
    metrics = receive_evaluate(strategy, round_state, [eval_reply(101, 4), eval_reply(102, math.nan),
                                                       eval_reply(103, 5), without(eval_reply(105, 4), "payload"),
                                                       error])
    assert metrics["eval-loss"] == 101.0
    assert [e["node"] for e in events if e.get("event") == "rejected-update"] == [102, 103, 105, 104]
    assert rejected_reasons(events)[-1] == "client error: boom"
