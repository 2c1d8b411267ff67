"""Differential privacy at the level of a robot owner: clipping, Gaussian noise and the accountant.

``dp=central`` is DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models"), as Flower's fixed-clipping wrappers do it: each client clips its update
(trained minus received) to L2 norm ``dp-clip-norm`` (Flower's FlatClip); the server averages
the clipped updates with equal weights and adds Gaussian noise of standard deviation
``dp-noise-multiplier × dp-clip-norm / n`` to the mean of ``n`` updates (Flower's
``compute_stdv``), before the server optimizer's step. ``dp=local`` is Flower's ``LocalDpMod``:
each client adds noise of ``dp-noise-multiplier × dp-clip-norm`` to its own clipped update
before sealing it, so the guarantee holds against the server too, at √n times the noise in
the mean. The arithmetic is done here on torch tensors: Flower's helpers work on numpy copies
and draw from numpy's global generator, which the server state cannot keep.

Either way, every round is one Gaussian release with that noise multiplier, and so is the
normalisation statistics' release before round 1 (:func:`client_stats`, :func:`pool_stats`).
:class:`GaussianAccountant` composes them: the Rényi DP of the Gaussian mechanism,
``α / (2σ²)`` per release at each order ``α``, converted to (ε, δ) as Google's
``dp-accounting`` (the backend of Flower's ``RdpAccountant``) does, with its orders; its
``state_dict`` is Flower's. Every client takes part in every round (``fraction-train`` below 1
is accounted the same: no amplification by sampling is claimed).

Noise comes from generators seeded by the operating system, never from ``seed``: the run
config travels to every node, and noise anyone can regenerate protects nothing. The server's
generator state is part of the server state, so a resumed run adds the very noise an
uninterrupted one would have.
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Callable, Iterable, Mapping
from logging import WARNING

import numpy as np
import torch
from flwr.common.logger import log
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, PrivacySpent, SamplingMethod

from zk0.config import RunConfig
from zk0.data import encode_stats
from zk0.strategy import RoundFailed

# dp-accounting's DEFAULT_RDP_ORDERS, which Flower's RdpAccountant uses
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024])
BF16_ROUNDING = 2.0 ** -8  # bf16 rounds each value to within this fraction of itself (8 significant bits)
STD_FLOOR = 0.05  # pooled stats under DP: std at least this fraction of dp-stats-bound (9 degrees at 180)


class GaussianAccountant:
    """Flower's ``RdpAccountant`` for what zk0 releases: Gaussian mechanisms, no amplification by sampling.

    The same methods, results and ``state_dict`` as Flower's, whose backend (``dp-accounting``,
    ``flwr[dp]``) zk0 does not install: here the closed-form Rényi DP of the Gaussian mechanism.
    """

    def __init__(self, config: PrivacyConfig) -> None:
        if config.sampling_method is not SamplingMethod.NO_AMPLIFICATION:
            raise ValueError("zk0's accountant composes releases without sampling amplification only")
        self.config = config
        self.compositions: list[tuple[GaussianPrivacyEvent, int]] = []

    @property
    def num_releases(self) -> int:
        return sum(count for _, count in self.compositions)

    def compose(self, event: GaussianPrivacyEvent, count: int = 1) -> None:
        self.compositions.append((event, count))

    def get_epsilon(self, delta: float) -> float:
        return _epsilon(self.compositions, delta)[0]

    def get_privacy_spent(self, delta: float | None = None) -> PrivacySpent:
        delta = self.config.target_delta if delta is None else delta
        epsilon, order = _epsilon(self.compositions, delta)
        return PrivacySpent(epsilon, delta, self.num_releases, "rdp", order)

    def would_exceed(self, event: GaussianPrivacyEvent, max_epsilon: float | None = None, count: int = 1) -> bool:
        """Whether composing ``count`` more ``event`` would spend more than ``max_epsilon`` (committing nothing)."""
        limit = self.config.max_epsilon if max_epsilon is None else max_epsilon
        if limit is None:
            raise ValueError("would_exceed needs max_epsilon, given or configured")
        return _epsilon([*self.compositions, (event, count)], self.config.target_delta)[0] > limit

    def state_dict(self) -> dict[str, object]:
        """Flower's ``RdpAccountant.state_dict`` schema: the configuration and the ledger of releases."""
        config = self.config
        return {"schema_version": 1, "backend": "rdp",
                "config": {"target_delta": config.target_delta, "population_size": config.population_size,
                           "neighboring_relation": config.neighboring_relation.value,
                           "sampling_method": config.sampling_method.value, "max_epsilon": config.max_epsilon},
                "orders": list(RDP_ORDERS),
                "compositions": [{"event": {"noise_multiplier": event.noise_multiplier,
                                            "sample_size": event.sample_size,
                                            "population_size": event.population_size}, "count": count}
                                 for event, count in self.compositions]}

    def load_state_dict(self, state: Mapping) -> None:
        if state["backend"] != "rdp" or tuple(state["orders"]) != RDP_ORDERS:
            raise ValueError("accountant state from another backend or other RDP orders")
        self.compositions = [(GaussianPrivacyEvent(**entry["event"]), entry["count"])
                             for entry in state["compositions"]]


