"""HetLoRA (Cho et al. 2023) and the tier baselines of paper Sec. 4.4 (FLASC's: flasc.py).

Client c in tier b_c (its rank told in the instruction) trains a rank r_c = r_base^(b_c - 1)
slice of the global rank-r_s LoRA: the first r_c rows of every A and first r_c columns of
every B (the head is always whole). It downloads and uploads only that slice; the rank is
known to both ends, so the payloads carry values only. peft's scaling alpha / r_s stays
fixed, so truncation never rescales. The server pads the slices back to r_s with `het.aggregation`:

* zero_pad:          P <- sum_k p_k pad0(P'_k)     (component j diluted by clients with r_k <= j)
* replication_pad:   component j averaged over the clients that trained it (Byun & Lee 2024)
* sparsity_weighted: zero_pad with p_k proportional to ||B_k A_k||_F (HetLoRA)

written as pseudo-gradients so any server optimizer applies; with FedAvg at lr 1 they are
exactly the parameter rules above (tests check them against fedlora.server.hetero).

Two optional extras (hetlora only, off by default; docs/heterogeneity.md):

* het.self_prune (HetLoRA, Cho et al. 2023): the local loss gets
  lambda * sum_layers ||B[:, r':r_c]|| ||A[r':r_c]||, r' = max(r_min, floor(gamma r_c)); if
  that tail norm ends the round below its value at the start, the client uploads only r'
  components and reports r' in its reply; the server keeps rank r' for it in later rounds
  (server state: the rank it tells the client), and refuses any other reported rank.
* het.rank_allocation = loss (Byun & Lee 2024): each round the cohort's tier ranks are handed
  out again, the highest to the client with the lowest last-reported local loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from fedlora.methods.base import Client, Server
from fedlora.methods.tiers import Tiers, TierSettings
from fedlora.model.layers import lora_pairs, param_pairs, rank_mask
from fedlora.server.hetero import (
    loss_based_ranks,
    padded_pseudo_gradient,
    product_norms,
    pruned_rank,
    tail_norm,
    tail_penalty,
    tier_rank,
)

# ---------------------------------------------------------------- client half


class HetLoRAClient(Client):
    """Trains the first `rank` components; the download and upload carry values only."""

    up_implicit = True

    def prepare(self) -> None:
        self.rank = int(self.options["rank"])
        self.mask = rank_mask(self.adapter, self.rank)

    def down_mask(self) -> torch.Tensor:
        return self.mask

    def train_mask(self) -> torch.Tensor:
        return self.mask

    def penalty(self) -> Callable[[], torch.Tensor] | None:
        """self_prune: lambda * sum over layers of the tail norm of the client's rank."""
        o = self.options
        lam, gamma, r_min, r = (float(o.get("prune_lambda", 0)), float(o.get("prune_gamma", 1)),
                                int(o.get("r_min", 1)), self.rank)
        if not o.get("self_prune") or lam == 0 or pruned_rank(r, gamma, r_min) == r:
            return None
        pairs = param_pairs(self.adapter)
        return lambda: sum(tail_penalty(A, B, r, lam, gamma, r_min) for A, B in pairs)

    def done(self, start, trained, stats) -> None:
        """Self-prune: keep r' components if the tail norm shrank during the round."""
        o = self.options
        if o.get("self_prune"):
            gamma, r_min, r = float(o["prune_gamma"]), int(o["r_min"]), self.rank
            r_new = pruned_rank(r, gamma, r_min)
            if r_new < r and (model_tail_norm(self.adapter, trained, r, gamma, r_min)
                              < model_tail_norm(self.adapter, start, r, gamma, r_min)):
                self.rank = r_new
        stats["rank"] = self.rank

    def upload_mask(self, delta: torch.Tensor) -> torch.Tensor:
        return rank_mask(self.adapter, self.rank)


@torch.no_grad()
def model_tail_norm(adapter, vector: torch.Tensor, r: int, gamma: float, r_min: int) -> float:
    """sum over layers of ||B[:, r':r]|| ||A[r':r]|| in `vector` (the self-prune test)."""
    return sum(float(tail_norm(A, B, r, gamma, r_min)) for A, B in lora_pairs(adapter, vector))


# ---------------------------------------------------------------- server half


