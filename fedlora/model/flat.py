"""The flat adapter vector P and its gradient, as views into one resident model.

Every trainable parameter's `.data` and `.grad` become views into two 1-D buffers,
so loading a client's vector is one `copy_`, a client's delta is one subtraction,
and a gradient mask is one multiply. The backbone is never copied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.numel)


class FlatAdapter:
    """Owns `vector` (P) and `grad`; the model's trainable parameters alias them."""

    def __init__(self, model: torch.nn.Module):
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        device, dtype = params[0][1].device, params[0][1].dtype
        self.layout: list[Entry] = []
        offset = 0
        for name, p in params:
            self.layout.append(Entry(name, tuple(p.shape), offset))
            offset += p.numel()
        self.n = offset
        # Modules that are new, not pretrained: the task's head and anything the checkpoint
        # lacked (set by add_lora for backbone-training methods); empty otherwise.
        self.head: tuple[str, ...] = tuple(getattr(model, "fedlora_head", None) or ())
        self.vector = torch.empty(self.n, device=device, dtype=dtype)
        self.grad = torch.zeros(self.n, device=device, dtype=dtype)
        self.params = [p for _, p in params]
        with torch.no_grad():
            for e, p in zip(self.layout, self.params):
                self.vector[e.slice].copy_(p.detach().reshape(-1))
                p.data = self.vector[e.slice].view(e.shape)
                p.grad = self.grad[e.slice].view(e.shape)

    def load_(self, v: torch.Tensor) -> None:
        """Swap a client's (or the server's) vector into the model."""
        self.vector.copy_(v)

    def zero_grad(self) -> None:
        self.grad.zero_()

    def check_aliasing(self) -> None:
        """Autograd must have accumulated into our buffer, not replaced `.grad`."""
        for e, p in zip(self.layout, self.params):
            if p.grad is None or p.grad.data_ptr() != self.grad[e.slice].data_ptr():
                raise RuntimeError(f"gradient of {e.name} is no longer a view of the flat buffer")
            if p.data_ptr() != self.vector[e.slice].data_ptr():
                raise RuntimeError(f"{e.name} is no longer a view of the flat vector")

    def named_slices(self, predicate) -> torch.Tensor:
        """Boolean mask over P of the entries whose parameter name satisfies `predicate`."""
        mask = torch.zeros(self.n, dtype=torch.bool, device=self.vector.device)
        for e in self.layout:
            if predicate(e.name):
                mask[e.slice] = True
        return mask

    def head_mask(self) -> torch.Tensor | None:
        """Entries of the new modules (see `head`); None when there are none."""
        if not self.head:
            return None
        mask = self.named_slices(lambda n: any(n == h or n.startswith(h + ".") for h in self.head))
        return mask if mask.any() else None

    def layout_json(self) -> str:
        return json.dumps([{"name": e.name, "shape": list(e.shape), "offset": e.offset}
                           for e in self.layout])


class ParamPenalty:
    """A local-loss term written over named adapter parameters, not over a model.

    `fn(params)` takes a mapping from layout names to parameter tensors and returns a scalar.
    Sequential training calls it with the model's own parameters (`penalty()`, so it is a
    drop-in for a closure); lockstep training calls `fn` with one client's slice of the
    stacked parameters, which a closure over the model's parameters could not follow.
    """

    def __init__(self, fn, adapter: FlatAdapter):
        self.fn = fn
        self.params = {e.name: p for e, p in zip(adapter.layout, adapter.params)}

    def __call__(self) -> torch.Tensor:
        return self.fn(self.params)
