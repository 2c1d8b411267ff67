"""Dropouts, resume after a crash, and the audit log, with the real ServerApp/ClientApp in one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from federation import final_master, run_federation
from flwr.app import Context, Message, MessageType, RecordDict
from inprocess import InProcessGrid

from zk0 import client_app, server_app
from zk0.audit import read_audit
from zk0.checkpoint import STATE_FILE, ResumeError
from zk0.strategy import RoundFailed
from zk0.tracking import read_metrics


class ServerCrash(RuntimeError):
    """Stands in for the ServerApp process being killed."""


def drop_node(node: int, phase: str, server_round: int):
    """Intercept: ``node`` never answers ``phase`` of ``server_round`` (a SuperNode that died)."""
    def intercept(reply: Message) -> Message | None:
        lost = (reply.metadata.src_node_id == node and reply.metadata.message_type == phase
                and not reply.has_error() and _round(reply) == server_round)
        return None if lost else reply
    return intercept


def crash_in_round(server_round: int):
    """Intercept: the server dies when the first training reply of ``server_round`` arrives."""
    def intercept(reply: Message) -> Message:
        if reply.metadata.message_type == MessageType.TRAIN and _round(reply) == server_round:
            raise ServerCrash(f"killed in round {server_round}")
        return reply
    return intercept


def whole_and_resumed(run_config, tmp_path: Path, crash_round: int, **knobs) -> tuple[Path, Path]:
    """The run of ``knobs`` uninterrupted, and killed in ``crash_round`` then resumed (a new grid: clients start
    afresh): the two run folders."""
    whole, _ = run_federation(run_config(**knobs, output_dir=str(tmp_path / "whole")))
    config = run_config(**knobs, output_dir=str(tmp_path / "crashed"))
    with pytest.raises(ServerCrash):
        run_federation(config, intercept=crash_in_round(crash_round))
    (crashed,) = (tmp_path / "crashed").iterdir()
    resumed, _ = run_federation({**config, "resume-from": str(crashed)})
    return whole, resumed


def _round(reply: Message) -> int:
    return int(reply.content["payload"]["server-round"])


def test_round_completes_without_a_node_that_died(run_config):
    config = run_config(num_server_rounds=1, min_train_nodes=2, min_evaluate_nodes=2)
    run_dir, _ = run_federation(config, num_nodes=3, intercept=drop_node(103, MessageType.TRAIN, 1))
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [(r["node"], r["phase"]) for r in records if r.get("event") == "missing-reply"] == [(103, "train")]
    assert sorted(r["node"] for r in records if r["source"] == "client" and r["round"] == 1) == [101, 102]
    missing = [a for a in read_audit(run_dir) if a["direction"] == "missing"]
    assert missing == [missing[0]] and missing[0]["node"] == 103 and "no reply within" in missing[0]["reason"]


def test_too_few_nodes_left_fail_the_round(run_config):
    config = run_config(num_server_rounds=1, min_train_nodes=3, min_evaluate_nodes=2)
    with pytest.raises(RoundFailed, match="1 round|min-train-nodes=3"):
        run_federation(config, num_nodes=3, intercept=drop_node(103, MessageType.TRAIN, 1))


def test_audit_records_every_payload_both_ways(run_config):
    config = run_config(num_server_rounds=1)
    run_dir, _ = run_federation(config)
    audit = read_audit(run_dir)
    train = [a for a in audit if a["phase"] == "train" and a["round"] == 1]
    sent = [a for a in train if a["direction"] == "sent"]
    received = [a for a in train if a["direction"] == "received"]
    assert sorted(a["node"] for a in sent) == sorted(a["node"] for a in received) == [101, 102]
    assert len({a["digest"] for a in sent}) == 1 and all(len(a["digest"]) == 64 and a["bytes"] > 0 for a in sent)
    assert all(a["status"] == "accepted" and a["digest"] != sent[0]["digest"] for a in received)
    assert {a["phase"] for a in audit} == {"query", "train", "evaluate"}


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(run_config, tmp_path):
    whole, _ = run_federation(run_config(num_server_rounds=3, output_dir=str(tmp_path / "whole")))
    config = run_config(num_server_rounds=3, output_dir=str(tmp_path / "crashed"))
    with pytest.raises(ServerCrash):
        run_federation(config, intercept=crash_in_round(3))
    (crashed,) = (tmp_path / "crashed").iterdir()
    assert torch.load(crashed / STATE_FILE, weights_only=True)["server_round"] == 2
    resumed, _ = run_federation({**config, "resume-from": str(crashed)})  # new grid: clients start afresh
    assert resumed == crashed
    a, b = final_master(whole), final_master(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    rounds = [r["round"] for r in read_metrics(crashed / "metrics.jsonl") if r.get("dataset") == "purple-place-center"]
    assert rounds == [0, 1, 2, 3]
    facts = [r["event"] for r in read_metrics(crashed / "metrics.jsonl") if r.get("event") in ("federation",
                                                                                                "client-dataset")]
    assert facts == ["federation", "client-dataset", "client-dataset"], "the query phase's facts survive a resume"
    assert "| red-pick | so101_follower | 30 |" in (crashed / "checkpoints" / "round_3" / "README.md").read_text()
    audit = read_audit(crashed)
    flower_runs = [int(i) for i in (crashed / "flower-runs.txt").read_text().split()]
    assert {(a["run-id"], a["attempt"]) for a in audit} == {(flower_runs[0], 1), (flower_runs[1], 2)}
    rows = [(a["attempt"], a["round"], a["phase"], a["node"], a["direction"]) for a in audit]
    assert len(rows) == len(set(rows)), "one row per message per attempt"
    sent_round_3 = {a["attempt"] for a in audit if a["round"] == 3 and a["direction"] == "sent"}
    assert sent_round_3 == {1, 2}  # round 3 began in the crashed attempt and ran again in the resumed one


def test_resume_refuses_a_changed_config(run_config, tmp_path):
    run_dir, _ = run_federation(run_config(num_server_rounds=1))
    with pytest.raises(ResumeError, match="lr"):
        run_federation(run_config(num_server_rounds=1, lr=0.5, resume_from=str(run_dir)))
    with pytest.raises(ResumeError, match="not a zk0 run folder"):
        run_federation(run_config(resume_from=str(tmp_path)))


def test_a_node_whose_dataset_does_not_open_answers_with_the_reason(run_config, tmp_path):
    """Deployment passes the dataset as node config; a bad one is an error reply the server logs."""
    config = run_config(num_server_rounds=1)
    grid = InProcessGrid(client_app.app, config, 3)
    grid.contexts[103].node_config["dataset"] = f"local:{tmp_path / 'missing'}"
    server_app.app(grid, Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(),
                                 run_config=config))
    (run_dir,) = Path(config["output-dir"]).iterdir()
    refused = [a for a in read_audit(run_dir) if a["node"] == 103 and a["direction"] == "received"]
    assert {a["phase"] for a in refused} == {"query", "train", "evaluate"}
    assert all(a["status"] == "rejected" and "missing" in a["reason"] and str(tmp_path) not in a["reason"]
               for a in refused)  # the owner's paths stay on the node
    assert len([r for r in read_metrics(run_dir / "metrics.jsonl") if r["source"] == "client"]) == 2
