"""Federated Select (client-level freezing, paper Algorithm 6).

Each round M = TopKMask(|P|, method.density) of the current server vector, which is
never pruned: clients download P * M, train and upload only inside M, and the server
step leaves entries outside M (values and optimizer state) as they were.

On LoRA, B starts at zero: whenever k = floor(d * n) is below the number of nonzero
entries, no B entry is selected, A gets no gradient (it is multiplied by B = 0), and
only the head trains. This is the method as specified (and as in the public reference
code). The backbone variant keeps the task's new head out of the mask (methods/backbone.py).
"""

from __future__ import annotations

import torch

from fedlora.methods.masked import DensitySettings, Masked


class FederatedSelect(Masked):
    settings = DensitySettings

    def begin_round(self, P: torch.Tensor, round_: int) -> None:
        self.mask = self.select(P.abs(), self.cfg.method.density)
