"""Wire codec for sparse (top-k) client updates.

A client uploads ``k`` of the ``n`` entries of its LoRA update vector. The message is a
self-describing byte string (layout in ``docs/codec.md``)::

    fixed header | position sub-header | value sub-header | positions | values | CRC32

Positions are coded with whichever of four codes is smallest for *this* message (dense /
bitmap / Golomb gaps / enumerative blocks); values are float32, float16, bfloat16, or
block-affine int8 / int4. Every step is vectorised numpy: no per-element Python loop.

The decoder is strict: it validates every header field, length and count (and the CRC)
before it allocates anything sized by the payload, and it raises :class:`CodecError` (a
``ValueError``) for every malformed, forged or unexpected payload and for nothing else.
"""

from __future__ import annotations

import math
import operator
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "CodecError",
    "POSITION_FORMATS",
    "VALUE_FORMATS",
    "decode",
    "decode_sparse",
    "encode",
    "header",
]

MAGIC = b"FLC"
VERSION = 1

POSITION_FORMATS = ("dense", "bitmap", "golomb", "enum")
VALUE_FORMATS = ("float32", "float16", "bfloat16", "int8", "int4")

_POS_DENSE, _POS_BITMAP, _POS_GOLOMB, _POS_ENUM = range(4)
_VAL_ID = {name: i for i, name in enumerate(VALUE_FORMATS)}
_VAL_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_QUANT_LEVELS = {"int8": 255, "int4": 15}

_FIXED = struct.Struct("<3sBIIBB")  # magic, version, n, k, position id, value id
_GOLOMB_SUB = struct.Struct("<III")  # Golomb M, unary-stream bits, extra-bit count
_ENUM_SUB = struct.Struct("<IIII")  # popcount Golomb M, unary bits, extra bits, rank bits
_BLOCK_SUB = struct.Struct("<I")  # quantization block size (int8/int4 only)
_CRC = struct.Struct("<I")

_U32_MAX = 2**32 - 1
_MAX_BLOCK_SIZE = 2**31
_INT_RANGE_LIMIT = 2.0**126  # keeps bf16 offset/scale and the decoded grid finite
_SAFE_SUM = 2**62  # bound on any cumulative sum the decoder computes in int64

# Enumerative block code: 64-bit blocks, popcount deviation Golomb-coded, then the rank of
# the block's pattern among the C(64, w) patterns of that popcount, in ceil(log2 C) bits.
_ENUM_T = 64
_ENUM_MAX_M = 2 * _ENUM_T + 2
_COMB = np.array(
    [[math.comb(j, r) for r in range(_ENUM_T + 1)] for j in range(_ENUM_T + 1)], dtype=np.uint64
)  # _COMB[j, r] = C(j, r); C(64, 32) < 2**63 so everything fits uint64
_COMB_BY_R = np.ascontiguousarray(_COMB[:_ENUM_T].T)  # [r, j] = C(j, r), j < 64: searchsorted
_RANK_BITS = np.array([(math.comb(_ENUM_T, w) - 1).bit_length() for w in range(_ENUM_T + 1)])


class CodecError(ValueError):
    """Malformed, forged, oversized or unencodable payload; the message says why."""


# --------------------------------------------------------------------------------------
# bit helpers
# --------------------------------------------------------------------------------------


def _to_bits(x: np.ndarray, width: int) -> np.ndarray:
    """MSB-first ``width``-bit fields of non-negative ints ``x`` as a flat 0/1 uint8 array."""
    bits = np.empty((x.size, width), np.uint8)
    for j in range(width):  # loop over bit planes, vectorised over values
        np.bitwise_and(x >> (width - 1 - j), 1, out=bits[:, j], casting="unsafe")
    return bits.ravel()


