"""ServerApp: the federated round loop over Flower's grid, for a new run folder or a resumed one.

The strategy (:mod:`zk0.strategy`) verifies and aggregates, the run's state and the end of a
round live in :mod:`zk0.rounds`; this module drives them phase by phase and evaluates the
global model on the server.
"""

from __future__ import annotations

import random
import time
from logging import ERROR, INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from lerobot.policies.factory import make_pre_post_processors

from zk0.audit import AuditLog
from zk0.checkpoint import RunFolder, ServerState, save_checkpoint
from zk0.config import RunConfig
from zk0.data import decode_stats, feature_sizes, open_full, outliers, pool_reports
from zk0.evaluate import evaluate_dataset
from zk0.flower_seams import deployed, set_reply_sender
from zk0.hub import push_at_end
from zk0.logs import quiet_flower_sampling, quiet_libraries, run_log
from zk0.model_card import model_card
from zk0.policy import base_fingerprint, build_policy, load_trainable, trainable_state
from zk0.privacy import check_budget, pool_stats
from zk0.reasons import CLIENT_ERROR, one_line
from zk0.registry import Registry, load_registry
from zk0.report import summary_table
from zk0.rounds import Event, RoundEnd, RoundState, report
from zk0.strategy import (RoundFailed, QueryReport, SmolVLAStrategy, Verdict, checked_query, evaluating_first, judge,
                          passed, sender)
from zk0.tracking import Tracker, write_charts

app = ServerApp()


def closed_loop_tasks(cfg: RunConfig, registry: Registry) -> list[str]:
    """The simulator tasks to roll out; the simulator (MuJoCo) is loaded only when closed-loop evaluation is on."""
    if not cfg.eval.sim_eval_every:
        return []
    from zk0.sim.policy_eval import simulator_tasks

    return simulator_tasks(cfg, registry)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) ``num-server-rounds`` rounds and leave everything in the run folder."""
    cfg = RunConfig.from_run_config(context.run_config)
    quiet_libraries()
    quiet_flower_sampling()
    registry = load_registry(cfg.data.datasets, cfg.data.registry)
    closed_loop_tasks(cfg, registry)  # a config that cannot work fails before any work
    policy = build_policy(cfg, cfg.eval.server_device)
    fingerprint = base_fingerprint(policy)
    run, saved, attempt = open_run(cfg, registry, fingerprint, context.run_id)
    with run_log(run.root):  # every line of this attempt also goes to the run's zk0.log
        tracker = run_tracker(run, cfg, saved)
        audit = AuditLog(run.root, context.run_id, attempt)
        try:
            state = start_state(grid, cfg, policy, fingerprint, saved, audit, tracker.log)
            round_end = ServerRoundEnd(cfg, registry, run, policy, state, tracker)
            run_rounds(grid, SmolVLAStrategy(cfg, state.wire, context.run_id), state, round_end, run,
                       first=saved.server_round + 1 if saved else 0)
        except RoundFailed as err:
            log(ERROR, "zk0 run failed: %s", err)  # into zk0.log too; Flower reports the run failed
            raise
        finally:
            tracker.close()
            write_charts(run.root)
        rounds = range(cfg.federation.num_server_rounds + 1)
        for line in summary_table([tracker.round_summary(r) | {"round": r} for r in rounds]):
            log(INFO, "%s", line)
        log(INFO, "zk0 run folder: %s", run.root)
        if cfg.tracking.hf_repo_id:
            log(INFO, "zk0 %s", push_at_end(run.root, cfg))


def open_run(cfg: RunConfig, registry: Registry, fingerprint: str,
             run_id: int) -> tuple[RunFolder, ServerState | None, int]:
    """A new run folder, or the one named by ``resume-from`` with its saved server state; and the attempt."""
    state = None
    if cfg.tracking.resume_from:
        run = RunFolder.existing(cfg.tracking.resume_from)
        state = ServerState.load(run, cfg, fingerprint)
        log(INFO, "zk0 resuming %s after round %d of %d", run.root, state.server_round,
            cfg.federation.num_server_rounds)
    else:
        run = RunFolder.create(cfg.tracking.output_dir, cfg.federation.strategy, run_id)
        run.write_config(cfg, registry, fingerprint)
        log(INFO, "zk0 run folder: %s", run.root)
    return run, state, run.add_flower_run(run_id)


def run_tracker(run: RunFolder, cfg: RunConfig, saved: ServerState | None) -> Tracker:
    """The run's tracker. A resumed run keeps the records of what it does not redo: the rounds up to the
    saved one, or, when the saved round's end is pending (it is redone), that round's records from before its
    end, as saved with it."""
    if saved is None or saved.pending_end is None:
        return Tracker(run.root, cfg, resume_after=saved.server_round if saved else None)
    tracker = Tracker(run.root, cfg, resume_after=saved.server_round - 1)
    for record in saved.pending_end:
        tracker.log(record)
    return tracker


def start_state(grid: Grid, cfg: RunConfig, policy, fingerprint: str, saved: ServerState | None, audit: AuditLog,
                on_event: Event) -> RoundState:
    """A resumed run's saved state, or a new run's: the initial trainable tensors and the clients' pooled stats."""
    if saved:
        return RoundState.resumed(saved, cfg, audit, on_event)
    random.seed(cfg.seed)  # Flower samples nodes with the random module
    norm_stats = gather_norm_stats(grid, cfg, audit, feature_sizes(policy.config), on_event)
    return RoundState(cfg, trainable_state(policy), norm_stats, fingerprint, audit, on_event)


