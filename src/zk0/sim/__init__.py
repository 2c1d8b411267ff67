"""MuJoCo simulation of the SO-101 arm: tasks, a scripted expert, a recorder and rollouts.

``MUJOCO_GL`` defaults to ``egl`` here, before anything imports mujoco: EGL renders headless
(Mesa llvmpipe on CPU-only machines), where GLFW would need a display.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

from zk0.sim.env import SimEnv  # noqa: E402
from zk0.sim.expert import Expert, expert_policy  # noqa: E402
from zk0.sim.record import RecordReport, expert_success_rate, features, record  # noqa: E402,F401
from zk0.sim.rollout import RolloutResult, lerobot_observation, rollout, write_mp4  # noqa: E402
from zk0.sim.scene import CLIENT_TASKS, TASKS, UNSEEN_TASKS, Task, get_task  # noqa: E402
from zk0.so101 import CAMERAS  # noqa: E402

__all__ = [
    "CAMERAS", "CLIENT_TASKS", "TASKS", "UNSEEN_TASKS", "Expert", "RecordReport", "RolloutResult", "SimEnv", "Task",
    "expert_policy", "expert_success_rate", "features", "get_task", "lerobot_observation", "record",
    "rollout", "write_mp4",
]
