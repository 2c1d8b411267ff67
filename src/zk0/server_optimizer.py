"""Server-side optimizers on the fp32 global tensors: FedAvgM, FedAdam and FedYogi.

Clients send updates (trained minus received); the strategy averages them into one
``delta``. Plain FedAvg/FedProx add ``delta`` to the global tensors. Adaptive federated
optimization (Reddi et al. 2021, "Adaptive Federated Optimization") treats ``delta`` as a
pseudo-gradient step and feeds it to a server optimizer instead:

* ``fedavgm``: server momentum, ``v = beta_1 * v + delta``, ``w += server_lr * v``;
* ``fedadam``: ``m = beta_1 m + (1 - beta_1) delta``, ``v = beta_2 v + (1 - beta_2) delta^2``,
  ``w += eta_t m / (sqrt(v) + tau)`` with Flower's bias correction ``eta_t``;
* ``fedyogi``: as Adam, but ``v -= (1 - beta_2) delta^2 sign(v - delta^2)``, no bias correction.

A normalised step (FedAdam, FedYogi) keeps its size while the clients' lr decays, so with
``server-lr-follows-schedule`` the server's lr is scaled by the run's lr schedule too (the lr of a centralized
Adam that the server's Adam stands in for when clients send one plain SGD step each).

The arithmetic is Flower's own (``flwr.serverapp.strategy.FedAvgM/FedAdam/FedYogi``), done in
place on torch tensors over the update-delta design (Flower's strategies average weights, not
updates, and keep their state inside the strategy object). The moments live here, and
:meth:`ServerOptimizer.state_dict` goes into the server state so a resumed run continues
bit-identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from zk0.config import SERVER_OPTIMIZERS



@dataclass
class ServerOptimizer:
    """One server optimizer and its moments, applied to the global tensors one round at a time."""

    name: str
    lr: float = 1.0
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # "m"/"v" -> name -> tensor

    def __post_init__(self) -> None:
        if self.name not in SERVER_OPTIMIZERS:
            raise ValueError(f"server-optimizer must be one of {SERVER_OPTIMIZERS}, got {self.name!r}")

    def step(self, master: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], server_round: int,
             lr_factor: float = 1.0) -> None:
        """Move ``master`` (in place) by the round's averaged client ``delta``; the step size is ``lr`` times
        ``lr_factor`` (the run's lr schedule in this round, with ``server-lr-follows-schedule``)."""
        if self.name == "none":
            torch._foreach_add_(_values(master, delta), list(delta.values()))
        elif self.name == "fedavgm":
            self._momentum(master, delta, self.lr * lr_factor)
        else:
            self._adaptive(master, delta, server_round, self.lr * lr_factor)

    def _momentum(self, master: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], lr: float) -> None:
        """FedAvgM: the first round's velocity is the delta itself, as in Flower."""
        velocity = self.moments.get("v")
        if velocity is None:
            velocity = self.moments["v"] = {n: d.clone() for n, d in delta.items()}
        else:
            v = _values(velocity, delta)
            torch._foreach_mul_(v, self.beta_1)
            torch._foreach_add_(v, list(delta.values()))
        torch._foreach_add_(_values(master, delta), _values(velocity, delta), alpha=lr)

    def _adaptive(self, master: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], server_round: int,
                  lr: float) -> None:
        """FedAdam / FedYogi: first and second moments of the delta, then a normalised step."""
        if "m" not in self.moments:  # zeros made once: a setdefault would build two models' worth every round
            self.moments.update({kind: {n: torch.zeros_like(d) for n, d in delta.items()} for kind in ("m", "v")})
        m, v = self.moments["m"], self.moments["v"]
        for name, d in delta.items():
            m[name].mul_(self.beta_1).add_(d, alpha=1 - self.beta_1)
            square = d * d
            if self.name == "fedadam":
                v[name].mul_(self.beta_2).add_(square, alpha=1 - self.beta_2)
            else:
                v[name].sub_(square * torch.sign(v[name] - square), alpha=1 - self.beta_2)
        eta = lr
        if self.name == "fedadam":  # Flower's bias correction, exponent server_round + 1
            eta *= math.sqrt(1 - self.beta_2 ** (server_round + 1.0)) / (1 - self.beta_1 ** (server_round + 1.0))
        for name in delta:
            master[name].addcdiv_(m[name], v[name].sqrt().add_(self.tau), value=eta)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The moments, for the server state a resumed run continues from."""
        return {kind: {n: t.clone() for n, t in tensors.items()} for kind, tensors in self.moments.items()}

    def load_state_dict(self, moments: dict[str, dict[str, torch.Tensor]]) -> None:
        self.moments = {kind: {n: t.clone() for n, t in tensors.items()} for kind, tensors in moments.items()}


def _values(tensors: dict[str, torch.Tensor], order: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` listed in ``order``'s name order, for the multi-tensor kernels."""
    return [tensors[name] for name in order]
