"""Helpers that run a federation in one process, read what it left, or build the messages it exchanges."""

from __future__ import annotations

import json
import os
from pathlib import Path
from uuid import uuid4

import torch
from conftest import FAST, ROOT, RUN_ID
from filelock import FileLock
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.config import get_fused_config_from_dir
from inprocess import InProcessGrid

from zk0 import client_app, server_app, transport
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
    """A federated run and both baselines of the same config, made once per session (baselines and compare).

    pytest-xdist workers share them through an index in the session's folder, built by the first worker
    that asks while the others wait on its lock: each worker building its own would take minutes of CPU.
    """
    if not _RUNS:
        session = tmp_path_factory.getbasetemp()
        index = (session.parent if os.environ.get("PYTEST_XDIST_WORKER") else session) / "shared-runs.json"
        with FileLock(f"{index}.lock"):
            if not index.exists():
                index.write_text(json.dumps({mode: str(path) for mode, path in _build_runs(tmp_path_factory).items()}))
        _RUNS.update({mode: Path(path) for mode, path in json.loads(index.read_text()).items()})
    return _RUNS


def _build_runs(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("runs")
    runs = {"fedprox": run_federation(config_for(out / "fedprox"), num_nodes=CLIENTS)[0]}
    for mode in baseline.MODES:
        runs[mode] = baseline.run_baseline(RunConfig.from_run_config(config_for(out / mode)), mode)
    return runs


def request(node: int, message_type: str = MessageType.TRAIN) -> Message:
    """A server message to ``node`` as the grid would have sent it (so a reply can answer it)."""
    msg = Message(RecordDict(), dst_node_id=node, message_type=message_type)
    msg.metadata.__dict__["_message_id"] = str(uuid4())
    msg.metadata.__dict__["_src_node_id"] = 1
    return msg


def train_reply(state: RoundState, node: int, update: dict[str, torch.Tensor],
                metrics: dict | None = None) -> Message:
    """A well-formed train reply from ``node`` (partition ``node - 101``) with ``metrics`` overriding the defaults."""
    arrays, seal = state.wire.seal(update, bound_to=transport.binding(RUN_ID, 1))
    payload = ConfigRecord({**seal, "partition-id": node - 101, "dataset": f"set-{node}", "server-round": 1})
    values = {"train-loss": 1.0, "num-examples": 8} | (metrics or {})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(values), "payload": payload}),
                   reply_to=request(node))


def small_update(seed: int) -> dict[str, torch.Tensor]:
    """A small update of the tensors of the ``round_state`` fixture."""
    gen = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(3, 2, generator=gen) * 0.1, "b": torch.randn(4, generator=gen) * 0.1}
