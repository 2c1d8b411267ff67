"""Processes zk0 starts and stops: detached, logged, tracked by PID files, never found by name.

Every process runs in its own session with umask 077 (what it writes is the owner's alone); its
PID, program and start time go to ``pids/<name>.pid`` and its output to ``logs/<name>.log``
(appended across restarts; each launch records where its lines start), through ``python -m
zk0.logs``, which drops the colour codes Flower writes even into files. ``stop`` signals the whole
process group after checking the PID is still that very process (same start time, same program).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


class DeployError(RuntimeError):
    """A deployment step that cannot go on; the message names the file or process and the fix."""


def start(folder: Path, name: str, cmd: list[str], env: dict[str, str]) -> int:
    """Start ``cmd`` detached in its own session, logging to ``logs/<name>.log``; record ``pids/<name>.pid``."""
    if (pid := running_pid(folder, name)) is not None:
        raise DeployError(f"{name} already runs with PID {pid} (from {folder / 'pids' / name}.pid); "
                          f"stop it first")
    (folder / "pids").mkdir(parents=True, exist_ok=True)
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    log_path = folder / "logs" / f"{name}.log"
    offset = log_path.stat().st_size if log_path.exists() else 0  # this launch's lines start here
    with log_path.open("ab") as log:  # the writer ends when the process and every child it left have closed the pipe
        writer = subprocess.Popen([sys.executable, "-m", "zk0.logs"], stdin=subprocess.PIPE, stdout=log,
                                  stderr=log, start_new_session=True)
        proc = subprocess.Popen(cmd, env=env, cwd=folder, stdout=writer.stdin, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, umask=0o077)
        writer.stdin.close()
    program = cmd[2] if len(cmd) > 2 and cmd[1] == "-m" else Path(cmd[0]).name  # python -m zk0.deploy.resident
    record = {"pid": proc.pid, "program": program, "started": _start_time(proc.pid), "log-offset": offset,
              "log-writer": writer.pid}
    (folder / "pids" / f"{name}.pid").write_text(json.dumps(record) + "\n")
    deadline = time.monotonic() + 10
    while running_pid(folder, name) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # until the child has exec'd the program its PID file names
    return proc.pid


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot: a reused PID has another one."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _record(folder: Path, name: str) -> dict | None:
    path = folder / "pids" / f"{name}.pid"
    return json.loads(path.read_text()) if path.is_file() else None


def running_pid(folder: Path, name: str) -> int | None:
    """The PID recorded for ``name`` if that very process (same start time) still runs its program."""
    if (record := _record(folder, name)) is None:
        return None
    try:
        cmdline = Path(f"/proc/{record['pid']}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    same = _start_time(record["pid"]) == record["started"] and any(record["program"].encode() in part
                                                                    for part in cmdline)
    return record["pid"] if same else None


def stop(folder: Path, name: str, timeout: float = 30.0) -> bool:
    """SIGTERM the process group of ``name`` (SIGKILL after ``timeout``); False if nothing of it was running.

    The group goes too when its leader is already dead: a SuperLink killed with SIGKILL leaves its
    ``flwr-serverapp`` children running, orphaned, in the group it started.
    """
    pid = running_pid(folder, name)
    group = pid if pid is not None else orphaned_group(folder, name)
    (folder / "pids" / f"{name}.pid").unlink(missing_ok=True)
    if group is None:
        return False
    _signal_group(group, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_alive(group):
        _signal_group(group, signal.SIGKILL)
    return True


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def orphaned_group(folder: Path, name: str) -> int | None:
    """The process group ``name`` was started in, when its leader is gone but some of the group still runs."""
    record = _record(folder, name)
    if record is None or running_pid(folder, name) is not None or not _group_alive(record["pid"]):
        return None
    return record["pid"]


def _group_alive(group: int) -> bool:
    """Whether any process of the group still runs (zombies aside)."""
    try:
        os.waitpid(group, os.WNOHANG)  # reap the leader if it is our child
    except ChildProcessError:
        pass
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return False


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # started with start_new_session: its group id is its PID
    except ProcessLookupError:
        pass


def wait_listening(folder: Path, name: str, host: str, port: int, timeout: float) -> None:
    """Wait until ``host:port`` accepts connections; fail with the log's tail if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running_pid(folder, name) is None:
            raise exited_error(folder, name)
        if accepts(host, port):
            return
        time.sleep(0.3)
    raise DeployError(f"{name} did not listen on {host}:{port} within {timeout:.0f}s; see {folder / 'logs' / name}.log")


def accepts(host: str, port: int, timeout: float = 5.0) -> bool:
    """Whether ``host:port`` accepts a TCP connection now."""
    with socket.socket() as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


def exited_error(folder: Path, name: str) -> DeployError:
    """The error for a process that exited: the reasons its log gives (Flower's own error lines)."""
    writer, deadline = (_record(folder, name) or {}).get("log-writer"), time.monotonic() + 2
    while writer and alive(writer) and time.monotonic() < deadline:
        time.sleep(0.02)  # its last lines may still be on their way into the file
    lines = launch_log(folder, name).splitlines()
    reasons = [line for line in lines if re.search(r"ERROR|Error|Failed|SSL|code: ", line)] or lines[-10:]
    log = folder / "logs" / f"{name}.log"
    return DeployError(f"{name} was refused or failed (log {log}):\n" + "\n".join(reasons[-6:]))


def launch_log(folder: Path, name: str) -> str:
    """The log lines of the latest launch only (logs are appended across restarts)."""
    log = folder / "logs" / f"{name}.log"
    if not log.exists():
        return ""
    record = _record(folder, name) or {}
    with log.open("rb") as f:
        f.seek(record.get("log-offset", 0))
        return f.read().decode(errors="replace")


def free_port() -> int:
    """A free loopback port (for a SuperNode's local runtime API)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
