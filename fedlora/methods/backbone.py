"""Sparse-backbone baselines (paper Table 1): the LoRA rules applied to the backbone W.

`trains_backbone` makes the task build the model without LoRA and with every weight
trainable (embeddings, all transformer layers, norms, biases, pooler and head), so the
flat vector P is the whole model and the masks act on W.

W is the pretrained backbone. The task's new head (a classifier the task adds, e.g. BERT's
`classifier`), and any module the checkpoint did not supply, is not W and stays dense:
always trained and sent, outside the top-k, as the head is outside LoRA in the LoRA methods.
Density d is of W's entries. Why: a new head is initialized at std 0.02, below most
pretrained weights, so a magnitude mask over everything freezes it at random init. Measured
on MiniLM (wordnet-topics): TopKMask(|P|, 1/2) keeps 8.7% of the classifier (1/4: 0.2%).
The global threshold has the same effect on small *pretrained* layers, and that is the
method as specified: MiniLM's pooler (in the checkpoint, mean |w| 0.007) keeps 9% of its
entries at d = 3/4 and none at d = 1/2, which cuts the classifier off from the encoder.
"""

from __future__ import annotations

import torch

from fedlora.methods.adapter_lth import AdapterLTH
from fedlora.methods.federated_select import FederatedSelect
from fedlora.methods.lora import LoRA
from fedlora.methods.sparse_adapter import SparseAdapter


class DenseHead:
    """Keeps the task's new head out of the mask (see the module docstring)."""

    @property
    def exempt(self) -> torch.Tensor | None:
        if not hasattr(self, "_head"):
            self._head = self.adapter.head_mask()
        return self._head


class FullFinetune(LoRA):
    """Dense federated fine-tuning of every weight."""

    trains_backbone = True


class FedSparsify(DenseHead, AdapterLTH):
    """FedSparsify-Global (Stripelis et al. 2022): IMP on W, Adapter LTH's schedule."""

    trains_backbone = True


class SPDST(DenseHead, SparseAdapter):
    """SPDST as modified in the paper: one dense round, then prune W by magnitude to
    method.density and train/communicate only inside that fixed mask."""

    trains_backbone = True


class FederatedSelectBackbone(DenseHead, FederatedSelect):
    """Federated Select (Charles et al. 2022) on W, its original setting."""

    trains_backbone = True
