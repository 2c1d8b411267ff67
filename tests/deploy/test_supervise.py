"""The resident worker's supervisor: a killed worker comes back, a broken one is given up on, and the
supervisor never outlives its SuperNode."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from loopback import alive
from waits import deadline, wait_for

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def supervise(log: Path, parent: int, *options: str, cmd: list[str] = SLEEPER) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "zk0.deploy.supervise", "--parent-pid", str(parent), *options,
                             "--", *cmd],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def workers(log: Path) -> list[int]:
    return [int(pid) for pid in re.findall(r"started \(PID (\d+)\)", log.read_text())]


def test_a_killed_worker_is_restarted_and_sigterm_stops_both(tmp_path):
    log = tmp_path / "clientapp.log"
    supervisor = supervise(log, os.getpid())
    try:
        (first,) = wait_for(lambda: workers(log), "the first worker")
        os.kill(first, signal.SIGKILL)
        second = wait_for(lambda: workers(log)[1:], "a restarted worker")[0]
        assert second != first and alive(second)
        assert re.search(rf"python[\d.]* \(PID {first}\) was killed by SIGKILL after [\d.]+ s; restarting in 1 s",
                         log.read_text())
        supervisor.terminate()
        assert supervisor.wait(timeout=deadline(300)) == 0
        assert not alive(second), "zk0 client stop ends the worker with its supervisor"
    finally:
        supervisor.kill()


def test_a_worker_that_keeps_dying_is_given_up_with_one_line(tmp_path):
    log = tmp_path / "clientapp.log"
    supervisor = supervise(log, os.getpid(), "--max-backoff", "0.05", "--max-restarts", "2",
                           cmd=[sys.executable, "-c", "raise SystemExit(3)"])
    assert supervisor.wait(timeout=deadline(300)) == 1
    text = log.read_text()
    assert len(workers(log)) == 3 and text.count("exited with code 3") == 2
    assert re.search(r"python[\d.]* died 3 times within 120 s of starting; giving up", text)


def test_the_supervisor_ends_with_its_supernode(tmp_path):
    parent = subprocess.Popen(SLEEPER)
    log = tmp_path / "clientapp.log"
    supervisor = supervise(log, parent.pid)
    try:
        (worker,) = wait_for(lambda: workers(log), "the worker")
        parent.kill()
        parent.wait()
        assert supervisor.wait(timeout=deadline(300)) == 0
        assert not alive(worker) and "restarting" not in log.read_text()
    finally:
        supervisor.kill()
        parent.kill()


def test_only_the_listed_exit_codes_restart_and_another_ends_the_supervisor_with_it(tmp_path):
    """A SuperNode that lost its SuperLink (75) comes back; one the SuperLink refused does not."""
    log, flag = tmp_path / "supernode.log", tmp_path / "lost-once"
    child = ("import pathlib, sys; flag = pathlib.Path(sys.argv[1]); "
             "sys.exit(3) if flag.exists() else (flag.touch(), sys.exit(75))")
    supervisor = supervise(log, os.getpid(), "--restart-on", "75", cmd=[sys.executable, "-c", child, str(flag)])
    assert supervisor.wait(timeout=deadline(300)) == 3
    text = log.read_text()
    assert len(workers(log)) == 2 and "exited with code 75" in text and "restarting in 1 s" in text
    assert "exited with code 3: not restarted" in text
