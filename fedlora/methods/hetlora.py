"""HetLoRA (Cho et al. 2023) and the budget-tier baselines of paper Sec. 4.4.

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
from dataclasses import dataclass

import numpy as np
import torch

from fedlora.config import HetConfig
from fedlora.methods.base import Client, Server
from fedlora.methods.flasc import FLASC
from fedlora.server.hetero import (
    assign_tiers,
    loss_based_ranks,
    pruned_rank,
    tail_norm,
    tail_penalty,
    tier_rank,
)


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


@dataclass
class Tiers:
    """Budget tiers (paper Sec. 4.4): each client's tier b_c from its own seeded stream, and
    its rank r_base^(b_c - 1); the server rank r_s is the top tier's."""

    het: HetConfig
    seed: int
    num_clients: int

    def __post_init__(self) -> None:
        self.r_s = tier_rank(self.het.tiers, self.het.r_base)
        self.r_min = tier_rank(1, self.het.r_base)  # the lowest tier's rank
        self.tier = assign_tiers(self.num_clients, self.het.tiers, self.seed)

    def rank(self, client: int) -> int:
        return tier_rank(int(self.tier[client]), self.het.r_base)


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
        pairs = _param_pairs(self.adapter)
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


def _param_pairs(adapter) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) model parameters of every LoRA layer: a penalty on them reaches adapter.grad."""
    params = {e.name: p for e, p in zip(adapter.layout, adapter.params)}
    return [(p, params[name.replace("lora_A", "lora_B")])
            for name, p in params.items() if "lora_A" in name]


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


class FLASCTiers(FLASC):
    """FLASC under budget tiers: full rank r_s for all, upload density r_c / r_s so each
    client's bytes match its HetLoRA tier (paper Sec. 4.4). FLASC plus a tier table."""

    def setup(self, num_clients: int) -> None:
        self.budget = Tiers(self.cfg.het, self.cfg.seed, num_clients)
        self.r_s, self.tiers = self.budget.r_s, self.budget.tier

    def rank_of(self, client: int) -> int:
        return self.budget.rank(client)

    def options(self, round_: int, client: int) -> dict:
        return {"d_up": self.rank_of(client) / self.r_s}
