"""ServerApp: wires config, policy, strategy, evaluation, checkpoints and tracking for one run."""

from __future__ import annotations

import random
import time
from logging import INFO, WARNING

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from lerobot.policies.factory import make_pre_post_processors

from zk0.audit import AuditLog
from zk0.checkpoint import RunFolder, ServerState, model_card, save_checkpoint
from zk0.config import RunConfig
from zk0.data import decode_stats, feature_sizes, open_full, outliers, pool_reports
from zk0.evaluate import evaluate_dataset
from zk0.flower_seams import set_reply_sender
from zk0.policy import base_fingerprint, build_policy, load_trainable, trainable_state
from zk0.registry import Registry, load_registry
from zk0.report import progress_line, summary_table
from zk0.sim.policy_eval import evaluate_in_sim, policy_image_size, simulator_tasks
from zk0.strategy import Event, RoundFailed, SmolVLAStrategy, checked_query, screen, sender
from zk0.tracking import Tracker, write_charts

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) ``num-server-rounds`` rounds and leave everything in the run folder."""
    cfg = RunConfig.from_run_config(context.run_config)
    registry = load_registry(cfg.datasets, cfg.registry)
    simulator_tasks(cfg, registry)  # a config that cannot work fails before any work
    policy = build_policy(cfg, cfg.server_device)
    fingerprint = base_fingerprint(policy)
    run, state, attempt = open_run(cfg, registry, fingerprint, context.run_id)
    tracker = Tracker(run.root, cfg, resume_after=state.server_round if state else None)
    audit = AuditLog(run.root, context.run_id, attempt)
    try:
        if state:
            random.setstate(state.python_rng)
            torch.set_rng_state(state.torch_rng)
            master, norm_stats, first = state.master, state.norm_stats, state.server_round + 1
        else:
            random.seed(cfg.seed)  # Flower samples nodes with the random module
            norm_stats = gather_norm_stats(grid, cfg, audit, feature_sizes(policy.config), tracker.log)
            master, first = trainable_state(policy), 0
        strategy = SmolVLAStrategy(cfg, master, fingerprint, norm_stats, tracker.log, audit)
        round_end = RoundEnd(cfg, registry, run, policy, strategy, tracker)
        run_rounds(grid, cfg, strategy, round_end, first)
    finally:
        tracker.close()
        write_charts(run.root)
    for line in summary_table([tracker.round_summary(r) | {"round": r} for r in range(cfg.num_server_rounds + 1)]):
        log(INFO, "%s", line)
    log(INFO, "zk0 run folder: %s", run.root)


def open_run(cfg: RunConfig, registry: Registry, fingerprint: str,
             run_id: int) -> tuple[RunFolder, ServerState | None, int]:
    """A new run folder, or the one named by ``resume-from`` with its saved server state; and the attempt."""
    state = None
    if cfg.resume_from:
        run = RunFolder.existing(cfg.resume_from)
        state = ServerState.load(run, cfg, fingerprint)
        log(INFO, "zk0 resuming %s after round %d of %d", run.root, state.server_round, cfg.num_server_rounds)
    else:
        run = RunFolder.create(cfg.output_dir, cfg.strategy, run_id)
        run.write_config(cfg, registry, fingerprint)
        log(INFO, "zk0 run folder: %s", run.root)
    return run, state, run.add_flower_run(run_id)


def run_rounds(grid: Grid, cfg: RunConfig, strategy: SmolVLAStrategy, round_end: RoundEnd, first: int) -> None:
    """Rounds ``first..num-server-rounds``: train, federated evaluation, server evaluation, save state.

    Round 0 (``first == 0``, a new run) only evaluates the initial model on clients and server:
    the baseline every later round is compared with.
    """
    if first == 0:
        exchange(grid, cfg, 0, "evaluate", strategy.configure_evaluate(0, strategy.encoded_master(), ConfigRecord(),
                                                                        grid), strategy)
        round_end(0)
        save_state(0, cfg, strategy, round_end.run)
    for server_round in range(max(first, 1), cfg.num_server_rounds + 1):
        log(INFO, "zk0 round %d/%d", server_round, cfg.num_server_rounds)
        exchange(grid, cfg, server_round, "train",
                 strategy.configure_train(server_round, strategy.encoded_master(), ConfigRecord(), grid), strategy)
        exchange(grid, cfg, server_round, "evaluate",
                 strategy.configure_evaluate(server_round, strategy.encoded_master(), ConfigRecord(), grid), strategy)
        round_end(server_round)
        save_state(server_round, cfg, strategy, round_end.run)


def save_state(server_round: int, cfg: RunConfig, strategy: SmolVLAStrategy, run: RunFolder) -> None:
    """The state a resumed run continues from (after the last completed round)."""
    ServerState(server_round, strategy.master, strategy.norm_stats, cfg.to_run_config(), strategy.fingerprint,
                random.getstate(), torch.get_rng_state()).save(run)


def exchange(grid: Grid, cfg: RunConfig, server_round: int, phase: str, messages, strategy: SmolVLAStrategy) -> None:
    """Send one phase's messages, wait up to ``round-timeout``, log who never answered, aggregate."""
    messages = list(messages)
    replies = send(grid, cfg, server_round, phase, messages, strategy.audit)
    answered = {r.metadata.src_node_id for r in replies}
    for node in sorted({m.metadata.dst_node_id for m in messages} - answered):
        strategy.on_event({"round": server_round, "source": "server", "event": "missing-reply", "phase": phase,
                           "node": node})
    if phase == "train":
        strategy.aggregate_train(server_round, replies)
    elif messages:
        strategy.aggregate_evaluate(server_round, replies)


