"""Wall time of a deployed round: a new ClientApp process per message vs resident zk0 workers.

Starts a loopback, insecure SuperLink and two SuperNodes with zk0's own deployment code
(:mod:`zk0.deploy`, as `zk0 server/client start` do), first in Flower's default
``--isolation subprocess`` (a ``flwr-clientapp`` process per message, which imports torch
and LeRobot and rebuilds the policy and dataset every time: "before"), then in
``--isolation process`` with one ``python -m zk0.deploy.resident`` worker per SuperNode ("after"),
submits the same run with ``flwr run`` and reads each round's wall time from the run
folder's ``metrics.jsonl``. Round 1 can include start-up, so rounds 2+ are compared
(median). Peak RSS is sampled per node (SuperNode, its ClientApp processes, its worker).
It also times one cold start in a fresh process: import + policy + dataset, the cost every
message pays in "before".

Mode ``direct`` is ``after`` with the SuperNodes dialling the SuperLink's loopback port instead of
:mod:`zk0.deploy.fleet_proxy` (which ``zk0 server start`` puts in front of it): ``after`` / ``direct`` is the
proxy's cost per round.

Run: ``HF_HUB_OFFLINE=1 python bench/deploy_round.py [--models tiny smolvla-size] [--modes after direct]``.
The last line holds every number as ``key=value``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

try:
    from zk0.deploy import commands, node_folder, processes, server_folder
except ImportError:  # package not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from zk0.deploy import commands, node_folder, processes, server_folder
from zk0.tracking import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
DATASETS = ["embedded:red-pick", "embedded:blue-pick-small"]
# Per model: the run config (bounded CPU time for the 450M-parameter model on a laptop).
RUN_CONFIGS = {
    "tiny": "model-name='tiny' local-steps=2 batch-size=4 eval-batches=1",
    "smolvla-size": "model-name='smolvla-size' local-steps=1 batch-size=1 eval-batches=1",
}


class RssSampler(threading.Thread):
    """Peak summed RSS of each group of process groups (a node: its SuperNode and its worker)."""

    def __init__(self, groups: list[set[int]], interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.groups, self.interval = groups, interval
        self.peaks = [0] * len(groups)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            totals = [0] * len(self.groups)
            for proc in psutil.process_iter(["pid", "memory_info"]):
                with contextlib.suppress(ProcessLookupError, psutil.Error):
                    pgid = os.getpgid(proc.info["pid"])
                    for i, group in enumerate(self.groups):
                        if pgid in group and proc.info["memory_info"] is not None:
                            totals[i] += proc.info["memory_info"].rss
            self.peaks = [max(p, t) for p, t in zip(self.peaks, totals)]


class Federation:
    """A loopback insecure SuperLink, its Fleet proxy and SuperNodes started the way `zk0 server/client start`
    start them (with one resident worker each when ``resident``; dialling the SuperLink itself, past the
    proxy, unless ``proxied``), each process tracked by its PID file."""

    def __init__(self, folder: Path, resident: bool, proxied: bool = True, nodes: int = 2) -> None:
        self.folder, self.resident, self.proxied, self.nodes = folder, resident, proxied, nodes
        self.names: list[tuple[Path, str]] = []
        self.node_groups: list[set[int]] = []

    def _start(self, folder: Path, name: str, cmd: list[str]) -> int:
        pid = processes.start(folder, name, cmd, {**commands.flower_env(folder / "flwr"), "HF_HUB_OFFLINE": "1"})
        self.names.append((folder, name))
        return pid

    def __enter__(self) -> Federation:
        try:
            self._start_all()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start_all(self) -> None:
        server = self.folder / "server"
        settings = server_folder.init_server(server, [], "127.0.0.1", processes.free_port(),
                                             control_port=processes.free_port())
        server_folder.write_connection(server / "flwr", server_folder.control_address(settings), None)
        self._start(server, "superlink", commands.superlink_command(server, insecure=True))
        processes.wait_listening(server, "superlink", "127.0.0.1", settings.control_port, timeout=60)
        self._start(server, "fleet-proxy", commands.fleet_proxy_command(server, insecure=True))
        processes.wait_listening(server, "fleet-proxy", "127.0.0.1", settings.port, timeout=60)
        port = settings.port if self.proxied else settings.control_port
        for i in range(self.nodes):
            node, appio = self.folder / f"node{i}", processes.free_port()
            node.mkdir()
            secret = node_folder.runtime_secret(node) if self.resident else None
            pid = self._start(node, "supernode", commands.supernode_command(
                f"127.0.0.1:{port}", DATASETS[i % len(DATASETS)], None, None, appio, secret))
            group = {pid}
            if secret:
                processes.wait_listening(node, "supernode", "127.0.0.1", appio, timeout=60)
                group.add(self._start(node, "clientapp", commands.resident_command(appio, pid, secret)))
            self.node_groups.append(group)

    def __exit__(self, *_exc: object) -> None:
        for folder, name in reversed(self.names):
            processes.stop(folder, name)

    def flwr(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this SuperLink (connection ``zk0``)."""
        env = commands.flower_env(self.folder / "server" / "flwr")
        return subprocess.run([str(commands.BIN / "flwr"), *args], env=env, timeout=timeout, capture_output=True,
                              text=True)

    def run(self, run_config: str, timeout: float) -> Path:
        """Submit the zk0 app, wait for it, check it completed, and return its run folder."""
        out = self.folder / "outputs"
        streamed = self.flwr("run", str(ROOT), server_folder.CONNECTION, "--stream", "--run-config",
                             f"{run_config} output-dir='{out}'", timeout=timeout)
        (self.folder / "flwr-run.log").write_text(streamed.stdout + streamed.stderr)
        # `flwr run --stream` exits 0 even when the run failed: ask the SuperLink.
        runs = json.loads(self.flwr("ls", server_folder.CONNECTION, "--format", "json", timeout=60).stdout)["runs"]
        if [r["status"] for r in runs] != ["finished:completed"]:
            raise RuntimeError(f"run did not complete: {runs}; see {self.folder}")
        (run_dir,) = out.iterdir()
        return run_dir


