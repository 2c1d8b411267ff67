"""What FedProx's proximal gradient costs next to FedAvg: one client's training round, side by side.

Builds ``model-name=smolvla-size`` (smolvla_base's architecture: SmolVLM2-500M backbone,
16 VLM layers, 450M parameters, random init: the hub is not needed; or ``tiny``), and runs
zk0's own ``train_steps`` (bf16 autocast, AdamW on the 99.9M trainable parameters, grad
clipping) on random batches shaped like the embedded SO-101 datasets, with chunk size 50
as smolvla_base. The proximal term of FedProx touches every trainable tensor each step
(:func:`zk0.train.add_proximal_grad`: a few fused multi-tensor kernels after ``backward``);
this measures what that costs next to FedAvg (mu = 0), interleaved in one run.

Run: ``HF_HUB_OFFLINE=1 python bench/fedprox_step.py`` (CUDA: smolvla-size, batch 8, 20 steps) or
``--device cpu --model tiny`` / ``--device cpu --model smolvla-size --batch-size 1 --steps 2`` on CPU.
The last line is ``fedprox_vs_fedavg_step=<ratio> ...``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    from zk0 import so101
except ImportError:  # package not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from zk0 import so101

from lerobot.policies.factory import make_pre_post_processors  # noqa: E402

from zk0.config import RunConfig  # noqa: E402
from zk0.policy import build_policy, trainable_state  # noqa: E402
from zk0 import train as train_module  # noqa: E402
from zk0.train import train_steps  # noqa: E402

CHUNK = 50
TASK = "pick up the red cube"


def random_batches(batch_size: int, image_size: int):
    """Endless batches with the embedded datasets' keys and shapes (uint8-range images as floats in [0, 1])."""
    dims = len(so101.JOINTS)
    while True:
        batch = {"observation.state": torch.randn(batch_size, dims) * 30,
                 "action": torch.randn(batch_size, CHUNK, dims) * 30,
                 "action_is_pad": torch.zeros(batch_size, CHUNK, dtype=torch.bool),
                 "task": [TASK] * batch_size}
        for cam in so101.CAMERAS:
            batch[f"observation.images.{cam}"] = torch.rand(batch_size, 3, image_size, image_size)
        yield batch


def autograd_proximal_grad(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], mu: float) -> float:
    """The earlier way, for comparison: autograd through ``mu/2 * sum ||w - w_global||^2`` over every tensor."""
    penalty = 0.5 * mu * sum(((params[n] - anchor[n]) ** 2).sum() for n in params)
    penalty.backward()
    return float(penalty.detach())


def time_round(policy, pre, batches, steps: int, mu: float, device: str, autograd: bool = False) -> float:
    """Seconds for one client's round of ``steps`` optimizer steps, as the ClientApp runs it."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fused = train_module.add_proximal_grad
    train_module.add_proximal_grad = autograd_proximal_grad if autograd else fused
    sync()
    start = time.perf_counter()
    try:
        train_steps(policy, pre, batches, steps=steps, lr=1e-4, mu=mu, grad_clip_norm=10.0)
        sync()
    finally:
        train_module.add_proximal_grad = fused
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per round (local-steps)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="smolvla-size", help="smolvla-size, or tiny for a quick CPU check")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/fedprox_step.py: no CUDA GPU here; use --device cpu")
    start = time.perf_counter()
    policy = build_policy(RunConfig.flat(model_name=args.model, chunk_size=CHUNK, device=args.device))
    build_s = time.perf_counter() - start
    total = sum(p.numel() for p in policy.parameters())
    trainable = sum(t.numel() for t in trainable_state(policy).values())
    stats = {key: {"mean": torch.zeros(len(so101.JOINTS)), "std": torch.full((len(so101.JOINTS),), 30.0)}
             for key in ("observation.state", "action")}
    pre, _ = make_pre_post_processors(policy.config, dataset_stats=stats)
    image = policy.config.input_features["observation.images.front"].shape[-1]
    batches = random_batches(args.batch_size, image)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{name}: {args.model} {total / 1e6:.1f}M params, {trainable / 1e6:.1f}M trainable, built in "
          f"{build_s:.1f}s; batch {args.batch_size}, chunk {CHUNK}, {args.steps} steps per round")
    time_round(policy, pre, batches, 3, 0.01, args.device)  # warm-up: kernels, allocator
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs = {"fedavg": (0.0, False), "fedprox": (0.01, False), "fedprox-autograd": (0.01, True)}
    rounds: dict[str, list[float]] = {strategy: [] for strategy in runs}
    for _ in range(args.repeats):  # interleaved, so drift hits all alike
        for strategy, (mu, autograd) in runs.items():
            rounds[strategy].append(time_round(policy, pre, batches, args.steps, mu, args.device, autograd))
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    fedavg, fedprox, autograd = (statistics.median(rounds[k]) for k in runs)
    for strategy, times in rounds.items():
        print(f"{strategy:<16} round seconds {', '.join(f'{t:.2f}' for t in times)}")
    print(f"autograd_fedprox_vs_fedavg_step={autograd / fedavg:.3f}")
    print(f"fedprox_vs_fedavg_step={fedprox / fedavg:.3f} fedavg_step_s={fedavg / args.steps:.4f} "
          f"fedprox_round_s={fedprox:.2f} peak_gib={peak:.1f}")


if __name__ == "__main__":
    main()
