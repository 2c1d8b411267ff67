"""The seed's dynamic tuning: FedProx's mu and the clients' learning rate follow the global held-out loss.

Both react to the same signal, the federation's held-out loss (the mean of the clients'
``eval-loss`` on their held-out episodes, each client counting once, as the progress line
shows it: a client with more held-out frames does not steer the others' mu) of each evaluated round, and
both act on the *next* round's train messages, so what a client trains with is what the
server decided and logged:

* **adaptive mu** (``adaptive-mu``): when the loss rose since the last evaluation, clients are
  drifting apart, so mu is multiplied by ``mu-factor``; when it fell, mu is divided by it;
  always within ``[mu-min, mu-max]``;
* **dynamic lr** (``dynamic-lr``): when the loss has not improved on its best by more than
  ``lr-plateau-threshold`` (relative) for ``lr-plateau-patience`` evaluations, the learning
  rate's factor is multiplied by ``lr-plateau-factor`` (as ``ReduceLROnPlateau``), on top of
  the ``lr-schedule``.

:class:`Tuning` is part of the server state, so a resumed run continues with the same values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from zk0.config import TuningConfig


@dataclass
class Tuning:
    """The current mu and lr factor, and what they react to; saved with the server state."""

    mu: float
    lr_factor: float = 1.0
    last_loss: float | None = None
    best_loss: float = math.inf
    stale: int = 0  # evaluations since the best loss improved by more than the threshold

    def observe(self, loss: float, rules: TuningConfig) -> list[str]:
        """Take one evaluated round's held-out ``loss``; return what changed, in words for the log."""
        changes = []
        if rules.adaptive_mu and self.mu > 0 and self.last_loss is not None and loss != self.last_loss:
            factor = rules.mu_factor if loss > self.last_loss else 1 / rules.mu_factor
            mu = min(rules.mu_max, max(rules.mu_min, self.mu * factor))
            if mu != self.mu:
                changes.append(f"proximal mu {self.mu:.4g} -> {mu:.4g} (held-out loss "
                               f"{'rose' if loss > self.last_loss else 'fell'} to {loss:.4g})")
                self.mu = mu
        self.last_loss = loss
        if loss < self.best_loss * (1 - rules.lr_plateau_threshold):
            self.best_loss, self.stale = loss, 0
        else:
            self.stale += 1
            self.best_loss = min(self.best_loss, loss)
        if rules.dynamic_lr and self.stale >= rules.lr_plateau_patience:
            self.lr_factor *= rules.lr_plateau_factor
            self.stale = 0
            changes.append(f"lr factor -> {self.lr_factor:.4g} (held-out loss has not improved on {self.best_loss:.4g} "
                           f"for {rules.lr_plateau_patience} evaluations)")
        return changes

    def state_dict(self) -> dict[str, float | int | None]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, float | int | None]) -> Tuning:
        return cls(**state)
