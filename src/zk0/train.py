"""Local training: a number of optimizer steps with the FedProx proximal term and grad clipping.

Shared by the federated clients and (later) the centralized and local-only baselines, so
every mode trains the same way. ``mu = 0`` is plain FedAvg local training.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from zk0.policy import trainable_state


@dataclass(frozen=True)
class TrainResult:
    """What one local training call did (means over its steps)."""

    loss: float
    proximal: float
    grad_norm: float
    steps: int
    frames: int


def proximal_term(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx penalty ``mu/2 * sum ||w - w_global||^2`` over the trainable tensors."""
    total = sum(((params[n] - anchor[n]) ** 2).sum() for n in params)
    return 0.5 * mu * total


def train_steps(policy, preprocessor, batches: Iterator[dict], *, steps: int, lr: float, mu: float,
                grad_clip_norm: float) -> TrainResult:
    """Run ``steps`` optimizer steps on ``batches``; the anchor for the proximal term is the start point."""
    params = trainable_state(policy)
    anchor = {n: p.detach().clone() for n, p in params.items()}
    cfg = policy.config
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, betas=cfg.optimizer_betas,
                                  eps=cfg.optimizer_eps, weight_decay=cfg.optimizer_weight_decay)
    device = next(policy.parameters()).device
    policy.train()
    sums = {"loss": 0.0, "proximal": 0.0, "grad_norm": 0.0}
    frames = 0
    for _ in range(steps):
        raw = next(batches)
        frames += len(raw["action"])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = policy.forward(preprocessor(raw))
        prox = proximal_term(params, anchor, mu) if mu > 0 else torch.zeros((), device=device)
        (loss + prox).backward()
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()),
                                              grad_clip_norm if grad_clip_norm > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sums["loss"] += loss.item()
        sums["proximal"] += prox.item()
        sums["grad_norm"] += norm.item()
    return TrainResult(steps=steps, frames=frames, **{k: v / steps for k, v in sums.items()})
