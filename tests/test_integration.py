"""The real ServerApp and ClientApp, 2 clients x 2 rounds, in one process (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from federation import run_federation
from flwr.app import Array, ConfigRecord, Message, MessageType, RecordDict
from inprocess import InProcessGrid
from lerobot.policies.factory import make_pre_post_processors
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

from zk0 import client_app, transport
from zk0.checkpoint import load_config
from zk0.config import ConfigError, RunConfig
from zk0.policy import base_fingerprint, build_policy, trainable_state
from zk0.strategy import RoundFailed, round_lr
from zk0.tracking import read_metrics


def tamper_first_update(reply: Message) -> Message:
    """Flip one value of the first training update in transit (after the client signed it)."""
    if reply.has_error() or "arrays" not in reply.content or tamper_first_update.done:
        return reply
    tamper_first_update.done = True
    arrays = reply.content["arrays"]
    name = sorted(arrays.keys())[0]
    values = arrays[name].numpy().copy()
    values.flat[0] += 1
    arrays[name] = Array(values)
    return reply


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """One 2-round run with a tampered update in round 1 (min-train-nodes=1 lets it go on)."""
    from conftest import FAST, ROOT
    from flwr.common.config import get_fused_config_from_dir

    out = tmp_path_factory.mktemp("outputs")
    config = get_fused_config_from_dir(ROOT, {**FAST, "num-server-rounds": 2, "min-train-nodes": 1,
                                              "checkpoint-interval": 1, "output-dir": str(out)})
    tamper_first_update.done = False
    run_dir, grid = run_federation(config, intercept=tamper_first_update)
    return config, run_dir, grid


def test_run_folder_has_everything(federation):
    _, run_dir, _ = federation
    doc = json.loads((run_dir / "config.json").read_text())
    assert doc["run-config"]["num-server-rounds"] == 2 and doc["versions"]["lerobot"] == "0.6.1"
    assert {p.name for p in (run_dir / "charts").glob("*.png")} >= {"train_loss.png", "eval_loss.png"}
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"round_1", "round_2"}


def test_losses_finite_and_all_sources_logged(federation):
    _, run_dir, _ = federation
    records = read_metrics(run_dir / "metrics.jsonl")
    sources = {r["source"] for r in records}
    assert sources == {"server", "client", "client-eval"}
    losses = [r[k] for r in records for k in ("train-loss", "eval-loss") if k in r]
    assert len(losses) >= 6 and all(np.isfinite(losses))
    assert [r["round"] for r in records if r.get("dataset") == "purple-place-center"] == [0, 1, 2]
    assert sorted(r["round"] for r in records if r["source"] == "client-eval") == [0, 0, 1, 1, 2, 2]


def test_tampered_update_is_rejected_and_round_goes_on(federation):
    _, run_dir, _ = federation
    records = read_metrics(run_dir / "metrics.jsonl")
    rejected = [r for r in records if r.get("event") == "rejected-update"]
    assert len(rejected) == 1 and rejected[0]["round"] == 1 and "digest mismatch" in rejected[0]["reason"]
    assert len([r for r in records if r["source"] == "client" and r["round"] == 1]) == 1
    assert len([r for r in records if r["source"] == "client" and r["round"] == 2]) == 2


def test_every_server_payload_carries_a_valid_digest_and_fingerprint(federation):
    config, _, grid = federation
    fingerprint = base_fingerprint(build_policy(RunConfig.from_run_config(config)))
    payloads = [m for m in grid.sent if m.metadata.message_type != MessageType.QUERY]
    assert len(payloads) == 6  # (2 rounds of train, each evaluating the model it carries first, + evaluate) x 2 nodes
    for msg in payloads:
        cfg = msg.content["config"]
        assert cfg["payload-digest"] == transport.digest(msg.content["arrays"])
        assert cfg["base-fingerprint"] == fingerprint


def test_global_weights_change_and_lr_schedule_arrives(federation):
    config, _, grid = federation
    cfg = RunConfig.from_run_config(config)
    trains = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    first, last = trains[0].content["arrays"], trains[-1].content["arrays"]
    assert transport.digest(first) != transport.digest(last)
    assert [m.content["config"]["lr"] for m in trains] == [round_lr(cfg, 1)] * 2 + [round_lr(cfg, 2)] * 2
    assert round_lr(cfg, 2) < round_lr(cfg, 1)


def test_checkpoint_is_a_lerobot_pretrained_policy_with_this_rounds_card(federation):
    _, run_dir, _ = federation
    folder = run_dir / "checkpoints" / "round_2"
    config = load_config(folder)  # the bundled VLM (vlm/) resolved against the folder
    policy = SmolVLAPolicy.from_pretrained(folder, config=config)
    pre, post = make_pre_post_processors(config, pretrained_path=str(folder), preprocessor_overrides={
        "tokenizer_processor": {"tokenizer_name": config.vlm_model_name}})
    assert pre is not None and post is not None
    fresh = trainable_state(build_policy(RunConfig()))
    loaded = trainable_state(policy)
    assert any(not torch.equal(fresh[n], loaded[n]) for n in fresh)
    card = (folder / "README.md").read_text()
    records = read_metrics(run_dir / "metrics.jsonl")
    unseen = [r["eval-loss"] for r in records if r.get("dataset") == "purple-place-center" and r["round"] == 2]
    assert "round 2 of 2" in card and f"{unseen[0]:.6g}" in card


def test_client_uses_the_round_lr_it_receives(run_config):
    """lr=0 in the round config must give a zero update, whatever the static lr is."""
    config = run_config(lr=0.5)
    grid = InProcessGrid(client_app.app, config, 1)
    policy = build_policy(RunConfig.from_run_config(config))
    arrays = transport.encode(trainable_state(policy), "bf16")
    query = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=101, message_type=MessageType.QUERY)
    stats = grid.send_and_receive([query])[0].content["stats"]["norm-stats"]

    def train_with(lr: float) -> float:
        cfg = ConfigRecord({"server-round": 1, "lr": lr, "proximal-mu": 0.0, "norm-stats": stats,
                            "payload-digest": transport.digest(arrays), "base-fingerprint": base_fingerprint(policy),
                            "transport-dtype": "bf16"})
        msg = Message(RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=101, message_type=MessageType.TRAIN)
        reply = grid.send_and_receive([msg])[0]
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        assert reply.content["metrics"]["lr"] == lr
        update = transport.decode(reply.content["arrays"], "bf16")
        return max(float(t.abs().max()) for t in update.values())

    assert train_with(0.0) == 0.0
    assert train_with(1e-3) > 0.0


def test_client_rejects_a_payload_that_does_not_match_its_digest(run_config):
    config = run_config()
    grid = InProcessGrid(client_app.app, config, 1)
    policy = build_policy(RunConfig.from_run_config(config))
    arrays = transport.encode(trainable_state(policy), "bf16")
    cfg = ConfigRecord({"lr": 1e-3, "proximal-mu": 0.0, "norm-stats": "{}", "payload-digest": "0" * 64,
                        "base-fingerprint": base_fingerprint(policy), "transport-dtype": "bf16"})
    msg = Message(RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=101, message_type=MessageType.TRAIN)
    reply = grid.send_and_receive([msg])[0]
    assert reply.has_error() and "digest mismatch" in reply.error.reason


def test_too_few_valid_updates_fail_the_round_loudly(run_config):
    def corrupt_all(reply: Message) -> Message:
        if not reply.has_error() and "arrays" in reply.content:
            reply.content["payload"]["payload-digest"] = "f" * 64
        return reply

    config = run_config(num_server_rounds=1)
    with pytest.raises(RoundFailed, match="min-train-nodes=2"):
        run_federation(config, intercept=corrupt_all)


def drop_stats_of(node: int):
    """Intercept: ``node``'s dataset-stats reply is lost."""
    def intercept(reply: Message) -> Message | None:
        lost = reply.metadata.src_node_id == node and reply.metadata.message_type == MessageType.QUERY
        return None if lost else reply
    return intercept


