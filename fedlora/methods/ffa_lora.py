"""FFA-LoRA (Sun et al. 2024): A frozen at its seeded, shared initialization.

Only B (and the head, when model.train_head) is trained, downloaded and uploaded.
Every client builds the same A from the `init` seed, so A is never sent: a client
fills it in from its own copy (`client_start`). The mask is a fixed function of the
layout, so no payload carries positions. Aggregation is exact: mean(B_i) A = mean(B_i A).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from fedlora.methods.base import Method

LORA_A = re.compile(r"\.lora_(embedding_)?A\.")


@dataclass
class FFALoRA(Method):
    trained: torch.Tensor = field(init=False, repr=False)
    init: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        frozen = self.adapter.named_slices(lambda name: LORA_A.search(name) is not None)
        if not frozen.any():
            raise ValueError("method.name=ffa_lora: the model has no LoRA A matrices")
        self.trained = ~frozen

    def begin_round(self, P: torch.Tensor, round_: int) -> None:
        # The server's A is the seeded initialization and never changes (step_mask), so it
        # equals every client's own copy; taken from P, not from the resident model, which
        # may hold another run's weights when a task is reused.
        if self.init is None:
            self.init = P.detach().clone()

    def download_mask(self, P: torch.Tensor, round_: int) -> torch.Tensor:
        return self.trained

    def client_start(self, downloaded: torch.Tensor, round_: int) -> torch.Tensor:
        return torch.where(self.trained, downloaded, self.init)

    def train_mask(self, P: torch.Tensor, round_: int) -> torch.Tensor:
        return self.trained

    def upload_mask(self, delta: torch.Tensor, round_: int) -> torch.Tensor:
        return self.trained

    def step_mask(self, round_: int) -> torch.Tensor:
        return self.trained  # keeps A fixed even under server weight decay

    def implicit_positions(self, direction: str, client: int) -> bool:
        return True
