"""The zk0 Flower strategy: FedProx/FedAvg over trainable tensors with verified payloads.

Extends Flower's ``FedAvg`` where the earlier design fell short:

* per-round values (learning rate, proximal mu) are computed here and sent in the round
  config; clients use what they receive;
* the server keeps the global trainable tensors in fp32 and sends them in the transport
  dtype; clients answer with their *update* (trained minus received), so bf16 transport
  does not swallow small steps; updates are averaged in fp32, weighted by ``num-examples``;
* every payload carries its SHA-256 digest and the frozen-base fingerprint; an update that
  fails verification, is non-finite or too large is rejected with a logged reason and the
  round goes on with the others, unless fewer than ``min-train-nodes`` remain;
* nothing a node sends is trusted: a reply with a missing or malformed field, or a
  ``num-examples`` weight that is not a whole number of frames its steps could have used,
  is rejected the same way, as is a reply for another round (a replay), and every reason is
  stored as one short line; the query phase's dataset statistics are checked as strictly
  (:func:`checked_query`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from logging import WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from zk0 import transport
from zk0.audit import AuditLog
from zk0.config import RunConfig
from zk0.data import parse_stats
from zk0.flower_seams import weighted_metrics
from zk0.reasons import error_reason, one_line

Event = Callable[[dict], None]
MAX_NODE_FRAMES = 10_000_000  # bounds a query reply's num-examples: the server cannot know a node's dataset size


def round_lr(cfg: RunConfig, server_round: int) -> float:
    """Learning rate of ``server_round`` (1-based): optional linear warm-up, then the schedule."""
    if server_round <= cfg.warmup_rounds:
        return cfg.lr * server_round / (cfg.warmup_rounds + 1)
    floor = cfg.lr * cfg.lr_min_factor
    span = max(1, cfg.num_server_rounds - cfg.warmup_rounds - 1)
    progress = min(1.0, (server_round - cfg.warmup_rounds - 1) / span)
    if cfg.lr_schedule == "cosine":
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.lr_schedule == "linear":
        return cfg.lr - (cfg.lr - floor) * progress
    return cfg.lr


def payload_config(arrays: ArrayRecord, fingerprint: str, dtype: str) -> dict[str, str]:
    """What accompanies every payload so the receiver can verify it."""
    return {"payload-digest": transport.digest(arrays), "base-fingerprint": fingerprint, "transport-dtype": dtype}


class RoundFailed(RuntimeError):
    """Too few valid updates arrived to aggregate a round."""


class SmolVLAStrategy(FedAvg):
    """FedProx (or FedAvg, ``mu = 0``) over SmolVLA's trainable tensors."""

    def __init__(self, cfg: RunConfig, master: dict[str, torch.Tensor], fingerprint: str,
                 norm_stats: str, on_event: Event, audit: AuditLog) -> None:
        super().__init__(fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
                         min_train_nodes=cfg.min_train_nodes, min_evaluate_nodes=cfg.min_evaluate_nodes,
                         min_available_nodes=max(cfg.min_train_nodes, cfg.min_evaluate_nodes, 1))
        self.cfg = cfg
        self.master = {n: t.detach().to("cpu", torch.float32).clone() for n, t in master.items()}
        self.shapes = {n: tuple(t.shape) for n, t in self.master.items()}
        self.fingerprint = fingerprint
        self.norm_stats = norm_stats
        self.on_event = on_event
        self.audit = audit
        self.bytes_down = self.bytes_up = 0

    def encoded_master(self) -> ArrayRecord:
        """The global trainable tensors as they go on the wire."""
        return transport.encode(self.master, self.cfg.transport_dtype)

    def _round_config(self, config: ConfigRecord, arrays: ArrayRecord) -> ConfigRecord:
        out = ConfigRecord(dict(config))
        out.update(payload_config(arrays, self.fingerprint, self.cfg.transport_dtype))
        out["norm-stats"] = self.norm_stats
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Add this round's lr, mu and the payload's digest and base fingerprint."""
        config = self._round_config(config, arrays)
        config["lr"] = round_lr(self.cfg, server_round)
        config["proximal-mu"] = self.cfg.effective_mu
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent(server_round, "train", arrays, messages)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Federated evaluation every ``eval-every`` rounds and at the last round."""
        if not self.cfg.evaluates(server_round):
            return []
        messages = list(super().configure_evaluate(server_round, arrays, self._round_config(config, arrays), grid))
        self._sent(server_round, "evaluate", arrays, messages)
        return messages

    def _sent(self, server_round: int, phase: str, arrays: ArrayRecord, messages: list[Message]) -> None:
        self.bytes_down += transport.nbytes(arrays) * len(messages)
        for message in messages:
            self.audit.sent(server_round, phase, message)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Verify each update, then apply their fp32 weighted mean to the global tensors."""
        accepted = self._screen(server_round, "train", "client", replies,
                                lambda reply: self._verified_update(reply, server_round))
        if len(accepted) < max(1, self.cfg.min_train_nodes):
            raise RoundFailed(f"round {server_round}: {len(accepted)} valid update(s), fewer than "
                              f"min-train-nodes={self.cfg.min_train_nodes}; stopping rather than "
                              "aggregating too few clients")
        accepted.sort(key=lambda item: sender(item[0], "payload"))  # a fixed summation order: same inputs, same bits
        total = sum(weight for _, (_, weight) in accepted)
        for name in self.master:
            self.master[name] += sum(update[name] * (weight / total) for _, (update, weight) in accepted)
        return self.encoded_master(), _mean_metrics([reply for reply, _ in accepted])

    def _screen[T](self, server_round: int, phase: str, source: str, replies: Iterable[Message],
                   check: Callable[[Message], T]) -> list[tuple[Message, T]]:
        """:func:`screen`, logging each passed reply's metrics as ``source``."""
        passed = screen(server_round, phase, replies, check, self.audit, self.on_event)
        for reply, _ in passed:
            self._client_event(server_round, source, reply)
        return passed

    def _verified_update(self, reply: Message, server_round: int) -> tuple[dict[str, torch.Tensor], int]:
        """A train reply's update and its weight, once every field the server uses has been checked."""
        weight = checked_reply(reply, self.cfg.local_steps * self.cfg.batch_size, server_round)
        arrays, meta = reply.content.array_records["arrays"], reply.content.config_records["payload"]
        if meta["base-fingerprint"] != self.fingerprint:
            raise transport.PayloadError("frozen-base fingerprint differs from the server's")
        if meta["transport-dtype"] != self.cfg.transport_dtype:
            raise transport.PayloadError(f"transport dtype {meta['transport-dtype']} != {self.cfg.transport_dtype}")
        transport.check(arrays, str(meta["payload-digest"]), self.shapes)
        self.bytes_up += transport.nbytes(arrays)
        update = transport.decode(arrays, self.cfg.transport_dtype)
        if not all(torch.isfinite(t).all() for t in update.values()):
            raise transport.PayloadError("update has non-finite values")
        norm = math.sqrt(sum(float((t**2).sum()) for t in update.values()))
        if self.cfg.max_update_norm and norm > self.cfg.max_update_norm:
            raise transport.PayloadError(f"update norm {norm:.3g} exceeds max-update-norm={self.cfg.max_update_norm}")
        return update, weight

    def _client_event(self, server_round: int, source: str, reply: Message) -> None:
        about = reply.content["payload"]
        base = {"base": str(about["base-fingerprint"])[:16]} if "base-fingerprint" in about else {}
        self.on_event({**dict(reply.content["metrics"]),  # the server's fields last: a node cannot overwrite them
                       "round": server_round, "source": source, "node": reply.metadata.src_node_id,
                       "partition": about["partition-id"], "dataset": about["dataset"], **base})

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Log each client's held-out metrics, then their weighted mean."""
        limit = self.cfg.eval_batches * self.cfg.batch_size
        valid = self._screen(server_round, "evaluate", "client-eval", replies,
                             lambda reply: checked_reply(reply, limit, server_round))
        return _mean_metrics([reply for reply, _ in valid]) if valid else None


