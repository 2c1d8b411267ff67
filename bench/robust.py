"""A hostile client among 5: the global held-out MAE after N rounds with the mean and with each robust rule.

Five in-process clients (the unchanged ServerApp and ClientApp, as ``tests/inprocess.py`` runs
them): the 4 embedded client tasks, and an attacker (node 105) training on a second copy of
``red-pick`` (a registry file with 5 entries). The attacker trains honestly; its train reply is then
rewritten and sealed again, as a hostile ClientApp would seal its own update, so the server verifies
it like any other (the bench checks that every attacker update was accepted):

* ``sign-flip``: its update negated;
* ``scaled``: its update scaled to 0.99 x ``max-update-norm`` (the default bound, 1000);
* ``noise``: Gaussian noise of norm 0.99 x ``max-update-norm``, new every round;
* ``stale``: its round-1 update, sent again every round (sealed for the current round: a replayed
  reply is refused by its round).

Each attack runs with ``aggregation`` = mean, trimmed-mean (``trim-fraction=0.25``: 1 of 5 dropped at
each end), median and krum (``byzantine-clients=1``), and each rule also without an attack; ``clean``
is the mean without an attack. The MAE is the global model's action error on the 4 honest clients'
held-out episodes (their mean) after the last round; the attacker's own copy of ``red-pick`` is left
out so that task does not count twice. One seed; every run is deterministic.

Run: ``HF_HUB_OFFLINE=1 python bench/robust.py [--rounds 4]`` (20 runs of 4 rounds: 19 minutes on 2 cores
shared with other jobs).
It ends with one line per attack: ``attack=<name> mean=<mae> robust=<mae> clean=<mae>``, where
``robust`` is the best robust rule's MAE.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ATTACKER = 105
HONEST = (101, 102, 103, 104)
RULES = ("mean", "trimmed-mean", "median", "krum")
REGISTRY = """[bench]
clients = [
    { uri = "embedded:red-pick" },
    { uri = "embedded:blue-pick-small" },
    { uri = "embedded:green-place-left" },
    { uri = "embedded:yellow-place-right" },
    { uri = "embedded:red-pick" },
]
server-eval = [{ uri = "embedded:purple-place-center" }]
"""


def attacks(bound: float) -> dict[str, Callable]:
    """Each attack: ``(honest update, round, round-1 update) -> what the attacker sends``."""
    import torch

    def scaled_to(target: dict, norm: float) -> dict:
        total = sum(float(t.square().sum()) for t in target.values()) ** 0.5
        return {name: t * (norm / total) for name, t in target.items()}

    def noise(update: dict, server_round: int, first: dict) -> dict:
        gen = torch.Generator().manual_seed(server_round)
        return scaled_to({name: torch.randn(t.shape, generator=gen) for name, t in update.items()}, 0.99 * bound)

    return {"sign-flip": lambda update, server_round, first: {name: -t for name, t in update.items()},
            "scaled": lambda update, server_round, first: scaled_to(update, 0.99 * bound),
            "noise": noise,
            "stale": lambda update, server_round, first: first}


def hostile(attack: Callable | None):
    """Intercept: node 105's train reply carries ``attack``'s update, sealed again as its ClientApp seals."""
    from flwr.app import MessageType

    from zk0 import transport

    first: dict = {}

    def intercept(reply):
        if attack is None or reply.metadata.src_node_id != ATTACKER or reply.has_error() \
                or reply.metadata.message_type != MessageType.TRAIN:
            return reply
        payload = reply.content["payload"]
        dtype, server_round = str(payload["transport-dtype"]), int(payload["server-round"])
        update = transport.decode(reply.content["arrays"], dtype)
        first.setdefault("update", update)
        reply.content["arrays"] = transport.encode(attack(update, server_round, first["update"]), dtype)
        payload["payload-digest"] = transport.digest(reply.content["arrays"],
                                                     transport.binding(reply.metadata.run_id, server_round))
        return reply
    return intercept


def one_run(out: Path, registry: Path, rounds: int, rule: str, attack: Callable | None) -> tuple[float, float]:
    """One federation; the honest clients' mean held-out MAE before round 1 and after its last round."""
    from federation import run_federation
    from flwr.common.config import get_fused_config_from_dir

    from zk0.audit import read_audit
    from zk0.tracking import read_metrics

    config = get_fused_config_from_dir(ROOT, {
        "num-server-rounds": rounds, "eval-every": rounds, "checkpoint-interval": rounds,
        "registry": str(registry), "datasets": "bench", "min-train-nodes": 5, "aggregation": rule,
        "trim-fraction": 0.25, "byzantine-clients": 1, "output-dir": str(out / f"{rule}-{time.monotonic_ns()}")})
    run_dir, _ = run_federation(config, num_nodes=5, intercept=hostile(attack))
    refused = [a for a in read_audit(run_dir) if a["direction"] == "received" and a["status"] == "rejected"]
    if refused:
        raise SystemExit(f"bench invalid: the server refused {len(refused)} update(s): {refused[0]['reason']}")
    records = read_metrics(run_dir / "metrics.jsonl")
    return tuple(statistics.mean(r["eval-action-mae"] for r in records if r["round"] == server_round
                                 and r["source"] == "client-eval" and r["node"] in HONEST)
                 for server_round in (0, rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
    import torch
    from flwr.common.logger import console_handler

    from zk0.config import RunConfig

    torch.set_num_threads(1)
    console_handler.setLevel(logging.WARNING)  # each run's rounds stay in its zk0.log; the console gets one line a run
    bound = RunConfig().transport.max_update_norm
    results: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        registry = Path(tmp) / "registry.toml"
        registry.write_text(REGISTRY)
        for attack, rewrite in [("none", None), *attacks(bound).items()]:
            for rule in RULES:
                start = time.monotonic()
                untrained, results[attack, rule] = one_run(Path(tmp), registry, args.rounds, rule, rewrite)
                print(f"{attack:>9} {rule:>12}: MAE {results[attack, rule]:.4f} ({time.monotonic() - start:.0f}s)",
                      flush=True)
    print(f"\nHonest clients' held-out action MAE after {args.rounds} rounds (5 clients, 1 attacker, 1 seed; "
          f"untrained: {untrained:.4f}):")
    print("| attack | " + " | ".join(RULES) + " |\n|---|" + "---|" * len(RULES))
    for attack in ["none", *attacks(bound)]:
        print(f"| {attack} | " + " | ".join(f"{results[attack, rule]:.4f}" for rule in RULES) + " |")
    clean = results["none", "mean"]
    for attack in attacks(bound):
        best = min(results[attack, rule] for rule in RULES[1:])
        print(f"attack={attack} mean={results[attack, 'mean']:.4f} robust={best:.4f} clean={clean:.4f}")


if __name__ == "__main__":
    main()
