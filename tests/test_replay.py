"""Updates are bound to their run and round: a replayed reply fails verification even with its digest intact."""

from __future__ import annotations

from conftest import RUN_ID
from federation import request, small_update, train_reply
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from zk0 import transport


def test_an_update_from_round_1_replayed_into_round_2_is_refused_whatever_its_round_field_says(strategy, round_state):
    replayed = train_reply(round_state, 101, small_update(0))  # sealed by its client in round 1
    replayed.content["payload"]["server-round"] = 2  # the field says round 2; the digest was bound to round 1
    (verdict,) = strategy.verify_train(2, [replayed])
    assert not verdict.accepted and "payload digest mismatch" in verdict.reason


def test_an_update_bound_to_another_run_is_refused_and_the_honest_one_accepted(strategy, round_state):
    honest = train_reply(round_state, 101, small_update(0))
    other_run = train_reply(round_state, 102, small_update(1))
    arrays = other_run.content["arrays"]
    other_run.content["payload"]["payload-digest"] = transport.digest(arrays, transport.binding(RUN_ID + 1, 1))
    verdicts = strategy.verify_train(1, [honest, other_run])
    assert [v.accepted for v in verdicts] == [True, False]
    assert "payload digest mismatch" in verdicts[1].reason


def test_the_binding_is_part_of_the_digest():
    record = transport.encode(small_update(0), "fp32")
    digests = {transport.digest(record), transport.digest(record, transport.binding(1, 1)),
               transport.digest(record, transport.binding(1, 2)), transport.digest(record, transport.binding(2, 1))}
    assert len(digests) == 4


def test_a_second_reply_from_the_same_node_is_refused_and_counted_once(strategy, round_state):
    first = train_reply(round_state, 101, small_update(0))
    again = train_reply(round_state, 101, small_update(1))  # well formed and sealed: still one node's second reply
    verdicts = strategy.verify_train(1, [first, again, train_reply(round_state, 102, small_update(2))])
    assert [v.accepted for v in verdicts] == [True, False, True]
    assert verdicts[1].reason == "duplicate train reply from node 101 in round 1"


def test_a_second_evaluation_from_the_same_node_is_refused(strategy):
    def evaluation(node: int, loss: float) -> Message:
        content = RecordDict({"metrics": MetricRecord({"eval-loss": loss, "eval-action-mae": 1.0, "num-examples": 4}),
                              "payload": ConfigRecord({"partition-id": node - 101, "dataset": f"set-{node}",
                                                       "server-round": 1})})
        return Message(content, reply_to=request(node, MessageType.EVALUATE))

    verdicts = strategy.verify_evaluate(1, [evaluation(101, 0.5), evaluation(101, 9.0), evaluation(102, 0.7)])
    assert [v.accepted for v in verdicts] == [True, False, True]
    assert verdicts[1].reason == "duplicate evaluate reply from node 101 in round 1"
    assert strategy.aggregate_evaluate(1, verdicts)["eval-loss"] == 0.6
