"""Where the LoRA factors and adapted weights sit in the flat vector: one source for every
method that pairs A with B (HetLoRA's ranks, FLoRA's stages, stacking's merges).

peft names a pair `<module>.lora_A.<adapter>.weight` / `<module>.lora_B.<adapter>.weight`
and the wrapped weight `<module>.base_layer.weight`; pairs are matched by those names.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fedlora.model.flat import Entry, FlatAdapter

WEIGHT_SUFFIX = ".base_layer.weight"


@dataclass(frozen=True)
class Layer:
    """One adapted weight: W (out x in) when it is in P, A (r x in), B (out x r)."""

    A: Entry
    B: Entry
    W: Entry | None = None

    @property
    def module(self) -> str:
        return self.A.name.split(".lora_A.")[0]


def lora_layers(adapter: FlatAdapter) -> list[Layer]:
    """Every LoRA pair in layout order, with its adapted W when W is in the flat vector."""
    entries = {e.name: e for e in adapter.layout}
    layers = []
    for name, a in entries.items():
        if ".lora_A." in name:
            module = name.split(".lora_A.")[0]
            b = entries[name.replace(".lora_A.", ".lora_B.", 1)]
            layers.append(Layer(a, b, entries.get(module + WEIGHT_SUFFIX)))
    return layers


def adapted_layers(adapter: FlatAdapter) -> list[Layer]:
    """The LoRA layers whose adapted weight W is in P (`model.trainable = lora+weights`)."""
    layers = [ly for ly in lora_layers(adapter) if ly.W is not None]
    if not layers:
        raise ValueError("the flat vector holds no adapted weights W (trains_target_weights)")
    return layers


def view(v: torch.Tensor, e: Entry) -> torch.Tensor:
    """Entry `e` of flat vector `v` in its parameter's shape."""
    return v[e.slice].view(e.shape)


def entry_mask(adapter: FlatAdapter, entries: list[Entry]) -> torch.Tensor:
    """Boolean mask over P of these layout entries."""
    names = {e.name for e in entries}
    return adapter.named_slices(names.__contains__)


def lora_pairs(adapter: FlatAdapter, vector: torch.Tensor) -> Iterator[tuple[torch.Tensor,
                                                                            torch.Tensor]]:
    """(A, B) views of every LoRA layer in `vector`."""
    for ly in lora_layers(adapter):
        yield view(vector, ly.A), view(vector, ly.B)


def param_pairs(adapter: FlatAdapter) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) model parameters of every LoRA layer: a penalty on them reaches adapter.grad."""
    params = {e.name: p for e, p in zip(adapter.layout, adapter.params)}
    return [(params[ly.A.name], params[ly.B.name]) for ly in lora_layers(adapter)]


def rank_mask(adapter: FlatAdapter, r: int) -> torch.Tensor:
    """Entries of P in the first r LoRA components (plus everything that is not LoRA):
    component j is row j of A and column j of B."""
    mask = torch.ones(adapter.n, dtype=torch.bool, device=adapter.vector.device)
    for ly in lora_layers(adapter):
        view(mask, ly.A)[r:, :] = False
        view(mask, ly.B)[:, r:] = False
    return mask
