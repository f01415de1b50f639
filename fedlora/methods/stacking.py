"""FLoRA stacking (Wang et al. 2024) for rank-heterogeneous clients.

Client ranks come from the budget tiers, as in HetLoRA: a rank-r_c client trains the first
r_c components of a fresh rank-r_s LoRA (B = 0, A from a seeded stream both ends know) and
uploads that slice. After the round the server merges the exact weighted sum of the products,
`ΔW = Σ_k p_k s B_k A_k` (`s = alpha / r_s`), into the adapted weights W and re-initializes
LoRA: A from the `lora_reinit` stream of the next round, B = 0. No cross terms, any ranks.

W lives in the flat vector (`trains_target_weights`), never trained by clients, so the merged
model is checkpointed with P and a resumed run is exact. The head is averaged normally: the
pseudo-gradient is the plain mean and `step_mask` lets the server optimizer touch the head
only. The LoRA part thus bypasses the server optimizer: it is FedAvg at server lr 1 whatever
`server.optimizer` says (docs/heterogeneity.md).

Client-held state (documented exception to stateless clients): a client keeps the merged
W it last computed. Each round it downloads the head (values only) and, unless round 1, one
of two payloads, both encoded with the codec and counted:

* `merge`: the previous round's update (per layer the dense ΔW or the stacked factors,
  whichever is smaller, `hetero.stacking_download_numel`), for a client that took part in
  the previous round; it applies it to its held W exactly as the server did (`apply_merge`).
* `catchup`: the server's merged W itself (dense), for any other client. (With float32
  values this is lossless, so every client's W equals the server's bit for bit.)

A reply carries the client's rank, as HetLoRA's does.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedlora.comm import codec
from fedlora.config import check
from fedlora.methods.base import Client, Server
from fedlora.methods.tiers import Tiers, TierSettings
from fedlora.model.layers import Layer, adapted_layers, entry_mask, rank_mask, view
from fedlora.rng import torch_generator
from fedlora.server.aggregate import weighted_mean
from fedlora.server.hetero import (
    merge_delta,
    normalize_weights,
    stacking,
    stacking_download_numel,
)


def is_stacked(ly: Layer, ranks: list[int]) -> bool:
    """Send this layer's stacked factors (smaller than the dense ΔW) rather than ΔW."""
    out_f, in_f = ly.W.shape
    return stacking_download_numel(out_f, in_f, ranks) < out_f * in_f


@torch.no_grad()
def apply_merge(P: torch.Tensor, layers: list[Layer], ranks: list[int],
                flat: torch.Tensor) -> None:
    """W += ΔW per layer, from a decoded `merge` payload: dense or B_stack @ A_stack."""
    R, offset = sum(ranks), 0
    for ly in layers:
        out_f, in_f = ly.W.shape
        if is_stacked(ly, ranks):
            B = flat[offset: offset + out_f * R].view(out_f, R)
            A = flat[offset + out_f * R: offset + R * (out_f + in_f)].view(R, in_f)
            delta, offset = B.to(P.device) @ A.to(P.device), offset + R * (out_f + in_f)
        else:
            delta = flat[offset: offset + out_f * in_f].view(out_f, in_f).to(P.device)
            offset += out_f * in_f
        view(P, ly.W).add_(delta)


@torch.no_grad()
def reinit_lora_(P: torch.Tensor, layers: list[Layer], seed: int, round_: int) -> None:
    """LoRA as round `round_` starts it: A from the `lora_reinit` stream (peft's default
    init, U(-1/sqrt(in), 1/sqrt(in))), B = 0."""
    g = torch_generator(seed, "lora_reinit", round_, device=P.device)
    for ly in layers:
        bound = 1.0 / math.sqrt(ly.A.shape[1])
        A = torch.rand(ly.A.shape, generator=g, device=P.device) * (2 * bound) - bound
        view(P, ly.A).copy_(A)
        view(P, ly.B).zero_()


