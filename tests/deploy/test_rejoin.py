"""A SuperNode whose SuperLink fails after it joined (Flower 1.42 answers 500 when its SQLite state is
locked under load) exits and rejoins under its supervisor, instead of idling forever as
``flower-supernode`` does; a SuperNode the SuperLink refuses is not restarted.

The SuperLink is a stand-in Fleet API on loopback that fails the first connection's first pull.
"""

from __future__ import annotations

import re

import pytest
from flwr.proto.fleet_pb2 import (ActivateNodeResponse, DeactivateNodeResponse,  # pylint: disable=E0611
                                  PullMessagesResponse)
from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatResponse  # pylint: disable=E0611
from proxyserve import serve
from waits import wait_for

from zk0.deploy import commands, processes

pytestmark = pytest.mark.e2e
PROTOBUF = [(b"content-type", b"application/protobuf")]


class FlakyFleet:
    """Accepts node 7; the first pull after the first activation fails with the 500 a locked database gives."""

    def __init__(self, refuse: bool = False) -> None:
        self.calls: list[str] = []
        self.refuse = refuse

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        name = scope["path"].rsplit("/", 1)[-1]
        self.calls.append(name)
        status, body = 200, b""
        if name == "activate-node":
            status, body = (401, b'{"detail": "refused"}') if self.refuse else (200, ActivateNodeResponse(
                node_id=7).SerializeToString())
        elif name == "send-node-heartbeat":
            body = SendNodeHeartbeatResponse(success=True).SerializeToString()
        elif name == "deactivate-node":
            body = DeactivateNodeResponse().SerializeToString()
        elif name == "pull-messages":
            failed_once = self.calls.count("pull-messages") > 1
            status, body = (200, PullMessagesResponse().SerializeToString()) if failed_once else (
                500, b'{"detail": "sqlite3.OperationalError: database is locked"}')
        await send({"type": "http.response.start", "status": status, "headers": PROTOBUF})
        await send({"type": "http.response.body", "body": body})


def start_node(folder, port: int) -> int:
    cmd = commands.supernode_command(f"127.0.0.1:{port}", "embedded:red-pick", None, None, processes.free_port(), None)
    return processes.start(folder, "supernode", cmd, commands.flower_env(folder / "flwr"))


def test_a_supernode_that_loses_its_superlink_rejoins(tmp_path):
    fleet, port = FlakyFleet(), processes.free_port()
    server = serve(fleet, port, None)
    try:
        start_node(tmp_path, port)
        log = tmp_path / "logs" / "supernode.log"
        wait_for(lambda: fleet.calls.count("activate-node") >= 2 and fleet.calls.count("pull-messages") >= 2,
                 "the SuperNode to rejoin and pull again")
        text = log.read_text()
        assert "database is locked" in text or "500" in text
        assert "the connection to the SuperLink ended" in text and re.search(r"exited with code 75 after", text)
        assert processes.running_pid(tmp_path, "supernode") is not None, "the node is up again"
    finally:
        processes.stop(tmp_path, "supernode")
        server.should_exit = True


def test_a_refused_supernode_is_not_restarted(tmp_path):
    fleet, port = FlakyFleet(refuse=True), processes.free_port()
    server = serve(fleet, port, None)
    try:
        start_node(tmp_path, port)
        wait_for(lambda: processes.running_pid(tmp_path, "supernode") is None, "the refused SuperNode to exit")
        assert fleet.calls.count("activate-node") == 1
        assert "not restarted" in (tmp_path / "logs" / "supernode.log").read_text()
    finally:
        processes.stop(tmp_path, "supernode")
        server.should_exit = True
