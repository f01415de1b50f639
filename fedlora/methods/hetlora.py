"""HetLoRA (Cho et al. 2023) and the budget-tier baselines of paper Sec. 4.4.

Client c in tier b_c trains a rank r_c = r_base^(b_c - 1) slice of the global rank-r_s
LoRA: the first r_c rows of every A and first r_c columns of every B (the head is always
whole). It downloads and uploads only that slice; the rank is known to both ends, so the
payloads carry values only. peft's scaling alpha / r_s stays fixed, so truncation never
rescales. The server pads the slices back to r_s with `het.aggregation`:

* zero_pad:          P <- sum_k p_k pad0(P'_k)     (component j diluted by clients with r_k <= j)
* replication_pad:   component j averaged over the clients that trained it (Byun & Lee 2024)
* sparsity_weighted: zero_pad with p_k proportional to ||B_k A_k||_F (HetLoRA)

written as pseudo-gradients so any server optimizer applies; with FedAvg at lr 1 they are
exactly the parameter rules above (tests check them against fedlora.server.hetero).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedlora.methods.base import Method
from fedlora.server.hetero import assign_tiers, tier_rank


def rank_mask(adapter, r: int) -> torch.Tensor:
    """Entries of P in the first r LoRA components (plus everything that is not LoRA)."""
    mask = torch.ones(adapter.n, dtype=torch.bool, device=adapter.vector.device)
    for e in adapter.layout:
        if "lora_A" in e.name:  # (r_s, in): component j is row j
            mask[e.slice].view(e.shape)[r:, :] = False
        elif "lora_B" in e.name:  # (out, r_s): component j is column j
            mask[e.slice].view(e.shape)[:, r:] = False
    return mask


def lora_pairs(adapter, vector: torch.Tensor):
    """(A, B) views of every LoRA layer in `vector`, matched by module name."""
    entries = {e.name: e for e in adapter.layout}
    for name, e in entries.items():
        if "lora_A" in name:
            b = entries[name.replace("lora_A", "lora_B")]
            yield vector[e.slice].view(e.shape), vector[b.slice].view(b.shape)


class HetLoRA(Method):
    def setup(self, data) -> None:
        het = self.cfg.het
        self.r_s = tier_rank(het.tiers, het.r_base)
        self.tiers = assign_tiers(len(data.clients), het.tiers, self.cfg.seed)
        self._masks: dict[int, torch.Tensor] = {}

    def rank_of(self, client: int) -> int:
        return tier_rank(int(self.tiers[client]), self.cfg.het.r_base)

    def mask_for_rank(self, r: int) -> torch.Tensor:
        if r not in self._masks:
            self._masks[r] = rank_mask(self.adapter, r)
        return self._masks[r]

    def client_download_mask(self, P, round_, client):
        return self.mask_for_rank(self.rank_of(client))

    client_train_mask = client_download_mask

    def client_upload_mask(self, delta, round_, client):
        return self.mask_for_rank(self.rank_of(client))

    def implicit_positions(self, direction: str, client: int) -> bool:
        return True

    def aggregate(self, updates, clients, weights, P):
        rule = self.cfg.het.aggregation
        masks = [self.mask_for_rank(self.rank_of(c)) for c in clients]
        p = [float(w) for w in weights] if self.cfg.server.weighted else [1.0] * len(clients)
        if rule == "sparsity_weighted":
            scaling = self.cfg.model.alpha / self.r_s
            p = [_product_norm(self.adapter, m * P - u, scaling) for u, m in zip(updates, masks)]
            if sum(p) == 0:
                p = [1.0] * len(updates)
        total = sum(p)
        g = torch.zeros_like(P)
        if rule == "replication_pad":
            cover = torch.zeros_like(P)
            for u, m, w in zip(updates, masks, p):
                g.add_(u, alpha=w)
                cover.add_(m.to(P.dtype), alpha=w)
            return torch.where(cover > 0, g / cover.clamp_min(1e-30), torch.zeros_like(g))
        for u, m, w in zip(updates, masks, p):  # zero padding: untrained share pulls to 0
            g.add_(u, alpha=w / total)
            g.add_(P * (~m), alpha=w / total)
        return g

    def eval_vectors(self, P):
        return {f"tier{b}": P * self.mask_for_rank(tier_rank(b, self.cfg.het.r_base))
                for b in range(1, self.cfg.het.tiers)}  # the top tier's model is P itself


def _product_norm(adapter, vector: torch.Tensor, scaling: float) -> float:
    """||s B A||_F over all layers of a client's trained adapter (sqrt of summed squares)."""
    total = 0.0
    for A, B in lora_pairs(adapter, vector):
        total += float(torch.linalg.matrix_norm(scaling * (B @ A)) ** 2)
    return math.sqrt(total)


class AllLowestTier(HetLoRA):
    """Every client at tier 1 (rank 1): the bytes floor, everyone participates."""

    def rank_of(self, client: int) -> int:
        return 1


class HighestTierOnly(HetLoRA):
    """Only top-tier clients participate, at full rank r_s; lower tiers are dropped."""

    def rank_of(self, client: int) -> int:
        return self.r_s

    def eligible(self, clients: np.ndarray) -> np.ndarray:
        return clients[self.tiers[clients] == self.cfg.het.tiers]


class FLASCTiers(HetLoRA):
    """FLASC under budget tiers: full rank r_s for all, upload density r_c / r_s so each
    client's bytes match its HetLoRA tier (paper Sec. 4.4)."""

    def client_download_mask(self, P, round_, client):
        from fedlora.methods.flasc import FLASC

        return FLASC.download_mask(self, P, round_)

    def client_train_mask(self, P, round_, client):
        return None

    def client_upload_mask(self, delta, round_, client):
        from fedlora.comm.topk import topk_mask

        d = self.rank_of(client) / self.r_s
        return None if d >= 1 else topk_mask(delta.abs(), d)

    def implicit_positions(self, direction: str, client: int) -> bool:
        return False

    def aggregate(self, updates, clients, weights, P):
        return None

    def eval_vectors(self, P):
        return {}
