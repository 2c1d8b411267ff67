"""zk0.data: episode splits, schema checks against the policy, batches and normalisation stats."""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import synthetic
from realworld import smolvla_base_config

from zk0 import data, tiny
from zk0.data import DatasetError
from zk0.policy import tiny_config
from zk0.registry import DatasetEntry

EPISODES, FRAMES, CHUNK = 3, 12, 5
HELD_OUT = 0.34  # ceil(0.34 * 3) = 2 held-out episodes, 1 training episode


# ---------------------------------------------------------------- split_episodes


@pytest.mark.parametrize("n, fraction", [(2, 0.5), (3, 0.34), (10, 0.2), (20, 0.25), (7, 0.01), (7, 0.99)])
def test_split_episodes_partition(n, fraction):
    train, held = data.split_episodes(n, fraction, seed=3)
    assert set(train).isdisjoint(held)
    assert sorted(train + held) == list(range(n))
    assert train == sorted(train) and held == sorted(held)
    assert len(held) == min(n - 1, max(1, math.ceil(fraction * n)))
    assert len(train) >= 1 and len(held) >= 1


def test_split_episodes_counts():
    assert len(data.split_episodes(10, 0.2, 0)[1]) == 2
    assert len(data.split_episodes(10, 0.21, 0)[1]) == 3  # ceil
    assert len(data.split_episodes(10, 0.01, 0)[1]) == 1  # at least one held out
    assert len(data.split_episodes(10, 0.99, 0)[1]) == 9  # at least one to train on
    assert len(data.split_episodes(2, 0.9, 0)[1]) == 1


def test_split_episodes_deterministic_and_seeded():
    assert data.split_episodes(20, 0.25, 7) == data.split_episodes(20, 0.25, 7)
    assert data.split_episodes(20, 0.25, 7) != data.split_episodes(20, 0.25, 8)


@pytest.mark.parametrize("n", [0, 1])
def test_split_episodes_needs_two(n):
    with pytest.raises(DatasetError, match="at least 2 episodes"):
        data.split_episodes(n, 0.2, 0)


# ---------------------------------------------------------------- a real generated dataset


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "ds"
    return synthetic.generate(synthetic.TASKS["red-left"], root, episodes=EPISODES, frames=FRAMES,
                              image_size=tiny.IMAGE_SIZE, seed=0)


@pytest.fixture(scope="module")
def policy_cfg():
    return tiny_config(chunk_size=CHUNK, device="cpu")


@pytest.fixture(scope="module")
def entry(dataset_root):
    return DatasetEntry(uri=f"local:{dataset_root}")


@pytest.fixture(scope="module")
def split(entry, policy_cfg):
    return data.open_split(entry, policy_cfg, HELD_OUT, 0)


def episodes_of(dataset) -> list[int]:
    return [int(e) for e in dataset.hf_dataset["episode_index"]]


class FakeMeta(SimpleNamespace):
    """A stand-in for LeRobotDatasetMetadata: features and fps, cameras derived from the features."""

    @property
    def camera_keys(self) -> list[str]:
        return [k for k, v in self.features.items() if v["dtype"] in ("video", "image")]


def fake_meta(meta, **changes):
    """A FakeMeta with (a deep copy of) ``meta``'s features and fps."""
    return FakeMeta(features=copy.deepcopy(dict(meta.features)), fps=meta.fps, **changes)


def test_open_split_is_disjoint_and_complete(split):
    expected_train, expected_held = data.split_episodes(EPISODES, HELD_OUT, 0)
    assert split.train_episodes == expected_train
    assert split.held_out_episodes == expected_held
    train_eps, held_eps = set(episodes_of(split.train)), set(episodes_of(split.held_out))
    assert train_eps == set(expected_train)
    assert held_eps == set(expected_held)
    assert train_eps.isdisjoint(held_eps)
    assert len(split.train) + len(split.held_out) == EPISODES * FRAMES == split.meta.total_frames
    indices = [int(i) for i in split.train.hf_dataset["index"]] + [int(i) for i in split.held_out.hf_dataset["index"]]
    assert sorted(indices) == list(range(EPISODES * FRAMES))


def test_open_split_other_seed_same_partition_rules(entry, policy_cfg):
    other = data.open_split(entry, policy_cfg, 0.3, 1)
    assert len(other.held_out_episodes) == 1 and len(other.train_episodes) == 2
    assert set(episodes_of(other.train)).isdisjoint(episodes_of(other.held_out))


