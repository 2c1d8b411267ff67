"""ClientApp: local training and held-out evaluation on one robot owner's dataset.

What a client needs between rounds stays resident in the process, so a round costs training,
not start-up. Flower's simulation runs many virtual clients in one process, so what every
client of a run needs alike lives once per process and run (:class:`SharedPolicy`: the policy,
its wire and processors, an int8 run's last global model), and each client keeps only its own
(:class:`ClientRuntime`: its dataset split and loader, an int8 run's model id and residual).
"""

from __future__ import annotations

import functools
import hashlib
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import DEBUG, ERROR, INFO
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from lerobot.policies.factory import make_pre_post_processors

from zk0 import transport
from zk0.chain import Held, Latest
from zk0.config import RunConfig
from zk0.data import (DatasetSplit, batches, decode_stats, describe_cameras, encode_stats, open_split,
                      train_loader, vector_stats)
from zk0.dataset_facts import dataset_facts
from zk0.evaluate import evaluate_dataset
from zk0.logs import quiet_libraries
from zk0.policy import base_fingerprint, build_policy, load_trainable, trainable_shapes, trainable_state
from zk0.privacy import client_stats, privatize_update
from zk0.reasons import CLIENT_ERROR, error_reason
from zk0.registry import DatasetEntry, load_registry, parse_camera_map
from zk0.stopwatch import Stopwatch
from zk0.train import train_steps

app = ClientApp()


@dataclass
class SharedPolicy:
    """What the virtual clients of one run share in a process: the policy (frozen base and trainable tensors),
    its wire, the pre/post processors of the federation's stats, and an int8 run's last global model.

    Flower hands a process one message at a time (a simulation's Ray actor runs one ClientApp
    call, then the next; a deployment's ClientApp serves one node), so its clients take turns with
    the policy: every message loads the global weights it received before it trains or evaluates
    (:func:`receive_global`), and training builds its optimizer afresh (:func:`zk0.train.train_steps`),
    so nothing one client trained reaches another's round.
    """

    policy: torch.nn.Module
    wire: transport.Wire
    latest: Latest | None  # an int8 run's last global model, the one copy its clients' model ids point at
    processors: dict[str, tuple] = field(default_factory=dict)

    def pre_post(self, norm_stats: str) -> tuple:
        """Pre/post processors for the federation's normalisation stats (built once per stats)."""
        key = hashlib.sha256(norm_stats.encode()).hexdigest()
        if key not in self.processors:
            self.processors.clear()
            self.processors[key] = make_pre_post_processors(self.policy.config, dataset_stats=decode_stats(norm_stats))
        return self.processors[key]


@dataclass
class ClientRuntime:
    """What one client keeps between rounds: its own data, an int8 run's model id and residual, and the
    run's :class:`SharedPolicy` (whose policy, wire and processors the handlers reach through it)."""

    cfg: RunConfig
    partition_id: int
    shared: SharedPolicy
    split: DatasetSplit
    loader: torch.utils.data.DataLoader
    held: Held | None = None  # an int8 run's model id and residual

    @property
    def policy(self) -> torch.nn.Module:
        return self.shared.policy

    @property
    def wire(self) -> transport.Wire:
        return self.shared.wire

    def pre_post(self, norm_stats: str) -> tuple:
        return self.shared.pre_post(norm_stats)


_RUNTIMES: dict[tuple[int, int], ClientRuntime] = {}
# A run's shared policy lives while one of its clients' runtimes does (a deployment's worker drops a finished run's).
_SHARED: weakref.WeakValueDictionary[tuple, SharedPolicy] = weakref.WeakValueDictionary()


def dataset_entry(cfg: RunConfig, context: Context) -> tuple[int, DatasetEntry]:
    """This node's dataset: node config ``dataset`` and ``cameras`` (deployment) or the registry by partition id."""
    node_config = context.node_config
    if "dataset" in node_config:
        cameras = parse_camera_map(str(node_config.get("cameras", "")))
        return int(node_config.get("partition-id", -1)), DatasetEntry(uri=str(node_config["dataset"]), cameras=cameras)
    partition_id = int(node_config["partition-id"])
    return partition_id, load_registry(cfg.data.datasets, cfg.data.registry).client(partition_id)


