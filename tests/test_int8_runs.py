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
LOST = 102  # its process restarts after its train reply of round 2


class ServerCrash(RuntimeError):
    """Stands in for the ServerApp process being killed."""


def lose_track(reply: Message) -> Message:
    """Intercept: node ``LOST`` loses everything it held after answering round 2's train message."""
    if (reply.metadata.src_node_id == LOST and reply.metadata.message_type == MessageType.TRAIN
            and not reply.has_error() and int(reply.content["payload"]["server-round"]) == 2):
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


def test_once_warm_a_round_sends_half_of_what_bf16_sends(int8_run):
    _, records, audit = int8_run
    traffic = {r["round"]: r for r in records if r.get("event") == "round"}
    full = sent_bytes(audit, 1, "train")[101]  # the first message: the model in bf16, as in a bf16 run
    assert sent_bytes(audit, 1, "train") == {101: full, 102: full}
    assert traffic[0]["bytes-down"] == 0  # round 0's evaluation went with round 1's train messages
    assert 0.4 < traffic[2]["bytes-down"] / (2 * full) < 0.6  # a bf16 round sends each node the model once
    assert all(0 < b < 0.6 * full for b in sent_bytes(audit, 2, "train").values())  # an int8 delta each
    for server_round in (1, 2):
        assert traffic[server_round]["bytes-up"] / (2 * full) < 0.6  # int8 updates: about half a bf16 model


def test_a_node_that_lost_track_gets_full_weights_and_trains_again(int8_run):
    _, records, audit = int8_run
    full = sent_bytes(audit, 1, "train")[LOST]
    refused = [r for r in records if r.get("event") == "rejected-update"]
    # its round-3 train message, a delta, also asked for round 2's evaluation
    assert sorted((r["round"], r["node"], r["phase"]) for r in refused) == [(2, LOST, "evaluate"), (3, LOST, "train")]
    assert all("this node holds none: it gets full weights next time" in r["reason"] for r in refused)
    assert sent_bytes(audit, 4, "train")[LOST] == full
    assert 0 < sent_bytes(audit, 4, "evaluate")[LOST] < 0.6 * full
    trained = [r["round"] for r in records if r["source"] == "client" and r["node"] == LOST]
    assert trained == [1, 2, 4]


def test_a_server_restarted_between_rounds_continues_bit_identically(run_config, tmp_path, monkeypatch):
    """The clients keep their state (the same run id): after the restart they get the saved chain's next model in
    full, recognise it as the step from the model they hold, keep their residuals, and the run ends as if it had
    never stopped."""
    whole, _ = run_federation(run_config(num_server_rounds=3, output_dir=str(tmp_path / "whole"), **INT8))
    config = run_config(num_server_rounds=3, output_dir=str(tmp_path / "crashed"), **INT8)
    save = RoundState.save

    def save_then_die(state: RoundState, run, records) -> None:
        save(state, run, records)
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
    assert {x["bytes"] for x in resumed if x["phase"] == "train"} == set(sent_bytes(read_audit(whole), 1,
                                                                                    "train").values())
