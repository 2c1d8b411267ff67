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


def run_folder(root: Path, mode: str | None = None) -> Path:
    """Four registry clients, only two of which trained (one left after round 1); sim success measured."""
    run = root / "run"
    run.mkdir()
    config = RunConfig.flat(model_name="lerobot/smolvla_base", num_server_rounds=2, strategy="fedavg")
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
