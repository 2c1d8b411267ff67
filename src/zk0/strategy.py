"""The zk0 Flower strategy: FedProx/FedAvg over trainable tensors, verified reply by reply; no run state.

Extends Flower's ``FedAvg`` where the earlier design fell short:

* per-round values (learning rate, proximal mu) are computed by the server (the lr schedule
  here, the tuning in :mod:`zk0.tuning`) and sent in the round config; clients use what they
  receive;
* the server sends the global trainable tensors sealed in the transport dtype; clients answer
  with their *update* (trained minus received), so bf16 or int8 transport does not swallow
  small steps; :meth:`SmolVLAStrategy.aggregate_train` returns the updates' fp32 mean, weighted
  by the frames each trained on (``aggregation-weight=dataset``: its dataset's), or with
  ``aggregation`` set, a robust rule's aggregate (:mod:`zk0.robust`), and the round loop
  (:mod:`zk0.rounds`) adds it to the fp32 global tensors;
* each reply is hashed once, when it is verified (the audit reuses that digest), and measured
  once (its norm, which is finite only if every value is); the mean is then accumulated in
  place, update by update, from the payloads' bytes into fp32 buffers the strategy keeps;
* every payload is sealed with its SHA-256 digest and the frozen-base fingerprint
  (:class:`zk0.transport.Wire`); an update that fails verification, is non-finite or too large
  is refused with a reason and the round goes on with the others, unless fewer than
  ``min-train-nodes`` remain;
* nothing a node sends is trusted: a reply with a missing or malformed field, or a
  ``num-examples`` weight that is not a whole number of frames its steps could have used,
  is refused the same way, as is a reply for another round (a replay), and every reason is
  one short line; the query phase's dataset statistics and facts are checked as strictly
  (:func:`checked_query`).

As Flower's strategies do, replies are verified first and aggregated over what passed; here
verification is its own step (``verify_*``, one :class:`Verdict` per reply) so the round loop
can audit every verdict, and ``aggregate_*`` take those verdicts. The run's state (global
tensors, stats, byte counters, audit, events) lives in :class:`zk0.rounds.RoundState`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO
from typing import NamedTuple

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from zk0 import robust, transport
from zk0.config import RunConfig
from zk0.data import parse_stats
from zk0.dataset_facts import FactsError, checked_facts
from zk0.flower_seams import weighted_metrics
from zk0.reasons import error_reason, one_line

MAX_NODE_FRAMES = 10_000_000  # bounds a query reply's num-examples: the server cannot know a node's dataset size
Update = tuple[ArrayRecord, int]  # a train reply's verified payload and its num-examples weight


def round_lr(cfg: RunConfig, server_round: int) -> float:
    """Learning rate of ``server_round`` (1-based): ``lr`` times the schedule's factor."""
    return cfg.train.lr * schedule_factor(cfg, server_round)


def schedule_factor(cfg: RunConfig, server_round: int) -> float:
    """The lr schedule's factor in ``server_round`` (1-based): optional linear warm-up to 1, then the schedule
    down to ``lr-min-factor``. Also what a server step scales by with ``server-lr-follows-schedule``."""
    if server_round <= cfg.train.warmup_rounds:
        return server_round / (cfg.train.warmup_rounds + 1)
    floor = cfg.train.lr_min_factor
    span = max(1, cfg.federation.num_server_rounds - cfg.train.warmup_rounds - 1)
    progress = min(1.0, (server_round - cfg.train.warmup_rounds - 1) / span)
    if cfg.train.lr_schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.train.lr_schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return 1.0


class RoundFailed(RuntimeError):
    """Too few valid updates arrived to aggregate a round."""


@dataclass(frozen=True)
class Verdict[T]:
    """One reply after verification: what its check returned, or why it was refused."""

    reply: Message
    value: T | None = None
    reason: str | None = None
    nbytes: int = 0  # payload bytes that matched their digest, counted as received even if refused afterwards
    digest: str = ""  # the payload's SHA-256 once it matched (the audit records it without hashing again)

    @property
    def accepted(self) -> bool:
        return self.reason is None


