"""int8 runs with the real ServerApp and ClientApp in one process: bytes down, a node that lost track, resume."""

from __future__ import annotations

import pytest
import torch
from federation import final_master, run_federation
from flwr.app import Message, MessageType

from zk0 import client_app
from zk0.audit import read_audit
from zk0.rounds import RoundState
from zk0.tracking import read_metrics

INT8 = {"transport_dtype": "int8", "min_train_nodes": 1, "min_evaluate_nodes": 1}
LOST = 102  # its process restarts after its evaluate reply of round 2


class ServerCrash(RuntimeError):
    """Stands in for the ServerApp process being killed."""


def lose_track(reply: Message) -> Message:
    """Intercept: node ``LOST`` loses everything it held after answering round 2's evaluation."""
    if (reply.metadata.src_node_id == LOST and reply.metadata.message_type == MessageType.EVALUATE
            and int(reply.content["payload"]["server-round"]) == 2):
        del client_app._RUNTIMES[(reply.metadata.run_id, LOST)]
    return reply


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    """Four rounds of two nodes with int8 transport; node 102 restarts between rounds 2 and 3."""
    from conftest import FAST, ROOT
    from flwr.common.config import get_fused_config_from_dir

    overrides = {k.replace("_", "-"): v for k, v in INT8.items()}
    config = get_fused_config_from_dir(ROOT, {**FAST, **overrides, "num-server-rounds": 4,
                                              "output-dir": str(tmp_path_factory.mktemp("outputs"))})
    run_dir, _ = run_federation(config, intercept=lose_track)
    return run_dir, read_metrics(run_dir / "metrics.jsonl"), read_audit(run_dir)


def sent_bytes(audit: list[dict], server_round: int, phase: str) -> dict[int, int]:
    return {a["node"]: a["bytes"] for a in audit
            if a["round"] == server_round and a["phase"] == phase and a["direction"] == "sent"}


def test_once_warm_a_round_sends_a_quarter_of_what_bf16_sends(int8_run):
    _, records, audit = int8_run
    traffic = {r["round"]: r for r in records if r.get("event") == "round"}
    full = traffic[0]["bytes-down"]  # round 0: every node gets the model in bf16, as in a bf16 run
    for server_round in (1, 2):  # a bf16 round sends it twice (train, evaluate): 2 * full
        assert 0.2 < traffic[server_round]["bytes-down"] / (2 * full) < 0.3
        assert traffic[server_round]["bytes-up"] / full < 0.6  # int8 updates: about half a bf16 model
        assert sent_bytes(audit, server_round, "train") == {101: 0, 102: 0}  # the nodes hold the model already
        assert all(0 < b < 0.6 * full / 2 for b in sent_bytes(audit, server_round, "evaluate").values())


def test_a_node_that_lost_track_gets_full_weights_and_trains_again(int8_run):
    _, records, audit = int8_run
    full = sent_bytes(audit, 0, "evaluate")[LOST]
    (refused,) = [r for r in records if r.get("event") == "rejected-update"]
    assert (refused["round"], refused["node"], refused["phase"]) == (3, LOST, "train")
    assert "this node holds none: it gets full weights next time" in refused["reason"]
    assert sent_bytes(audit, 3, "evaluate")[LOST] == full
    assert sent_bytes(audit, 4, "train")[LOST] == 0
    trained = [r["round"] for r in records if r["source"] == "client" and r["node"] == LOST]
    assert trained == [1, 2, 4]


def test_a_server_restarted_between_rounds_continues_bit_identically(run_config, tmp_path, monkeypatch):
    """The clients keep their state (the same run id): after the restart they get the saved chain in full,
    recognise the model they hold, keep their residuals, and the run ends as if it had never stopped."""
    whole, _ = run_federation(run_config(num_server_rounds=3, output_dir=str(tmp_path / "whole"), **INT8))
    config = run_config(num_server_rounds=3, output_dir=str(tmp_path / "crashed"), **INT8)
    save = RoundState.save

    def save_then_die(state: RoundState, run) -> None:
        save(state, run)
        if state.server_round == 2:
            raise ServerCrash("killed after round 2")

    monkeypatch.setattr(RoundState, "save", save_then_die)
    with pytest.raises(ServerCrash):
        run_federation(config, run_id=424242)
    monkeypatch.setattr(RoundState, "save", save)
    (crashed,) = (tmp_path / "crashed").iterdir()
    run_federation({**config, "resume-from": str(crashed)}, run_id=424242)
    a, b = final_master(whole), final_master(crashed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    resumed = [x for x in read_audit(crashed) if x["attempt"] == 2 and x["direction"] == "sent"]
    assert {x["bytes"] for x in resumed if x["phase"] == "train"} == set(sent_bytes(read_audit(whole), 0,
                                                                                    "evaluate").values())