class HetLoRA(Server):
    client = HetLoRAClient
    settings = TierSettings

    def setup(self, num_clients: int) -> None:
        het = self.cfg.het
        self.budget = Tiers(het, self.cfg.seed, num_clients)
        self.r_s, self.r_min, self.tiers = self.budget.r_s, self.budget.r_min, self.budget.tier
        self._masks: dict[int, torch.Tensor] = {}
        # Each client's own rank: its tier's, lowered for good by self-pruning (checkpointed).
        self.ranks = np.array([tier_rank(int(b), het.r_base) for b in self.tiers], dtype=np.int64)
        # rank_allocation = loss: this round's assignment, and each client's last reported
        # loss (+inf = never reported; checkpointed).
        self.round_ranks: dict[int, int] = {}
        self.last_loss = np.full(num_clients, np.inf)

    def rank_of(self, client: int) -> int:
        """The client's rank now: what it is told to download and train; after it reported a
        self-prune, the pruned rank it uploads this round and trains from then on."""
        r = self.round_ranks.get(client)
        return int(self.ranks[client]) if r is None else r

    def cohort_sampled(self, round_: int, cohort: list[int]) -> None:
        """rank_allocation = loss: hand the cohort's tier ranks out again by reported loss.

        Clients that never reported a loss rank after those that did, in tier order, so the
        first round is exactly the tier assignment (docs/heterogeneity.md)."""
        if self.cfg.het.rank_allocation != "loss":
            return
        tier_ranks = self.ranks[cohort]
        ranks = loss_based_ranks(self.last_loss[cohort], tier_ranks, tiebreak=tier_ranks)
        self.round_ranks = dict(zip(cohort, (int(r) for r in ranks)))

    def options(self, round_: int, client: int) -> dict:
        het = self.cfg.het
        out: dict = {"rank": self.rank_of(client)}
        if het.self_prune:
            out.update(self_prune=True, prune_lambda=het.prune_lambda,
                       prune_gamma=het.prune_gamma, r_min=self.r_min)
        return out

    def mask_for_rank(self, r: int) -> torch.Tensor:
        if r not in self._masks:
            self._masks[r] = rank_mask(self.adapter, r)
        return self._masks[r]

    def download_mask(self, P, round_, client):
        return self.mask_for_rank(self.rank_of(client))

    def down_implicit(self, client: int) -> bool:
        return True

    def receive(self, round_: int, client: int, stats: dict) -> str | None:
        """Record the reported loss (rank_allocation = loss) and a self-pruned rank."""
        het = self.cfg.het
        if het.rank_allocation == "loss" and math.isfinite(stats.get("first_loss", math.nan)):
            self.last_loss[client] = stats["first_loss"]
        r = self.rank_of(client)
        reported = int(stats.get("rank", r))
        allowed = {r, pruned_rank(r, het.prune_gamma, self.r_min)} if het.self_prune else {r}
        if reported not in allowed:
            return f"reported rank {reported}, was told {r}"
        if reported < r:
            self.ranks[client] = reported  # the upload and all later rounds use it
        return None

    def upload_mask(self, round_, client):
        return self.mask_for_rank(self.rank_of(client))

    def aggregate(self, updates, clients, weights, P):
        """`het.aggregation` on the rank-masked updates (fedlora.server.hetero)."""
        rule = self.cfg.het.aggregation
        masks = [self.mask_for_rank(self.rank_of(c)) for c in clients]
        p = [float(w) for w in weights] if self.cfg.server.weighted else [1.0] * len(clients)
        if rule == "sparsity_weighted":  # p_k = ||s B_k A_k||_F over all layers, zero padding
            scaling = self.cfg.model.alpha / self.r_s
            squares = [0.0] * len(updates)
            trained = [list(lora_pairs(self.adapter, m * P - u)) for u, m in zip(updates, masks)]
            for layer in range(len(trained[0])):
                norms = product_norms([t[layer][0] for t in trained],
                                      [t[layer][1] for t in trained], scaling)
                squares = [sq + float(n ** 2) for sq, n in zip(squares, norms)]
            p = [math.sqrt(sq) for sq in squares]
            if sum(p) == 0:
                p = [1.0] * len(updates)
            rule = "zero_pad"
        return padded_pseudo_gradient(rule, updates, masks, p, P)

    def eval_vectors(self, P):
        return {f"tier{b}": P * self.mask_for_rank(tier_rank(b, self.cfg.het.r_base))
                for b in range(1, self.cfg.het.tiers)}  # the top tier's model is P itself

    def state_json(self) -> dict:
        out: dict = {}  # nothing with the extras off: checkpoints stay as they were
        if self.cfg.het.self_prune:
            out["ranks"] = [int(r) for r in self.ranks]
        if self.cfg.het.rank_allocation == "loss":
            out["last_loss"] = [float(x) if math.isfinite(x) else None for x in self.last_loss]
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if "ranks" in meta:
            self.ranks = np.asarray(meta["ranks"], dtype=np.int64)
        if "last_loss" in meta:
            self.last_loss = np.array([np.inf if x is None else x for x in meta["last_loss"]],
                                      dtype=np.float64)


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
