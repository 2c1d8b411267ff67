"""The wire, both ways: bf16/fp32/int8 codecs for the trainable tensors, SHA-256 digests, and sealed payloads.

Only the trainable tensors of the policy travel. ``ArrayRecord`` rejects bfloat16, so
bf16 tensors travel as their raw 16-bit patterns (an int16 view), which is lossless
with respect to bf16 and halves the bytes of fp32. int8 tensors travel as int8 values
plus an fp32 array ``<name>::scale`` of one scale per output row (dim 0; one scale for a
1-D tensor or a scalar): symmetric absmax quantization, each value within half a scale of
what was encoded, a quarter of fp32's bytes. The digest covers every array's name, dtype,
shape and exact bytes, in name order, scales included, so any change in transit is caught.

Decoding reads an array's bytes where they lie (no copy) once their header matches what the
receiver expects, and decodes them block by block through a small scratch buffer that stays in
cache: the server measures an update and adds it into the round's mean that way, never holding
a decoded update (:func:`norm`, :func:`accumulate`).

Server and clients seal what they send and verify what they receive with the same
:class:`Wire`: the digest, the frozen-base fingerprint and the dtype are written by one
function and checked by one function, whichever side sends. An int8 run's model goes down
as bf16, as an int8 delta or not at all (:mod:`zk0.chain`): the seal's ``downlink`` says
which, and so which codec its payload uses.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from zk0.config import TRANSPORT_DTYPES as DTYPES

SCALE = "::scale"  # suffix of an int8 tensor's scales
BLOCK = 1 << 20  # values decoded at a time where the server measures and sums updates (4 MiB: in cache)
WIRE_DTYPES = {"fp32": np.dtype(np.float32), "bf16": np.dtype(np.int16), "int8": np.dtype(np.int8)}
DOWNLINK_CODECS = {"full": "bf16", "delta": "int8", "unchanged": None}  # an int8 run's downlink kinds
_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class PayloadError(ValueError):
    """A payload that cannot be trusted: wrong digest, names, shapes or values."""


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"transport-dtype must be one of {DTYPES}, got {dtype!r}")


def _rows(shape: tuple[int, ...] | torch.Size) -> int:
    """Rows an int8 tensor is scaled by: its output rows (dim 0), or one for a 1-D tensor or a scalar."""
    return shape[0] if len(shape) >= 2 else 1


def quantize(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``tensor`` as int8 values and one fp32 scale (absmax / 127) per row: each value within half a scale."""
    rows = tensor.detach().to("cpu", torch.float32).reshape(_rows(tensor.shape), -1)
    scale = rows.abs().amax(dim=1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    values = torch.round(rows / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return values.reshape(tensor.shape), scale


def encode(tensors: Mapping[str, torch.Tensor], dtype: str) -> ArrayRecord:
    """Encode named tensors for transport in ``dtype`` (``bf16``, ``fp32`` or ``int8``)."""
    _check_dtype(dtype)
    arrays = OrderedDict()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu")
        if dtype == "int8":
            t, scale = quantize(t)
        elif dtype == "bf16":
            t = t.to(torch.bfloat16).view(torch.int16)
        else:
            t = t.to(torch.float32)
        arrays[name] = Array(t.contiguous().numpy())
        if dtype == "int8":
            arrays[name + SCALE] = Array(scale.numpy())
    return ArrayRecord(arrays)


def expected_shapes(shapes: Mapping[str, tuple[int, ...]], dtype: str) -> dict[str, tuple[int, ...]]:
    """Every array a payload of tensors of ``shapes`` carries in ``dtype``: the tensors, and int8's scales."""
    out = {name: tuple(shape) for name, shape in shapes.items()}
    if dtype == "int8":
        out |= {name + SCALE: (_rows(shape),) for name, shape in shapes.items()}
    return out


def _values(record: ArrayRecord, name: str, expected: np.dtype, dtype: str) -> torch.Tensor:
    """The array ``name`` read in place (read-only, no copy), once its header says ``expected`` and its shape."""
    if name not in record:
        raise PayloadError(f"payload has no array {name!r}")
    array = record[name]
    stream = io.BytesIO(array.data)
    try:
        shape, fortran, found = _HEADERS[np.lib.format.read_magic(stream)](stream)
    except (KeyError, ValueError) as err:
        raise PayloadError(f"tensor {name!r} is not a NumPy array: {err}") from None
    if found != expected:
        raise PayloadError(f"tensor {name!r} is {found}, expected {expected} for {dtype}")
    if fortran or shape != tuple(array.shape) or len(array.data) != stream.tell() + math.prod(shape) * found.itemsize:
        raise PayloadError(f"tensor {name!r}: its bytes do not hold the {tuple(array.shape)} array it claims")
    values = np.frombuffer(array.data, found, math.prod(shape), stream.tell()).reshape(shape)
    with warnings.catch_warnings():  # read-only: never written to
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(values)


def _blocks(record: ArrayRecord, name: str, dtype: str,
            scratch: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """Tensor ``name`` as fp32 blocks of its rows (dim 0, or one row) of about ``BLOCK`` values: ``(rows, block)``.

    A block is decoded into the front of ``scratch``, which it overwrites (an fp32 payload's block
    is the payload itself, read-only): small enough to stay in cache while it is used.
    """
    values = _values(record, name, WIRE_DTYPES[dtype], dtype)
    rows = values.reshape(_rows(values.shape), -1)
    rows = rows.view(torch.bfloat16) if dtype == "bf16" else rows
    scale = _values(record, name + SCALE, WIRE_DTYPES["fp32"], dtype) if dtype == "int8" else None
    if scale is not None and scale.shape != (rows.shape[0],):
        raise PayloadError(f"tensor {name!r} has {tuple(scale.shape)} scales, expected ({rows.shape[0]},)")
    step = _block_rows(rows.shape)
    for first in range(0, rows.shape[0], step):
        part = slice(first, first + step)
        if dtype == "fp32":
            yield part, rows[part]
            continue
        block = scratch[:rows[part].numel()].view(rows[part].shape).copy_(rows[part])
        if scale is not None:
            block.mul_(scale[part, None])
        yield part, block


def _block_rows(rows: tuple[int, ...] | torch.Size) -> int:
    """Rows per block of a tensor viewed as ``rows`` (rows, columns)."""
    return max(1, BLOCK // max(1, rows[1]))


def tensor_names(record: ArrayRecord, dtype: str) -> list[str]:
    """Names of the tensors a payload carries (int8's scale arrays are part of their tensor)."""
    return [name for name in record.keys() if not (dtype == "int8" and name.endswith(SCALE))]


def scratch_for(shapes: Mapping[str, tuple[int, ...]]) -> torch.Tensor:
    """A buffer any block of these tensors decodes into (see :func:`norm`, :func:`accumulate`)."""
    sizes = [(_rows(shape), math.prod(shape) // max(1, _rows(shape))) for shape in shapes.values()]
    return torch.empty(max((min(rows, _block_rows((rows, cols))) * cols for rows, cols in sizes), default=0))


def decode(record: ArrayRecord, dtype: str) -> dict[str, torch.Tensor]:
    """Decode a payload to fp32 tensors; the inverse of :func:`encode` (up to its rounding)."""
    _check_dtype(dtype)
    names = tensor_names(record, dtype)
    out = {name: torch.empty(tuple(record[name].shape)) for name in names}
    accumulate(out, record, dtype, 1.0, scratch_for({name: t.shape for name, t in out.items()}), start=True)
    return out


def norm(record: ArrayRecord, dtype: str, scratch: torch.Tensor) -> float:
    """L2 norm of the decoded payload, block by block through ``scratch``; inf or NaN if any value is."""
    squares = 0.0
    for name in tensor_names(record, dtype):
        for _, block in _blocks(record, name, dtype, scratch):
            squares += float(torch.linalg.vector_norm(block)) ** 2
    return math.sqrt(squares)


def accumulate(total: Mapping[str, torch.Tensor], record: ArrayRecord, dtype: str, weight: float,
               scratch: torch.Tensor, start: bool = False) -> None:
    """``total += weight * payload`` in place (``start``: ``total = weight * payload``), block by block through
    ``scratch``."""
    for name, into in total.items():
        rows = into.view(_rows(into.shape), -1)
        for part, block in _blocks(record, name, dtype, scratch):
            if start:
                torch.mul(block, weight, out=rows[part])
            else:
                rows[part].add_(block, alpha=weight)


def binding(run_id: int, server_round: int) -> str:
    """What a client's update is bound to: its run and round.

    The update's digest covers it, and the server recomputes it from its own run and round, never
    from the reply: a reply replayed from another round or run fails verification even with its
    payload and digest intact, whatever its ``server-round`` field claims.
    """
    return f"zk0 run {run_id} round {server_round}"


def digest(record: ArrayRecord, bound_to: str = "") -> str:
    """SHA-256 of what ``bound_to`` names (a :func:`binding`, if any) and the payload's exact bytes (names, dtypes,
    shapes and data, name-ordered)."""
    h = hashlib.sha256()
    if bound_to:
        h.update(f"{bound_to}|".encode())
    for name in sorted(record.keys()):
        array = record[name]
        h.update(f"{name}|{array.dtype}|{tuple(array.shape)}|".encode())
        h.update(array.data)
    return h.hexdigest()


def nbytes(record: ArrayRecord) -> int:
    """Bytes of tensor data in a payload (what dominates the message size)."""
    return sum(len(array.data) for array in record.values())


def check(record: ArrayRecord, claimed_digest: str, shapes: Mapping[str, tuple[int, ...]],
          bound_to: str = "") -> None:
    """Raise :class:`PayloadError` unless the payload matches its digest (bound to ``bound_to``) and the expected
    arrays' shapes."""
    actual = digest(record, bound_to)
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

    def seal(self, tensors: Mapping[str, torch.Tensor], codec: str | None = None,
             bound_to: str = "") -> tuple[ArrayRecord, dict[str, str]]:
        """``tensors`` as they go on the wire (in ``codec``, default the run's dtype), and what verifies them; a
        client's update is ``bound_to`` its run and round (:func:`binding`)."""
        arrays = encode(tensors, codec or self.dtype)
        return arrays, {"payload-digest": digest(arrays, bound_to), "base-fingerprint": self.fingerprint,
                        "transport-dtype": self.dtype}

    def codec(self, seal: Mapping) -> str | None:
        """The codec of a payload this side receives: the run's dtype, or on an int8 run's downlink what its
        ``downlink`` kind travels as (``None``: no arrays). The server never takes a downlink kind from a reply."""
        if self.side == "server" or "downlink" not in seal:
            return self.dtype
        if self.dtype != "int8" or seal["downlink"] not in DOWNLINK_CODECS:
            raise PayloadError(f"downlink {seal['downlink']!r} on a {self.dtype} wire")
        return DOWNLINK_CODECS[str(seal["downlink"])]

    def verify(self, arrays: ArrayRecord, seal: Mapping, bound_to: str = "") -> str | None:
        """Raise :class:`PayloadError` unless ``arrays`` were sealed for this base and dtype (and ``bound_to``),
        unchanged since; return their codec."""
        other_base, other_dtype = _REFUSALS[self.side]
        if seal["base-fingerprint"] != self.fingerprint:
            raise PayloadError(other_base)
        if seal["transport-dtype"] != self.dtype:
            raise PayloadError(other_dtype.format(sent=seal["transport-dtype"], expected=self.dtype))
        codec = self.codec(seal)
        check(arrays, str(seal["payload-digest"]), expected_shapes(self.shapes, codec) if codec else {}, bound_to)
        return codec

    def open(self, arrays: ArrayRecord, seal: Mapping) -> dict[str, torch.Tensor]:
        """The verified payload as fp32 tensors (none for an unchanged model)."""
        codec = self.verify(arrays, seal)
        return decode(arrays, codec) if codec else {}
