"""FLASC (paper Algorithm 1): train densely, sparsify only what crosses the wire.

Download P * TopKMask(|P|, d_down); the client trains every entry; upload
delta * TopKMask(|delta|, d_up). With d_down = d_up = 1 this is dense LoRA exactly.
"""

from __future__ import annotations

import torch

from fedlora.comm.topk import topk_mask
from fedlora.methods.base import Method


class FLASC(Method):
    def download_mask(self, P: torch.Tensor, round_: int) -> torch.Tensor | None:
        d = self.cfg.method.d_down
        return None if d >= 1.0 else topk_mask(P.abs(), d)

    def upload_mask(self, delta: torch.Tensor, round_: int) -> torch.Tensor | None:
        d = self.cfg.method.d_up
        return None if d >= 1.0 else topk_mask(delta.abs(), d)