def screen[T](server_round: int, phase: str, replies: Iterable[Message], check: Callable[[Message], T],
              audit: AuditLog, on_event: Event) -> list[tuple[Message, T]]:
    """Replies that pass ``check``, with what it returned; each other one is rejected and the round goes on."""
    passed = []
    for reply in replies:
        try:
            passed.append((reply, check(reply)))
        except (KeyError, TypeError, ValueError) as err:  # a PayloadError is a ValueError
            reject(server_round, phase, reply, _failure(err), audit, on_event)
            continue
        audit.received(server_round, phase, reply, accepted=True)
    return passed


def reject(server_round: int, phase: str, reply: Message, reason: str, audit: AuditLog, on_event: Event) -> None:
    """Log, audit and report a refused reply, with its reason as one line."""
    node, reason = reply.metadata.src_node_id, one_line(reason)
    log(WARNING, "round %d: rejected %s reply from node %s: %s", server_round, phase, node, reason)
    audit.received(server_round, phase, reply, accepted=False, reason=reason)
    on_event({"round": server_round, "source": "server", "event": "rejected-update", "phase": phase, "node": node,
              "reason": reason})


def checked_reply(reply: Message, max_examples: int, server_round: int) -> int:
    """Check the fields the server reads from a train or evaluate reply; return its ``num-examples`` weight.

    Nodes are not trusted: a missing field must cost that reply, not the round, and who sent
    it must be readable before replies are put in their fixed summation order. A reply echoing
    another round is a replay (or a confused node): its update was made from other weights.
    """
    about = _about(reply, "payload")
    if about["server-round"] != server_round:
        raise transport.PayloadError(f"reply for round {about['server-round']} in round {server_round}")
    metrics = reply.content.metric_records["metrics"]
    if any(isinstance(value, list) for value in metrics.values()):
        raise transport.PayloadError("metrics must be single numbers")
    return num_examples(metrics, max_examples)


