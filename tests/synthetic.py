"""Procedural SO-101-like demonstrations written as real LeRobotDataset v3.0 folders.

A test fixture: unit tests need datasets of any episode and frame count in a second or two
(zk0's embedded datasets are recorded in the simulator, ``zk0.sim``). Each task moves a
6-joint arm (SO-100 joint names and units, degrees) from a rest pose to a cube, closes
the gripper and carries the cube to a task-specific target. Two video cameras (front,
wrist) render the scene in a few numpy operations, so observations depend on the state
and the task, and a policy has something real to learn. Tasks differ in cube colour,
spawn region and target, which makes the federation non-IID.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zk0.so101 import CAMERAS, FPS, ROBOT_TYPE, features  # noqa: F401 (tests use them from here)

REST = np.array([0.0, -100.0, 90.0, 60.0, 0.0, 30.0], dtype=np.float32)


@dataclass(frozen=True)
class SyntheticTask:
    """One procedural task: what the episodes look like and what the task string says."""

    name: str
    instruction: str
    cube_rgb: tuple[int, int, int]
    floor_rgb: tuple[int, int, int]
    spawn_pan: tuple[float, float]  # shoulder_pan range (degrees) where the cube appears
    target_pan: float  # where the cube is carried


TASKS: dict[str, SyntheticTask] = {t.name: t for t in [
    SyntheticTask("red-left", "pick up the red cube and place it on the left",
                  (220, 40, 40), (90, 90, 90), (-10.0, 10.0), 45.0),
    SyntheticTask("green-right", "pick up the green cube and place it on the right",
                  (40, 200, 60), (110, 100, 80), (-15.0, 5.0), -45.0),
    SyntheticTask("blue-center", "grasp the blue cube and lift it",
                  (50, 70, 220), (80, 90, 110), (15.0, 30.0), 0.0),
    SyntheticTask("yellow-far-left", "put the yellow cube on the white plate",
                  (230, 210, 40), (70, 70, 70), (-30.0, -15.0), 70.0),
    SyntheticTask("purple-place-center", "pick up the purple cube and place it on the right",
                  (150, 60, 190), (100, 100, 100), (0.0, 20.0), -60.0),
]}


def _min_jerk(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    s = np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None]
    return a + (b - a) * (10 * s**3 - 15 * s**4 + 6 * s**5)


def _trajectory(task: SyntheticTask, rng: np.random.Generator, length: int) -> np.ndarray:
    """Joint positions over an episode: reach, grasp, carry, release."""
    start = REST + rng.normal(0.0, 2.0, 6).astype(np.float32)
    pan = rng.uniform(*task.spawn_pan)
    reach = rng.uniform(-40.0, -20.0)
    grasp_open = np.array([pan, reach, 40.0, 80.0, 0.0, 30.0], dtype=np.float32)
    grasp_closed = grasp_open * np.array([1, 1, 1, 1, 1, 0], dtype=np.float32) + [0, 0, 0, 0, 0, 2.0]
    carry = np.array([task.target_pan, reach + 15.0, 50.0, 70.0, 0.0, 2.0], dtype=np.float32)
    release = carry + np.array([0, 0, 0, 0, 0, 28.0], dtype=np.float32)
    waypoints = [start, grasp_open, grasp_closed, carry, release]
    cuts = np.linspace(0, length, len(waypoints), dtype=int)
    parts = [_min_jerk(waypoints[i], waypoints[i + 1], cuts[i + 1] - cuts[i]) for i in range(len(waypoints) - 1)]
    return np.concatenate(parts).astype(np.float32)


def _render(task: SyntheticTask, q: np.ndarray, cube_pan: float, size: int, wrist: bool) -> np.ndarray:
    """A cheap schematic render: floor, cube and gripper position as coloured squares."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = task.floor_rgb
    ee_x = 0.5 + q[0] / 200.0
    ee_y = 0.3 + (q[1] + 100.0) / 200.0
    cube_x, cube_y = 0.5 + cube_pan / 200.0, 0.65
    if wrist:  # the wrist camera is centred on the gripper and zoomed in
        cube_x, cube_y = 0.5 + 2 * (cube_x - ee_x), 0.5 + 2 * (cube_y - ee_y)
        ee_x, ee_y = 0.5, 0.5
    half = max(2, size // (8 if wrist else 14))
    for (cx, cy), rgb, h in (((cube_x, cube_y), task.cube_rgb, half),
                              ((ee_x, ee_y), (235, 235, 235), max(1, half // 2 + int(q[5] / 15)))):
        x, y = int(cx * size), int(cy * size)
        img[max(0, y - h):max(0, y + h), max(0, x - h):max(0, x + h)] = rgb
    return img


def real_world_features(image_size: int, cameras: tuple[str, ...], action_dim: int) -> dict:
    """SO-101 features with other camera names and counts, or another action size (as real datasets have)."""
    spec = {k: dict(v) for k, v in features(image_size).items() if not k.startswith("observation.images.")}
    if action_dim != spec["action"]["shape"][0]:
        spec["action"] = {"dtype": "float32", "shape": (action_dim,), "names": [f"a{i}" for i in range(action_dim)]}
    for cam in cameras:
        spec[f"observation.images.{cam}"] = {"dtype": "video", "shape": (image_size, image_size, 3),
                                             "names": ["height", "width", "channels"]}
    return spec


def generate(task: SyntheticTask, root: Path, episodes: int, frames: int, image_size: int, seed: int,
             cameras: tuple[str, ...] = CAMERAS, fps: int = FPS, action_dim: int = 6, vcodec: str = "h264") -> Path:
    """Write a LeRobotDataset for ``task`` at ``root`` (atomically: a staging folder is renamed).

    ``cameras`` names the video cameras (one named ``wrist`` renders the wrist view, any other the
    front view); ``fps`` and ``action_dim`` make datasets a policy must refuse; ``vcodec="libsvtav1"``
    encodes as LeRobot does by default (and real hub datasets are).
    """
    from lerobot.configs.video import RGBEncoderConfig
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent)) / "ds"
    ds = LeRobotDataset.create(repo_id=f"zk0/{root.name}", fps=fps,
                               features=real_world_features(image_size, cameras, action_dim),
                               root=staging, robot_type=ROBOT_TYPE, use_videos=True, video_backend="pyav",
                               rgb_encoder=RGBEncoderConfig(vcodec=vcodec))  # h264: quieter than SVT-AV1
    rng = np.random.default_rng(seed)
    for _ in range(episodes):
        traj = _trajectory(task, rng, frames + 1)
        cube_pan = float(traj[frames // 4, 0])
        for t in range(frames):
            action = np.resize(traj[t + 1], action_dim)
            frame = {"observation.state": traj[t], "action": action, "task": task.instruction}
            for cam in cameras:
                frame[f"observation.images.{cam}"] = _render(task, traj[t], cube_pan, image_size, cam == "wrist")
            ds.add_frame(frame)
        ds.save_episode()
    ds.finalize()
    try:
        staging.rename(root)
    except OSError:  # another process wrote the same dataset first
        pass
    shutil.rmtree(staging.parent, ignore_errors=True)
    return root
