"""A hostile client in a real in-process federation: its sealed, in-bound update is accepted and trimmed away."""

from __future__ import annotations

import numpy as np
import torch
from federation import final_master, run_federation
from flwr.app import Message, MessageType
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from zk0 import transport
from zk0.audit import read_audit

HOSTILE = 104
SCALE = -20.0  # sign-flipped and scaled up, still well under max-update-norm


def flip_and_reseal(travelled: dict[int, dict[str, torch.Tensor]]):
    """Intercept: node 104 sends its update times ``SCALE``, sealed as its ClientApp seals (a hostile client signs
    its own hostile update); every train update that travels is recorded."""
    def intercept(reply: Message) -> Message:
        if reply.metadata.message_type != MessageType.TRAIN or reply.has_error():
            return reply
        node, payload = reply.metadata.src_node_id, reply.content["payload"]
        update = transport.decode(reply.content["arrays"], str(payload["transport-dtype"]))
        if node == HOSTILE:
            update = {name: SCALE * t for name, t in update.items()}
            reply.content["arrays"] = transport.encode(update, str(payload["transport-dtype"]))
            bound_to = transport.binding(reply.metadata.run_id, int(payload["server-round"]))
            payload["payload-digest"] = transport.digest(reply.content["arrays"], bound_to)
        travelled[node] = update
        return reply
    return intercept


def test_a_trimmed_mean_run_applies_flowers_trimmed_mean_of_what_travelled(run_config):
    config = run_config(num_server_rounds=1, transport_dtype="fp32", aggregation="trimmed-mean", trim_fraction=0.25,
                        byzantine_clients=1, min_train_nodes=4)
    travelled: dict[int, dict[str, torch.Tensor]] = {}
    run_dir, grid = run_federation(config, num_nodes=4, intercept=flip_and_reseal(travelled))
    received = [a for a in read_audit(run_dir) if a["phase"] == "train" and a["direction"] == "received"]
    assert sorted(a["node"] for a in received if a["status"] == "accepted") == [101, 102, 103, 104]
    (sent,) = [transport.decode(m.content["arrays"], "fp32") for m in grid.sent
               if m.metadata.message_type == MessageType.TRAIN and m.metadata.dst_node_id == 101]
    final = final_master(run_dir)
    for name, start in sent.items():
        stacked = np.stack([travelled[node][name].numpy() for node in sorted(travelled)])
        expected = start.numpy() + trim_mean(stacked, 0.25)
        assert np.allclose(final[name].numpy(), expected, rtol=1e-6, atol=1e-7), name
        mean = start.numpy() + stacked.mean(axis=0)
        assert np.abs(final[name].numpy() - start.numpy()).max() < 0.5 * np.abs(mean - start.numpy()).max()
    card = (run_dir / "checkpoints" / "round_1" / "README.md").read_text()
    assert "`aggregation=trimmed-mean`" in card and "`byzantine-clients=1`" in card
