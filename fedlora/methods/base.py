"""A method is two halves that talk only through the protocol (fedlora/protocol.py).

`Server` decides, each round: who may be sampled, what each client is told (`options`) and
sent (`download_mask`, `extra_payloads`), how replies are aggregated, which entries the
server optimizer may step, and what happens at round boundaries. `Client` is built from one
`ClientTask` alone (plus the client's own seeded model init and, where a method documents
it, its client-held state) and decides the start vector, the training mask, a local penalty,
a post-training hook and the upload mask. The defaults of both are dense federated LoRA;
a method says only what differs. A mask of None means "everything".

Implicit positions: when both ends can derive a mask (a rank in the instruction, the
positions of this round's download, a fixed function of the layout), payloads carry values
only. The server says so with `down_implicit`/`upload_mask`, the client with
`down_mask`/`up_implicit`; both compute the mask with the same function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from fedlora.config import Config, check
from fedlora.model.flat import FlatAdapter
from fedlora.protocol import ClientTask


@dataclass
class Settings:
    """A method's own `method.*` settings (peft-style: one small typed config per method).
    The base has none; a method subclasses it and validates its fields in `validate`."""

    def validate(self, cfg: Config, method: str) -> None:
        het = cfg.het
        check(not het.self_prune, "het.self_prune",
              f"only applies to method hetlora (clients of rank r_c), not {method}")
        check(het.rank_allocation == "tier", "het.rank_allocation",
              f"loss only applies to method hetlora (rank per client), not {method}")


class Client:
    """The client half. `state` is the client-held state it loaded (empty for stateless
    methods); `save_state` returns what it keeps for later rounds (None: nothing)."""

    def __init__(self, task: ClientTask, adapter: FlatAdapter, init: torch.Tensor,
                 state: dict[str, torch.Tensor]):
        self.task, self.adapter, self.init, self.state = task, adapter, init, state
        self.options = task.options
        self.prepare()

    def prepare(self) -> None:
        """Derive what the instruction implies (masks from a rank, a stage, the layout)."""

    def down_mask(self) -> torch.Tensor | None:
        """The mask of a values-only download (derived here), or None: positions travel."""
        return None

    def start(self, received: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """The vector the client starts from, given what it decoded (`positions`: the entries
        the download carried, None = all)."""
        return received

    def train_mask(self) -> torch.Tensor | None:
        return None

    def penalty(self) -> Callable[[], torch.Tensor] | None:
        """A term added to every local step's loss (HetLoRA's tail norm); it must read the
        model's parameters, not copies, so its gradient reaches the flat gradient buffer."""
        return None

    def done(self, start: torch.Tensor, trained: torch.Tensor, stats: dict[str, Any]) -> None:
        """After local training, before the upload mask (a rank self-prune adds to `stats`).
        `trained` is the live adapter vector: copy what you keep."""

    def upload_mask(self, delta: torch.Tensor) -> torch.Tensor | None:
        return None

    up_implicit: ClassVar[bool] = False  # the server knows the upload mask: values only

    def save_state(self) -> dict[str, torch.Tensor] | None:
        return None


@dataclass
class Server:
    """The server half; the defaults are dense federated LoRA."""

    cfg: Config
    adapter: FlatAdapter
    client: ClassVar[type[Client]] = Client
    settings: ClassVar[type[Settings]] = Settings
    # True: the task builds the model without LoRA and trains every backbone weight
    # (sparse-backbone baselines). True: the adapted weights W join the flat vector too.
    trains_backbone: ClassVar[bool] = False
    trains_target_weights: ClassVar[bool] = False

    def __post_init__(self) -> None:
        """Work that needs only the config and the layout (fixed masks)."""

    def setup(self, num_clients: int) -> None:
        """Called once with the population size (e.g. to assign budget tiers)."""

    def eligible(self, clients: np.ndarray) -> np.ndarray:
        """The sampleable clients (e.g. only the highest tier); default: all non-empty."""
        return clients

    def begin_round(self, P: torch.Tensor, round_: int) -> None:
        """Round-boundary work on the server vector (pruning schedules, stage switches)."""

    def cohort_sampled(self, round_: int, cohort: list[int]) -> None:
        """The round's cohort, before any instruction (per-round rank allocation)."""

    def options(self, round_: int, client: int) -> dict[str, Any]:
        """What this client is told besides the payloads: plain data only."""
        return {}

    def download_mask(self, P: torch.Tensor, round_: int, client: int) -> torch.Tensor | None:
        return None

    def down_implicit(self, client: int) -> bool:
        return False

    def extra_payloads(self, P: torch.Tensor, round_: int, client: int) -> dict[str, bytes]:
        """Payloads besides "down" (stacking's merged update); every byte is counted."""
        return {}

    def receive(self, round_: int, client: int, stats: dict[str, Any]) -> str | None:
        """A reply's statistics, before its upload is decoded; a returned string drops the
        client with that reason (e.g. a rank it was never given)."""
        return None

    def upload_mask(self, round_: int, client: int) -> torch.Tensor | None:
        """The mask of a values-only upload (the client's `up_implicit`), else None."""
        return None

    def aggregate(self, updates: list[torch.Tensor], clients: list[int], weights: list[int],
                  P: torch.Tensor) -> torch.Tensor | None:
        """A method-specific pseudo-gradient (rank-heterogeneous padding); None = mean."""
        return None

    def step_mask(self, round_: int) -> torch.Tensor | None:
        """Entries the server optimizer may change this round (None = all). Entries outside
        keep their value and their optimizer state, e.g. Federated Select's unselected ones."""
        return None

    def end_round(self, P: torch.Tensor, round_: int) -> None:
        """After the server step (e.g. stacking's merge into W)."""

    def eval_vectors(self, P: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra models to evaluate besides P, by name (e.g. each tier's truncation)."""
        return {}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def state_json(self) -> dict:
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        pass
