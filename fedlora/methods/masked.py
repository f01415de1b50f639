"""The freezing baselines' common shape: one mask M governs the whole round.

Clients download P * M with M's positions (a client holds no state between rounds), train
only inside M (the gradient is masked before the momentum update, so nothing outside M
moves) and upload only inside M, values only: the server dictated M and the client learned
it from the download. The server step leaves entries outside M, and their optimizer state,
untouched. A mask of None means dense. Subclasses only decide when M is (re)computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedlora.comm.topk import topk_mask
from fedlora.config import check_density
from fedlora.methods.base import Client, Server, Settings


@dataclass
class DensitySettings(Settings):
    density: float = 0.25  # the fixed density of the mask

    def validate(self, cfg, method: str) -> None:
        super().validate(cfg, method)
        check_density(self.density, "method.density")


class MaskedClient(Client):
    """M is the positions of this round's download."""

    up_implicit = True

    def start(self, received: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        self.mask = positions
        return received

    def train_mask(self) -> torch.Tensor | None:
        return self.mask

    def upload_mask(self, delta: torch.Tensor) -> torch.Tensor | None:
        return self.mask


@dataclass
class Masked(Server):
    client = MaskedClient
    mask: torch.Tensor | None = field(default=None, repr=False)

    def download_mask(self, P: torch.Tensor, round_: int, client: int) -> torch.Tensor | None:
        return self.mask

    def upload_mask(self, round_: int, client: int) -> torch.Tensor | None:
        return self.mask

    def step_mask(self, round_: int) -> torch.Tensor | None:
        return self.mask

    @property
    def exempt(self) -> torch.Tensor | None:
        """Entries outside the competition, always in M: a backbone method's new task head
        (its W-only masks, methods/backbone.py). None for the LoRA methods."""
        return None

    def select(self, scores: torch.Tensor, density: float) -> torch.Tensor:
        """TopKMask(scores, density) over the competing entries, plus every exempt entry."""
        free = self.exempt
        if free is None:
            return topk_mask(scores, density)
        mask = free.clone()
        mask[~free] = topk_mask(scores[~free], density)
        return mask

    def prune_(self, P: torch.Tensor, density: float) -> None:
        """Permanently prune P to `density` of all n entries: M = TopKMask(|P|, d), P <- P * M.

        Entries already pruned score -1, below every kept entry (even a kept exact zero),
        so masks are nested: a pruned entry never comes back.
        """
        scores = P.abs() if self.mask is None else torch.where(self.mask, P.abs(), -1.0)
        self.mask = self.select(scores, density)
        P.masked_fill_(~self.mask, 0.0)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.mask is None else {"mask": self.mask}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.mask = tensors.get("mask")
