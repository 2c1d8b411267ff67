"""The server's mean of the accepted updates: accumulated in place from the payloads, in a fixed order."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import RUN_ID
from federation import train_reply

from zk0 import transport
from zk0.audit import AuditLog, read_audit
from zk0.config import RunConfig
from zk0.rounds import RoundState
from zk0.server_app import receive_train
from zk0.strategy import SmolVLAStrategy

WEIGHTS = {101: 8, 102: 3, 103: 5}


@pytest.fixture(params=["fp32", "bf16", "int8"])
def state(request, tmp_path, events, server_identity) -> RoundState:
    cfg = RunConfig.flat(transport_dtype=request.param, min_train_nodes=1, local_steps=2, batch_size=4)
    gen = torch.Generator().manual_seed(0)
    master = {"a": torch.randn(30, 20, generator=gen), "b": torch.randn(20, generator=gen)}
    return RoundState(cfg, master, "stats", "base", AuditLog(tmp_path), events.append, server_round=1)


def update(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(30, 20, generator=gen) * 0.01, "b": torch.randn(20, generator=gen) * 0.01}


def test_the_mean_is_the_weighted_mean_of_what_travelled_whatever_the_replies_order(state):
    replies = [train_reply(state, node, update(node), {"num-examples": w}) for node, w in WEIGHTS.items()]
    travelled = {r.metadata.src_node_id: transport.decode(r.content["arrays"], state.wire.dtype) for r in replies}
    total = sum(WEIGHTS.values())
    reference = {n: sum(travelled[node][n] * (w / total) for node, w in WEIGHTS.items()) for n in state.master}
    before = {n: t.clone() for n, t in state.master.items()}
    results = []
    for order in itertools.permutations(replies):
        state.master = {n: t.clone() for n, t in before.items()}
        strategy = SmolVLAStrategy(state.cfg, state.wire, RUN_ID)
        receive_train(strategy, state, list(order))
        results.append(state.master)
    assert all(torch.allclose(results[0][n], before[n] + reference[n], rtol=1e-6, atol=1e-7) for n in before)
    assert all(torch.equal(result[n], results[0][n]) for result in results[1:] for n in before)


def test_each_reply_is_hashed_once_and_the_audit_records_that_digest(state, monkeypatch):
    replies = [train_reply(state, node, update(node), {"num-examples": w}) for node, w in WEIGHTS.items()]
    hashed = []
    real = transport.digest
    monkeypatch.setattr(transport, "digest", lambda record, bound_to="": hashed.append(1) or real(record, bound_to))
    receive_train(SmolVLAStrategy(state.cfg, state.wire, RUN_ID), state, replies)
    assert len(hashed) == len(replies)
    audited = [a for a in state.audit.path.read_text().splitlines() if '"received"' in a]
    assert all(r.content["payload"]["payload-digest"] in line for r, line in zip(replies, audited))


def test_a_refused_reply_is_not_hashed_again_and_the_audit_records_the_digest_it_claimed(state, monkeypatch):
    replies = [train_reply(state, node, update(node), {"num-examples": w}) for node, w in WEIGHTS.items()]
    replies[1].content["payload"]["payload-digest"] = "f" * 64  # what arrived is not what the node claims
    hashed = []
    real = transport.digest
    monkeypatch.setattr(transport, "digest", lambda record, bound_to="": hashed.append(1) or real(record, bound_to))
    receive_train(SmolVLAStrategy(state.cfg, state.wire, RUN_ID), state, replies)
    assert len(hashed) == len(replies)
    refused = [a for a in read_audit(state.audit.path.parent) if a.get("status") == "rejected"]
    assert len(refused) == 1 and refused[0]["claimed-digest"] == "f" * 64 and "digest" not in refused[0]
    assert "digest mismatch" in refused[0]["reason"] and refused[0]["bytes"] > 0
