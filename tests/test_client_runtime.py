"""The client runtime: the virtual clients of one process share one policy, and none sees what another trained."""

from __future__ import annotations

import itertools
import weakref
from pathlib import Path

import pytest
import torch
from federation import final_master
from flwr.app import Context, Message, RecordDict
from inprocess import InProcessGrid

from zk0 import client_app, server_app, transport
from zk0.audit import read_audit
from zk0.chain import Chain, Held, Latest
from zk0.tracking import read_metrics
from zk0.transport import PayloadError


RUN_IDS = itertools.count(7000)  # a fresh run per test: the shared process keeps state per run


class OwnProcesses:
    """A ClientApp whose every node runs in a process of its own, as if no virtual client shared one."""

    def __init__(self) -> None:
        self.processes: dict[int, tuple[dict, weakref.WeakValueDictionary]] = {}

    def __call__(self, msg: Message, context: Context) -> Message:
        own = self.processes.setdefault(context.node_id, ({}, weakref.WeakValueDictionary()))
        shared = client_app._RUNTIMES, client_app._SHARED
        client_app._RUNTIMES, client_app._SHARED = own
        try:
            return client_app.app(msg, context)
        finally:
            client_app._RUNTIMES, client_app._SHARED = shared


def federate(config: dict, app, run_id: int) -> tuple[Path, InProcessGrid]:
    """Two rounds of the real ServerApp against ``app`` on two nodes of run ``run_id``; the run folder and the grid."""
    grid = InProcessGrid(app, config, 2, run_id=run_id)
    server_app.app(grid, Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    (run_dir,) = Path(config["output-dir"]).iterdir()
    return run_dir, grid


def replies(run_dir: Path) -> dict[tuple, object]:
    """What every client replied, by round, source and node: its metrics, and its update's digest."""
    metrics = {(r["round"], r["source"], r["node"]): {k: v for k, v in r.items()
                                                      if k != "time" and not k.endswith("-seconds")}  # wall times
               for r in read_metrics(run_dir / "metrics.jsonl") if str(r.get("source")).startswith("client")}
    digests = {(a["round"], "update", a["node"]): a["digest"] for a in read_audit(run_dir)
               if a["direction"] == "received" and a["phase"] == "train"}
    return metrics | digests


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_clients_sharing_one_process_reply_what_each_computes_alone(run_config, tmp_path, monkeypatch, dtype):
    """Each message loads the weights it received: the second client of a process never trains on the first's."""
    built = []
    build = client_app.build_policy
    monkeypatch.setattr(client_app, "build_policy", lambda cfg: built.append(cfg) or build(cfg))
    runs = {}
    run_id = next(RUN_IDS)  # both runs alike: updates are bound to their run (and the alone run keeps its own state)
    for name, app in (("shared", client_app.app), ("alone", OwnProcesses())):
        config = run_config(num_server_rounds=2, transport_dtype=dtype, output_dir=str(tmp_path / name))
        runs[name] = federate(config, app, run_id)
    assert len(built) == 1 + 2  # one policy for the process of two clients, one for each client alone
    (shared, grid), (alone, _) = runs["shared"], runs["alone"]
    sent = replies(shared)
    phases = {(0, "client-eval")} | {(n, phase) for n in (1, 2) for phase in ("client", "client-eval", "update")}
    assert {key[:2] for key in sent} == phases and {key[2] for key in sent} == {101, 102}
    assert sent == replies(alone)
    assert all(torch.equal(a, b) for a, b in zip(final_master(shared).values(), final_master(alone).values()))
    first, second = (client_app._RUNTIMES[(grid.run_id, node)] for node in (101, 102))
    assert first.shared is second.shared and first.split is not second.split
    if dtype == "int8":  # one copy of the model both hold; a residual each
        assert first.held.model and first.held.model is second.held.model
        assert first.held.residual and first.held.residual is not second.held.residual


def test_a_runs_policy_goes_when_its_last_client_does(run_config):
    """A deployment's worker drops a finished run's runtimes: the run's policy must not outlive them."""
    grid = InProcessGrid(client_app.app, run_config(), 2)
    shared = weakref.ref(client_app.runtime(grid.contexts[101]).shared)
    assert client_app.runtime(grid.contexts[102]).shared is shared()
    for node in (101, 102):
        del client_app._RUNTIMES[(grid.run_id, node)]
    assert shared() is None


def test_a_node_refuses_a_model_its_process_no_longer_holds():
    """Two nodes of one process share the last model; one whose model went is sent full weights next."""
    shapes = {"w": (4, 3)}
    server, client = (transport.Wire(side, "base", "int8", shapes) for side in ("server", "client"))
    latest, chain = Latest(), Chain(server)
    kept, moved = Held(latest), Held(latest)
    for node, held in ((101, kept), (102, moved)):
        held.receive(client, *chain.payload(node, {"w": torch.ones(4, 3)}))
        chain.confirm(node, held.model_id)
    moved.receive(client, *Chain(server).payload(102, {"w": torch.zeros(4, 3)}))  # another model replaces it
    with pytest.raises(PayloadError, match="this process no longer holds model .*: it gets full weights next time"):
        kept.receive(client, *chain.payload(101, {"w": torch.ones(4, 3)}))