def runtime(context: Context) -> ClientRuntime:
    """The resident runtime of this node and run, built on its first message."""
    key = (context.run_id, context.node_id)
    if key not in _RUNTIMES:
        quiet_libraries()
        cfg = RunConfig.from_run_config(context.run_config)
        partition_id, entry = dataset_entry(cfg, context)
        shared = shared_policy(context.run_id, cfg)
        policy_cfg = shared.policy.config
        split = open_split(entry, policy_cfg, cfg.data.held_out_fraction, cfg.data.split_seed)
        log(camera_log_level(context, split, policy_cfg), "zk0 client %s: cameras %s", split.entry.name,
            describe_cameras(split.entry.cameras, split.meta, policy_cfg))
        _RUNTIMES[key] = ClientRuntime(cfg, partition_id, shared, split,
                                       train_loader(split.train, cfg.train.batch_size, cfg.train.num_workers),
                                       held=None if shared.latest is None else Held(shared.latest))
    return _RUNTIMES[key]


def shared_policy(run_id: int, cfg: RunConfig) -> SharedPolicy:
    """This process's policy of run ``run_id``, built by the run's first client here.

    Keyed by what builds the policy and its wire (model, chunk size, seed, device, transport dtype)
    as well as the run: a run restarted under the same id with another model gets its own.
    """
    key = (run_id, cfg.model.model_name, cfg.model.chunk_size, cfg.seed, cfg.train.device,
           cfg.transport.transport_dtype)
    shared = _SHARED.get(key)
    if shared is None:
        policy = build_policy(cfg)
        wire = transport.Wire("client", base_fingerprint(policy), cfg.transport.transport_dtype,
                              trainable_shapes(policy))
        shared = _SHARED[key] = SharedPolicy(policy, wire, Latest() if wire.dtype == "int8" else None)
    return shared


def camera_log_level(context: Context, split: DatasetSplit, policy_cfg: Any) -> int:
    """INFO where the camera mapping tells someone something: on a deployment node (its owner checks it) or when
    a camera is renamed or a policy camera left empty; DEBUG for a simulated client fed camera for camera."""
    fed = {split.entry.cameras.get(cam, cam) for cam in split.meta.camera_keys}
    renamed = any(src != dst for src, dst in split.entry.cameras.items())
    plain = not renamed and set(policy_cfg.image_features) <= fed
    return DEBUG if plain and "dataset" not in context.node_config else INFO