def run_rounds(grid: Grid, strategy: SmolVLAStrategy, state: RoundState, round_end: RoundEnd, run: RunFolder,
               first: int) -> None:
    """Rounds ``first..num-server-rounds``: train, federated evaluation, end of round, save state.

    Round 0 (``first == 0``, a new run) only evaluates the initial model on clients and server:
    the baseline every later round is compared with. A round's federated evaluation goes with
    the next round's train messages where it can (:meth:`SmolVLAStrategy.evaluates_with_next_train`):
    they carry that very model, so it travels once per round, and the round ends once the next
    round's replies are in (:func:`train_round`). Its state is saved before that, end pending, so a
    run resumed from it redoes its end with the next round, and clients that kept their state
    continue as if the server had never stopped. The last round's evaluation goes on its own. The
    strategy picks the nodes; the state gives each message its payload (:meth:`RoundState.address`).
    A dp run stops after the last round ``dp-max-epsilon`` affords (:meth:`zk0.privacy.Privacy.affords`),
    which ends as the final round does: evaluated and checkpointed.
    """
    for server_round in range(first, state.cfg.federation.num_server_rounds + 1):
        if server_round and not state.privacy.affords(server_round):
            break  # a resumed dp run that had stopped for its budget
        state.server_round = server_round
        if server_round:
            log(INFO, "zk0 round %d/%d: training", server_round, state.cfg.federation.num_server_rounds)
            train_round(grid, strategy, state, round_end)
        last = server_round == state.cfg.federation.num_server_rounds or not state.privacy.affords(server_round + 1)
        state.end_pending = not last and strategy.evaluates_with_next_train(server_round)
        if not state.end_pending:
            evaluate_round(grid, strategy, state)
            state.tune(round_end(server_round, state.measured(server_round), last))
        state.save(run, [record for record in round_end.tracker.records if record["round"] == server_round])
        if last:
            break


def train_round(grid: Grid, strategy: SmolVLAStrategy, state: RoundState, round_end: RoundEnd) -> None:
    """Train round r; when round r-1's end is pending, its evaluations go with round r's messages, and it ends
    once their replies are in, with round r-1's global model: before round r's update is applied.

    Round r-1's evaluating nodes are drawn before round r's training ones, as when each round
    evaluated on its own: the same random draws pick the same nodes.
    """
    clock = state.clock(state.server_round)
    evaluating = (strategy.configure_evaluate(state.server_round - 1, ArrayRecord(), ConfigRecord(), grid)
                  if state.end_pending else [])
    training = list(strategy.configure_train(state.server_round, ArrayRecord(), state.train_config(), grid))
    with clock.part("seal"):
        messages = state.address(evaluating_first(training, evaluating))
    with clock.part("exchange"):
        replies = exchange(grid, state, messages)
    trained, evaluated, carried = sort_replies(messages, replies)
    if state.end_pending:
        end_previous_round(strategy, state, round_end, evaluated, carried)
    with clock.part("aggregate"):
        receive_train(strategy, state, trained)


