"""FLASC (paper Algorithm 1): train densely, sparsify only what crosses the wire.

Server: download P * TopKMask(|P|, d_down) (positions travel). Client: train every entry,
upload delta * TopKMask(|delta|, d_up), its density told in the instruction. With
d_down = d_up = 1 this is dense LoRA exactly.
"""

from __future__ import annotations

import torch

from fedlora.comm.topk import topk_mask
from fedlora.methods.base import Client, Server


def flasc_download_mask(P: torch.Tensor, d_down: float) -> torch.Tensor | None:
    return None if d_down >= 1.0 else topk_mask(P.abs(), d_down)


class FLASCClient(Client):
    def upload_mask(self, delta: torch.Tensor) -> torch.Tensor | None:
        d = float(self.options["d_up"])
        return None if d >= 1.0 else topk_mask(delta.abs(), d)


class FLASC(Server):
    client = FLASCClient

    def options(self, round_: int, client: int) -> dict:
        return {"d_up": self.cfg.method.d_up}

    def download_mask(self, P: torch.Tensor, round_: int, client: int) -> torch.Tensor | None:
        return flasc_download_mask(P, self.cfg.method.d_down)
