"""zk0.sim: tasks, the scripted expert, recording to LeRobotDataset, closed-loop rollouts, mp4."""

from __future__ import annotations

import re

import av
import numpy as np
import pytest
import torch

from zk0 import sim
from zk0.sim.scene import sample_spawn
from zk0.so101 import JOINTS

SIZE = 32
PICK = "red-pick"


def test_tasks_cover_clients_and_an_unseen_task():
    assert len(sim.CLIENT_TASKS) >= 4 and sim.UNSEEN_TASKS
    assert set(sim.CLIENT_TASKS).isdisjoint(sim.UNSEEN_TASKS)
    assert set(sim.CLIENT_TASKS) | set(sim.UNSEEN_TASKS) <= set(sim.TASKS)
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name) for name in sim.TASKS)
    clients = [sim.TASKS[n] for n in sim.CLIENT_TASKS]
    assert {t.kind for t in clients} == {"pick", "place"}
    for field in ("cube_rgba", "cube_half", "spawn_center", "floor_rgba", "instruction"):
        assert len({getattr(t, field) for t in clients}) > 1, field
    unseen = sim.TASKS[sim.UNSEEN_TASKS[0]]
    assert unseen.cube_rgba not in {t.cube_rgba for t in clients}
    assert unseen.target not in {t.target for t in clients}


def test_spawn_is_seeded_and_inside_the_region():
    task = sim.TASKS["green-place-left"]
    assert sample_spawn(task, 3) == sample_spawn(task, 3) != sample_spawn(task, 4)
    for seed in range(20):
        offset = np.abs(np.subtract(sample_spawn(task, seed).cube_xy, task.spawn_center))
        assert np.all(offset <= task.spawn_half)


def test_unknown_task_names_the_known_ones():
    with pytest.raises(KeyError, match="red-pick"):
        sim.get_task("nope")


@pytest.mark.parametrize("name", sorted(sim.TASKS))
def test_expert_succeeds(name):
    assert sim.expert_success_rate(name, episodes=3, seed=1000) == 1.0


def test_env_observation_and_units():
    with sim.SimEnv(PICK, image_size=SIZE) as env:
        obs = env.reset(0)
        assert set(obs) == {"state", "front", "wrist"}
        assert obs["state"].dtype == np.float32 and obs["state"].shape == (len(JOINTS),)
        np.testing.assert_allclose(obs["state"], env.spawn.arm_deg, atol=1e-3)  # degrees
        for cam in ("front", "wrist"):
            assert obs[cam].shape == (SIZE, SIZE, 3) and obs[cam].dtype == np.uint8
        target = obs["state"] + np.array([10, 0, 0, 0, 0, 20], dtype=np.float32)
        for _ in range(20):
            obs = env.step(target)
        np.testing.assert_allclose(obs["state"][[0, 5]], target[[0, 5]], atol=2.0)  # same units
        assert not env.success()


def test_perturbed_demonstration_records_the_experts_targets_from_off_path_states():
    """DART: the arm is pushed off the expert's path during the approach, the labels stay the expert's plan."""
    from zk0.sim.expert import Expert
    from zk0.sim.record import demonstrate

    with sim.SimEnv(PICK, render=False) as env:
        clean, clean_ok = demonstrate(env, 5)
        noisy, noisy_ok = demonstrate(env, 5, perturb_deg=2.0)
        approach = Expert(env.model, env.task, env.spawn).approach_frames
    assert clean_ok and noisy_ok and len(clean) == len(noisy)
    labels = np.array([[f["action"] for f in frames] for frames in (clean, noisy)])
    states = np.array([[f["observation.state"] for f in frames] for frames in (clean, noisy)])
    np.testing.assert_allclose(labels[0], labels[1], atol=1e-4)  # the expert's targets, whatever the arm did
    off_path = np.abs(states[0] - states[1])
    assert off_path[:approach, :5].max() > 1.0  # the reach and descent were perturbed (degrees)
    assert off_path[:approach, 5].max() < 0.5  # never the gripper