def evaluate_round(grid: Grid, strategy: SmolVLAStrategy, state: RoundState) -> None:
    """This round's federated evaluation in messages of its own (the last round's, or one that cannot wait)."""
    clock = state.clock(state.server_round)
    with clock.part("seal"):
        messages = state.address(strategy.configure_evaluate(state.server_round, ArrayRecord(), ConfigRecord(),
                                                              grid))
    if messages:
        with clock.part("exchange"):
            replies = exchange(grid, state, messages)
        receive_evaluate(strategy, state, replies)


def exchange(grid: Grid, state: RoundState, messages: list[Message]) -> list[Message]:
    """Send the messages, wait up to ``round-timeout``, report who never answered (by round and phase)."""
    state.sent(messages)
    replies, unanswered = send(grid, state.cfg, messages, state.audit)
    for message in sorted(unanswered, key=lambda m: m.metadata.dst_node_id):
        state.on_event({"round": message_round(message), "source": "server", "event": "missing-reply",
                        "phase": message.metadata.message_type, "node": message.metadata.dst_node_id})
    return replies


def sort_replies(messages: list[Message], replies: list[Message]) -> tuple[list[Message], list[Message],
                                                                            list[Message]]:
    """The replies to train messages, the replies to evaluate messages, and the evaluations that replies to
    ``evaluate-first`` train messages carry (:func:`carried_evaluation`)."""
    requests = {message.metadata.message_id: message for message in messages}
    trained, evaluated, carried = [], [], []
    for reply in replies:
        if reply.metadata.message_type == MessageType.EVALUATE:
            evaluated.append(reply)
            continue
        trained.append(reply)
        request = requests.get(reply.metadata.reply_to_message_id)
        if request is not None and request.content["config"].get("evaluate-first"):
            carried.append(carried_evaluation(reply, request))
    return trained, evaluated, carried


def carried_evaluation(reply: Message, request: Message) -> Message:
    """The evaluation a reply to an ``evaluate-first`` train message carries, as the evaluate reply it stands for
    (its ``eval-metrics``, and the payload naming its sender and round), so it is checked, audited and logged
    as one; a failed reply, or one whose evaluation failed (``eval-error``), is a failed evaluation."""
    if reply.has_error():
        return Message(reply.error, reply_to=request)
    payload = reply.content.config_records.get("payload")
    if payload is not None and (reason := payload.get("eval-error")):
        return Message(Error(code=CLIENT_ERROR, reason=one_line(str(reason))), reply_to=request)
    records = {"metrics": reply.content.metric_records.get("eval-metrics"), "payload": payload}
    return Message(RecordDict({name: record for name, record in records.items() if record is not None}),
                   reply_to=request)


def receive_train(strategy: SmolVLAStrategy, state: RoundState, replies: list[Message]) -> None:
    """Verify the train replies, record every verdict, and apply the accepted updates' mean to the global tensors."""
    verdicts = strategy.verify_train(state.server_round, replies)
    state.received("train", verdicts, state.server_round)
    mean = strategy.aggregate_train(state.server_round, verdicts)
    state.apply(mean, len(passed(verdicts)))


def receive_evaluate(strategy: SmolVLAStrategy, state: RoundState, replies: list[Message]) -> MetricRecord | None:
    """Verify the evaluate replies, record every verdict; the accepted held-out metrics' weighted mean."""
    verdicts = strategy.verify_evaluate(state.server_round, replies)
    state.received("evaluate", verdicts, state.server_round)
    return strategy.aggregate_evaluate(state.server_round, verdicts)


