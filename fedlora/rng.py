"""Named, seeded random streams.

Each random choice draws from its own stream derived from (seed, stream, *keys),
so changing a density never changes which clients are sampled, and a resumed
run needs no saved generator state: round t's streams depend only on t.
"""

from __future__ import annotations

import numpy as np
import torch

# Stream ids are part of the reproducibility contract: never renumber.
STREAMS = {
    "partition": 1,
    "split": 2,
    "sampling": 3,
    "data_order": 4,
    "dropout": 5,
    "init": 6,
    "dp_noise": 7,
    "tiers": 8,
    "quantize": 9,
    "subsample": 10,
    "slora_mask": 11,
    "lora_reinit": 12,
    "local_test": 13,  # each client's held-out local test split
    "eval_clients": 14,  # the clients sampled for per-client evaluation
    "personal": 15,  # evaluation-time local training (local-only reference, fine-tuning)
    "fusion": 16,  # FDLoRA: the examples a client fits its fusion weights on
    "lockstep_dropout": 17,  # lockstep training: one dropout stream per (round, chunk)
    "eval_subset": 18,  # eval_max_examples: the test examples evaluated during training
}


def _key(seed: int, stream: str, keys: tuple[int, ...]) -> list[int]:
    return [int(seed), STREAMS[stream], *(int(k) for k in keys)]


def np_rng(seed: int, stream: str, *keys: int) -> np.random.Generator:
    """A numpy Generator for `stream`, independent of every other stream."""
    return np.random.default_rng(_key(seed, stream, keys))


def torch_seed(seed: int, stream: str, *keys: int) -> int:
    """A 63-bit seed for torch generators (or the global RNG that dropout uses)."""
    state = np.random.SeedSequence(_key(seed, stream, keys)).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def torch_generator(seed: int, stream: str, *keys: int, device: str | torch.device = "cpu"):
    g = torch.Generator(device=device)
    g.manual_seed(torch_seed(seed, stream, *keys))
    return g
