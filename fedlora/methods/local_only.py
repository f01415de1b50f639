"""local_only: every client trains its own adapter and never communicates.

The floor of personalization. Client: start from its held adapter (the run's initial adapter
the first time), train as usual, keep the result; nothing is downloaded or uploaded (0
bytes both ways), and the server vector never moves. Deploys the client's own adapter.
"""

from __future__ import annotations

import torch

from fedlora.methods.base import Client, Server


class LocalOnlyClient(Client):
    communicates = False

    def start(self, received: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        return self.state.get("personal", self.init).to(self.init.device)

    def done(self, start: torch.Tensor, trained: torch.Tensor, stats: dict) -> None:
        self.kept = trained.detach().clone()

    def save_state(self) -> dict[str, torch.Tensor]:
        return {"personal": self.kept}

    @classmethod
    def deploy(cls, P: torch.Tensor, state: dict[str, torch.Tensor], options: dict,
               ctx) -> torch.Tensor:
        return state.get("personal", ctx.init).to(P.device)


class LocalOnly(Server):
    client = LocalOnlyClient
    communicates = False
