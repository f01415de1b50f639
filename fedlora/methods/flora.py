"""FLoRA / SLoRA two-stage (Babakniya et al. 2023): full-rank Stage 1, SVD-initialized LoRA.

The flat vector holds the adapted weights too (`trains_target_weights`):
P = [W, LoRA A/B, head] of every adapted layer, so both stages fit one fixed-length vector.

* Stage 1 (rounds <= `method.stage1_rounds`): clients train and exchange only W (FLoRA,
  `stage1_density = 1`) or a fixed random subset of its entries (SLoRA, drawn once from the
  `slora_mask` stream), plus the head. LoRA's B stays 0, so LoRA contributes nothing.
* The switch (begin_round of round S1 + 1): per layer `ΔW = W - W0`,
  `A, B = svd_init(ΔW, r, alpha)` into P, W reset to the pretrained W0 (method state).
* Stage 2: clients train and exchange only LoRA (and the head); W stays W0.

Both ends know each stage's mask (the instruction says the stage and the SLoRA density; the
mask follows from the layout and the seed, `stage_masks`), so payloads carry values only.
Entries outside the stage's mask are at their initial values (LoRA in Stage 1, W0 in Stage
2), and the client fills them from its own seeded model init.
Stage 1 payloads are full-rank values through the codec: its bytes are counted as they are.

Server optimizer state: `step_mask` is the stage's mask, so inactive entries keep their value
and their moments. LoRA entries therefore enter Stage 2 with zero Adam moments while the
engine's step count (bias correction) is global; docs/heterogeneity.md quantifies the effect.

`method.stage1_lr` (paper: SLoRA Stage 1 LR 1e-3 against a server lr of 1e-2) gives W its
own server optimizer in Stage 1: same kind and settings as `server`, that learning rate, its
own moments and step count (method state). The engine's optimizer then steps only the head
in Stage 1; the method steps W in `end_round` from the same mean pseudo-gradient.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import torch

from fedlora.config import check, check_density
from fedlora.methods.base import Client, Server, Settings
from fedlora.model.flat import FlatAdapter
from fedlora.model.layers import Layer, adapted_layers, entry_mask, view
from fedlora.rng import torch_generator
from fedlora.server.aggregate import weighted_mean
from fedlora.server.optim import ServerOptimizer
from fedlora.server.svd_init import slora_mask, svd_init

log = logging.getLogger("fedlora")

@dataclass(frozen=True)
class StageMasks:
    w: torch.Tensor  # the adapted weights W
    stage1: torch.Tensor  # W (or SLoRA's fixed subset of it) + the head
    stage2: torch.Tensor  # LoRA + the head


def stage_masks(adapter: FlatAdapter, layers: list[Layer], seed: int,
                stage1_density: float) -> StageMasks:
    """Each stage's mask: a function of the layout, the seed and the SLoRA density, so the
    server and every client compute the same one."""
    w_mask = entry_mask(adapter, [ly.W for ly in layers])
    lora = entry_mask(adapter, [e for ly in layers for e in (ly.A, ly.B)])
    head = ~(w_mask | lora)
    stage1 = w_mask | head
    if stage1_density < 1.0:  # SLoRA: a fixed subset of each W
        g = torch_generator(seed, "slora_mask")
        stage1 = head.clone()
        for ly in layers:
            view(stage1, ly.W).copy_(slora_mask(ly.W.shape, stage1_density, g).to(stage1.device))
    return StageMasks(w_mask, stage1, ~w_mask)


class FLoRAClient(Client):
    up_implicit = True

    def prepare(self) -> None:
        masks = stage_masks(self.adapter, adapted_layers(self.adapter), self.task.seed,
                            float(self.options["stage1_density"]))
        self.mask = masks.stage1 if self.options["stage"] == 1 else masks.stage2

    def down_mask(self) -> torch.Tensor:
        return self.mask

    def start(self, received: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        return torch.where(self.mask, received, self.init)

    def train_mask(self) -> torch.Tensor:
        return self.mask

    def upload_mask(self, delta: torch.Tensor) -> torch.Tensor:
        return self.mask


@dataclass
class TwoStageSettings(Settings):
    stage1_rounds: int = 10  # full-rank Stage 1 rounds (paper: 50 of 200)
    stage1_density: float = 1.0  # Stage 1: 1 = FLoRA, < 1 = SLoRA's fixed random subset of W
    stage1_lr: float | None = None  # server lr on W in Stage 1 (None: server.lr)

    def validate(self, cfg, method: str) -> None:
        super().validate(cfg, method)
        check(self.stage1_rounds >= 1, "method.stage1_rounds", "must be >= 1")
        check_density(self.stage1_density, "method.stage1_density")
        check(self.stage1_lr is None or self.stage1_lr > 0, "method.stage1_lr",
              "must be > 0 or null")
        check(not (cfg.dp.enabled and self.stage1_lr is not None), "method.stage1_lr",
              "steps W outside the DP aggregate; leave it null with dp.enabled")


@dataclass
class FLoRATwoStage(Server):
    client = FLoRAClient
    settings = TwoStageSettings
    trains_target_weights = True
    w0: torch.Tensor | None = field(default=None, repr=False)  # pretrained W entries of P
    svd: dict = field(default_factory=dict)  # relative truncation errors, set at the switch

    def __post_init__(self) -> None:
        self.layers = adapted_layers(self.adapter)
        masks = stage_masks(self.adapter, self.layers, self.cfg.seed,
                            self.cfg.method.stage1_density)
        self.w_mask, self.stage1_mask, self.stage2_mask = masks.w, masks.stage1, masks.stage2
        self.w_opt: ServerOptimizer | None = None  # Stage 1's own optimizer for W
        self.g: torch.Tensor | None = None
        if self.cfg.method.stage1_lr is not None:
            server = dataclasses.replace(self.cfg.server, lr=self.cfg.method.stage1_lr)
            self.w_opt = ServerOptimizer(server, int(self.w_mask.sum()), self.w_mask.device)

    @property
    def s1(self) -> int:
        return self.cfg.method.stage1_rounds

    def stage(self, round_: int) -> int:
        return 1 if round_ <= self.s1 else 2

    def mask(self, round_: int) -> torch.Tensor:
        return self.stage1_mask if round_ <= self.s1 else self.stage2_mask

    def begin_round(self, P: torch.Tensor, round_: int) -> None:
        self.round_, self.g = round_, None
        if self.w0 is None:  # round 1 of a fresh run: P's W entries are the pretrained W0
            self.w0 = P[self.w_mask].detach().clone()
        if round_ == self.s1 + 1:
            self.switch_(P)

    @torch.no_grad()
    def switch_(self, P: torch.Tensor) -> None:
        """Stage 2 init: A, B from the truncated SVD of each layer's ΔW; W back to W0."""
        cfg = self.cfg.model
        w0 = torch.zeros_like(P)
        w0[self.w_mask] = self.w0
        tail = total = 0.0
        per_layer = []
        for ly in self.layers:
            delta = view(P, ly.W) - view(w0, ly.W)
            A, B, err = svd_init(delta, cfg.rank, cfg.alpha)  # s = alpha / r, as peft
            view(P, ly.A).copy_(A)
            view(P, ly.B).copy_(B)
            view(P, ly.W).copy_(view(w0, ly.W))
            sq = float(delta.double().square().sum())
            tail, total = tail + err**2 * sq, total + sq
            per_layer.append(err)
        overall = math.sqrt(tail / total) if total > 0 else 0.0
        self.svd = {"round": self.s1 + 1, "rel_err": overall, "rel_err_per_layer": per_layer}
        log.info("flora_two_stage: Stage 2 from rank-%d SVD of ΔW, relative truncation error "
                 "%.4f (per layer %.4f..%.4f)", cfg.rank, overall, min(per_layer),
                 max(per_layer))

    def options(self, round_: int, client: int) -> dict:
        return {"stage": self.stage(round_), "stage1_density": self.cfg.method.stage1_density}

    def download_mask(self, P: torch.Tensor, round_: int, client: int) -> torch.Tensor:
        return self.mask(round_)

    def down_implicit(self, client: int) -> bool:
        return True

    def upload_mask(self, round_: int, client: int) -> torch.Tensor:
        return self.mask(round_)

    def step_mask(self, round_: int) -> torch.Tensor:
        if self.w_opt is not None and round_ <= self.s1:
            return self.stage1_mask & ~self.w_mask  # the head; W is stepped in end_round
        return self.mask(round_)

    def aggregate(self, updates, clients, weights, P):
        """The engine's mean; kept for W's own Stage-1 step when `stage1_lr` is set."""
        if self.w_opt is None or self.round_ > self.s1:
            return None
        self.g = weighted_mean(updates, weights if self.cfg.server.weighted else None)
        return self.g

    @torch.no_grad()
    def end_round(self, P: torch.Tensor, round_: int) -> None:
        if self.g is not None:
            W = P[self.w_mask]
            self.w_opt.step(W, self.g[self.w_mask], self.stage1_mask[self.w_mask])
            P[self.w_mask] = W
            self.g = None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {} if self.w0 is None else {"w0": self.w0}
        if self.w_opt is not None:
            out.update({f"stage1_{k}": v for k, v in self.w_opt.state_tensors().items()})
        return out

    def state_json(self) -> dict:
        steps = None if self.w_opt is None else self.w_opt.step_count
        return {"svd": self.svd, "stage1_steps": steps}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.w0 = tensors.get("w0")
        self.svd = meta.get("svd", {})
        if self.w_opt is not None:
            self.w_opt.load_state({k[7:]: v for k, v in tensors.items()
                                   if k.startswith("stage1_")}, meta.get("stage1_steps") or 0)
