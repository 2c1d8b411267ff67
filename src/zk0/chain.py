"""An int8 run's model on both ends of the wire: every node holds one bf16 model, moved on by int8 deltas.

The server keeps the *chain*: the model its nodes hold (bf16) and its id. When the fp32 global
model has moved since the chain's last step, the next message steps it: the change (global
minus chain) is quantized to int8 once, and the chain becomes chain + dequantized change,
rounded to bf16, exactly as every node computes it from the same payload. What one step's
quantization left out is part of the next step's change, so the chain follows the global
model without drift (error feedback on the downlink), and a bf16 chain can always be sent
exactly as bf16. Each message gives its node what that node can use:

* ``unchanged`` (no arrays): the node confirmed holding the chain's model;
* ``delta`` (the step's int8 payload): the node confirmed holding the model before the step;
* ``full`` (the chain's model in bf16): any other node: new, or one that missed a message,
  failed, or lost track.

A node confirms by echoing ``model-id`` in its reply, and is unconfirmed from the moment a
message is addressed to it until it does. A model's id is the digest of the full payload the
chain began with, then ``sha256(previous id | delta digest)`` per step: both ends compute it,
and a node refuses a delta or ``unchanged`` whose base is not the model it holds (one line:
the server, unconfirmed, sends full weights next time).

A node (:class:`Held`) keeps the id of that model and the residual of its own int8 updates
(error feedback on the uplink): it sends int8 of (trained − received + residual), and what
int8 could not carry is the next residual, so over rounds the server receives the sum of the
true updates minus one residual. The residual is reset when the model is replaced: a full
payload of a model other than the one held (the node's first, or after it lost track). The
model itself lies in a :class:`Latest` that the nodes of one process share: every virtual
client of a simulation process receives the same chain, so one copy serves them all.

After a resume the server knows no node's model (a resumed run is a new Flower run, whose
clients start afresh): the first message to every node is the saved chain in full
(:meth:`Chain.state` is part of :class:`zk0.checkpoint.ServerState`). A node that still holds
that very model, or the one the chain stepped from (a full payload names that step: its base
``follows`` and its ``step-digest``, from which the node recomputes the id), keeps its
residual, so a server restarted between rounds while its clients kept their state continues
bit-identically (it saves a round before its chain steps to that round's model); fresh clients
start from a zero residual.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord

from zk0.transport import PayloadError, Wire, decode

Payload = tuple[ArrayRecord, dict[str, str]]  # arrays and their seal


def advanced(model: Mapping[str, torch.Tensor], change: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``model + change`` rounded to bf16: what server and nodes compute, bit for bit, from one payload."""
    return {name: (model[name].float() + change[name]).to(torch.bfloat16) for name in model}


def next_id(model_id: str, delta_digest: str) -> str:
    """The id of the model a delta with ``delta_digest`` makes of the model ``model_id``."""
    return hashlib.sha256(f"{model_id}|{delta_digest}".encode()).hexdigest()


def follows(seal: Mapping, model_id: str) -> bool:
    """Whether a full payload's model is the one a step makes of ``model_id``: what a delta would have brought."""
    step = str(seal.get("step-digest", ""))
    return bool(model_id) and seal.get("follows") == model_id and next_id(model_id, step) == str(seal["model-id"])


