"""``audit.jsonl``: per round and node, what the server sent and what it received.

One JSON object per line with the Flower ``run-id`` and the ``attempt`` that wrote it (a
resumed run is attempt 2, 3, …: rounds a crashed attempt began appear once per attempt),
``round``, ``phase`` (query|train|evaluate), ``node``,
``direction`` (sent|received|missing), the payload's SHA-256 ``digest`` and ``bytes``
where there is a payload, and for replies ``status`` (accepted|rejected) and ``reason``; an
accepted train reply has its ``weight`` in the mean (``aggregation=mean``; robust rules ignore it).
It answers, after the fact, which node got which weights and whose update was used. A train
message that also asks for the evaluation of the model it carries (the previous round's) is
marked ``evaluate-first``; the evaluation its reply carries is a received row of that previous
round's evaluate phase, without a payload.
A reason is stored as one short line without local paths, whatever the node sent.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Message

from zk0 import transport
from zk0.jsonl import append_jsonl, read_jsonl
from zk0.reasons import one_line


class AuditLog:
    """Appends one record per message to ``<run>/audit.jsonl``."""

    def __init__(self, run_dir: Path, run_id: int = 0, attempt: int = 1) -> None:
        self.path = run_dir / "audit.jsonl"
        self.run_id, self.attempt = run_id, attempt

    def _write(self, record: dict) -> None:
        if "reason" in record:  # reasons come from nodes: never a traceback or the owner's paths
            record = {**record, "reason": one_line(record["reason"])}
        append_jsonl(self.path, {"time": round(time.time(), 3), "run-id": self.run_id, "attempt": self.attempt,
                                 **record})

    def sent(self, server_round: int, phase: str, message: Message) -> None:
        """A message to a node, with the digest and size of its arrays (if any), marked if it asks for an evaluation
        first."""
        first = {"evaluate-first": True} if message.content["config"].get("evaluate-first") else {}
        self._write({"round": server_round, "phase": phase, "node": message.metadata.dst_node_id,
                     "direction": "sent", **_payload(message), **first})

    def received(self, server_round: int, phase: str, reply: Message, accepted: bool, reason: str = "",
                 digest: str = "", weight: int | None = None) -> None:
        """A node's reply and whether the server used it; ``digest``: its payload's, if verification hashed it;
        ``weight``: an accepted update's weight in the mean."""
        record = {"round": server_round, "phase": phase, "node": reply.metadata.src_node_id,
                  "direction": "received", "status": "accepted" if accepted else "rejected"}
        if not reply.has_error():
            record |= _payload(reply, digest)
        if reason:
            record["reason"] = reason
        if weight is not None:
            record["weight"] = weight
        self._write(record)

    def missing(self, server_round: int, phase: str, node: int, timeout: float) -> None:
        """A node that did not answer within the round timeout (crashed, disconnected, too slow)."""
        self._write({"round": server_round, "phase": phase, "node": node, "direction": "missing",
                     "reason": f"no reply within {timeout:.0f}s"})


def _payload(message: Message, known_digest: str = "") -> dict:
    """Digest and size of the message's arrays: the server's own digest for what it sends, the one verification
    computed for what it receives. A reply refused before its payload matched is not hashed here (a hostile
    node must not cost the server a second pass): it is recorded with the digest it claimed."""
    content = message.content
    if "arrays" not in content.array_records:
        return {}
    size = {"bytes": transport.nbytes(content["arrays"])}
    sent_digest = content["config"].get("payload-digest") if "config" in content.config_records else None
    if digest := known_digest or sent_digest:
        return {"digest": str(digest), **size}
    claimed = content["payload"].get("payload-digest") if "payload" in content.config_records else None
    return {"claimed-digest": str(claimed)[:64], **size} if claimed is not None else size


def read_audit(run_dir: Path) -> list[dict]:
    """All records of a run's ``audit.jsonl``."""
    return read_jsonl(run_dir / "audit.jsonl")
