"""Method registry: each method is one small file with a server half and a client half
saying only what differs from dense LoRA (fedlora/methods/base.py)."""

from __future__ import annotations

from fedlora.methods.adapter_lth import AdapterLTH
from fedlora.methods.backbone import SPDST, FederatedSelectBackbone, FedSparsify, FullFinetune
from fedlora.methods.base import Client, Server
from fedlora.methods.federated_select import FederatedSelect
from fedlora.methods.ffa_lora import FFALoRA
from fedlora.methods.flasc import FLASC
from fedlora.methods.flora import FLoRATwoStage
from fedlora.methods.hetlora import AllLowestTier, FLASCTiers, HetLoRA, HighestTierOnly
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

__all__ = ["METHODS", "Client", "Server", "build_method"]


def build_method(cfg, adapter) -> Server:
    return METHODS[cfg.method.name](cfg, adapter)
