"""Lockstep local training: K clients' SGD on one resident backbone, one forward/backward.

Sequential training (fedlora/client/train.py) runs a round's clients one after another, so
a round costs the sum of their steps, each a small forward/backward that uses several CPU
threads or an accelerator poorly (on one CPU thread a MiniLM step is compute-bound already,
and lockstep gains nothing there: BENCHMARKS.md). Here every client keeps its own adapter
vector, SGD momentum, gradient mask and penalty as one row of (K, n) buffers, and at each
step the active clients' micro-batches go through the backbone together: the frozen weights
once for all rows, each client's LoRA A/B (and head) applied to its own rows with batched
matmuls.

How: for the duration of a call, every peft LoRA ``Linear`` and every ``ModulesToSaveWrapper``
around a ``Linear`` (the head) gets an instance ``forward`` that reads stacked parameters of
shape (K, r, in) / (K, out, r) / (K, out, in) and a row -> client segmentation. The stacked
parameters' ``.data``/``.grad`` are views into (K, n) buffers laid out like FlatAdapter's P,
so a client's trained vector is one row, masks and momentum are row-wise multiplies, and
its gradient is exactly the gradient of its own loss (rows never mix: the backbone is
row-wise except attention, which never crosses examples).

Why this and not ``torch.func`` (functional_call + vmap over stacked parameters): measured
side by side in benchmarks/lockstep.py (BENCHMARKS.md, "Lockstep training"), vmap was no
faster (1.00x of sequential's CPU time at 1 thread, like this forward), and it needs equal
per-client batch shapes (unequal step counts and partial last batches would need padding
rows that cost compute) and a hand-built 4-D attention mask (transformers' mask builder
branches on tensor values, which vmap rejects). This forward runs the frozen backbone as
one plain batch, takes any row counts, and leaves the model's own code path untouched.

Exactness: with dropout probabilities 0, each client's trained vector equals sequential
``train_client``'s up to float reduction order (tests/test_lockstep.py: 1e-5 relative).
With dropout on, a batched forward cannot reproduce per-client dropout masks: the caller
seeds torch's global RNG once per chunk (stream ``lockstep_dropout``), so the same config
and seed still give the same results, but not sequential's.

Clients may run unequal numbers of steps: jobs are ordered by step count (descending), so
at every step the clients still training are a prefix of the rows; a finished client's
vector and momentum are never touched again.
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.utils.other import ModulesToSaveWrapper

from fedlora.model.flat import FlatAdapter, ParamPenalty


@dataclass
class LockstepJob:
    """One client's local training: where it starts, its micro-batches (index arrays into
    the task's train split), the entries it may train (None = all) and a penalty."""

    start: torch.Tensor
    batches: Sequence[np.ndarray]
    grad_mask: torch.Tensor | None = None
    penalty: ParamPenalty | None = None


@dataclass
class LockstepResult:
    """The trained vector (a fresh tensor) and train_client's stats."""

    vector: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


def lockstep_chunk(setting: int | str, cohort: int, device: torch.device,
                   threads: int | None = None) -> int:
    """Clients per lockstep chunk for `client.lockstep` (K, or "auto") and a cohort size.

    "auto", from benchmarks/lockstep.py on MiniLM (BENCHMARKS.md, "Lockstep training"): on
    CPU with one thread (`threads`, default torch.get_num_threads()), one client at a time:
    a step is compute-bound already at batch 16, lockstep measured no faster, and sequential
    keeps each client's own dropout stream. With more threads, the whole cohort: fewer and
    larger parallel regions measured 3.5x faster per round at 2 threads. On an accelerator,
    the whole cohort too: one launch instead of K (not measured: no GPU was lent)."""
    if setting == "auto":
        threads = torch.get_num_threads() if threads is None else threads
        return 1 if device.type == "cpu" and threads <= 1 else max(1, cohort)
    return max(1, min(int(setting), cohort))


def lockstep_blocker(task, adapter: FlatAdapter, penalties: Sequence[object] = ()) -> str | None:
    """Why these clients cannot train in lockstep, or None when they can.

    Lockstep needs a task with a multi-batch loss (`task.losses`), a flat vector made only
    of LoRA A/B of peft LoRA Linear layers (no DoRA or other variants, one adapter) and
    Linear heads (modules_to_save), and penalties written over named parameters
    (ParamPenalty). Backbone-training methods (P is the whole model), methods whose P holds
    the adapted weights W, and penalties that close over the model's parameters cannot."""
    if not callable(getattr(task, "losses", None)):
        return f"task {type(task).__name__} has no multi-batch loss (task.losses)"
    try:
        _stackable(task.model, adapter)
    except _Unsupported as e:
        return str(e)
    for p in penalties:
        if p is not None and not isinstance(p, ParamPenalty):
            return "a local penalty is a closure over the model's parameters (not a ParamPenalty)"
    return None


