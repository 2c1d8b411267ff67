"""Shared test setup: offline, single-threaded, one cache of generated artefacts per checkout."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ.setdefault("ZK0_CACHE", str(ROOT / ".pytest_cache" / "zk0"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

RUN_ID = 1  # the run of the unit tests that build replies by hand (server_identity, federation.train_reply)
FAST = {"local-steps": 2, "batch-size": 4, "eval-batches": 1, "min-stats-clients": 1}  # small federations


@pytest.fixture
def run_config(tmp_path):
    """Build a Flower run config (pyproject defaults + overrides) like `flwr run` does."""
    from flwr.common.config import get_fused_config_from_dir

    def make(**overrides) -> dict:
        values = {**FAST, "output-dir": str(tmp_path / "outputs"),
                  **{k.replace("_", "-"): v for k, v in overrides.items()}}
        return get_fused_config_from_dir(ROOT, values)

    return make


@pytest.fixture(scope="session")
def smolvla_base_folder(tmp_path_factory):
    """A local smolvla_base-format pretrained policy folder (see tests/realworld.py)."""
    from realworld import write_smolvla_base_format

    return write_smolvla_base_format(tmp_path_factory.mktemp("smolvla_base_format"))


@pytest.fixture(scope="session")
def lab_registry(tmp_path_factory):
    """A user's registry file outside the checkout, over datasets with their own camera names."""
    from realworld import write_lab

    return write_lab(tmp_path_factory.mktemp("lab"))


@pytest.fixture
def events() -> list[dict]:
    """What the round loop reported (it goes to metrics.jsonl in a run)."""
    return []


@pytest.fixture
def server_identity(monkeypatch) -> None:
    """Build messages as the ServerApp process does (Flower stamps them with the task's identity)."""
    from flwr.supercore.task_identity import TaskIdentity
    from inprocess import SERVER_NODE_ID

    for name, value in (("_task_id", 1), ("_run_id", RUN_ID), ("_node_id", SERVER_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture
def make_round_state(tmp_path, events, server_identity):
    """Round 1 of a run over two small tensors; 2 local steps of batch 4 (at most 8 frames); 1 eval batch (4 frames);
    the factory's keyword arguments override run-config keys."""
    from zk0.audit import AuditLog
    from zk0.config import RunConfig
    from zk0.rounds import RoundState

    def make(**keys):
        cfg = RunConfig.flat(**{"transport_dtype": "fp32", "min_train_nodes": 1, "local_steps": 2, "batch_size": 4,
                                "eval_batches": 1, **keys})
        return RoundState(cfg, {"a": torch.randn(3, 2), "b": torch.randn(4)}, "stats", "base", AuditLog(tmp_path),
                          events.append, server_round=1)
    return make


@pytest.fixture
def round_state(make_round_state):
    """Round 1 of a run over two small tensors, with ``make_round_state``'s defaults."""
    return make_round_state()


@pytest.fixture
def strategy(round_state):
    """The strategy of the ``round_state`` run, verifying on its server's wire."""
    from zk0.strategy import SmolVLAStrategy

    return SmolVLAStrategy(round_state.cfg, round_state.wire, RUN_ID)
