"""A loopback federation through the zk0 CLI for the deployment tests: a SuperLink (TLS and node
authentication) with three registered, named node keys and two SuperNodes online, one of them on a
dataset whose cameras are named otherwise. Every process binds 127.0.0.1 and is stopped through PID files.

Each test file that needs one starts its own (``pytest --dist loadfile`` then runs those files side by side).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import synthetic

from zk0.deploy import processes

ZK0 = str(Path(sys.executable).parent / "zk0")
# round-timeout: a generous deadline, not a guess (a loaded machine answers late); dead nodes are found by heartbeat
FAST = "local-steps=2 batch-size=4 eval-batches=1 round-timeout=300 min-stats-clients=2"
DATASETS = ["embedded:red-pick", "embedded:blue-pick-small", "embedded:green-place-left"]
NAMES = ["alice", "bob", "carol"]
RENAMED = "top-camera"  # node 1's dataset: cameras top and wrist; the policy's are front and wrist


def zk0(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([ZK0, *args], capture_output=True, text=True, timeout=timeout)
    assert not check or proc.returncode == 0, f"zk0 {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def child_pids(parent: int) -> list[int]:
    """PIDs of the live children of ``parent``."""
    return [int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat") if _stat(stat)[1:2] == [str(parent)]
            and _stat(stat)[0] != "Z"]


def _stat(path: Path) -> list[str]:
    """State, ppid, pgid, … of a /proc/PID/stat ([] once the process is gone)."""
    try:
        return path.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def alive(pid: int) -> bool:
    return _stat(Path(f"/proc/{pid}/stat"))[:1] not in ([], ["Z"])


class Federation:
    """A server folder and client folders under one temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root, self.server = root, root / "server"
        self.port = processes.free_port()
        self.clients: list[Path] = []

    def start_client(self, i: int, *extra: str, dataset: str = "", check: bool = True) -> subprocess.CompletedProcess:
        folder = self.root / f"node{i}"
        self.clients.append(folder)
        return zk0("client", "start", "-d", str(folder), "--server", f"127.0.0.1:{self.port}", "--ca",
                   str(self.server / "ca.crt"), "--dataset", dataset or DATASETS[i % len(DATASETS)], *extra,
                   check=check)

    def runs(self) -> list[Path]:
        return sorted((self.server / "runs").glob("*")) if (self.server / "runs").exists() else []

    def stop_all(self) -> None:
        for folder in self.clients:
            for name in ("clientapp", "supernode"):
                processes.stop(folder, name)
        processes.stop(self.server, "fleet-proxy")
        processes.stop(self.server, "superlink")


@contextmanager
def federation_up(root: Path) -> Iterator[Federation]:
    """SuperLink (TLS + node auth) with three named, registered keys; nodes 0 and 1 online, node 1 on a local
    dataset whose ``top`` camera feeds the policy's ``front`` through ``--camera``; all stopped on exit."""
    fed = Federation(root)
    renamed = synthetic.generate(synthetic.TASKS["blue-center"], fed.root / RENAMED, episodes=4, frames=20,
                                 image_size=64, seed=7, cameras=("top", "wrist"))
    try:
        zk0("server", "init", str(fed.server), "--port", str(fed.port), "--control-port", str(processes.free_port()))
        zk0("server", "start", "-d", str(fed.server))
        for i in range(3):
            zk0("client", "keygen", "-d", str(fed.root / f"node{i}"))
            zk0("server", "add-node", str(fed.root / f"node{i}" / "node_key.pub"), "-d", str(fed.server),
                "--name", NAMES[i])
        assert "serves" in fed.start_client(0).stdout
        started = fed.start_client(1, "--camera", "top=observation.images.front", dataset=f"local:{renamed}")
        assert "observation.images.top -> observation.images.front" in started.stdout
        yield fed
    finally:
        fed.stop_all()