def train_lockstep(task, adapter: FlatAdapter, jobs: Sequence[LockstepJob], *, lr: float,
                   momentum: float, device: torch.device) -> list[LockstepResult]:
    """Train `jobs` together; each gets what `train_client` would give it (see module doc).

    The caller seeds torch's global RNG for dropout. The adapter's own vector is left as
    it was (the resident model is only read); results come back in job order."""
    if not jobs:
        return []
    reason = lockstep_blocker(task, adapter, [j.penalty for j in jobs])
    if reason is not None:
        raise ValueError(f"client.lockstep: cannot train in lockstep: {reason}")
    batches = [list(j.batches) for j in jobs]
    order = sorted(range(len(jobs)), key=lambda i: -len(batches[i]))  # stable: ties keep order
    k = len(jobs)
    dtype = adapter.vector.dtype
    V = torch.stack([jobs[i].start.to(device=device, dtype=dtype) for i in order])
    G = torch.zeros_like(V)
    buf = torch.zeros_like(V)
    masks = None
    if any(j.grad_mask is not None for j in jobs):
        masks = torch.ones_like(V)
        for row, i in enumerate(order):
            if jobs[i].grad_mask is not None:
                masks[row].copy_(jobs[i].grad_mask.to(device))
    stacked = _StackedParams(adapter, V, G)
    penalties = [jobs[i].penalty for i in order]
    steps = [len(batches[i]) for i in order]
    loss_sum = [0.0] * k
    examples = [0] * k
    first = [math.nan] * k
    model, split = task.model, task.data.train
    model.train()  # dropout on, as in train_client
    with _batched_forward(model, stacked) as rows:
        for s in range(steps[0] if steps else 0):
            active = sum(1 for m in steps if m > s)  # a prefix: rows sorted by step count
            idx = [batches[order[r]][s] for r in range(active)]
            rows.set([len(b) for b in idx])
            G[:active].zero_()
            losses = task.losses(model, [task.batch(split, b, device, train=True) for b in idx])
            total = sum(losses)
            for r in range(active):
                if penalties[r] is not None:
                    total = total + penalties[r].fn(stacked.client(r))
            with warnings.catch_warnings():  # (K, out) views of G: strided on purpose
                warnings.filterwarnings("ignore", message="grad and param do not obey")
                total.backward()
            with torch.no_grad():
                g, b, v = G[:active], buf[:active], V[:active]
                if masks is not None:
                    g.mul_(masks[:active])
                b.mul_(momentum).add_(g)
                v.add_(b, alpha=-lr)
            for r, (loss, bi) in enumerate(zip(losses, idx)):
                value = float(loss.detach())
                if s == 0:
                    first[r] = value
                loss_sum[r] += value * len(bi)
                examples[r] += len(bi)
    stacked.check_aliasing()
    out: list[LockstepResult | None] = [None] * k
    for row, i in enumerate(order):
        if steps[row] == 0:
            stats = {"train_loss": math.nan, "first_loss": math.nan, "steps": 0, "examples": 0}
        else:
            if not torch.isfinite(V[row]).all():
                raise FloatingPointError(f"local training of lockstep job {i} diverged "
                                         "(non-finite adapter); lower client.lr")
            stats = {"train_loss": loss_sum[row] / examples[row], "first_loss": first[row],
                     "steps": steps[row], "examples": examples[row]}
        out[i] = LockstepResult(V[row].clone(), stats)
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------ internals


class _Unsupported(Exception):
    pass


def _stackable(model: torch.nn.Module, adapter: FlatAdapter) -> dict[str, torch.nn.Module]:
    """Layout name -> the module whose batched forward will read it; raises _Unsupported."""
    owner: dict[int, tuple[torch.nn.Module, str]] = {}
    for module in model.modules():
        if isinstance(module, LoraLinear):
            adapters = list(module.lora_A.keys())
            if (len(adapters) != 1 or module.lora_variant or module.merged
                    or module.disable_adapters or module.active_adapters != adapters):
                raise _Unsupported("a LoRA layer has several adapters, a variant (e.g. DoRA), "
                                   "or is merged/disabled")
            a = adapters[0]
            for sub in (module.lora_A[a], module.lora_B[a]):
                for p in sub.parameters():
                    owner[id(p)] = (module, a)
        elif isinstance(module, ModulesToSaveWrapper):
            adapters = list(module.modules_to_save.keys())
            if len(adapters) != 1 or module.disable_adapters:
                raise _Unsupported("a modules_to_save head has several adapters or is disabled")
            head = module.modules_to_save[adapters[0]]
            if type(head) is not torch.nn.Linear:
                raise _Unsupported(f"the trained head is a {type(head).__name__}, "
                                   "not a Linear")
            for p in head.parameters():
                owner[id(p)] = (module, adapters[0])
    out = {}
    for e, p in zip(adapter.layout, adapter.params):
        if id(p) not in owner:
            raise _Unsupported(f"trainable parameter {e.name} is neither LoRA A/B nor a "
                               "Linear head (backbone-training or W-training method)")
        out[e.name] = owner[id(p)][0]
    return out


