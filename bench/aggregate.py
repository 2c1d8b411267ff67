"""The server's cost of a round's updates at smolvla_base size, next to one NumPy pass over the same values.

Four clients' updates of smolvla_base's 99.9M trainable parameters (its real shapes, from the
meta-device build of ``bench/transport.py``), sealed as clients seal them (bf16 by default,
``--dtype int8``), go through the server's own code on one thread:

* verify: what the server does as each reply arrives (``SmolVLAStrategy.verify_train``: one
  SHA-256 of the payload, its norm, which proves it finite), per update;
* aggregate: ``SmolVLAStrategy.aggregate_train`` over the four verified replies (the fp32 mean,
  weighted by ``num-examples``, accumulated in place from the payloads' bytes) and
  ``RoundState.apply`` (added to the fp32 global tensors);
* numpy pass: ``np.add`` of each update's values, already fp32, into one fp32 accumulator,
  tensor by tensor: the least any fp32 mean of these updates does.

Each is timed 5 times after one warm-up (the server's buffers are allocated in its first round),
aggregate and NumPy pass in turns, so both see the same machine load; medians are printed, the
last line is ``aggregate_vs_numpy_pass=<ratio>``, the median of the 5 paired ratios.
Run: ``HF_HUB_OFFLINE=1 python bench/aggregate.py [--dtype bf16|int8]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from transport import build_policy  # bench/transport.py: this script's folder is on sys.path

from zk0 import transport
from zk0.audit import AuditLog
from zk0.config import RunConfig
from zk0.flower_seams import set_reply_sender, set_task_identity
from zk0.rounds import RoundState
from zk0.strategy import SmolVLAStrategy

CLIENTS = 4
RUN_ID = 1  # the run the replies are bound to (set_task_identity below)
REPEATS = 5
WEIGHTS = (160, 120, 80, 40)  # num-examples of the four replies (at most local-steps x batch-size = 160)


def reply(wire: transport.Wire, node: int, update: dict[str, torch.Tensor], weight: int) -> Message:
    """A train reply from ``node`` as its ClientApp seals it."""
    arrays, seal = wire.seal(update, bound_to=transport.binding(RUN_ID, 1))
    payload = ConfigRecord({**seal, "partition-id": node, "dataset": f"client-{node}", "server-round": 1})
    message = Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": weight}),
                                  "payload": payload}), dst_node_id=1, message_type=MessageType.TRAIN)
    set_reply_sender(message, 100 + node)
    return message


def seconds(work: Callable[[], object]) -> float:
    """Wall time of one run of ``work``."""
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def paired(*works: Callable[[], object]) -> list[list[float]]:
    """Wall times of ``REPEATS`` runs of each of ``works``, run in turns after one warm-up run each."""
    for work in works:
        work()
    return [list(run) for run in zip(*[[seconds(work) for work in works] for _ in range(REPEATS)])]


def main() -> None:
    """Build the updates, time verify, aggregate and the NumPy pass, print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bf16", "int8"), default="bf16")
    dtype = parser.parse_args().dtype
    torch.set_num_threads(1)
    set_task_identity(1, RUN_ID, 1)
    shapes = {n: tuple(p.shape) for n, p in build_policy().named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(0)
    cfg = RunConfig.flat(transport_dtype=dtype, min_train_nodes=CLIENTS)
    with tempfile.TemporaryDirectory() as tmp:
        master = {n: torch.randn(s, generator=gen) * 0.02 for n, s in shapes.items()}
        state = RoundState(cfg, master, "{}", "base", AuditLog(Path(tmp)), lambda record: None, server_round=1)
        strategy = SmolVLAStrategy(cfg, state.wire, RUN_ID)
        replies = [reply(state.wire, i, {n: torch.randn(s, generator=gen) * 1e-4 for n, s in shapes.items()}, w)
                   for i, w in enumerate(WEIGHTS)]
        values = [{n: t.numpy() for n, t in transport.decode(r.content["arrays"], dtype).items()} for r in replies]
        verdicts = strategy.verify_train(1, replies)
        assert all(verdict.accepted for verdict in verdicts), [verdict.reason for verdict in verdicts]
        total = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
        verify, aggregate, numpy_pass = paired(lambda: strategy.verify_train(1, replies[:1]),
                                               lambda: state.apply(strategy.aggregate_train(1, verdicts)[0]),
                                               lambda: [np.add(total[n], update[n], out=total[n])
                                                        for update in values for n in shapes])
    size = sum(transport.nbytes(r.content["arrays"]) for r in replies) / 2**20
    print(f"{CLIENTS} updates of {sum(np.prod(s) for s in shapes.values()) / 1e6:.1f}M parameters in {dtype} "
          f"({size:.0f} MiB), one thread, medians of {REPEATS}:")
    print(f"verify_per_update_s={statistics.median(verify):.3f}")
    print(f"aggregate_s={statistics.median(aggregate):.3f}")
    print(f"numpy_pass_s={statistics.median(numpy_pass):.3f}")
    print(f"aggregate_vs_numpy_pass={statistics.median(a / n for a, n in zip(aggregate, numpy_pass)):.2f}")


if __name__ == "__main__":
    main()
