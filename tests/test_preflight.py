"""Bad data is found before anything starts, and reported in one line within seconds.

Each case is a dataset a robot owner might really bring (or a registry file they might write);
`zk0 simulate` must refuse it with one line naming the dataset (and the camera and episode for
a video), before Ray starts and before any run folder exists.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import synthetic
import torch
from typer.testing import CliRunner
from waits import deadline

from zk0 import data
from zk0.cli.app import app
from zk0.data import DatasetError
from zk0.policy import tiny_config
from zk0.registry import DatasetEntry

EPISODES, FRAMES, SIZE = 3, 10, 32
# name -> (generate() keyword arguments, the message zk0 gives)
BAD = {
    "no-matching-camera": ({"cameras": ("top",)}, "no dataset camera feeds the policy"),
    "action-dim-7": ({"action_dim": 7}, "action has shape (7,), policy expects (6,)"),
    "fps-15": ({"fps": 15}, "fps is 15, policy expects 30"),
    "one-episode": ({"episodes": 1}, "has 1 episode; a client needs at least 2"),
    "broken-video": ({}, "camera 'observation.images.wrist' of episode "),
}
# the registry profiles below have two clients: below the default min-stats-clients (3), which zk0 simulate
# refuses before it checks any data
TWO_CLIENTS = "min-stats-clients=2"


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    roots = {"good": synthetic.generate(synthetic.TASKS["red-left"], folder / "good", EPISODES, FRAMES, SIZE, 0)}
    for name, (kwargs, _) in BAD.items():
        kwargs = {"episodes": EPISODES} | kwargs
        roots[name] = synthetic.generate(synthetic.TASKS["green-right"], folder / name, frames=FRAMES,
                                         image_size=SIZE, seed=1, **kwargs)
    video = roots["broken-video"] / "videos" / "observation.images.wrist" / "chunk-000" / "file-000.mp4"
    content = video.read_bytes()
    video.write_bytes(content[: len(content) // 2])  # a half-copied file
    registry = folder / "registry.toml"
    registry.write_text("".join(f'[{name}]\nclients = ["local:{roots[name]}", "local:{roots["good"]}"]\n\n'
                                for name in roots))
    return roots | {"registry": registry}


@pytest.mark.parametrize("name", BAD)
def test_preflight_names_what_is_wrong(datasets, name):
    with pytest.raises(DatasetError) as err:
        data.preflight(DatasetEntry(uri=f"local:{datasets[name]}"), tiny_config(10, "cpu"), training=True)
    assert BAD[name][1] in str(err.value) and "\n" not in str(err.value)


def test_preflight_passes_a_good_dataset_and_resolves_cameras(datasets):
    entry = DatasetEntry(uri=f"local:{datasets['good']}", camera_defaults={"observation.images.wrist": "nothing"})
    assert data.preflight(entry, tiny_config(10, "cpu"), training=True) == DatasetEntry(uri=entry.uri)


def test_an_evaluation_set_may_have_one_episode(datasets):
    data.preflight(DatasetEntry(uri=f"local:{datasets['one-episode']}"), tiny_config(10, "cpu"), training=False)


def simulate(*args: str, tmp_path: Path):
    """`zk0 simulate` in this process: what a user sees on stderr, and the exit code."""
    result = CliRunner().invoke(app, ["simulate", "--output", str(tmp_path / "outputs"), *args])
    return result.exit_code, result.stderr.strip().splitlines()


@pytest.mark.parametrize("name", BAD)
def test_zk0_simulate_refuses_bad_data_in_one_line(datasets, name, tmp_path):
    overrides = f"registry='{datasets['registry']}' datasets='{name}' {TWO_CLIENTS}"
    code, lines = simulate("-c", overrides, tmp_path=tmp_path)
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: dataset 'local:{datasets[name]}'") and BAD[name][1] in lines[0]
    assert not (tmp_path / "outputs").exists()  # nothing started, nothing written


@pytest.mark.parametrize("registry, message", [
    ("missing.toml", "missing.toml does not exist"),
    ("invalid.toml", "is not valid TOML"),
])
def test_zk0_simulate_refuses_a_bad_registry_file_in_one_line(tmp_path, registry, message):
    (tmp_path / "invalid.toml").write_text("[lab\n")
    code, lines = simulate("-c", f"registry='{tmp_path / registry}' datasets='lab'", tmp_path=tmp_path)
    assert code == 1 and len(lines) == 1 and message in lines[0], lines


@pytest.mark.parametrize("override, message", [
    ("num-server-round=2", "error: unknown run-config key 'num-server-round'; did you mean 'num-server-rounds'?"),
    ("local-steps=-1", "error: run-config 'local-steps' must be >= 1, got -1"),
])
def test_a_misspelt_key_or_bad_value_is_one_line_before_heavy_imports(tmp_path, override, message):
    """A fresh process: the line comes before torch, LeRobot or Ray are imported (fast on a quiet machine)."""
    code = ("import sys; from zk0.cli.app import app\ntry:\n    app(['simulate', '-c', sys.argv[1]])\n"
            "except SystemExit as e:\n    heavy = [m for m in ('torch', 'lerobot', 'ray') if m in sys.modules]\n"
            "    print('heavy:', heavy, 'exit:', e.code)")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code, override], capture_output=True, text=True, timeout=deadline(),
                          cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert proc.stderr.strip().splitlines() == [message]
    assert proc.stdout.split() == ["heavy:", "[]", "exit:", "1"]
    print(f"{override}: one line in {elapsed:.1f}s")


def test_broken_video_refused_by_the_real_command_within_seconds(datasets, tmp_path):
    start = time.monotonic()
    overrides = f"registry='{datasets['registry']}' datasets='broken-video' {TWO_CLIENTS}"
    proc = subprocess.run([shutil.which("zk0", path=str(Path(sys.executable).parent)), "simulate", "--output",
                           str(tmp_path), "-c", overrides],
                          capture_output=True, text=True, timeout=deadline())
    elapsed = time.monotonic() - start
    (line,) = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and BAD["broken-video"][1] in line
    print(f"broken video refused in {elapsed:.1f}s")


@pytest.mark.parametrize("override, message", [
    ("server-device=cuda", "error: run-config server-device='cuda' but no CUDA GPU is visible here"),
    ("device=cuda", "error: run-config device='cuda' but no CUDA GPU is visible here"),
])
def test_cuda_without_a_gpu_is_one_line(tmp_path, override, message):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, lines = simulate("-c", override, tmp_path=tmp_path)
    assert code == 1 and len(lines) == 1 and lines[0].startswith(message), lines
