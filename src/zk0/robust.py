"""Robust aggregation of a round's update deltas: coordinate-wise trimmed mean and median, and Krum.

The server's default aggregate is the mean of the accepted updates weighted by ``num-examples``
(:meth:`zk0.strategy.SmolVLAStrategy.aggregate_train`). One hostile client moves a mean as far as
``max-update-norm`` lets it. With ``aggregation`` set to one of these rules, a round withstands
``byzantine-clients`` hostile updates (f) out of n:

* ``trimmed-mean``: per coordinate, drop the ``int(trim-fraction * n)`` lowest and highest values and
  average the rest (Flower's ``FedTrimmedAvg`` and its ``trim_mean``); it must drop at least f per side;
* ``median``: per coordinate, the median, the mean of the two middle values for an even n (Flower's
  ``FedMedian``, ``np.median``); it needs n >= 2f + 1;
* ``krum``: the one update whose n - f - 2 nearest others are closest to it, by the sum of squared
  L2 distances (Blanchard et al. 2017, "Machine Learning with Adversaries"; Flower's ``Krum``); it
  needs n > 2f + 2.

Weights: these rules ignore ``num-examples``, as Flower's ``FedTrimmedAvg``, ``FedMedian`` and ``Krum``
do (Krum keeps one update, so no weight applies). A weight is the client's own claim: a robust rule
that let it count would hand a hostile client back the influence the rule takes away.

Memory: the updates stay encoded in their payloads; one tensor at a time is decoded for all n
clients (n times the largest tensor in fp32, never n times the model: smolvla_base's 99.9M
trainable parameters are 400 MB per client in fp32).

Determinism: the strategy passes the updates in a fixed order (partition, dataset, node). Sorting
along the client dimension makes trimmed mean and median independent of that order anyway; a Krum
tie goes to the first update in it. Same updates, same bits.

Flower's rules aggregate model weights; here they aggregate updates (trained minus received), which
is the same for these rules: every client starts from the same global tensors, so a coordinate's
order statistics and the distances between clients are the same for weights and for updates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from flwr.app import ArrayRecord

from zk0 import transport

def min_updates(rule: str, byzantine: int, trim_fraction: float) -> int:
    """The fewest updates with which ``rule`` withstands ``byzantine`` hostile ones (0 if none suffice)."""
    if rule == "krum":
        return 2 * byzantine + 3
    if rule == "median":
        return 2 * byzantine + 1
    if rule == "trimmed-mean" and byzantine:
        if not trim_fraction:
            return 0
        count = math.ceil(byzantine / trim_fraction)
        return count if int(trim_fraction * count) >= byzantine else count + 1  # as int() floors the product
    return 1


def aggregate(rule: str, updates: Sequence[ArrayRecord], dtype: str, into: Mapping[str, torch.Tensor],
              byzantine: int, trim_fraction: float) -> int | None:
    """Write ``rule``'s aggregate of the encoded ``updates`` into the fp32 tensors ``into`` (overwritten).

    Returns the index of the update Krum chose (None for the coordinate-wise rules).
    """
    shapes = {name: tuple(t.shape) for name, t in into.items()}
    scratch = transport.scratch_for(shapes)
    if rule == "krum":
        chosen = krum_choice(updates, dtype, shapes, byzantine)
        transport.accumulate(into, updates[chosen], dtype, 1.0, scratch, start=True)
        return chosen
    cut = int(trim_fraction * len(updates))
    for name, out in into.items():
        ordered = _stacked(updates, name, shapes[name], dtype, scratch).sort(dim=0).values
        out.copy_(_median(ordered) if rule == "median" else ordered[cut:len(updates) - cut].mean(dim=0))
    return None


def krum_choice(updates: Sequence[ArrayRecord], dtype: str, shapes: Mapping[str, tuple[int, ...]],
                byzantine: int) -> int:
    """The index of Krum's update: the lowest sum of squared distances to its n - f - 2 nearest others."""
    distances = pairwise_distances(updates, dtype, shapes)
    nearest = max(1, len(updates) - byzantine - 2)
    scores = [sum(sorted(row[:i] + row[i + 1:])[:nearest]) for i, row in enumerate(distances)]
    return min(range(len(updates)), key=lambda i: (scores[i], i))


def pairwise_distances(updates: Sequence[ArrayRecord], dtype: str,
                       shapes: Mapping[str, tuple[int, ...]]) -> list[list[float]]:
    """Squared L2 distances between the updates, summed tensor by tensor in float64.

    Flower's ``compute_distances`` expands ``|x|^2 + |y|^2 - 2 x.y`` over the flattened models, which
    cancels badly when updates are close; the differences are taken directly here.
    """
    n = len(updates)
    distances = [[0.0] * n for _ in range(n)]
    scratch = transport.scratch_for(shapes)
    for name, shape in shapes.items():
        stack = _stacked(updates, name, shape, dtype, scratch)
        for i in range(n):
            for j in range(i + 1, n):
                squared = float(torch.linalg.vector_norm(stack[i] - stack[j], dtype=torch.float64)) ** 2
                distances[i][j] += squared
                distances[j][i] += squared
    return distances


def _stacked(updates: Sequence[ArrayRecord], name: str, shape: tuple[int, ...], dtype: str,
             scratch: torch.Tensor) -> torch.Tensor:
    """Tensor ``name`` of every update, decoded to fp32 and stacked along a new first (client) dimension."""
    stack = torch.empty((len(updates), *shape))
    for row, arrays in zip(stack, updates):
        transport.accumulate({name: row}, arrays, dtype, 1.0, scratch, start=True)
    return stack


def _median(ordered: torch.Tensor) -> torch.Tensor:
    """The median along dim 0 of values sorted along it: the middle one, or the mean of the middle two."""
    middle = ordered.shape[0] // 2
    return ordered[middle] if ordered.shape[0] % 2 else (ordered[middle - 1] + ordered[middle]) / 2