def test_pooled_stats_need_min_stats_clients_contributors(run_config):
    """Two clients' pooled stats reveal each one's to the other: refused by default, before anything is shared."""
    config = run_config(num_server_rounds=1, min_stats_clients=3, round_timeout=5)
    with pytest.raises(RoundFailed, match="min-stats-clients=3"):
        run_federation(config, num_nodes=2)
    config = run_config(num_server_rounds=1, min_stats_clients=3)
    with pytest.raises(RoundFailed, match="2 of 3 clients reported plausible dataset stats, below min-stats-clients=3"):
        run_federation(config, num_nodes=3, intercept=drop_stats_of(103))


def test_same_seed_same_result(run_config, tmp_path):
    """Two runs with the same seeds end with identical global weights."""
    finals = []
    for name in ("a", "b"):
        config = run_config(num_server_rounds=1, output_dir=str(tmp_path / name), eval_every=1)
        run_dir, _ = run_federation(config)
        folder = run_dir / "checkpoints" / "round_1"
        state = SmolVLAPolicy.from_pretrained(folder, config=load_config(folder)).state_dict()
        finals.append(state)
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_clients_build_policy_and_data_once_per_run(run_config, monkeypatch):
    """Policy, processors and loader stay resident: nothing is rebuilt in round 2+."""
    calls = {"policy": 0, "split": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(client_app, "build_policy", counting("policy", client_app.build_policy))
    monkeypatch.setattr(client_app, "open_split", counting("split", client_app.open_split))
    config = run_config(num_server_rounds=3, min_train_nodes=1, min_evaluate_nodes=1)
    run_dir, grid = run_federation(config, num_nodes=1)
    assert calls == {"policy": 1, "split": 1}
    runtime = client_app._RUNTIMES[(grid.run_id, 101)]
    assert len(runtime.shared.processors) == 1


def test_server_evaluates_in_the_simulator_every_sim_eval_every_rounds(run_config):
    config = run_config(num_server_rounds=1, sim_eval_every=1, sim_eval_episodes=1)
    run_dir, _ = run_federation(config)
    sims = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "sim-eval"]
    tasks = {"red-pick", "blue-pick-small", "green-place-left", "yellow-place-right", "purple-place-center"}
    assert {(r["round"], r["dataset"]) for r in sims} == {(n, t) for n in (0, 1) for t in tasks}
    assert all(r["success-rate"] == 0.0 and r["episodes"] == 1 for r in sims)  # an untrained tiny policy
    assert {p.name for p in (run_dir / "videos" / "round_1").iterdir()} == {f"{t}.mp4" for t in tasks}
    assert (run_dir / "charts" / "sim_success.png").is_file()


