"""The freezing baselines' common shape: one mask M governs the whole round.

Clients download P * M, train only inside M (the gradient is masked before the
momentum update, so nothing outside M moves), upload only inside M; the server
step leaves entries outside M, and their optimizer state, untouched. A mask of
None means dense. Subclasses only decide when M is (re)computed.

The download carries M's positions (a client holds no state between rounds); the
upload is values only, because the server dictated M and the client learned it
from the download.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedlora.comm.topk import topk_mask
from fedlora.methods.base import Method


@dataclass
class Masked(Method):
    mask: torch.Tensor | None = field(default=None, repr=False)

    def download_mask(self, P: torch.Tensor, round_: int) -> torch.Tensor | None:
        return self.mask

    def train_mask(self, P: torch.Tensor, round_: int) -> torch.Tensor | None:
        return self.mask

    def upload_mask(self, delta: torch.Tensor, round_: int) -> torch.Tensor | None:
        return self.mask

    def step_mask(self, round_: int) -> torch.Tensor | None:
        return self.mask

    def implicit_positions(self, direction: str, client: int) -> bool:
        return direction == "up"

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