def judge[T](reply: Message, check: Callable[[Message], T]) -> Verdict[T]:
    """``check``'s verdict on ``reply``: a reply that fails it, or cannot be read, is refused in one line."""
    try:
        return Verdict(reply, check(reply))
    except (KeyError, TypeError, ValueError) as err:  # a PayloadError is a ValueError
        return Verdict(reply, reason=_failure(err))


def passed[T](verdicts: Iterable[Verdict[T]]) -> list[Verdict[T]]:
    """The accepted verdicts, in their order."""
    return [verdict for verdict in verdicts if verdict.accepted]


class SmolVLAStrategy(FedAvg):
    """FedProx (or FedAvg, ``mu = 0``) over SmolVLA's trainable tensors, as they travel on the server's ``wire``."""

    def __init__(self, cfg: RunConfig, wire: transport.Wire, run_id: int) -> None:
        fed = cfg.federation
        super().__init__(fraction_train=fed.fraction_train, fraction_evaluate=fed.fraction_evaluate,
                         min_train_nodes=fed.min_train_nodes, min_evaluate_nodes=fed.min_evaluate_nodes,
                         min_available_nodes=max(fed.min_train_nodes, fed.min_evaluate_nodes, 1))
        self.cfg, self.wire = cfg, wire
        self.run_id = run_id  # updates are bound to this run and their round (transport.binding)
        self.scratch = transport.scratch_for(wire.shapes)  # one decoded block at a time
        self.mean: dict[str, torch.Tensor] = {}  # the last round's mean: fp32 buffers reused every round

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Federated evaluation every ``eval-every`` rounds and at the last round."""
        if not self.cfg.evaluates(server_round):
            return []
        return list(super().configure_evaluate(server_round, arrays, config, grid))

    def evaluates_with_next_train(self, server_round: int) -> bool:
        """Whether ``server_round``'s federated evaluation travels in the next round's train messages.

        Those carry this round's global model anyway: a client evaluates it first (``evaluate-first``),
        then trains, so the model travels once per round. Not after the last round (no next one), not
        in a round without federated evaluation, and not while the tuning reacts to the held-out loss:
        it must know this round's before it configures the next round's train messages.
        """
        tuning = self.cfg.tuning
        return (server_round < self.cfg.federation.num_server_rounds and self.cfg.evaluates(server_round)
                and self.fraction_evaluate > 0 and not (tuning.adaptive_mu or tuning.dynamic_lr))

    def verify_train(self, server_round: int, replies: Iterable[Message]) -> list[Verdict[Update]]:
        """Each train reply's verdict: its decoded update and weight, once every field the server uses checks out.

        A node's second reply in one round is refused, whatever it carries: each node was sent one message,
        and a duplicate would count its update twice.
        """
        return once_per_node(replies, "train", server_round, lambda reply: self._judge_update(reply, server_round))

    def _judge_update(self, reply: Message, server_round: int) -> Verdict[Update]:
        """The reply's fields and seal first, then the update they carry; bytes count once they match their digest."""
        sealed = judge(reply, lambda checked: self._sealed_payload(checked, server_round))
        if not sealed.accepted:
            return Verdict(reply, reason=sealed.reason)
        arrays, weight = sealed.value
        update = judge(reply, lambda _: (self._plausible_update(arrays), weight))
        return dataclasses.replace(update, nbytes=transport.nbytes(arrays),
                                   digest=str(reply.content["payload"]["payload-digest"]))

    def _sealed_payload(self, reply: Message, server_round: int) -> tuple[ArrayRecord, int]:
        """A train reply's payload, verified against its seal, and its weight in the mean (:meth:`_weight`)."""
        frames = checked_reply(reply, self.cfg.train.local_steps * self.cfg.train.batch_size, server_round)
        arrays = reply.content.array_records["arrays"]
        self.wire.verify(arrays, reply.content.config_records["payload"], transport.binding(self.run_id, server_round))
        return arrays, self._weight(reply, frames)

    def _weight(self, reply: Message, frames: int) -> int:
        """An update's weight in the mean.

        ``aggregation-weight=frames``: the frames it trained on this round, the same for every node
        (each trains ``local-steps`` batches) and never more than its steps could use, so no node
        outweighs another by its claim. ``dataset``: its training set's frames, as the node reports
        them (``dataset-frames``), so a node with 4x the data counts 4x, as its frames would in pooled
        training; the server cannot check that claim (bounded only by ``MAX_NODE_FRAMES``), so use it
        among nodes you trust. ``dp=central``: 1 each (DP-FedAvg: no client moves the mean more than 1/n).
        """
        if self.cfg.privacy.dp == "central":
            return 1
        if self.cfg.federation.aggregation_weight == "dataset":
            return num_examples(reply.content.metric_records["metrics"], MAX_NODE_FRAMES, key="dataset-frames")
        return frames

    def _plausible_update(self, arrays: ArrayRecord) -> ArrayRecord:
        """The payload, unless its update is non-finite or larger than ``max-update-norm``."""
        norm = transport.norm(arrays, self.wire.dtype, self.scratch)
        if not math.isfinite(norm):
            raise transport.PayloadError("update has non-finite values")
        if self.cfg.transport.max_update_norm and norm > self.cfg.transport.max_update_norm:
            bound = self.cfg.transport.max_update_norm
            raise transport.PayloadError(f"update norm {norm:.3g} exceeds max-update-norm={bound}")
        return arrays

    def aggregate_train(self, server_round: int, verdicts: list[Verdict[Update]]) -> dict[str, torch.Tensor]:
        """The accepted updates' fp32 aggregate (the clients' metrics are logged one by one, not averaged).

        ``aggregation=mean``: their mean, each weighted as :meth:`_weight` says, accumulated in place; a robust rule
        (:mod:`zk0.robust`) ignores the weights, as Flower's do. The aggregate's tensors are the strategy's
        own buffers, overwritten by the next call: apply them first.
        """
        accepted = passed(verdicts)
        self._check_enough(server_round, len(accepted))
        accepted.sort(key=lambda verdict: sender(verdict.reply, "payload"))  # a fixed order: same inputs, same bits
        updates = [verdict.value for verdict in accepted]
        self.mean = self.mean or {name: torch.empty(shape) for name, shape in self.wire.shapes.items()}
        fed = self.cfg.federation
        if fed.aggregation == "mean":
            total = sum(weight for _, weight in updates)
            for i, (arrays, weight) in enumerate(updates):
                transport.accumulate(self.mean, arrays, self.wire.dtype, weight / total, self.scratch, start=i == 0)
        else:
            chosen = robust.aggregate(fed.aggregation, [arrays for arrays, _ in updates], self.wire.dtype, self.mean,
                                      fed.byzantine_clients, fed.trim_fraction)
            if chosen is not None:
                log(INFO, "round %d: krum kept the update of node %s (of %d)", server_round,
                    accepted[chosen].reply.metadata.src_node_id, len(accepted))
        return self.mean

    def _check_enough(self, server_round: int, valid: int) -> None:
        """Raise :class:`RoundFailed` unless ``valid`` updates reach ``min-train-nodes`` and what the robust rule
        needs to withstand ``byzantine-clients`` hostile ones."""
        fed = self.cfg.federation
        if valid < max(1, fed.min_train_nodes):
            raise RoundFailed(f"round {server_round}: {valid} valid update(s), fewer than min-train-nodes="
                              f"{fed.min_train_nodes}; stopping rather than aggregating too few clients")
        needed = robust.min_updates(fed.aggregation, fed.byzantine_clients, fed.trim_fraction)
        if valid < needed:
            trims = (f" (trim-fraction={fed.trim_fraction} drops {int(fed.trim_fraction * valid)} of {valid} at "
                     "each end)" if fed.aggregation == "trimmed-mean" else "")
            raise RoundFailed(f"round {server_round}: {valid} valid update(s), too few for aggregation="
                              f"{fed.aggregation} to withstand byzantine-clients={fed.byzantine_clients}: it needs "
                              f"{needed}{trims}; set min-train-nodes={needed} and connect that many nodes, or lower "
                              "byzantine-clients")

    def verify_evaluate(self, server_round: int, replies: Iterable[Message]) -> list[Verdict[int]]:
        """Each evaluate reply's verdict: its ``num-examples`` weight, once its fields check out; a node's second
        evaluation in one round is refused (it would count twice in the mean the tuning follows)."""
        limit = self.cfg.eval.eval_batches * self.cfg.train.batch_size
        return once_per_node(replies, "evaluate", server_round,
                             lambda reply: judge(reply, lambda checked: checked_reply(checked, limit, server_round)))

    def aggregate_evaluate(self, server_round: int, verdicts: list[Verdict[int]]) -> MetricRecord | None:
        """The accepted replies' held-out metrics, weighted by ``num-examples``."""
        accepted = passed(verdicts)
        return _mean_metrics([verdict.reply for verdict in accepted]) if accepted else None


