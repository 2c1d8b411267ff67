"""The model card says what happened, from the run folder's records, in a form the Hub validates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard import metadata_load

from zk0.config import RunConfig
from zk0.model_card import model_card
from zk0.policy import policy_config


def run_folder(root: Path, mode: str | None = None, **keys) -> Path:
    """Four registry clients, only two of which trained (one left after round 1); sim success measured; ``keys``:
    run-config overrides."""
    run = root / "run"
    run.mkdir()
    config = RunConfig.flat(model_name="lerobot/smolvla_base", num_server_rounds=2, strategy="fedavg", **keys)
    doc = {"run-config": config.to_run_config(), "base-fingerprint": "ab" * 32,
           "datasets": {"profile": "so101-hub",
                        "clients": [{"uri": u} for u in ("hf:alice/pick", "hf:bob/place", "local:/x", "hf:c/d")],
                        "server-eval": [{"uri": "hf:zk0/unseen"}]}}
    if mode:
        doc["mode"] = mode
    (run / "config.json").write_text(json.dumps(doc))
    records = [{"round": 1, "source": "client", "dataset": d, "train-loss": 1.0} for d in ("pick", "place")]
    records += [{"round": 2, "source": "client", "dataset": "pick", "train-loss": 0.5}]
    records += [{"round": r, "source": "client-eval", "dataset": "pick", "eval-loss": 2.0 - r / 2,
                 "eval-action-mae": 20.0 - 5 * r} for r in (0, 2)]
    records += [{"round": r, "source": "server", "dataset": "unseen", "eval-loss": 3.0, "eval-action-mae": 30.0 - r}
                for r in (0, 2)]
    records += [{"round": 2, "source": "server", "event": "sim-eval", "dataset": "red-pick", "success-rate": 0.5}]
    records += [{"round": 0, "source": "server", "event": "federation", "nodes": 4, "reported": 3,
                 "runtime": "deployment"}]
    records += [{"round": 0, "source": "server", "event": "client-dataset", "node": n, "partition": -1, "dataset": d,
                 "robot-type": "so101_follower", "fps": 30, "tasks": tasks, "num-tasks": total,
                 "train-episodes": train, "held-out-episodes": held}
                for n, d, tasks, total, train, held in ((7, "pick", ["Pick the cube | fast", "<b>bin</b>"], 3, 40, 10),
                                                        (8, "place", ["Place it"], 1, 9, 3),
                                                        (9, "idle", ["never trained"], 1, 5, 1))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


@pytest.fixture(scope="module")
def features():
    return policy_config(RunConfig.flat(chunk_size=5))


def test_the_card_validates_on_the_hub_and_indexes_the_metrics(tmp_path, features):
    card = model_card(run_folder(tmp_path), 2, features)
    (tmp_path / "README.md").write_text(card)
    meta = metadata_load(tmp_path / "README.md")
    assert meta["library_name"] == "lerobot" and meta["pipeline_tag"] == "robotics"
    assert meta["base_model"] == "lerobot/smolvla_base" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["alice/pick", "bob/place", "c/d", "zk0/unseen"]
    assert {"smolvla", "federated-learning", "flower", "so101"} <= set(meta["tags"])
    results = ModelCard(card).data.eval_results
    assert {(r.dataset_name, r.metric_value) for r in results} == {("pick", 10.0), ("unseen", 28.0)}


def test_the_card_lists_who_really_trained_and_the_results(tmp_path, features):
    card = model_card(run_folder(tmp_path), 2, features)
    assert "federated fedavg across 2 clients" in card
    assert "| 1 | 2 | pick, place |" in card and "| 2 | 1 | pick |" in card
    assert "| pick | held-out | 2 | 1 | 20 | 10 |" in card and "| unseen | unseen-task | 3 | 3 | 30 | 28 |" in card
    assert "Simulator success (closed loop): not measured at round 0, 50% at round 2." in card
    assert "| `observation.state` | state | [6] |" in card and "| `action` | action | [6] |" in card
    assert "chunks of 5 actions" in card and "never left their machines" in card
    assert "zk0 eval <folder> --sim" in card and "@article{shukor2025smolvla" in card


def test_a_baseline_card_says_it_is_a_baseline_and_local_models_name_no_base(tmp_path, features):
    run = run_folder(tmp_path, mode="centralized")
    config = json.loads((run / "config.json").read_text())
    config["run-config"]["model-name"] = "tiny"
    (run / "config.json").write_text(json.dumps(config))
    card = model_card(run, 2, features)
    assert "trained centrally on the pooled training episodes (a baseline)" in card
    assert "base_model" not in ModelCard(card).data.to_dict()


def test_the_card_describes_each_training_clients_data_and_says_it_was_a_deployment(tmp_path, features):
    run = run_folder(tmp_path)
    card = model_card(run, 2, features)
    assert "A deployment: a Flower SuperLink and one SuperNode per robot owner, next to that owner's data" in card
    assert "3 of the 4 connected nodes reported their dataset" in card
    assert ("| pick | so101_follower | 30 | Pick the cube \\| fast; &lt;b&gt;bin&lt;/b&gt; (and 1 more) | 40 | 10 | "
            "2 (1–2) |") in card, "owner text cannot break the table or add HTML"
    assert "| place | so101_follower | 30 | Place it | 9 | 3 | 1 (1) |" in card
    assert "never trained" not in card, "only the clients that trained are listed"
    assert "## Baseline comparison" not in card, "no zk0 compare was run on this run"


def test_a_compare_table_in_the_run_folder_becomes_the_cards_comparison(tmp_path, features):
    run = run_folder(tmp_path)
    columns = [["held-out-mae", "held-out MAE"], ["unseen-mae", "unseen MAE"]]
    runs = [{"folder": run.name, "mode": "fedavg", "rows": [{"round": 0, "held-out-mae": 20.0, "unseen-mae": 30.0,
                                                             "optimizer-steps": 0},
                                                            {"round": 2, "held-out-mae": 10.0, "unseen-mae": 28.0,
                                                             "optimizer-steps": 16}]},
            {"folder": "20261130-centralized-1", "mode": "centralized",
             "rows": [{"round": 2, "held-out-mae": 12.5, "unseen-mae": None, "optimizer-steps": None}]}]
    (run / "compare.json").write_text(json.dumps({"compared": "2026-11-30 10:00", "columns": columns, "runs": runs}))
    card = model_card(run, 2, features)
    assert "`zk0 compare` (2026-11-30 10:00) set this run beside 1 other run(s)" in card
    assert "| run | mode | round | held-out MAE | unseen MAE | optimizer steps |" in card
    assert "| **this run** | fedavg | 2 | 10 | 28 | 16 |" in card
    assert "| 20261130-centralized-1 | centralized | 2 | 12.5 | — | — |" in card
    assert metadata_load(_saved(tmp_path, card))["library_name"] == "lerobot"


def test_a_simulation_says_so(tmp_path, features):
    run = run_folder(tmp_path)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        if record.get("event") == "federation":
            record["runtime"] = "simulation"
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert "A simulation: Flower's simulation runtime ran every client on one machine" in model_card(run, 2, features)


def _saved(folder: Path, card: str) -> Path:
    (folder / "README.md").write_text(card)
    return folder / "README.md"


def test_a_federated_runs_card_holds_what_its_clients_datasets_hold(tmp_path_factory):
    """Through the real query phase: each client's reply, checked by the server, recorded, joined in the card."""
    from federation import config_for, run_federation

    from zk0.checkpoint import load_config
    from zk0.data import open_metadata, split_episodes
    from zk0.registry import load_registry
    from zk0.tracking import read_metrics

    run, _ = run_federation(config_for(tmp_path_factory.mktemp("out"), **{"num-server-rounds": 1}), num_nodes=2)
    readme = run / "checkpoints" / "round_1" / "README.md"
    card = readme.read_text()
    assert card == model_card(run, 1, load_config(readme.parent)), "the saved card is the one the records give"
    assert "A simulation: Flower's simulation runtime" in card and "2 of the 2 connected nodes" in card
    facts = {r["dataset"]: r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "client-dataset"}
    config = RunConfig.from_run_config(json.loads((run / "config.json").read_text())["run-config"])
    for entry in load_registry("embedded").clients[:2]:
        meta = open_metadata(entry)
        train, held = split_episodes(meta.total_episodes, config.data.held_out_fraction, config.data.split_seed)
        (task,) = meta.tasks.index
        assert {k: facts[entry.name][k] for k in ("robot-type", "fps", "tasks", "train-episodes",
                                                  "held-out-episodes")} == {
            "robot-type": meta.robot_type, "fps": meta.fps, "tasks": [task], "train-episodes": len(train),
            "held-out-episodes": len(held)}
        row = f"| {entry.name} | {meta.robot_type} | {meta.fps} | {task} | {len(train)} | {len(held)} | 1 (1) |"
        assert row in card


@pytest.mark.parametrize("keys, said", [
    ({}, "averaged, weighted by the frames each client trained on (no robust rule)"),
    ({"aggregation_weight": "dataset"}, "weighted by each client's training-set frames as it reported them"),
    ({"dp": "central"}, "averaged with equal weights (no robust rule)"),
    ({"aggregation": "median"}, "combined by their coordinate-wise median, `aggregation=median`"),
])
def test_the_card_says_how_the_updates_were_weighted(tmp_path, features, keys, said):
    assert said in model_card(run_folder(tmp_path, **keys), 2, features)