def _epsilon(compositions: Iterable[tuple[GaussianPrivacyEvent, int]], delta: float) -> tuple[float, float]:
    """ε at ``delta`` and the order that gives it, for releases composed at every order of ``RDP_ORDERS``.

    Rényi DP adds up over releases; the conversion is Proposition 12 of Canonne, Kamath and
    Steinke 2020, term for term as ``dp_accounting.rdp.compute_epsilon`` computes it.
    """
    orders = np.array(RDP_ORDERS)
    rdp = np.zeros_like(orders)
    for event, count in compositions:
        rdp += count * np.array([alpha / (2 * event.noise_multiplier ** 2) for alpha in RDP_ORDERS])
    eps = [0.0 if delta ** 2 + math.expm1(-r) > 0
           else r + math.log1p(-1 / a) - math.log(delta * a) / (a - 1) if a > 1.01 else math.inf
           for a, r in zip(orders, rdp)]
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), float(orders[best])


def accountant(cfg: RunConfig) -> GaussianAccountant:
    """An empty accountant at the run's ``dp-delta`` (add-or-remove one robot owner's data)."""
    return GaussianAccountant(PrivacyConfig(target_delta=cfg.privacy.dp_delta, population_size=1,
                                            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                            sampling_method=SamplingMethod.NO_AMPLIFICATION,
                                            max_epsilon=cfg.privacy.dp_max_epsilon or None))


def release(multiplier: float) -> GaussianPrivacyEvent:
    """One Gaussian release. Without amplification the sample and population sizes do not count: 1 and 1."""
    return GaussianPrivacyEvent(noise_multiplier=multiplier, sample_size=1, population_size=1)


@functools.cache
def noise_multiplier(cfg: RunConfig) -> float:
    """``dp-noise-multiplier``, or with ``dp-target-epsilon`` the smallest multiplier (to 0.1 %) whose
    ``num-server-rounds`` rounds and statistics release spend at most that ε at ``dp-delta``."""
    target = cfg.privacy.dp_target_epsilon
    if not target:
        return cfg.privacy.dp_noise_multiplier
    releases = cfg.federation.num_server_rounds + 1
    low, high = 1e-3, 1e4
    for _ in range(60):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if _epsilon([(release(middle), releases)], cfg.privacy.dp_delta)[0] > target \
            else (low, middle)
    return high


def clip_(tensors: Iterable[torch.Tensor], bound: float) -> float:
    """Scale ``tensors`` (in place) so their joint L2 norm is at most ``bound`` (FlatClip); return the norm before."""
    tensors = list(tensors)
    norm = math.sqrt(sum(float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in tensors))
    if norm > bound:
        torch._foreach_mul_(tensors, bound / norm)
    return norm


def add_noise_(tensors: Iterable[torch.Tensor], std: float, generator: torch.Generator) -> None:
    """Add Gaussian noise of standard deviation ``std`` to every value of ``tensors``, in place."""
    for tensor in tensors:
        tensor.add_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype), alpha=std)