def bf16(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu", torch.bfloat16) for name, t in tensors.items()}


class Chain:
    """The server's end: the model its nodes hold, the step that made it, and which node confirmed what."""

    def __init__(self, wire: Wire, saved: Mapping | None = None) -> None:
        saved = saved or {}
        self.wire = wire
        self.model: dict[str, torch.Tensor] = dict(saved.get("model", {}))
        self.model_id: str = saved.get("model-id", "")
        self.behind: bool = saved.get("behind", True)  # the global model moved since the chain's last step
        self.step: Payload | None = None
        self.base_id = ""  # the model the step applies to
        self.full: Payload | None = None
        self.held: dict[int, str] = {}  # node: the model id it confirmed holding

    def state(self) -> dict:
        """What a resumed run continues the chain from."""
        return {"model": self.model, "model-id": self.model_id, "behind": self.behind}

    def moved(self) -> None:
        """The global model changed: the next message steps the chain."""
        self.behind = True

    def payload(self, node: int, master: Mapping[str, torch.Tensor]) -> Payload:
        """What ``node`` gets now: ``unchanged``, ``delta`` or ``full``; it is unconfirmed until it replies."""
        self._catch_up(master)
        held = self.held.pop(node, None)
        if held == self.model_id:
            (arrays, seal), kind = self.wire.seal({}), "unchanged"
        elif held == self.base_id and self.step:
            (arrays, seal), kind = self.step, "delta"
        else:
            (arrays, seal), kind = self._full(), "full"
            if self.step:
                seal = {**seal, "follows": self.base_id, "step-digest": self.step[1]["payload-digest"]}
        return arrays, {**seal, "downlink": kind, "model-id": self.model_id, "base-model": held or ""}

    def confirm(self, node: int, model_id: str) -> None:
        """``node`` replied holding ``model_id``."""
        self.held[node] = model_id

    def _catch_up(self, master: Mapping[str, torch.Tensor]) -> None:
        if not self.behind:
            return
        if self.model:
            change = {name: master[name] - self.model[name].float() for name in master}
            self.step, self.base_id = self.wire.seal(change, "int8"), self.model_id
            self.model = advanced(self.model, decode(self.step[0], "int8"))
            self.model_id, self.full = next_id(self.base_id, self.step[1]["payload-digest"]), None
        else:
            self.model = bf16(master)
            self.model_id = self._full()[1]["payload-digest"]
        self.behind = False

    def _full(self) -> Payload:
        if self.full is None:
            self.full = self.wire.seal(self.model, "bf16")
        return self.full


@dataclass
class Latest:
    """The last model any node of one process received, by id: the one copy its nodes' ids point at.

    Holding the last one is enough: a server steps its chain only forward, so a node is sent a delta
    onto the model it holds only while that model, or the delta's result, is the last one here.
    """

    model_id: str = ""
    model: dict[str, torch.Tensor] = field(default_factory=dict)

    def get(self, model_id: str) -> dict[str, torch.Tensor] | None:
        return self.model if model_id and model_id == self.model_id else None


@dataclass
class Held:
    """A node's end: the id of the model it holds (bf16, in ``latest``), and the residual of its int8 updates."""

    latest: Latest = field(default_factory=Latest)
    model_id: str = ""
    residual: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def model(self) -> dict[str, torch.Tensor]:
        """The model this node holds (empty once another model replaced it in ``latest``)."""
        return self.latest.get(self.model_id) or {}

    def receive(self, wire: Wire, arrays: ArrayRecord, seal: Mapping) -> dict[str, torch.Tensor]:
        """Verify one downlink payload and apply it; the model now held, in fp32."""
        received = wire.open(arrays, seal)
        kind, claimed = str(seal["downlink"]), str(seal["model-id"])
        if kind == "full":
            if claimed != self.model_id and not follows(seal, self.model_id):
                self.residual = {}
            self.latest.model_id, self.latest.model = claimed, bf16(received)
            self.model_id = claimed
            return received
        if seal["base-model"] != self.model_id:
            raise PayloadError(f"server sent a {kind} model for {str(seal['base-model'])[:12] or 'none'}, this node "
                               f"holds {self.model_id[:12] or 'none'}: it gets full weights next time")
        model_id = next_id(self.model_id, str(seal["payload-digest"])) if kind == "delta" else self.model_id
        if model_id != claimed:
            raise PayloadError(f"the {kind} model here is {model_id[:12]}, the server's is {claimed[:12]}")
        model = self.latest.get(model_id)  # another node of this process got there first
        if model is None:
            base = self.latest.get(self.model_id) if kind == "delta" else None
            if base is None:
                raise PayloadError(f"this process no longer holds model {self.model_id[:12]}: "
                                   "it gets full weights next time")
            model = advanced(base, received)
            self.latest.model_id, self.latest.model = model_id, model
        self.model_id = model_id
        return {name: t.float() for name, t in model.items()}

    def seal(self, wire: Wire, update: Mapping[str, torch.Tensor], bound_to: str = "") -> Payload:
        """``update`` plus the residual, sealed in int8; what int8 could not carry becomes the next residual."""
        if self.residual:
            update = {name: t + self.residual[name] for name, t in update.items()}
        arrays, seal = wire.seal(update, bound_to=bound_to)
        self.residual = {name: update[name] - sent for name, sent in decode(arrays, "int8").items()}
        return arrays, seal
