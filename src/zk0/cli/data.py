"""``zk0 data generate|check`` and ``zk0 eval``: datasets in, policies measured."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from zk0.cli.common import fail, require_dataset_found, require_simulator_tasks

data_app = typer.Typer(no_args_is_help=True, help="Record simulator datasets and validate LeRobot datasets.")

MIN_EXPERT_SUCCESS = 0.95


def simulator_task_names(tasks: list[str] | None) -> list[str]:
    """The named simulator tasks (default: all client and unseen tasks); unknown names fail in one line."""
    from zk0 import sim

    require_simulator_tasks(tasks or [])
    return tasks or [*sim.CLIENT_TASKS, *sim.UNSEEN_TASKS]


@data_app.command("generate")
def generate(
    tasks: Annotated[list[str] | None, typer.Argument(
        help="Simulator tasks (default: all client and unseen tasks).")] = None,
    episodes: Annotated[int, typer.Option(min=1, help="Successful demonstrations to record per task.")] = 10,
    image_size: Annotated[int | None, typer.Option(help="Camera resolution (default: the tiny policy's).")] = None,
    output: Annotated[Path | None, typer.Option(
        help="Folder for <task>/ datasets (default: the embedded-dataset cache the demo reads).")] = None,
    check_episodes: Annotated[int, typer.Option(
        min=1, help="Seeded expert episodes that measure its success rate.")] = 50,
    force: Annotated[bool, typer.Option("--force", help="Re-record datasets that already exist.")] = False,
) -> None:
    """Record expert demonstrations in the MuJoCo SO-101 simulator as LeRobotDataset v3.0 folders.

    Before recording, the scripted expert runs ``--check-episodes`` seeded episodes per task
    without cameras; a task where it succeeds less than 95 % of the time is refused.
    Failed demonstrations are never recorded.
    """
    import shutil

    from zk0 import sim, tiny

    names = simulator_task_names(tasks)  # before LeRobot loads below: a misspelt task fails in seconds
    from zk0.logs import quiet_libraries
    from zk0.sim.embedded import EMBEDDED_EPISODES, embedded_root, embedded_seed

    quiet_libraries()
    size = image_size or tiny.IMAGE_SIZE
    if output is None and (size, episodes) != (tiny.IMAGE_SIZE, EMBEDDED_EPISODES):
        fail(f"the embedded cache holds {EMBEDDED_EPISODES} episodes at {tiny.IMAGE_SIZE}px (what the demo "
             "expects); pass --output for other sizes")
    started = time.monotonic()
    for name in names:
        rate = sim.expert_success_rate(name, check_episodes, seed=embedded_seed(name))
        if rate < MIN_EXPERT_SUCCESS:
            fail(f"task {name}: the scripted expert succeeds in {rate:.0%} of {check_episodes} episodes, "
                 f"below {MIN_EXPERT_SUCCESS:.0%}; its demonstrations would not teach the task")
        root = output / name if output else embedded_root(name)
        if (root / "meta" / "info.json").exists() and not force:
            typer.echo(f"{name:<22} expert success {rate:6.1%} ({check_episodes} episodes)  exists: {root}")
            continue
        shutil.rmtree(root, ignore_errors=True)
        report = sim.record(name, root, episodes, seed=embedded_seed(name), image_size=size)
        typer.echo(f"{name:<22} expert success {rate:6.1%} ({check_episodes} episodes)  recorded {report.successes}"
                   f" episodes / {report.frames} frames in {report.seconds:.0f}s: {root}")
    typer.echo(f"done in {time.monotonic() - started:.0f}s")


@data_app.command("check")
def check(uris: Annotated[list[str], typer.Argument(help="hf:user/name, local:/path or embedded:<task>.")]) -> None:
    """Validate datasets and look for episodes shared between them; exit status 1 on any issue."""
    for uri in uris:
        require_dataset_found(uri)
    from zk0.tools.datacheck import run_check

    lines, ok = run_check(uris)
    typer.echo("\n".join(lines))
    raise typer.Exit(0 if ok else 1)


def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint folder (checkpoints/round_N of a run).")],
    sim_: Annotated[bool, typer.Option("--sim", help="Closed loop in the simulator: success rate per task.")] = False,
    episodes: Annotated[int, typer.Option(help="Seeded simulator episodes per task.")] = 10,
    tasks: Annotated[list[str] | None, typer.Option("--task", help="Simulator task (repeat; default: all).")] = None,
    dataset: Annotated[list[str] | None, typer.Option(
        help="Without --sim: datasets to evaluate loss and action MAE on (repeat).")] = None,
    camera: Annotated[list[str] | None, typer.Option(
        help="With --dataset: feed a dataset camera to a policy camera, DATASET_KEY=POLICY_KEY (repeat).")] = None,
    output: Annotated[Path | None, typer.Option(help="Folder for the MP4s (default: CHECKPOINT/sim_eval).")] = None,
    seed: Annotated[int, typer.Option(help="First episode seed.")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Evaluate a checkpoint: closed loop in the simulator (--sim) or offline on datasets (--dataset)."""
    from zk0.registry import RegistryError, parse_camera_map

    if device not in ("cpu", "cuda"):
        fail(f"--device {device!r}: use cpu or cuda")
    if not sim_ and not dataset:
        fail("say what to evaluate on: --sim (simulator success rate) or --dataset URI (offline loss and MAE)")
    try:
        cameras = parse_camera_map(camera or [])
    except RegistryError as err:
        fail(f"--camera: {err}")
    if not (checkpoint / "config.json").is_file():  # before LeRobot loads to read it
        fail(f"{checkpoint} is not a checkpoint folder (no config.json there); pass a run's checkpoints/round_N")
    names = simulator_task_names(tasks) if sim_ else []
    for uri in dataset or []:
        require_dataset_found(uri)
    from zk0.checkpoint import CheckpointError, load_checkpoint

    try:
        policy, pre, post = load_checkpoint(checkpoint, device)
    except CheckpointError as err:
        fail(str(err))
    if sim_:
        _evaluate_in_sim(policy, pre, post, names, episodes, seed, output or checkpoint / "sim_eval")
    for uri in dataset or []:
        _evaluate_offline(policy, pre, post, uri, cameras, seed)


def _evaluate_in_sim(policy, pre, post, names: list[str], episodes: int, seed: int, videos: Path) -> None:
    from zk0 import sim
    from zk0.sim.policy_eval import evaluate_in_sim, policy_image_size

    results = evaluate_in_sim(policy, pre, post, names, episodes, seed, policy_image_size(policy), videos)
    for name, res in results.items():
        kind = "unseen" if name in sim.UNSEEN_TASKS else "client"
        typer.echo(f"{name:<22} {kind:<7} success {res['success-rate']:6.1%} of {res['episodes']} episodes "
                   f"(mean {res['mean-steps']:.0f} steps)  video {videos / name}.mp4")


def _evaluate_offline(policy, pre, post, uri: str, cameras: dict[str, str], seed: int) -> None:
    from zk0.data import DatasetError, eval_batches, open_full
    from zk0.evaluate import evaluate_policy
    from zk0.registry import DatasetEntry, RegistryError

    try:
        entry, dataset = open_full(DatasetEntry(uri=uri, cameras=cameras), policy.config)
    except (DatasetError, RegistryError) as err:
        fail(str(err))
    res = evaluate_policy(policy, pre, post, eval_batches(dataset, 8, 8, entry.cameras), seed=seed)
    typer.echo(f"{uri}: loss {res['loss']:.4f}  action MAE {res['action_mae']:.4f}  ({int(res['frames'])} frames)")
