"""zk0.chain: an int8 run's model chain (server and nodes agree bit for bit) and the nodes' error feedback."""

from __future__ import annotations

import pytest
import torch

from zk0 import transport
from zk0.chain import Chain, Held
from zk0.transport import PayloadError

SHAPES = {"w": (6, 5), "b": (5,)}


def wire(side: str) -> transport.Wire:
    return transport.Wire(side, "base", "int8", SHAPES)


def model(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) * scale for name, shape in SHAPES.items()}


def send(chain: Chain, node: int, master: dict, held: Held) -> str:
    """One message from the server to ``node`` and its reply; the kind of payload it got."""
    arrays, seal = chain.payload(node, master)
    held.receive(wire("client"), arrays, seal)
    chain.confirm(node, held.model_id)
    return seal["downlink"]


def test_a_node_holds_the_servers_chain_bit_for_bit_and_the_chain_follows_the_global_model():
    chain, held, master = Chain(wire("server")), Held(), model(0)
    assert send(chain, 101, master, held) == "full"
    assert send(chain, 101, master, held) == "unchanged"
    for step in range(1, 30):
        master = {n: t + 0.01 * step * d for (n, t), d in zip(master.items(), model(step).values())}
        chain.moved()
        assert send(chain, 101, master, held) == "delta"
        assert held.model_id == chain.model_id
        assert all(torch.equal(held.model[n], chain.model[n]) for n in SHAPES)
        assert all(torch.allclose(chain.model[n].float(), master[n], rtol=2**-7, atol=0.02) for n in SHAPES)
    chain.moved()
    send(chain, 101, master, held)  # a step while the global model stood still: what int8 left out arrives
    assert all(torch.allclose(chain.model[n].float(), master[n], rtol=2**-8, atol=1e-4) for n in SHAPES)


def test_each_node_gets_what_it_can_use():
    chain, on, behind, fresh = Chain(wire("server")), Held(), Held(), Held()
    master = model(0)
    send(chain, 101, master, on)
    send(chain, 102, master, behind)
    master = {n: t + 0.1 for n, t in master.items()}
    chain.moved()
    assert send(chain, 101, master, on) == "delta"
    assert send(chain, 101, master, on) == "unchanged"
    assert send(chain, 102, master, behind) == "delta"  # one step behind: the same step's payload
    assert send(chain, 103, master, fresh) == "full"
    assert fresh.model_id == on.model_id and all(torch.equal(fresh.model[n], on.model[n]) for n in SHAPES)


def test_a_node_that_lost_track_refuses_in_one_line_and_gets_full_weights_next():
    chain, held, master = Chain(wire("server")), Held(), model(0)
    send(chain, 101, master, held)
    arrays, seal = chain.payload(101, master)  # unchanged, but the node restarted meanwhile
    with pytest.raises(PayloadError, match=r"server sent a unchanged model for \w{12}, this node holds none"):
        Held().receive(wire("client"), arrays, seal)
    assert chain.payload(101, master)[1]["downlink"] == "full"  # no confirmation came back


def test_a_node_refuses_a_delta_whose_model_id_is_not_the_one_it_makes():
    chain, held, master = Chain(wire("server")), Held(), model(0)
    send(chain, 101, master, held)
    chain.moved()
    arrays, seal = chain.payload(101, {n: t + 0.1 for n, t in master.items()})
    with pytest.raises(PayloadError, match="the delta model here is"):
        held.receive(wire("client"), arrays, {**seal, "model-id": "f" * 64})


def test_error_feedback_loses_nothing_over_rounds():
    held, sent, true = Held(), [], [model(seed, 1e-3) for seed in range(20)]
    for update in true:
        arrays, _ = held.seal(wire("client"), update)
        sent.append(transport.decode(arrays, "int8"))
    for name in SHAPES:
        assert torch.allclose(sum(s[name] for s in sent), sum(u[name] for u in true) - held.residual[name],
                              atol=1e-7)
    scale = max(float(u[name].abs().max()) for u in true for name in SHAPES) * 2 / 127
    assert all(float(r.abs().max()) <= scale for r in held.residual.values())  # at most one step behind


def test_the_residual_survives_a_full_copy_of_the_held_model_but_not_a_new_model():
    chain, held, master = Chain(wire("server")), Held(), model(0)
    send(chain, 101, master, held)
    held.seal(wire("client"), model(1, 1e-3))
    assert held.residual
    send(Chain(wire("server"), chain.state()), 101, master, held)  # a resumed server: full, the same model
    assert held.residual
    send(Chain(wire("server")), 101, model(2), held)  # another model
    assert held.residual == {}


def test_the_residual_survives_the_full_model_one_step_on_from_the_held_one():
    """A server saved before its chain stepped to the next model (a round whose end is pending) sends that model
    in full after a resume, naming the step: a node holding the model it stepped from keeps its residual."""
    chain, kept, forged = Chain(wire("server")), Held(), Held()
    for node, held in ((101, kept), (102, forged)):
        send(chain, node, model(0), held)
        held.seal(wire("client"), model(node, 1e-3))
    chain.moved()
    arrays, seal = Chain(wire("server"), chain.state()).payload(101, model(3))
    assert seal["downlink"] == "full" and seal["follows"] == kept.model_id
    residual = dict(kept.residual)
    kept.receive(wire("client"), arrays, seal)
    assert kept.model_id == seal["model-id"] and all(torch.equal(residual[n], kept.residual[n]) for n in residual)
    forged.receive(wire("client"), arrays, {**seal, "step-digest": "0" * 64})  # a step that makes another model
    assert forged.residual == {}
