"""`zk0 simulate` with real-size SmolVLA clients sharing one GPU: seconds per round and peak GPU memory.

Runs ``zk0 simulate`` exactly as a user would on a GPU machine: ``model-name=smolvla-size``
(smolvla_base's architecture, random init: the hub is not needed), chunk 50, two simulated
clients on the embedded datasets sharing one GPU (``--client-gpus 0.5``), the server's
evaluation on the same GPU (``server-device=cuda``). It polls ``nvidia-smi`` for the GPU's
peak memory while the run lasts and reads seconds per round from the run's metrics.jsonl.

Run on a CUDA machine: ``HF_HUB_OFFLINE=1 python bench/gpu_simulate.py [--rounds 2] [--clients 2]``.
The last line is ``seconds_per_round=<median> peak_gpu_mib=<MiB> ...``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def gpu_memory_mib() -> int:
    """Memory in use on GPU 0 (all processes: the server and every client actor)."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return int(out.split()[0])


def watch_peak(stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], gpu_memory_mib())
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    if shutil.which("nvidia-smi") is None:
        sys.exit("error: no nvidia-smi: this benchmark needs a CUDA GPU")
    zk0 = str(Path(sys.executable).parent / "zk0")
    out = Path(tempfile.mkdtemp(prefix="zk0-gpu-sim-"))
    overrides = (f"model-name=smolvla-size chunk-size=50 lr=1e-4 num-server-rounds={args.rounds} "
                 f"local-steps={args.local_steps} batch-size={args.batch_size} device=cuda server-device=cuda "
                 f"min-train-nodes={args.clients} min-evaluate-nodes={args.clients}")
    cmd = [zk0, "simulate", "-n", str(args.clients), "--client-cpus", "1", "--client-gpus", str(1 / args.clients),
           "--output", str(out), "-c", overrides]
    stop, peak = threading.Event(), [gpu_memory_mib()]
    idle = peak[0]
    watcher = threading.Thread(target=watch_peak, args=(stop, peak), daemon=True)
    watcher.start()
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - start
    stop.set()
    watcher.join()
    if proc.returncode:
        sys.exit(f"error: zk0 simulate failed:\n{proc.stderr[-3000:]}")
    (run_dir,) = out.iterdir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    rounds = [r["seconds"] for r in records if r.get("event") == "round" and r["round"] >= 1]
    steps = [r["steps"] for r in records if r["source"] == "client"]
    print(f"rounds {rounds} s, client steps {steps}, wall {wall:.0f} s, run folder {run_dir}")
    print(f"seconds_per_round={statistics.median(rounds):.1f} peak_gpu_mib={peak[0]} idle_gpu_mib={idle} "
          f"clients={args.clients} client_gpus={1 / args.clients:.2f} wall_s={wall:.0f}")


if __name__ == "__main__":
    main()
