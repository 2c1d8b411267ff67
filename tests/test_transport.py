"""zk0.transport: bf16/fp32 payloads, digests and payload checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from zk0 import transport
from zk0.transport import PayloadError


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randn(7, 5, generator=g),
        "a.bias": torch.randn(5, generator=g) * 1e-3,
        "c.scale": torch.randn(2, 3, 4, generator=g) * 100,
    }


def shapes(tensors):
    return {n: tuple(t.shape) for n, t in tensors.items()}


def replace(record: ArrayRecord, name: str, values: np.ndarray) -> ArrayRecord:
    out = ArrayRecord({n: record[n] for n in record.keys()})
    out[name] = Array(values)
    return out


def test_fp32_roundtrip_exact(tensors):
    out = transport.decode(transport.encode(tensors, "fp32"), "fp32")
    assert set(out) == set(tensors)
    for name, t in tensors.items():
        assert out[name].dtype == torch.float32
        assert torch.equal(out[name], t)


def test_bf16_roundtrip_equals_torch_rounding(tensors):
    record = transport.encode(tensors, "bf16")
    assert all(record[n].numpy().dtype == np.int16 for n in record.keys())
    out = transport.decode(record, "bf16")
    for name, t in tensors.items():
        expected = t.to(torch.bfloat16).to(torch.float32)
        assert out[name].dtype == torch.float32
        assert out[name].shape == t.shape
        assert torch.equal(out[name], expected)
        # bf16 is lossy but close: relative error below 2^-8
        assert torch.allclose(out[name], t, rtol=2**-8, atol=0)


def test_encode_sorts_names_and_accepts_bf16_input(tensors):
    record = transport.encode(tensors, "fp32")
    assert list(record.keys()) == sorted(tensors)
    bf = {n: t.to(torch.bfloat16) for n, t in tensors.items()}
    out = transport.decode(transport.encode(bf, "bf16"), "bf16")
    for name in tensors:
        assert torch.equal(out[name], bf[name].float())


def test_bf16_halves_the_bytes():
    big = {"w": torch.randn(256, 256)}
    fp32 = transport.nbytes(transport.encode(big, "fp32"))
    bf16 = transport.nbytes(transport.encode(big, "bf16"))
    assert fp32 >= 256 * 256 * 4
    assert bf16 / fp32 < 0.51


def test_digest_is_stable(tensors):
    d1 = transport.digest(transport.encode(tensors, "bf16"))
    d2 = transport.digest(transport.encode(dict(reversed(list(tensors.items()))), "bf16"))
    assert d1 == d2
    assert len(d1) == 64
    assert transport.digest(transport.encode(tensors, "fp32")) != d1


def test_digest_changes_with_one_value(tensors):
    record = transport.encode(tensors, "fp32")
    values = record["b.weight"].numpy().copy()
    values[3, 2] = np.nextafter(values[3, 2], np.float32(np.inf))  # smallest possible change
    assert transport.digest(replace(record, "b.weight", values)) != transport.digest(record)


def test_digest_changes_with_one_byte_of_bf16(tensors):
    record = transport.encode(tensors, "bf16")
    values = record["a.bias"].numpy().copy()
    values[0] ^= 1  # flip the lowest bit
    assert transport.digest(replace(record, "a.bias", values)) != transport.digest(record)


def test_digest_changes_with_name(tensors):
    renamed = dict(tensors)
    renamed["b.weight2"] = renamed.pop("b.weight")
    assert transport.digest(transport.encode(renamed, "fp32")) != transport.digest(transport.encode(tensors, "fp32"))


def test_digest_changes_with_shape():
    flat = {"w": torch.arange(6.0)}
    square = {"w": torch.arange(6.0).reshape(2, 3)}
    assert transport.digest(transport.encode(flat, "fp32")) != transport.digest(transport.encode(square, "fp32"))


def test_check_accepts_valid_payload(tensors):
    record = transport.encode(tensors, "bf16")
    transport.check(record, transport.digest(record), shapes(tensors))


def test_check_rejects_digest_mismatch(tensors):
    record = transport.encode(tensors, "bf16")
    claimed = transport.digest(record)
    values = record["c.scale"].numpy().copy()
    values[0, 0, 0] += 1
    with pytest.raises(PayloadError, match="digest"):
        transport.check(replace(record, "c.scale", values), claimed, shapes(tensors))


def test_check_rejects_missing_tensor(tensors):
    partial = {n: t for n, t in tensors.items() if n != "a.bias"}
    record = transport.encode(partial, "fp32")
    with pytest.raises(PayloadError, match="missing") as err:
        transport.check(record, transport.digest(record), shapes(tensors))
    assert "a.bias" in str(err.value)


def test_check_rejects_extra_tensor(tensors):
    record = transport.encode({**tensors, "z.extra": torch.zeros(2)}, "fp32")
    with pytest.raises(PayloadError, match="unexpected") as err:
        transport.check(record, transport.digest(record), shapes(tensors))
    assert "z.extra" in str(err.value)


def test_check_rejects_wrong_shape(tensors):
    wrong = {**tensors, "b.weight": tensors["b.weight"].T.contiguous()}
    record = transport.encode(wrong, "fp32")
    with pytest.raises(PayloadError, match="shape") as err:
        transport.check(record, transport.digest(record), shapes(tensors))
    assert "b.weight" in str(err.value)


def test_decode_rejects_wrong_dtype(tensors):
    with pytest.raises(PayloadError, match="expected"):
        transport.decode(transport.encode(tensors, "fp32"), "bf16")
    with pytest.raises(PayloadError, match="expected"):
        transport.decode(transport.encode(tensors, "bf16"), "fp32")


def test_encode_rejects_unknown_dtype(tensors):
    with pytest.raises(ValueError, match="fp16"):
        transport.encode(tensors, "fp16")


def wires(tensors, dtype: str = "bf16") -> tuple[transport.Wire, transport.Wire]:
    """The server's and a client's end of one federation's wire."""
    return (transport.Wire("server", "base", dtype, shapes(tensors)),
            transport.Wire("client", "base", dtype, shapes(tensors)))


