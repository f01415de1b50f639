"""Tests for the wire codec: round trips, error bounds, size bounds, strict decoding."""

from __future__ import annotations

import math
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.comm.codec import (
    VALUE_FORMATS,
    CodecError,
    decode,
    decode_sparse,
    encode,
    header,
)

FIXED = 14  # magic(3) version(1) n(4) k(4) position id(1) value id(1)
LEVELS = {"int8": 255, "int4": 15}


# ------------------------------------------------------------------------------ helpers


def make_mask(rng: np.random.Generator, n: int, mode: str, density: float) -> np.ndarray:
    if mode == "zero":
        return np.zeros(n, bool)
    if mode == "one":
        m = np.zeros(n, bool)
        m[rng.integers(n)] = True
        return m
    if mode == "full":
        return np.ones(n, bool)
    if mode == "runs":  # clustered, like top-k over whole LoRA rows
        m = np.zeros(n, bool)
        for start in rng.integers(0, n, size=max(1, int(density * 20))):
            m[start : start + rng.integers(1, 200)] = True
        return m
    k = int(round(density * n))
    m = np.zeros(n, bool)
    m[rng.choice(n, size=k, replace=False)] = True
    return m


def make_values(rng: np.random.Generator, n: int, kind: str, scale: float) -> np.ndarray:
    if kind == "normal":
        x = rng.standard_normal(n) * scale
    elif kind == "lognormal":  # mixed magnitudes in one block
        x = rng.choice([-1.0, 1.0], n) * np.exp(rng.normal(0, 5, n)) * scale
    elif kind == "constant":
        x = np.full(n, rng.standard_normal() * scale)
    elif kind == "positive":
        x = 1.0 + rng.random(n) * 1e-3  # offset far from zero, tiny range
    else:
        x = np.zeros(n)
    return np.clip(x, -1e30, 1e30).astype(np.float32)


def with_crc(payload: bytes | bytearray) -> bytes:
    """Re-seal a (forged) payload so it gets past the CRC to the field checks."""
    body = bytes(payload[:-4])
    return body + struct.pack("<I", zlib.crc32(body))


