"""The SO-101 simulation environment at the dataset's 30 Hz control rate."""

from __future__ import annotations

import mujoco
import numpy as np

from zk0.sim.scene import FRONT_VIEW, PADS, SUBSTEPS, WRIST_CAMERA, Spawn, Task, build_model, get_task, sample_spawn
from zk0.so101 import CAMERAS, JOINTS

RESTING_SPEED = 0.05  # m/s: a placed cube slower than this counts as resting


class SimEnv:
    """SO-101 arm, one cube and (for place tasks) a target zone.

    Units: ``state`` and actions are the six joint angles in **degrees** (shoulder_pan,
    shoulder_lift, elbow_flex, wrist_flex, wrist_roll, gripper), i.e. the MuJoCo joint angles of
    the ``so101-nexus`` model converted from radians, the convention of its public ``*_deg``
    API. Actions are absolute joint targets for the position actuators, clipped to their range;
    the gripper opens with larger angles (about -10 closed to 100 open). One ``step`` advances
    1/30 s. With ``render=False`` observations carry only ``state`` (fast expert checks).
    """

    def __init__(self, task: Task | str, image_size: int = 96, render: bool = True) -> None:
        self.task = get_task(task)
        self.model = build_model(self.task)
        self.data = mujoco.MjData(self.model)
        self.spawn: Spawn | None = None
        self._qpos = np.array([self.model.joint(j).qposadr[0] for j in JOINTS])
        self._act = np.array([self.model.actuator(j).id for j in JOINTS])
        self._ctrl_range = self.model.actuator_ctrlrange[self._act]
        self._cube_qpos = self.model.joint("cube").qposadr[0]
        self._cube_dof = self.model.joint("cube").dofadr[0]
        self._cube_body = self.model.body("cube").id
        self._cube_geom = self.model.geom("cube").id
        self._pads = {self.model.geom(p).id for p in PADS}
        self._renderer = mujoco.Renderer(self.model, image_size, image_size) if render else None
        self._cameras = {"front": _front_camera(), "wrist": WRIST_CAMERA}

    def reset(self, seed: int) -> dict[str, np.ndarray]:
        """Start an episode from the seeded spawn: cube pose and jittered rest pose."""
        self.spawn = sample_spawn(self.task, seed)
        mujoco.mj_resetData(self.model, self.data)
        arm = np.radians(self.spawn.arm_deg)
        self.data.qpos[self._qpos] = arm
        self.data.ctrl[self._act] = arm
        x, y = self.spawn.cube_xy
        yaw = self.spawn.cube_yaw
        self.data.qpos[self._cube_qpos:self._cube_qpos + 7] = [
            x, y, self.task.cube_half, np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)]
        mujoco.mj_forward(self.model, self.data)
        return self.observation()

    def step(self, action: np.ndarray) -> dict[str, np.ndarray]:
        """Apply six absolute joint targets (degrees) and advance one control period."""
        target = np.radians(np.asarray(action, dtype=np.float64).reshape(len(JOINTS)))
        self.data.ctrl[self._act] = np.clip(target, self._ctrl_range[:, 0], self._ctrl_range[:, 1])
        mujoco.mj_step(self.model, self.data, nstep=SUBSTEPS)
        return self.observation()

    def state(self) -> np.ndarray:
        """Joint positions in degrees, float32, in ``JOINTS`` order."""
        return np.degrees(self.data.qpos[self._qpos]).astype(np.float32)

    def observation(self) -> dict[str, np.ndarray]:
        """``state`` plus, when rendering, ``front`` and ``wrist`` HxWx3 uint8 images."""
        obs = {"state": self.state()}
        if self._renderer is not None:
            for name in CAMERAS:
                self._renderer.update_scene(self.data, camera=self._cameras[name])
                obs[name] = self._renderer.render()
        return obs

    def cube_position(self) -> np.ndarray:
        """Cube centre in world coordinates (m)."""
        return self.data.xpos[self._cube_body].copy()

    def success(self) -> bool:
        """Pick: cube lifted ``lift_height`` above its start; place: resting in the zone, released."""
        pos = self.cube_position()
        if self.task.kind == "pick":
            return bool(pos[2] >= self.task.cube_half + self.task.lift_height)
        inside = np.all(np.abs(pos[:2] - np.asarray(self.task.target)) <= self.task.target_half)
        speed = np.linalg.norm(self.data.qvel[self._cube_dof:self._cube_dof + 3])
        resting = pos[2] < self.task.cube_half + 0.003 and speed < RESTING_SPEED
        return bool(inside and resting and not self._held())

    def _held(self) -> bool:
        """Whether a finger pad touches the cube."""
        for contact in self.data.contact[:self.data.ncon]:
            pair = {contact.geom1, contact.geom2}
            if self._cube_geom in pair and pair & self._pads:
                return True
        return False

    def close(self) -> None:
        """Free the renderer's GL context."""
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    def __enter__(self) -> SimEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _front_camera() -> mujoco.MjvCamera:
    """The fixed free camera looking at the workspace from the front."""
    camera = mujoco.MjvCamera()
    camera.type = mujoco.mjtCamera.mjCAMERA_FREE
    camera.lookat[:] = FRONT_VIEW["lookat"]
    camera.distance = FRONT_VIEW["distance"]
    camera.azimuth = FRONT_VIEW["azimuth"]
    camera.elevation = FRONT_VIEW["elevation"]
    return camera
