"""Closed-loop evaluation of a SmolVLA policy in the simulator: success rate per task, and videos.

Offline metrics (loss, action error) say how well a policy imitates recorded chunks; only a
closed-loop rollout says whether it finishes the task once its own errors compound. Every call
simulates the same seeded episodes (cube spawn and the flow-matching noise alike), so the
numbers of two federated rounds differ only because the weights do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from lerobot.configs.types import FeatureType
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from lerobot.processor import PolicyProcessorPipeline

from zk0.sim.expert import grasp_rotation, plan
from zk0.sim.rollout import Act, rollout, write_mp4
from zk0.sim.scene import TASKS, get_task, sample_spawn
from zk0.so101 import JOINTS

if TYPE_CHECKING:  # annotations only: importing the simulator loads no core config or registry
    from zk0.config import RunConfig
    from zk0.registry import DatasetEntry, Registry

STEP_SLACK = 1.5  # default episode budget: this many times the expert's plan length


def policy_act(policy: SmolVLAPolicy, preprocessor: PolicyProcessorPipeline, postprocessor: PolicyProcessorPipeline,
               task: str) -> Act:
    """One episode of ``policy`` as the ``act`` callable :func:`zk0.sim.rollout.rollout` expects.

    ``task`` is the instruction the policy is given (LeRobot's ``task``), replacing the
    observation's own so one may also probe paraphrases. The policy's action queue is cleared
    here, so build a new ``act`` per episode. The preprocessor adds the batch dimension,
    normalises the state, tokenises the instruction and moves tensors to the policy's device;
    SmolVLA itself resizes (with padding) the camera images to its VLM's size, so any sim
    image size works. The postprocessor un-normalises the action back to degrees.
    """
    policy.reset()

    def act(observation: dict) -> np.ndarray:
        batch = preprocessor({**observation, "task": task})
        action = postprocessor(policy.select_action(batch))
        return action.detach().to("cpu", torch.float32).numpy().reshape(len(JOINTS))

    return act


def default_max_steps(task_name: str) -> int:
    """A bit more than the scripted expert needs for this task (its plan length is spawn-independent)."""
    task = get_task(task_name)
    spawn = sample_spawn(task, 0)
    frames = sum(key.frames for key in plan(task, spawn, grasp_rotation(spawn)))
    return int(frames * STEP_SLACK)


def run_episodes(task_name: str, make_act: Callable[[int], Act], episodes: int, seed: int, image_size: int,
                 video: Path | None = None, max_steps: int | None = None) -> dict[str, float | int]:
    """Success rate and mean length of the episodes seeded ``seed .. seed+episodes-1``.

    ``make_act(s)`` gives the controller of the episode with seed ``s``. Torch's generator is
    seeded with ``s`` too (and restored after), so a stochastic policy replays identically.
    When ``video`` is given all episodes are written, one after the other, to that mp4.
    """
    if episodes < 1:
        raise ValueError(f"sim evaluation needs at least one episode, got {episodes}")
    steps_limit = max_steps or default_max_steps(task_name)
    results = []
    for s in range(seed, seed + episodes):
        with torch.random.fork_rng():
            torch.manual_seed(s)
            results.append(rollout(task_name, make_act(s), seed=s, max_steps=steps_limit, image_size=image_size,
                                   record_video=video is not None))
    if video is not None:
        write_mp4([frame for r in results for frame in r.frames], video)
    return {"success-rate": float(np.mean([r.success for r in results])), "episodes": episodes,
            "mean-steps": float(np.mean([r.steps for r in results]))}


def evaluate_in_sim(policy: SmolVLAPolicy, preprocessor: PolicyProcessorPipeline,
                    postprocessor: PolicyProcessorPipeline, tasks: list[str], episodes: int, seed: int, image_size: int,
                    video_dir: Path | None, max_steps: int | None = None) -> dict[str, dict]:
    """Roll ``policy`` out on ``episodes`` seeded episodes of each task; metrics by task name.

    Writes ``<video_dir>/<task>.mp4`` per task when ``video_dir`` is given. ``max_steps``
    defaults per task to :func:`default_max_steps`. The policy runs in eval mode without
    gradients and gets every module's previous train/eval mode back, because the server keeps
    training the very object it evaluates.
    """
    out = {}
    with _eval_mode(policy), torch.no_grad():
        for name in tasks:
            instruction = get_task(name).instruction
            video = Path(video_dir) / f"{name}.mp4" if video_dir is not None else None
            out[name] = run_episodes(name, lambda _: policy_act(policy, preprocessor, postprocessor, instruction),
                                     episodes, seed, image_size, video, max_steps)
    return out


def sim_tasks(entries: Iterable[DatasetEntry]) -> list[str]:
    """The simulator tasks among registry entries (embedded datasets named after a zk0.sim task), each once
    (two shards of a task are one task to roll out)."""
    return list(dict.fromkeys(e.target for e in entries if e.scheme == "embedded" and e.target in TASKS))


def simulator_tasks(cfg: RunConfig, registry: Registry) -> list[str]:
    """The tasks closed-loop evaluation rolls out: every simulator task of the registry profile
    (whichever clients take part), none unless ``sim-eval-every`` > 0."""
    from zk0.config import ConfigError  # here, not at import: the simulator loads no core config

    if not cfg.eval.sim_eval_every:
        return []
    if not (tasks := sim_tasks([*registry.clients, *registry.server_eval])):
        raise ConfigError(f"run-config sim-eval-every={cfg.eval.sim_eval_every} but dataset profile "
                          f"{cfg.data.datasets!r} "
                          "has no simulator tasks (embedded:<task>); set sim-eval-every=0")
    return tasks


def policy_image_size(policy: SmolVLAPolicy) -> int:
    """The camera resolution the policy was configured for, hence the one to render rollouts at."""
    visual = [f for f in policy.config.input_features.values() if f.type is FeatureType.VISUAL]
    return int(visual[0].shape[-1])


@contextmanager
def _eval_mode(policy: torch.nn.Module) -> Iterator[None]:
    """Eval mode inside; each module's own mode restored after (some stay frozen in eval while training)."""
    modes = [(module, module.training) for module in policy.modules()]
    policy.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