def block_scales(payload: bytes) -> np.ndarray:
    """Per-block int8/int4 scales, read from the documented layout."""
    h = header(payload)
    nbv = -(-h["k"] // h["block_size"])
    raw = np.frombuffer(payload, "<u2", nbv, h["value_offset"] + 2 * nbv)
    return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def check_quant_error(x: np.ndarray, got: np.ndarray, payload: bytes, stochastic: bool) -> None:
    """|err| <= scale/2 (nearest) or < scale (stochastic), plus float32 rounding slack."""
    h = header(payload)
    block, levels = h["block_size"], LEVELS[h["values"]]
    scales = block_scales(payload)
    per = np.repeat(scales, block)[: x.size]
    err = np.abs(x.astype(np.float64) - got.astype(np.float64))
    slack = 2.0**-23 * np.abs(got.astype(np.float64)) + 2.0**-149
    limit = per if stochastic else per / 2 * (1 + 1e-9)
    assert np.all(err <= limit + slack), float(np.max(err - limit - slack))
    # the stored scale is tight: the block's range over the levels, up to bf16 rounding
    starts = np.arange(0, x.size, block)
    lo, hi = np.minimum.reduceat(x, starts), np.maximum.reduceat(x, starts)
    lo, hi = lo.astype(np.float64), hi.astype(np.float64)
    assert np.all(scales <= (hi - lo + 2.0**-7 * np.abs(lo)) / levels * (1 + 2.0**-6) + 2.0**-132)


def log2_binom(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def random_mask(n: int, k: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    m = np.zeros(n, bool)
    m[rng.choice(n, size=k, replace=False)] = True
    return torch.from_numpy(m)


# ------------------------------------------------------------------------------ round trips


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 5000),
    mode=st.sampled_from(["zero", "one", "full", "random", "random", "runs"]),
    density=st.floats(0.0, 1.0),
    kind=st.sampled_from(["normal", "lognormal", "constant", "positive", "zeros"]),
    scale=st.sampled_from([1e-38, 1e-6, 1.0, 1e3, 1e30]),
    fmt=st.sampled_from(VALUE_FORMATS),
    block=st.sampled_from([1, 7, 64, 256]),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip(n, mode, density, kind, scale, fmt, block, seed):
    rng = np.random.default_rng(seed)
    mask = make_mask(rng, n, mode, density)
    if fmt == "float16":
        scale = min(scale, 1e3)
    x = make_values(rng, n, kind, scale)
    if fmt == "float16":
        x = np.clip(x, -6e4, 6e4)
    x[~mask] = rng.standard_normal(int((~mask).sum()))  # unsent entries must not matter
    vec, m = torch.from_numpy(x), torch.from_numpy(mask)

    payload = encode(vec, m, values=fmt, block_size=block)
    h = header(payload)
    k = int(mask.sum())
    assert (h["n"], h["k"], h["values"]) == (n, k, fmt)
    assert h["total_bytes"] == len(payload)
    assert FIXED + h["position_bytes"] + h["value_bytes"] + 4 == len(payload)
    assert h["position_bytes"] <= (0 if k == n else (n + 7) // 8)  # never worse than a bitmap
    assert (h["positions"] == "dense") == (k == n)

    out = decode(payload, n)
    assert out.dtype == torch.float32 and out.shape == (n,)
    assert torch.all(out[~m] == 0)
    pos, vals = decode_sparse(payload, n)
    assert pos.dtype == torch.int64 and vals.dtype == torch.float32
    assert np.array_equal(pos.numpy(), np.flatnonzero(mask))
    assert torch.equal(out[pos], vals)

    sent = x[mask]
    got = vals.numpy()
    if fmt == "float32":
        assert np.array_equal(got, sent)
    elif fmt in ("float16", "bfloat16"):
        cast = torch.from_numpy(sent).to(getattr(torch, fmt)).float().numpy()
        assert np.array_equal(got, cast)
    else:
        check_quant_error(sent, got, payload, stochastic=False)


@pytest.mark.parametrize(
    ("n", "density", "expected"),
    [(3000, 1.0, "dense"), (3000, 0.5, "bitmap"), (3000, 0.02, "golomb"), (20000, 0.38, "enum")],
)
@pytest.mark.parametrize("fmt", VALUE_FORMATS)
def test_every_position_code_round_trips(n, density, expected, fmt):
    rng = np.random.default_rng(7)
    x = rng.standard_normal(n).astype(np.float32)
    m = random_mask(n, int(density * n), 7)
    payload = encode(torch.from_numpy(x), m, values=fmt)
    assert header(payload)["positions"] == expected
    pos, vals = decode_sparse(payload, n)
    assert torch.equal(pos, torch.nonzero(m).ravel())
    if fmt == "float32":
        assert np.array_equal(vals.numpy(), x[m.numpy()])


def test_clustered_mask_full_and_empty_blocks():
    rng = np.random.default_rng(0)
    n = 50_000
    m = rng.random(n) < 0.01
    for start in rng.integers(0, n, 40):  # long runs: many all-ones 64-bit blocks
        m[start : start + rng.integers(64, 600)] = True
    payload = encode(torch.randn(n), torch.from_numpy(m), values="int4")
    h = header(payload)
    assert h["positions"] == "enum"
    assert 8 * h["position_bytes"] < 0.5 * log2_binom(n, int(m.sum()))  # structure pays off
    pos, _ = decode_sparse(payload, n)
    assert np.array_equal(pos.numpy(), np.flatnonzero(m))


def test_dense_carries_no_positions():
    x = torch.randn(1000)
    for mask in (None, torch.ones(1000, dtype=torch.bool)):
        payload = encode(x, mask)
        h = header(payload)
        assert h["positions"] == "dense" and h["position_bytes"] == 0
        assert len(payload) == FIXED + 4 * 1000 + 4
        assert torch.equal(decode(payload, 1000), x)


def test_empty_mask_is_a_tiny_valid_message():
    for n in (1, 50, 10**6):
        payload = encode(torch.randn(n), torch.zeros(n, dtype=torch.bool))
        assert header(payload)["k"] == 0
        assert len(payload) <= FIXED + 12 + 4
        assert torch.count_nonzero(decode(payload, n)) == 0
    assert len(encode(torch.randn(10), torch.zeros(10, dtype=torch.bool), values="int4")) <= 40


def test_zero_length_vector():
    payload = encode(torch.zeros(0))
    assert decode(payload, 0).shape == (0,)


def test_float64_and_noncontiguous_inputs():
    base = torch.randn(2000, dtype=torch.float64)
    x = base[::2]
    m = x.abs() > 1
    out = decode(encode(x, m), 1000)
    assert torch.equal(out[m], x[m].float())


# ------------------------------------------------------------------------------ quantization


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("block", [1, 32, 256, 10_000])
def test_quantization_error_bounds(fmt, block):
    rng = np.random.default_rng(block)
    x = (rng.standard_normal(3000) * np.exp(rng.normal(0, 2, 3000))).astype(np.float32)
    t = torch.from_numpy(x)
    payload = encode(t, values=fmt, block_size=block)
    check_quant_error(x, decode(payload, 3000).numpy(), payload, stochastic=False)
    g = torch.Generator().manual_seed(block)
    payload = encode(t, values=fmt, block_size=block, stochastic=True, generator=g)
    check_quant_error(x, decode(payload, 3000).numpy(), payload, stochastic=True)
    nbv = -(-3000 // block)
    codes = 3000 if fmt == "int8" else 1500
    assert header(payload)["value_bytes"] == 4 + 4 * nbv + codes


def test_constant_block_is_exact_when_representable():
    x = torch.full((300,), 0.75)
    for fmt in ("int8", "int4"):
        assert torch.equal(decode(encode(x, values=fmt), 300), x)


def test_stochastic_rounding_is_deterministic_and_unbiased():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-1, 1, 256).astype(np.float32))
    a = encode(x, values="int4", stochastic=True, generator=torch.Generator().manual_seed(5))
    b = encode(x, values="int4", stochastic=True, generator=torch.Generator().manual_seed(5))
    c = encode(x, values="int4", stochastic=True, generator=torch.Generator().manual_seed(6))
    assert a == b and a != c

    reps = 200
    g = torch.Generator().manual_seed(1)
    mean = torch.zeros(256, dtype=torch.float64)
    for _ in range(reps):
        mean += decode(encode(x, values="int4", stochastic=True, generator=g), 256).double()
    mean /= reps
    scale = float(block_scales(a)[0])
    threshold = 5 * scale / (2 * math.sqrt(reps))  # 5 sigma of a mean of bounded errors
    assert torch.max(torch.abs(mean - x.double())) < threshold
    nearest = decode(encode(x, values="int4"), 256).double()
    assert torch.max(torch.abs(nearest - x.double())) > threshold  # the test can tell


def test_stochastic_needs_a_generator():
    with pytest.raises(CodecError):
        encode(torch.randn(10), values="int8", stochastic=True)


# ------------------------------------------------------------------------------ sizes


DENSITIES = [1 / 256, 1 / 128, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4]
DENSITIES += [0.3, 0.35, 0.38, 0.4, 0.45, 0.5]


@pytest.mark.parametrize("density", DENSITIES)
def test_position_bits_within_3_percent_of_log2_binomial(density):
    n = 2**20
    k = int(round(density * n))
    payload = encode(torch.randn(n), random_mask(n, k, int(1 / density)), values="int4")
    h = header(payload)
    position_bits = 8 * h["position_bytes"]  # incl. sub-header and padding
    assert position_bits <= 1.03 * log2_binom(n, k)
    assert h["position_bytes"] <= n // 8


def test_bitmap_chosen_where_cheaper():
    n = 2**16
    h = header(encode(torch.randn(n), random_mask(n, n // 2, 3)))
    assert h["positions"] == "bitmap" and h["position_bytes"] == n // 8
    h = header(encode(torch.randn(n), random_mask(n, n // 64, 3)))
    assert h["positions"] == "golomb" and h["position_bytes"] < n // 8 // 2


# ------------------------------------------------------------------------------ strict decoder


def corpus() -> list[tuple[bytes, int]]:
    rng = np.random.default_rng(123)
    out = []
    cases = [(1, 1.0), (9, 0.0), (64, 0.2), (300, 0.05), (300, 0.5), (1000, 0.9), (2000, 0.01)]
    cases += [(20000, 0.38), (6000, 0.3)]
    for n, density in cases:
        for fmt in VALUE_FORMATS:
            m = random_mask(n, int(density * n), n)
            x = torch.randn(n)
            out.append((encode(x, m, values=fmt, block_size=int(rng.integers(1, 300))), n))
    kinds = {header(p)["positions"] for p, _ in out}
    assert kinds == {"dense", "bitmap", "golomb", "enum"}
    return out


def mutate(rng: np.random.Generator, payload: bytes) -> bytearray:
    b = bytearray(payload)
    kind = rng.integers(7)
    if kind == 0:  # bit flip
        j = int(rng.integers(8 * len(b)))
        b[j // 8] ^= 1 << (j % 8)
    elif kind == 1:  # byte change
        j = int(rng.integers(len(b)))
        b[j] = (b[j] + int(rng.integers(1, 256))) % 256
    elif kind == 2:  # truncation
        b = b[: int(rng.integers(len(b)))]
    elif kind == 3:  # extension
        b += rng.integers(0, 256, int(rng.integers(1, 40))).astype(np.uint8).tobytes()
    elif kind == 4:  # header / sub-header field forgery
        at = int(rng.integers(0, min(len(b) - 4, 40)))
        value = int(rng.choice([0, 1, 2**31, 2**32 - 1, int(rng.integers(2**32))]))
        b[at : at + 4] = struct.pack("<I", value)
    elif kind == 5:  # several byte changes
        for _ in range(int(rng.integers(2, 6))):
            b[int(rng.integers(len(b)))] = int(rng.integers(256))
    else:  # delete a byte
        del b[int(rng.integers(len(b)))]
    return b


def test_mutations_raise_codec_error_and_nothing_else():
    rng = np.random.default_rng(2024)
    payloads = corpus()
    decoded = 0
    for i in range(10_000):
        payload, n = payloads[int(rng.integers(len(payloads)))]
        b = mutate(rng, payload)
        resealed = len(b) >= 4 and i % 2 == 0  # half reach the field checks
        if resealed:
            b = bytearray(with_crc(b))
        try:
            out = decode(bytes(b), n)
        except CodecError as exc:
            assert not str(exc).startswith("internal error"), str(exc)
            continue
        # it decoded: only possible if the CRC matches (resealed, or a CRC32 collision)
        assert zlib.crc32(bytes(b[:-4])) == struct.unpack("<I", b[-4:])[0]
        assert out.shape == (n,) and out.dtype == torch.float32 and torch.isfinite(out).all()
        decoded += 1
    assert decoded < 5_000


def test_single_bit_flips_always_caught():
    payload, n = corpus()[-1]
    for j in range(0, 8 * len(payload), 7):
        b = bytearray(payload)
        b[j // 8] ^= 1 << (j % 8)
        with pytest.raises(CodecError):
            decode(bytes(b), n)


def test_truncation_at_every_length():
    for payload, n in corpus()[:40]:
        for cut in range(len(payload)):
            with pytest.raises(CodecError):
                decode(payload[:cut], n)


def forge(payload: bytes, fmt: str, at: int, value: int) -> bytes:
    b = bytearray(payload)
    struct.pack_into(fmt, b, at, value)
    return with_crc(b)


def test_forged_huge_lengths_fail_fast_without_allocating():
    n = 5000
    golomb = encode(torch.randn(n), random_mask(n, 50, 0), values="int8")
    dense = encode(torch.randn(n))
    big = 2**32 - 1
    forged = [
        (forge(dense, "<I", 4, big), n),  # n huge
        (forge(forge(dense, "<I", 4, big), "<I", 8, big), big),  # n, k huge, receiver agrees
        (forge(golomb, "<I", 8, big), n),  # k huge
        (forge(golomb, "<I", FIXED + 4, big), n),  # unary stream length
        (forge(golomb, "<I", FIXED + 8, big), n),  # extra-bit count
        (forge(golomb, "<I", FIXED, big), n),  # Golomb M
        (forge(golomb, "<I", FIXED + 12, 1), n),  # block size 1 -> many scales
        (forge(forge(golomb, "<I", 4, big), "<B", 12, 1), big),  # bitmap of 2**32 bits
        (forge(forge(golomb, "<I", 4, big), "<B", 12, 3), big),  # enum of 2**32 bits
    ]
    tracemalloc.start()
    try:
        for payload, expect_n in forged:
            t0 = time.perf_counter()
            with pytest.raises(CodecError):
                decode(payload, expect_n)
            assert time.perf_counter() - t0 < 0.5
        with pytest.raises(CodecError):
            decode(dense, 2**40)  # a receiver expecting a huge n must not allocate it
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_forged_huge_block_size_decodes_cheaply():
    payload = encode(torch.tensor([0.5, -2.0, 3.0]), values="int4")
    forged = forge(payload, "<I", FIXED, 2**31)  # still one block: a valid payload
    tracemalloc.start()
    try:
        out = decode(forged, 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert torch.equal(out, decode(payload, 3)) and peak < 1 << 16


def test_wrong_expected_n():
    payload = encode(torch.randn(100), torch.rand(100) > 0.5)
    for n in (0, 99, 101, 2**33):
        with pytest.raises(CodecError, match="expects"):
            decode(payload, n)
    for bad in (-1, 1.5, True, "100", None):
        with pytest.raises(CodecError):
            decode(payload, bad)
    assert decode(payload, np.int64(100)).shape == (100,)


def test_max_bytes():
    payload = encode(torch.randn(100))
    assert decode(payload, 100, max_bytes=len(payload)).shape == (100,)
    for bad in (len(payload) - 1, 0):
        with pytest.raises(CodecError, match="max_bytes"):
            decode(payload, 100, max_bytes=bad)
    with pytest.raises(CodecError, match="max_bytes"):
        decode(payload, 100, max_bytes=1e9)


def test_unknown_encoding_ids_and_version():
    payload = encode(torch.randn(100), torch.rand(100) > 0.9)
    for pos_id in (4, 99, 255):
        with pytest.raises(CodecError, match="unknown position"):
            decode(forge(payload, "<B", 12, pos_id), 100)
    for val_id in (5, 200):
        with pytest.raises(CodecError, match="unknown value"):
            decode(forge(payload, "<B", 13, val_id), 100)
    with pytest.raises(CodecError, match="version"):
        decode(forge(payload, "<B", 3, 2), 100)
    with pytest.raises(CodecError, match="magic"):
        decode(forge(payload, "<B", 0, 0), 100)
    with pytest.raises(CodecError):
        decode("not bytes", 100)  # type: ignore[arg-type]


def test_positions_beyond_n_and_dirty_padding_rejected():
    n = 13
    payload = encode(torch.randn(n), torch.tensor([True] + [False] * 11 + [True]))
    assert header(payload)["positions"] == "bitmap"
    b = bytearray(payload)
    b[FIXED + 1] |= 1  # bit 15 of a 13-bit bitmap: padding
    with pytest.raises(CodecError, match="padding"):
        decode(with_crc(b), n)
    odd = encode(torch.randn(3), values="int4")
    b = bytearray(odd)
    b[-5] |= 0xF0  # high nibble of the last code byte is padding for odd k
    with pytest.raises(CodecError, match="nibble"):
        decode(with_crc(b), 3)


def test_non_finite_values_rejected_in_payload():
    payload = bytearray(encode(torch.randn(10)))
    payload[FIXED : FIXED + 4] = struct.pack("<f", float("nan"))
    with pytest.raises(CodecError, match="non-finite"):
        decode(with_crc(payload), 10)


# ------------------------------------------------------------------------------ encoder input


def test_encoder_rejects_non_finite_and_out_of_range():
    x = torch.randn(100)
    mask = torch.zeros(100, dtype=torch.bool)
    mask[:10] = True
    x[50] = float("nan")  # not sent: fine
    decode(encode(x, mask), 100)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[3] = bad
        for fmt in VALUE_FORMATS:
            with pytest.raises(CodecError):
                encode(y, mask, values=fmt)
    with pytest.raises(CodecError, match="float16"):
        encode(torch.tensor([7e4]), values="float16")
    with pytest.raises(CodecError, match="bfloat16"):
        encode(torch.tensor([3.4e38]), values="bfloat16")
    for fmt in ("int8", "int4"):
        with pytest.raises(CodecError):
            encode(torch.tensor([1e38, -1.0]), values=fmt)


def test_encoder_rejects_bad_arguments():
    x = torch.randn(10)
    cases = [
        dict(vector=x.reshape(2, 5)),
        dict(vector=torch.arange(10)),
        dict(vector=x, mask=torch.ones(10)),
        dict(vector=x, mask=torch.ones(9, dtype=torch.bool)),
        dict(vector=x, values="int2"),
        dict(vector=x, values="int8", block_size=0),
        dict(vector=x, values="int8", block_size=2.0),
    ]
    for kwargs in cases:
        with pytest.raises(CodecError):
            encode(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_input():
    x = torch.randn(1000, device="cuda")
    m = x.abs() > 1
    assert torch.equal(decode(encode(x, m), 1000), torch.where(m, x, 0).cpu())
