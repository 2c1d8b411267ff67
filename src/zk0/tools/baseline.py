"""Baselines for a federated run: the same data, steps and evaluation, without federation.

``centralized``: one policy trained on the pooled training episodes of every client, with as
many optimizer steps per round as a federated round performs in total (``local-steps ×
clients``). ``local``: every client trains alone on its own episodes (``local-steps`` per
round) and never sees another client's update. Both write a run folder shaped like a
federated run's (``config.json`` plus ``"mode"``, ``metrics.jsonl`` with the same record
shapes, charts, checkpoints), so :mod:`zk0.tracking`, :mod:`zk0.report` and
:mod:`zk0.tools.compare` treat all runs alike: :class:`Centralized` and :class:`Local` end
every round with the server's steps (:class:`zk0.rounds.RoundEnd`).

Everything that decides a number is shared with the federation: the episode split
(``held-out-fraction``, ``split-seed``), the initial weights (``build_policy``), the
normalisation (centralized: the clients' stats pooled as the server pools them; local: each
client's own), the per-round lr (``round_lr``), the seeds (``seed + 1000 × round +
partition``), training (``train_steps``, mu = 0) and evaluation (``evaluate_dataset``, the same
frame selection). So round 0 of a centralized baseline evaluates exactly what round 0 of a
federated run evaluates.

Local mode keeps one policy object and swaps each client's trainable tensors in and out: the
frozen base is the same for every client (same seed) and every training call starts a fresh
optimizer, as federated clients do, so this equals one policy per client at a fraction of the
memory. Its server-side records (unseen sets, simulator) carry the mean over the clients'
policies, so they read like a federated run's, and each client's own values under
``"by-partition": [{"partition": i, <metric>: value, ...}, ...]``.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from abc import abstractmethod
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from statistics import mean
from typing import Any

import torch
from flwr.common.logger import log
from lerobot.policies.factory import make_pre_post_processors

from zk0.checkpoint import RunFolder, save_checkpoint
from zk0.config import BASELINE_MODES, ConfigError, RunConfig
from zk0.data import (DatasetSplit, batches, decode_stats, encode_stats, open_full, open_split,
                      pool_stats, rename_cameras, train_loader, vector_stats)
from zk0.evaluate import evaluate_dataset
from zk0.model_card import model_card
from zk0.policy import base_fingerprint, build_policy, load_trainable, trainable_state
from zk0.registry import DatasetEntry, Registry, RegistryError, load_registry
from zk0.report import summary_table
from zk0.rounds import RoundEnd
from zk0.sim.policy_eval import evaluate_in_sim, policy_image_size, simulator_tasks
from zk0.strategy import round_lr
from zk0.tracking import Tracker, write_charts
from zk0.train import train_steps

MODES = BASELINE_MODES
POOLED, POOLED_NAME = -1, "pooled"  # partition and dataset of centralized training records
NO_TRAFFIC = {"bytes-down": 0, "bytes-up": 0}  # nothing travels in a baseline


def run_baseline(cfg: RunConfig, mode: str, num_clients: int | None = None) -> Path:
    """Train and evaluate baseline ``mode`` on the first ``num_clients`` clients (default all); the run folder.

    ``num_clients`` matches ``zk0 simulate --num-clients``: simulation partition ``i`` is
    registry client ``i``, so a baseline covers exactly the clients a federated run had.
    """
    if mode not in MODES:
        raise ConfigError(f"baseline mode must be one of {'|'.join(MODES)}, got {mode!r}")
    if cfg.tracking.resume_from:
        raise ConfigError("baselines cannot resume: run-config 'resume-from' must be empty")
    baseline = {kind.mode: kind for kind in (Centralized, Local)}[mode]
    return baseline(cfg, _clients(load_registry(cfg.data.datasets, cfg.data.registry), num_clients)).run()


def _clients(registry: Registry, num_clients: int | None) -> Registry:
    """The registry restricted to the clients a federated run with ``num_clients`` nodes trains on."""
    n = len(registry.clients) if num_clients is None else num_clients
    if not 1 <= n <= len(registry.clients):
        raise RegistryError(f"num_clients={n}: profile {registry.profile!r} has {len(registry.clients)} clients")
    return dataclasses.replace(registry, clients=registry.clients[:n])


@dataclass
class Learner:
    """One model a baseline trains: its trainable tensors, normalisation and training frames."""

    partition: int
    dataset: str
    weights: dict[str, torch.Tensor]
    stats: dict[str, dict[str, torch.Tensor]]
    loader: torch.utils.data.DataLoader
    cameras: dict[str, str]
    pre: Any
    post: Any


class _Renamed(torch.utils.data.Dataset):
    """One client's training frames with its camera mapping applied and only the keys all clients share.

    Clients may name cameras differently or record extra features; pooled into one loader,
    every frame needs the same keys to collate into a batch.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, cameras: dict[str, str], keys: frozenset[str]) -> None:
        self.dataset, self.cameras, self.keys = dataset, cameras, keys

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = rename_cameras(self.dataset[index], self.cameras)
        return {k: v for k, v in item.items() if k in self.keys}


