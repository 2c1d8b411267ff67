"""A federated round's wall time against the clients' own compute, and what the rest is spent on.

Runs the unchanged ServerApp and ClientApp on the embedded default (``tiny``, 4 clients, 20
local steps, ``eval-every=1``) for ``--rounds`` rounds, each run in a fresh subprocess:

* ``in-train``: today's loop, each round's federated evaluation in the next round's train
  messages (``evaluate-first``; the model goes down once per round);
* ``separate``: every evaluation in messages of its own, as before (the same code with
  ``SmolVLAStrategy.evaluates_with_next_train`` off), for the bytes and overhead it cost;
* ``ray`` (``--ray``): ``zk0 simulate`` on Flower's simulation engine, in-train, each client
  reserving every core here (clients take turns, as in one process).

The first two call the apps in one process (``tests/inprocess.py``: no Ray, no network). A
round's wall time is the time between two consecutive round-end records of ``metrics.jsonl``;
in it, the clients trained (``train-seconds``, timed inside each client around training only)
and evaluated (``eval-seconds``) once each (in-train: the next round's training with this
round's evaluation), and (de)serialized (``codec-seconds``); the server's parts come from the
round records (``<part>-seconds``): sealing, send and wait, verify and aggregate, server
evaluation, checkpoint. Messaging is the send-and-wait time the clients did not spend, other
the wall time no part accounts for (the server state saved, logging). Charts are written once,
at the end of a run. Medians over rounds 2..N-2 (round 1 warms up; round N ends the run with
an evaluation of its own, which in-train round N-1's records would count).

Run: ``HF_HUB_OFFLINE=1 python bench/round_overhead.py [--rounds 7] [--ray]``. The last lines
are ``overhead=<round wall / clients' train + eval seconds>`` (in-train) and
``eval_in_train_bytes_vs_before=<bytes down of the run, in-train / separate>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"num-server-rounds": 7, "checkpoint-interval": 5, "eval-every": 1}  # otherwise the pyproject defaults
CLIENT = ("train", "eval", "codec")
SERVER = ("seal", "messaging", "aggregate", "server-eval", "sim-eval", "checkpoint", "other")


def in_process(mode: str, config: dict, out: str) -> dict:
    """In this process: one run of the embedded default with the apps called directly; its records' split."""
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
    import torch
    from federation import CLIENTS, run_federation
    from flwr.common.config import get_fused_config_from_dir

    from zk0 import server_app
    from zk0.strategy import SmolVLAStrategy

    torch.set_num_threads(1)
    if mode == "separate":
        SmolVLAStrategy.evaluates_with_next_train = lambda self, server_round: False
    charts = server_app.write_charts
    spent: list[float] = []

    def timed_charts(run_dir: Path) -> list[Path]:
        start = time.perf_counter()
        written = charts(run_dir)
        spent.append(time.perf_counter() - start)
        return written

    server_app.write_charts = timed_charts
    run_dir, _ = run_federation(get_fused_config_from_dir(ROOT, {**config, "output-dir": out}), num_nodes=CLIENTS)
    return split(run_dir, mode) | {"charts": sum(spent)}


def simulated(config: dict, out: str) -> dict:
    """One ``zk0 simulate`` run (Ray) of the same config; its records' split."""
    overrides = " ".join(f"{key}={value}" for key, value in config.items())
    cores = str(os.cpu_count() or 1)
    subprocess.run([sys.executable, "-m", "zk0", "simulate", "-c", overrides, "-o", out, "--client-cpus", cores],
                   check=True, capture_output=True, text=True)
    (run_dir,) = Path(out).iterdir()
    return split(run_dir, "in-train")


def split(run_dir: Path, mode: str) -> dict:
    """Per round 2..N-2: wall seconds and the seconds of each part (see the module docstring); bytes down."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ends = {r["round"]: r for r in records if r.get("event") == "round"}
    last = max(ends)
    rounds = []
    for r in range(2, last - 1):
        trained = r + 1 if mode == "in-train" else r  # whose training ran in round r's wall time
        exchanged = ends[trained]  # the round record whose send-and-wait that was
        clients = [x for x in records if (x["source"] == "client" and x["round"] == trained)
                   or (x["source"] == "client-eval" and x["round"] == r)]
        parts = {part: sum(x.get(f"{part}-seconds", 0.0) for x in clients) for part in CLIENT}
        parts |= {"seal": exchanged.get("seal-seconds", 0.0),
                  "messaging": exchanged.get("exchange-seconds", 0.0) - sum(parts.values()),
                  "aggregate": ends[r].get("aggregate-seconds", 0.0)}
        parts |= {part: ends[r].get(f"{part}-seconds", 0.0) for part in ("server-eval", "sim-eval", "checkpoint")}
        wall = ends[r]["time"] - ends[r - 1]["time"]
        parts["other"] = wall - sum(parts.values())
        rounds.append({"wall": wall, **parts})
    return {"rounds": rounds, "bytes-down": sum(end["bytes-down"] for end in ends.values()),
            "round-bytes-down": ends[2]["bytes-down"]}


def one(mode: str, rounds: int) -> dict:
    """``mode``'s run in a fresh process (nothing warm from another run)."""
    if mode == "ray":
        with tempfile.TemporaryDirectory() as out:
            return simulated({**CONFIG, "num-server-rounds": rounds}, out)
    result = subprocess.run([sys.executable, __file__, "--one", mode, "--rounds", str(rounds)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(mode: str, result: dict) -> float:
    """Print ``mode``'s median split per round; return its overhead (median of wall / train + eval)."""
    rounds = result["rounds"]
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    overhead = statistics.median(r["wall"] / (r["train"] + r["eval"]) for r in rounds)
    parts = " ".join(f"{key}={median[key]:.2f}s" for key in (*CLIENT, *SERVER))
    charts = f" charts(once, at the end)={result['charts']:.2f}s" if "charts" in result else ""
    print(f"{mode}: round wall {median['wall']:.2f}s = {parts};{charts} overhead {overhead:.3f}; "
          f"bytes down a round {result['round-bytes-down'] / 2**20:.2f} MiB, the run {result['bytes-down'] / 2**20:.2f} MiB",
          flush=True)
    return overhead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=CONFIG["num-server-rounds"])
    parser.add_argument("--ray", action="store_true", help="also one zk0 simulate (Ray) run, in-train")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one in-process run here, as JSON
    args = parser.parse_args()
    if args.rounds < 5:
        parser.error("--rounds must be >= 5: rounds 2..N-2 are measured")
    if args.one:
        with tempfile.TemporaryDirectory() as out:
            print(json.dumps(in_process(args.one, {**CONFIG, "num-server-rounds": args.rounds}, out)))
        return
    results = {mode: one(mode, args.rounds) for mode in ("in-train", "separate", *(("ray",) if args.ray else ()))}
    overheads = {mode: report(mode, result) for mode, result in results.items()}
    print(f"overhead={overheads['in-train']:.3f} overhead_before={overheads['separate']:.3f}"
          + (f" overhead_ray={overheads['ray']:.3f}" if "ray" in overheads else ""))
    print(f"eval_in_train_bytes_vs_before={results['in-train']['bytes-down'] / results['separate']['bytes-down']:.3f} "
          f"round_bytes_vs_before={results['in-train']['round-bytes-down'] / results['separate']['round-bytes-down']:.3f}")


if __name__ == "__main__":
    main()
