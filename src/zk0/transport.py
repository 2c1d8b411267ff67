"""The wire, both ways: a bf16/fp32 codec for the trainable tensors, SHA-256 digests, and sealed payloads.

Only the trainable tensors of the policy travel. ``ArrayRecord`` rejects bfloat16, so
bf16 tensors travel as their raw 16-bit patterns (an int16 view), which is lossless
with respect to bf16 and halves the bytes of fp32. The digest covers every tensor's
name, dtype, shape and exact bytes, in name order, so any change in transit is caught.

Server and clients seal what they send and verify what they receive with the same
:class:`Wire`: the digest, the frozen-base fingerprint and the dtype are written by one
function and checked by one function, whichever side sends.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from zk0.config import TRANSPORT_DTYPES as DTYPES


class PayloadError(ValueError):
    """A payload that cannot be trusted: wrong digest, names, shapes or values."""


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"transport-dtype must be one of {DTYPES}, got {dtype!r}")


def encode(tensors: Mapping[str, torch.Tensor], dtype: str) -> ArrayRecord:
    """Encode named tensors for transport in ``dtype`` (``bf16`` or ``fp32``)."""
    _check_dtype(dtype)
    arrays = OrderedDict()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu")
        t = t.to(torch.bfloat16).view(torch.int16) if dtype == "bf16" else t.to(torch.float32)
        arrays[name] = Array(t.contiguous().numpy())
    return ArrayRecord(arrays)


def decode(record: ArrayRecord, dtype: str) -> dict[str, torch.Tensor]:
    """Decode a payload to fp32 tensors; the inverse of :func:`encode`."""
    _check_dtype(dtype)
    expected = np.dtype(np.int16 if dtype == "bf16" else np.float32)
    out = {}
    for name, array in record.items():
        values = array.numpy()
        if values.dtype != expected:
            raise PayloadError(f"tensor {name!r} is {values.dtype}, expected {expected} for {dtype}")
        t = torch.from_numpy(values.copy())
        out[name] = (t.view(torch.bfloat16) if dtype == "bf16" else t).to(torch.float32)
    return out


def digest(record: ArrayRecord) -> str:
    """SHA-256 of the payload's exact bytes (names, dtypes, shapes and data, name-ordered)."""
    h = hashlib.sha256()
    for name in sorted(record.keys()):
        array = record[name]
        h.update(f"{name}|{array.dtype}|{tuple(array.shape)}|".encode())
        h.update(array.data)
    return h.hexdigest()


def nbytes(record: ArrayRecord) -> int:
    """Bytes of tensor data in a payload (what dominates the message size)."""
    return sum(len(array.data) for array in record.values())


def check(record: ArrayRecord, claimed_digest: str, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise :class:`PayloadError` unless the payload matches its digest and the expected tensors."""
    actual = digest(record)
    if actual != claimed_digest:
        raise PayloadError(f"payload digest mismatch (claimed {claimed_digest[:12]}…, got {actual[:12]}…)")
    names = set(record.keys())
    if names != set(shapes):
        missing, extra = sorted(set(shapes) - names), sorted(names - set(shapes))
        raise PayloadError(f"payload tensors differ from the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, shape in shapes.items():
        if tuple(record[name].shape) != tuple(shape):
            raise PayloadError(f"tensor {name!r} has shape {tuple(record[name].shape)}, expected {tuple(shape)}")


_REFUSALS = {  # side: what it says of a payload sealed for another frozen base, and for another dtype
    "server": ("frozen-base fingerprint differs from the server's", "transport dtype {sent} != {expected}"),
    "client": ("the server's frozen base differs from this client's: check model-name and seed",
               "server sent {sent}, client expects {expected}"),
}


@dataclass(frozen=True)
class Wire:
    """One side's end of the wire: the frozen base, transport dtype and trainable tensors it sends and accepts."""

    side: str  # "server" or "client": whose words a refusal uses
    fingerprint: str
    dtype: str
    shapes: Mapping[str, tuple[int, ...]]

    def seal(self, tensors: Mapping[str, torch.Tensor]) -> tuple[ArrayRecord, dict[str, str]]:
        """``tensors`` as they go on the wire, and what the receiver needs to verify them."""
        arrays = encode(tensors, self.dtype)
        return arrays, {"payload-digest": digest(arrays), "base-fingerprint": self.fingerprint,
                        "transport-dtype": self.dtype}

    def verify(self, arrays: ArrayRecord, seal: Mapping) -> None:
        """Raise :class:`PayloadError` unless ``arrays`` were sealed for this base and dtype, unchanged since."""
        other_base, other_dtype = _REFUSALS[self.side]
        if seal["base-fingerprint"] != self.fingerprint:
            raise PayloadError(other_base)
        if seal["transport-dtype"] != self.dtype:
            raise PayloadError(other_dtype.format(sent=seal["transport-dtype"], expected=self.dtype))
        check(arrays, str(seal["payload-digest"]), self.shapes)

    def open(self, arrays: ArrayRecord, seal: Mapping) -> dict[str, torch.Tensor]:
        """The verified payload as fp32 tensors."""
        self.verify(arrays, seal)
        return decode(arrays, self.dtype)
