"""Local training: a number of optimizer steps with the FedProx proximal gradient and grad clipping.

Shared by the federated clients and the centralized and local-only baselines, so
every mode trains the same way. ``mu = 0`` is plain FedAvg local training.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from zk0.config import CLIENT_OPTIMIZERS
from zk0.policy import trainable_state


@dataclass(frozen=True)
class TrainResult:
    """What one local training call did (means over its steps)."""

    loss: float
    proximal: float
    grad_norm: float
    steps: int
    frames: int


def add_proximal_grad(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], mu: float) -> float:
    """Add FedProx's gradient ``mu * (w - w_global)`` to every trainable tensor's gradient; return the penalty
    ``mu/2 * sum ||w - w_global||^2`` (for the record).

    The gradient of the penalty is known in closed form, so it is added after ``backward`` with a
    few fused multi-tensor kernels instead of autograd through a Python sum of squares over every
    trainable tensor (which built, and back-propagated through, one graph node per tensor per step).
    """
    weights = list(params.values())
    for w in weights:
        if w.grad is None:  # a tensor the loss did not reach still feels the pull to the anchor
            w.grad = torch.zeros_like(w)
    with torch.no_grad():
        diffs = torch._foreach_sub(weights, [anchor[name] for name in params])
        torch._foreach_add_([w.grad for w in weights], diffs, alpha=mu)
        squares = torch.stack(torch._foreach_norm(diffs)).square().sum()
    return 0.5 * mu * float(squares)


def train_steps(policy, preprocessor, batches: Iterator[dict], *, steps: int, lr: float, mu: float,
                grad_clip_norm: float, optimizer: str = "adamw") -> TrainResult:
    """Run ``steps`` optimizer steps on ``batches``; the anchor for the proximal term is the start point.

    ``optimizer`` (``client-optimizer``) is built afresh for the call: ``adamw`` with the policy preset's betas,
    eps and weight decay, or ``sgd``, plain steps of ``-lr`` x the (clipped) gradient, whose update is linear
    in the gradients, so that a server optimizer averaging several clients' updates sees their mean gradient.
    """
    params = trainable_state(policy)
    anchor = {n: p.detach().clone() for n, p in params.items()}
    step = _optimizer(policy, list(params.values()), optimizer, lr)
    device = next(policy.parameters()).device
    policy.train()
    sums = {"loss": 0.0, "proximal": 0.0, "grad_norm": 0.0}
    frames = 0
    for _ in range(steps):
        raw = next(batches)
        frames += len(raw["action"])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = policy.forward(preprocessor(raw))
        loss.backward()
        prox = add_proximal_grad(params, anchor, mu) if mu > 0 else 0.0
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()),
                                              grad_clip_norm if grad_clip_norm > 0 else float("inf"))
        step.step()
        step.zero_grad(set_to_none=True)
        sums["loss"] += loss.item()
        sums["proximal"] += prox
        sums["grad_norm"] += norm.item()
    return TrainResult(steps=steps, frames=frames, **{k: v / steps for k, v in sums.items()})


def _optimizer(policy, params: list[torch.Tensor], name: str, lr: float) -> torch.optim.Optimizer:
    """A fresh local optimizer of kind ``name`` over ``params``."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adamw":
        cfg = policy.config
        return torch.optim.AdamW(params, lr=lr, betas=cfg.optimizer_betas, eps=cfg.optimizer_eps,
                                 weight_decay=cfg.optimizer_weight_decay)
    raise ValueError(f"client-optimizer must be one of {CLIENT_OPTIMIZERS}, got {name!r}")
