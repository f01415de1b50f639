"""The per-round hooks a method may change. The defaults are dense federated LoRA.

A method answers four questions each round (DESIGN.md): what is downloaded,
what the client may train, what is uploaded, and what happens to the server
vector after the optimizer step. A mask of None means "everything".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlora.config import Config
from fedlora.model.flat import FlatAdapter


@dataclass
class Method:
    cfg: Config
    adapter: FlatAdapter

    def begin_round(self, P: torch.Tensor, round_: int) -> None:
        """Round-boundary work on the server vector (pruning schedules)."""

    def download_mask(self, P: torch.Tensor, round_: int) -> torch.Tensor | None:
        return None

    def train_mask(self, P: torch.Tensor, round_: int) -> torch.Tensor | None:
        return None

    def upload_mask(self, delta: torch.Tensor, round_: int) -> torch.Tensor | None:
        return None

    def step_mask(self, round_: int) -> torch.Tensor | None:
        """Entries the server optimizer may change this round (None = all). Entries outside
        keep their value and their optimizer state, e.g. Federated Select's unselected ones."""
        return None

    def end_round(self, P: torch.Tensor, round_: int) -> None:
        """After the server step (e.g. keep pruned entries exactly zero)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def state_json(self) -> dict:
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        pass
