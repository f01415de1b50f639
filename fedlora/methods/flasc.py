"""FLASC (paper Algorithm 1): train densely, sparsify only what crosses the wire.

Server: download P * TopKMask(|P|, d_down) (positions travel). Client: train every entry,
upload delta * TopKMask(|delta|, d_up), its density told in the instruction. With
d_down = d_up = 1 this is dense LoRA exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlora.comm.topk import topk_mask
from fedlora.config import check_density
from fedlora.methods.base import Client, Server, Settings
from fedlora.methods.tiers import FLASCTierSettings, Tiers


@dataclass
class FLASCSettings(Settings):
    d_down: float = 1.0  # download density (TopKMask of |P|)
    d_up: float = 0.25  # upload density (TopKMask of |delta|)

    def validate(self, cfg, method: str) -> None:
        super().validate(cfg, method)
        check_density(self.d_down, "method.d_down")
        check_density(self.d_up, "method.d_up")


def flasc_download_mask(P: torch.Tensor, d_down: float) -> torch.Tensor | None:
    return None if d_down >= 1.0 else topk_mask(P.abs(), d_down)


class FLASCClient(Client):
    def upload_mask(self, delta: torch.Tensor) -> torch.Tensor | None:
        d = float(self.options["d_up"])
        return None if d >= 1.0 else topk_mask(delta.abs(), d)


class FLASC(Server):
    client = FLASCClient
    settings = FLASCSettings

    def options(self, round_: int, client: int) -> dict:
        return {"d_up": self.cfg.method.d_up}

    def download_mask(self, P: torch.Tensor, round_: int, client: int) -> torch.Tensor | None:
        return flasc_download_mask(P, self.cfg.method.d_down)


class FLASCTiers(FLASC):
    """FLASC under budget tiers: full rank r_s for all, upload density r_c / r_s so each
    client's bytes match its HetLoRA tier (paper Sec. 4.4). FLASC plus a tier table."""

    settings = FLASCTierSettings

    def setup(self, num_clients: int) -> None:
        self.budget = Tiers(self.cfg.het, self.cfg.seed, num_clients)
        self.r_s, self.tiers = self.budget.r_s, self.budget.tier

    def rank_of(self, client: int) -> int:
        return self.budget.rank(client)

    def options(self, round_: int, client: int) -> dict:
        return {"d_up": self.rank_of(client) / self.r_s}
