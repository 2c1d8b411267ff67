"""Deterministic offline evaluation of a policy on held-out or unseen-task episodes.

The flow-matching loss depends on random noise and time; each batch draws them from a
generator seeded by (seed, batch index), so the same model on the same data always gets
the same number and rounds are comparable. The action error compares sampled action
chunks with the recorded ones in the dataset's own units (after un-normalisation).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from zk0.config import RunConfig
from zk0.data import ACTION, eval_batches


@torch.no_grad()
def evaluate_policy(policy, preprocessor, postprocessor, batches: Iterable[dict], seed: int) -> dict[str, float]:
    """Mean loss and mean absolute action error (unnormalised units) over ``batches``."""
    policy.eval()
    device = next(policy.parameters()).device
    loss_sum, err_sum, valid_sum, frames = 0.0, 0.0, 0.0, 0
    for i, raw in enumerate(batches):
        target = raw[ACTION].float()
        valid = ~raw["action_is_pad"]
        batch = preprocessor(raw)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed * 100_003 + i)
            loss, _ = policy.forward(batch)
            predicted = postprocessor(policy.predict_action_chunk(batch)).float().cpu()
        err = (predicted[:, : target.shape[1]] - target).abs().mean(-1)
        n = len(target)
        loss_sum += loss.item() * n
        err_sum += (err * valid).sum().item()
        valid_sum += valid.sum().item()
        frames += n
    if frames == 0:
        raise ValueError("evaluation got no batches: the evaluation split is empty")
    return {"loss": loss_sum / frames, "action_mae": err_sum / max(valid_sum, 1.0), "frames": float(frames)}


def evaluate_dataset(policy, preprocessor, postprocessor, dataset, cameras: dict[str, str],
                     cfg: RunConfig) -> dict[str, float]:
    """:func:`evaluate_policy` on the run config's fixed selection of ``dataset``'s frames.

    Server, clients and baselines all evaluate through this, so their numbers compare."""
    return evaluate_policy(policy, preprocessor, postprocessor,
                           eval_batches(dataset, cfg.train.batch_size, cfg.eval.eval_batches, cameras), seed=cfg.seed)