def test_sim_evaluation_needs_simulator_tasks(run_config):
    with pytest.raises(ConfigError, match="no simulator tasks"):
        run_federation(run_config(datasets="so101-hub", sim_eval_every=1))


def test_hf_repo_id_makes_the_server_push_at_the_end_and_say_how_it_went(run_config, monkeypatch):
    """Offline here, so the ServerApp's push fails: one line, the run folder complete (online: tests/test_push.py)."""
    from zk0 import server_app

    logged = []
    monkeypatch.setattr(server_app, "log", lambda level, text, *args: logged.append(text % args))
    config = run_config(num_server_rounds=1, checkpoint_interval=1, hf_repo_id="alice/so101-fl")
    run_dir, _ = run_federation(config)
    line = next(line for line in logged if "alice/so101-fl" in line)
    assert line.startswith("zk0 not pushed to alice/so101-fl: HF_HUB_OFFLINE is set")
    assert (run_dir / "checkpoints" / "round_1" / "model.safetensors").is_file()


def test_every_run_keeps_its_log_in_zk0_log(run_config):
    run_dir, _ = run_federation(run_config(num_server_rounds=1))
    text = (run_dir / "zk0.log").read_text()
    assert "zk0 round 1/1" in text and f"zk0 run folder: {run_dir}" in text and "\x1b[" not in text
