"""Can the tiny policy's vision path localise the cube? A probe for the embedded benchmark's images.

Closed-loop success needs the gripper within about 5 mm of where the expert would put it (the
expert itself, told a cube position 1 cm off, fails a third of its grasps). This trains SmolVLA's
own image path (``embed_image``: the local SmolVLM vision encoder and its pixel-shuffle connector,
randomly initialised) plus one linear layer to regress the cube's spawn XY from the first front
image of an episode, on ``--spawns`` seeded spawns per client task, and reports the RMSE on 50 new
spawns per task against predicting the middle of the spawn region. It isolates the vision tower
from behaviour cloning: a tower that cannot localise here cannot make a policy that grasps.

Run: ``HF_HUB_OFFLINE=1 python bench/vision_probe.py [--patch 16 --shuffle 2] [--spawns 100]``.
The last line is ``probe_rmse_cm_x=<x> probe_rmse_cm_y=<y> mean_predictor_cm_x=<x> mean_predictor_cm_y=<y>``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:
    from zk0 import policy, tiny
except ImportError:  # package not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from zk0 import policy, tiny

TRAIN_SEED, TEST_SEED, TEST_SPAWNS = 1_000_000, 2_000_000, 50  # far from the recordings' and evaluations' seeds


def first_frames(seed: int, spawns: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Front images in SmolVLA's [-1, 1], the cube's XY offset from each task's spawn centre (m), and the
    spawn region's half-extents, for ``spawns`` seeded episodes of every client task."""
    from zk0.sim.env import SimEnv
    from zk0.sim.scene import CLIENT_TASKS, get_task

    images, offsets, halves = [], [], []
    for name in CLIENT_TASKS:
        task = get_task(name)
        with SimEnv(task, image_size=tiny.IMAGE_SIZE) as env:
            for i in range(spawns):
                images.append(env.reset(seed + i)["front"])
                offsets.append(np.subtract(env.spawn.cube_xy, task.spawn_center))
                halves.append(task.spawn_half)
    pixels = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    return pixels, torch.tensor(np.stack(offsets)).float(), torch.tensor(np.stack(halves)).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patch", type=int, default=tiny.VLMS[policy.TINY].patch_size, help="vision patch size")
    parser.add_argument("--shuffle", type=int, default=tiny.VLMS[policy.TINY].scale_factor,
                        help="the connector's pixel-shuffle factor (patches per side merged into one token)")
    parser.add_argument("--spawns", type=int, default=100, help="training spawns per client task")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = tiny.VLMS[policy.TINY]
    name = f"probe-p{args.patch}-s{args.shuffle}"
    tiny.VLMS[name] = tiny.VlmSpec(name, base.image_size, args.patch, args.shuffle, base.text, base.vision)
    policy.LOCAL_MODELS[name] = policy.LOCAL_MODELS[policy.TINY]

    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    start = time.perf_counter()
    train_x, train_y, train_half = first_frames(TRAIN_SEED, args.spawns)
    test_x, test_y, test_half = first_frames(TEST_SEED, TEST_SPAWNS)
    vlm = SmolVLAPolicy(policy.local_config(name, 10, "cpu")).model.vlm_with_expert
    with torch.no_grad():
        width = vlm.embed_image(train_x[:1]).flatten(1).shape[1]
    head = torch.nn.Linear(width, 2)
    tower = [*vlm.get_vlm_model().vision_model.parameters(), *vlm.get_vlm_model().connector.parameters()]
    optimizer = torch.optim.AdamW([*tower, *head.parameters()], lr=1e-3)

    def predict(x: torch.Tensor) -> torch.Tensor:
        return head(vlm.embed_image(x).flatten(1))

    def rmse_cm() -> list[float]:
        with torch.no_grad():
            error = (predict(test_x) - test_y / test_half) * test_half
        return (error.pow(2).mean(0).sqrt() * 100).tolist()

    for step in range(1, args.steps + 1):
        batch = torch.randint(0, len(train_x), (32,))
        loss = torch.nn.functional.mse_loss(predict(train_x[batch]), train_y[batch] / train_half[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 500 == 0:
            x, y = rmse_cm()
            print(f"step {step}: train loss {loss.item():.4f}, test RMSE x {x:.2f} cm, y {y:.2f} cm "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    x, y = rmse_cm()
    mean_x, mean_y = (test_y.pow(2).mean(0).sqrt() * 100).tolist()
    print(f"probe_rmse_cm_x={x:.2f} probe_rmse_cm_y={y:.2f} mean_predictor_cm_x={mean_x:.2f} "
          f"mean_predictor_cm_y={mean_y:.2f}")


if __name__ == "__main__":
    main()
