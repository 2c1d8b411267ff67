"""Helpers that run a federation in one process, read what it left, or build the messages it exchanges."""

from __future__ import annotations

from pathlib import Path
from uuid import uuid4

import torch
from conftest import FAST, ROOT
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.config import get_fused_config_from_dir
from inprocess import InProcessGrid

from zk0 import client_app, server_app
from zk0.checkpoint import STATE_FILE
from zk0.config import RunConfig
from zk0.registry import load_registry
from zk0.rounds import RoundState
from zk0.tools import baseline

ROUNDS = 2  # rounds of the shared federated and baseline runs
CLIENTS = len(load_registry("embedded").clients)
_RUNS: dict[str, Path] = {}


def run_federation(config: dict, num_nodes: int = 2, intercept=None,
                   run_id: int | None = None) -> tuple[Path, InProcessGrid]:
    """Run the unchanged ServerApp against the unchanged ClientApp; return the run folder.

    Clients keep their state per run id: the same ``run_id`` as an earlier call finds its clients as they were.
    """
    grid = InProcessGrid(client_app.app, config, num_nodes, intercept=intercept, run_id=run_id)
    server_app.app(grid, Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    runs = sorted(Path(config["output-dir"]).iterdir())
    return runs[-1], grid


def final_master(run_dir: Path) -> dict[str, torch.Tensor]:
    """The global trainable tensors the run saved last."""
    return torch.load(run_dir / STATE_FILE, weights_only=True)["master"]


def config_for(output_dir: Path, **overrides) -> dict:
    """One run config for every mode. fp32 transport: federated clients then evaluate the exact initial weights."""
    return get_fused_config_from_dir(ROOT, {**FAST, "num-server-rounds": ROUNDS, "transport-dtype": "fp32",
                                            "output-dir": str(output_dir), **overrides})


def shared_runs(tmp_path_factory) -> dict[str, Path]:
    """A federated run and both baselines of the same config, made once per session (baselines and compare)."""
    if not _RUNS:
        out = tmp_path_factory.mktemp("runs")
        _RUNS["fedprox"], _ = run_federation(config_for(out / "fedprox"), num_nodes=CLIENTS)
        for mode in baseline.MODES:
            cfg = RunConfig.from_run_config(config_for(out / mode))
            _RUNS[mode] = baseline.run_baseline(cfg, mode)
    return _RUNS


def request(node: int, message_type: str = MessageType.TRAIN) -> Message:
    """A server message to ``node`` as the grid would have sent it (so a reply can answer it)."""
    msg = Message(RecordDict(), dst_node_id=node, message_type=message_type)
    msg.metadata.__dict__["_message_id"] = str(uuid4())
    msg.metadata.__dict__["_src_node_id"] = 1
    return msg


def train_reply(state: RoundState, node: int, update: dict[str, torch.Tensor],
                metrics: dict | None = None) -> Message:
    """A well-formed train reply from ``node`` (partition ``node - 101``) with ``metrics`` overriding the defaults."""
    arrays, seal = state.wire.seal(update)
    payload = ConfigRecord({**seal, "partition-id": node - 101, "dataset": f"set-{node}", "server-round": 1})
    values = {"train-loss": 1.0, "num-examples": 8} | (metrics or {})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(values), "payload": payload}),
                   reply_to=request(node))


def small_update(seed: int) -> dict[str, torch.Tensor]:
    """A small update of the tensors of the ``round_state`` fixture."""
    gen = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(3, 2, generator=gen) * 0.1, "b": torch.randn(4, generator=gen) * 0.1}
