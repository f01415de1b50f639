"""The client half of a round: `ClientRunner` turns one `ClientTask` into one `ClientResult`.

It holds the clients' data and the resident model of this process (all clients in-process,
one node's in a Flower ClientApp) and the client-held state store. For each instruction it
builds the method's client half from the instruction alone, decodes the download, trains
(one client after another, or K in lockstep), and encodes the upload. It never sees the
server: what it uses is the ClientTask, the client's own data, the model's seeded init and
the client's held state (docs/design.md).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from fedlora.client.lockstep import (
    LockstepJob,
    lockstep_blocker,
    lockstep_chunk,
    train_lockstep,
)
from fedlora.client.personal import ClientContext
from fedlora.client.store import ClientStore
from fedlora.client.train import train_client
from fedlora.comm import codec
from fedlora.data.federated import client_batches
from fedlora.methods import METHODS
from fedlora.model.flat import FlatAdapter
from fedlora.protocol import ClientResult, ClientTask
from fedlora.rng import np_rng, torch_seed

__all__ = ["ClientRunner", "set_threads"]

log = logging.getLogger("fedlora")


def set_threads(threads: int | None) -> int:
    """Give torch `threads` CPU threads: the config's value, else $FEDLORA_THREADS (the test
    suite sets 1), else every core this process may run on. Logs and returns the count."""
    if threads is None:
        env = os.environ.get("FEDLORA_THREADS", "").strip()
        if env:
            if not env.isdigit() or int(env) < 1:
                raise ValueError(f"FEDLORA_THREADS: expected an integer >= 1, got {env!r}")
            threads = int(env)
        elif hasattr(os, "sched_getaffinity"):
            threads = len(os.sched_getaffinity(0))
        else:
            threads = os.cpu_count() or 1
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    log.info("torch uses %d CPU thread%s", threads, "" if threads == 1 else "s")
    return threads


class ClientRunner:
    """The client half of every method, for the clients whose data `task` holds.

    `run` builds the method's client half from the instruction alone, decodes the download,
    trains, and encodes the upload. It sees no server state: what it uses is the
    ClientTask, the client's data, the model's seeded init and the client's held state."""

    def __init__(self, task, store: ClientStore | None = None, *, lockstep: int | str = 1):
        self.task = task
        self.lockstep = lockstep  # client.lockstep: K clients per forward/backward, or "auto"
        self._fallback_logged = False
        self.adapter = FlatAdapter(task.model) if getattr(task, "adapter", None) is None \
            else task.adapter
        task.adapter = self.adapter
        if getattr(task, "initial_vector", None) is None:
            task.initial_vector = self.adapter.vector.detach().clone()
        self.init = task.initial_vector
        self.device = self.init.device
        self.store = store if store is not None else ClientStore(None)
        self._decoded: tuple | None = None  # (payload, mask, received, positions)

    def run_many(self, tasks: list[ClientTask]) -> list[ClientResult | str]:
        """Each client's reply, or a string saying why it has none (`run_safely`).

        With `lockstep` K > 1, consecutive clients with the same local-training settings
        train in chunks of K through one forward/backward (fedlora/client/lockstep.py);
        where that cannot run (the method or task), one after another, said once in the
        log. The replies are the same either way up to float rounding, except that dropout
        draws from one stream per chunk instead of one per client. A chunk in which a client
        fails is rerun one client at a time, so only that client is dropped."""
        return [r for group in self.plan(tasks) for r in self.run_group(group)]

    def plan(self, tasks: list[ClientTask], threads: int | None = None) -> list[list[ClientTask]]:
        """The cohort cut into the groups `run_group` trains: lockstep chunks of up to K
        consecutive clients with the same training settings, or one client each. The
        worker pool (fedlora/workers.py) plans here too, so the chunks, and with them
        every reply, do not depend on how many processes train them."""
        k = lockstep_chunk(self.lockstep, len(tasks), self.device, threads)
        if k <= 1 or not self._lockstep_possible():
            return [[ct] for ct in tasks]
        groups: list[list[ClientTask]] = []
        for ct in tasks:
            if not groups or len(groups[-1]) == k or ct.train != groups[-1][0].train:
                groups.append([])
            groups[-1].append(ct)
        return groups

    def run_group(self, group: list[ClientTask]) -> list[ClientResult | str]:
        """One group of `plan`: a lone client, or a lockstep chunk."""
        if len(group) == 1:
            return [self.run_safely(group[0])]
        return self._run_chunk_safely(group)

    def run_safely(self, ct: ClientTask) -> ClientResult | str:
        """`run`, with a client's own failures turned into the reason it has no reply: a
        download it cannot decode, local training that diverged, an upload it cannot encode
        (e.g. beyond the float16 range). Bugs and MemoryError still propagate."""
        try:
            return self.run(ct)
        except codec.CodecError as e:
            return f"its payload failed to encode or decode: {e}"
        except FloatingPointError as e:
            return f"local training failed: {e}"

    def _run_chunk_safely(self, chunk: list[ClientTask]) -> list[ClientResult | str]:
        try:
            return list(self._run_chunk(chunk))
        except (codec.CodecError, FloatingPointError):
            return [self.run_safely(ct) for ct in chunk]

    def run(self, ct: ClientTask) -> ClientResult:
        half, start, batches = self.prepare(ct)
        stats = self.train(batches, half.train_mask(), half.penalty())
        return self.finish(ct, half, start, stats)

    def _lockstep_possible(self, penalties=()) -> bool:
        reason = lockstep_blocker(self.task, self.adapter, penalties)
        if reason is not None and not self._fallback_logged:  # a warning when asked for
            (log.info if self.lockstep == "auto" else log.warning)(
                "client.lockstep=%s: training clients one after another: %s",
                self.lockstep, reason)
            self._fallback_logged = True
        return reason is None

    def _run_chunk(self, chunk: list[ClientTask]) -> list[ClientResult]:
        """Prepare every client of the chunk, train them together, then finish each."""
        if len(chunk) == 1:
            return [self.run(chunk[0])]
        prepared = [(ct, *self.prepare(ct)) for ct in chunk]
        jobs = [LockstepJob(start, list(batches), half.train_mask(), half.penalty())
                for _, half, start, batches in prepared]
        if not self._lockstep_possible([j.penalty for j in jobs]):
            out = []
            for (ct, half, start, _), job in zip(prepared, jobs):
                self.adapter.load_(start)
                torch.manual_seed(torch_seed(ct.seed, "dropout", ct.round, ct.client))
                stats = self.train(job.batches, job.grad_mask, job.penalty)
                out.append(self.finish(ct, half, start, stats))
            return out
        first, tr = chunk[0], chunk[0].train
        torch.manual_seed(torch_seed(first.seed, "lockstep_dropout", first.round, first.client))
        trained = train_lockstep(self.task, self.adapter, jobs, lr=tr["lr"],
                                 momentum=tr["momentum"], device=self.device)
        out = []
        for (ct, half, start, _), res in zip(prepared, trained):
            self.adapter.load_(res.vector)  # finish reads the trained vector from the model
            out.append(self.finish(ct, half, start, res.stats))
        return out

    def prepare(self, ct: ClientTask):
        """The client half, its start vector (loaded into the model) and its batches."""
        half = METHODS[ct.method].client(ct, self.adapter, self.init,
                                         self.store.load(ct.client))
        half.local = ClientContext(self.task, self.adapter, ct.client, ct.seed, ct.train,
                                   self.init, ct.round)
        if half.communicates:
            received, positions = self.decode_download(ct, half.down_mask())
        else:  # nothing was sent (local_only): the half starts from its own state
            received, positions = self.init.clone(), None
        start = half.start(received, positions)
        self.adapter.load_(start)
        torch.manual_seed(torch_seed(ct.seed, "dropout", ct.round, ct.client))
        tr = ct.train
        batches = client_batches(self.task.data.clients[ct.client], tr["batch_size"],
                                 tr["epochs"], tr["max_steps"],
                                 np_rng(ct.seed, "data_order", ct.round, ct.client))
        self._train_cfg = tr
        return half, start, batches

    def train(self, batches, grad_mask: torch.Tensor | None, penalty=None) -> dict:
        """Local SGD with momentum on the vector loaded in the model."""
        tr = self._train_cfg
        return train_client(self.task, self.adapter, batches, lr=tr["lr"],
                            momentum=tr["momentum"], device=self.device,
                            grad_mask=grad_mask, penalty=penalty)

    def finish(self, ct: ClientTask, half, start: torch.Tensor, stats: dict) -> ClientResult:
        """After training (the trained vector is in the model): the reply."""
        stats["num_examples"] = len(self.task.data.clients[ct.client])
        half.done(start, self.adapter.vector, stats)
        delta = start - self.adapter.vector
        mask = half.upload_mask(delta)
        if not half.communicates:
            upload = b""
        elif half.up_implicit and mask is not None:
            upload = codec.encode(delta[mask], None, values=ct.up_values)
        else:
            upload = codec.encode(delta, mask, values=ct.up_values)
        state = half.save_state()
        if state is not None:
            self.store.save(ct.client, ct.round, state)
        return ClientResult(ct.round, ct.client, upload, stats)

    def decode_download(self, ct: ClientTask, mask: torch.Tensor | None):
        """The dense start vector the download carries, and its positions (None = all).

        Clients of a round are usually sent the same payload object: decode it once."""
        payload = ct.payloads["down"]
        hit = self._decoded
        if hit is not None and hit[0] is payload and _same_mask(hit[1], mask):
            return hit[2].clone(), hit[3]
        if mask is not None:  # values only, at a mask the client derived itself
            received = torch.zeros(ct.n, device=self.device)
            received[mask] = codec.decode(payload, int(mask.sum())).to(self.device)
            positions = mask
        else:
            pos, vals = codec.decode_sparse(payload, ct.n)
            if vals.numel() == ct.n:
                received, positions = vals.to(self.device), None
            else:
                out = np.zeros(ct.n, np.float32)
                out[pos.numpy()] = vals.numpy()
                received = torch.from_numpy(out).to(self.device)
                positions = torch.zeros(ct.n, dtype=torch.bool)
                positions[pos] = True
                positions = positions.to(self.device)
        self._decoded = (payload, None if mask is None else mask.clone(), received, positions)
        return received.clone(), positions


def _same_mask(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool(torch.equal(a, b))  # a method may edit its mask in place
