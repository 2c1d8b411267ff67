"""The round loop with the real ServerApp and ClientApp in one process: a round's federated evaluation travels in
the next round's train messages (the model goes down once per round) with the results of evaluating on its own;
a round that fails still ends the previous one, and a resume redoes a pending end once; each part is timed."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from federation import final_master, request, run_federation, small_update, train_reply
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from zk0.audit import read_audit
from zk0.checkpoint import STATE_FILE
from zk0.server_app import carried_evaluation
from zk0.strategy import RoundFailed, SmolVLAStrategy
from zk0.tracking import read_metrics

ROUNDS = 3
NODES = (101, 102, 103)
# 2 of the 3 nodes train each round and all 3 evaluate: one of them through an evaluate message of its own
SAMPLED = {"num-server-rounds": ROUNDS, "fraction-train": 0.67, "min-train-nodes": 2, "min-evaluate-nodes": 1,
           "checkpoint-interval": 1}


def evaluations(records: list[dict], source: str) -> dict[tuple, tuple]:
    """Held-out (``client-eval``, by round and node) or unseen-task (``server``, by dataset) metrics."""
    return {(r["round"], r.get("node", r.get("dataset"))): (r["eval-loss"], r["eval-action-mae"])
            for r in records if r["source"] == source and "eval-loss" in r}


@pytest.fixture(scope="module")
def both_ways(tmp_path_factory):
    """The same run with each evaluation in the next round's train messages, and with every evaluation on its own
    (as before evaluations travelled with training)."""
    from _pytest.monkeypatch import MonkeyPatch
    from conftest import FAST, ROOT
    from flwr.common.config import get_fused_config_from_dir

    def run(separate: bool) -> tuple:
        config = get_fused_config_from_dir(ROOT, {**FAST, **SAMPLED, "output-dir": str(tmp_path_factory.mktemp("o"))})
        with MonkeyPatch.context() as patch:
            if separate:
                patch.setattr(SmolVLAStrategy, "evaluates_with_next_train", lambda self, server_round: False)
            run_dir, grid = run_federation(config, num_nodes=len(NODES))
        return run_dir, grid, read_metrics(run_dir / "metrics.jsonl")

    return {"in-train": run(separate=False), "separate": run(separate=True)}


def test_held_out_metrics_and_weights_are_those_of_separate_evaluations(both_ways):
    (new_dir, _, new), (old_dir, _, old) = both_ways["in-train"], both_ways["separate"]
    held_out, before = evaluations(new, "client-eval"), evaluations(old, "client-eval")
    assert sorted(held_out) == sorted(before) == [(r, node) for r in range(ROUNDS + 1) for node in NODES]
    for key, values in before.items():
        assert held_out[key] == pytest.approx(values, rel=1e-6), key
    unseen, before = evaluations(new, "server"), evaluations(old, "server")
    assert unseen.keys() == before.keys() and all(unseen[k] == pytest.approx(v, rel=1e-6) for k, v in before.items())
    trained = sorted((r["round"], r["node"]) for r in new if r["source"] == "client")
    assert trained == sorted((r["round"], r["node"]) for r in old if r["source"] == "client")  # the same draws
    assert len(trained) == 2 * ROUNDS
    a, b = final_master(new_dir), final_master(old_dir)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_the_model_goes_down_once_per_node_and_round_except_the_last(both_ways):
    """Round r's bytes: its train messages, plus the evaluate messages of its evaluating nodes that do not train
    in round r+1 (the last round's evaluation goes on its own)."""
    models_sent = {"in-train": [1, 3, 3, 2 + 3], "separate": [3, 2 + 3, 2 + 3, 2 + 3]}
    for mode, models in models_sent.items():
        run_dir, grid, records = both_ways[mode]
        (size,) = {a["bytes"] for a in read_audit(run_dir) if a["direction"] == "sent" and "bytes" in a}
        down = {r["round"]: r["bytes-down"] for r in records if r.get("event") == "round"}
        assert [down[r] for r in range(ROUNDS + 1)] == [n * size for n in models], mode
        assert len([m for m in grid.sent if m.metadata.message_type != MessageType.QUERY]) == sum(models)


def test_the_audit_says_which_train_messages_asked_for_an_evaluation(both_ways):
    run_dir, _, _ = both_ways["in-train"]
    audit = read_audit(run_dir)
    trains = [a for a in audit if a["phase"] == "train" and a["direction"] == "sent"]
    assert len(trains) == 2 * ROUNDS and all(a["evaluate-first"] for a in trains)
    answers = [a for a in audit if a["phase"] == "evaluate" and a["direction"] == "received"]
    assert Counter(a["round"] for a in answers) == {r: len(NODES) for r in range(ROUNDS + 1)}
    assert all(a["status"] == "accepted" and "bytes" not in a for a in answers)
    evaluate_sent = Counter(a["round"] for a in audit if a["phase"] == "evaluate" and a["direction"] == "sent")
    assert evaluate_sent == {r: 1 for r in range(ROUNDS)} | {ROUNDS: len(NODES)}


def test_each_part_of_a_round_is_timed_by_the_server_and_the_clients(both_ways):
    _, _, records = both_ways["in-train"]
    ends = {r["round"]: r for r in records if r.get("event") == "round"}
    for server_round in range(1, ROUNDS + 1):
        end = ends[server_round]
        assert all(end[f"{part}-seconds"] > 0 for part in ("seal", "exchange", "aggregate", "server-eval",
                                                            "checkpoint"))
        trained = [r for r in records if r["source"] == "client" and r["round"] == server_round]
        evaluated = [r for r in records if r["source"] == "client-eval" and r["round"] == server_round - 1]
        assert all(r["train-seconds"] > 0 and r["codec-seconds"] > 0 for r in trained)
        assert all(r["eval-seconds"] > 0 for r in evaluated)
        clients = sum(r["train-seconds"] + r["codec-seconds"] for r in trained) + sum(r["eval-seconds"]
                                                                                      for r in evaluated)
        assert end["exchange-seconds"] + 1e-3 >= clients  # in one process the exchange runs the clients


def drop_first_train_reply(server_round: int, dropped: list[int]):
    """Intercept: the first train reply of ``server_round`` never arrives (its node is recorded in ``dropped``)."""
    def intercept(reply: Message) -> Message | None:
        if (not dropped and reply.metadata.message_type == MessageType.TRAIN and not reply.has_error()
                and int(reply.content["payload"]["server-round"]) == server_round):
            dropped.append(reply.metadata.src_node_id)
            return None
        return reply
    return intercept


def test_a_failed_round_ends_the_previous_one_and_a_resume_redoes_that_end_once(both_ways, run_config, tmp_path):
    """Round 2 fails (one of its two trainers is lost): round 1 still ends with the evaluations that came in.
    The state saved before round 2 has round 1's end pending: the resumed run redoes it with round 2, logs
    every record once, and ends with the weights of the run that never failed."""
    config = run_config(**SAMPLED)
    dropped: list[int] = []
    with pytest.raises(RoundFailed, match="round 2"):
        run_federation(config, num_nodes=len(NODES), intercept=drop_first_train_reply(2, dropped))
    (run_dir,) = (tmp_path / "outputs").iterdir()
    records = read_metrics(run_dir / "metrics.jsonl")
    assert sorted(r["node"] for r in records if r["source"] == "client-eval" and r["round"] == 1) == sorted(
        set(NODES) - set(dropped))
    assert [r["round"] for r in records if r.get("event") == "round"] == [0, 1]
    saved = torch.load(run_dir / STATE_FILE, weights_only=True)
    assert saved["server_round"] == 1 and [r["source"] for r in saved["pending_end"]] == ["client", "client"]

    run_federation({**config, "resume-from": str(run_dir)}, num_nodes=len(NODES))
    records = read_metrics(run_dir / "metrics.jsonl")
    kinds = Counter((r["round"], r["source"], r.get("event"), r.get("node"), r.get("dataset")) for r in records)
    assert max(kinds.values()) == 1, [k for k, n in kinds.items() if n > 1]
    assert sorted(evaluations(records, "client-eval")) == sorted(evaluations(both_ways["in-train"][2], "client-eval"))
    a, b = final_master(run_dir), final_master(both_ways["in-train"][0])
    assert all(torch.equal(a[n], b[n]) for n in a)
    # round 1's own train bytes, counted before the stop, are in its record along with its evaluations'
    ends = {r["round"]: r for r in records if r.get("event") == "round"}
    unbroken = {r["round"]: r for r in both_ways["in-train"][2] if r.get("event") == "round"}
    assert {k: ends[1][k] for k in ("bytes-down", "bytes-up")} == {k: unbroken[1][k] for k in ("bytes-down", "bytes-up")}
    assert ends[1]["aggregate-seconds"] > 0


def test_the_evaluation_a_train_reply_carries_is_checked_as_an_evaluate_reply(strategy, round_state, events):
    """Asked ``evaluate-first``, a reply's ``eval-metrics`` are the node's evaluate reply for the model it received:
    checked and logged as one; a reply without them is refused as an evaluation (its update is judged apart)."""
    asked = Message(RecordDict({"config": ConfigRecord({"server-round": 1, "evaluate-first": True})}),
                    dst_node_id=0, message_type=MessageType.TRAIN)
    requests = {node: request_to(node, asked) for node in (101, 102)}
    replies = []
    for node, carries in ((101, True), (102, False)):
        content = train_reply(round_state, node, small_update(node)).content
        if carries:
            content["eval-metrics"] = MetricRecord({"eval-loss": 0.5, "eval-action-mae": 2.0, "num-examples": 4})
        replies.append(Message(content, reply_to=requests[node]))
    verdicts = strategy.verify_evaluate(1, [carried_evaluation(reply, requests[reply.metadata.src_node_id])
                                            for reply in replies])
    round_state.received("evaluate", verdicts, 0)
    (logged,) = [e for e in events if e["source"] == "client-eval"]
    assert (logged["round"], logged["node"], logged["eval-loss"], logged["num-examples"]) == (0, 101, 0.5, 4)
    (refused,) = [e for e in events if e.get("event") == "rejected-update"]
    assert (refused["round"], refused["node"], refused["phase"]) == (0, 102, "evaluate")
    assert refused["reason"].startswith("malformed reply")
    assert [v.accepted for v in strategy.verify_train(1, replies)] == [True, True]


def request_to(node: int, like: Message) -> Message:
    """``like`` as the grid sent it to ``node`` (a message id, the server as sender)."""
    message = request(node, like.metadata.message_type)
    message.content["config"] = like.content["config"]
    return message


def test_a_node_whose_evaluation_fails_still_trains_every_round(run_config, monkeypatch):
    """The evaluation a train message carries can fail (a broken held-out video) on one node: that evaluation is
    a failed one, with its one-line reason, and the node's update of the same reply still counts."""
    from zk0 import client_app

    evaluate = client_app.held_out_metrics

    def broken_on_partition_1(rt, pre, post):
        if rt.partition_id == 1:
            raise ValueError("video /home/owner/private/ep7.mp4 does not decode")
        return evaluate(rt, pre, post)

    monkeypatch.setattr(client_app, "held_out_metrics", broken_on_partition_1)
    run_dir, grid = run_federation(run_config(**{"num-server-rounds": ROUNDS, "min-evaluate-nodes": 1}))
    records = read_metrics(run_dir / "metrics.jsonl")
    broken = 102  # partition 1
    trained = Counter(r["round"] for r in records if r["source"] == "client" and r.get("node") == broken)
    assert trained == Counter(range(1, ROUNDS + 1))
    accepted = {(a["round"], a["node"]) for a in read_audit(run_dir)
                if a["phase"] == "train" and a["direction"] == "received" and a["status"] == "accepted"}
    assert {(r, broken) for r in range(1, ROUNDS + 1)} <= accepted
    failed = [r for r in records if r.get("node") == broken and r.get("phase") == "evaluate"]
    assert sorted(r["round"] for r in failed) == list(range(ROUNDS + 1))
    assert all("ValueError: video ep7.mp4 does not decode" in r["reason"] for r in failed), [r["reason"] for r in failed]
    assert not [r for r in records if r["source"] == "client-eval" and r.get("node") == broken]