class StackingClient(Client):
    up_implicit = True

    def prepare(self) -> None:
        self.layers = adapted_layers(self.adapter)
        self.w_mask = entry_mask(self.adapter, [ly.W for ly in self.layers])
        lora = entry_mask(self.adapter, [e for ly in self.layers for e in (ly.A, ly.B)])
        self.head = ~(self.w_mask | lora)
        self.rank = int(self.options["rank"])

    def down_mask(self) -> torch.Tensor:
        return self.head

    def start(self, received: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        t, payloads = self.task.round, self.task.payloads
        v = torch.where(self.head, received, self.init)  # W0 and round 1's LoRA init
        n_w = int(self.w_mask.sum())
        if "catchup" in payloads:
            v[self.w_mask] = codec.decode(payloads["catchup"], n_w).to(v.device)
        elif "W" in self.state:
            v[self.w_mask] = self.state["W"].to(v.device)
            if "merge" in payloads:
                ranks = [int(r) for r in self.options["merge_ranks"]]
                numel = sum(self._numel(ly, ranks) for ly in self.layers)
                apply_merge(v, self.layers, ranks, codec.decode(payloads["merge"], numel))
        elif t > 1:
            raise ValueError(f"client {self.task.client}: round {t} needs the merged W, and "
                             "this client holds none and was sent no catch-up")
        if t > 1:
            reinit_lora_(v, self.layers, self.task.seed, t)
        self.W = v[self.w_mask].clone()
        return v

    @staticmethod
    def _numel(ly: Layer, ranks: list[int]) -> int:
        out_f, in_f = ly.W.shape
        return sum(ranks) * (out_f + in_f) if is_stacked(ly, ranks) else out_f * in_f

    def train_mask(self) -> torch.Tensor:
        return rank_mask(self.adapter, self.rank) & ~self.w_mask

    def done(self, start, trained, stats) -> None:
        stats["rank"] = self.rank

    def upload_mask(self, delta: torch.Tensor) -> torch.Tensor:
        return self.train_mask()

    def save_state(self) -> dict[str, torch.Tensor]:
        return {"W": self.W}


class StackingSettings(TierSettings):
    def validate(self, cfg, method: str) -> None:
        super().validate(cfg, method)
        check(not cfg.dp.enabled, "dp.enabled",
              "flora_stacking merges the clients' factors itself; DP is not supported with it")


class FLoRAStacking(Server):
    client = StackingClient
    settings = StackingSettings
    trains_target_weights = True

    def setup(self, num_clients: int) -> None:
        self.budget = Tiers(self.cfg.het, self.cfg.seed, num_clients)
        self.r_s, self.tiers = self.budget.r_s, self.budget.tier
        self.layers = adapted_layers(self.adapter)
        self.w_mask = entry_mask(self.adapter, [ly.W for ly in self.layers])
        lora = entry_mask(self.adapter, [e for ly in self.layers for e in (ly.A, ly.B)])
        self.head_mask = ~(self.w_mask | lora)
        self._masks: dict[int, torch.Tensor] = {}
        self.w0: torch.Tensor | None = None  # pretrained W entries of P
        self.last_download = np.zeros(num_clients, dtype=np.int64)  # 0 = never
        self.merge_payload = b""  # the previous round's merged update, encoded
        self.merge_ranks: list[int] = []
        self.known: torch.Tensor | None = None  # P as this round's clients start from it
        self._catchup: tuple | None = None
        self.pending: list[torch.Tensor] | None = None  # this round's per-layer payloads
        self.pending_ranks: list[int] = []

    def rank_of(self, client: int) -> int:
        return self.budget.rank(client)

    def mask_for_rank(self, r: int) -> torch.Tensor:
        if r not in self._masks:
            self._masks[r] = rank_mask(self.adapter, r) & ~self.w_mask
        return self._masks[r]

    def begin_round(self, P: torch.Tensor, round_: int) -> None:
        if self.w0 is None:
            self.w0 = P[self.w_mask].detach().clone()
        self.known = P.detach().clone()  # W (merged), A (seeded), B = 0: what clients build
        self.pending = None

    def options(self, round_: int, client: int) -> dict:
        return {"rank": self.rank_of(client), "merge_ranks": list(self.merge_ranks)}

    def download_mask(self, P, round_, client):
        return self.head_mask

    def down_implicit(self, client: int) -> bool:
        return True

    def extra_payloads(self, P: torch.Tensor, round_: int, client: int) -> dict[str, bytes]:
        """The previous round's update if the client took part in it, else the merged W."""
        last, self.last_download[client] = int(self.last_download[client]), round_
        if round_ == 1:
            return {}
        if last == round_ - 1:
            return {"merge": self.merge_payload} if self.merge_payload else {}
        key = (round_, id(P))
        if self._catchup is None or self._catchup[0] != key:  # P is fixed within a round
            values = self.cfg.comm.down_values or self.cfg.comm.values
            self._catchup = (key, codec.encode(P[self.w_mask].detach(), None, values=values))
        return {"catchup": self._catchup[1]}

    def receive(self, round_: int, client: int, stats: dict) -> str | None:
        r = self.rank_of(client)
        if int(stats.get("rank", r)) != r:
            return f"reported rank {stats['rank']}, was told {r}"
        return None

    def upload_mask(self, round_, client):
        return self.mask_for_rank(self.rank_of(client))

    def step_mask(self, round_: int) -> torch.Tensor:
        return self.head_mask

    def aggregate(self, updates, clients, weights, P):
        """Merge Σ p_k s B_k A_k per layer (applied in end_round); the head gets the mean."""
        sizes = weights if self.cfg.server.weighted else [1.0] * len(clients)
        p = normalize_weights(sizes)
        ranks = [self.rank_of(c) for c in clients]
        s = self.cfg.model.alpha / self.r_s
        trained = [self.known - u for u in updates]  # each client's factors after training
        self.pending, self.pending_ranks = [], ranks
        for ly in self.layers:
            As = [view(t, ly.A)[:r] for t, r in zip(trained, ranks)]
            Bs = [view(t, ly.B)[:, :r] for t, r in zip(trained, ranks)]
            if is_stacked(ly, ranks):  # the client forms B_stack @ A_stack itself
                A_stack, B_stack = stacking(As, Bs, p)
                self.pending.append(torch.cat([B_stack.reshape(-1), (s * A_stack).reshape(-1)]))
            else:
                self.pending.append(merge_delta(As, Bs, p, s).reshape(-1))
        return weighted_mean(updates, weights if self.cfg.server.weighted else None)

    @torch.no_grad()
    def end_round(self, P: torch.Tensor, round_: int) -> None:
        if self.pending is not None:
            values = self.cfg.comm.down_values or self.cfg.comm.values
            self.merge_payload = codec.encode(torch.cat(self.pending), None, values=values)
            self.merge_ranks = list(self.pending_ranks)
            apply_merge(P, self.layers, self.merge_ranks,
                        codec.decode(self.merge_payload, sum(v.numel() for v in self.pending)))
        else:  # nobody reported: nothing to merge, in-sync clients need nothing new
            self.merge_payload, self.merge_ranks = b"", []
        self.pending = None
        reinit_lora_(P, self.layers, self.cfg.seed, round_ + 1)

    def eval_vectors(self, P):
        return {}  # LoRA is re-initialized (B = 0) after every round: P is the merged model

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.w0 is None:
            return {}
        return {"w0": self.w0, "last_download": torch.from_numpy(self.last_download),
                "merge_payload": torch.frombuffer(bytearray(self.merge_payload) or
                                                  bytearray(1), dtype=torch.uint8)}

    def state_json(self) -> dict:
        return {"merge_ranks": self.merge_ranks, "merge_bytes": len(self.merge_payload)}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.w0 = tensors.get("w0")
        if "last_download" in tensors:
            self.last_download = tensors["last_download"].cpu().numpy().astype(np.int64)
        size = int(meta.get("merge_bytes", 0))
        payload = tensors.get("merge_payload")
        self.merge_payload = b"" if payload is None else bytes(payload.cpu().numpy()[:size])
        self.merge_ranks = [int(r) for r in meta.get("merge_ranks", [])]
