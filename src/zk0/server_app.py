"""ServerApp: wires config, policy, strategy, evaluation, checkpoints and tracking for one run."""

from __future__ import annotations

import random
import time
from logging import INFO

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from lerobot.policies.factory import make_pre_post_processors

from zk0.checkpoint import RunFolder, model_card, save_checkpoint
from zk0.config import RunConfig
from zk0.data import decode_stats, eval_batches, open_full, pool_stats
from zk0.evaluate import evaluate_policy
from zk0.policy import base_fingerprint, build_policy, load_trainable, trainable_state
from zk0.registry import Registry, load_registry
from zk0.report import progress_line, summary_table
from zk0.strategy import RoundFailed, SmolVLAStrategy
from zk0.tracking import Tracker, write_charts

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds and leave everything in the run folder."""
    cfg = RunConfig.from_run_config(context.run_config)
    random.seed(cfg.seed)  # Flower samples nodes with the random module
    registry = load_registry(cfg.datasets)
    policy = build_policy(cfg)
    fingerprint = base_fingerprint(policy)
    run = RunFolder.create(cfg.output_dir, cfg.strategy, context.run_id)
    run.write_config(cfg, registry, fingerprint)
    log(INFO, "zk0 run folder: %s", run.root)
    tracker = Tracker(run.root, cfg)
    try:
        norm_stats = gather_norm_stats(grid, cfg)
        strategy = SmolVLAStrategy(cfg, trainable_state(policy), fingerprint, norm_stats, tracker.log)
        round_end = RoundEnd(cfg, registry, run, policy, strategy, tracker, grid)
        strategy.start(grid, strategy.encoded_master(), cfg.num_server_rounds, timeout=cfg.round_timeout,
                       evaluate_fn=round_end)
    finally:
        tracker.close()
        write_charts(run.root)
    for line in summary_table([tracker.round_summary(r) | {"round": r} for r in range(cfg.num_server_rounds + 1)]):
        log(INFO, "%s", line)
    log(INFO, "zk0 run folder: %s", run.root)


def gather_norm_stats(grid: Grid, cfg: RunConfig) -> str:
    """Ask every client for its training-episode stats and pool them (one shared normalisation)."""
    deadline = time.monotonic() + cfg.round_timeout
    needed = max(cfg.min_train_nodes, 1)
    while len(nodes := list(grid.get_node_ids())) < needed:
        if time.monotonic() > deadline:
            raise RoundFailed(f"only {len(nodes)} node(s) connected after {cfg.round_timeout:.0f}s; need {needed}")
        time.sleep(1)
    messages = [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type=MessageType.QUERY)
                for n in nodes]
    stats = []
    for reply in grid.send_and_receive(messages, timeout=cfg.round_timeout):
        if reply.has_error():
            log(INFO, "node %s could not report dataset stats: %s", reply.metadata.src_node_id, reply.error.reason)
        else:
            stats.append(str(reply.content["stats"]["norm-stats"]))
    if len(stats) < needed:
        raise RoundFailed(f"{len(stats)} of {len(nodes)} clients reported dataset stats; need {needed}")
    return pool_stats(stats)


class RoundEnd:
    """Called by the strategy after each round (and at round 0): evaluate, checkpoint, report."""

    def __init__(self, cfg: RunConfig, registry: Registry, run: RunFolder, policy, strategy: SmolVLAStrategy,
                 tracker: Tracker, grid: Grid) -> None:
        self.cfg, self.registry, self.run, self.policy = cfg, registry, run, policy
        self.strategy, self.tracker, self.grid = strategy, tracker, grid
        self.stats = decode_stats(strategy.norm_stats)
        self.pre, self.post = make_pre_post_processors(policy.config, dataset_stats=self.stats)
        self.eval_sets = [(e, open_full(e, policy.config)) for e in registry.server_eval]
        self.started = time.monotonic()

    def __call__(self, server_round: int, arrays) -> MetricRecord | None:
        last = server_round == self.cfg.num_server_rounds
        evaluating = server_round % self.cfg.eval_every == 0 or last
        checkpointing = server_round > 0 and (server_round % self.cfg.checkpoint_interval == 0 or last)
        if evaluating or checkpointing:
            load_trainable(self.policy, self.strategy.master)
        metrics = {}
        if server_round == 0:  # Flower evaluates clients after rounds only; round 0 is the baseline
            messages = self.strategy.configure_evaluate(0, arrays, ConfigRecord(), self.grid)
            self.strategy.aggregate_evaluate(0, self.grid.send_and_receive(messages, timeout=self.cfg.round_timeout))
        if evaluating:
            metrics = self.evaluate(server_round)
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
        return MetricRecord(metrics) if metrics else None

    @torch.no_grad()
    def evaluate(self, server_round: int) -> dict[str, float]:
        """Server evaluation on the unseen-task datasets; returns the means over datasets."""
        results = []
        for entry, dataset in self.eval_sets:
            res = evaluate_policy(self.policy, self.pre, self.post,
                                  eval_batches(dataset, self.cfg.batch_size, self.cfg.eval_batches, entry.cameras),
                                  seed=self.cfg.seed)
            self.tracker.log({"round": server_round, "source": "server", "dataset": entry.name,
                              "eval-loss": res["loss"], "eval-action-mae": res["action_mae"]})
            results.append(res)
        if not results:
            return {}
        return {"eval-loss": sum(r["loss"] for r in results) / len(results),
                "eval-action-mae": sum(r["action_mae"] for r in results) / len(results)}