def end_previous_round(strategy: SmolVLAStrategy, state: RoundState, round_end: RoundEnd, replies: list[Message],
                       carried: list[Message]) -> None:
    """Round r-1's evaluations (evaluate replies of nodes that did not train, and the evaluations train replies
    carried: replies of round r), recorded as round r-1's, then round r-1's end."""
    previous = state.server_round - 1
    verdicts = strategy.verify_evaluate(previous, replies) + strategy.verify_evaluate(state.server_round, carried)
    state.received("evaluate", verdicts, previous)
    round_end(previous, state.measured(previous))


def send(grid: Grid, cfg: RunConfig, messages: list[Message],
         audit: AuditLog) -> tuple[list[Message], list[Message]]:
    """Send and wait up to ``round-timeout``; the replies (each carrying the node it answers for) and the messages
    no reply came for (their silent nodes logged and audited)."""
    replies = list(grid.send_and_receive(messages, timeout=cfg.federation.round_timeout)) if messages else []
    requests = {m.metadata.message_id: m for m in messages}
    for reply in replies:  # the SuperLink itself answers for a node it lost ("Node Unavailable"): name that node
        request = requests.get(reply.metadata.reply_to_message_id)
        set_reply_sender(reply, request.metadata.dst_node_id if request else reply.metadata.src_node_id)
    answered = {r.metadata.src_node_id for r in replies}
    unanswered = [message for message in messages if message.metadata.dst_node_id not in answered]
    for message in unanswered:
        node, phase = message.metadata.dst_node_id, message.metadata.message_type
        log(WARNING, "round %d: node %s sent no %s reply within round-timeout=%.0fs", message_round(message),
            node, phase, cfg.federation.round_timeout)
        audit.missing(message_round(message), phase, node, cfg.federation.round_timeout)
    return replies, unanswered


def message_round(message: Message) -> int:
    """The round a message of the server belongs to (its config's ``server-round``; the query phase is round 0)."""
    return int(message.content["config"].get("server-round", 0))


def gather_norm_stats(grid: Grid, cfg: RunConfig, audit: AuditLog, sizes: dict[str, int], on_event: Event) -> str:
    """Ask every client for its training-episode stats and pool the plausible ones (one shared normalisation).

    Every field of a reply is untrusted: :func:`zk0.strategy.checked_query` rejects one that is
    malformed or implausible and the run goes on with the others (at least ``min-train-nodes``);
    pooling caps each client's weight (:func:`zk0.data.pool_reports`). Pooled stats of two clients
    reveal each one's stats to the other (subtract your own), so fewer than ``min-stats-clients``
    contributors (default 3) fail the run before anything is shared; an operator whose two owners
    accept that lowers it to 2, and the log says what it allows. Under DP the stats are a release
    (:func:`zk0.privacy.pool_stats`): a budget that cannot pay for it and one round fails first.
    """
    check_budget(cfg)
    fed = cfg.federation
    deadline = time.monotonic() + fed.round_timeout
    needed = max(fed.min_train_nodes, fed.min_stats_clients, 1)
    while len(nodes := list(grid.get_node_ids())) < needed:
        if time.monotonic() > deadline:
            raise RoundFailed(f"only {len(nodes)} node(s) connected after {fed.round_timeout:.0f}s; need {needed} "
                              f"(min-train-nodes={fed.min_train_nodes}, min-stats-clients={fed.min_stats_clients})")
        time.sleep(1)
    messages = [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type=MessageType.QUERY)
                for n in nodes]
    for message in messages:
        audit.sent(0, "query", message)
    replies, _ = send(grid, cfg, messages, audit)
    verdicts = [judge(reply, lambda reply: checked_query(reply, sizes)) for reply in replies]
    report(0, "query", verdicts, audit, on_event)
    reported = passed(verdicts)
    if len(reported) < fed.min_stats_clients:
        raise RoundFailed(f"{len(reported)} of {len(nodes)} clients reported plausible dataset stats, below "
                          f"min-stats-clients={fed.min_stats_clients}: pooled stats of fewer let each client infer "
                          f"the others'; connect more nodes (or lower it if every owner accepts that)")
    if len(reported) < needed:
        raise RoundFailed(f"{len(reported)} of {len(nodes)} clients reported plausible dataset stats; need {needed}")
    reported.sort(key=lambda verdict: sender(verdict.reply, "stats"))  # fixed pooling order: same stats, same bits
    warn_about_stats([verdict.reply.metadata.src_node_id for verdict in reported], [v.value.stats for v in reported])
    record_federation(grid, len(nodes), reported, on_event)
    stats = [verdict.value.stats for verdict in reported]
    return pool_stats(stats, cfg, on_event) if cfg.privacy.dp != "none" else pool_reports(stats)


