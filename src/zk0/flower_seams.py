"""Every use of Flower internals zk0 depends on, in one place, checked against the pinned Flower version.

zk0 pins ``flwr==1.42.0``. What Flower 1.42 offers publicly (``flwr.app``, ``flwr.serverapp``,
``flwr.clientapp``, ``flwr.simulation.run_simulation``) does not cover everything zk0 needs; each
function here names the public API that is missing. Importing this module with another Flower
version fails at once with one line, instead of somewhere deep inside a round.
"""

from __future__ import annotations

from importlib.metadata import version

from flwr.app import Message, MetricRecord, RecordDict

FLOWER = "1.42.0"

if (installed := version("flwr")) != FLOWER:
    raise ImportError(f"zk0 needs flwr=={FLOWER} (its internals are used in zk0.flower_seams), found {installed}: "
                      f"pip install 'flwr[simulation]=={FLOWER}'")


def set_reply_sender(reply: Message, node_id: int) -> None:
    """Name the node a reply is about. The SuperLink itself answers for a node it lost ("Node Unavailable"),
    with its own id as the sender; Flower 1.42 has no public setter for ``Metadata.src_node_id``."""
    reply.metadata.__dict__["_src_node_id"] = node_id


def weighted_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """The ``weighting_key``-weighted mean of the replies' metric records, as Flower's FedAvg computes it
    (``strategy_utils.aggregate_metricrecords``; 1.42 exports no public helper)."""
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

    return aggregate_metricrecords(records, weighting_key)
