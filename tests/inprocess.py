"""A Flower Grid that calls the unchanged ClientApp in this process (no Ray, no network).

It does what the simulation runtime does for a message: gives each node its own
Context (partition id, run config), calls the ClientApp and turns an exception into an
error reply. ``intercept`` lets a test alter replies in transit (e.g. tamper a payload), drop
them (return ``None``: the node never answers) or crash the server (raise).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from zk0.flower_seams import flower_run, set_task_identity

if TYPE_CHECKING:
    from zk0.flower_seams import Run

SERVER_NODE_ID = 1
_RUN_IDS = itertools.count(1000)  # a fresh run id per grid: clients keep state per run


class InProcessGrid(Grid):
    """Nodes ``101, 102, …`` are partitions ``0, 1, …`` of a simulated federation."""

    def __init__(self, client_app: ClientApp, run_config: dict, num_nodes: int, run_id: int | None = None,
                 intercept: Callable[[Message], Message | None] | None = None) -> None:
        run_id = next(_RUN_IDS) if run_id is None else run_id
        self.run_id = run_id
        self.client_app = client_app
        self.intercept = intercept or (lambda reply: reply)
        self.contexts = {
            100 + i + 1: Context(run_id=run_id, node_id=100 + i + 1, state=RecordDict(), run_config=dict(run_config),
                                 node_config={"partition-id": i, "num-partitions": num_nodes})
            for i in range(num_nodes)}
        self._run = flower_run(run_id, {})
        set_task_identity(1, run_id, SERVER_NODE_ID)
        self.sent: list[Message] = []

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("InProcessGrid delivers through send_and_receive only")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("InProcessGrid delivers through send_and_receive only")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            msg.metadata.__dict__["_src_node_id"] = SERVER_NODE_ID
            self.sent.append(msg)
            try:
                reply = self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as err:  # the simulation runtime turns ClientApp exceptions into error replies
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            if (reply := self.intercept(reply)) is not None:
                replies.append(reply)
        return replies