def test_batches_have_action_chunks(split):
    batch = next(data.batches(data.train_loader(split.train, 4), seed=0, cameras={}))
    assert batch["action"].shape == (4, CHUNK, 6)
    assert batch["action_is_pad"].shape == (4, CHUNK)
    assert batch["action_is_pad"].dtype == torch.bool
    assert batch["observation.state"].shape == (4, 6)
    assert batch["observation.images.front"].shape == (4, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    assert len(batch["task"]) == 4


def test_batches_seeded_and_endless(split):
    loader = data.train_loader(split.train, 4)  # one resident loader, reseeded per stream

    def order(seed, n):
        stream = data.batches(loader, seed=seed, cameras={})
        return [int(i) for _ in range(n) for i in next(stream)["index"]]

    # more batches than one pass over the training frames: the stream goes on
    n = len(split.train) // 4 + 2
    assert order(0, n) == order(0, n)
    assert order(0, n) != order(1, n)
    first_pass = order(0, len(split.train) // 4)
    assert sorted(first_pass) == sorted(int(i) for i in split.train.hf_dataset["index"])


def test_batches_rename_cameras(split):
    cams = {"observation.images.front": "observation.images.top"}
    batch = next(data.batches(data.train_loader(split.train, 2), seed=0, cameras=cams))
    assert "observation.images.top" in batch and "observation.images.front" not in batch


def test_action_chunk_is_padded_at_episode_end(split):
    batch = next(data.eval_batches(split.train, len(split.train), 1, {}))
    last = batch["frame_index"] == FRAMES - 1
    assert last.any()
    assert batch["action_is_pad"][last][:, 1:].all()  # nothing after the last frame
    assert not batch["action_is_pad"][:, 0].any()  # the current action always exists
    # the chunk's first action is the frame's own action; the next one is the next frame's
    first = batch["frame_index"] == 0
    nxt = batch["frame_index"] == 1
    assert torch.equal(batch["action"][first][0, 1], batch["action"][nxt][0, 0])


def test_eval_batches_fixed_and_limited(split):
    a = list(data.eval_batches(split.held_out, 4, 2, {}))
    b = list(data.eval_batches(split.held_out, 4, 2, {}))
    assert len(a) == 2
    assert [x["index"].tolist() for x in a] == [x["index"].tolist() for x in b]
    covered = torch.cat([x["index"] for x in a])
    assert len(covered) == 8
    # evenly spaced over the whole held-out split, not just its first frames
    assert int(covered.max()) == max(int(i) for i in split.held_out.hf_dataset["index"])


def test_real_dataset_fits_the_policy(split, policy_cfg, entry):
    assert data.schema_mismatches(split.meta, policy_cfg, entry) == []


def test_schema_state_action_shapes_and_missing(split, policy_cfg, entry):
    meta = fake_meta(split.meta)
    meta.features["observation.state"]["shape"] = (7,)
    del meta.features["action"]
    problems = data.schema_mismatches(meta, policy_cfg, entry)
    assert len(problems) == 2
    assert any("observation.state" in p and "(7,)" in p and "(6,)" in p for p in problems)
    assert any("missing feature 'action'" in p for p in problems)


def test_schema_mapping_to_a_camera_the_policy_lacks(split, policy_cfg, entry):
    cams = {"observation.images.front": "observation.images.top"}
    problems = data.schema_mismatches(split.meta, policy_cfg, replace(entry, cameras=cams))
    assert problems == ["camera mapping sends 'observation.images.front' to 'observation.images.top', which is not "
                        "a camera of the policy (policy cameras: ['observation.images.front', "
                        "'observation.images.wrist'])"]


def test_schema_mapping_names_a_camera_the_dataset_lacks(split, policy_cfg, entry):
    cams = {"observation.images.fornt": "observation.images.front"}
    (problem,) = data.schema_mismatches(split.meta, policy_cfg, replace(entry, cameras=cams))
    assert "'observation.images.fornt', which is not a camera of the dataset" in problem


def test_schema_camera_mapping_fixes_renamed_camera(split, policy_cfg, entry):
    meta = fake_meta(split.meta)
    meta.features["observation.images.top"] = meta.features.pop("observation.images.front")
    meta.features["observation.images.gripper"] = meta.features.pop("observation.images.wrist")
    (problem,) = data.schema_mismatches(meta, policy_cfg, entry)
    assert problem.startswith("no dataset camera feeds the policy: dataset cameras ['observation.images.top', "
                              "'observation.images.gripper']")
    assert "--camera" in problem and "cameras = " in problem  # says how to fix it, in both places
    fixed = replace(entry, cameras={"observation.images.top": "observation.images.front"})
    assert data.schema_mismatches(meta, policy_cfg, fixed) == []  # one camera of two is enough
    renames, _ = data.camera_feeds(fixed, meta, policy_cfg)
    assert data.describe_cameras(renames, meta, policy_cfg) == (
        "observation.images.top -> observation.images.front, (none: SmolVLA skips it) -> observation.images.wrist")


def test_schema_two_cameras_for_one_policy_camera(split, policy_cfg, entry):
    cams = {"observation.images.wrist": "observation.images.front"}
    (problem,) = data.schema_mismatches(split.meta, policy_cfg, replace(entry, cameras=cams))
    assert "all feed policy camera 'observation.images.front'" in problem


def test_smolvla_base_cameras_from_a_two_camera_dataset(split, entry):
    """smolvla_base's three generic cameras: two mapped, the third left to SmolVLA (acceptance)."""
    base = smolvla_base_config()
    (problem,) = data.schema_mismatches(split.meta, base, entry)
    assert problem.startswith("no dataset camera feeds the policy")
    cams = {"observation.images.front": "observation.image", "observation.images.wrist": "observation.image2"}
    mapped = replace(entry, cameras=cams)
    assert data.schema_mismatches(split.meta, base, mapped) == []
    resolved = data.check_schema(mapped, split.meta, base)
    assert resolved.cameras == cams


def test_profile_camera_convention_applies_where_it_can(split, entry):
    """A profile's convention may name cameras a dataset lacks; the first that fits a policy camera wins."""
    base = smolvla_base_config()
    convention = {"observation.images.laptop": "observation.image", "observation.images.front": "observation.image",
                  "observation.images.wrist": "observation.image2", "observation.images.side": "observation.image3"}
    resolved = data.check_schema(replace(entry, camera_defaults=convention), split.meta, base)
    assert resolved.cameras == {"observation.images.front": "observation.image",
                                "observation.images.wrist": "observation.image2"}
    own = {"observation.images.wrist": "observation.image"}  # the entry's own mapping wins over the convention
    resolved = data.check_schema(replace(entry, cameras=own, camera_defaults=convention), split.meta, base)
    assert resolved.cameras == own  # front's conventional target is taken: front stays unused


def test_schema_non_camera_feature_is_not_a_camera(split, policy_cfg, entry):
    meta = fake_meta(split.meta)
    meta.features["observation.images.wrist"]["dtype"] = "float32"
    assert data.schema_mismatches(meta, policy_cfg, entry) == []  # one camera still feeds the policy
    meta.features["observation.images.front"]["dtype"] = "float32"
    (problem,) = data.schema_mismatches(meta, policy_cfg, entry)
    assert "dataset cameras []" in problem


def test_schema_fps_mismatch(split, policy_cfg, entry, monkeypatch):
    monkeypatch.setattr(data, "POLICY_FPS", 50)
    problems = data.schema_mismatches(split.meta, policy_cfg, entry)
    assert problems == ["fps is 30, policy expects 50"]


def test_check_schema_lists_all_mismatches_in_one_message(split, policy_cfg, monkeypatch, dataset_root):
    monkeypatch.setattr(data, "POLICY_FPS", 50)
    entry = DatasetEntry(uri=f"local:{dataset_root}", cameras={"observation.images.front": "observation.images.top"})
    with pytest.raises(DatasetError) as err:
        data.check_schema(entry, split.meta, policy_cfg)
    message = str(err.value)
    assert entry.uri in message and "\n" not in message
    assert "fps" in message and "'observation.images.top', which is not a camera of the policy" in message
    # open_split refuses the dataset with the same message
    with pytest.raises(DatasetError, match="fps is 30"):
        data.open_split(entry, policy_cfg, HELD_OUT, 0)


def test_check_schema_passes_for_fitting_dataset(split, policy_cfg, entry):
    data.check_schema(entry, split.meta, policy_cfg)


def test_locate_local(entry, dataset_root):
    repo_id, root = data.locate(entry)
    assert root == dataset_root
    assert repo_id == f"local/{dataset_root.name}"


def test_locate_local_without_info_json(tmp_path):
    folder = tmp_path / "not-a-dataset"
    folder.mkdir()
    for uri in (f"local:{folder}", str(folder)):
        with pytest.raises(DatasetError) as err:
            data.locate(DatasetEntry(uri=uri))
        assert str(folder) in str(err.value)
        assert "meta/info.json" in str(err.value)


def test_locate_hf_and_unknown_embedded():
    assert data.locate(DatasetEntry(uri="hf:user/ds")) == ("user/ds", None)
    with pytest.raises(DatasetError, match="unknown simulator task") as err:
        data.locate(DatasetEntry(uri="embedded:no-such-task"))
    assert "red-pick" in str(err.value)


def test_open_metadata_unreachable_hub_fails_fast():
    start = time.monotonic()
    with pytest.raises(DatasetError) as err:
        data.open_metadata(DatasetEntry(uri="hf:nobody/nothing"))
    assert time.monotonic() - start < 5
    assert "hf:nobody/nothing" in str(err.value)
    assert "local:" in str(err.value)  # says how to fix it


def test_open_metadata_local(entry):
    meta = data.open_metadata(entry)
    assert meta.total_episodes == EPISODES
    assert meta.fps == synthetic.FPS


def test_vector_stats(split):
    stats = data.vector_stats(split.train)
    assert set(stats) == {"observation.state", "action"}
    table = split.train.hf_dataset.with_format("numpy")
    for key in ("observation.state", "action"):
        assert stats[key]["mean"].shape == (6,)
        assert stats[key]["std"].shape == (6,)
        values = np.stack(table[key]).astype(np.float64)
        np.testing.assert_allclose(stats[key]["mean"], values.mean(0), rtol=1e-6)
        np.testing.assert_allclose(stats[key]["std"], values.std(0), rtol=1e-6)
        assert int(np.asarray(stats[key]["count"]).item()) == len(split.train)
        assert (stats[key]["std"] > 0).all()


def test_stats_from_training_episodes_only(split):
    train, held = data.vector_stats(split.train), data.vector_stats(split.held_out)
    assert not np.allclose(train["action"]["mean"], held["action"]["mean"])


def test_encode_decode_stats_roundtrip(split):
    stats = data.vector_stats(split.train)
    text = data.encode_stats(stats)
    assert isinstance(text, str) and json.loads(text)
    assert data.encode_stats(stats) == text  # deterministic
    decoded = data.decode_stats(text)
    assert set(decoded) == set(stats)
    for key, d in stats.items():
        assert set(decoded[key]) == set(d)
        for name, value in d.items():
            assert isinstance(decoded[key][name], torch.Tensor)
            assert decoded[key][name].dtype == torch.float32
            np.testing.assert_allclose(decoded[key][name].numpy(), np.asarray(value, dtype=np.float32))


def _hand_stats(value: float, count: int) -> str:
    vec = [value] * 6
    one = {"min": vec, "max": vec, "mean": vec, "std": [0.0] * 6, "count": [count]}
    return json.dumps({"observation.state": one, "action": one})


def test_pool_stats_count_weighted_by_hand():
    pooled = json.loads(data.pool_stats([_hand_stats(0.0, 1), _hand_stats(1.0, 3)]))
    for key in ("observation.state", "action"):
        np.testing.assert_allclose(pooled[key]["mean"], [0.75] * 6)
        np.testing.assert_allclose(pooled[key]["min"], [0.0] * 6)
        np.testing.assert_allclose(pooled[key]["max"], [1.0] * 6)
        np.testing.assert_allclose(pooled[key]["std"], [math.sqrt(0.1875)] * 6)  # var of {0, 1, 1, 1}
        assert pooled[key]["count"] == [4]


def test_pool_stats_of_splits_equals_stats_of_everything(split):
    train, held = data.vector_stats(split.train), data.vector_stats(split.held_out)
    pooled = data.decode_stats(data.pool_stats([data.encode_stats(train), data.encode_stats(held)]))
    n_train, n_held = len(split.train), len(split.held_out)
    for key in ("observation.state", "action"):
        weighted = (train[key]["mean"] * n_train + held[key]["mean"] * n_held) / (n_train + n_held)
        np.testing.assert_allclose(pooled[key]["mean"].numpy(), weighted, rtol=1e-5)
        everything = np.concatenate([
            np.stack(ds.hf_dataset.with_format("numpy")[key]) for ds in (split.train, split.held_out)]).astype(np.float64)
        np.testing.assert_allclose(pooled[key]["mean"].numpy(), everything.mean(0), rtol=1e-5)
        np.testing.assert_allclose(pooled[key]["std"].numpy(), everything.std(0), rtol=1e-4)
