"""Trainable-tensor codec for the wire: bf16 or fp32 payloads with SHA-256 digests.

Only the trainable tensors of the policy travel. ``ArrayRecord`` rejects bfloat16, so
bf16 tensors travel as their raw 16-bit patterns (an int16 view), which is lossless
with respect to bf16 and halves the bytes of fp32. The digest covers every tensor's
name, dtype, shape and exact bytes, in name order, so any change in transit is caught.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping

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
