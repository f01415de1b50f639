"""The per-round hooks a method may change. The defaults are dense federated LoRA.

A method answers four questions each round (DESIGN.md): what is downloaded,
what the client may train, what is uploaded, and what happens to the server
vector after the optimizer step. A mask of None means "everything".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedlora.config import Config
from fedlora.model.flat import FlatAdapter


@dataclass
class Method:
    cfg: Config
    adapter: FlatAdapter
    # True: the task builds the model without LoRA and trains every backbone weight
    # (sparse-backbone baselines); read by `fedlora.model.lora.add_lora`.
    trains_backbone: ClassVar[bool] = False

    def setup(self, data) -> None:
        """Called once with the FederatedData (e.g. to assign budget tiers to clients)."""

    def begin_round(self, P: torch.Tensor, round_: int) -> None:
        """Round-boundary work on the server vector (pruning schedules)."""

    def download_mask(self, P: torch.Tensor, round_: int) -> torch.Tensor | None:
        return None

    def client_start(self, downloaded: torch.Tensor, round_: int) -> torch.Tensor:
        """The vector a client starts from, given what it decoded from the download. Entries
        a client already holds need not be sent: FFA-LoRA's frozen A comes from the seed."""
        return downloaded

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

    # ---- per-client hooks (heterogeneity); the defaults ignore the client
    def client_download_mask(self, P: torch.Tensor, round_: int,
                             client: int) -> torch.Tensor | None:
        return self.download_mask(P, round_)

    def client_train_mask(self, P: torch.Tensor, round_: int, client: int) -> torch.Tensor | None:
        return self.train_mask(P, round_)

    def client_upload_mask(self, delta: torch.Tensor, round_: int,
                           client: int) -> torch.Tensor | None:
        return self.upload_mask(delta, round_)

    def implicit_positions(self, direction: str, client: int) -> bool:
        """True when both ends already know the mask ("up" or "down"), so a payload carries
        values only: a HetLoRA client's rank, a pruning mask the server itself dictated."""
        return False

    def extra_download_bytes(self, round_: int, client: int) -> int:
        """Bytes of any additional payload a client downloads (stacking's merged update)."""
        return 0

    def cohort_sampled(self, round_: int, cohort: list[int]) -> None:
        """The round's cohort, before any client starts (per-round rank allocation)."""

    def local_penalty(self, round_: int, client: int) -> Callable[[], torch.Tensor] | None:
        """A term added to every local step's loss (HetLoRA's tail-norm penalty); None = none.

        The callable must read the model's parameters (not copies) so that its gradient
        reaches the flat gradient buffer."""
        return None

    def client_done(self, round_: int, client: int, start: torch.Tensor, trained: torch.Tensor,
                    stats: dict[str, float]) -> None:
        """After local training, before the upload mask: client-side state such as a rank
        self-prune. `trained` is the live adapter vector: copy what you keep."""

    def eligible(self, clients):
        """The sampleable clients (e.g. only the highest tier); default: all non-empty."""
        return clients

    def aggregate(self, updates: list[torch.Tensor], clients: list[int], weights: list[int],
                  P: torch.Tensor) -> torch.Tensor | None:
        """A method-specific pseudo-gradient (rank-heterogeneous padding); None = mean."""
        return None

    def eval_vectors(self, P: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra models to evaluate besides P, by name (e.g. each tier's truncation)."""
        return {}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def state_json(self) -> dict:
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        pass
