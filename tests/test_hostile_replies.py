"""Query and round replies are untrusted: a hostile one is rejected in one line and the run pools the honest ones."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from federation import final_master, run_federation
from federation import request
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from zk0 import data, dataset_facts, server_app, transport
from zk0.audit import read_audit
from zk0.strategy import checked_query, judge
from zk0.tracking import read_metrics

SIZES = {data.STATE: 6, data.ACTION: 6}
HOSTILE, REPLAYING = 102, 103  # node 102's query reply is altered in transit; node 103 replays its train reply


def edit_stats(change):
    """An alteration of the reply's norm-stats JSON: ``change`` edits each feature's stats in place."""
    def alter(reply: Message) -> None:
        stats = json.loads(reply.content["stats"]["norm-stats"])
        for feature in stats.values():
            change(feature)
        reply.content["stats"]["norm-stats"] = json.dumps(stats)
    return alter


def set_item(record: str, key: str, value):
    def alter(reply: Message) -> None:
        reply.content[record][key] = value
    return alter


def drop_stats(reply: Message) -> None:
    del reply.content["stats"]


CASES = {  # name: (alteration, what the one-line reason says)
    "not-json": (set_item("stats", "norm-stats", "{not json"), "implausible norm-stats: not JSON (Expecting"),
    "no-stats-record": (drop_stats, "malformed reply: KeyError: 'stats'"),
    "partition-id-abc": (set_item("stats", "partition-id", "abc"),
                         "stats needs a whole-number partition-id and a dataset name"),
    "huge-mean-and-count": (edit_stats(lambda f: f.update(mean=[1e6] * 6, count=[1e12])),
                            "implausible norm-stats: action count must be one whole number in 1.."),
    "nan-std": (edit_stats(lambda f: f["std"].__setitem__(0, math.nan)),
                "implausible norm-stats: action stats must be finite"),
    "min-above-max": (edit_stats(lambda f: f.update(min=[m + 1 for m in f["max"]])),
                      "implausible norm-stats: action needs min <= mean <= max"),
    "robot-type-escape": (set_item("stats", "robot-type", "\x1b[2Jso101"),
                          "implausible dataset facts: robot-type must be one printable line"),
    "train-episodes-beyond-frames": (set_item("stats", "train-episodes", 10**9),
                                     "implausible dataset facts: train-episodes must be a whole number in 1.."),
}


def hostile(alter, honest: dict[int, str], updates: dict[int, tuple[dict, float]]):
    """Intercept: alter node 102's query reply, replay node 103's train reply as round 99; record what is honest."""
    def intercept(reply: Message) -> Message:
        node, kind = reply.metadata.src_node_id, reply.metadata.message_type
        if kind == MessageType.QUERY:
            if node == HOSTILE:
                alter(reply)
            else:
                honest[node] = str(reply.content["stats"]["norm-stats"])
        elif kind == MessageType.TRAIN and node == REPLAYING:
            reply.content["payload"]["server-round"] = 99
        elif kind == MessageType.TRAIN:
            weight = reply.content["metrics"]["num-examples"]
            updates[node] = (transport.decode(reply.content["arrays"], "fp32"), weight)
        return reply
    return intercept


@pytest.fixture(scope="module", params=list(CASES))
def hostile_run(request, tmp_path_factory):
    """One round with 3 nodes (min-train-nodes=2): a hostile query reply and a replayed train reply."""
    from conftest import FAST, ROOT
    from flwr.common.config import get_fused_config_from_dir

    config = get_fused_config_from_dir(ROOT, {**FAST, "num-server-rounds": 1, "min-train-nodes": 2,
                                              "transport-dtype": "fp32",
                                              "output-dir": str(tmp_path_factory.mktemp("outputs"))})
    honest, updates = {}, {}
    alter, reason = CASES[request.param]
    run_dir, grid = run_federation(config, num_nodes=3, intercept=hostile(alter, honest, updates))
    return run_dir, grid, honest, updates, reason


def rejections(run_dir, phase: str) -> list[tuple[int, str]]:
    audited = [(a["node"], a["reason"]) for a in read_audit(run_dir)
               if a["phase"] == phase and a["direction"] == "received" and a["status"] == "rejected"]
    reported = [(r["node"], r["reason"]) for r in read_metrics(run_dir / "metrics.jsonl")
                if r.get("event") == "rejected-update" and r["phase"] == phase]
    assert audited == reported
    return audited


def test_a_hostile_query_reply_is_rejected_and_the_honest_stats_are_pooled(hostile_run):
    run_dir, grid, honest, _, reason = hostile_run
    ((node, logged),) = rejections(run_dir, "query")
    assert node == HOSTILE and logged.startswith(reason) and "\n" not in logged
    received = {str(m.content["config"]["norm-stats"]) for m in grid.sent
                if m.metadata.message_type == MessageType.TRAIN}
    assert received == {data.pool_stats([honest[101], honest[103]])}  # LeRobot's pooling: no weight was capped


def test_a_train_reply_for_another_round_is_rejected_and_the_others_apply(hostile_run):
    run_dir, grid, _, updates, _ = hostile_run
    assert rejections(run_dir, "train") == [(REPLAYING, "reply for round 99 in round 1")]
    (sent,) = [transport.decode(m.content["arrays"], "fp32") for m in grid.sent
               if m.metadata.message_type == MessageType.TRAIN and m.metadata.dst_node_id == 101]
    total = sum(weight for _, weight in updates.values())
    expected = {n: sent[n] + sum(updates[node][0][n] * (updates[node][1] / total) for node in (101, 102))
                for n in sent}
    final = final_master(run_dir)
    assert all(torch.equal(final[n], expected[n]) for n in sent)


def report(mean: float, count: int, spread: float = 1.0) -> dict[str, dict[str, np.ndarray]]:
    """Plausible stats of ``count`` frames around ``mean``."""
    vec = np.full(6, mean)
    one = {"min": vec - spread, "max": vec + spread, "mean": vec, "std": np.full(6, spread / 2),
           "count": np.array([count])}
    return {data.ACTION: one, data.STATE: one}


@pytest.mark.parametrize(("change", "reason"), [
    (lambda s: s.pop(data.STATE), "must have exactly the keys"),
    (lambda s: s[data.ACTION].update(extra=[0.0] * 6), "needs min/max/mean/std/count"),
    (lambda s: s[data.ACTION].update(std=[-1.0] * 6), "std must not be negative"),
    (lambda s: s[data.ACTION].update(mean=[0.0] * 5), "vectors of length 6"),
    (lambda s: s[data.ACTION].update(count=[2.5]), "count must be one whole number"),
    (lambda s: s[data.ACTION].update(mean=["a"] * 6), "lists of numbers"),
])
def test_implausible_stats_are_refused(change, reason):
    stats = json.loads(data.encode_stats(report(0.0, 10)))
    change(stats)
    with pytest.raises(ValueError, match=reason):
        data.parse_stats(json.dumps(stats), 10, SIZES)


def test_pooling_caps_a_client_claiming_far_more_frames():
    honest = [report(0.0, 100), report(1.0, 100)]
    pooled = json.loads(data.pool_reports([*honest, report(2.0, 10**6)]))[data.ACTION]
    assert pooled["count"] == [600] and pooled["mean"] == [1.5] * 6  # the big one weighs 4 median clients


def test_outliers_and_two_contributors_are_warned_about(monkeypatch):
    logged = []
    monkeypatch.setattr(server_app, "log", lambda level, text, *args: logged.append(text % args))
    server_app.warn_about_stats([101, 102], [report(0.0, 10), report(100.0, 10)])
    assert "node 101" in logged[0] and "node 102" in logged[1] and "each can infer the other's" in logged[2]
    assert data.outliers([report(0.0, 10), report(0.5, 10), report(1.0, 10)]) == []


def query_reply(facts: dict, frames: int = 10) -> Message:
    """A query reply with plausible stats of ``frames`` frames and the dataset ``facts``."""
    about = {"norm-stats": data.encode_stats(report(0.0, frames)), "partition-id": 0, "dataset": "red-pick", **facts}
    return Message(RecordDict({"stats": ConfigRecord(about), "metrics": MetricRecord({"num-examples": frames})}),
                   reply_to=request(101, MessageType.QUERY))


def owner_strings(rng: random.Random, count: int) -> list[str]:
    """Text an owner might have in a dataset: words, paths (cut where they stand apart: a hub id ``user/name`` is
    no path), escapes, newlines, other scripts, very long lines."""
    pieces = ["pick", "the red cube", "/home/alice/data/set", "C:\\Users\\bob\\ds", "~/robots", "\x1b[31m", "\x00",
              "\n", "\t", "\u202e", "über", "机器人", "|", "<b>", "`", " " * 5, "x" * 200, "…"]
    return [" ".join(rng.choice(pieces) for _ in range(rng.randint(0, 6))) for _ in range(count)]


def test_what_an_honest_client_sends_about_any_dataset_is_accepted_and_bounded(server_identity):
    rng = random.Random(0)
    for _ in range(300):
        tasks = owner_strings(rng, rng.randint(0, 12))
        sent = dataset_facts.dataset_facts(owner_strings(rng, 1)[0] or None, 30, tasks, 8, 2)
        verdict = judge(query_reply(sent), lambda reply: checked_query(reply, SIZES))
        assert verdict.accepted, (sent, verdict.reason)
        for text in [sent["robot-type"], *sent["tasks"]]:
            assert text.isprintable() and len(text) <= dataset_facts.MAX_TEXT and dataset_facts.owner_text(text) == text
            assert "/home" not in text and "alice" not in text and "\\Users" not in text, "no local path travels"
        assert len(sent["tasks"]) <= dataset_facts.MAX_TASKS and sent["num-tasks"] >= len(sent["tasks"])


HONEST = dataset_facts.dataset_facts("so101_follower", 30, ["pick the red cube"], 8, 2)
HOSTILE_FACTS = {  # field: values no honest client sends
    "robot-type": [7, None, ["so101"], "so101\x1b[0m", "line\nbreak", "x" * 121, "/home/alice/robot", "  padded "],
    "tasks": ["pick", [1], ["ok"] * 9, [""], ["a\tb"], ["x" * 121], "not a list", [b"bytes"]],
    "fps": [0, -30, 30.5, 1e9, True, "30", math.nan],
    "num-tasks": [0, -1, 2**40, 1.5, False],
    "train-episodes": [0, 11, -1, 8.0, None],
    "held-out-episodes": [0, -2, 10**7, "2"],
    "dataset": ["", "a\nb", "x" * 256, 5],
}


def test_every_malformed_dataset_fact_refuses_the_reply_in_one_line(server_identity):
    assert judge(query_reply(HONEST), lambda reply: checked_query(reply, SIZES)).accepted
    for field, values in HOSTILE_FACTS.items():
        for value in values:
            facts = dict(HONEST)
            try:
                reply = query_reply({**facts, field: value})
            except (TypeError, ValueError):
                continue  # a ConfigRecord cannot even carry it: no node can send it
            verdict = judge(reply, lambda checked: checked_query(checked, SIZES))
            assert not verdict.accepted, (field, value)
            assert verdict.reason.startswith(("implausible dataset facts: ", "stats needs")), verdict.reason
            assert field in verdict.reason and "\n" not in verdict.reason and len(verdict.reason) < 200
    missing = query_reply({k: v for k, v in HONEST.items() if k != "tasks"})
    assert judge(missing, lambda reply: checked_query(reply, SIZES)).reason == "malformed reply: KeyError: 'tasks'"