def secret_generator() -> torch.Generator:
    """A torch generator seeded by the operating system (nobody can regenerate its noise from the run config)."""
    return torch.Generator().manual_seed(secrets.randbits(63))


@functools.cache
def _client_generator() -> torch.Generator:
    """This process's generator for a client's local noise."""
    return secret_generator()


def privatize_update(update: Mapping[str, torch.Tensor], cfg: RunConfig) -> None:
    """A client's update before sealing, in place: clipped to ``dp-clip-norm``; with ``dp=local``, noised.

    Central DP bounds the update the server decodes: bf16 rounds each value by up to
    ``BF16_ROUNDING`` of itself, so a bf16 update is clipped that much tighter. Local noise is
    added before rounding (rounding it is post-processing).
    """
    settings = cfg.privacy
    if settings.dp == "none":
        return
    rounding = BF16_ROUNDING if settings.dp == "central" and cfg.transport.transport_dtype == "bf16" else 0.0
    clip_(update.values(), settings.dp_clip_norm / (1 + rounding))
    if settings.dp == "local":
        add_noise_(update.values(), noise_multiplier(cfg) * settings.dp_clip_norm, _client_generator())


class Privacy:
    """The server's side: noise on each round's mean (central DP), the accountant, the budget.

    A new run starts with the statistics' release composed (the query phase comes before any
    round state); :meth:`state_dict` goes into the server state.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.settings, self.rounds = cfg.privacy, cfg.federation.num_server_rounds
        self.multiplier = noise_multiplier(cfg) if self.enabled else 0.0
        self.accountant = accountant(cfg)
        self.generator = secret_generator()
        if self.enabled:
            self.accountant.compose(release(self.multiplier))

    @property
    def enabled(self) -> bool:
        return self.settings.dp != "none"

    def release(self, mean: Mapping[str, torch.Tensor], contributors: int, server_round: int) -> dict:
        """Round ``server_round``'s release of the mean of ``contributors`` clipped updates: central DP adds its
        noise here, in place. Returns the round's privacy record."""
        if self.settings.dp == "central":
            add_noise_(mean.values(), self.multiplier * self.settings.dp_clip_norm / contributors, self.generator)
        self.accountant.compose(release(self.multiplier))
        return self.record(server_round)

    def affords(self, server_round: int) -> bool:
        """Whether ``server_round`` keeps the run within ``dp-max-epsilon``; if not, says so in one line."""
        if not (self.enabled and self.settings.dp_max_epsilon):
            return True
        event = release(self.multiplier)
        if not self.accountant.would_exceed(event):
            return True
        after, _ = _epsilon([*self.accountant.compositions, (event, 1)], self.settings.dp_delta)
        log(WARNING, "zk0 dp: stopping after round %d of %d: round %d would spend ε=%.3g > dp-max-epsilon=%g "
            "(δ=%g; ε so far %.3g)", server_round - 1, self.rounds, server_round, after, self.settings.dp_max_epsilon,
            self.settings.dp_delta, self.accountant.get_epsilon(self.settings.dp_delta))
        return False

    def record(self, server_round: int) -> dict:
        """What ``metrics.jsonl`` says of the privacy spent once ``server_round`` was released."""
        spent = self.accountant.get_privacy_spent()
        return {"round": server_round, "source": "server", "event": "privacy", "dp": self.settings.dp,
                "epsilon": spent.epsilon, "delta": spent.delta, "releases": spent.num_releases,
                "noise-multiplier": self.multiplier, "clip-norm": self.settings.dp_clip_norm}

    def state_dict(self) -> dict:
        return {"accountant": self.accountant.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping) -> None:
        if state:
            self.accountant.load_state_dict(state["accountant"])
            self.generator.set_state(state["generator"])