def send(grid: Grid, cfg: RunConfig, server_round: int, phase: str, messages: list[Message],
         audit: AuditLog) -> list[Message]:
    """Send and wait up to ``round-timeout``; replies carry the node they answer for; silent nodes are logged."""
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout)) if messages else []
    destination = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    for reply in replies:  # the SuperLink itself answers for a node it lost ("Node Unavailable"): name that node
        set_reply_sender(reply, destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id))
    for node in sorted(set(destination.values()) - {r.metadata.src_node_id for r in replies}):
        log(WARNING, "round %d: node %s sent no %s reply within round-timeout=%.0fs", server_round, node, phase,
            cfg.round_timeout)
        audit.missing(server_round, phase, node, cfg.round_timeout)
    return replies


def gather_norm_stats(grid: Grid, cfg: RunConfig, audit: AuditLog, sizes: dict[str, int], on_event: Event) -> str:
    """Ask every client for its training-episode stats and pool the plausible ones (one shared normalisation).

    Every field of a reply is untrusted: :func:`zk0.strategy.checked_query` rejects one that is
    malformed or implausible and the run goes on with the others (at least ``min-train-nodes``);
    pooling caps each client's weight (:func:`zk0.data.pool_reports`). Pooled stats of two clients
    reveal each one's stats to the other (subtract your own), so fewer than ``min-stats-clients``
    contributors (default 3) fail the run before anything is shared; an operator whose two owners
    accept that lowers it to 2, and the log says what it allows.
    """
    deadline = time.monotonic() + cfg.round_timeout
    needed = max(cfg.min_train_nodes, cfg.min_stats_clients, 1)
    while len(nodes := list(grid.get_node_ids())) < needed:
        if time.monotonic() > deadline:
            raise RoundFailed(f"only {len(nodes)} node(s) connected after {cfg.round_timeout:.0f}s; need {needed} "
                              f"(min-train-nodes={cfg.min_train_nodes}, min-stats-clients={cfg.min_stats_clients})")
        time.sleep(1)
    messages = [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type=MessageType.QUERY)
                for n in nodes]
    for message in messages:
        audit.sent(0, "query", message)
    replies = send(grid, cfg, 0, "query", messages, audit)
    reported = screen(0, "query", replies, lambda reply: checked_query(reply, sizes), audit, on_event)
    if len(reported) < cfg.min_stats_clients:
        raise RoundFailed(f"{len(reported)} of {len(nodes)} clients reported plausible dataset stats, below "
                          f"min-stats-clients={cfg.min_stats_clients}: pooled stats of fewer let each client infer "
                          f"the others'; connect more nodes (or lower it if every owner accepts that)")
    if len(reported) < needed:
        raise RoundFailed(f"{len(reported)} of {len(nodes)} clients reported plausible dataset stats; need {needed}")
    reported.sort(key=lambda item: sender(item[0], "stats"))  # a fixed pooling order: same stats, same bits
    warn_about_stats([reply.metadata.src_node_id for reply, _ in reported], [stats for _, stats in reported])
    return pool_reports([stats for _, stats in reported])


