"""Query and round replies are untrusted: a hostile one is rejected in one line and the run pools the honest ones."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from federation import final_master, run_federation
from flwr.app import Message, MessageType

from zk0 import data, server_app, transport
from zk0.audit import read_audit
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
