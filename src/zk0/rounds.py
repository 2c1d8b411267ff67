"""The round loop's state and the end of every round, shared by the ServerApp and the baselines.

:class:`RoundState` is what a federated run carries from one round to the next: the round,
the global trainable tensors in fp32, the pooled normalisation stats, the server's end of
the wire (frozen-base fingerprint, dtype, tensor shapes) and, in an int8 run, the model chain
its nodes hold (:class:`zk0.chain.Chain`), the bytes sent and received, the audit log and the
event sink. The strategy only verifies and aggregates; this gives every message its payload
(sealed once per change of the global model, not per message), applies the aggregate,
records every verdict, counts each round's bytes and the seconds the loop spends on each part
of it, and saves what a resumed run continues from (``server_state.pt``,
:class:`zk0.checkpoint.ServerState`). A round whose federated evaluation goes with the next
round's train messages is saved with its end pending (``end_pending``): a run resumed from it
redoes that end, with the next round.

:class:`RoundEnd` is the end of a round, the same for a federated run and a baseline:
evaluate, evaluate in the simulator, checkpoint, log the round (with the seconds each part took) and
report, on one schedule.
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import InitVar, dataclass, field
from logging import INFO, WARNING

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log

from zk0 import transport
from zk0.audit import AuditLog
from zk0.chain import Chain, Payload
from zk0.checkpoint import RunFolder, ServerState
from zk0.config import RunConfig
from zk0.privacy import Privacy
from zk0.reasons import one_line
from zk0.report import progress_line
from zk0.server_optimizer import ServerOptimizer
from zk0.stopwatch import Stopwatch
from zk0.strategy import Verdict, schedule_factor
from zk0.tracking import Tracker
from zk0.tuning import Tuning

Event = Callable[[dict], None]
TRAFFIC = ("bytes-down", "bytes-up")  # what a round's record counts of the payloads that travelled
SOURCES = {"train": "client", "evaluate": "client-eval"}  # phase: the source its replies' metrics are logged as


@dataclass
class RoundState:
    """Everything the server loop carries between rounds, and what a resumed run restores."""

    cfg: RunConfig
    master: dict[str, torch.Tensor]
    norm_stats: str
    fingerprint: str
    audit: AuditLog
    on_event: Event
    server_round: int = 0
    end_pending: bool = False  # the round's end waits for the evaluations the next round's train replies carry
    downlink: InitVar[Mapping | None] = None  # a resumed int8 run's saved chain
    tuned: InitVar[Mapping | None] = None  # a resumed run's saved server-optimizer moments and tuning
    wire: transport.Wire = field(init=False)
    chain: Chain | None = field(init=False)  # int8 runs: the model the nodes hold
    sealed_master: Payload | None = field(init=False, default=None)  # bf16/fp32 runs: the global tensors
    traffic: Counter[tuple[int, str]] = field(init=False, default_factory=Counter)  # (round, bytes-down|bytes-up)
    clocks: dict[int, Stopwatch] = field(init=False, default_factory=dict)  # round: seconds per part of it
    optimizer: ServerOptimizer = field(init=False)  # applies each round's mean update to the global tensors
    tuning: Tuning = field(init=False)  # the mu and lr factor the next train messages carry
    privacy: Privacy = field(init=False)  # dp runs: the noise on each round's mean, the accountant, the budget

    def __post_init__(self, downlink: Mapping | None, tuned: Mapping | None) -> None:
        self.master = {n: t.detach().to("cpu", torch.float32).clone() for n, t in self.master.items()}
        shapes = {n: tuple(t.shape) for n, t in self.master.items()}
        self.wire = transport.Wire("server", self.fingerprint, self.cfg.transport.transport_dtype, shapes)
        self.chain = Chain(self.wire, downlink) if self.wire.dtype == "int8" else None
        fed = self.cfg.federation
        self.optimizer = ServerOptimizer(fed.server_optimizer, lr=fed.server_lr, beta_1=fed.server_momentum,
                                         beta_2=fed.server_beta2, tau=fed.server_tau)
        self.tuning = Tuning(mu=fed.effective_mu)
        self.privacy = Privacy(self.cfg)
        if tuned:
            self.optimizer.load_state_dict(tuned["server-optimizer"])
            self.tuning = Tuning.from_state_dict(tuned["tuning"])

    @classmethod
    def resumed(cls, saved: ServerState, cfg: RunConfig, audit: AuditLog, on_event: Event) -> RoundState:
        """The state saved after ``saved.server_round``, random generators included: the run goes on unchanged."""
        random.setstate(saved.python_rng)
        torch.set_rng_state(saved.torch_rng)
        state = cls(cfg, saved.master, saved.norm_stats, saved.fingerprint, audit, on_event, saved.server_round,
                    saved.pending_end is not None, downlink=saved.downlink, tuned=saved.tuned)
        state.privacy.load_state_dict(saved.privacy)
        state.add_measured(saved.server_round, saved.pending_measured)
        return state

    def save(self, run: RunFolder, records: list[dict]) -> None:
        """The state a resumed run continues from, after the round just trained (and ended, unless its end
        is pending); ``records``: the round's records so far, which a resumed run keeps while it redoes
        a pending end (:class:`zk0.checkpoint.ServerState`)."""
        ServerState(self.server_round, self.master, self.norm_stats, self.cfg.to_run_config(), self.fingerprint,
                    random.getstate(), torch.get_rng_state(), self.chain.state() if self.chain else {},
                    {"server-optimizer": self.optimizer.state_dict(), "tuning": self.tuning.state_dict()},
                    records if self.end_pending else None, self.privacy.state_dict(),
                    self.measured(self.server_round, keep=True) if self.end_pending else {}).save(run)

    def train_config(self) -> ConfigRecord:
        """What this round's train messages tell clients to use: the scheduled lr times the tuning's factor, and mu."""
        return ConfigRecord({"lr": self.cfg.train.lr * self.lr_factor(), "proximal-mu": self.tuning.mu})

    def tune(self, summary: Mapping[str, float]) -> None:
        """After an evaluated round: adaptive mu and the plateau lr react to the clients' mean held-out loss."""
        rules = self.cfg.tuning
        if not (rules.adaptive_mu or rules.dynamic_lr) or "client-eval-loss" not in summary:
            return
        for change in self.tuning.observe(summary["client-eval-loss"], rules):
            log(INFO, "zk0 round %d: %s", self.server_round, change)
        self.on_event({"round": self.server_round, "source": "server", "event": "tuning",
                       "proximal-mu": self.tuning.mu, "lr-factor": self.tuning.lr_factor})

    def address(self, messages: Iterable[Message]) -> list[Message]:
        """The strategy's messages as they go: each with the global model in the form its node can use, sealed,
        and the federation's normalisation stats."""
        out = []
        for message in messages:
            node = message.metadata.dst_node_id
            arrays, seal = self.chain.payload(node, self.master) if self.chain else self._broadcast()
            config = ConfigRecord({**message.content["config"], **seal, "norm-stats": self.norm_stats})
            out.append(Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=node,
                               message_type=message.metadata.message_type))
        return out

    def _broadcast(self) -> Payload:
        """The global tensors in the run's dtype, sealed once per change."""
        if self.sealed_master is None:
            self.sealed_master = self.wire.seal(self.master)
        return self.sealed_master

    def sent(self, messages: list[Message]) -> None:
        """Count and audit each message as part of its round and phase (an evaluate message for the previous
        round may go with this round's train messages)."""
        for message in messages:
            server_round = int(message.content["config"]["server-round"])
            self.traffic[server_round, "bytes-down"] += transport.nbytes(message.content["arrays"])
            self.audit.sent(server_round, message.metadata.message_type, message)

    def received(self, phase: str, verdicts: list[Verdict], server_round: int) -> None:
        """Record every verdict as ``server_round``'s, count the bytes received, log each accepted reply's
        metrics, and note which model each node of an int8 run says it holds."""
        report(server_round, phase, verdicts, self.audit, self.on_event)
        self.traffic[server_round, "bytes-up"] += sum(verdict.nbytes for verdict in verdicts)
        for verdict in verdicts:
            if verdict.accepted:
                self._client_event(SOURCES[phase], verdict.reply, server_round)
            if self.chain and (model_id := _held_model(verdict.reply)):
                self.chain.confirm(verdict.reply.metadata.src_node_id, model_id)

    def _client_event(self, source: str, reply: Message, server_round: int) -> None:
        about = reply.content["payload"]
        base = {"base": str(about["base-fingerprint"])[:16]} if "base-fingerprint" in about else {}
        self.on_event({**dict(reply.content["metrics"]),  # the server's fields last: a node cannot overwrite them
                       "round": server_round, "source": source, "node": reply.metadata.src_node_id,
                       "partition": about["partition-id"], "dataset": about["dataset"], **base})

    def apply(self, update: Mapping[str, torch.Tensor], contributors: int) -> None:
        """Move the global tensors by the aggregated fp32 update of ``contributors`` clients: added as it is, or
        through the server optimizer; in a dp run, once released (central DP's noise added, ε logged)."""
        if self.privacy.enabled:
            self.on_event(self.privacy.release(update, contributors, self.server_round))
        factor = self.lr_factor() if self.cfg.federation.server_lr_follows_schedule else 1.0
        self.optimizer.step(self.master, dict(update), self.server_round, factor)
        self.sealed_master = None
        if self.chain:
            self.chain.moved()

    def lr_factor(self) -> float:
        """This round's lr schedule times the tuning's factor: what scales the clients' ``lr`` and, with
        ``server-lr-follows-schedule``, the server optimizer's."""
        return schedule_factor(self.cfg, self.server_round) * self.tuning.lr_factor

    def clock(self, server_round: int) -> Stopwatch:
        """The seconds the loop spends on each part of ``server_round``."""
        return self.clocks.setdefault(server_round, Stopwatch())

    def measured(self, server_round: int, keep: bool = False) -> dict[str, float]:
        """``server_round``'s bytes sent and received and the loop's seconds per part, as the round record names
        them; the round's counts are done with unless ``keep`` (a state saved with the round's end pending)."""
        clock = self.clocks.get(server_round, Stopwatch()) if keep else self.clocks.pop(server_round, Stopwatch())
        take = self.traffic.get if keep else self.traffic.pop
        return {key: take((server_round, key), 0) for key in TRAFFIC} | clock.record()

    def add_measured(self, server_round: int, measured: Mapping[str, float]) -> None:
        """Count what :meth:`measured` gave (saved before a resume) into ``server_round``'s bytes and seconds."""
        for key, value in measured.items():
            if key in TRAFFIC:
                self.traffic[(server_round, key)] += int(value)
            else:
                self.clock(server_round).seconds[key.removesuffix("-seconds")] += value


