"""flasc_personal: FLASC whose clients keep what they do not upload as a personal residual.

Client: start from the download plus its residual R (zero the first time), train densely,
upload the top d_up share of the round's change exactly as FLASC; the rest of the change is
added to R, which stays on the client (no bytes). Deployed: P + R. With d_up = 1 nothing is
left over and this is FLASC exactly.
"""

from __future__ import annotations

import torch

from fedlora.comm.topk import topk_mask
from fedlora.methods.base import Client, Server
from fedlora.methods.flasc import FLASCSettings, flasc_download_mask


class FLASCPersonalClient(Client):
    def prepare(self) -> None:
        r = self.state.get("residual")
        self.residual = None if r is None else r.to(self.init.device)

    def start(self, received: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        return received if self.residual is None else received + self.residual

    def upload_mask(self, delta: torch.Tensor) -> torch.Tensor | None:
        d = float(self.options["d_up"])
        if d >= 1.0:
            return None
        mask = topk_mask(delta.abs(), d)
        kept = -delta.masked_fill(mask, 0.0)  # delta = start - trained: the change, negated
        self.residual = kept if self.residual is None else self.residual + kept
        return mask

    def save_state(self) -> dict[str, torch.Tensor] | None:
        return None if self.residual is None else {"residual": self.residual}

    @classmethod
    def deploy(cls, P: torch.Tensor, state: dict[str, torch.Tensor], options: dict,
               ctx) -> torch.Tensor:
        r = state.get("residual")
        return P if r is None else P + r.to(P.device)


class FLASCPersonal(Server):
    client = FLASCPersonalClient
    settings = FLASCSettings

    def options(self, round_: int, client: int) -> dict:
        return {"d_up": self.cfg.method.d_up}

    def download_mask(self, P: torch.Tensor, round_: int, client: int) -> torch.Tensor | None:
        return flasc_download_mask(P, self.cfg.method.d_down)