def once_per_node(replies: Iterable[Message], phase: str, server_round: int,
                  judge_one: Callable[[Message], Verdict]) -> list[Verdict]:
    """``judge_one`` of each reply, except a node's second reply of the phase in the round: refused, whatever it
    carries (each node was sent one message)."""
    verdicts, seen = [], set()
    for reply in replies:
        node = reply.metadata.src_node_id
        verdicts.append(Verdict(reply, reason=f"duplicate {phase} reply from node {node} in round {server_round}")
                        if node in seen else judge_one(reply))
        seen.add(node)
    return verdicts


def evaluating_first(train: list[Message], evaluate: list[Message]) -> list[Message]:
    """One message per node: a round's train messages, those to the nodes sampled to evaluate the previous
    round marked ``evaluate-first`` (the model they carry is that round's), and the evaluate messages of the
    sampled nodes that do not train this round."""
    evaluating = {message.metadata.dst_node_id for message in evaluate}
    training = {message.metadata.dst_node_id for message in train}
    marked = [Message(RecordDict({"config": ConfigRecord({**message.content["config"], "evaluate-first": True})}),
                      dst_node_id=message.metadata.dst_node_id, message_type=message.metadata.message_type)
              if message.metadata.dst_node_id in evaluating else message for message in train]
    return marked + [message for message in evaluate if message.metadata.dst_node_id not in training]


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