def check_budget(cfg: RunConfig) -> None:
    """Fail before anything is released when ``dp-max-epsilon`` cannot pay for the statistics and one round."""
    settings = cfg.privacy
    if settings.dp == "none" or not settings.dp_max_epsilon:
        return
    first = accountant(cfg)
    first.compose(release(noise_multiplier(cfg)), 2)
    if (epsilon := first.get_epsilon(settings.dp_delta)) > settings.dp_max_epsilon:
        raise RoundFailed(f"dp-max-epsilon={settings.dp_max_epsilon:g} cannot pay for the normalisation statistics "
                          f"and round 1 (ε={epsilon:.3g} at δ={settings.dp_delta:g} with noise multiplier "
                          f"{noise_multiplier(cfg):.3g}); raise dp-max-epsilon or dp-noise-multiplier")


# Normalisation statistics. SmolVLA normalises state and action by mean and std, so under DP
# that is all a client reports: per feature, its mean and std divided by the public bound B
# (dp-stats-bound), clipped together to L2 norm 1. The server pools them with equal weights: the
# pooled std is the clients' mean std (the spread between their means is left out). Min, max and
# quantiles (single frames' values) are replaced by ±B.


def client_stats(stats: dict[str, dict[str, np.ndarray]], cfg: RunConfig) -> dict[str, dict[str, np.ndarray]]:
    """A client's stats as it reports them under DP: clipped mean and std, noised with ``dp=local``; unchanged
    without DP."""
    settings = cfg.privacy
    if settings.dp == "none":
        return stats
    moments = _clipped_moments(stats, settings.dp_stats_bound)
    if settings.dp == "local":
        moments = moments + noise_multiplier(cfg) * _numpy_generator().standard_normal(moments.shape)
    return _stats(moments, _sizes(stats), settings.dp_stats_bound, count=1, floor=0.0)


def pool_stats(reports: list[dict[str, dict[str, np.ndarray]]], cfg: RunConfig, on_event: Callable[[dict], None],
               rng: np.random.Generator | None = None) -> str:
    """The federation's stats from DP reports (:func:`client_stats`), encoded: the clipped moments' mean with
    equal weights, noised here with ``dp=central``; logs round 0's privacy record (the release).

    The server clips each report again, so the bound holds whatever a client sent.
    """
    settings = cfg.privacy
    moments = np.mean([_clipped_moments(report, settings.dp_stats_bound) for report in reports], axis=0)
    if settings.dp == "central":
        rng = rng or _numpy_generator()
        moments = moments + noise_multiplier(cfg) / len(reports) * rng.standard_normal(moments.shape)
    stats = _stats(moments, _sizes(reports[0]), settings.dp_stats_bound, count=len(reports),
                   floor=STD_FLOOR * settings.dp_stats_bound)
    on_event(Privacy(cfg).record(0))
    return encode_stats(stats)


def _numpy_generator() -> np.random.Generator:
    return np.random.default_rng(secrets.randbits(128))


def _sizes(stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, int]:
    return {key: int(np.asarray(stats[key]["mean"]).size) for key in sorted(stats)}


def _clipped_moments(stats: Mapping[str, Mapping[str, np.ndarray]], bound: float) -> np.ndarray:
    """Per feature (in key order) mean / B and std / B, in one vector of L2 norm at most 1."""
    moments = np.concatenate([np.asarray(stats[key][name], dtype=np.float64) / bound
                              for key in sorted(stats) for name in ("mean", "std")])
    norm = float(np.linalg.norm(moments))
    return moments / norm if norm > 1 else moments


def _stats(moments: np.ndarray, sizes: dict[str, int], bound: float, count: int,
           floor: float) -> dict[str, dict[str, np.ndarray]]:
    """LeRobot-shaped stats from moments (:func:`_clipped_moments`): mean within ±B, std at least ``floor``
    (pooled: ``STD_FLOOR`` × B, so noise cannot blow the normaliser up), min and max ±B."""
    out, start = {}, 0
    for key, size in sizes.items():
        mean, std = (moments[start + i * size:start + (i + 1) * size] * bound for i in (0, 1))
        start += 2 * size
        out[key] = {"mean": np.clip(mean, -bound, bound), "std": np.maximum(std, floor),
                    "min": np.full(size, -bound), "max": np.full(size, bound), "count": np.array([count])}
    return out