class _StackedParams:
    """One leaf tensor per layout entry of shape (K, *shape), aliasing rows of V and G."""

    def __init__(self, adapter: FlatAdapter, V: torch.Tensor, G: torch.Tensor):
        self.k = V.shape[0]
        self.leaves: dict[str, torch.Tensor] = {}
        self._views = []
        by_param = {}
        for e, p in zip(adapter.layout, adapter.params):
            leaf = torch.empty(0, device=V.device, dtype=V.dtype).requires_grad_(True)
            leaf.data = V[:, e.slice].view(self.k, *e.shape)
            leaf.grad = G[:, e.slice].view(self.k, *e.shape)
            self.leaves[e.name] = leaf
            self._views.append((e.name, leaf, V, G, e))
            by_param[id(p)] = leaf
        self.by_param = by_param

    def of(self, p: torch.Tensor) -> torch.Tensor:
        """The stacked (K, *shape) leaf standing for model parameter `p`."""
        return self.by_param[id(p)]

    def client(self, row: int) -> dict[str, torch.Tensor]:
        """Row `row`'s parameters by layout name (differentiable: a penalty reaches G)."""
        return {name: leaf[row] for name, leaf in self.leaves.items()}

    def check_aliasing(self) -> None:
        """Autograd must have accumulated into G in place (as FlatAdapter.check_aliasing)."""
        for name, leaf, V, G, e in self._views:
            if leaf.grad is None or leaf.grad.data_ptr() != G[:, e.slice].data_ptr():
                raise RuntimeError(f"lockstep gradient of {name} is no longer a view of G")
            if leaf.data_ptr() != V[:, e.slice].data_ptr():
                raise RuntimeError(f"lockstep parameter {name} is no longer a view of V")


class _Rows:
    """Rows per active client of the current micro-batch (clients' rows are contiguous)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def set(self, sizes: list[int]) -> None:
        self.sizes = sizes

    @property
    def uniform(self) -> bool:
        return len(set(self.sizes)) == 1


def _per_client(x: torch.Tensor, rows: _Rows, W: torch.Tensor,
                b: torch.Tensor | None) -> torch.Tensor:
    """y[rows of client j] = x[rows of client j] @ W[j]^T (+ b[j]) for stacked W (K, out, in)."""
    k = len(rows.sizes)
    if rows.uniform:  # one bmm over (k, rows*tokens, in)
        xs = x.reshape(k, -1, x.shape[-1])
        y = torch.bmm(xs, W[:k].transpose(1, 2))
        if b is not None:
            y = y + b[:k, None, :]
        return y.reshape(*x.shape[:-1], W.shape[1])
    parts, start = [], 0
    for j, m in enumerate(rows.sizes):
        parts.append(F.linear(x[start:start + m], W[j], None if b is None else b[j]))
        start += m
    return torch.cat(parts)


def _lora_forward(stacked: _StackedParams, rows: _Rows, adapter_name: str):
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        A = stacked.of(self.lora_A[adapter_name].weight)
        B = stacked.of(self.lora_B[adapter_name].weight)
        bias = self.lora_B[adapter_name].bias
        h = _per_client(self.lora_dropout[adapter_name](x.to(A.dtype)), rows, A, None)
        y = _per_client(h, rows, B, None if bias is None else stacked.of(bias))
        return (result + y * self.scaling[adapter_name]).to(dtype)
    return forward


def _head_forward(stacked: _StackedParams, rows: _Rows, adapter_name: str):
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        head = self.modules_to_save[adapter_name]
        return _per_client(x, rows, stacked.of(head.weight),
                           None if head.bias is None else stacked.of(head.bias))
    return forward


@contextmanager
def _batched_forward(model: torch.nn.Module, stacked: _StackedParams) -> Iterator[_Rows]:
    """Give every LoRA layer and Linear head a batched instance forward, for this block."""
    rows = _Rows()
    patched = []
    try:
        for module in model.modules():
            if isinstance(module, LoraLinear):
                fn = _lora_forward(stacked, rows, next(iter(module.lora_A.keys())))
            elif isinstance(module, ModulesToSaveWrapper):
                fn = _head_forward(stacked, rows, next(iter(module.modules_to_save.keys())))
            else:
                continue
            module.forward = types.MethodType(fn, module)
            patched.append(module)
        yield rows
    finally:
        for module in patched:
            del module.forward