def answers_errors(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Reply with a one-line reason (no traceback, no local paths) when ``handler`` fails; log it all here.

    The full traceback stays in this node's log for its owner; the server gets what it needs to
    know which node failed and why, and never the owner's file layout.
    """
    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as err:  # any failure becomes an error reply; the node stays up for the next round
            log(ERROR, "zk0 client: %s failed:\n%s", msg.metadata.message_type, traceback.format_exc())
            return Message(Error(code=CLIENT_ERROR, reason=error_reason(err)), reply_to=msg)
    return wrapped


def receive_global(rt: ClientRuntime, msg: Message) -> tuple[dict[str, torch.Tensor], ConfigRecord, Any, Any]:
    """Verify the server's payload against its seal and our base, load it into the policy, and build the
    pre/post processors with the federation's pooled stats it carries."""
    config, arrays = msg.content["config"], msg.content["arrays"]
    weights = rt.held.receive(rt.wire, arrays, config) if rt.held else rt.wire.open(arrays, config)
    load_trainable(rt.policy, weights)
    pre, post = rt.pre_post(str(config["norm-stats"]))
    return weights, config, pre, post


def about(rt: ClientRuntime) -> dict[str, int | str]:
    """Who answered: partition and dataset (for the run's metrics)."""
    return {"partition-id": rt.partition_id, "dataset": rt.split.entry.name}


def facts(split: DatasetSplit) -> dict[str, int | str | list[str]]:
    """What the model card says about this dataset: robot, fps, tasks, episodes (owner text bounded, no paths)."""
    meta = split.meta
    tasks = [] if meta.tasks is None else [str(task) for task in meta.tasks.sort_values("task_index").index]
    return dataset_facts(meta.robot_type, meta.fps, tasks, len(split.train_episodes), len(split.held_out_episodes))


def holding(rt: ClientRuntime) -> dict[str, str]:
    """An int8 run's node says which model it now holds: the server sends it deltas from that one."""
    return {"model-id": rt.held.model_id} if rt.held else {}


@app.query()
@answers_errors
def query(msg: Message, context: Context) -> Message:
    """Report normalisation statistics of the training episodes (pooled by the server) and the dataset's facts."""
    rt = runtime(context)
    stats = encode_stats(client_stats(vector_stats(rt.split.train), rt.cfg))  # under DP: moments only, clipped
    return Message(RecordDict({"stats": ConfigRecord({"norm-stats": stats, **about(rt), **facts(rt.split)}),
                               "metrics": MetricRecord({"num-examples": len(rt.split.train)})}), reply_to=msg)


@app.train()
@answers_errors
def train(msg: Message, context: Context) -> Message:
    """Train from the received global tensors and reply with the verified update.

    With ``evaluate-first`` the server also asks for the evaluation of the tensors received (the
    previous round's global model): they are evaluated first, exactly as :func:`evaluate` does, and
    the reply carries those metrics as ``eval-metrics``, so the model travels once per round. An
    evaluation that fails is reported as ``eval-error`` in the payload; the update still goes.
    """
    rt = runtime(context)
    clock = Stopwatch()
    with clock.part("codec"):
        weights, config, pre, post = receive_global(rt, msg)
    records, evaluation = {}, {}
    if config.get("evaluate-first"):
        try:
            records["eval-metrics"] = held_out_metrics(rt, pre, post)
        except Exception as err:  # a failed evaluation must not cost the round its update
            log(ERROR, "zk0 client: the evaluation carried by the train message failed:\n%s", traceback.format_exc())
            evaluation["eval-error"] = error_reason(err)
    round_seed = rt.cfg.seed + 1000 * int(config["server-round"]) + rt.partition_id
    torch.manual_seed(round_seed)  # flow-matching noise
    stream = batches(rt.loader, round_seed, rt.split.entry.cameras)
    with clock.part("train"):
        result = train_steps(rt.policy, pre, stream, steps=rt.cfg.train.local_steps, lr=float(config["lr"]),
                             mu=float(config["proximal-mu"]), grad_clip_norm=rt.cfg.train.grad_clip_norm,
                             optimizer=rt.cfg.train.client_optimizer)
    with clock.part("codec"):
        update = {n: p.detach().cpu().float() - weights[n] for n, p in trainable_state(rt.policy).items()}
        privatize_update(update, rt.cfg)  # dp runs: clipped to dp-clip-norm (dp=local: and noised)
        bound_to = transport.binding(context.run_id, int(config["server-round"]))  # a replay elsewhere fails
        arrays, seal = rt.held.seal(rt.wire, update, bound_to) if rt.held else rt.wire.seal(update, bound_to=bound_to)
    metrics = MetricRecord({"train-loss": result.loss, "proximal": result.proximal, "grad-norm": result.grad_norm,
                            "steps": result.steps, "lr": float(config["lr"]),
                            "proximal-mu": float(config["proximal-mu"]), "num-examples": result.frames,
                            "dataset-frames": len(rt.split.train), **clock.record()})
    payload = ConfigRecord({**seal, **about(rt), **holding(rt), **evaluation, "server-round": int(config["server-round"])})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics, "payload": payload, **records}), reply_to=msg)


@app.evaluate()
@answers_errors
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this client's held-out episodes."""
    rt = runtime(context)
    clock = Stopwatch()
    with clock.part("codec"):
        _, config, pre, post = receive_global(rt, msg)
    metrics = held_out_metrics(rt, pre, post)
    metrics.update(clock.record())
    payload = ConfigRecord({**about(rt), **holding(rt), "server-round": int(config["server-round"])})
    return Message(RecordDict({"metrics": metrics, "payload": payload}), reply_to=msg)


def held_out_metrics(rt: ClientRuntime, pre: Any, post: Any) -> MetricRecord:
    """The policy as loaded, on this client's held-out episodes: loss, action error, frames, and the seconds the
    evaluation took (:func:`zk0.evaluate.evaluate_dataset`: seeded, the same numbers for the same model)."""
    clock = Stopwatch()
    with clock.part("eval"):
        result = evaluate_dataset(rt.policy, pre, post, rt.split.held_out, rt.split.entry.cameras, rt.cfg)
    return MetricRecord({"eval-loss": result["loss"], "eval-action-mae": result["action_mae"],
                         "num-examples": int(result["frames"]), **clock.record()})
