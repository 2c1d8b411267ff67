"""Federated against centralized and local-only training on the learning benchmark: closed-loop success and action error.

Every method trains the same policy (``model-name``, default ``tiny``) from the same initial weights on
the ``benchmark`` profile (100 expert demonstrations per client task, four non-IID client tasks, one
unseen task) with equal optimizer steps and samples: ``rounds`` x ``local-steps`` x clients in all.

* ``centralized``: one policy on the pooled demonstrations (``zk0 baseline --mode centralized``);
* ``local``: each client alone on its own (``zk0 baseline --mode local``); it is compared on the
  unseen task, where every local-only model is listed, not in the simulator;
* each federated setting of :data:`FEDERATED`: the unchanged ServerApp and ClientApp in one process
  (``tests/inprocess.py``), clients one after another.

Each run ends with the simulator's closed-loop success on the four client tasks (``sim-eval-episodes``
seeded episodes per task, the same seeds for every method), the held-out action MAE (the clients'
held-out episodes) and the unseen-task action MAE. Every number is a median over ``--seeds`` run seeds
with its spread (min-max). The recording of the benchmark's demonstrations (once, into the zk0 cache)
is not counted in the CPU time.

Run: ``HF_HUB_OFFLINE=1 python bench/learning.py [--seeds 42,43,44] [--methods centralized,fedprox,...]
[--readme]``. It ends with one line per method (``method=<name> success=<median> heldout_mae=<median>
unseen_mae=<median>``), then ``fed_vs_central_success=<ratio>`` and ``fed_vs_central_mae=<ratio>`` for the
best federated setting (highest median success, then lowest held-out MAE). ``--readme`` writes the table
into README.md between its ``learning-table`` markers. With ``--out``, a finished run there of the same
run config (:func:`finished_run`) is read instead of run again, so an interrupted benchmark, or one given
another seed or setting, reruns only what is missing (each run's CPU time is kept beside it, for the table).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zk0.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
FEDERATED = {  # name: run-config overrides of a federated setting
    "fedavg": {"strategy": "fedavg"},
    "fedprox": {"strategy": "fedprox", "proximal-mu": 0.01},
    "fedavgm": {"strategy": "fedavg", "server-optimizer": "fedavgm", "server-lr": 1.0, "server-momentum": 0.75,
                "num-server-rounds": 300},  # 20x the rounds, 1/20 of the local steps each: the clients drift apart less
}
FEDERATED["fedavgm-dataset"] = {**FEDERATED["fedavgm"], "aggregation-weight": "dataset"}  # weighted as pooled data
FEDERATED["fedsgd-adam"] = {  # one plain SGD step per client, Adam on the server: centralized Adam on their mean
    "strategy": "fedavg", "client-optimizer": "sgd", "local-steps": 1, "server-optimizer": "fedadam",
    "server-lr": 4e-3,  # the clients' mean is a batch 4x centralized's: 4x its lr (seed 42: 2e-3, 8e-3 did worse)
    "server-momentum": 0.9, "server-beta2": 0.95, "server-tau": 1e-11,  # the policy's AdamW betas; eps x lr
    "server-lr-follows-schedule": True}
FEDERATED["fedsgd-adam-dataset"] = {**FEDERATED["fedsgd-adam"], "aggregation-weight": "dataset"}  # pooled gradient
BASELINES = ("centralized", "local")
SHARED = {  # the benchmark's settings, shared by every method
    "datasets": "benchmark", "model-name": "tiny", "batch-size": 16, "lr": 1e-3, "lr-schedule": "cosine",
    "lr-min-factor": 0.05, "warmup-rounds": 1, "sim-eval-episodes": 10, "eval-batches": 8, "min-stats-clients": 3,
}
CPU_RECORD = "bench-cpu.json"  # written into each run folder the benchmark made: the run's CPU seconds
MARKERS = ("<!-- learning-table:start -->", "<!-- learning-table:end -->")


def settings(args: argparse.Namespace, seed: int, method: str = "") -> dict:
    """The run config of ``method`` for ``seed``: evaluated (and rolled out) at round 0 and after the last,
    every client of the profile training and evaluating in every round; ``--set`` wins over the method's own.

    A method with its own ``num-server-rounds`` trains ``--rounds`` x ``--local-steps`` steps per client in
    those rounds (more rounds, fewer local steps each), one with its own ``local-steps`` in as many rounds as
    they take, so every method's optimizer steps stay equal; the latter also warms up over as many of its steps
    as the baselines do (``fedsgd-adam``: 100 rounds of one step, as their one round of 100).
    """
    own, steps = FEDERATED.get(method, {}), args.rounds * args.local_steps
    if "local-steps" in own:  # fedsgd-adam, seeds 42 / 43: 0.475 / 0.55 success with 1 warm-up round, 0.55 / 0.625
        rounds = steps // own["local-steps"]
        own = {"warmup-rounds": SHARED["warmup-rounds"] * args.local_steps // own["local-steps"], **own}
    else:
        rounds = own.get("num-server-rounds", args.rounds)
    own = {"num-server-rounds": rounds, "local-steps": steps // rounds, **own, **json.loads(args.set)}
    rounds = own["num-server-rounds"]
    config = {**SHARED, "seed": seed, "eval-every": rounds, "sim-eval-every": rounds, "checkpoint-interval": rounds,
              "model-name": args.model, **own,
              **({"sim-eval-every": 0} if method == "local" else {})}  # 4 models x 4 tasks: not rolled out
    clients = num_clients(config)
    return {"min-train-nodes": clients, "min-evaluate-nodes": clients, **config}


def num_clients(config: dict) -> int:
    """How many clients the run config's dataset profile has (the federation's node count)."""
    from zk0.registry import load_registry

    return len(load_registry(config["datasets"], config.get("registry", "")).clients)


def run_method(method: str, config: dict, out: Path, run_federation: Callable) -> tuple[Path, bool]:
    """One run of ``method``: its run folder, and whether a finished run of the same config was reused.

    ``run_federation``: the tests' in-process federation (``tests/federation.py``). Its run folder is found by
    its config, not as the newest folder: two benchmarks (seeds in parallel) may share ``--out``.
    """
    from flwr.common.config import get_fused_config_from_dir

    from zk0.config import RunConfig

    fused = get_fused_config_from_dir(ROOT, {**config, "output-dir": str(out / method)})
    cfg = RunConfig.from_run_config(fused)
    if done := finished_run(out / method, cfg):
        return done, True
    if method in BASELINES:
        from zk0.tools.baseline import run_baseline

        return run_baseline(cfg, method), False
    run_federation(fused, num_nodes=num_clients(config))
    if done := finished_run(out / method, cfg):  # by its config: another benchmark may be writing beside it
        return done, False
    sys.exit(f"error: the {method} run in {out / method} stopped before its last round; its zk0.log says why")


def finished_run(folder: Path, cfg: RunConfig) -> Path | None:
    """The newest run in ``folder`` (a method's ``--out`` folder) made with exactly this run config and finished
    (its last round completed), so an interrupted or extended benchmark reruns only what is missing.

    The configs are compared as a resume compares them (:func:`zk0.checkpoint.changed_keys`): keys added since
    a run was made count as their defaults, and keys that change nothing computed (its output folder) not at all.
    """
    from zk0.checkpoint import changed_keys
    from zk0.tools.compare import CompareError, load_run

    for config in sorted(folder.glob("*/config.json"), reverse=True):
        if changed_keys(json.loads(config.read_text()).get("run-config", {}), cfg):
            continue
        try:
            if load_run(config.parent).last_round == cfg.federation.num_server_rounds:
                return config.parent
        except CompareError:  # stopped before round 0 was recorded
            continue
    return None


def outcome(run_dir: Path) -> dict[str, float | list[float]]:
    """Final round against round 0: client-task success, held-out and unseen MAE (local: every model's unseen MAE)."""
    from zk0.tools.compare import load_run

    run = load_run(run_dir)
    series, last = run.series(), run.last_round
    result = {"success": series.get("sim-clients", {}).get(last, float("nan")),
              "heldout_mae": series["held-out-mae"][last], "unseen_mae": series["unseen-mae"][last],
              "heldout_mae_round0": series["held-out-mae"][0], "unseen_mae_round0": series["unseen-mae"][0]}
    by_partition = [r for r in run.records if r["round"] == last and r.get("source") == "server"
                    and "by-partition" in r and "eval-action-mae" in r]
    if by_partition:
        result["unseen_mae_each"] = [p["eval-action-mae"] for p in by_partition[0]["by-partition"]]
    clients = len(json.loads((run_dir / "config.json").read_text())["datasets"]["clients"])
    traffic = sum(r.get("bytes-down", 0) + r.get("bytes-up", 0) for r in run.records if r.get("event") == "round")
    result["traffic_mib"] = traffic / 2**20 / clients  # a baseline's: 0
    return result


def cell(values: list[float], digits: int) -> str:
    """``median (min-max)`` of the seeds' values; just the value for one seed."""
    if any(v != v for v in values):
        return "—"
    mid, low, high = statistics.median(values), min(values), max(values)
    return f"{mid:.{digits}f}" if len(values) == 1 else f"{mid:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


def table(results: dict[str, list[dict]], args: argparse.Namespace, cpu: list[float | None]) -> list[str]:
    """The README's markdown table and the settings it was measured with; ``cpu``: each run's CPU seconds."""
    used = settings(args, 0)
    cpu_minutes = sum(c for c in cpu if c is not None) / 60
    unknown = sum(c is None for c in cpu)
    unrecorded = f" and {unknown} run{'s' if unknown > 1 else ''} of unrecorded CPU time" if unknown else ""
    clients = num_clients(used)
    lines = [f"Dataset profile `{used['datasets']}` ({clients} clients), model `{args.model}`, "
             f"{optimizer_steps(used)} optimizer steps of batch {used['batch-size']} per method "
             f"(rounds × local steps × {clients} clients), lr {used['lr']} {used['lr-schedule']}, "
             f"seeds {args.seeds}, "
             f"{used['sim-eval-episodes']} simulator episodes per task; medians (min–max); "
             f"{cpu_minutes:.0f} CPU-minutes in all{unrecorded} "
             f"(`python bench/learning.py"
             f"{' ' + ' '.join(args.argv) if args.argv else ''}`).", "",
             "| method | settings (rounds × local steps) | sim success (client tasks) | held-out MAE (°) "
             "| unseen MAE (°) | traffic per client (MiB) |", "|---|---|---|---|---|---|"]
    for method, runs in results.items():
        lines.append(f"| {method} | {describe(settings(args, 0, method), method)} | "
                     f"{cell([r['success'] for r in runs], 2)} | "
                     f"{cell([r['heldout_mae'] for r in runs], 2)} | {cell([r['unseen_mae'] for r in runs], 2)} | "
                     f"{cell([r['traffic_mib'] for r in runs], 0) if method in FEDERATED else '—'} |")
    return lines


def describe(config: dict, method: str) -> str:
    """A method's settings in a table cell: what it trains on, its strategy, server optimizer and weights, its
    rounds."""
    rounds = f"{config['num-server-rounds']} × {config['local-steps']}"
    if method in BASELINES:
        return f"{'pooled data' if method == 'centralized' else 'each client alone'}, {rounds}"
    parts = [config["strategy"]]
    if config["strategy"] == "fedprox" or config.get("adaptive-mu"):
        parts.append(f"mu {config['proximal-mu']}{' adaptive' if config.get('adaptive-mu') else ''}")
    if config.get("client-optimizer", "adamw") != "adamw":
        parts.append(f"clients {config['client-optimizer']}")
    if (server := config.get("server-optimizer", "none")) != "none":
        knobs = (f"momentum {config['server-momentum']}" if server == "fedavgm" else
                 f"betas {config['server-momentum']}/{config['server-beta2']} tau {config['server-tau']:g}")
        scheduled = " on the lr schedule" if config.get("server-lr-follows-schedule") else ""
        parts.append(f"server {server} lr {config['server-lr']:g}{scheduled} {knobs}")
    if config.get("aggregation-weight", "frames") != "frames":
        parts.append(f"weighted by {config['aggregation-weight']}")
    if config["warmup-rounds"] != SHARED["warmup-rounds"]:
        parts.append(f"warm-up {config['warmup-rounds']} rounds")
    return f"{', '.join(parts)}, {rounds}"


def optimizer_steps(config: dict) -> int:
    """Optimizer steps of a run of ``config``: rounds x local steps x clients (every method's must be equal)."""
    return config["num-server-rounds"] * config["local-steps"] * num_clients(config)


def write_readme(lines: list[str]) -> None:
    """Replace the README's table between the markers."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
    readme.write_text(text[:start] + "\n" + "\n".join(lines) + "\n" + text[end:])


def summary(results: dict[str, list[dict]]) -> list[str]:
    """One line per method, then the best federated setting against centralized."""
    out = []
    for method, runs in results.items():
        out.append(f"method={method} success={statistics.median(r['success'] for r in runs):.3f} "
                   f"heldout_mae={statistics.median(r['heldout_mae'] for r in runs):.3f} "
                   f"unseen_mae={statistics.median(r['unseen_mae'] for r in runs):.3f}")
    federated = {m: runs for m, runs in results.items() if m in FEDERATED}
    if "centralized" in results and federated:
        def key(method: str) -> tuple[float, float]:
            runs = federated[method]
            return (-statistics.median(r["success"] for r in runs), statistics.median(r["heldout_mae"] for r in runs))
        best = min(federated, key=key)
        central = results["centralized"]
        success = statistics.median(r["success"] for r in central)
        ratio = statistics.median(r["success"] for r in federated[best]) / success if success else float("nan")
        mae = (statistics.median(r["heldout_mae"] for r in federated[best])
               / statistics.median(r["heldout_mae"] for r in central))
        out.append(f"best_federated={best}")
        out.append(f"fed_never_worse_than_round0={all(never_worse(r) for r in federated[best])}")
        if "local" in results:
            out.append(f"fed_beats_every_local_on_unseen={beats_local(federated[best], results['local'])}")
        out.append(f"fed_vs_central_success={ratio:.3f}")
        out.append(f"fed_vs_central_mae={mae:.3f}")
    return out


def never_worse(run: dict) -> bool:
    """Whether a run ends at or below its round-0 action error, held-out and unseen."""
    return run["heldout_mae"] <= run["heldout_mae_round0"] and run["unseen_mae"] <= run["unseen_mae_round0"]


def beats_local(federated: list[dict], local: list[dict]) -> bool:
    """Whether, seed by seed, the federated model's unseen MAE is below every local-only model's."""
    return all(f["unseen_mae"] < min(loc["unseen_mae_each"]) for f, loc in zip(federated, local))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="42,43,44", help="run seeds, comma-separated")
    parser.add_argument("--methods", default=",".join([*BASELINES, *FEDERATED]))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--local-steps", type=int, default=100)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--set", default="{}", help="run-config overrides for every method, as JSON (they win)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, default=None,
                        help="keep the run folders here, and reuse the finished ones of the same config "
                             "(default: a temp folder)")
    parser.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    methods = args.methods.split(",")
    if unknown := [m for m in methods if m not in (*BASELINES, *FEDERATED)]:
        parser.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join([*BASELINES, *FEDERATED])}")
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
    steps = {m: optimizer_steps(settings(args, 0, m)) for m in methods}
    if len(set(steps.values())) > 1:
        parser.error(f"methods must train with equal optimizer steps (rounds x local steps x clients); got {steps}")
    import torch
    from federation import run_federation  # before the threads: the tests' conftest it imports sets one
    from flwr.common.logger import console_handler

    torch.set_num_threads(args.threads)
    console_handler.setLevel(logging.WARNING)  # each run's rounds go to its zk0.log; the console gets one line a run
    results: dict[str, list[dict]] = {m: [] for m in methods}
    cpu: list[float | None] = []  # each run's CPU seconds (None: a reused run that has no record of it)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        for seed in (int(s) for s in args.seeds.split(",")):
            for method in methods:
                start, cpu_start = time.monotonic(), _cpu_seconds()
                run_dir, reused = run_method(method, settings(args, seed, method), out / f"seed{seed}", run_federation)
                cpu.append(recorded_cpu(run_dir) if reused else record_cpu(run_dir, _cpu_seconds() - cpu_start))
                results[method].append(result := outcome(run_dir))
                took = f"reused {run_dir}" if reused else f"{time.monotonic() - start:.0f}s"
                print(f"seed {seed} {method}: {json.dumps(result)} ({took})", flush=True)
    lines = table(results, args, cpu)
    print("\n" + "\n".join(lines) + "\n")
    if args.readme:
        write_readme(lines)
    print("\n".join(summary(results)))


def record_cpu(run_dir: Path, seconds: float) -> float:
    """Keep a run's CPU seconds beside it, for a later invocation that reuses the run; return them."""
    (run_dir / CPU_RECORD).write_text(json.dumps({"cpu-seconds": seconds}))
    return seconds


def recorded_cpu(run_dir: Path) -> float | None:
    """A reused run's CPU seconds, or None where it has no record of them."""
    record = run_dir / CPU_RECORD
    return json.loads(record.read_text())["cpu-seconds"] if record.is_file() else None


def _cpu_seconds() -> float:
    """CPU seconds of this process and its children so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    main()