def warn_about_stats(nodes: list[int], reports: list[dict]) -> None:
    """Warn about outlying clients' stats and about pooled stats that reveal the other clients'."""
    for i in outliers(reports):
        log(WARNING, "node %s reported a state or action mean far outside every other client's range", nodes[i])
    if len(reports) == 2:
        log(WARNING, "2 clients contributed dataset stats: each can infer the other's from the pooled stats "
            "(min-stats-clients allows it)")


class RoundEnd:
    """Called by the strategy after each round (and at round 0): evaluate, checkpoint, report."""

    def __init__(self, cfg: RunConfig, registry: Registry, run: RunFolder, policy, strategy: SmolVLAStrategy,
                 tracker: Tracker) -> None:
        self.cfg, self.registry, self.run, self.policy = cfg, registry, run, policy
        self.strategy, self.tracker = strategy, tracker
        self.stats = decode_stats(strategy.norm_stats)
        self.pre, self.post = make_pre_post_processors(policy.config, dataset_stats=self.stats)
        self.eval_sets = [open_full(e, policy.config) for e in registry.server_eval]
        self.sim_tasks = simulator_tasks(cfg, registry)
        self.started = time.monotonic()

    def __call__(self, server_round: int) -> None:
        evaluating, checkpointing = self.cfg.evaluates(server_round), self.cfg.checkpoints(server_round)
        sim_evaluating = bool(self.sim_tasks) and self.cfg.sim_evaluates(server_round)
        if evaluating or checkpointing or sim_evaluating:
            load_trainable(self.policy, self.strategy.master)
        if evaluating:
            self.evaluate(server_round)
        if sim_evaluating:
            self.evaluate_in_sim(server_round)
        self.tracker.log({"round": server_round, "source": "server", "event": "round",
                          "bytes-down": self.strategy.bytes_down, "bytes-up": self.strategy.bytes_up,
                          "seconds": round(time.monotonic() - self.started, 2)})
        self.strategy.bytes_down = self.strategy.bytes_up = 0
        self.started = time.monotonic()
        summary = self.tracker.round_summary(server_round)
        if checkpointing:
            card = model_card(self.cfg, self.registry, server_round, summary, self.strategy.fingerprint)
            save_checkpoint(self.run.checkpoint(server_round), self.policy, self.stats, card)
        log(INFO, "%s", progress_line(server_round, self.cfg.num_server_rounds, summary))

    def evaluate_in_sim(self, server_round: int) -> None:
        """Closed-loop success rate on the registry's simulator tasks; one MP4 per task under ``videos/``."""
        videos = self.run.root / "videos" / f"round_{server_round}"
        results = evaluate_in_sim(self.policy, self.pre, self.post, self.sim_tasks, self.cfg.sim_eval_episodes,
                                  self.cfg.seed, policy_image_size(self.policy), videos)
        for task, res in results.items():
            self.tracker.log({"round": server_round, "source": "server", "event": "sim-eval", "dataset": task,
                              "success-rate": res["success-rate"], "episodes": res["episodes"]})

    @torch.no_grad()
    def evaluate(self, server_round: int) -> None:
        """Server evaluation on the unseen-task datasets."""
        for entry, dataset in self.eval_sets:
            res = evaluate_dataset(self.policy, self.pre, self.post, dataset, entry.cameras, self.cfg)
            self.tracker.log({"round": server_round, "source": "server", "dataset": entry.name,
                              "eval-loss": res["loss"], "eval-action-mae": res["action_mae"]})
