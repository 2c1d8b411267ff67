"""zk0.policy (build, trainable split, fingerprints, pretrained loading) and zk0.tiny."""

from __future__ import annotations

import time

import pytest
import torch

from zk0 import tiny
from zk0.config import RunConfig
from zk0.model_source import ModelUnavailable, require_model
from zk0.policy import (SMOLVLA_SIZE, base_fingerprint, build_policy, load_trainable,
                        local_config, resolve_device, tiny_config, trainable_shapes, trainable_state)


def make(seed: int = 42, chunk_size: int = 5):
    return build_policy(RunConfig.flat(seed=seed, chunk_size=chunk_size, device="cpu"))


@pytest.fixture(scope="module")
def policy():
    return make()


def test_same_seed_same_base(policy):
    again = make()
    assert base_fingerprint(again) == base_fingerprint(policy)
    for (n1, t1), (n2, t2) in zip(policy.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2)


def test_other_seed_other_base(policy):
    assert base_fingerprint(make(seed=7)) != base_fingerprint(policy)


def test_fingerprint_ignores_trainable_but_sees_frozen():
    p = make()
    fp = base_fingerprint(p)
    with torch.no_grad():
        next(iter(trainable_state(p).values())).add_(1.0)
    assert base_fingerprint(p) == fp
    frozen = next(t for t in p.parameters() if not t.requires_grad)
    with torch.no_grad():
        frozen.view(-1)[0] += 1.0
    assert base_fingerprint(p) != fp


def test_policy_config(policy):
    assert policy.config.chunk_size == 5 and policy.config.n_action_steps == 5
    assert set(policy.config.image_features) == {"observation.images.front", "observation.images.wrist"}
    assert policy.config.robot_state_feature.shape == (6,)
    assert policy.config.action_feature.shape == (6,)
    assert next(policy.parameters()).device.type == "cpu"
    cfg = tiny_config(chunk_size=3, device="cpu")
    assert cfg.chunk_size == 3 and cfg.vlm_model_name == str(tiny.ensure_tiny_vlm())


def test_trainable_state(policy):
    state = trainable_state(policy)
    assert state
    assert all(p.requires_grad for p in state.values())
    named = dict(policy.named_parameters())
    assert all(state[n] is named[n] for n in state)  # the live parameters, not copies
    frozen = [n for n, p in named.items() if not p.requires_grad]
    assert frozen and set(frozen).isdisjoint(state)
    total = sum(p.numel() for p in policy.parameters())
    assert 0 < sum(p.numel() for p in state.values()) < total
    assert trainable_shapes(policy) == {n: tuple(p.shape) for n, p in state.items()}


def test_load_trainable_copies_values():
    src, dst = make(seed=1), make(seed=2)
    values = {n: p.detach().clone() + 0.5 for n, p in trainable_state(src).items()}
    dst_fp = base_fingerprint(dst)
    load_trainable(dst, values)
    for name, p in trainable_state(dst).items():
        assert torch.equal(p, values[name])
        assert p.data_ptr() != values[name].data_ptr()
    assert base_fingerprint(dst) == dst_fp  # only the trainable tensors changed
    # a later change of the source dict does not leak into the policy
    first = next(iter(values))
    values[first].add_(1.0)
    assert not torch.equal(trainable_state(dst)[first], values[first])


def test_load_trainable_rejects_other_names(policy):
    values = {n: p.detach().clone() for n, p in trainable_state(policy).items()}
    missing = dict(values)
    dropped = missing.popitem()[0]
    with pytest.raises(ValueError, match="differ") as err:
        load_trainable(policy, missing)
    assert dropped in str(err.value)
    with pytest.raises(ValueError, match="extra.weight"):
        load_trainable(policy, {**values, "extra.weight": torch.zeros(1)})


def test_smolvla_size_has_smolvla_base_architecture():
    # Shapes only: on the meta device the 450M parameters take no memory and no init time.
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    require_model(SMOLVLA_SIZE)  # built locally: never looked up on the hub
    cfg = local_config(SMOLVLA_SIZE, chunk_size=50, device="cpu")
    assert cfg.num_vlm_layers == 16 and cfg.resize_imgs_with_padding == (512, 512)
    with torch.device("meta"):
        policy = SmolVLAPolicy(cfg)
    vlm = policy.model.vlm_with_expert.vlm
    assert vlm.config.vision_config.image_size == 512 and len(vlm.model.text_model.layers) == 16
    total = sum(p.numel() for p in policy.parameters())
    trainable = sum(p.numel() for p in trainable_state(policy).values())
    assert 440e6 < total < 460e6 and 95e6 < trainable < 105e6


def test_pretrained_hub_model_offline_fails_fast():
    start = time.monotonic()
    with pytest.raises(ModelUnavailable) as err:
        build_policy(RunConfig.flat(model_name="lerobot/smolvla_base", device="cpu"))
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "lerobot/smolvla_base" in message
    assert "offline" in message.lower()


@pytest.mark.parametrize("hub_offline", ["1", "0"])
def test_pretrained_missing_local_folder_fails_fast(monkeypatch, hub_offline):
    # huggingface_hub read HF_HUB_OFFLINE=1 at import, so nothing here can reach the network;
    # with "0" zk0 (which reads the variable at call time) takes its online branch.
    monkeypatch.setenv("HF_HUB_OFFLINE", hub_offline)
    start = time.monotonic()
    with pytest.raises(ModelUnavailable) as err:
        build_policy(RunConfig.flat(model_name="/nonexistent/model", device="cpu"))
    assert time.monotonic() - start < 10
    assert "/nonexistent/model" in str(err.value)


def test_pretrained_folder_that_is_not_a_model(tmp_path):
    start = time.monotonic()
    with pytest.raises(ModelUnavailable) as err:
        build_policy(RunConfig.flat(model_name=str(tmp_path), device="cpu"))
    assert time.monotonic() - start < 10
    assert str(tmp_path) in str(err.value)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            resolve_device("cuda")


# ---------------------------------------------------------------- zk0.tiny


def test_tiny_vlm_folder_small_and_cached():
    folder = tiny.ensure_tiny_vlm()
    assert folder.is_absolute() and (folder / "config.json").is_file()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 5 * 1024 * 1024
    assert tiny.ensure_tiny_vlm() == folder
    assert folder.parent == tiny.cache_root()


def test_tiny_vlm_tokenizer_has_smolvlm_special_tokens():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.ensure_tiny_vlm())
    assert tok.fake_image_token == "<fake_token_around_image>"
    assert tok.global_image_token == "<global-img>"
    for token in tiny.SPECIAL_TOKENS.values():
        assert tok.convert_tokens_to_ids(token) != tok.unk_token_id
    ids = tok("pick up the red cube and place it on the left")["input_ids"]
    assert ids and tok.unk_token_id not in ids
