"""Checkpoints of locally built models load anywhere: the VLM travels inside, named relatively."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from lerobot.policies.factory import make_pre_post_processors
from waits import deadline

from zk0.checkpoint import VLM_FOLDER, load_checkpoint, load_config, save_checkpoint
from zk0.config import RunConfig
from zk0.model_card import model_card
from zk0.policy import build_policy, trainable_state

HUB_VLM = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"
# Run after the model card's snippet (in a subprocess) and in this process: a seeded action on a fixed observation.
SEEDED_ACTION = """
import torch
torch.set_num_threads(1)
gen = torch.Generator().manual_seed(0)
observation = {"observation.state": 30 * torch.randn(6, generator=gen), "task": "pick up the red cube",
               **{f"observation.images.{cam}": torch.rand(3, 64, 64, generator=gen) for cam in ("front", "wrist")}}
policy.eval()
policy.reset()
torch.manual_seed(1)
with torch.no_grad():
    action = postprocessor(policy.select_action(preprocessor(observation)))
"""


def make_stats() -> dict[str, dict[str, torch.Tensor]]:
    """Valid normalisation stats in degrees, away from the identity so a lost processor shows."""
    def one(mean: float) -> dict[str, torch.Tensor]:
        return {"mean": torch.full((6,), mean), "std": torch.full((6,), 20.0),
                "min": torch.full((6,), -180.0), "max": torch.full((6,), 180.0)}
    return {"observation.state": one(3.0), "action": one(7.0)}


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    """The zk0 cache the policy is built from: removed once the checkpoint is saved, as on another machine."""
    return tmp_path_factory.mktemp("origin-cache").resolve()


@pytest.fixture(scope="module")
def policy(origin):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ZK0_CACHE", str(origin))
        return build_policy(RunConfig.flat(chunk_size=5, device="cpu"))


@pytest.fixture(scope="module")
def card(policy, tmp_path_factory) -> str:
    run = tmp_path_factory.mktemp("run")
    (run / "config.json").write_text(json.dumps({"run-config": RunConfig().to_run_config()}))
    (run / "metrics.jsonl").write_text("")
    return model_card(run, 1, policy.config)


@pytest.fixture(scope="module")
def moved(policy, card, origin, expected, tmp_path_factory):
    """A checkpoint copied away from where it was saved, the cache it was built from gone.

    Needs ``expected`` first: the live policy's processors read their tokenizer from that cache.
    """
    saved = save_checkpoint(tmp_path_factory.mktemp("here") / "round_1", policy, make_stats(), card)
    copy = shutil.copytree(saved, tmp_path_factory.mktemp("there") / "round_1")
    shutil.rmtree(origin)
    return copy


def seeded_action(policy, preprocessor, postprocessor) -> torch.Tensor:
    scope = {"policy": policy, "preprocessor": preprocessor, "postprocessor": postprocessor}
    exec(SEEDED_ACTION, scope)
    return scope["action"]


@pytest.fixture(scope="module")
def expected(policy) -> torch.Tensor:
    """The action of the live policy with processors on the same stats."""
    return seeded_action(policy, *make_pre_post_processors(policy.config, dataset_stats=make_stats()))


def test_checkpoint_carries_its_vlm_and_names_it_relatively(policy, origin, moved):
    assert (moved / VLM_FOLDER / "config.json").is_file() and (moved / VLM_FOLDER / "tokenizer.json").is_file()
    assert json.loads((moved / "config.json").read_text())["vlm_model_name"] == VLM_FOLDER
    steps = json.loads((moved / "policy_preprocessor.json").read_text())["steps"]
    assert [s["config"]["tokenizer_name"] for s in steps if s.get("registry_name") == "tokenizer_processor"] == [
        VLM_FOLDER]
    assert all(str(origin) not in f.read_text(errors="ignore") for f in moved.rglob("*.json"))
    assert policy.config.vlm_model_name.startswith(str(origin))  # the live policy keeps training as it was


def test_model_card_snippet_loads_the_moved_checkpoint_with_lerobot_alone(moved, card, expected, tmp_path):
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "zk0" not in snippet
    script = (snippet.replace("<this folder>", str(moved)) + SEEDED_ACTION
              + "torch.save(action, __import__('sys').argv[1])\n")
    env = {**os.environ, "ZK0_CACHE": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "1"}
    (tmp_path / "elsewhere").mkdir()
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "action.pt")], cwd=tmp_path / "elsewhere",
                   env=env, check=True, timeout=deadline())
    assert not (tmp_path / "empty-cache").exists()
    assert torch.equal(torch.load(tmp_path / "action.pt"), expected)


def test_load_checkpoint_resolves_the_carried_vlm(policy, moved, expected):
    loaded, pre, post = load_checkpoint(moved)
    assert loaded.config.vlm_model_name == str(moved / VLM_FOLDER)
    assert torch.equal(seeded_action(loaded, pre, post), expected)
    ours = trainable_state(policy)
    assert all(torch.equal(ours[n], t) for n, t in trainable_state(loaded).items())


def test_run_continues_from_a_moved_checkpoint(policy, moved):
    again = build_policy(RunConfig.flat(model_name=str(moved), chunk_size=5, device="cpu"))
    assert again.config.vlm_model_name == str(moved / VLM_FOLDER)
    ours = trainable_state(policy)
    assert all(torch.equal(ours[n], t) for n, t in trainable_state(again).items())


def test_hub_vlm_names_stay_as_saved(moved, tmp_path):
    folder = shutil.copytree(moved, tmp_path / "hub")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vlm_model_name": HUB_VLM}))
    assert load_config(folder).vlm_model_name == HUB_VLM
