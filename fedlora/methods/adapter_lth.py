"""Adapter LTH: iterative magnitude pruning without rewinding (paper Algorithm 5).

Density schedule (p = method.prune_ratio, q = method.prune_every): the density in
force during round t (1-based) is

    d_t = (1 - p) ** floor((t - 1) / q)

of all n entries. Round 1 (and every round before the first prune) is dense; at the
start of each round t > 1 with (t - 1) % q == 0, P <- P * TopKMask(|P|, d_t) among
the entries still alive. For q = 1 this is Algorithm 5 exactly (its first prune is at
d = 1, a no-op); for q > 1 the first real prune comes after q rounds of training, as in
the public reference code. The paper's "LTH density 0.98" is prune_ratio = 0.02.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlora.config import check
from fedlora.methods.base import Settings
from fedlora.methods.masked import Masked


def lth_density(round_: int, prune_ratio: float, prune_every: int) -> float:
    """The density in force during round `round_` (1-based)."""
    return (1.0 - prune_ratio) ** ((round_ - 1) // prune_every)


@dataclass
class PruneSettings(Settings):
    prune_ratio: float = 0.02  # fraction of the alive entries removed at each prune
    prune_every: int = 1  # rounds between prunes

    def validate(self, cfg, method: str) -> None:
        super().validate(cfg, method)
        check(0.0 <= self.prune_ratio < 1.0, "method.prune_ratio", "must be in [0, 1)")
        check(self.prune_every >= 1, "method.prune_every", "must be >= 1")


@dataclass
class AdapterLTH(Masked):
    settings = PruneSettings
    prunes: int = 0  # prunes done so far; round t has done floor((t - 1) / q)

    def begin_round(self, P: torch.Tensor, round_: int) -> None:
        me = self.cfg.method
        due = (round_ - 1) // me.prune_every
        if due > self.prunes:  # at most one per round; `>` also covers a resumed run
            self.prunes = due
            self.prune_(P, lth_density(round_, me.prune_ratio, me.prune_every))

    @property
    def density(self) -> float:
        return (1.0 - self.cfg.method.prune_ratio) ** self.prunes

    def state_json(self) -> dict:
        return {"prunes": self.prunes, "density": self.density}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        super().load_state(tensors, meta)
        self.prunes = int(meta.get("prunes", 0))