def test_a_sealed_payload_opens_on_the_other_side(tensors):
    server, client = wires(tensors)
    arrays, seal = server.seal(tensors)
    assert seal == {"payload-digest": transport.digest(arrays), "base-fingerprint": "base", "transport-dtype": "bf16"}
    opened = client.open(arrays, seal)
    assert all(torch.equal(opened[n], t.to(torch.bfloat16).float()) for n, t in tensors.items())


@pytest.mark.parametrize(("side", "base", "dtype"), [
    ("server", "frozen-base fingerprint differs from the server's", "transport dtype fp32 != bf16"),
    ("client", "the server's frozen base differs from this client's", "server sent fp32, client expects bf16"),
])
def test_a_payload_sealed_for_another_base_or_dtype_is_refused_in_the_receivers_words(tensors, side, base, dtype):
    receiver = transport.Wire(side, "base", "bf16", shapes(tensors))
    arrays, seal = transport.Wire(side, "other base", "bf16", shapes(tensors)).seal(tensors)
    with pytest.raises(PayloadError, match=base):
        receiver.verify(arrays, seal)
    arrays, seal = transport.Wire(side, "base", "fp32", shapes(tensors)).seal(tensors)
    with pytest.raises(PayloadError, match=dtype):
        receiver.open(arrays, seal)


def test_a_sealed_payload_changed_in_transit_is_refused(tensors):
    server, client = wires(tensors, "fp32")
    arrays, seal = server.seal(tensors)
    values = arrays["a.bias"].numpy().copy()
    values[0] += 1
    with pytest.raises(PayloadError, match="digest mismatch"):
        client.open(replace(arrays, "a.bias", values), seal)


