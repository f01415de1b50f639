"""Server optimizers on the pseudo-gradient g = mean_i(P_start_i - P'_i) (Reddi et al. 2020).

A step *subtracts*: FedAvg is P <- P - lr * g. The adaptive ones keep first and
second moments m, v over the flat vector:

    m <- b1 m + (1 - b1) g
    FedAdam:    v <- b2 v + (1 - b2) g^2
    FedYogi:    v <- v - (1 - b2) g^2 sign(v - g^2)
    FedAdagrad: v <- v + g^2
    P <- P - lr * m_hat / (sqrt(v_hat) + tau)

with m_hat, v_hat bias-corrected when `bias_correction` is on. The paper's
Algorithm 1 instantiates torch.optim.Adam on P (bias correction, eps = tau), which
is our default; Reddi et al.'s box has no bias correction (set it off). Weight decay
is decoupled (AdamW-style), as in the public reference code.
"""

from __future__ import annotations

import math

import torch

from fedlora.config import OPTIMIZERS, ServerConfig

__all__ = ["OPTIMIZERS", "ServerOptimizer"]


class ServerOptimizer:
    def __init__(self, cfg: ServerConfig, n: int, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.step_count = 0
        adaptive = cfg.optimizer != "fedavg"
        self.m = torch.zeros(n, device=device) if adaptive else None
        self.v = torch.zeros(n, device=device) if adaptive else None

    @torch.no_grad()
    def step(self, P: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Update P in place from pseudo-gradient g; outside `mask`, P and state stay put."""
        if mask is not None:
            saved = [t.clone() for t in (P, self.m, self.v) if t is not None]
            self.step(P, g)
            for new, old in zip([t for t in (P, self.m, self.v) if t is not None], saved):
                torch.where(mask, new, old, out=new)
            return
        c = self.cfg
        self.step_count += 1
        if c.weight_decay:
            P.mul_(1.0 - c.lr * c.weight_decay)
        if c.optimizer == "fedavg":
            P.add_(g, alpha=-c.lr)
            return
        m, v = self.m, self.v
        m.lerp_(g, 1.0 - c.beta1)  # same arithmetic as torch.optim.Adam, for parity tests
        if c.optimizer == "fedadam":
            v.mul_(c.beta2).addcmul_(g, g, value=1.0 - c.beta2)
        elif c.optimizer == "fedyogi":
            g2 = g * g
            v.addcmul_(torch.sign(v - g2), g2, value=-(1.0 - c.beta2))
        else:  # fedadagrad
            v.addcmul_(g, g)
        lr, denom_scale = c.lr, 1.0
        if c.bias_correction:
            lr = c.lr / (1.0 - c.beta1 ** self.step_count)
            if c.optimizer != "fedadagrad":
                denom_scale = math.sqrt(1.0 - c.beta2 ** self.step_count)
        denom = (v.sqrt() / denom_scale).add_(c.tau)
        P.addcdiv_(m, denom, value=-lr)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.m is None else {"server_m": self.m, "server_v": self.v}

    def load_state(self, tensors: dict[str, torch.Tensor], step_count: int) -> None:
        self.step_count = step_count
        if self.m is not None:
            self.m.copy_(tensors["server_m"])
            self.v.copy_(tensors["server_v"])