def test_record_writes_a_loadable_dataset(tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    report = sim.record(PICK, tmp_path / "red", episodes=2, seed=0, image_size=SIZE)
    assert report.successes == 2 <= report.attempts and report.success_rate == 2 / report.attempts  # perturbed ones may fail
    assert report.frames > 0 and report.seconds > 0
    ds = LeRobotDataset("zk0/red", root=tmp_path / "red", video_backend="pyav")
    assert ds.meta.fps == 30 and ds.meta.robot_type == "so101_follower"
    assert ds.num_episodes == 2 and ds.num_frames == report.frames
    names = [f"{j}.pos" for j in JOINTS]
    assert ds.meta.features["observation.state"]["names"] == names
    assert ds.meta.features["action"]["names"] == names
    item = ds[report.frames - 1]
    assert item["task"] == sim.TASKS[PICK].instruction
    for cam in ("front", "wrist"):
        image = item[f"observation.images.{cam}"]
        assert image.shape == (3, SIZE, SIZE) and image.min() >= 0.0 and image.max() <= 1.0
        assert image.std() > 0.01  # decoded pixels, not a blank frame
    assert [p.name for p in tmp_path.iterdir()] == ["red"]  # the staging folder is gone


def test_rollout_holding_still_fails():
    seen = []

    def hold(obs: dict) -> torch.Tensor:
        seen.append(obs)
        return obs["observation.state"]

    result = sim.rollout(PICK, hold, seed=0, max_steps=15, image_size=SIZE)
    assert result == sim.RolloutResult(False, 15, None)
    obs = seen[0]
    assert obs["task"] == sim.TASKS[PICK].instruction
    assert obs["observation.state"].dtype == torch.float32 and obs["observation.state"].shape == (6,)
    front = obs["observation.images.front"]
    assert front.dtype == torch.float32 and front.shape == (3, SIZE, SIZE) and float(front.max()) <= 1.0


@pytest.mark.parametrize("name", [PICK, "yellow-place-right"])
def test_rollout_of_the_expert_succeeds(name, tmp_path):
    result = sim.rollout(name, sim.expert_policy(name, seed=5), seed=5, max_steps=300, image_size=SIZE,
                         record_video=True)
    assert result.success and result.steps < 300
    assert len(result.frames) == result.steps + 1
    assert result.frames[0].shape == (SIZE, 2 * SIZE, 3)


def test_write_mp4_is_readable(tmp_path):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (33, 47, 3), dtype=np.uint8) for _ in range(12)]
    path = sim.write_mp4(frames, tmp_path / "video" / "clip.mp4")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(decoded) == 12 and decoded[0].shape == (34, 48, 3)


def test_an_embedded_entry_records_its_episodes_and_shard(tmp_path, monkeypatch):
    """``episodes`` and ``shard`` of a registry entry decide what the embedded source records: that many
    demonstrations, and a shard whose episodes (cube poses) are none of shard 0's."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata

    from zk0.data import locate
    from zk0.registry import DatasetEntry

    monkeypatch.setenv("ZK0_CACHE", str(tmp_path))
    starts = {}
    for shard in (0, 1):
        _, root = locate(DatasetEntry("embedded:red-pick", episodes=3, shard=shard))
        meta = LeRobotDatasetMetadata("zk0/red-pick", root=root)
        assert meta.total_episodes == 3 and root.parent == tmp_path / "datasets"
        table = LeRobotDataset("zk0/red-pick", root=root, video_backend="pyav").hf_dataset.with_format("numpy")
        starts[shard] = {tuple(np.round(table[i]["action"], 3)) for i in range(len(table))
                         if table[i]["frame_index"] == 0}
    assert len(starts[0]) == len(starts[1]) == 3 and not starts[0] & starts[1]
