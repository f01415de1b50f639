"""Sparse-backbone baselines (paper Table 1): the LoRA rules applied to the backbone W.

`trains_backbone` makes the task build the model without LoRA and with every weight
trainable (embeddings, all transformer layers, norms, biases, pooler and head), so the
flat vector P is the whole model and the masks act on W.
"""

from __future__ import annotations

from fedlora.methods.adapter_lth import AdapterLTH
from fedlora.methods.federated_select import FederatedSelect
from fedlora.methods.lora import LoRA
from fedlora.methods.sparse_adapter import SparseAdapter


class FullFinetune(LoRA):
    """Dense federated fine-tuning of every weight."""

    trains_backbone = True


class FedSparsify(AdapterLTH):
    """FedSparsify-Global (Stripelis et al. 2022): IMP on W, Adapter LTH's schedule."""

    trains_backbone = True


class SPDST(SparseAdapter):
    """SPDST as modified in the paper: one dense round, then prune W by magnitude to
    method.density and train/communicate only inside that fixed mask."""

    trains_backbone = True


class FederatedSelectBackbone(FederatedSelect):
    """Federated Select (Charles et al. 2022) on W, its original setting."""

    trains_backbone = True
