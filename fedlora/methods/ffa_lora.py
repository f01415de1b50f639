"""FFA-LoRA (Sun et al. 2024): A frozen at its seeded, shared initialization.

Only B (and the head, when model.train_head) is trained, downloaded and uploaded. Every
client builds the same A from the `init` seed, so A is never sent: the client fills it in
from its own seeded model init. The mask is a fixed function of the layout, so no payload
carries positions. Aggregation is exact: mean(B_i) A = mean(B_i A).
"""

from __future__ import annotations

import re

import torch

from fedlora.methods.base import Client, Server
from fedlora.model.flat import FlatAdapter

LORA_A = re.compile(r"\.lora_(embedding_)?A\.")


def trained_mask(adapter: FlatAdapter) -> torch.Tensor:
    """Every entry but LoRA's A matrices: what FFA-LoRA trains and sends."""
    frozen = adapter.named_slices(lambda name: LORA_A.search(name) is not None)
    if not frozen.any():
        raise ValueError("method.name=ffa_lora: the model has no LoRA A matrices")
    return ~frozen


class FFALoRAClient(Client):
    up_implicit = True

    def prepare(self) -> None:
        self.trained = trained_mask(self.adapter)

    def down_mask(self) -> torch.Tensor:
        return self.trained

    def start(self, received: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        return torch.where(self.trained, received, self.init)  # A from the client's own init

    def train_mask(self) -> torch.Tensor:
        return self.trained

    def upload_mask(self, delta: torch.Tensor) -> torch.Tensor:
        return self.trained


class FFALoRA(Server):
    client = FFALoRAClient

    def __post_init__(self) -> None:
        self.trained = trained_mask(self.adapter)

    def download_mask(self, P: torch.Tensor, round_: int, client: int) -> torch.Tensor:
        return self.trained

    def down_implicit(self, client: int) -> bool:
        return True

    def upload_mask(self, round_: int, client: int) -> torch.Tensor:
        return self.trained

    def step_mask(self, round_: int) -> torch.Tensor:
        return self.trained  # keeps A fixed even under server weight decay
