"""Method registry: each method is one small file with a server half and a client half
saying only what differs from dense LoRA (fedlora/methods/base.py)."""

from __future__ import annotations

import dataclasses

from fedlora.config import Config, build_section, check
from fedlora.methods.adapter_lth import AdapterLTH
from fedlora.methods.backbone import SPDST, FederatedSelectBackbone, FedSparsify, FullFinetune
from fedlora.methods.base import Client, Server
from fedlora.methods.federated_select import FederatedSelect
from fedlora.methods.ffa_lora import FFALoRA
from fedlora.methods.flasc import FLASC, FLASCTiers
from fedlora.methods.flora import FLoRATwoStage
from fedlora.methods.hetlora import AllLowestTier, HetLoRA, HighestTierOnly
from fedlora.methods.lora import LoRA
from fedlora.methods.sparse_adapter import SparseAdapter
from fedlora.methods.stacking import FLoRAStacking

METHODS: dict[str, type[Server]] = {
    "flasc": FLASC,
    "lora": LoRA,
    "adapter_lth": AdapterLTH,
    "sparse_adapter": SparseAdapter,
    "federated_select": FederatedSelect,
    "ffa_lora": FFALoRA,
    "full_finetune": FullFinetune,
    "fedsparsify": FedSparsify,
    "spdst": SPDST,
    "federated_select_backbone": FederatedSelectBackbone,
    "hetlora": HetLoRA,
    "flasc_tiers": FLASCTiers,
    "all_lowest_tier": AllLowestTier,
    "highest_tier_only": HighestTierOnly,
    "flora_two_stage": FLoRATwoStage,
    "flora_stacking": FLoRAStacking,
}

__all__ = ["METHODS", "Client", "Server", "build_method", "resolve_settings", "trainable"]


def trainable(name: str) -> str:
    """What method `name` puts in the flat vector (`model.trainable`)."""
    cls = METHODS[name]
    return ("backbone" if cls.trains_backbone else
            "lora+weights" if cls.trains_target_weights else "lora")


def resolve_settings(cfg: Config) -> None:
    """Type, default and validate `cfg.method`'s own settings with the method's Settings
    class, in place; every error names the dotted field (`method.d_up`, ...)."""
    name = cfg.method.name
    check(name in METHODS, "method.name",
          f"unknown method {name!r} (valid: {', '.join(METHODS)})")
    cls = METHODS[name]
    known = {f.name for f in dataclasses.fields(cls.settings)}
    unknown = sorted(set(cfg.method.settings) - known)
    check(not unknown, f"method.{unknown[0] if unknown else ''}",
          f"method {name} has no such setting (its settings: {', '.join(sorted(known))})"
          if known else f"method {name} has no settings of its own")
    typed = build_section(cls.settings, dict(cfg.method.settings), "method")
    typed.validate(cfg, name)
    cfg.method.settings = dataclasses.asdict(typed)
    plan = trainable(name)
    check(cfg.model.trainable in (None, plan), "model.trainable",
          f"method {name} trains {plan}, not {cfg.model.trainable}")
    cfg.model.trainable = plan


def build_method(cfg: Config, adapter) -> Server:
    return METHODS[cfg.method.name](cfg, adapter)
