"""Closed-loop rollouts of any policy in the simulator, and mp4 videos of them.

The policy is an ``act`` callable that sees observations in the form LeRobot datasets give
them (so a LeRobot policy wraps into it without conversions here) and returns six absolute
joint targets in degrees. Nothing policy-specific lives in this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zk0.logs import ffmpeg_quiet
from zk0.sim.env import SimEnv
from zk0.sim.scene import Task, get_task
from zk0.so101 import CAMERAS, FPS, JOINTS

Act = Callable[[dict], np.ndarray]


@dataclass(frozen=True)
class RolloutResult:
    """Outcome of one episode; ``frames`` are front|wrist side by side when video was recorded."""

    success: bool
    steps: int
    frames: list[np.ndarray] | None


def lerobot_observation(obs: dict[str, np.ndarray], task: Task) -> dict:
    """An environment observation as a LeRobot dataset item (unbatched).

    ``observation.state``: float32 tensor (6,) in degrees; ``observation.images.<cam>``: float32
    tensor (3, H, W) in [0, 1]; ``task``: the instruction string. torch loads here, not with the
    simulator: ``zk0 data generate`` and task-name checks need no torch.
    """
    import torch

    item: dict = {"observation.state": torch.from_numpy(obs["state"]), "task": task.instruction}
    for cam in CAMERAS:
        item[f"observation.images.{cam}"] = torch.from_numpy(obs[cam]).permute(2, 0, 1).float().div(255.0)
    return item


def rollout(task_name: str, act: Act, seed: int = 0, max_steps: int = 300, image_size: int = 96,
            record_video: bool = False) -> RolloutResult:
    """Run ``act`` from the seeded start of ``task_name`` until success or ``max_steps`` steps.

    ``act`` gets :func:`lerobot_observation` items and returns six joint targets (degrees) as
    anything ``np.asarray`` takes (a CPU tensor works).
    """
    task = get_task(task_name)
    frames: list[np.ndarray] | None = [] if record_video else None
    steps, success = 0, False
    with SimEnv(task, image_size=image_size) as env:
        obs = env.reset(seed)
        while steps < max_steps and not success:
            if frames is not None:
                frames.append(_video_frame(obs))
            action = np.asarray(act(lerobot_observation(obs, task)), dtype=np.float32).reshape(len(JOINTS))
            obs = env.step(action)
            steps += 1
            success = env.success()
        if frames is not None:
            frames.append(_video_frame(obs))
    return RolloutResult(success, steps, frames)


def _video_frame(obs: dict[str, np.ndarray]) -> np.ndarray:
    """Both cameras side by side."""
    return np.concatenate([obs[cam] for cam in CAMERAS], axis=1)


def write_mp4(frames: Sequence[np.ndarray], path: Path, fps: int = FPS) -> Path:
    """Encode HxWx3 uint8 frames as H.264 (yuv420p, so odd sizes are padded to even) with PyAV."""
    import av

    if not frames:
        raise ValueError("write_mp4: no frames")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = (n + n % 2 for n in frames[0].shape[:2])
    with ffmpeg_quiet(), av.open(str(path), mode="w") as container:
        stream = container.add_stream("h264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            padded = np.pad(frame, ((0, height - frame.shape[0]), (0, width - frame.shape[1]), (0, 0)), mode="edge")
            container.mux(stream.encode(av.VideoFrame.from_ndarray(padded, format="rgb24")))
        container.mux(stream.encode())
    return path