class QueryReport(NamedTuple):
    """A checked query reply: training-episode stats (pooled) and dataset facts (for the model card)."""

    stats: dict[str, dict]
    facts: dict[str, int | str | list[str]]


def checked_query(reply: Message, sizes: dict[str, int]) -> QueryReport:
    """A query reply's training-episode stats, once plausible for the frames it claims (:func:`parse_stats`),
    and its dataset facts, once of the form an honest client sends (:func:`zk0.dataset_facts.checked_facts`).

    Its ``num-examples`` bounds the stats' count and the training episodes; the server cannot know a
    node's dataset size, so that claim is only bounded by ``MAX_NODE_FRAMES``, and pooling caps its
    weight further.
    """
    about = _about(reply, "stats")
    frames = num_examples(reply.content.metric_records["metrics"], MAX_NODE_FRAMES)
    if not isinstance(about["norm-stats"], str):
        raise transport.PayloadError("norm-stats must be a JSON string")
    try:
        return QueryReport(parse_stats(about["norm-stats"], frames, sizes), checked_facts(about, frames))
    except FactsError as err:
        raise transport.PayloadError(f"implausible dataset facts: {err}") from None
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


def num_examples(metrics: MetricRecord, limit: int, key: str = "num-examples") -> int:
    """A frame count (``num-examples``, or ``key``) as a whole number in ``1..limit``.

    It weights the mean: NaN or inf would turn the global model NaN, and a claim of more frames
    than the node's steps could use (``limit``) would let one node outweigh all the others.
    """
    value = metrics.get(key)
    if not (_whole(value) and 0 < value <= limit):
        raise transport.PayloadError(f"{key} must be a whole number in 1..{limit}, got {value!r}")
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
