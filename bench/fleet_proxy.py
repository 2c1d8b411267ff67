"""What the Fleet proxy costs per byte and per call: HTTPS to a stand-in SuperLink directly vs through
:mod:`zk0.deploy.fleet_proxy`, side by side on loopback, each server in its own process as in a deployment.

Three loads, each timed ``--repeats`` times (median): uploading ``--mib`` MiB (a node pushing its
update), downloading ``--mib`` MiB streamed in 1 MiB chunks (a node pulling the global model), and
200 small calls (heartbeats, pulls). The proxy's end-to-end cost on real rounds is measured by
``bench/deploy_round.py --modes after direct``.

Run: ``python bench/fleet_proxy.py [--mib 256] [--repeats 5]``. The last line holds every number.
"""

from __future__ import annotations

import argparse
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src")]
from proxyserve import Upstream, serve  # noqa: E402

from zk0.deploy import processes, server_folder  # noqa: E402


def timed(call, repeats: int) -> float:
    """Median wall seconds of ``call()`` over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def loads(client: httpx.Client, port: int, body: bytes) -> dict[str, callable]:
    url = f"https://127.0.0.1:{port}/v1/fleet"

    def upload() -> None:
        assert client.post(f"{url}/push-object", content=body).headers["x-size"] == str(len(body))

    def download() -> None:
        with client.stream("POST", f"{url}/pull-object", headers={"x-stream": str(len(body))}) as reply:
            assert sum(len(chunk) for chunk in reply.iter_raw()) == len(body)

    def small_calls() -> None:
        for _ in range(200):
            client.post(f"{url}/send-node-heartbeat", content=b"x" * 64)

    return {"upload": upload, "download": download, "small_calls": small_calls}


def serve_upstream(port: int, folder: Path) -> None:
    """The stand-in SuperLink, in this process until killed."""
    serve(Upstream(), port, folder)
    while True:
        time.sleep(3600)


def start_servers(folder: Path) -> tuple[int, int, list[subprocess.Popen]]:
    """The upstream and the proxy (as ``zk0 server start`` runs it), each its own process; their ports."""
    upstream, proxy = processes.free_port(), processes.free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "--serve-upstream", str(upstream), str(folder)]),
             subprocess.Popen([sys.executable, "-m", "zk0.deploy.fleet_proxy", "--host", "127.0.0.1",
                               "--port", str(proxy), "--upstream", f"https://127.0.0.1:{upstream}",
                               "--certfile", str(folder / "server.crt"), "--keyfile", str(folder / "server.key"),
                               "--cafile", str(folder / "ca.crt")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})]
    deadline = time.monotonic() + 300
    while not (processes.accepts("127.0.0.1", upstream) and processes.accepts("127.0.0.1", proxy)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a server did not start"
        time.sleep(0.1)
    return upstream, proxy, procs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--serve-upstream", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(int(args.serve_upstream[0]), Path(args.serve_upstream[1]))
    body = os.urandom(args.mib << 20)
    with tempfile.TemporaryDirectory(prefix="zk0-bench-proxy-") as tmp:
        folder = Path(tmp) / "server"
        server_folder.init_server(folder, [], "127.0.0.1", processes.free_port(), control_port=processes.free_port())
        upstream_port, proxy_port, procs = start_servers(folder)
        verify = ssl.create_default_context(cafile=folder / "ca.crt")
        results = {}
        try:
            with httpx.Client(verify=verify, timeout=600) as client:
                for route, port in (("direct", upstream_port), ("proxied", proxy_port)):
                    for load, call in loads(client, port, body).items():
                        results[f"{load}_s_{route}"] = timed(call, args.repeats)
        finally:
            for proc in procs:
                proc.kill()
    for load in ("upload", "download"):
        for route in ("direct", "proxied"):
            results[f"{load}_mib_s_{route}"] = args.mib / results[f"{load}_s_{route}"]
    ratios = {f"{load}_ratio": results[f"{load}_s_proxied"] / results[f"{load}_s_direct"]
              for load in ("upload", "download", "small_calls")}
    print(" ".join(f"{k}={v:.3f}" for k, v in {**results, **ratios}.items()))


if __name__ == "__main__":
    main()
