"""Simulation throughput: recording expert demonstrations and closed-loop episodes.

Recording is what the embedded datasets cost (physics + two 96x96 renders per frame + H.264
encoding through LeRobotDataset); a closed-loop episode is what a simulated evaluation costs
apart from the policy itself, measured with a policy that holds the arm still, so every episode
runs to ``--max-steps``. ``--full`` also times the five task datasets (4 client tasks + 1 unseen)
of ``--full-episodes`` each, the generation budget the project cares about.

Run: ``HF_HUB_OFFLINE=1 python bench/sim.py``. The last line is
``record_fps=<frames/s> closed_loop_s_per_episode=<s>`` (plus ``five_datasets_s=<s>`` with --full).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    from zk0 import sim
except ImportError:  # package not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from zk0 import sim

IMAGE_SIZE = 96


def record_fps(task: str, episodes: int, runs: int) -> float:
    """Median frames per second of ``record`` over ``runs`` recordings."""
    rates = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(runs):
            report = sim.record(task, Path(tmp) / f"run{run}", episodes, seed=run, image_size=IMAGE_SIZE)
            rates.append(report.frames / report.seconds)
            print(f"record run {run}: {report.frames} frames in {report.seconds:.2f} s", flush=True)
    return statistics.median(rates)


def closed_loop_seconds(task: str, max_steps: int, runs: int) -> float:
    """Median wall time of a rendered rollout whose policy holds the current joint state."""
    times = []
    for run in range(runs):
        start = time.perf_counter()
        result = sim.rollout(task, lambda obs: obs["observation.state"], seed=run, max_steps=max_steps,
                             image_size=IMAGE_SIZE)
        times.append(time.perf_counter() - start)
        print(f"rollout run {run}: {result.steps} steps in {times[-1]:.2f} s", flush=True)
    return statistics.median(times)


def five_datasets_seconds(episodes: int) -> float:
    """Wall time to record every client task and the unseen task."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for task in (*sim.CLIENT_TASKS, *sim.UNSEEN_TASKS):
            report = sim.record(task, Path(tmp) / task, episodes, seed=0, image_size=IMAGE_SIZE)
            print(f"{task}: {report.successes}/{report.attempts} episodes, {report.frames} frames, "
                  f"{report.seconds:.1f} s", flush=True)
    return time.perf_counter() - start


def main() -> None:
    """Run the measurements and print the machine-readable summary last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="green-place-left")
    parser.add_argument("--episodes", type=int, default=2, help="episodes per timed recording")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--full-episodes", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    fps = record_fps(args.task, args.episodes, args.runs)
    seconds = closed_loop_seconds(args.task, args.max_steps, args.runs)
    summary = f"record_fps={fps:.1f} closed_loop_s_per_episode={seconds:.2f}"
    if args.full:
        summary += f" five_datasets_s={five_datasets_seconds(args.full_episodes):.1f}"
    print(summary)


if __name__ == "__main__":
    main()