def record_federation(grid: Grid, connected: int, reported: list[Verdict[QueryReport]], on_event: Event) -> None:
    """Record what the model card and report say about the federation: how it ran and each client's dataset.

    The server never sees the data, so the facts are the ones each client's checked query reply
    gave. They go to round 0 of ``metrics.jsonl``, which a resumed run keeps: its query phase
    does not run again.
    """
    on_event({"round": 0, "source": "server", "event": "federation", "nodes": connected, "reported": len(reported),
              "runtime": "deployment" if deployed(grid) else "simulation"})
    for verdict in reported:
        about = verdict.reply.content["stats"]
        on_event({**verdict.value.facts, "round": 0, "source": "server", "event": "client-dataset",
                  "node": verdict.reply.metadata.src_node_id, "partition": int(about["partition-id"]),
                  "dataset": str(about["dataset"])})


def warn_about_stats(nodes: list[int], reports: list[dict]) -> None:
    """Warn about outlying clients' stats and about pooled stats that reveal the other clients'."""
    for i in outliers(reports):
        log(WARNING, "node %s reported a state or action mean far outside every other client's range", nodes[i])
    if len(reports) == 2:
        log(WARNING, "2 clients contributed dataset stats: each can infer the other's from the pooled stats "
            "(min-stats-clients allows it)")


class ServerRoundEnd(RoundEnd):
    """The server's end of a round: the global model on the unseen-task sets and in the simulator; its checkpoint."""

    def __init__(self, cfg: RunConfig, registry: Registry, run: RunFolder, policy, state: RoundState,
                 tracker: Tracker) -> None:
        self.registry, self.run, self.policy, self.state = registry, run, policy, state
        self.stats = decode_stats(state.norm_stats)
        self.pre, self.post = make_pre_post_processors(policy.config, dataset_stats=self.stats)
        self.eval_sets = [open_full(e, policy.config) for e in registry.server_eval]
        super().__init__(cfg, tracker, closed_loop_tasks(cfg, registry))

    def prepare(self) -> None:
        """Put the global tensors into the server's policy."""
        load_trainable(self.policy, self.state.master)

    @torch.no_grad()
    def evaluate(self, server_round: int) -> None:
        """Server evaluation on the unseen-task datasets."""
        for entry, dataset in self.eval_sets:
            res = evaluate_dataset(self.policy, self.pre, self.post, dataset, entry.cameras, self.cfg)
            self.tracker.log({"round": server_round, "source": "server", "dataset": entry.name,
                              "eval-loss": res["loss"], "eval-action-mae": res["action_mae"]})

    def evaluate_in_sim(self, server_round: int) -> None:
        """Closed-loop success rate on the registry's simulator tasks; one MP4 per task under ``videos/``."""
        from zk0.sim.policy_eval import evaluate_in_sim, policy_image_size

        videos = self.run.root / "videos" / f"round_{server_round}"
        results = evaluate_in_sim(self.policy, self.pre, self.post, self.sim_tasks, self.cfg.eval.sim_eval_episodes,
                                  self.cfg.seed, policy_image_size(self.policy), videos)
        for task, res in results.items():
            self.tracker.log({"round": server_round, "source": "server", "event": "sim-eval", "dataset": task,
                              "success-rate": res["success-rate"], "episodes": res["episodes"]})

    def checkpoint(self, server_round: int, summary: dict[str, float]) -> None:
        """The global model as a LeRobot policy folder, with this round's card."""
        card = model_card(self.run.root, server_round, self.policy.config)
        save_checkpoint(self.run.checkpoint(server_round), self.policy, self.stats, card)
