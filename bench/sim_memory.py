"""Memory per added virtual client in one simulation process, against one policy's size.

Flower's simulation runs many virtual clients in each Ray worker process, one message at a
time, and the ServerApp in another. This runs the unchanged ServerApp in its own process and the
unchanged ClientApp in a child process of its own that answers the server's messages one at a
time (as ``tests/inprocess.py`` does, across a pipe: what a Ray actor does, without Ray), for one
round of one training step, for 1..N clients, each count afresh, and reads the client process's
peak RSS. The slope over the client count is what each added virtual client costs; the replies
the server holds until it aggregates them are the server's, and do not count.

Run: ``HF_HUB_OFFLINE=1 python bench/sim_memory.py [--model smolvla-size] [--clients 4] [--transport-dtype int8]``.
The last line is ``rss_per_added_client_vs_policy=<ratio> ...`` (target <= 0.05).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import subprocess
import sys
import tempfile
from multiprocessing.connection import Connection
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_ID = 1


def serve_clients(conn: Connection, config: dict, clients: int) -> None:
    """The simulation process: answer each message with the ClientApp, one at a time; finally, its peak RSS."""
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
    import torch
    from inprocess import InProcessGrid

    from zk0 import client_app

    torch.set_num_threads(1)
    contexts = InProcessGrid(client_app.app, config, clients, run_id=RUN_ID).contexts
    while (msg := conn.recv()) is not None:
        try:
            conn.send(client_app.app(msg, contexts[msg.metadata.dst_node_id]))
        except Exception as err:  # the grid makes it an error reply, as the simulation runtime does
            conn.send(err)
    conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def one_count(model: str, clients: int, transport: str) -> dict:
    """A one-round federation of ``clients`` virtual clients sharing one process; its peak RSS and policy bytes."""
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
    import torch
    from flwr.app import Context, Message, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from inprocess import InProcessGrid

    from zk0 import server_app
    from zk0.config import RunConfig
    from zk0.policy import build_policy

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        config = get_fused_config_from_dir(ROOT, {
            "model-name": model, "num-server-rounds": 1, "local-steps": 1, "batch-size": 1, "eval-batches": 1,
            "min-train-nodes": 1, "min-evaluate-nodes": 1, "min-stats-clients": 1, "transport-dtype": transport,
            "output-dir": out, "checkpoint-interval": 100})
        spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no pages shared with this one
        conn, child_end = spawn.Pipe()
        process = spawn.Process(target=serve_clients, args=(child_end, config, clients), daemon=True)
        process.start()

        def remote(msg: Message, _: Context) -> Message:
            conn.send(msg)
            reply = conn.recv()
            if isinstance(reply, Exception):
                raise reply
            return reply

        grid = InProcessGrid(remote, config, clients, run_id=RUN_ID)
        server_app.app(grid, Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config=config))
        conn.send(None)
        peak_rss = conn.recv()
        process.join()
    policy = build_policy(RunConfig.from_run_config(config))
    policy_bytes = sum(t.numel() * t.element_size() for t in [*policy.parameters(), *policy.buffers()])
    return {"clients": clients, "peak_rss": peak_rss, "policy_bytes": policy_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smolvla-size")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--transport-dtype", default="bf16")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one count here
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_count(args.model, args.one, args.transport_dtype)))
        return
    results = []
    for clients in range(1, args.clients + 1):
        done = subprocess.run([sys.executable, __file__, "--model", args.model, "--one", str(clients),
                               "--transport-dtype", args.transport_dtype], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{clients} client(s) failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{clients} client(s): peak RSS {results[-1]['peak_rss'] / 2**30:.2f} GiB", flush=True)
    steps = [b["peak_rss"] - a["peak_rss"] for a, b in zip(results, results[1:])]
    per_client, policy = statistics.median(steps), results[0]["policy_bytes"]
    print(f"{args.model}, {args.transport_dtype}: one policy {policy / 2**30:.2f} GiB; per added client "
          f"{', '.join(f'{s / 2**20:.0f}' for s in steps)} MiB")
    print(f"rss_per_added_client_vs_policy={per_client / policy:.3f} per_added_client_mib={per_client / 2**20:.0f} "
          f"policy_mib={policy / 2**20:.0f}")


if __name__ == "__main__":
    main()
