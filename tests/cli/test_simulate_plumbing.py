"""`zk0 simulate`'s plumbing into Flower's simulation engine, without starting Ray.

What reaches the clients is asserted on what Flower builds for them (their Context), and
client resources on the backend config Ray would get.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import typer
from flwr.compat.client.run_info_store import DeprecatedRunInfoStore

from zk0.cli import simulate
from zk0.config import RunConfig


@pytest.fixture
def captured(monkeypatch):
    """Flower's `_run_simulation` replaced by a recorder of its arguments."""
    calls: dict = {}
    module = importlib.import_module("flwr.simulation.run_simulation")  # the package re-exports a same-named function
    monkeypatch.setattr(module, "_run_simulation", lambda **kwargs: calls.update(kwargs))
    return calls


def test_client_contexts_get_the_overrides(captured, tmp_path):
    overrides = {"local-steps": 3, "batch-size": 2, "model-name": "smolvla-size", "datasets": "so101-hub",
                 "output-dir": str(tmp_path)}
    simulate._run_simulation(overrides, 2, {"num_cpus": 1, "num_gpus": 0.0})
    run = captured["run"]
    store = DeprecatedRunInfoStore(node_id=11, node_config={"partition-id": 1, "num-partitions": 2})
    store.register_context(run_id=run.run_id, run=run, app_dir=captured["app_dir"])  # what each simulated node does
    client = RunConfig.from_run_config(store.retrieve_context(run.run_id).run_config)
    server = RunConfig.from_run_config(captured["server_app_context"].run_config)
    assert client == server
    assert (client.train.local_steps, client.train.batch_size, client.model.model_name, client.data.datasets) == (
        3, 2, "smolvla-size", "so101-hub")
    assert captured["backend_config"]["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}
    assert captured["backend_config"]["init_args"]["_node_ip_address"] == "127.0.0.1"


def cfg(**values) -> RunConfig:
    return RunConfig.flat(**values)


def test_gpu_share_defaults_to_one_gpu_for_all_clients(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert simulate.client_gpu_share(cfg(), 4, None) == 0.25
    assert simulate.client_gpu_share(cfg(), 1, None) == 1.0
    assert simulate.client_gpu_share(cfg(), 4, 0.5) == 0.5
    assert simulate.client_gpu_share(cfg(device="cpu"), 4, None) == 0.0


def test_gpu_share_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert simulate.client_gpu_share(cfg(), 4, None) == 0.0
    with pytest.raises(typer.Exit):
        simulate.client_gpu_share(cfg(), 4, 0.5)
    with pytest.raises(typer.Exit):
        simulate.client_gpu_share(cfg(device="cuda"), 4, None)


def test_cuda_clients_need_a_gpu_share(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(typer.Exit):
        simulate.client_gpu_share(cfg(device="cuda"), 4, 0.0)


def test_server_builds_its_policy_on_server_device(monkeypatch, run_config, tmp_path):
    """The server's policy (evaluation, checkpoints) goes where `server-device` says, clients' where `device` says."""
    from inprocess import InProcessGrid
    from flwr.app import Context, RecordDict

    from zk0 import client_app, server_app

    devices = []
    real = server_app.build_policy

    def recording(cfg, device_name=None):
        devices.append(device_name)
        return real(cfg, device_name)

    monkeypatch.setattr(server_app, "build_policy", recording)
    config = run_config(num_server_rounds=1, server_device="cpu", device="auto", min_train_nodes=1,
                        min_evaluate_nodes=1)
    grid = InProcessGrid(client_app.app, config, 1)
    server_app.app(grid, Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    assert devices == ["cpu"]
