"""What crosses the wire from a node: no local paths, no host name, no raw frames, on every reply of a run."""

from __future__ import annotations

import re
import shutil
import socket

from flwr.app import Context, Message, RecordDict
from inprocess import InProcessGrid

from zk0 import client_app, server_app
from zk0.config import RunConfig
from zk0.policy import build_policy, trainable_state
from zk0.registry import DatasetEntry
from zk0.sim.embedded import locate_embedded
from zk0.transport import expected_shapes

SECRET_DIR = "alice-home-lab-7"  # a folder name that must never leave the node


def strings(value: object) -> list[str]:
    """Every string in a record's value, lists included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [s for item in value for s in strings(item)]
    return []


def test_no_reply_carries_a_local_path_a_host_name_or_frames(run_config, tmp_path):
    """Node 101 trains on a local copy of an embedded dataset inside a private folder, node 103 on a folder that
    does not exist (its error replies must not name it); every reply of the run is read as the server reads it."""
    _, source = locate_embedded(DatasetEntry(uri="embedded:red-pick"))
    private = tmp_path / SECRET_DIR / "robots" / "red"
    shutil.copytree(source, private)
    config = run_config(num_server_rounds=1, min_train_nodes=1, min_evaluate_nodes=1)
    replies: list[Message] = []
    grid = InProcessGrid(client_app.app, config, 3, intercept=lambda reply: replies.append(reply) or reply)
    grid.contexts[101].node_config["dataset"] = f"local:{private}"
    grid.contexts[103].node_config["dataset"] = f"local:{tmp_path / SECRET_DIR / 'missing'}"
    server_app.app(grid, Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(),
                                 run_config=config))
    kinds = {(r.metadata.src_node_id, r.metadata.message_type, r.has_error()) for r in replies}
    assert {(101, "train", False), (101, "query", False), (103, "query", True), (103, "train", True)} <= kinds
    policy = build_policy(RunConfig.from_run_config(config))
    allowed = set(expected_shapes({n: tuple(t.shape) for n, t in trainable_state(policy).items()}, "bf16"))
    host = re.compile(rf"\b{re.escape(socket.gethostname())}\b")  # as a word: a short host name is in many words
    for reply in replies:
        texts = [reply.error.reason] if reply.has_error() else [
            s for record in [*reply.content.config_records.values(), *reply.content.metric_records.values()]
            for key, value in record.items() for s in [key, *strings(value)]]
        for text in texts:
            assert str(tmp_path) not in text and SECRET_DIR not in text, (reply.metadata.message_type, text)
            assert not host.search(text), (reply.metadata.message_type, text)
        for arrays in ([] if reply.has_error() else reply.content.array_records.values()):
            assert set(arrays.keys()) <= allowed, "only the trainable tensors travel, never frames or data"
