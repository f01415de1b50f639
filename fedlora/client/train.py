"""Local training: plain SGD with momentum on the flat vector, spelled out.

Equivalent to torch.optim.SGD(momentum=mu, dampening=0): buf <- mu*buf + grad,
P <- P - lr*buf. A gradient mask (pruning baselines) zeroes the gradient before
the momentum update, so masked entries never move.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from fedlora.model.flat import FlatAdapter


def train_client(task, adapter: FlatAdapter, batches: Iterable[np.ndarray], *, lr: float,
                 momentum: float, device: torch.device,
                 grad_mask: torch.Tensor | None = None,
                 penalty: Callable[[], torch.Tensor] | None = None) -> dict[str, float]:
    """Local SGD. `penalty()` (e.g. HetLoRA's tail norm) is added to each step's loss; the
    reported losses are the task loss alone, `first_loss` the one before any update."""
    model, split = task.model, task.data.train
    model.train()  # HF models load in eval mode: dropout must be on for training
    buf = torch.zeros_like(adapter.vector)
    loss_sum, steps, examples, first_loss = 0.0, 0, 0, float("nan")
    for idx in batches:
        batch = task.batch(split, idx, device, train=True)
        adapter.zero_grad()
        loss = task.loss(model, batch)
        (loss if penalty is None else loss + penalty()).backward()
        with torch.no_grad():
            g = adapter.grad
            if grad_mask is not None:
                g.mul_(grad_mask)
            buf.mul_(momentum).add_(g)
            adapter.vector.add_(buf, alpha=-lr)
        value = float(loss.detach())
        if steps == 0:
            first_loss = value  # the received model's loss on the first batch
        loss_sum += value * len(idx)
        steps += 1
        examples += len(idx)
    if steps == 0:
        return {"train_loss": float("nan"), "first_loss": first_loss, "steps": 0, "examples": 0}
    if not torch.isfinite(adapter.vector).all():
        raise FloatingPointError("local training diverged (non-finite adapter); lower client.lr")
    return {"train_loss": loss_sum / examples, "first_loss": first_loss, "steps": steps,
            "examples": examples}