class Baseline(RoundEnd):
    """One baseline run: data and policy opened once, then rounds of training, each ended as the server ends one.

    The two modes differ only in their learners, the steps each takes per round, which
    held-out episodes each is evaluated on, and how their records and checkpoints are shaped.
    """

    mode: str

    def __init__(self, cfg: RunConfig, registry: Registry) -> None:
        self.cfg, self.registry = cfg, registry
        self.policy = build_policy(cfg)
        self.splits = [open_split(e, self.policy.config, cfg.data.held_out_fraction, cfg.data.split_seed)
                       for e in registry.clients]
        self.eval_sets = [open_full(e, self.policy.config) for e in registry.server_eval]
        self.learners = self.make_learners()
        profile = load_registry(cfg.data.datasets, cfg.data.registry)
        sim_tasks = simulator_tasks(cfg, profile)  # as the server: the whole profile
        self.fingerprint = base_fingerprint(self.policy)
        self.run_folder = RunFolder.create(cfg.tracking.output_dir, self.mode, secrets.randbits(63))
        self._write_config()
        super().__init__(cfg, Tracker(self.run_folder.root, cfg), sim_tasks)

    @abstractmethod
    def make_learners(self) -> list[Learner]:
        """The models this mode trains."""

    @abstractmethod
    def steps_per_round(self) -> int:
        """Optimizer steps of each learner in one round, as many as its part of a federated round has."""

    @abstractmethod
    def assignments(self) -> list[tuple[Learner, list[tuple[int, DatasetSplit]]]]:
        """Which learner is evaluated on which client's held-out episodes."""

    @abstractmethod
    def checkpoint_folder(self, server_round: int, learner: Learner) -> Path:
        """Where ``learner``'s LeRobot policy folder of ``server_round`` goes."""

    def _learner(self, partition: int, name: str, stats: dict, dataset: torch.utils.data.Dataset,
                 cameras: dict[str, str]) -> Learner:
        weights = {n: p.detach().clone() for n, p in trainable_state(self.policy).items()}
        pre, post = make_pre_post_processors(self.policy.config, dataset_stats=stats)
        return Learner(partition, name, weights, stats, train_loader(dataset, self.cfg.train.batch_size,
                                                                     self.cfg.train.num_workers), cameras, pre, post)

    def _write_config(self) -> None:
        """The federated run's ``config.json`` plus ``"mode"``: what compare labels the run by."""
        self.run_folder.write_config(self.cfg, self.registry, self.fingerprint)
        path = self.run_folder.root / "config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | {"mode": self.mode}, indent=2) + "\n")

    def run(self) -> Path:
        """Round 0 evaluates the initial weights; rounds 1..N train, then evaluate."""
        log(INFO, "zk0 %s baseline, run folder: %s", self.mode, self.run_folder.root)
        try:
            for server_round in range(self.cfg.federation.num_server_rounds + 1):
                if server_round:
                    self.train(server_round)
                self(server_round, NO_TRAFFIC)
        finally:
            self.tracker.close()
            write_charts(self.run_folder.root)
        rows = [self.tracker.round_summary(r) | {"round": r} for r in range(self.cfg.federation.num_server_rounds + 1)]
        for line in summary_table(rows):
            log(INFO, "%s", line)
        return self.run_folder.root

    def train(self, server_round: int) -> None:
        """Train every learner one round from where it stopped, seeded as the federated clients are."""
        lr = round_lr(self.cfg, server_round)
        for learner in self.learners:
            load_trainable(self.policy, learner.weights)
            seed = self.cfg.seed + 1000 * server_round + learner.partition
            torch.manual_seed(seed)  # flow-matching noise
            result = train_steps(self.policy, learner.pre, batches(learner.loader, seed, learner.cameras),
                                 steps=self.steps_per_round(), lr=lr, mu=0.0,
                                 grad_clip_norm=self.cfg.train.grad_clip_norm,
                                 optimizer=self.cfg.train.client_optimizer)
            learner.weights = {n: p.detach().clone() for n, p in trainable_state(self.policy).items()}
            self.tracker.log({"round": server_round, "source": "client", "partition": learner.partition,
                              "dataset": learner.dataset, "train-loss": result.loss, "proximal": result.proximal,
                              "grad-norm": result.grad_norm, "steps": result.steps, "lr": lr,
                              "num-examples": result.frames})

    def evaluate(self, server_round: int) -> None:
        """Held-out episodes of every client (``client-eval``) and the unseen sets (``server``)."""
        unseen: dict[str, list[tuple[int, dict[str, float]]]] = {e.name: [] for e, _ in self.eval_sets}
        for learner, splits in self.assignments():
            load_trainable(self.policy, learner.weights)
            for partition, split in splits:
                res = self._evaluate(learner, split.held_out, split.entry)
                self.tracker.log({"round": server_round, "source": "client-eval", "partition": partition,
                                  "dataset": split.entry.name, "eval-loss": res["loss"],
                                  "eval-action-mae": res["action_mae"], "num-examples": int(res["frames"])})
            for entry, dataset in self.eval_sets:
                res = self._evaluate(learner, dataset, entry)
                unseen[entry.name].append((learner.partition,
                                           {"eval-loss": res["loss"], "eval-action-mae": res["action_mae"]}))
        for name, values in unseen.items():
            self.tracker.log(self.server_record(server_round, name, values))

    def _evaluate(self, learner: Learner, dataset: torch.utils.data.Dataset, entry: DatasetEntry) -> dict[str, float]:
        return evaluate_dataset(self.policy, learner.pre, learner.post, dataset, entry.cameras, self.cfg)

    def evaluate_in_sim(self, server_round: int) -> None:
        """Closed-loop success rate of every learner on the registry's simulator tasks."""
        per_task: dict[str, list[tuple[int, dict[str, float]]]] = {t: [] for t in self.sim_tasks}
        for learner in self.learners:
            load_trainable(self.policy, learner.weights)
            results = evaluate_in_sim(self.policy, learner.pre, learner.post, self.sim_tasks,
                                      self.cfg.eval.sim_eval_episodes, self.cfg.seed,
                                      policy_image_size(self.policy), None)
            for task, res in results.items():
                per_task[task].append((learner.partition, {"success-rate": res["success-rate"]}))
        for task, values in per_task.items():
            record = self.server_record(server_round, task, values)
            self.tracker.log(record | {"event": "sim-eval", "episodes": self.cfg.eval.sim_eval_episodes})

    def server_record(self, server_round: int, name: str, values: list[tuple[int, dict[str, float]]]) -> dict:
        """A federated-shaped server record: the mean over learners."""
        return {"round": server_round, "source": "server", "dataset": name,
                **{k: mean(v[k] for _, v in values) for k in values[0][1]}}

    def checkpoint(self, server_round: int, summary: dict[str, float]) -> None:
        """Every learner as a LeRobot policy folder (:meth:`checkpoint_folder`), with the round's card."""
        card = model_card(self.run_folder.root, server_round, self.policy.config)
        for learner in self.learners:
            load_trainable(self.policy, learner.weights)
            save_checkpoint(self.checkpoint_folder(server_round, learner), self.policy, learner.stats, card)


