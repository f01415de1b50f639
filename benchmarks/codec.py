"""Benchmark of the wire codec: position bits vs the information bound, bytes, and speed.

    python benchmarks/codec.py [--vector PATH.safetensors --key NAME] [--reps 20]

Prints markdown tables: (1) bits per position on random masks at n = 2**20 (and on top-k
masks of a real vector when --vector is given) against log2 C(n, k) / k, a bitmap (n / k)
and uint32 indices (32); (2) message bytes per value format against dense float32 (4n);
(3) median encode / decode time of a 2.36M-entry vector at density 1/16 with a top-k mask.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedlora.comm.codec import VALUE_FORMATS, decode, encode, header  # noqa: E402

DENSITIES = (1 / 256, 1 / 64, 1 / 16, 1 / 4, 1 / 2)
TIMING_N = 2_360_000
TIMING_DENSITY = 1 / 16


def log2_binom(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def random_mask(n: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    m = np.zeros(n, bool)
    m[rng.choice(n, size=k, replace=False)] = True
    return torch.from_numpy(m)


def topk_mask(v: torch.Tensor, k: int) -> torch.Tensor:
    m = torch.zeros(v.numel(), dtype=torch.bool)
    m[torch.topk(v.abs(), k).indices] = True
    return m


def frac(d: float) -> str:
    return f"1/{round(1 / d)}"


def size_rows(label: str, v: torch.Tensor, masks: list[tuple[float, torch.Tensor]]) -> tuple:
    pos_rows, byte_rows = [], []
    n = v.numel()
    for d, m in masks:
        k = int(m.sum())
        sizes = {fmt: encode(v, m, values=fmt) for fmt in VALUE_FORMATS}
        h = header(sizes["float32"])
        bits = 8 * h["position_bytes"] / k  # includes sub-header and padding
        bound = log2_binom(n, k) / k
        pos_rows.append(
            f"| {label} | {frac(d)} | {n} | {k} | {h['positions']} | {bits:.3f} | {bound:.3f} "
            f"| {bits / bound:.4f} | {n / k:.1f} | 32 |"
        )
        cells = " | ".join(f"{len(p)} ({len(p) / (4 * n):.4f})" for p in sizes.values())
        byte_rows.append(f"| {label} | {frac(d)} | {cells} |")
    return pos_rows, byte_rows


def time_rows(label: str, v: torch.Tensor, reps: int) -> list[str]:
    n = v.numel()
    m = topk_mask(v, round(TIMING_DENSITY * n))
    sent = v[m]
    rows = []
    for fmt in VALUE_FORMATS:
        enc, dec = [], []
        for i in range(reps + 2):
            t0 = time.perf_counter()
            payload = encode(v, m, values=fmt)
            t1 = time.perf_counter()
            out = decode(payload, n)
            t2 = time.perf_counter()
            if i >= 2:  # warm-up
                enc.append(t1 - t0)
                dec.append(t2 - t1)
        err = float(torch.linalg.vector_norm(out[m] - sent) / torch.linalg.vector_norm(sent))
        e, d = statistics.median(enc) * 1e3, statistics.median(dec) * 1e3
        tot = statistics.median(a + b for a, b in zip(enc, dec, strict=True)) * 1e3
        rows.append(
            f"| {label} | {fmt} | {header(payload)['positions']} | {len(payload)} "
            f"| {len(payload) / (4 * n):.4f} | {err:.2e} | {e:.1f} | {d:.1f} | {tot:.1f} |"
        )
    return rows


def load_vector(path: str, key: str) -> torch.Tensor:
    from safetensors.torch import load_file

    tensors = load_file(path)
    if key not in tensors:
        raise SystemExit(f"key {key!r} not in {path}; keys: {sorted(tensors)[:20]}")
    return tensors[key].detach().reshape(-1).to(torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vector", help="safetensors file holding a real update vector")
    ap.add_argument("--key", help="tensor name inside --vector")
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions (median)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if bool(args.vector) != bool(args.key):
        ap.error("--vector and --key go together")

    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    n = 2**20
    v = torch.randn(n)
    masks = [(d, random_mask(n, round(d * n), rng)) for d in DENSITIES]
    pos_rows, byte_rows = size_rows("random", v, masks)
    real = None
    if args.vector:
        real = load_vector(args.vector, args.key)
        masks = [(d, topk_mask(real, round(d * real.numel()))) for d in DENSITIES]
        more = size_rows("top-k", real, masks)
        pos_rows += more[0]
        byte_rows += more[1]

    print(f"python {' '.join(sys.argv)}")
    print(
        f"torch {torch.__version__}, numpy {np.__version__}, {platform.processor() or '?'}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}\n"
    )
    print("### Position bits per sent entry (n = 2^20 for random masks)\n")
    print("| mask | k/n | n | k | code | bits/pos | log2C(n,k)/k | ratio | bitmap n/k | uint32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(pos_rows))
    print("\n### Message bytes (and fraction of dense float32, 4n bytes)\n")
    print("| mask | k/n | " + " | ".join(VALUE_FORMATS) + " |")
    print("|---|---|" + "---|" * len(VALUE_FORMATS))
    print("\n".join(byte_rows))
    print(
        f"\n### Encode + decode, n = {TIMING_N}, top-k mask at k/n = {frac(TIMING_DENSITY)}, "
        f"median of {args.reps}\n"
    )
    print("| vector | values | code | bytes | /4n | rel.err | encode ms | decode ms | total ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = time_rows("randn", torch.randn(TIMING_N), args.reps)
    if real is not None:
        rows += time_rows(f"{args.key} (n={real.numel()})", real, args.reps)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
