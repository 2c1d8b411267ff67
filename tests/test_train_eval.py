"""zk0.train and zk0.evaluate with the tiny policy on a small generated dataset."""

from __future__ import annotations

import math

import pytest
import torch
from lerobot.policies.factory import make_pre_post_processors

import synthetic

from zk0 import data, tiny
from zk0 import train as train_module
from zk0.config import RunConfig
from zk0.evaluate import evaluate_policy
from zk0.policy import base_fingerprint, build_policy, trainable_state
from zk0.registry import DatasetEntry
from zk0.train import TrainResult, add_proximal_grad, train_steps

CHUNK, BATCH = 5, 4


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = synthetic.generate(synthetic.TASKS["green-right"], tmp_path_factory.mktemp("train") / "ds",
                              episodes=3, frames=12, image_size=tiny.IMAGE_SIZE, seed=1)
    policy = build_policy(RunConfig.flat(chunk_size=CHUNK, device="cpu"))
    return data.open_split(DatasetEntry(uri=f"local:{root}"), policy.config, 0.3, 0)  # 2 train, 1 held out


@pytest.fixture(scope="module")
def stats(split):
    return data.decode_stats(data.encode_stats(data.vector_stats(split.train)))


def fresh_policy(seed: int = 42):
    return build_policy(RunConfig.flat(chunk_size=CHUNK, device="cpu", seed=seed))


@pytest.fixture(scope="module")
def processors(split, stats):
    return make_pre_post_processors(fresh_policy().config, dataset_stats=stats)


def snapshot(policy) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainable_state(policy).items()}


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(((a[n] - b[n]) ** 2).sum()) for n in a))


def train(policy, processors, split, *, steps=3, lr=1e-3, mu=0.0, clip=10.0, seed=0, optimizer="adamw") -> TrainResult:
    torch.manual_seed(seed)
    return train_steps(policy, processors[0], data.batches(data.train_loader(split.train, BATCH), seed, {}), steps=steps, lr=lr,
                       mu=mu, grad_clip_norm=clip, optimizer=optimizer)


def held_out(split, limit=2):
    return data.eval_batches(split.held_out, BATCH, limit, {})


# ---------------------------------------------------------------- proximal term


def reference_penalty(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's penalty written as the paper does, for autograd: ``mu/2 * sum ||w - w_global||^2``."""
    return 0.5 * mu * sum(((params[n] - anchor[n]) ** 2).sum() for n in params)


def test_proximal_grad_matches_autograd_of_the_penalty():
    g = torch.Generator().manual_seed(0)
    anchor = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}
    fused = {n: torch.randn(t.shape, generator=g).requires_grad_() for n, t in anchor.items()}
    autograd = {n: t.detach().clone().requires_grad_() for n, t in fused.items()}
    loss_grads = {n: torch.randn(t.shape, generator=g) for n, t in anchor.items()}
    for n in fused:  # the task loss's gradient is already there when the proximal one is added
        fused[n].grad = loss_grads[n].clone()
    mu = 0.3
    penalty = add_proximal_grad(fused, anchor, mu)
    reference = reference_penalty(autograd, anchor, mu)
    reference.backward()
    assert penalty == pytest.approx(float(reference), rel=1e-5)
    for n in fused:
        assert torch.allclose(fused[n].grad, loss_grads[n] + autograd[n].grad, atol=1e-6), n


def test_proximal_grad_by_hand_and_for_untouched_tensors():
    w = torch.tensor([1.0, -2.0], requires_grad=True)  # no task-loss gradient: grad is None
    penalty = add_proximal_grad({"w": w}, {"w": torch.tensor([0.5, 0.0])}, 2.0)
    assert torch.allclose(w.grad, torch.tensor([1.0, -4.0]))  # mu * (w - anchor)
    assert penalty == pytest.approx(0.5 * 2.0 * (0.25 + 4.0))
    at_anchor = torch.tensor([0.5, 0.0], requires_grad=True)
    assert add_proximal_grad({"w": at_anchor}, {"w": torch.tensor([0.5, 0.0])}, 2.0) == 0.0


def test_train_steps_with_fused_proximal_grad_match_autograd(split, processors, monkeypatch):
    """A FedProx round with the fused gradient lands on the same weights as autograd through the penalty."""
    fused = fresh_policy()
    train(fused, processors, split, steps=3, lr=1e-2, mu=1.0, seed=5)

    def autograd_prox(params, anchor, mu):
        reference_penalty(params, anchor, mu).backward()
        return 0.0

    reference = fresh_policy()
    monkeypatch.setattr(train_module, "add_proximal_grad", autograd_prox)
    train(reference, processors, split, steps=3, lr=1e-2, mu=1.0, seed=5)
    assert distance(snapshot(fused), snapshot(reference)) < 1e-5 * max(1.0, math.sqrt(
        sum(float((t ** 2).sum()) for t in snapshot(reference).values())))


# ---------------------------------------------------------------- train_steps


def test_train_steps_updates_trainable_only(split, processors):
    policy = fresh_policy()
    before_fp, before = base_fingerprint(policy), snapshot(policy)
    frozen_before = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    assert frozen_before, "the tiny policy must have a frozen base"
    result = train(policy, processors, split, steps=3)
    assert base_fingerprint(policy) == before_fp
    for name, p in policy.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[name]), name
    after = snapshot(policy)
    assert set(after) == set(before)
    assert distance(after, before) > 0
    assert isinstance(result, TrainResult)
    assert result.steps == 3
    assert result.frames == 3 * BATCH
    assert math.isfinite(result.loss) and result.loss > 0
    assert math.isfinite(result.grad_norm) and result.grad_norm > 0
    assert result.proximal == 0.0  # mu = 0: plain FedAvg local training


