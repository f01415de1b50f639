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

Downloads: the head (values only) plus the merged update, which the server encodes once per
round with the codec (per layer the dense ΔW or the stacked factors, whichever is smaller) and
applies to W as decoded, so server and clients hold the same W. A client that did not take
part in the previous round cannot apply one round's update; it downloads the dense catch-up
`W - W0` instead. `extra_download_bytes` reports `len(bytes)` of the payload each client needs.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedlora.comm import codec
from fedlora.methods.flora import adapted_layers, entry_mask, view
from fedlora.methods.hetlora import HetLoRA
from fedlora.rng import torch_generator
from fedlora.server.aggregate import weighted_mean
from fedlora.server.hetero import (
    merge_delta,
    normalize_weights,
    stacking,
    stacking_download_numel,
)


class FLoRAStacking(HetLoRA):
    trains_target_weights = True

    def setup(self, data) -> None:
        super().setup(data)
        self.layers = adapted_layers(self.adapter)
        self.w_mask = entry_mask(self.adapter, [ly.W for ly in self.layers])
        lora = entry_mask(self.adapter, [e for ly in self.layers for e in (ly.A, ly.B)])
        self.head_mask = ~(self.w_mask | lora)
        self.w0: torch.Tensor | None = None  # pretrained W entries of P
        self.last_download = np.zeros(len(data.clients), dtype=np.int64)  # 0 = never
        self.round_bytes = 0  # the previous round's merged update, encoded
        self.catchup_bytes = 0  # the dense W - W0, encoded
        self.known: torch.Tensor | None = None
        self.pending: list[torch.Tensor] | None = None  # this round's per-layer payloads
        self.pending_ranks: list[int] = []

    def mask_for_rank(self, r: int) -> torch.Tensor:
        if r not in self._masks:
            self._masks[r] = super().mask_for_rank(r) & ~self.w_mask
        return self._masks[r]

    def begin_round(self, P: torch.Tensor, round_: int) -> None:
        if self.w0 is None:
            self.w0 = P[self.w_mask].detach().clone()
        self.known = P.detach().clone()  # W (in sync), A (seeded), B = 0: the client has them
        self.pending = None

    def client_download_mask(self, P, round_, client):
        return self.head_mask

    def client_start(self, downloaded: torch.Tensor, round_: int) -> torch.Tensor:
        return torch.where(self.head_mask, downloaded, self.known)

    def step_mask(self, round_: int) -> torch.Tensor:
        return self.head_mask

    def extra_download_bytes(self, round_: int, client: int) -> int:
        """The previous round's update if the client applied every earlier one, else W - W0."""
        last, self.last_download[client] = int(self.last_download[client]), round_
        if round_ == 1:
            return 0
        return self.round_bytes if last == round_ - 1 else self.catchup_bytes

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
            if self._stacked(ly):  # the client forms B_stack @ A_stack itself
                A_stack, B_stack = stacking(As, Bs, p)
                self.pending.append(torch.cat([B_stack.reshape(-1), (s * A_stack).reshape(-1)]))
            else:
                self.pending.append(merge_delta(As, Bs, p, s).reshape(-1))
        return weighted_mean(updates, weights if self.cfg.server.weighted else None)

    @torch.no_grad()
    def end_round(self, P: torch.Tensor, round_: int) -> None:
        if self.pending is not None:
            values = self.cfg.comm.down_values or self.cfg.comm.values
            payload = codec.encode(torch.cat(self.pending), None, values=values)
            self.round_bytes = len(payload)
            self._apply(P, codec.decode(payload, sum(v.numel() for v in self.pending)))
            catchup = (P[self.w_mask] - self.w0).detach()
            self.catchup_bytes = len(codec.encode(catchup, None, values=values))
        else:  # nobody reported: nothing to merge, in-sync clients need nothing new
            self.round_bytes = 0
        self.pending = None
        g = torch_generator(self.cfg.seed, "lora_reinit", round_ + 1, device=P.device)
        for ly in self.layers:  # peft's default A init: U(-1/sqrt(in), 1/sqrt(in))
            bound = 1.0 / math.sqrt(ly.A.shape[1])
            A = torch.rand(ly.A.shape, generator=g, device=P.device) * (2 * bound) - bound
            view(P, ly.A).copy_(A)
            view(P, ly.B).zero_()

    def _stacked(self, ly) -> bool:
        """Send this layer's stacked factors (smaller than the dense ΔW) rather than ΔW."""
        out_f, in_f = ly.W.shape
        return stacking_download_numel(out_f, in_f, self.pending_ranks) < out_f * in_f

    def _apply(self, P: torch.Tensor, flat: torch.Tensor) -> None:
        """W += ΔW, from the decoded payload: dense per layer or B_stack @ A_stack."""
        R, offset = sum(self.pending_ranks), 0
        for ly in self.layers:
            out_f, in_f = ly.W.shape
            if self._stacked(ly):
                B = flat[offset: offset + out_f * R].view(out_f, R)
                A = flat[offset + out_f * R: offset + R * (out_f + in_f)].view(R, in_f)
                delta, offset = B.to(P.device) @ A.to(P.device), offset + R * (out_f + in_f)
            else:
                delta = flat[offset: offset + out_f * in_f].view(out_f, in_f).to(P.device)
                offset += out_f * in_f
            view(P, ly.W).add_(delta)

    def eval_vectors(self, P):
        return {}  # LoRA is re-initialized (B = 0) after every round: P is the merged model

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.w0 is None:
            return {}
        return {"w0": self.w0, "last_download": torch.from_numpy(self.last_download)}

    def state_json(self) -> dict:
        return {"round_bytes": self.round_bytes, "catchup_bytes": self.catchup_bytes}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.w0 = tensors.get("w0")
        if "last_download" in tensors:
            self.last_download = tensors["last_download"].cpu().numpy().astype(np.int64)
        self.round_bytes = int(meta.get("round_bytes", 0))
        self.catchup_bytes = int(meta.get("catchup_bytes", 0))