def round_seconds(run_dir: Path) -> dict[int, float]:
    """Wall seconds of each round, as the ServerApp logged them."""
    return {r["round"]: r["seconds"] for r in read_metrics(run_dir / "metrics.jsonl")
            if r["source"] == "server" and r.get("event") == "round"}


def measure_deployment(model: str, mode: str, rounds: int, timeout: float) -> dict[str, float]:
    """Run ``rounds`` rounds of ``model`` in one deployment; rounds 2+ median, whole run, peak node RSS."""
    resident, proxied = mode != "before", mode != "direct"
    with (tempfile.TemporaryDirectory(prefix="zk0-bench-deploy-") as tmp,
          Federation(Path(tmp), resident, proxied) as fed):
        sampler = RssSampler(fed.node_groups)
        sampler.start()
        start = time.monotonic()
        run_dir = fed.run(f"{RUN_CONFIGS[model]} num-server-rounds={rounds}", timeout)
        run_s = time.monotonic() - start
        sampler.done.set()
        seconds = round_seconds(run_dir)
    print(f"{model} {mode}: seconds per round {seconds}, run {run_s:.1f}s, "
          f"peak node RSS {[round(p / MIB) for p in sampler.peaks]} MiB", flush=True)
    return {"round_s": statistics.median(s for r, s in seconds.items() if r >= 2), "run_s": run_s,
            "peak_rss_mib": max(sampler.peaks) / MIB}


def cold_start(model: str) -> dict[str, float]:
    """What one ClientApp process pays before its first message: imports, then policy and dataset."""
    start = time.monotonic()
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir

    from zk0 import client_app

    imported = time.monotonic()
    run_config = get_fused_config_from_dir(ROOT, {"model-name": model, "batch-size": 1})
    client_app.runtime(Context(run_id=1, node_id=1, node_config={"dataset": DATASETS[0]}, state=RecordDict(),
                               run_config=run_config))
    return {"import_s": imported - start, "build_s": time.monotonic() - imported}


def measure_cold_start(model: str) -> dict[str, float]:
    """:func:`cold_start` in a fresh interpreter, as a SuperExec-launched ClientApp would be."""
    out = subprocess.run([sys.executable, __file__, "--cold-start", model], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(results: dict[str, dict[str, float]]) -> Iterator[str]:
    """``key=value`` pairs of every model measured, speedups included."""
    for model, r in results.items():
        key = model.replace("-size", "")
        for name, value in r.items():
            yield f"{key}_{name}={value:.2f}"
        if "round_s_before" in r and "round_s_after" in r:
            yield f"speedup_{key}={r['round_s_before'] / r['round_s_after']:.2f}"
        if "round_s_direct" in r and "round_s_after" in r:
            yield f"proxy_overhead_{key}={r['round_s_after'] / r['round_s_direct']:.3f}"


def main() -> None:
    """Measure each model in both modes and print the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(RUN_CONFIGS), choices=list(RUN_CONFIGS))
    parser.add_argument("--modes", nargs="+", default=["before", "after"], choices=["before", "after", "direct"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--cold-start", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cold_start:
        with contextlib.redirect_stdout(sys.stderr):
            times = cold_start(args.cold_start)
        print(json.dumps(times))
        return
    results: dict[str, dict[str, float]] = {}
    for model in args.models:
        cold = measure_cold_start(model)
        results[model] = {"cold_import_s": cold["import_s"], "cold_build_s": cold["build_s"]}
        for mode in args.modes:
            for name, value in measure_deployment(model, mode, args.rounds, args.timeout).items():
                results[model][f"{name}_{mode}"] = value
    print(" ".join(report(results)))


if __name__ == "__main__":
    main()