def test_sgd_steps_by_minus_lr_times_the_gradient(split, processors):
    """client-optimizer=sgd: the update is linear in the gradient (what a server optimizer averaging the clients'
    updates relies on); the same batch and noise give the gradient by hand."""
    policy, seed = fresh_policy(), 5
    before = snapshot(policy)
    torch.manual_seed(seed)
    raw = next(data.batches(data.train_loader(split.train, BATCH), seed, {}))
    policy.train()
    loss, _ = policy.forward(processors[0](raw))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainable_state(policy).items()}
    policy.zero_grad(set_to_none=True)
    train(policy, processors, split, steps=1, lr=0.5, clip=0.0, seed=seed, optimizer="sgd")
    after = snapshot(policy)
    for name, grad in grads.items():
        assert torch.allclose(after[name] - before[name], -0.5 * grad, atol=1e-6), name
    adamw = fresh_policy()
    train(adamw, processors, split, steps=1, lr=0.5, clip=0.0, seed=seed)
    assert distance(snapshot(adamw), after) > 0.1, "the default adamw steps differently"


def test_unknown_client_optimizer_is_refused(split, processors):
    with pytest.raises(ValueError, match="client-optimizer"):
        train(fresh_policy(), processors, split, steps=1, optimizer="lion")


def test_train_steps_deterministic(split, processors):
    a, b = fresh_policy(), fresh_policy()
    ra = train(a, processors, split, steps=2, mu=0.1)
    rb = train(b, processors, split, steps=2, mu=0.1)
    assert ra == rb
    assert distance(snapshot(a), snapshot(b)) == 0.0


def test_train_steps_reports_proximal(split, processors):
    result = train(fresh_policy(), processors, split, steps=3, lr=1e-2, mu=1.0)
    # step 1 starts at the anchor (term 0), later steps have moved away from it
    assert result.proximal > 0 and math.isfinite(result.proximal)


def test_large_mu_stays_closer_to_anchor(split, processors):
    runs = {}
    for mu in (0.0, 100.0):
        policy = fresh_policy()
        anchor = snapshot(policy)
        train(policy, processors, split, steps=5, lr=1e-2, mu=mu, seed=3)
        runs[mu] = distance(snapshot(policy), anchor)
    assert runs[100.0] > 0
    assert runs[100.0] < 0.5 * runs[0.0]


# ---------------------------------------------------------------- evaluate_policy


def test_evaluate_is_deterministic_and_tracks_training(split, processors):
    policy = fresh_policy()
    pre, post = processors
    first = evaluate_policy(policy, pre, post, held_out(split), seed=0)
    batches = list(held_out(split))  # (a DataLoader draws its base seed from the global RNG)
    rng = torch.random.get_rng_state()
    second = evaluate_policy(policy, pre, post, batches, seed=0)
    assert torch.equal(rng, torch.random.get_rng_state())  # the model's sampling leaves the global RNG alone
    assert first == second
    assert first["frames"] == 2 * BATCH
    assert math.isfinite(first["loss"]) and first["loss"] > 0
    assert math.isfinite(first["action_mae"]) and first["action_mae"] > 0
    other_seed = evaluate_policy(policy, pre, post, held_out(split), seed=1)
    assert other_seed["loss"] != first["loss"]
    train(policy, processors, split, steps=3, lr=1e-2)
    after = evaluate_policy(policy, pre, post, held_out(split), seed=0)
    assert after["loss"] != first["loss"]
    assert after["action_mae"] != first["action_mae"]
    assert after == evaluate_policy(policy, pre, post, held_out(split), seed=0)


def test_action_mae_in_dataset_units(split, processors):
    """The error compares un-normalised predictions with the recorded actions (masked by padding)."""
    policy = fresh_policy()
    pre, post = processors
    seed = 5
    result = evaluate_policy(policy, pre, post, held_out(split, limit=1), seed=seed)
    # recompute by hand from an untouched copy of the batch
    raw = next(held_out(split, limit=1))
    target = raw["action"].clone().float()
    valid = ~raw["action_is_pad"].clone()
    policy.eval()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed * 100_003)
        batch = pre(raw)
        policy.forward(batch)  # the loss draws noise first, as in evaluate_policy
        predicted = post(policy.predict_action_chunk(batch)).float()
    err = (predicted[:, :CHUNK] - target).abs().mean(-1)
    expected = float((err * valid).sum() / valid.sum())
    assert result["action_mae"] == pytest.approx(expected, rel=1e-5)
    # degrees, not normalised units: shifting the un-normaliser's mean by 1000 shifts the error by ~1000
    shifted = {k: dict(v) for k, v in data.decode_stats(data.encode_stats(data.vector_stats(split.train))).items()}
    shifted["action"]["mean"] = shifted["action"]["mean"] + 1000.0
    _, post_shifted = make_pre_post_processors(policy.config, dataset_stats=shifted)
    moved = evaluate_policy(policy, pre, post_shifted, held_out(split, limit=1), seed=seed)
    assert moved["loss"] == result["loss"]
    assert moved["action_mae"] > result["action_mae"] + 900


def test_evaluate_rejects_empty_input(processors):
    with pytest.raises(ValueError, match="no batches"):
        evaluate_policy(fresh_policy(), *processors, iter([]), seed=0)