def checked_query(reply: Message, sizes: dict[str, int]) -> dict[str, dict]:
    """A query reply's training-episode stats, once plausible for the frames it claims (:func:`parse_stats`).

    Its ``num-examples`` bounds the stats' count; the server cannot know a node's dataset size, so
    that claim is only bounded by ``MAX_NODE_FRAMES``, and pooling caps its weight further.
    """
    about = _about(reply, "stats")
    frames = num_examples(reply.content.metric_records["metrics"], MAX_NODE_FRAMES)
    if not isinstance(about["norm-stats"], str):
        raise transport.PayloadError("norm-stats must be a JSON string")
    try:
        return parse_stats(about["norm-stats"], frames, sizes)
    except ValueError as err:
        raise transport.PayloadError(f"implausible norm-stats: {err}") from None


def _about(reply: Message, record: str) -> ConfigRecord:
    """The reply's ``record`` naming its sender, once its partition-id and dataset are readable."""
    if reply.has_error():
        raise transport.PayloadError(f"client error: {one_line(reply.error.reason)}")
    about = reply.content.config_records[record]
    if not _whole(about["partition-id"]) or not isinstance(about["dataset"], str):
        raise transport.PayloadError(f"{record} needs a whole-number partition-id and a dataset name")
    return about


def num_examples(metrics: MetricRecord, limit: int) -> int:
    """``num-examples`` as a whole number in ``1..limit``.

    It weights the mean: NaN or inf would turn the global model NaN, and a claim of more frames
    than the node's steps could use (``limit``) would let one node outweigh all the others.
    """
    value = metrics.get("num-examples")
    if not (_whole(value) and 0 < value <= limit):
        raise transport.PayloadError(f"num-examples must be a whole number in 1..{limit}, got {value!r}")
    return int(value)


def _whole(value: object) -> bool:
    """An int, or a float with an integral value (never a bool, NaN or inf)."""
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float)
                                                                        and value.is_integer())


def _failure(err: Exception) -> str:
    """A verification failure states its reason; anything else is a reply the server could not read."""
    return str(err) if isinstance(err, transport.PayloadError) else f"malformed reply: {error_reason(err)}"


def _mean_metrics(replies: list[Message]) -> MetricRecord:
    """The replies' metrics, averaged with their ``num-examples`` weights."""
    return weighted_metrics([RecordDict({"metrics": r.content["metrics"]}) for r in replies], "num-examples")


def sender(reply: Message, record: str) -> tuple[int, str, int]:
    """Order replies by partition, dataset (in ``record``) and node, whatever order they arrived in."""
    about = reply.content[record]
    return int(about["partition-id"]), str(about["dataset"]), reply.metadata.src_node_id
