"""SparseAdapter (pruning at initialization, paper Algorithm 6 with the modified score).

B starts at zero, so magnitude at initialization would prune all of B and nothing could
train. Round 1 is therefore dense; at the start of round 2 the score S = |P| (the server
vector after round 1's step) gives M = TopKMask(S, method.density), P <- P * M
permanently, and M never changes again.
"""

from __future__ import annotations

import torch

from fedlora.methods.masked import DensitySettings, Masked


class SparseAdapter(Masked):
    settings = DensitySettings

    def begin_round(self, P: torch.Tensor, round_: int) -> None:
        if round_ >= 2 and self.mask is None:
            self.prune_(P, self.cfg.method.density)
