"""zk0.sim.policy_eval: closed-loop SmolVLA rollouts in the simulator, videos, checkpoint loading."""

from __future__ import annotations

import json
import shutil

import av
import numpy as np
import pytest
import torch
from lerobot.policies.factory import make_pre_post_processors

from zk0 import sim
from zk0.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from zk0.config import RunConfig
from zk0.policy import build_policy, trainable_state
from zk0.sim.policy_eval import default_max_steps, evaluate_in_sim, policy_act, run_episodes

SIZE = 96  # the simulator's default: larger than the tiny policy's 64, so SmolVLA's resize is exercised
PICK, PLACE = "red-pick", "green-place-left"


def make_stats(action_mean: float = 0.0, action_std: float = 30.0) -> dict[str, dict[str, torch.Tensor]]:
    """Made-up but valid normalisation stats in degrees."""
    def one(mean: float, std: float) -> dict[str, torch.Tensor]:
        return {"mean": torch.full((6,), mean), "std": torch.full((6,), std),
                "min": torch.full((6,), -180.0), "max": torch.full((6,), 180.0)}
    return {"observation.state": one(0.0, 30.0), "action": one(action_mean, action_std)}


@pytest.fixture(scope="module")
def policy():
    return build_policy(RunConfig.flat(chunk_size=10, device="cpu"))


@pytest.fixture(scope="module")
def processors(policy):
    return make_pre_post_processors(policy.config, dataset_stats=make_stats())


def observation() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"observation.state": torch.zeros(6), "task": sim.TASKS[PICK].instruction,
            **{f"observation.images.{cam}": torch.rand(3, SIZE, SIZE, generator=gen) for cam in ("front", "wrist")}}


def first_action(policy, pre, post) -> np.ndarray:
    torch.manual_seed(0)
    return policy_act(policy, pre, post, sim.TASKS[PICK].instruction)(observation())


def test_policy_act_returns_unnormalised_degrees(policy):
    pre, post = make_pre_post_processors(policy.config, dataset_stats=make_stats(action_mean=100.0, action_std=1e-3))
    action = first_action(policy, pre, post)
    assert action.shape == (6,) and action.dtype == np.float32
    np.testing.assert_allclose(action, 100.0, atol=0.1)  # the postprocessor turned N(0, 1)-ish outputs into degrees


def test_evaluate_in_sim_reports_rates_writes_videos_and_restores_modes(policy, processors, tmp_path):
    policy.train()
    modes = {name: m.training for name, m in policy.named_modules()}
    assert set(modes.values()) == {True, False}  # SmolVLA keeps its frozen VLM in eval while training
    out = evaluate_in_sim(policy, *processors, [PICK, PLACE], episodes=1, seed=0, image_size=SIZE,
                          video_dir=tmp_path / "videos", max_steps=30)
    assert set(out) == {PICK, PLACE}
    for metrics in out.values():
        assert 0.0 <= metrics["success-rate"] <= 1.0 and metrics["episodes"] == 1 and metrics["mean-steps"] == 30
    assert {name: m.training for name, m in policy.named_modules()} == modes
    for task in (PICK, PLACE):
        with av.open(str(tmp_path / "videos" / f"{task}.mp4")) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
        assert len(frames) == 31 and frames[0].shape == (SIZE, 2 * SIZE, 3)  # 30 steps + the last state


def test_same_seeds_replay_the_same_actions(policy, processors):
    def actions() -> list[np.ndarray]:
        seen: list[np.ndarray] = []

        def make_act(_: int):
            act = policy_act(policy, *processors, sim.TASKS[PICK].instruction)

            def recording(obs: dict) -> np.ndarray:
                seen.append(act(obs))
                return seen[-1]

            return recording

        run_episodes(PICK, make_act, episodes=1, seed=3, image_size=32, max_steps=12)  # two action chunks
        return seen

    first, again = actions(), actions()
    assert len(first) == 12
    np.testing.assert_array_equal(np.stack(first), np.stack(again))


def test_untrained_policy_fails_where_the_expert_succeeds(policy, processors):
    limit = default_max_steps(PICK)
    assert limit > sim.rollout(PICK, sim.expert_policy(PICK, 0), seed=0, max_steps=limit, image_size=32).steps
    expert = run_episodes(PICK, lambda s: sim.expert_policy(PICK, s), episodes=2, seed=0, image_size=32)
    assert expert["success-rate"] == 1.0 and expert["mean-steps"] < limit
    untrained = evaluate_in_sim(policy, *processors, [PICK], episodes=1, seed=0, image_size=SIZE, video_dir=None)
    assert untrained[PICK] == {"success-rate": 0.0, "episodes": 1, "mean-steps": float(limit)}


def test_default_max_steps_exceeds_the_expert_plan_per_task_kind():
    pick, place = default_max_steps(PICK), default_max_steps(PLACE)
    assert 88 < pick < place  # the pick plan is 88 control steps, place plans are longer


def test_checkpoint_round_trip(policy, tmp_path):
    folder = save_checkpoint(tmp_path / "round_1", policy, make_stats(action_mean=5.0), "card")
    loaded, pre, post = load_checkpoint(folder)
    ours = trainable_state(policy)
    assert all(torch.equal(ours[n], t) for n, t in trainable_state(loaded).items())
    original = make_pre_post_processors(policy.config, dataset_stats=make_stats(action_mean=5.0))
    np.testing.assert_allclose(first_action(loaded, pre, post), first_action(policy, *original), atol=1e-5)


@pytest.fixture(scope="module")
def saved(policy, tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "good", policy, make_stats(), "card")


def _drop_weights(folder):
    (folder / "model.safetensors").unlink()


def _other_policy_type(folder):
    (folder / "config.json").write_text(json.dumps({"type": "act"}))


def _missing_vlm(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vlm_model_name": str(folder / "no-vlm")}))


def _drop_processor(folder):
    (folder / "policy_preprocessor.json").unlink()


@pytest.mark.parametrize(("damage", "message"), [
    (shutil.rmtree, "no config.json"),
    (_drop_weights, "model.safetensors"),
    (_other_policy_type, "type 'act', not a SmolVLA"),
    (_drop_processor, "policy_preprocessor.json"),
    (_missing_vlm, "no-vlm, which is missing"),
])
def test_load_checkpoint_names_the_folder_in_one_line(saved, tmp_path, damage, message):
    folder = tmp_path / "broken"
    shutil.copytree(saved, folder)
    damage(folder)
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(folder)
    assert str(folder) in str(err.value) and "\n" not in str(err.value)