class Centralized(Baseline):
    """One policy on the pooled training episodes of every client, with a whole federated round's steps."""

    mode = "centralized"

    def make_learners(self) -> list[Learner]:
        """All clients' training episodes in one loader, normalised with their pooled stats."""
        stats = decode_stats(pool_stats([encode_stats(vector_stats(s.train)) for s in self.splits]))
        keys = frozenset.intersection(*(frozenset(rename_cameras(s.train[0], s.entry.cameras)) for s in self.splits))
        pooled = torch.utils.data.ConcatDataset([_Renamed(s.train, s.entry.cameras, keys) for s in self.splits])
        return [self._learner(POOLED, POOLED_NAME, stats, pooled, {})]

    def steps_per_round(self) -> int:
        """All the optimizer steps a federated round performs: ``local-steps`` of every client."""
        return self.cfg.train.local_steps * len(self.splits)

    def assignments(self) -> list[tuple[Learner, list[tuple[int, DatasetSplit]]]]:
        """The pooled model on every client's held-out episodes."""
        return [(self.learners[0], list(enumerate(self.splits)))]

    def checkpoint_folder(self, server_round: int, learner: Learner) -> Path:
        """``round_<N>/``, as a federated run's."""
        return self.run_folder.checkpoint(server_round)


class Local(Baseline):
    """Every client trains alone on its own episodes and never sees another client's update."""

    mode = "local"

    def make_learners(self) -> list[Learner]:
        """One learner per client, each normalised with its own training episodes' stats."""
        return [self._learner(i, s.entry.name, decode_stats(encode_stats(vector_stats(s.train))), s.train,
                              s.entry.cameras) for i, s in enumerate(self.splits)]

    def steps_per_round(self) -> int:
        """One client's optimizer steps of a federated round."""
        return self.cfg.train.local_steps

    def assignments(self) -> list[tuple[Learner, list[tuple[int, DatasetSplit]]]]:
        """Each client's policy on its own held-out episodes only."""
        indexed = list(enumerate(self.splits))
        return [(learner, [indexed[learner.partition]]) for learner in self.learners]

    def server_record(self, server_round: int, name: str, values: list[tuple[int, dict[str, float]]]) -> dict:
        """The mean over the clients' policies, and each one's own value under ``by-partition``."""
        return super().server_record(server_round, name, values) | {
            "by-partition": [{"partition": p, **v} for p, v in values]}

    def checkpoint_folder(self, server_round: int, learner: Learner) -> Path:
        """``round_<N>/partition_<i>/``: one policy per client."""
        return self.run_folder.checkpoint(server_round) / f"partition_{learner.partition}"
