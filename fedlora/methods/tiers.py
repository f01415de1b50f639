"""Budget tiers (paper Sec. 4.4), the component the tier methods share: HetLoRA and its
baselines, FLASC under tiers, and FLoRA stacking each hold a `Tiers` and say only how a
client's rank turns into what it trains and sends."""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.config import HetConfig, check, check_density
from fedlora.methods.base import Settings
from fedlora.server.hetero import assign_tiers, tier_rank


@dataclass
class Tiers:
    """Budget tiers (paper Sec. 4.4): each client's tier b_c from its own seeded stream, and
    its rank r_base^(b_c - 1); the server rank r_s is the top tier's."""

    het: HetConfig
    seed: int
    num_clients: int

    def __post_init__(self) -> None:
        self.r_s = tier_rank(self.het.tiers, self.het.r_base)
        self.r_min = tier_rank(1, self.het.r_base)  # the lowest tier's rank
        self.tier = assign_tiers(self.num_clients, self.het.tiers, self.seed)

    def rank(self, client: int) -> int:
        return tier_rank(int(self.tier[client]), self.het.r_base)


@dataclass
class TierSettings(Settings):
    """Tier methods take their settings from `het.*`; model.rank must be the server rank."""

    def validate(self, cfg, method: str) -> None:
        if method != "hetlora":  # the extras (self-pruning, loss ranks) are HetLoRA's
            super().validate(cfg, method)
        h = cfg.het
        r_s = h.r_base ** (h.tiers - 1)
        check(cfg.model.rank == r_s, "model.rank", f"must equal the server rank "
              f"r_base^(tiers-1) = {r_s} for method {method} (set model.rank={r_s})")


@dataclass
class FLASCTierSettings(TierSettings):
    d_down: float = 1.0  # download density, as FLASC's

    def validate(self, cfg, method: str) -> None:
        super().validate(cfg, method)
        check_density(self.d_down, "method.d_down")


