"""Keep a node's processes alive: restart one when it dies, with a bounded backoff.

A SuperNode started with ``--isolation process`` never starts a ClientApp itself: if its worker
dies (killed, out of memory), the node stays "online" and answers every message with ``ClientApp
stopped responding`` until someone restarts it. And a SuperNode whose connection to the SuperLink
failed after it joined exits (:mod:`zk0.deploy.supernode`) and must be started again to rejoin.
``zk0 client start`` therefore runs both under this supervisor, the process their PID files name:
a child that dies while ``--parent-pid`` lives is started again after 1, 2, 4 … up to
``--max-backoff`` seconds (back to 1 once it has run ``--stable-after`` seconds), and
``--max-restarts`` quick deaths in a row end the supervisor with one line and exit code 1. With
``--restart-on CODE`` only those exit codes (and deaths by signal) restart it; any other code (0 too) ends
the supervisor with that code (a SuperNode refused by the SuperLink). SIGTERM (``zk0 client stop``)
stops the child and the supervisor.

Run: ``python -m zk0.deploy.supervise [--parent-pid PID] [--restart-on 75] -- COMMAND …``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger("zk0.deploy.supervise")  # its lines go to the log file zk0 gives the process


class Supervisor:
    """Runs ``cmd`` again whenever it exits, while ``parent_pid`` lives and no stop was asked."""

    def __init__(self, cmd: list[str], parent_pid: int | None, max_backoff: float, stable_after: float,
                 max_restarts: int, restart_on: frozenset[int] = frozenset()) -> None:
        self.cmd, self.parent_pid, self.restart_on = cmd, parent_pid, restart_on
        self.max_backoff, self.stable_after, self.max_restarts = max_backoff, stable_after, max_restarts
        self.stopping = threading.Event()
        self.child: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        """What the log calls the child: ``zk0.deploy.resident`` for ``python -m zk0.deploy.resident``."""
        return self.cmd[2] if self.cmd[1:2] == ["-m"] else os.path.basename(self.cmd[0])

    def stop(self, *_: object) -> None:
        """Ask the worker to stop and the loop to end (a signal handler)."""
        self.stopping.set()
        if self.child is not None and self.child.poll() is None:
            self.child.terminate()

    def parent_alive(self) -> bool:
        if self.parent_pid is None:
            return True
        try:
            os.kill(self.parent_pid, 0)
        except ProcessLookupError:
            return False
        return True

    def run(self) -> int:
        """Supervise until stopped (0), the parent is gone (0), too many quick deaths in a row (1), or an exit
        code ``restart_on`` excludes (that code)."""
        first = backoff = min(1.0, self.max_backoff)
        quick_deaths = 0
        while not self.stopping.is_set() and self.parent_alive():
            started = time.monotonic()
            self.child = subprocess.Popen(self.cmd)
            log.info(f"{self.name} started (PID {self.child.pid})")
            code = self._wait_child()
            lived = time.monotonic() - started
            if self.stopping.is_set() or not self.parent_alive():
                break
            if self.restart_on and code >= 0 and code not in self.restart_on:
                log.warning(f"{self.name} (PID {self.child.pid}) {describe_exit(code)}: not restarted")
                return code
            quick_deaths = 0 if lived >= self.stable_after else quick_deaths + 1
            backoff = first if lived >= self.stable_after else backoff
            if quick_deaths > self.max_restarts:
                log.warning(f"{self.name} died {quick_deaths} times within {self.stable_after:.0f} s of starting; "
                            f"giving up (see the lines above), restart with `zk0 client start`")
                return 1
            log.warning(f"{self.name} (PID {self.child.pid}) {describe_exit(code)} after {lived:.1f} s; restarting in "
                f"{backoff:g} s")
            self.stopping.wait(backoff)
            backoff = min(backoff * 2, self.max_backoff)
        self._end_child()
        return 0

    def _wait_child(self) -> int:
        """The child's exit code; gives up waiting (and ends it) once the parent is gone."""
        while True:
            try:
                return self.child.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                if not self.parent_alive():
                    self._end_child()
                    return self.child.returncode

    def _end_child(self, timeout: float = 20.0) -> None:
        if self.child is None or self.child.poll() is not None:
            return
        self.child.terminate()
        try:
            self.child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()


def describe_exit(code: int) -> str:
    """``exited with code 3`` or ``was killed by SIGKILL``."""
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m zk0.deploy.supervise", description=__doc__.split("\n")[0])
    parser.add_argument("--parent-pid", type=int, help="stop when this process (the SuperNode) exits")
    parser.add_argument("--max-backoff", type=float, default=60.0, help="longest wait before a restart (s)")
    parser.add_argument("--stable-after", type=float, default=120.0,
                        help="a worker that ran this long (s) died of something new: backoff starts over")
    parser.add_argument("--max-restarts", type=int, default=8, help="quick deaths in a row before giving up")
    parser.add_argument("--restart-on", type=int, action="append", default=[],
                        help="restart only on this exit code (repeat); other codes end the supervisor")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the child's command line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # into the process's log file
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("give the child's command after --")
    supervisor = Supervisor(cmd, args.parent_pid, args.max_backoff, args.stable_after, args.max_restarts,
                            frozenset(args.restart_on))
    signal.signal(signal.SIGTERM, supervisor.stop)
    signal.signal(signal.SIGINT, supervisor.stop)
    sys.exit(supervisor.run())


if __name__ == "__main__":
    main()
