"""Wire bytes per client per round: full fp32 state dict vs trainable-only fp32 vs bf16 vs int8.

The older zk0 design shipped every parameter and buffer of the policy in fp32, both ways,
every round. zk0 now ships only the trainable tensors, in bf16 by default, or in int8
(``transport-dtype=int8``: updates up, deltas of the global model down, once a node holds
it). This benchmark builds the real smolvla_base architecture (``model-name="smolvla-size"``:
SmolVLM2-500M backbone, no weights, on the meta device) and counts the bytes each scheme puts
on the wire, using zk0's own codec (int8: values and per-row fp32 scales).

Run: ``HF_HUB_OFFLINE=1 python bench/transport.py``. The last lines are
``bf16_vs_full_fp32=<ratio>`` and ``int8_vs_full_fp32=<ratio>`` (both directions: an int8
delta down and an int8 update up, against the full fp32 state dict both ways).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

try:
    from zk0 import transport
except ImportError:  # package not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from zk0 import transport
from zk0.policy import SMOLVLA_SIZE, local_config

MIB = 2**20

Shapes = Mapping[str, tuple[int, ...]]


def build_policy() -> torch.nn.Module:
    """``model-name="smolvla-size"`` (smolvla_base's architecture, default freezing) on the meta device."""
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    config = local_config(SMOLVLA_SIZE, chunk_size=50, device="cpu")  # smolvla_base's chunk size
    # lerobot prints progress ("Reducing the number of VLM layers ...") to stdout: keep it off the report.
    with torch.device("meta"), contextlib.redirect_stdout(sys.stderr):
        return SmolVLAPolicy(config)


def _numel(shape: tuple[int, ...]) -> int:
    """Number of values in a tensor of ``shape``."""
    return torch.Size(shape).numel()


def wire_bytes(shapes: Shapes, dtype: str) -> int:
    """Bytes zk0's codec puts on the wire for zero tensors of these shapes, in ``dtype``.

    Meta tensors have no data, so each is materialized as zeros (values do not change the
    size). ``nbytes`` sums each Array's serialized buffer: the raw data plus its .npy header
    (128 bytes per array here), so it adds up over tensors. Encoding one tensor at a time
    gives the exact total, headers included, for the full fp32 state dict too, while holding
    at most one tensor (the 189 MB embedding matrix) in memory.
    """
    return sum(transport.nbytes(transport.encode({name: torch.zeros(shape)}, dtype))
               for name, shape in shapes.items())


def report(payloads: Mapping[str, int]) -> None:
    """Print MiB per direction, per client per round (down + up) and the ratio to row (a)."""
    base = payloads["a"]
    labels = {"a": "full state dict, fp32", "b": "trainable only, fp32", "c": "trainable only, bf16",
              "d": "trainable only, int8"}
    print(f"{'':2} {'payload':24} {'MiB/direction':>14} {'MiB/client/round':>17} {'vs a':>7}")
    for key, size in payloads.items():
        print(f"{key:2} {labels[key]:24} {size / MIB:14.1f} {2 * size / MIB:17.1f} {size / base:7.4f}")
    print(f"trainable_fp32_vs_full_fp32={payloads['b'] / base:.4f}")
    print(f"bf16_vs_full_fp32={payloads['c'] / base:.4f}")
    print(f"int8_vs_full_fp32={payloads['d'] / base:.4f}")


def main() -> None:
    """Build the policy, count the four payloads and print the report."""
    torch.set_num_threads(1)
    policy = build_policy()
    params = list(policy.named_parameters())
    total = sum(p.numel() for _, p in params)
    trainable = {name: tuple(p.shape) for name, p in params if p.requires_grad}
    # (a): every parameter and persistent buffer, as the older design's state_dict round-trip
    # (SmolVLA's only buffers, the rotary inv_freq tables, are non-persistent: 500 parameters).
    full = {name: tuple(t.shape) for name, t in policy.state_dict().items()}
    print(f"parameters: total={total / 1e6:.1f}M trainable={sum(map(_numel, trainable.values())) / 1e6:.1f}M "
          f"(state dict: {len(full)} tensors, {sum(map(_numel, full.values())) / 1e6:.1f}M values; "
          f"trainable: {len(trainable)} tensors)")
    payloads = {"a": wire_bytes(full, "fp32"), "b": wire_bytes(trainable, "fp32"),
                "c": wire_bytes(trainable, "bf16"), "d": wire_bytes(trainable, "int8")}
    report(payloads)


if __name__ == "__main__":
    main()