def _from_bits(bits: np.ndarray, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`_to_bits` (int64 result); ``bits`` holds exactly count*width bits."""
    planes = bits.reshape(count, width)
    x = np.zeros(count, np.int64)
    for j in range(width):
        x <<= 1
        x |= planes[:, j]
    return x


def _golomb_params(m: int) -> tuple[int, int]:
    """(prefix width, cutoff u) of the truncated-binary remainder code for Golomb M.

    Remainder r < u is written in ``width`` bits; r >= u as the ``width``-bit prefix
    (r + u) >> 1 plus one extra bit (r + u) & 1. Splitting the extra bits into their own
    stream makes every remainder fixed-width, hence decodable without a sequential scan.
    """
    if m == 1:
        return 0, 1  # remainder is always 0: no bits at all
    b = (m - 1).bit_length()  # ceil(log2 m)
    return b - 1, (1 << b) - m


def _golomb_cost(values: np.ndarray, m: int) -> int:
    """Exact bit count of the Golomb(M) code of non-negative ints ``values``."""
    width, u = _golomb_params(m)
    q, r = np.divmod(values, m)
    return int(q.sum()) + values.size * (1 + width) + int(np.count_nonzero(r >= u))


def _best_golomb(values: np.ndarray, candidates: list[int], limit: int) -> tuple[int, int]:
    """(M, bits) minimising the code length over ``candidates`` clipped to [1, limit]."""
    best = None
    for m in sorted({min(max(1, c), max(1, limit)) for c in candidates}):
        cost = _golomb_cost(values, m)
        if best is None or cost < best[1]:
            best = (m, cost)
    assert best is not None
    return best


def _golomb_encode(values: np.ndarray, m: int) -> tuple[np.ndarray, int, int]:
    """Golomb(M) bits of ``values``: prefix stream | unary quotients | extra bits.

    Returns (bits as 0/1 uint8, unary-stream length, extra-bit count).
    """
    width, u = _golomb_params(m)
    q, r = np.divmod(values, m)
    ext = r >= u
    prefix = np.where(ext, (r + u) >> 1, r)
    n_unary = int(q.sum()) + values.size
    n_pre = values.size * width
    n_extra = int(np.count_nonzero(ext))
    bits = np.empty(n_pre + n_unary + n_extra, np.uint8)
    bits[:n_pre] = _to_bits(prefix, width)
    unary = bits[n_pre : n_pre + n_unary]
    unary.fill(1)
    unary[np.cumsum(q + 1) - 1] = 0  # q ones then a terminating zero per value
    bits[n_pre + n_unary :] = (r[ext] + u) & 1
    return bits, n_unary, n_extra


def _golomb_decode(bits: np.ndarray, count: int, m: int, n_unary: int, n_extra: int) -> np.ndarray:
    """Inverse of :func:`_golomb_encode`; ``bits`` holds exactly the three streams."""
    width, u = _golomb_params(m)
    n_pre = count * width
    prefix = _from_bits(bits[:n_pre], count, width)
    terminators = np.flatnonzero(bits[n_pre : n_pre + n_unary] == 0)
    if terminators.size != count or (count and terminators[-1] != n_unary - 1):
        raise CodecError("Golomb unary stream does not hold exactly one code per value")
    q = np.diff(terminators, prepend=-1) - 1
    ext = prefix >= u
    if int(np.count_nonzero(ext)) != n_extra:
        raise CodecError("Golomb extra-bit count does not match the remainder prefixes")
    r = prefix
    r[ext] = 2 * prefix[ext] + bits[n_pre + n_unary :] - u
    return q * m + r


def _check_padding(section: np.ndarray, used_bits: int) -> None:
    """The bits after ``used_bits`` in the last byte must be zero (one encoding per message)."""
    spare = 8 * section.size - used_bits
    if spare and int(section[-1]) & ((1 << spare) - 1):
        raise CodecError("non-zero padding bits in position section")


# --------------------------------------------------------------------------------------
# positions
# --------------------------------------------------------------------------------------


def _golomb_candidates(mean: float) -> list[int]:
    """Golomb parameters around the optimum for geometric values with this mean.

    Gallager & van Voorhis: with p = 1 / (1 + mean), M = ceil(log(2 - p) / -log(1 - p)) is
    optimal for i.i.d. geometric values (gaps of a random mask: p ~ k/n); the neighbours
    cover inputs that are not quite geometric (top-k masks). Sizes are then measured exactly.
    """
    if mean <= 0.0:
        return [1]
    p = 1.0 / (1.0 + mean)
    m0 = max(1, math.ceil(math.log(2.0 - p) / -math.log1p(-p)))
    return [m0 - 1, m0, m0 + 1]


def _enum_center(k: int, n: int) -> int:
    """Expected popcount of a 64-bit block, the zero point of the zig-zag deviation code."""
    return (_ENUM_T * k + n // 2) // n if n else 0


def _zigzag(w: np.ndarray, c: int) -> np.ndarray:
    d = w - c
    return np.where(d >= 0, 2 * d, -2 * d - 1)


@dataclass
class _PosPlan:
    kind: int
    nbytes: int  # sub-header + packed stream
    m: int = 0


def _plan_positions(positions: np.ndarray, n: int) -> tuple[_PosPlan, dict]:
    """Exact size of each position code for this mask; returns the smallest (and scratch)."""
    k = positions.size
    scratch: dict = {}
    if k == n:
        return _PosPlan(_POS_DENSE, 0), scratch
    plans = [_PosPlan(_POS_BITMAP, (n + 7) // 8)]

    gaps = np.diff(positions, prepend=-1) - 1
    scratch["gaps"] = gaps
    m, bits = _best_golomb(gaps, _golomb_candidates((n - k) / k if k else 0.0), n)
    plans.append(_PosPlan(_POS_GOLOMB, _GOLOMB_SUB.size + (bits + 7) // 8, m))

    nb = (n + _ENUM_T - 1) // _ENUM_T
    w = np.bincount(positions // _ENUM_T, minlength=nb)  # popcount of each 64-bit block
    z = _zigzag(w, _enum_center(k, n))
    m, bits = _best_golomb(z, _golomb_candidates(float(z.mean()) if nb else 0.0), _ENUM_MAX_M)
    bits += int(_RANK_BITS[w].sum())
    plans.append(_PosPlan(_POS_ENUM, _ENUM_SUB.size + (bits + 7) // 8, m))
    scratch.update(w=w, z=z)
    return min(plans, key=lambda p: p.nbytes), scratch  # ties keep the simpler code


def _encode_positions(mask: np.ndarray, positions: np.ndarray, n: int) -> tuple[int, bytes, list]:
    """(position id, sub-header, [payload buffers]) for the cheapest code."""
    plan, s = _plan_positions(positions, n)
    if plan.kind == _POS_DENSE:
        return plan.kind, b"", []
    if plan.kind == _POS_BITMAP:
        return plan.kind, b"", [np.packbits(mask)]
    if plan.kind == _POS_GOLOMB:
        bits, n_unary, n_extra = _golomb_encode(s["gaps"], plan.m)
        return plan.kind, _GOLOMB_SUB.pack(plan.m, n_unary, n_extra), [np.packbits(bits)]
    # enumerative blocks
    w = s["w"]
    code, n_unary, n_extra = _golomb_encode(s["z"], plan.m)
    widths = _RANK_BITS[w]
    rank_bits = _var_bits(_enum_ranks(positions, w), widths)
    sub = _ENUM_SUB.pack(plan.m, n_unary, n_extra, rank_bits.size)
    return plan.kind, sub, [np.packbits(np.concatenate([code, rank_bits]))]


def _enum_ranks(positions: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Combinatorial-number-system rank of each block's pattern, O(k): sum_i C(a_i, i)."""
    starts = np.cumsum(w) - w
    within = np.arange(positions.size) - np.repeat(starts, w)  # 0-based index in its block
    terms = _COMB[positions & (_ENUM_T - 1), within + 1]
    ranks = np.zeros(w.size, np.uint64)
    full = np.flatnonzero(w)
    if full.size:
        ranks[full] = np.add.reduceat(terms, starts[full])
    return ranks


def _enum_unrank(ranks: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """Sorted positions from (rank, popcount) per block, O(k + 64) vector steps.

    Greedy unranking takes, for every block with s bits left, the largest j with
    C(j, s) <= rank. Visiting blocks in decreasing popcount order makes the blocks with s
    bits left a prefix at step s, so each step is one searchsorted over a slice.
    """
    starts = np.cumsum(w) - w
    order = np.argsort(-w.astype(np.int8), kind="stable")  # radix sort on small ints
    w_desc = w[order]
    rank = ranks[order]
    slot = starts[order] - 1
    base = order * _ENUM_T
    out = np.empty(k, np.int64)
    top = int(w_desc[0]) if w.size else 0
    actives = np.searchsorted(-w_desc, -np.arange(top + 1), side="right")  # #blocks w >= s
    for s in range(top, 0, -1):
        active = int(actives[s])
        table = _COMB_BY_R[s]
        j = np.searchsorted(table, rank[:active], side="right") - 1
        rank[:active] -= table[j]
        out[slot[:active] + s] = base[:active] + j
    return out


def _var_bits(x: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Concatenated MSB-first fields, x[i] in widths[i] bits, O(total bits)."""
    total = int(widths.sum())
    shift = np.repeat(np.cumsum(widths), widths) - 1 - np.arange(total)
    return ((np.repeat(x, widths) >> shift.astype(np.uint64)) & np.uint64(1)).astype(np.uint8)


def _from_var_bits(bits: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_var_bits` (uint64 result)."""
    ends = np.cumsum(widths)
    shift = np.repeat(ends, widths) - 1 - np.arange(bits.size)
    terms = bits.astype(np.uint64) << shift.astype(np.uint64)
    out = np.zeros(widths.size, np.uint64)
    used = np.flatnonzero(widths)
    if used.size:
        out[used] = np.add.reduceat(terms, (ends - widths)[used])
    return out


def _decode_enum(section: np.ndarray, lay: _Layout) -> np.ndarray:
    n, k = lay.n, lay.k
    nb = (n + _ENUM_T - 1) // _ENUM_T
    m, n_unary, n_extra, n_rank = lay.pos_params
    bits = np.unpackbits(section)
    n_code = lay.pos_bits - n_rank
    z = _golomb_decode(bits[:n_code], nb, m, n_unary, n_extra)
    c = _enum_center(k, n)
    w = np.where(z % 2 == 0, c + z // 2, c - (z + 1) // 2)
    if w.size and (w.min() < 0 or w.max() > _ENUM_T):
        raise CodecError("enumerative block popcount out of range")
    if int(w.sum()) != k:
        raise CodecError("enumerative popcounts do not sum to k")
    widths = _RANK_BITS[w]
    if int(widths.sum()) != n_rank:
        raise CodecError("enumerative rank stream length does not match popcounts")
    rank = _from_var_bits(bits[n_code : n_code + n_rank], widths)
    if np.any(rank >= _COMB[_ENUM_T][w]):
        raise CodecError("enumerative rank out of range for its popcount")
    positions = _enum_unrank(rank, w, k)
    if positions.size and positions[-1] >= n:
        raise CodecError("position beyond n")
    return positions


def _decode_positions(buf: memoryview, lay: _Layout) -> np.ndarray | None:
    """Sorted int64 positions, or None for a dense message."""
    if lay.pos_id == _POS_DENSE:
        return None
    section = np.frombuffer(buf, np.uint8, lay.pos_bytes, lay.pos_offset)
    _check_padding(section, lay.pos_bits)
    if lay.pos_id == _POS_BITMAP:
        positions = np.flatnonzero(np.unpackbits(section, count=lay.n))
        if positions.size != lay.k:
            raise CodecError("bitmap popcount does not match k")
        return positions
    if lay.pos_id == _POS_ENUM:
        return _decode_enum(section, lay)
    m, n_unary, n_extra = lay.pos_params
    gaps = _golomb_decode(np.unpackbits(section)[: lay.pos_bits], lay.k, m, n_unary, n_extra)
    positions = np.cumsum(gaps + 1) - 1
    if positions.size and positions[-1] >= lay.n:
        raise CodecError("position beyond n")
    return positions


# --------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------


def _bf16_round(x32: np.ndarray, direction: int) -> np.ndarray:
    """bfloat16 bit patterns of finite float32 ``x32`` rounded down (-1) or up (+1)."""
    hi = x32.view(np.uint32) >> 16
    trunc = (hi << 16).view(np.float32)  # rounds toward zero
    step = (trunc > x32) if direction < 0 else (trunc < x32)
    return (hi + step).astype(np.uint16)  # +1 on the pattern moves away from zero


def _bf16_value(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_round(x64: np.ndarray, direction: int) -> np.ndarray:
    """float64 -> float32 rounded down (-1) or up (+1)."""
    with np.errstate(over="ignore"):
        f = x64.astype(np.float32)
    bad = (f < x64) if direction > 0 else (f > x64)
    return np.where(bad, np.nextafter(f, np.float32(direction * np.inf)), f)


def _quantize(
    vals: np.ndarray, levels: int, block: int, noise: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block-affine quantization: (offset bf16 bits, scale bf16 bits, codes uint8).

    offset is ``min`` rounded down and scale ``(max - offset) / levels`` rounded up to
    bfloat16, so the grid ``offset + q * scale`` (q = 0..levels) covers the block and
    nearest rounding errs by at most scale / 2 (stochastic: < scale). Codes are computed
    against the *stored* offset and scale, so the bound holds for the decoded values.
    """
    k = vals.size
    if float(np.abs(vals).max()) >= _INT_RANGE_LIMIT:
        raise CodecError("int8/int4 values must satisfy |x| < 2**126")
    starts = np.arange(0, k, block)
    lo = np.minimum.reduceat(vals, starts)
    hi = np.maximum.reduceat(vals, starts).astype(np.float64)
    off_bits = _bf16_round(lo, -1)
    off = _bf16_value(off_bits).astype(np.float64)
    sc_bits = _bf16_round(_f32_round((hi - off) / levels, +1), +1)
    sc_bits += (off + levels * _bf16_value(sc_bits).astype(np.float64) < hi).astype(np.uint16)
    sc = _bf16_value(sc_bits).astype(np.float64)

    off_per, sc_per = _per_value(off, k, block), _per_value(sc, k, block)
    t = (vals - off_per) / np.where(sc_per > 0, sc_per, 1.0)
    q = np.rint(t) if noise is None else np.floor(t + noise)
    return off_bits, sc_bits, np.clip(q, 0, levels).astype(np.uint8)


def _per_value(per_block: np.ndarray, k: int, block: int) -> np.ndarray:
    """Expand per-block parameters to the k values: O(k) memory whatever ``block`` says."""
    if k == 0:
        return per_block[:0]
    counts = np.full(per_block.size, block, np.int64)
    counts[-1] = k - block * (per_block.size - 1)
    return np.repeat(per_block, counts)


def _encode_values(
    vals: np.ndarray,
    fmt: str,
    block: int,
    generator: torch.Generator | None,
    stochastic: bool,
) -> tuple[bytes, list]:
    """(value sub-header, [payload buffers]) of float32 ``vals`` in format ``fmt``."""
    if fmt == "float32":
        return b"", [vals.astype("<f4", copy=False)]
    if fmt == "float16":
        with np.errstate(over="ignore"):
            half = vals.astype("<f2")
        if not np.isfinite(half).all():
            raise CodecError("value exceeds the float16 range (|x| > 65504)")
        return b"", [half]
    if fmt == "bfloat16":
        b = vals.view(np.uint32)
        half = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype("<u2")  # round to nearest even
        if np.any((half & 0x7F80) == 0x7F80):
            raise CodecError("value rounds to infinity in bfloat16")
        return b"", [half]
    levels = _QUANT_LEVELS[fmt]
    sub = _BLOCK_SUB.pack(block)
    if vals.size == 0:
        return sub, []
    noise = None
    if stochastic:
        if generator is None:
            raise CodecError("stochastic rounding needs the sender's torch.Generator")
        noise = (
            torch.rand(vals.size, generator=generator, dtype=torch.float64, device=generator.device)
            .cpu()
            .numpy()
        )
    off_bits, sc_bits, q = _quantize(vals, levels, block, noise)
    if levels == 15:
        if q.size % 2:
            q = np.append(q, np.uint8(0))
        q = q[0::2] | (q[1::2] << 4)  # low nibble first
    return sub, [off_bits.astype("<u2"), sc_bits.astype("<u2"), q]


def _value_bytes(fmt: str, k: int, block: int) -> int:
    if fmt in _VAL_ITEMSIZE:
        return k * _VAL_ITEMSIZE[fmt]
    codes = k if fmt == "int8" else (k + 1) // 2
    return 4 * (-(-k // block)) + codes


def _decode_values(buf: memoryview, lay: _Layout) -> np.ndarray:
    """Float32 values (a fresh writable array); rejects anything non-finite."""
    fmt, k, off = VALUE_FORMATS[lay.val_id], lay.k, lay.val_offset
    if fmt == "float32":
        vals = np.frombuffer(buf, "<f4", k, off).astype(np.float32)
    elif fmt == "float16":
        vals = np.frombuffer(buf, "<f2", k, off).astype(np.float32)
    elif fmt == "bfloat16":
        vals = _bf16_value(np.frombuffer(buf, "<u2", k, off))
    else:
        block = lay.block_size
        nbv = -(-k // block)
        scal = np.frombuffer(buf, "<u2", 2 * nbv, off)
        base, scale = _bf16_value(scal[:nbv]), _bf16_value(scal[nbv:])
        if not (np.isfinite(base).all() and np.isfinite(scale).all() and (scale >= 0).all()):
            raise CodecError("quantization offset/scale not finite or scale negative")
        raw = np.frombuffer(buf, np.uint8, lay.val_bytes - 4 * nbv, off + 4 * nbv)
        if fmt == "int4":
            if k % 2 and raw[-1] >> 4:
                raise CodecError("non-zero int4 padding nibble")
            codes = np.empty(2 * raw.size, np.uint8)
            codes[0::2] = raw & 0xF
            codes[1::2] = raw >> 4
        else:
            codes = raw
        with np.errstate(over="ignore", invalid="ignore"):
            vals = _per_value(base, k, block) + codes[:k] * _per_value(scale, k, block)
    if not np.isfinite(vals).all():
        raise CodecError("non-finite value in payload")
    return vals


# --------------------------------------------------------------------------------------
# framing
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    n: int
    k: int
    pos_id: int
    val_id: int
    pos_params: tuple[int, ...]
    block_size: int
    header_bytes: int
    pos_bits: int
    pos_offset: int
    pos_bytes: int
    val_offset: int
    val_bytes: int


def _as_int(value: object, what: str) -> int:
    """A non-negative integer argument (Python or numpy int, not bool) or CodecError."""
    if isinstance(value, bool):
        raise CodecError(f"{what} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise CodecError(f"{what} must be an int, got {type(value).__name__}") from None
    if value < 0:
        raise CodecError(f"{what} must be >= 0, got {value}")
    return value


def _parse(payload: bytes | bytearray | memoryview, max_bytes: int | None) -> _Layout:
    """Validate framing, CRC, every field and the exact total length; allocate nothing."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CodecError(f"payload must be bytes-like, got {type(payload).__name__}")
    if max_bytes is not None:
        max_bytes = _as_int(max_bytes, "max_bytes")
    buf = memoryview(payload).cast("B")
    size = buf.nbytes
    if max_bytes is not None and size > max_bytes:
        raise CodecError(f"payload of {size} bytes exceeds max_bytes={max_bytes}")
    if size < _FIXED.size + _CRC.size:
        raise CodecError(f"payload of {size} bytes is shorter than the fixed header")
    magic, version, n, k, pos_id, val_id = _FIXED.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CodecError("bad magic: not a fedlora codec payload")
    if version != VERSION:
        raise CodecError(f"unsupported format version {version}")
    (stored,) = _CRC.unpack_from(buf, size - _CRC.size)
    if zlib.crc32(buf[: size - _CRC.size]) != stored:
        raise CodecError("CRC32 mismatch: payload corrupted")
    if k > n:
        raise CodecError(f"k={k} exceeds n={n}")
    if pos_id >= len(POSITION_FORMATS):
        raise CodecError(f"unknown position encoding id {pos_id}")
    if val_id >= len(VALUE_FORMATS):
        raise CodecError(f"unknown value encoding id {val_id}")

    at = _FIXED.size

    def take(st: struct.Struct) -> tuple[int, ...]:
        nonlocal at
        if at + st.size + _CRC.size > size:
            raise CodecError("payload truncated inside a sub-header")
        fields = st.unpack_from(buf, at)
        at += st.size
        return fields

    params: tuple[int, ...] = ()
    if pos_id == _POS_DENSE:
        if k != n:
            raise CodecError("dense position encoding requires k == n")
        pos_bits = 0
    elif pos_id == _POS_BITMAP:
        pos_bits = n
    elif pos_id == _POS_GOLOMB:
        params = m, n_unary, n_extra = take(_GOLOMB_SUB)
        if not 1 <= m <= max(n, 1):
            raise CodecError(f"Golomb parameter {m} out of range")
        if n_unary < k or (n_unary - k) * m > n - k or n_extra > k or (m == 1 and n_extra):
            raise CodecError("Golomb stream sizes inconsistent with n and k")
        if (n - k) + k * m >= _SAFE_SUM:
            raise CodecError("Golomb parameters too large")
        pos_bits = k * _golomb_params(m)[0] + n_unary + n_extra
    else:
        params = m, n_unary, n_extra, n_rank = take(_ENUM_SUB)
        nb = (n + _ENUM_T - 1) // _ENUM_T
        if not 1 <= m <= _ENUM_MAX_M:
            raise CodecError(f"enumerative popcount parameter {m} out of range")
        if not nb <= n_unary <= nb * (1 + (2 * _ENUM_T) // m):
            raise CodecError("enumerative unary stream size out of range")
        if n_extra > nb or (m == 1 and n_extra) or n_rank > nb * int(_RANK_BITS.max()):
            raise CodecError("enumerative stream sizes out of range")
        pos_bits = nb * _golomb_params(m)[0] + n_unary + n_extra + n_rank

    fmt = VALUE_FORMATS[val_id]
    block = 0
    if fmt in _QUANT_LEVELS:
        (block,) = take(_BLOCK_SUB)
        if not 1 <= block <= _MAX_BLOCK_SIZE:
            raise CodecError(f"quantization block size {block} out of range")
    pos_bytes = (pos_bits + 7) // 8
    val_bytes = _value_bytes(fmt, k, block)
    expected = at + pos_bytes + val_bytes + _CRC.size
    if expected != size:
        raise CodecError(f"payload is {size} bytes but its header describes {expected}")
    return _Layout(
        n, k, pos_id, val_id, params, block, at, pos_bits, at, pos_bytes, at + pos_bytes, val_bytes
    )


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------


def encode(
    vector: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    values: str = "float32",
    block_size: int = 256,
    generator: torch.Generator | None = None,
    stochastic: bool = False,
) -> bytes:
    """Encode the entries of 1-D ``vector`` selected by bool ``mask`` (None: all of them).

    ``values`` picks the value format (see ``VALUE_FORMATS``). ``block_size`` is the
    number of consecutive *sent* values sharing one int8/int4 offset and scale.
    ``stochastic=True`` rounds int8/int4 codes stochastically with draws from
    ``generator`` (required then; exactly k draws), which makes the dequantized value
    unbiased; float formats ignore it. Raises :class:`CodecError` for unencodable input
    (non-finite sent values, float16 overflow, bad arguments).
    """
    if values not in VALUE_FORMATS:
        raise CodecError(f"unknown value format {values!r}; expected one of {VALUE_FORMATS}")
    block_size = _as_int(block_size, "block_size")
    if not 1 <= block_size <= _MAX_BLOCK_SIZE:
        raise CodecError(f"block_size must be in [1, {_MAX_BLOCK_SIZE}]")
    if not isinstance(vector, torch.Tensor) or vector.dim() != 1:
        raise CodecError("vector must be a 1-D torch.Tensor")
    if not vector.is_floating_point():
        raise CodecError(f"vector must be floating point, got {vector.dtype}")
    n = vector.numel()
    if n > _U32_MAX:
        raise CodecError(f"vector too long for the format (n={n})")
    vec = vector.detach()
    if vec.device.type != "cpu" or vec.dtype != torch.float32:
        vec = vec.to("cpu", torch.float32)
    vec_np = vec.contiguous().numpy()

    if mask is None:
        mask_np = None
        positions = None
    else:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise CodecError("mask must be a bool torch.Tensor")
        if mask.shape != vector.shape:
            raise CodecError(f"mask shape {tuple(mask.shape)} != vector shape {(n,)}")
        mask_np = mask.detach().cpu().contiguous().numpy()
        positions = np.flatnonzero(mask_np)
        if positions.size == n:
            positions = None
    vals = vec_np if positions is None else vec_np[positions]
    k = vals.size
    if not np.isfinite(vals).all():
        raise CodecError("refusing to encode non-finite values")

    if positions is None:
        pos_id, pos_sub, pos_parts = _POS_DENSE, b"", []
    else:
        pos_id, pos_sub, pos_parts = _encode_positions(mask_np, positions, n)
    val_sub, val_parts = _encode_values(vals, values, block_size, generator, stochastic)
    parts = [_FIXED.pack(MAGIC, VERSION, n, k, pos_id, _VAL_ID[values]), pos_sub, val_sub]
    parts += pos_parts + val_parts
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    parts.append(_CRC.pack(crc))
    return b"".join(parts)


def decode_sparse(
    payload: bytes, n: int, *, max_bytes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 positions, float32 values) of a payload for a vector of expected length ``n``.

    Raises :class:`CodecError` if the payload is malformed, corrupted, larger than
    ``max_bytes`` or describes a vector of another length. Nothing a sender controls raises
    anything else; ``MemoryError`` and internal bugs propagate unchanged.
    """
    n = _as_int(n, "expected n")
    # No catch-all here: every malformed input is caught by an explicit check and raised as
    # CodecError; anything else (MemoryError, a bug in this module) propagates as itself, so
    # a decoder bug is never mistaken for a bad client.
    lay = _parse(payload, max_bytes)
    if lay.n != n:
        raise CodecError(f"payload is for n={lay.n}, receiver expects n={n}")
    buf = memoryview(payload).cast("B")
    positions = _decode_positions(buf, lay)
    vals = _decode_values(buf, lay)
    pos = torch.arange(n) if positions is None else torch.from_numpy(positions)
    return pos, torch.from_numpy(vals)


def decode(payload: bytes, n: int, *, max_bytes: int | None = None) -> torch.Tensor:
    """Dense float32 CPU tensor of length ``n``: sent values at their positions, else 0."""
    positions, vals = decode_sparse(payload, n, max_bytes=max_bytes)
    if vals.numel() == n:
        return vals
    out = np.zeros(n, np.float32)
    out[positions.numpy()] = vals.numpy()
    return torch.from_numpy(out)


def header(payload: bytes) -> dict:
    """Validated header fields and section sizes, for benchmarks and debugging.

    ``position_bits`` / ``value_bits`` are the exact stream lengths; ``*_bytes`` include
    sub-headers and padding, so header + positions + values + crc == total.
    """
    lay = _parse(payload, None)
    fmt = VALUE_FORMATS[lay.val_id]
    pos_sub = {_POS_GOLOMB: _GOLOMB_SUB.size, _POS_ENUM: _ENUM_SUB.size}.get(lay.pos_id, 0)
    val_sub = _BLOCK_SUB.size if fmt in _QUANT_LEVELS else 0
    return {
        "version": VERSION,
        "n": lay.n,
        "k": lay.k,
        "positions": POSITION_FORMATS[lay.pos_id],
        "values": fmt,
        "block_size": lay.block_size or None,
        "position_params": lay.pos_params,
        "fixed_header_bytes": _FIXED.size,
        "position_bits": lay.pos_bits,
        "position_bytes": pos_sub + lay.pos_bytes,
        "value_bits": 8 * lay.val_bytes,
        "value_bytes": val_sub + lay.val_bytes,
        "position_offset": lay.pos_offset,
        "value_offset": lay.val_offset,
        "crc_bytes": _CRC.size,
        "total_bytes": lay.val_offset + lay.val_bytes + _CRC.size,
    }
