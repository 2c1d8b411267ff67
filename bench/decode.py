"""Samples/s of a client's train loader: LeRobot's per-sample video decode (before) vs zk0.frames (after).

What the ClientApp does every round: draw ``local-steps`` batches of ``batch-size`` from its resident
``zk0.data.train_loader`` through ``zk0.data.batches``, reseeded per round. "after" is the training split
``zk0.data.open_split`` opens (videos opened once per process, episodes decoded once, see zk0.frames);
"before" is the same episodes read by LeRobot alone (every sample opens, seeks and decodes each camera's
MP4). ``--workers 0 1 2`` adds loaders with that many ``num-workers``. Every variant runs in every
round, in rotating order, so whatever else loads the machine hits them alike; samples/s are medians
over rounds. ``--train`` times the client's whole round instead (tiny policy, zk0.train.train_steps):
what decides ``num-workers``, since training needs the same cores as the loader's workers.

Run: ``HF_HUB_OFFLINE=1 python bench/decode.py``. The last line is ``decode_after_vs_before=<ratio>``
(samples/s after / before at the first ``--workers`` value).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

try:
    from zk0 import data
except ImportError:  # package not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from zk0 import data
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.policies.factory import make_pre_post_processors

from zk0 import frames
from zk0.config import RunConfig
from zk0.logs import ffmpeg_quiet
from zk0.policy import build_policy, policy_config
from zk0.registry import DatasetEntry
from zk0.train import train_steps

MIB = 2**20


def lerobot_alone(split: data.DatasetSplit) -> LeRobotDataset:
    """The split's training episodes as LeRobot reads them without zk0.frames."""
    train = split.train
    return LeRobotDataset(train.repo_id, root=train.root, episodes=split.train_episodes,
                          delta_timestamps=train.delta_timestamps, video_backend="pyav")


def loader_round(loader: torch.utils.data.DataLoader, seed: int, steps: int) -> Callable[[], int]:
    """A round that only draws the batches; returns the samples drawn."""
    def run() -> int:
        stream = data.batches(loader, seed, cameras={})
        return sum(len(next(stream)["index"]) for _ in range(steps))
    return run


def train_round(loader: torch.utils.data.DataLoader, seed: int, steps: int, cfg: RunConfig,
                stats: dict) -> Callable[[], int]:
    """A client's training round on the tiny policy, built beforehand (a resident client has it already)."""
    policy = build_policy(cfg)
    pre, _ = make_pre_post_processors(policy.config, dataset_stats=stats)

    def run() -> int:
        torch.manual_seed(seed)
        result = train_steps(policy, pre, data.batches(loader, seed, cameras={}), steps=steps, lr=cfg.train.lr,
                             mu=cfg.federation.effective_mu, grad_clip_norm=cfg.train.grad_clip_norm)
        return result.frames
    return run


def rounds_of(loader: torch.utils.data.DataLoader, args: argparse.Namespace, cfg: RunConfig,
              stats: dict) -> Callable[[int], Callable[[], int]]:
    """Round ``number`` of a variant (its seed is the round number), loader only or training."""
    if args.train:
        return lambda number: train_round(loader, number, args.steps, cfg, stats)
    return lambda number: loader_round(loader, number, args.steps)


Variant = tuple[str, int]  # ("before" | "after", num-workers)


def measure(rounds: dict[Variant, Callable[[int], Callable[[], int]]], count: int) -> dict[Variant, float]:
    """Median samples/s of each (variant, num-workers): every one runs in every round, in an order that
    rotates, so load from elsewhere on the machine hits them alike."""
    rates: dict[Variant, list[float]] = {key: [] for key in rounds}
    keys = list(rounds)
    for number in range(1, count + 1):
        for key in keys[number % len(keys):] + keys[:number % len(keys)]:
            run = rounds[key](number)
            start = time.perf_counter()
            samples = run()
            rates[key].append(samples / (time.perf_counter() - start))
        print(f"round {number}: " + "  ".join(f"{name}/{workers} {rates[name, workers][-1]:6.1f}/s"
                                            for name, workers in keys), flush=True)
    return {key: statistics.median(values) for key, values in rates.items()}


def main() -> None:
    """Measure every variant and --workers value, print the table, and the machine-readable ratio last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="embedded:red-pick")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per variant (>= 3: medians)")
    parser.add_argument("--steps", type=int, default=20, help="batches per round (run config local-steps)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0], help="num-workers values to measure")
    parser.add_argument("--train", action="store_true", help="time whole training rounds, not just the loader")
    args = parser.parse_args()
    cfg = RunConfig.flat(chunk_size=10, device="cpu", batch_size=args.batch_size, local_steps=args.steps)
    with ffmpeg_quiet():
        split = data.open_split(DatasetEntry(uri=args.dataset), policy_config(cfg), 0.2, 0)
    stats = data.decode_stats(data.encode_stats(data.vector_stats(split.train)))
    print(f"{args.dataset}: {len(split.train)} training frames, cameras {split.meta.video_keys}, "
          f"{frames.decoded_bytes(split.train) / MIB:.1f} MiB decoded; torch threads {torch.get_num_threads()}; "
          f"{'training rounds' if args.train else 'loader only'}, {args.steps} batches of {args.batch_size}")
    datasets = {"before": lerobot_alone(split), "after": split.train}
    loaders = {(name, workers): data.train_loader(ds, args.batch_size, workers)
               for workers in args.workers for name, ds in datasets.items()}
    for loader in loaders.values():
        if loader.num_workers:
            iter(loader)  # workers fork now, as a resident client's did before this round's decoding
    with ffmpeg_quiet():
        medians = measure({key: rounds_of(loader, args, cfg, stats) for key, loader in loaders.items()}, args.rounds)
    print(f"\nmedian samples/s over {args.rounds} rounds (decoded frames kept in this process: "
          f"{frames.store().nbytes / MIB:.1f} MiB)")
    print(f"{'num-workers':>11} {'before':>9} {'after':>9} {'after/before':>13}")
    for workers in args.workers:
        before, after = medians["before", workers], medians["after", workers]
        print(f"{workers:>11} {before:>9.1f} {after:>9.1f} {after / before:>13.2f}")
    first = args.workers[0]
    print(f"decode_after_vs_before={medians['after', first] / medians['before', first]:.2f}")

if __name__ == "__main__":
    main()
