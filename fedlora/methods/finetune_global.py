"""finetune_global: the global model of `method.base` (FLASC by default), fine-tuned on each
client for `method.finetune_steps` local steps when it is deployed.

Training is exactly the base method's (both halves delegate to it, so P, bytes and ledger
equal a run of the base method); only the deployed model differs. The fine-tuning runs on
the client, on its own training examples, and is never sent anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedlora.config import check
from fedlora.methods.base import Client, Server
from fedlora.methods.flasc import FLASCSettings
from fedlora.protocol import ClientTask

# Base methods whose own settings are FLASC's (d_down, d_up) or none.
BASES = ("flasc", "lora", "ffa_lora")


@dataclass
class FinetuneGlobalSettings(FLASCSettings):
    """The base method and its FLASC settings (ignored by lora / ffa_lora), and the
    fine-tuning budget at deployment."""

    base: str = "flasc"
    finetune_steps: int = 10

    def validate(self, cfg, method: str) -> None:
        super().validate(cfg, method)
        check(self.base in BASES, "method.base",
              f"must be one of {', '.join(BASES)}, got {self.base!r}")
        check(self.finetune_steps >= 0, "method.finetune_steps",
              f"must be >= 0, got {self.finetune_steps}")


def _methods() -> dict:
    from fedlora.methods import METHODS  # the registry imports this module

    return METHODS


class FinetuneGlobalClient(Client):
    """The base method's client half, unchanged during training."""

    def __init__(self, task: ClientTask, adapter, init: torch.Tensor,
                 state: dict[str, torch.Tensor]):
        self.base = _methods()[str(task.options["base"])].client(task, adapter, init, state)
        self.up_implicit = self.base.up_implicit
        super().__init__(task, adapter, init, state)

    def down_mask(self):
        return self.base.down_mask()

    def start(self, received, positions):
        return self.base.start(received, positions)

    def train_mask(self):
        return self.base.train_mask()

    def penalty(self):
        return self.base.penalty()

    def done(self, start, trained, stats):
        self.base.done(start, trained, stats)

    def upload_mask(self, delta):
        return self.base.upload_mask(delta)

    def save_state(self):
        return self.base.save_state()

    @classmethod
    def deploy(cls, P: torch.Tensor, state: dict[str, torch.Tensor], options: dict,
               ctx) -> torch.Tensor:
        return ctx.finetune(P, int(options["finetune_steps"]))


@dataclass
class FinetuneGlobal(Server):
    """The base method's server half, plus the fine-tuning budget in the instruction."""

    client = FinetuneGlobalClient
    settings = FinetuneGlobalSettings

    def __post_init__(self) -> None:
        self.base = _methods()[self.cfg.method.base](self.cfg, self.adapter)

    def setup(self, num_clients: int) -> None:
        self.base.setup(num_clients)

    def eligible(self, clients):
        return self.base.eligible(clients)

    def begin_round(self, P, round_):
        self.base.begin_round(P, round_)

    def cohort_sampled(self, round_, cohort):
        self.base.cohort_sampled(round_, cohort)

    def options(self, round_: int, client: int) -> dict[str, Any]:
        m = self.cfg.method
        return {**self.base.options(round_, client), "base": m.base,
                "finetune_steps": m.finetune_steps}

    def download_mask(self, P, round_, client):
        return self.base.download_mask(P, round_, client)

    def down_implicit(self, client):
        return self.base.down_implicit(client)

    def extra_payloads(self, P, round_, client):
        return self.base.extra_payloads(P, round_, client)

    def receive(self, round_, client, stats):
        return self.base.receive(round_, client, stats)

    def upload_mask(self, round_, client):
        return self.base.upload_mask(round_, client)

    def aggregate(self, updates, clients, weights, P):
        return self.base.aggregate(updates, clients, weights, P)

    def step_mask(self, round_):
        return self.base.step_mask(round_)

    def end_round(self, P, round_):
        self.base.end_round(P, round_)

    def eval_vectors(self, P):
        return self.base.eval_vectors(P)

    def state_tensors(self):
        return self.base.state_tensors()

    def state_json(self):
        return self.base.state_json()

    def load_state(self, tensors, meta):
        self.base.load_state(tensors, meta)
