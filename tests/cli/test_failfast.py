"""Bad input to any ``zk0`` command fails before torch, LeRobot, Flower's server or MuJoCo load.

Loading the training stack takes about ten seconds (minutes on a loaded machine); a misspelt key,
path or task must cost one. Each case runs the real CLI in a fresh interpreter and asserts on the
one-line error and on the modules that interpreter imported, never on wall time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from waits import deadline

HEAVY = ("torch", "lerobot", "mujoco", "flwr.server", "flwr.simulation", "ray", "datasets", "transformers")
SIMULATOR = ("mujoco",)  # naming a simulator task needs the task table, which lives beside the MuJoCo scenes
RUNNER = """\
import atexit, json, sys
atexit.register(lambda: print("LOADED " + json.dumps([m for m in {heavy!r} if m in sys.modules]), file=sys.stderr))
from zk0.cli.app import app
app(args=sys.argv[1:], prog_name="zk0")
"""


def zk0(*args: str) -> tuple[int, list[str], list[str]]:
    """Exit code, stderr lines a user sees, and the heavy modules the command imported."""
    proc = subprocess.run([sys.executable, "-c", RUNNER.format(heavy=HEAVY), *args], capture_output=True, text=True,
                          timeout=deadline())
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    loaded = [line for line in lines if line.startswith("LOADED ")]
    assert loaded, proc.stderr[-2000:]
    return proc.returncode, [line for line in lines if not line.startswith("LOADED ")], json.loads(loaded[-1][7:])


@pytest.fixture
def checkpoint_like(tmp_path) -> Path:
    """A folder that passes the cheap checkpoint check (config.json), so later arguments are checked."""
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    return tmp_path / "ckpt"


CASES = {
    "simulate-unknown-key": (["simulate", "-c", "no-such-key=1"], "error: unknown run-config key 'no-such-key'"),
    "simulate-bad-value": (["simulate", "-c", "lr=-1"], "error: run-config 'lr' must be >= 0"),
    "simulate-bad-profile": (["simulate", "-c", "datasets=nope"], "error: dataset profile 'nope' not in"),
    "simulate-too-many-clients": (["simulate", "-n", "99"], "error: --num-clients 99 exceeds the "),
    "simulate-too-few-clients": (["simulate", "-n", "1"], "error: --num-clients 1 is below min-train-nodes"),
    "simulate-client-cpus": (["simulate", "--client-cpus", "0"], "error: --client-cpus must be > 0"),
    "simulate-resume-nothing": (["simulate", "--resume", "{tmp}/none"], "error: --resume {tmp}/none: no readable"),
    "simulate-resume-from-nothing": (["simulate", "-c", "resume-from='{tmp}/none'"],
                                     "error: run-config resume-from='{tmp}/none': no such folder"),
    "simulate-model-folder": (["simulate", "-c", "model-name='{tmp}/none'"], "error: model folder '{tmp}/none' does"),
    "baseline-model-folder": (["baseline", "--mode", "local", "-c", "model-name='{tmp}/none'"],
                              "error: model folder '{tmp}/none' does not exist"),
    "baseline-mode": (["baseline", "--mode", "nope"], "error: --mode must be one of centralized|local"),
    "baseline-too-many-clients": (["baseline", "--mode", "local", "-n", "9"], "error: --num-clients 9 exceeds"),
    "push-nothing": (["push", "{tmp}/none", "--repo-id", "a/b"], "error: {tmp}/none has no checkpoint"),
    "report-nothing": (["report", "{tmp}/none"], "error: {tmp}/none is not a run folder"),
    "compare-nothing": (["compare", "{tmp}/none"], "error: {tmp}/none is not a zk0 run folder"),
    "eval-no-checkpoint": (["eval", "{tmp}/none", "--sim"], "error: {tmp}/none is not a checkpoint folder"),
    "eval-device": (["eval", "{ckpt}", "--sim", "--device", "tpu"], "error: --device 'tpu'"),
    "eval-missing-dataset": (["eval", "{ckpt}", "--dataset", "local:{tmp}/none"],
                             "error: dataset 'local:{tmp}/none': {tmp}/none is not a LeRobotDataset folder"),
    "data-check-missing": (["data", "check", "local:{tmp}/none"], "error: dataset 'local:{tmp}/none': "),
    "data-check-scheme": (["data", "check", "s3:bucket/x"], "error: dataset 's3:bucket/x': the scheme must be"),
    "client-missing-dataset": (["client", "start", "-d", "{tmp}/node", "--server", "127.0.0.1:1", "--insecure",
                                "--dataset", "local:{tmp}/none"], "error: --dataset 'local:{tmp}/none': {tmp}/none"),
    "server-start-nothing": (["server", "start", "-d", "{tmp}/none"], "error: {tmp}/none is not a zk0 server folder"),
    "run-nothing": (["run", "-d", "{tmp}/none"], "error: {tmp}/none is not a zk0 server folder"),
}
if not Path("/proc/driver/nvidia").exists():  # a machine without a GPU refuses cuda before importing torch
    CASES["simulate-cuda"] = (["simulate", "-c", "device='cuda'"], "error: run-config device='cuda' but no CUDA GPU")
TASK_CASES = {  # these may load MuJoCo (the task table), never torch or LeRobot
    "generate-task": (["data", "generate", "fold-laundry"], "error: unknown simulator task(s) fold-laundry"),
    "eval-task": (["eval", "{ckpt}", "--sim", "--task", "fold-laundry"], "error: unknown simulator task(s)"),
    "client-task": (["client", "start", "-d", "{tmp}/node", "--server", "127.0.0.1:1", "--insecure", "--dataset",
                     "embedded:fold-laundry"], "error: --dataset 'embedded:fold-laundry': unknown simulator task(s)"),
}


@pytest.mark.parametrize("case", [*CASES, *TASK_CASES])
def test_bad_input_fails_in_one_line_before_heavy_imports(case, tmp_path, checkpoint_like):
    args, expected = CASES.get(case) or TASK_CASES[case]
    fill = {"tmp": tmp_path, "ckpt": checkpoint_like}
    code, lines, loaded = zk0(*[arg.format(**fill) for arg in args])
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(expected.format(**fill)), lines
    allowed = SIMULATOR if case in TASK_CASES else ()
    assert not set(loaded) - set(allowed), f"imported {loaded} before refusing the input"
    assert not (tmp_path / "node").exists(), "nothing is written before the checks pass"


@pytest.mark.parametrize("args", [["--help"], ["server", "start", "--bogus"], ["client", "start"],
                                  ["server", "init", "{tmp}/srv", "--port", "99999"]],
                         ids=["help", "unknown-option", "missing-option", "port-range"])
def test_help_and_usage_errors_import_nothing_heavy(args, tmp_path):
    code, lines, loaded = zk0(*[arg.format(tmp=tmp_path) for arg in args])
    assert code == (0 if args == ["--help"] else 2), lines
    assert not loaded and not (tmp_path / "srv").exists()


def test_app_defaults_are_what_flower_fuses():
    """The CLI reads the defaults itself (Flower's reader imports its server); both must agree."""
    from flwr.common.config import get_fused_config_from_dir

    from zk0.cli.common import app_defaults

    assert app_defaults() == get_fused_config_from_dir(ROOT, {})
