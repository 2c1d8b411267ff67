"""Centralized and local-only baselines: same data, steps, seeds and evaluation as a federated run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAST
from federation import CLIENTS, ROUNDS, config_for, shared_runs

from zk0.tools import baseline
from zk0.config import ConfigError, RunConfig
from zk0.data import open_metadata
from zk0.registry import RegistryError, load_registry
from zk0.tracking import read_metrics


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return shared_runs(tmp_path_factory)


def records(run_dir: Path, **match) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if all(r.get(k) == v for k, v in match.items())]


@pytest.mark.parametrize("mode", baseline.MODES)
def test_baseline_writes_a_run_folder_like_a_federated_one(runs, mode):
    run_dir = runs[mode]
    assert f"-{mode}-" in run_dir.name
    doc = json.loads((run_dir / "config.json").read_text())
    assert doc["mode"] == mode and doc["run-config"]["num-server-rounds"] == ROUNDS
    assert {r["round"] for r in records(run_dir, source="client-eval")} == {0, 1, 2}
    assert [r["round"] for r in records(run_dir, event="round")] == [0, 1, 2]
    assert {r["round"] for r in records(run_dir, source="client")} == {1, 2}
    assert {p.name for p in (run_dir / "charts").glob("*.png")} >= {"train_loss.png", "eval_action_mae.png"}
    assert (run_dir / "checkpoints" / f"round_{ROUNDS}").is_dir()


def test_centralized_round_has_the_steps_and_lr_of_a_federated_round(runs):
    for server_round in (1, 2):
        federated = records(runs["fedprox"], source="client", round=server_round)
        [pooled] = records(runs["centralized"], source="client", round=server_round)
        assert pooled["partition"] == -1 and pooled["dataset"] == "pooled"
        assert pooled["steps"] == FAST["local-steps"] * CLIENTS == sum(r["steps"] for r in federated)
        assert pooled["num-examples"] == sum(r["num-examples"] for r in federated)
        assert {pooled["lr"]} == {r["lr"] for r in federated}


def test_evaluation_covers_the_federated_datasets_and_round_0_is_identical(runs):
    """Same split, initial weights, pooled stats and seeds: round 0 must give the federated numbers exactly."""
    def round_0(run_dir: Path) -> dict[tuple[str, str], float]:
        return {(r["source"], r["dataset"]): r["eval-loss"] for r in records(run_dir, round=0) if "eval-loss" in r}

    federated, centralized, local = (round_0(runs[k]) for k in ("fedprox", "centralized", "local"))
    assert len(federated) == CLIENTS + len(load_registry("embedded").server_eval)
    assert set(centralized) == set(local) == set(federated)
    assert centralized == federated
    held_out = [k for k in federated if k[0] == "client-eval"]
    assert [local[k] for k in held_out] != [federated[k] for k in held_out]  # each client's own stats


def test_local_mode_trains_every_client_alone(runs):
    run_dir = runs["local"]
    names = [e.name for e in load_registry("embedded").clients]
    for server_round in (1, 2):
        trained = records(run_dir, source="client", round=server_round)
        assert [(r["partition"], r["dataset"]) for r in trained] == list(enumerate(names))
        assert {r["steps"] for r in trained} == {FAST["local-steps"]}
    for record in records(run_dir, source="server"):
        if "eval-loss" in record:
            per_client = record["by-partition"]
            assert [p["partition"] for p in per_client] == list(range(CLIENTS))
            assert record["eval-loss"] == pytest.approx(sum(p["eval-loss"] for p in per_client) / CLIENTS)
    partitions = {p.name for p in (run_dir / "checkpoints" / f"round_{ROUNDS}").iterdir()}
    assert partitions == {f"partition_{i}" for i in range(CLIENTS)}


def test_sim_evaluation_on_its_cadence_with_a_mean_over_local_policies(tmp_path, monkeypatch):
    """sim-eval-every=2 over 3 rounds: rounds 0, 2 and the last; the simulator itself is faked (tested elsewhere)."""
    calls = []

    def fake_evaluate_in_sim(policy, pre, post, tasks, episodes, seed, image_size, video_dir):
        calls.append((tuple(tasks), episodes, seed, image_size))
        return {t: {"success-rate": len(calls) % 2, "episodes": episodes, "mean-steps": 1.0} for t in tasks}

    monkeypatch.setattr(baseline, "evaluate_in_sim", fake_evaluate_in_sim)
    monkeypatch.setattr(baseline, "simulator_tasks", lambda cfg, registry: [registry.clients[0].target])
    cfg = RunConfig.from_run_config(config_for(tmp_path, **{"num-server-rounds": 3, "sim-eval-every": 2,
                                                            "sim-eval-episodes": 3, "eval-every": 3}))
    run_dir = baseline.run_baseline(cfg, "local", num_clients=2)
    sims = records(run_dir, event="sim-eval")
    assert [r["round"] for r in sims] == [0, 2, 3]
    assert all(r["success-rate"] == 0.5 and r["episodes"] == 3 and len(r["by-partition"]) == 2 for r in sims)
    camera = next(f for f in open_metadata(load_registry("embedded").clients[0]).features.values()
                  if f["dtype"] in ("video", "image"))  # rollouts render what the policy trained on
    assert len(calls) == 6 and {c[1:] for c in calls} == {(3, cfg.seed, camera["shape"][0])}
    assert [r["round"] for r in records(run_dir, source="client-eval")] == [0, 0, 3, 3]


def test_bad_mode_or_client_count_is_refused_before_anything_runs(tmp_path):
    cfg = RunConfig.flat(output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="centralized|local"):
        baseline.run_baseline(cfg, "federated")
    with pytest.raises(RegistryError, match="num_clients=9"):
        baseline.run_baseline(cfg, "local", num_clients=9)
    assert not list(tmp_path.iterdir())
