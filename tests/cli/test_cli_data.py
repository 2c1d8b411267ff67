"""`zk0 data generate|check`, `zk0 eval`, `zk0 baseline` and `zk0 compare` through the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST

from zk0.checkpoint import save_checkpoint
from zk0.config import RunConfig
from zk0.data import decode_stats, encode_stats, open_split, vector_stats
from zk0.policy import build_policy
from zk0.registry import DatasetEntry

ZK0 = str(Path(sys.executable).parent / "zk0")
pytestmark = pytest.mark.e2e  # each test records, trains or starts a zk0 process that takes seconds


def zk0(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([ZK0, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("generated")
    proc = zk0("data", "generate", "red-pick", "--episodes", "2", "--check-episodes", "5", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "red-pick" in proc.stdout and "expert success 100.0% (5 episodes)" in proc.stdout
    return out / "red-pick"


def test_generated_dataset_passes_the_check(recorded):
    proc = zk0("data", "check", f"local:{recorded}")
    assert proc.returncode == 0, proc.stdout
    assert "CLEAN" in proc.stdout and "so101_follower" in proc.stdout


def test_check_fails_on_a_leak_between_datasets(recorded, tmp_path):
    import shutil

    shutil.copytree(recorded, tmp_path / "copy")
    proc = zk0("data", "check", f"local:{recorded}", f"local:{tmp_path / 'copy'}")
    assert proc.returncode == 1 and "DUPLICATE" in proc.stdout


def test_generate_refuses_unknown_tasks():
    proc = zk0("data", "generate", "fold-laundry")
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: unknown simulator task(s) fold-laundry")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, recorded) -> Path:
    """An untrained tiny policy saved as a LeRobot checkpoint, normalised with the recording's stats."""
    cfg = RunConfig.flat(chunk_size=10)
    policy = build_policy(cfg)
    split = open_split(DatasetEntry(uri=f"local:{recorded}"), policy.config, 0.5, 0)
    stats = decode_stats(encode_stats(vector_stats(split.train)))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "round_0", policy, stats, "card")


def test_eval_sim_reports_success_per_task_and_writes_videos(checkpoint, tmp_path):
    proc = zk0("eval", str(checkpoint), "--sim", "--episodes", "1", "--task", "red-pick", "--output", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "red-pick" in proc.stdout and "success   0.0% of 1 episodes" in proc.stdout
    assert (tmp_path / "red-pick.mp4").stat().st_size > 0


def test_eval_offline_on_a_dataset(checkpoint, recorded):
    proc = zk0("eval", str(checkpoint), "--dataset", f"local:{recorded}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loss" in proc.stdout and "action MAE" in proc.stdout


def test_eval_needs_a_target_and_a_checkpoint(checkpoint, tmp_path):
    assert zk0("eval", str(checkpoint)).returncode == 1
    proc = zk0("eval", str(tmp_path), "--sim")
    assert proc.returncode == 1 and "no config.json" in proc.stderr


def test_baseline_and_compare_cli(tmp_path):
    overrides = " ".join(f"{k}={v}" for k, v in FAST.items())
    proc = zk0("baseline", "--mode", "centralized", "-n", "2", "-o", str(tmp_path / "runs"), "-c",
               f"num-server-rounds=1 {overrides}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "centralized" in run_dir.name
    proc = zk0("compare", str(run_dir), "--chart", str(tmp_path / "cmp.png"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "centralized" in proc.stdout and (tmp_path / "cmp.png").stat().st_size > 0
    assert zk0("baseline", "--mode", "federated").returncode == 1
