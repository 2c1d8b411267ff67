"""Expert demonstrations in simulation, written as LeRobotDataset v3.0 folders.

Only successful demonstrations are recorded: a failed expert episode would teach the policy to
fail. Attempt ``k`` of a recording is simulated from seed ``seed + k``, so a dataset is a
deterministic function of (task, episodes, seed, image_size).

Recorded demonstrations are perturbed (DART, Laskey et al. 2017): during the approach, the arm
executes the expert's targets plus slowly varying noise, while the frame records the expert's
own target. A policy cloned from clean demonstrations only ever saw states on the expert's path;
once its own small errors move the arm off it, it has no example of the way back, and the errors
compound (measured: 1-3 cm off at the grasp, from 0.4 deg of held-out action error). The noisy
approach shows the way back from where the policy will actually be.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zk0.logs import ffmpeg_quiet
from zk0.sim.env import SimEnv
from zk0.sim.expert import ARM, Expert
from zk0.sim.scene import Task, get_task
from zk0.so101 import CAMERAS, FPS, ROBOT_TYPE, features

MAX_ATTEMPTS_FACTOR = 2  # give up when the expert fails more often than it succeeds
PERTURB_DEG = 2.0  # stationary std of the noise on each arm joint (the gripper is never perturbed)
PERTURB_THETA = 0.15  # per-step pull of the noise back to zero (Ornstein-Uhlenbeck): correlated over ~7 steps
ARM_MASK = np.array([1.0] * len(ARM) + [0.0])  # joint order: the arm's, then the gripper


@dataclass(frozen=True)
class RecordReport:
    """What a recording cost and how often the expert succeeded."""

    task: str
    root: Path
    attempts: int
    successes: int
    frames: int
    seconds: float

    @property
    def success_rate(self) -> float:
        """Share of simulated expert episodes that succeeded (and were recorded)."""
        return self.successes / self.attempts if self.attempts else 0.0


def demonstrate(env: SimEnv, seed: int, perturb_deg: float = 0.0) -> tuple[list[dict], bool]:
    """One expert episode as LeRobot frames (without ``task``), and whether it ended in success.

    With ``perturb_deg`` > 0 the arm executes the expert's target plus noise until the grasp
    point (reach and descent: the part where the cube's position decides the motion); the
    frames keep the expert's target, the way back to its path.
    """
    obs = env.reset(seed)
    expert = Expert(env.model, env.task, env.spawn)
    rng = np.random.default_rng(seed)
    noise, frames = np.zeros(len(ARM_MASK)), []
    while not expert.done:
        action = expert(obs["state"])
        frames.append(_frame(obs, action))
        scale = perturb_deg if expert.t < expert.approach_frames else 0.0
        noise += -PERTURB_THETA * noise + scale * np.sqrt(2 * PERTURB_THETA) * rng.standard_normal(len(noise)) * ARM_MASK
        obs = env.step(action + noise.astype(np.float32))
    return frames, env.success()


def _frame(obs: dict[str, np.ndarray], action: np.ndarray) -> dict:
    """A LeRobot frame from an environment observation and the action taken from it."""
    frame = {"observation.state": obs["state"], "action": np.asarray(action, dtype=np.float32)}
    for cam in CAMERAS:
        if cam in obs:
            frame[f"observation.images.{cam}"] = obs[cam]
    return frame


def record(task_name: str, root: Path, episodes: int, seed: int, image_size: int = 96) -> RecordReport:
    """Write ``episodes`` successful expert demonstrations of ``task_name`` to ``root``.

    The dataset is built in a staging folder next to ``root`` and renamed at the end, so a
    half-written dataset never appears at ``root``. If another process wrote ``root`` first,
    its (identical, deterministic) dataset is kept.
    """
    task = get_task(task_name)
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        attempts, frames = _write(task, staging / "ds", f"zk0/{root.name}", episodes, seed, image_size)
        with contextlib.suppress(OSError):  # another process wrote the same dataset first
            (staging / "ds").rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return RecordReport(task.name, root, attempts, episodes, frames, time.perf_counter() - start)


def _encoder():
    """H.264 (quieter than LeRobot's SVT-AV1) at CRF 0 in full chroma (yuv444p): the frames a policy trains on are
    the renders it will see in closed loop (within 2 of 255). LeRobot's default (yuv420p, CRF 30) blurred the small
    cubes' colour over 2x2 pixels, 65 of 255 off at the 99th percentile: policies learned on frames the simulator
    never shows them."""
    from lerobot.configs.video import RGBEncoderConfig

    return RGBEncoderConfig(vcodec="h264", pix_fmt="yuv444p", crf=0)


def _write(task: Task, folder: Path, repo_id: str, episodes: int, seed: int, image_size: int) -> tuple[int, int]:
    """Create the dataset in ``folder`` and fill it; returns (attempts, frames)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    dataset = LeRobotDataset.create(repo_id=repo_id, fps=FPS, features=features(image_size), root=folder,
                                    robot_type=ROBOT_TYPE, use_videos=True, video_backend="pyav",
                                    rgb_encoder=_encoder())
    attempts = successes = frames = 0
    with ffmpeg_quiet(), SimEnv(task, image_size=image_size) as env:  # LeRobot encodes in a thread
        while successes < episodes:
            if attempts >= MAX_ATTEMPTS_FACTOR * episodes:
                raise RuntimeError(f"sim task {task.name}: the expert failed {attempts - successes} of {attempts}")
            demo, ok = demonstrate(env, seed + attempts, PERTURB_DEG)
            attempts += 1
            if ok:
                for frame in demo:
                    dataset.add_frame({**frame, "task": task.instruction})
                # in-process encoding: forking this large process per episode costs more than
                # encoding two small videos
                dataset.save_episode(parallel_encoding=False)
                successes += 1
                frames += len(demo)
        dataset.finalize()  # inside: LeRobot's encoder thread closes its files here
    return attempts, frames


def expert_success_rate(task_name: str, episodes: int = 50, seed: int = 0) -> float:
    """Share of ``episodes`` seeded expert episodes that succeed, simulated without rendering."""
    with SimEnv(task_name, render=False) as env:
        return float(np.mean([demonstrate(env, seed + i)[1] for i in range(episodes)]))
