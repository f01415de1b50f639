"""fdlora: dual LoRA per client (FDLoRA, Qi et al. 2024; our reading: docs/personalization.md).

Client: the global module starts from the download and is trained and sent like FLASC
(top-k upload at `method.d_up`; 1 = dense LoRA); the personal module, held by the client
(the run's initial adapter the first time), is trained on the same local budget and kept.
It never leaves the client: the bytes are the global module's only. Deployed: AdaFusion,
w_p * personal + w_g * global with the weights searched on the client's own examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedlora.client.personal import fuse, fusion_weights
from fedlora.comm.topk import topk_mask
from fedlora.config import check
from fedlora.methods.base import Client, Server
from fedlora.methods.flasc import FLASCSettings, flasc_download_mask


@dataclass
class FDLoRASettings(FLASCSettings):
    """FLASC's densities for the global module (dense by default) and the fusion search."""

    d_up: float = 1.0
    fusion_examples: int = 32  # training examples a client fits its fusion weights on
    fusion_l1: float = 0.05  # L1 penalty on the fusion weights (LoraHub's default)

    def validate(self, cfg, method: str) -> None:
        super().validate(cfg, method)
        check(self.fusion_examples >= 1, "method.fusion_examples",
              f"must be >= 1, got {self.fusion_examples}")
        check(self.fusion_l1 >= 0 and math.isfinite(self.fusion_l1), "method.fusion_l1",
              f"must be a finite number >= 0, got {self.fusion_l1}")


class FDLoRAClient(Client):
    def done(self, start: torch.Tensor, trained: torch.Tensor, stats: dict) -> None:
        glob = trained.detach().clone()
        personal = self.state.get("personal", self.init).to(self.init.device)
        self.personal, pstats = self.local.train(personal, kind=2)
        stats["personal_loss"] = pstats["train_loss"]
        self.adapter.load_(glob)  # the runner's delta is the global module's

    def upload_mask(self, delta: torch.Tensor) -> torch.Tensor | None:
        d = float(self.options["d_up"])
        return None if d >= 1.0 else topk_mask(delta.abs(), d)

    def save_state(self) -> dict[str, torch.Tensor]:
        return {"personal": self.personal}

    @classmethod
    def deploy(cls, P: torch.Tensor, state: dict[str, torch.Tensor], options: dict,
               ctx) -> torch.Tensor:
        personal = state.get("personal", ctx.init).to(P.device)
        idx = ctx.fusion_examples(int(options["fusion_examples"]))
        w, _ = fusion_weights(lambda v: ctx.loss(v, idx), personal, P,
                              float(options["fusion_l1"]))
        return fuse(personal, P, w)


class FDLoRA(Server):
    client = FDLoRAClient
    settings = FDLoRASettings

    def options(self, round_: int, client: int) -> dict:
        m = self.cfg.method
        return {"d_up": m.d_up, "fusion_examples": m.fusion_examples, "fusion_l1": m.fusion_l1}

    def download_mask(self, P: torch.Tensor, round_: int, client: int) -> torch.Tensor | None:
        return flasc_download_mask(P, self.cfg.method.d_down)
