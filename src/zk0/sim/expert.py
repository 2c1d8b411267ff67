"""Scripted expert: top-down grasps through damped-least-squares IK on the gripper site.

The expert knows the episode's spawn (cube pose), not the simulator state: it is a plan of
Cartesian keyframes for the ``gripperframe`` site (hover, descend, close, lift and, for place
tasks, carry, lower, open, retreat), turned into joint targets one control step at a time. The
first segment moves in joint space from wherever the arm starts, because the rest pose is far
from any top-down pose and a straight Cartesian line from it would need an orientation sweep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mujoco
import numpy as np

from zk0.sim.scene import SITE, Spawn, Task, build_model, get_task, sample_spawn
from zk0.so101 import JOINTS

ARM = JOINTS[:-1]
GRIPPER_OPEN = 40.0  # degrees: about 7 cm between the pads
GRIPPER_CLOSED = -10.0  # the lower limit: the servo saturates and squeezes
HOVER = 0.06  # m above the grasp point
GAP = 0.012  # m between the static pad and the cube face before closing
SHOULDER_XY = np.array([0.0388, 0.0])  # pan axis: the arm plane goes through it
ROT_WEIGHT = 0.2  # m per rad in the IK error: position first, orientation close enough
DAMPING = 0.02
IK_ITERS = 10
REACH_FRAMES = 30


@dataclass(frozen=True)
class Keyframe:
    """Where the site should be (and the gripper angle) after ``frames`` control steps."""

    frames: int
    pos: np.ndarray
    gripper: float


def _min_jerk(s: float) -> float:
    """Smooth 0→1 profile: zero velocity and acceleration at both ends."""
    return s**3 * (10 - 15 * s + 6 * s * s)


def grasp_rotation(spawn: Spawn) -> np.ndarray:
    """Top-down site orientation whose jaws close across the cube face nearest the arm's plane.

    The site's z axis is the approach direction (down) and the jaws close along its −x axis;
    in the natural top-down pose x points back at the shoulder, so the cube face normal closest
    to that direction needs the least wrist roll.
    """
    inward = SHOULDER_XY - np.asarray(spawn.cube_xy)
    inward /= np.linalg.norm(inward)
    normals = [np.array([np.cos(a), np.sin(a), 0.0]) for a in spawn.cube_yaw + np.arange(4) * np.pi / 2]
    x = max(normals, key=lambda n: float(n[:2] @ inward))
    z = np.array([0.0, 0.0, -1.0])
    return np.column_stack([x, np.cross(z, x), z])


def plan(task: Task, spawn: Spawn, rotation: np.ndarray) -> list[Keyframe]:
    """Keyframes of the site; the first (hover) is reached in joint space."""
    offset = rotation[:, 0] * (task.cube_half + GAP)
    grasp = np.array([*spawn.cube_xy, task.cube_half]) + offset
    up = np.array([0.0, 0.0, 1.0])
    lift = grasp + up * (task.lift_height + 0.03)
    keys = [Keyframe(REACH_FRAMES, grasp + up * HOVER, GRIPPER_OPEN),
            Keyframe(18, grasp, GRIPPER_OPEN),
            Keyframe(10, grasp, GRIPPER_CLOSED),
            Keyframe(20, lift, GRIPPER_CLOSED)]
    if task.kind == "pick":
        return keys + [Keyframe(10, lift, GRIPPER_CLOSED)]
    place = np.array([*task.target, task.cube_half + 0.004]) + offset
    return keys + [Keyframe(30, place + up * (lift[2] - place[2]), GRIPPER_CLOSED),
                   Keyframe(18, place, GRIPPER_CLOSED),
                   Keyframe(8, place, GRIPPER_OPEN),
                   Keyframe(12, place + up * HOVER, GRIPPER_OPEN)]


class Ik:
    """Damped least squares on a private MjData: the site to a position and orientation."""

    def __init__(self, model: mujoco.MjModel) -> None:
        self.model = model
        self.data = mujoco.MjData(model)
        self.site = model.site(SITE).id
        self.qpos = np.array([model.joint(j).qposadr[0] for j in ARM])
        self.dofs = np.array([model.joint(j).dofadr[0] for j in ARM])
        self.low, self.high = model.jnt_range[[model.joint(j).id for j in ARM]].T

    def solve(self, q: np.ndarray, pos: np.ndarray, rotation: np.ndarray, iters: int = IK_ITERS) -> np.ndarray:
        """Arm joints (rad) near ``q`` that put the site at ``pos`` with ``rotation``."""
        target_quat = np.empty(4)
        mujoco.mju_mat2Quat(target_quat, rotation.ravel())
        jacp, jacr = np.empty((3, self.model.nv)), np.empty((3, self.model.nv))
        q = q.copy()
        for _ in range(iters):
            self.data.qpos[self.qpos] = q
            mujoco.mj_kinematics(self.model, self.data)
            mujoco.mj_comPos(self.model, self.data)
            mujoco.mj_jacSite(self.model, self.data, jacp, jacr, self.site)
            jac = np.vstack([jacp[:, self.dofs], ROT_WEIGHT * jacr[:, self.dofs]])
            err = np.concatenate([pos - self.data.site_xpos[self.site],
                                  ROT_WEIGHT * self._rotation_error(target_quat)])
            step = jac.T @ np.linalg.solve(jac @ jac.T + DAMPING**2 * np.eye(6), err)
            q = np.clip(q + step, self.low, self.high)
        return q

    def _rotation_error(self, target_quat: np.ndarray) -> np.ndarray:
        """World-frame rotation vector from the site's orientation to the target's."""
        current, inverse, diff, err = np.empty(4), np.empty(4), np.empty(4), np.empty(3)
        mujoco.mju_mat2Quat(current, self.data.site_xmat[self.site])
        mujoco.mju_negQuat(inverse, current)
        mujoco.mju_mulQuat(diff, target_quat, inverse)
        mujoco.mju_quat2Vel(err, diff, 1.0)
        return err


class Expert:
    """Six joint targets (degrees) per control step for one episode of ``task``.

    Call it with the current joint state (degrees); the first call fixes the start of the
    joint-space reach. ``done`` turns true when the plan is over; later calls hold the last target.
    """

    def __init__(self, model: mujoco.MjModel, task: Task, spawn: Spawn) -> None:
        self.ik = Ik(model)
        self.rotation = grasp_rotation(spawn)
        self.keys = plan(task, spawn, self.rotation)
        self.frames = sum(k.frames for k in self.keys)
        self.t = 0
        self._start: np.ndarray | None = None  # joint state (degrees) at the first call
        self._hover = self._q = np.zeros(len(ARM))  # IK solutions (rad)

    @property
    def approach_frames(self) -> int:
        """Control steps of the reach and the descent: until the jaws are at the grasp point, about to close."""
        return self.keys[0].frames + self.keys[1].frames

    @property
    def done(self) -> bool:
        """Whether every keyframe has been reached."""
        return self.t >= self.frames

    def __call__(self, state: np.ndarray) -> np.ndarray:
        """The next joint targets (degrees), given the current joint state (degrees)."""
        if self._start is None:
            self._start = np.asarray(state, dtype=np.float64).copy()
            self._hover = self._q = self.ik.solve(np.radians(self._start[:-1]), self.keys[0].pos,
                                                  self.rotation, iters=200)
        self.t = min(self.t + 1, self.frames)
        if self.t <= REACH_FRAMES:
            s = _min_jerk(self.t / REACH_FRAMES)
            start_arm = np.radians(self._start[:-1])
            arm = start_arm + s * (self._hover - start_arm)
            gripper = self._start[-1] + s * (GRIPPER_OPEN - self._start[-1])
        else:
            pos, gripper = self._cartesian(self.t - REACH_FRAMES)
            self._q = arm = self.ik.solve(self._q, pos, self.rotation)
        return np.append(np.degrees(arm), gripper).astype(np.float32)

    def _cartesian(self, t: int) -> tuple[np.ndarray, float]:
        """Site position and gripper angle ``t`` steps after the reach, min-jerk between keyframes."""
        prev = self.keys[0]
        for key in self.keys[1:]:
            if t <= key.frames:
                s = _min_jerk(t / key.frames)
                return prev.pos + s * (key.pos - prev.pos), prev.gripper + s * (key.gripper - prev.gripper)
            t -= key.frames
            prev = key
        return prev.pos, prev.gripper


def expert_policy(task: Task | str, seed: int) -> Callable[[dict], np.ndarray]:
    """The expert as a closed-loop ``act`` for :func:`zk0.sim.rollout.rollout` of the same seed.

    It reads only ``observation.state``; the cube pose comes from the seeded spawn, which the
    rollout's environment draws identically.
    """
    task = get_task(task)
    expert = Expert(build_model(task), task, sample_spawn(task, seed))
    return lambda obs: expert(np.asarray(obs["observation.state"]))
