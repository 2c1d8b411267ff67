"""A robot owner's path, in one process: a smolvla_base-format model, a registry file of their own
outside the checkout, datasets whose cameras are named and counted their own way.

What is asserted is what the components did (the clients' and the server's records), not what
the config said.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from federation import run_federation
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from inprocess import InProcessGrid
from realworld import LAB, SMOLVLA_BASE_CAMERAS

from zk0 import client_app
from zk0.tools import baseline
from zk0.config import RunConfig
from zk0.tracking import read_metrics

STEPS, BATCH = 3, 2
CLIENTS, UNSEEN = list(LAB)[:2], list(LAB)[2]


@pytest.fixture(scope="module")
def lab_config(tmp_path_factory, lab_registry, smolvla_base_folder):
    from conftest import FAST, ROOT
    from flwr.common.config import get_fused_config_from_dir

    return get_fused_config_from_dir(ROOT, {
        **FAST, "num-server-rounds": 1, "local-steps": STEPS, "batch-size": BATCH, "chunk-size": 5,
        "model-name": str(smolvla_base_folder), "registry": str(lab_registry), "datasets": "lab",
        "output-dir": str(tmp_path_factory.mktemp("outputs"))})


@pytest.fixture(scope="module")
def lab_run(lab_config):
    run_dir, _ = run_federation(lab_config)
    return run_dir, read_metrics(run_dir / "metrics.jsonl")


def test_clients_train_on_the_registry_files_datasets_with_the_overrides(lab_run):
    run_dir, records = lab_run
    trained = [r for r in records if r["source"] == "client"]
    assert sorted(r["dataset"] for r in trained) == sorted(CLIENTS)
    assert all(r["steps"] == STEPS and r["num-examples"] == STEPS * BATCH for r in trained)
    assert all(np.isfinite(r["train-loss"]) for r in trained)
    server_base = json.loads((run_dir / "config.json").read_text())["base-fingerprint"][:16]
    assert {r["base"] for r in trained} == {server_base}  # every client built the model the run names
    assert sorted(r["dataset"] for r in records if r["source"] == "client-eval") == sorted(CLIENTS * 2)


def test_server_evaluates_the_registry_files_unseen_set(lab_run):
    run_dir, records = lab_run
    unseen = [r for r in records if r["source"] == "server" and r.get("dataset") == UNSEEN]
    assert [r["round"] for r in unseen] == [0, 1] and all(np.isfinite(r["eval-loss"]) for r in unseen)
    doc = json.loads((run_dir / "config.json").read_text())
    assert doc["datasets"]["profile"] == "lab"


def test_checkpoint_keeps_smolvla_base_cameras(lab_run):
    run_dir, _ = lab_run
    config = json.loads((run_dir / "checkpoints" / "round_1" / "config.json").read_text())
    assert set(SMOLVLA_BASE_CAMERAS) <= set(config["input_features"])


def test_client_logs_which_camera_feeds_which(lab_config, caplog):
    grid = InProcessGrid(client_app.app, lab_config, 2)
    context = grid.contexts[102]
    with caplog.at_level("INFO", logger="flwr"):
        client_app.runtime(context)
    assert ("cameras observation.images.front -> observation.image, (none: SmolVLA skips it) -> "
            "observation.image2, observation.images.side -> observation.image3") in caplog.text


def test_baseline_runs_on_the_registry_file(lab_config):
    run_dir = baseline.run_baseline(RunConfig.from_run_config(lab_config), "centralized")
    records = read_metrics(run_dir / "metrics.jsonl")
    assert sorted(r["dataset"] for r in records if r["source"] == "client-eval" and r["round"] == 1) == sorted(CLIENTS)
    assert [r["round"] for r in records if r.get("dataset") == UNSEEN] == [0, 1]


def node_reply(config: dict, node_config: dict, node_id: int) -> Message:
    """A deployment node's reply to the server's stats query (as the SuperNode delivers it)."""
    query = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node_id, message_type=MessageType.QUERY)
    query.metadata.__dict__["_message_id"] = f"q{node_id}"
    context = Context(run_id=77, node_id=node_id, node_config=node_config, state=RecordDict(), run_config=config)
    return client_app.app(query, context)


def test_a_deployment_node_uses_its_camera_mapping(lab_config, lab_registry):
    uri = f"local:{lab_registry.parent / CLIENTS[0]}"
    reply = node_reply(lab_config, {"dataset": uri, "cameras": "top=observation.image"}, 5)
    assert not reply.has_error() and reply.content["stats"]["dataset"] == CLIENTS[0]


def test_a_node_whose_cameras_feed_nothing_answers_one_short_line(lab_config, lab_registry):
    uri = f"local:{lab_registry.parent / CLIENTS[0]}"
    reply = node_reply(lab_config, {"dataset": uri}, 6)
    assert reply.has_error()
    reason = reply.error.reason
    assert "no dataset camera feeds the policy" in reason
    assert len(reason) <= 300 and "\n" not in reason and str(lab_registry.parent) not in reason


def test_zk0_eval_maps_a_datasets_cameras_onto_the_checkpoints(lab_run, lab_registry):
    from typer.testing import CliRunner

    from zk0.cli.app import app

    run_dir, _ = lab_run
    args = ["eval", str(run_dir / "checkpoints" / "round_1"), "--dataset", f"local:{lab_registry.parent / UNSEEN}"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 1 and "no dataset camera feeds the policy" in refused.stderr
    mapped = CliRunner().invoke(app, [*args, "--camera", "gripper=observation.image2"])
    assert mapped.exit_code == 0, mapped.output
    assert "action MAE" in mapped.stdout