def _held_model(reply: Message) -> str | None:
    """The model id a reply says its node holds, if it says one."""
    if reply.has_error() or "payload" not in reply.content.config_records:
        return None
    model_id = reply.content["payload"].get("model-id")
    return model_id if isinstance(model_id, str) else None


def report(server_round: int, phase: str, verdicts: list[Verdict], audit: AuditLog, on_event: Event) -> None:
    """Audit every reply of ``phase``; log and report each refused one, with its reason as one line."""
    for verdict in verdicts:
        if verdict.accepted:
            weight = verdict.value[1] if phase == "train" else None  # a train verdict holds (update, weight)
            audit.received(server_round, phase, verdict.reply, accepted=True, digest=verdict.digest, weight=weight)
            continue
        node, reason = verdict.reply.metadata.src_node_id, one_line(verdict.reason)
        log(WARNING, "round %d: rejected %s reply from node %s: %s", server_round, phase, node, reason)
        audit.received(server_round, phase, verdict.reply, accepted=False, reason=reason, digest=verdict.digest)
        on_event({"round": server_round, "source": "server", "event": "rejected-update", "phase": phase,
                  "node": node, "reason": reason})


class RoundEnd(ABC):
    """The end of a round, on the run's schedule: evaluate, evaluate in the simulator, checkpoint, log the round.

    Subclasses say how their model (the server's global one, a baseline's learners) is
    evaluated and saved; the schedule, the round record and the progress line are shared, so
    a baseline's run folder reads like a federated run's.
    """

    def __init__(self, cfg: RunConfig, tracker: Tracker, sim_tasks: list[str]) -> None:
        self.cfg, self.tracker, self.sim_tasks = cfg, tracker, sim_tasks
        self.started = time.monotonic()

    def __call__(self, server_round: int, measured: Mapping[str, float], last: bool = False) -> dict[str, float]:
        """End ``server_round``; ``measured``: what the round loop measured of it (bytes sent and received,
        seconds per part), logged in the round record with the seconds of this end's own parts; ``last``: the
        run stops after it (a dp run's budget), so it is evaluated and checkpointed as a final round. Returns
        the round's summary."""
        evaluating, checkpointing = self.cfg.evaluates(server_round) or last, self.cfg.checkpoints(server_round) or last
        sim_evaluating = bool(self.sim_tasks) and (self.cfg.sim_evaluates(server_round) or last)
        clock = Stopwatch()
        if evaluating or sim_evaluating or checkpointing:
            self.prepare()
        if evaluating:
            with clock.part("server-eval"):
                self.evaluate(server_round)
        if sim_evaluating:
            with clock.part("sim-eval"):
                self.evaluate_in_sim(server_round)
        if checkpointing:
            with clock.part("checkpoint"):
                self.checkpoint(server_round, self.tracker.round_summary(server_round))
        self.tracker.log({"round": server_round, "source": "server", "event": "round", **measured, **clock.record(),
                          "seconds": round(time.monotonic() - self.started, 2)})
        self.started = time.monotonic()
        summary = self.tracker.round_summary(server_round)
        log(INFO, "%s", progress_line(server_round, self.cfg.federation.num_server_rounds, summary))
        return summary

    def prepare(self) -> None:
        """Called once before a round's evaluations and checkpoint; a subclass that loads per model needs nothing."""

    @abstractmethod
    def evaluate(self, server_round: int) -> None:
        """Offline evaluation, logged as ``server`` (unseen sets) and, for baselines, ``client-eval`` records."""

    @abstractmethod
    def evaluate_in_sim(self, server_round: int) -> None:
        """Closed-loop success rate on the registry's simulator tasks."""

    @abstractmethod
    def checkpoint(self, server_round: int, summary: dict[str, float]) -> None:
        """Save the round's model(s) as LeRobot policy folders, with a card showing ``summary``."""