def test_int8_values_are_within_half_a_scale_of_each_row(tensors):
    record = transport.encode(tensors, "int8")
    out = transport.decode(record, "int8")
    for name, t in tensors.items():
        assert record[name].numpy().dtype == np.int8
        rows = t.reshape(t.shape[0] if t.dim() >= 2 else 1, -1)
        half_scale = rows.abs().amax(dim=1, keepdim=True) / 127 / 2
        error = (out[name] - t).reshape(rows.shape).abs()
        assert out[name].shape == t.shape and out[name].dtype == torch.float32
        assert (error <= half_scale * (1 + 1e-6)).all()
        assert record[name + transport.SCALE].numpy().shape == (rows.shape[0],)


def test_int8_keeps_zeros_and_scalars_exact():
    zeros, scalar = torch.zeros(3, 4), torch.tensor(-2.5)
    out = transport.decode(transport.encode({"z": zeros, "s": scalar}, "int8"), "int8")
    assert torch.equal(out["z"], zeros) and torch.equal(out["s"], scalar)


def test_int8_is_a_quarter_of_fp32_and_half_of_bf16():
    big = {"w": torch.randn(256, 1024)}
    fp32, bf16, int8 = (transport.nbytes(transport.encode(big, dtype)) for dtype in ("fp32", "bf16", "int8"))
    assert int8 / fp32 < 0.26 and int8 / bf16 < 0.51


def test_int8_digest_covers_the_scales(tensors):
    server, client = wires(tensors, "int8")
    arrays, seal = server.seal(tensors)
    name = "b.weight" + transport.SCALE
    scale = arrays[name].numpy().copy()
    scale[0] *= 2
    with pytest.raises(PayloadError, match="digest mismatch"):
        client.open(replace(arrays, name, scale), seal)


def test_int8_scales_of_the_wrong_shape_are_refused_even_when_resealed(tensors):
    server, client = wires(tensors, "int8")
    arrays, _ = server.seal(tensors)
    name = "b.weight" + transport.SCALE
    forged = replace(arrays, name, np.ones(3, np.float32))
    seal = {"payload-digest": transport.digest(forged), "base-fingerprint": "base", "transport-dtype": "int8"}
    with pytest.raises(PayloadError, match=r"'b.weight::scale' has shape \(3,\), expected \(7,\)"):
        client.open(forged, seal)
    missing = ArrayRecord({n: arrays[n] for n in arrays.keys() if n != name})
    with pytest.raises(PayloadError, match="missing"):
        transport.check(missing, transport.digest(missing), transport.expected_shapes(shapes(tensors), "int8"))


def test_an_array_whose_bytes_disagree_with_its_shape_is_refused(tensors):
    record = transport.encode(tensors, "fp32")
    lying = ArrayRecord({n: record[n] for n in record.keys()})
    lying["b.weight"] = Array("float32", (7, 5), record["b.weight"].stype, record["c.scale"].data)  # 24 values
    with pytest.raises(PayloadError, match="do not hold"):
        transport.decode(lying, "fp32")


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_norm_and_accumulate_read_the_payload_as_decode_does(tensors, dtype):
    record = transport.encode(tensors, dtype)
    decoded = transport.decode(record, dtype)
    scratch = transport.scratch_for(shapes(tensors))
    expected = torch.sqrt(sum((t.double() ** 2).sum() for t in decoded.values()))
    assert transport.norm(record, dtype, scratch) == pytest.approx(float(expected), rel=1e-6)
    total = {n: torch.empty(t.shape) for n, t in tensors.items()}
    transport.accumulate(total, record, dtype, 0.25, scratch, start=True)
    transport.accumulate(total, record, dtype, 0.5, scratch)
    assert all(torch.allclose(total[n], decoded[n] * 0.75) for n in tensors)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_a_non_finite_value_makes_the_norm_non_finite(tensors, dtype):
    broken = {**tensors, "a.bias": tensors["a.bias"].clone()}
    broken["a.bias"][2] = float("nan") if dtype != "int8" else float("inf")
    norm = transport.norm(transport.encode(broken, dtype), dtype, transport.scratch_for(shapes(tensors)))
    assert not np.isfinite(norm)
