"""The round loop: a server half and a client half, and the instruction/reply between them.

    RoundServer.open_round  -> ClientTask per sampled client (payloads encoded, counted)
    ClientRunner.run        -> ClientResult (the client half: decode, train, encode)
    RoundServer.close_round -> decode, aggregate, step, evaluate, metrics, checkpoint

What the server aggregates is exactly what it decoded from the bytes each client sent; the
ledger counts `len(bytes)` of every payload. A client uses only its instruction, its
payloads, its own data and seeded model init, and (where a method documents it) its
client-held state. `Simulation` drives both halves in one process; `fedlora.flower` drives
the same halves over Flower. One resident model per process: clients differ only by the
flat vector swapped into it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fedlora import hooks, rundir
from fedlora.client.personal import ClientContext
from fedlora.client.store import ClientStore
from fedlora.comm import codec
from fedlora.comm.ledger import Ledger
from fedlora.config import Config, config_from_dict
from fedlora.data.federated import Split
from fedlora.methods import METHODS, build_method
from fedlora.methods.base import Client
from fedlora.model.flat import FlatAdapter
from fedlora.personal.evaluate import PersonalEval
from fedlora.privacy import EpsilonReport, epsilon, privatize, validate_privacy_config
from fedlora.protocol import ClientResult, ClientTask
from fedlora.resolve import resolve_config
from fedlora.rng import np_rng, torch_generator
from fedlora.runner import ClientRunner, _same_mask, set_threads
from fedlora.server.aggregate import weighted_mean
from fedlora.server.optim import ServerOptimizer
from fedlora.server.robust import robust_select
from fedlora.tasks import build_task
from fedlora.workers import WorkerPool, resolve_workers

__all__ = ["ClientRunner", "RoundServer", "Simulation", "resolve_config", "run", "set_threads"]


log = logging.getLogger("fedlora")


class RoundServer:
    """The server half: sampling, instructions, decoding, aggregation, the server step,
    evaluation and the run directory. `open_round`/`close_round` bracket one round."""

    def __init__(self, cfg: Config, out: str | Path, *, resume: bool = False,
                 progress: bool = True, task=None):
        self.cfg, self.progress = resolve_config(cfg), progress
        self.out = rundir.prepare(Path(out), resume, create=False)
        self.threads = set_threads(cfg.threads)
        self._eval_split: Split | None = None  # the fixed eval_max_examples subset
        self.task = task if task is not None else build_task(cfg)
        if getattr(self.task, "adapter", None) is None:
            self.task.adapter = FlatAdapter(self.task.model)
        self.adapter = self.task.adapter
        self.device = self.adapter.vector.device
        self.n = self.adapter.n
        # A reused task (one resident model for several runs) must start every run from
        # the same initial adapter, not from the previous run's trained one.
        if getattr(self.task, "initial_vector", None) is None:
            self.task.initial_vector = self.adapter.vector.detach().clone()
        self.P = self.task.initial_vector.clone()  # the server vector
        self.server = ServerOptimizer(cfg.server, self.n, self.device)
        self.method = build_method(cfg, self.adapter)
        self.method.setup(len(self.task.data.clients))
        self.ledger = Ledger()
        if cfg.dp.enabled:
            d = cfg.dp
            validate_privacy_config(
                sampling=cfg.sampling, population=len(self.eligible),
                cohort_size=self.cohort_size, noise_multiplier=d.noise_multiplier,
                delta=d.delta, rounds=cfg.rounds, noise_cohort_size=d.noise_cohort_size,
                clip_norm=d.clip, accountant=None if d.accountant == "auto" else d.accountant,
                prefix="dp.")
        self.round = 0
        # Test hook: rewrite a client's upload bytes (e.g. corrupt them) before decoding.
        self.tamper: Callable[[int, int, bytes], bytes] | None = None
        self._down: tuple | None = None  # this round's download, see _download
        self._unsent: dict[int, str] = {}  # this round's clients whose download was refused
        self._reasons: dict[int, str] = {}  # this round's dropped clients -> why
        self.bar = None
        self.lock = rundir.RunLock(self.out)  # one writer per run directory
        if resume:
            self.lock.acquire()
            self._restore()
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
            cfg.save(self.out / "config.yaml")
            rundir.write_text(self.out / "layout.json", self.adapter.layout_json())
            # A run killed in round 1 after its ledger rows but before its metrics row left
            # debris that a fresh start must not append to (prepare() allowed the start).
            for name in ("ledger.jsonl", "personal.jsonl"):
                if (self.out / name).exists():
                    rundir.truncate_jsonl(self.out / name, 0)

    @property
    def finished(self) -> bool:
        return self.round >= self.cfg.rounds

    # ---------------------------------------------------------------- one round

    def open_round(self) -> tuple[int, list[ClientTask]]:
        """Sample round t's cohort and write each client's instruction."""
        t = self.round + 1
        self._start, self._t = time.perf_counter(), t
        self.ledger.start_round()
        cohort = [int(c) for c in self.sample(t)]
        self.method.begin_round(self.P, t)
        self.method.cohort_sampled(t, cohort)
        self._unsent = {}
        tasks = []
        for c in cohort:
            ct = self.instruction(t, c)
            reason = self._oversized(ct)
            if reason is None:
                tasks.append(ct)
            else:  # a client refuses a payload above comm.max_bytes: never sent, dropped
                self._unsent[c] = reason
                log.warning("round %d: dropped client %d, %s", t, c, reason)
        return t, tasks

    def _oversized(self, ct: ClientTask) -> str | None:
        limit = self.cfg.comm.max_bytes
        for name, payload in ct.payloads.items():
            if limit is not None and len(payload) > limit:
                return (f"its {name!r} download of {len(payload)} bytes exceeds "
                        f"comm.max_bytes={limit}")
        return None

    def instruction(self, t: int, c: int) -> ClientTask:
        cfg, m = self.cfg, self.method
        values = cfg.comm.down_values or cfg.comm.values
        down = (self._download(m.download_mask(self.P, t, c), values, m.down_implicit(c))
                if m.communicates else b"")
        cl = cfg.client
        return ClientTask(
            round=t, client=c, seed=cfg.seed, method=cfg.method.name, n=self.n,
            train={"lr": cl.lr, "momentum": cl.momentum, "batch_size": cl.batch_size,
                   "epochs": cl.epochs, "max_steps": cl.max_steps},
            options=m.options(t, c), payloads={"down": down, **m.extra_payloads(self.P, t, c)},
            up_values=cfg.comm.up_values or cfg.comm.values, down_values=values)

    def close_round(self, t: int, tasks: list[ClientTask],
                    results: list[ClientResult | str], extra: dict | None = None) -> dict:
        """Decode every reply, aggregate, step, evaluate and record round t. `extra`: a
        driver's own fields for the metrics row (fedlora.flower: Flower message bytes)."""
        cfg = self.cfg
        updates, weights, losses, done = [], [], [], []
        self._reasons = dict(self._unsent)
        for ct, res in zip(tasks, results):
            decoded = self.receive(ct, res)
            if decoded is None:
                if not self.method.communicates and not isinstance(res, str):
                    losses.append(res.stats["train_loss"])  # trained; nothing to aggregate
                continue
            done.append(ct.client)
            updates.append(decoded)
            weights.append(res.stats["num_examples"])
            losses.append(res.stats["train_loss"])
        dropped = list(self._reasons)  # refused downloads first, then in cohort order
        self.dp_round: dict = {}
        updates, weights, done, robust_g, rejected = self.screen(t, updates, weights, done)
        g = self.guarded_aggregate(t, updates, weights, done, robust_g, rejected)
        skipped = None if g is None else self.guarded_step(t, g)
        self.method.end_round(self.P, t)
        row = {"round": t, "clients": len(tasks) + len(self._unsent),
               "aggregated": len(updates),
               "upload_bytes": self.ledger.round_upload,
               "download_bytes": self.ledger.round_download,
               "cum_upload_bytes": self.ledger.cum_upload,
               "cum_download_bytes": self.ledger.cum_download,
               "train_loss": float(np.mean(losses)) if losses else None}
        if dropped:
            row["dropped"] = dropped
            row["dropped_reasons"] = {str(c): self._reasons[c] for c in dropped}
        if rejected:
            row["rejected"] = {str(c): why for c, why in rejected.items()}
        if skipped:
            row["step_skipped"] = skipped
        row.update(self.dp_round)
        row.update(extra or {})
        row["wall_s"] = time.perf_counter() - self._start
        if t % cfg.eval_every == 0 or t == cfg.rounds:
            row.update(self.evaluate(full=t == cfg.rounds))
            if cfg.dp.enabled:
                report = self.privacy(t)
                row.update(epsilon=report.epsilon, delta=report.delta)
        row.update(self.client_eval(t))
        self.round = t
        rundir.append_jsonl(self.out / "ledger.jsonl", self.ledger.rows)
        rundir.append_jsonl(self.out / "metrics.jsonl", [row])
        hooks.round_end(self, row)  # log.* sinks, the best round's adapter (fedlora.hooks)
        every = cfg.checkpoint_every or cfg.eval_every
        if t % every == 0 or t == cfg.rounds:
            self.checkpoint()
        return row

    def client_eval(self, t: int) -> dict:
        """Per-client evaluation rows for round t (pers/*); the server half alone holds no
        client's data or state, so only a driver that does (Simulation) fills this in."""
        return {}

    def receive(self, ct: ClientTask, res: ClientResult | str) -> torch.Tensor | None:
        """Count a reply's bytes and decode its upload; None drops the client (logged)."""
        t, c, m = ct.round, ct.client, self.method
        if isinstance(res, str):  # no reply: the client's download still crossed the wire
            self.ledger.record(t, c, upload=0, download=ct.nbytes)
            log.warning("round %d: dropped client %d: %s", t, c, res)
            self._reasons[c] = res
            return None
        up = res.upload if self.tamper is None else self.tamper(t, c, res.upload)
        self.ledger.record(t, c, upload=len(up), download=ct.nbytes)
        if not m.communicates:  # local_only: no upload to decode (0 bytes, counted above)
            if up:
                log.warning("round %d: client %d sent %d bytes to a method that takes none; "
                            "ignored", t, c, len(up))
            return None
        reason = m.receive(t, c, res.stats)
        if reason is None:
            try:
                return self._receive(up, m.upload_mask(t, c))
            except codec.CodecError as e:
                reason = f"its upload failed to decode: {e}"
        log.warning("round %d: dropped client %d, %s", t, c, reason)
        self._reasons[c] = reason
        return None

    # ---------------------------------------------------------------- robust aggregation

    def screen(self, t: int, updates: list[torch.Tensor], weights: list[int], clients: list[int]):
        """server.robust: the norm bound, then the rule (docs/reliability.md). Returns the
        updates, weights and clients the method's rule should average, the rule's own
        aggregate (trimmed mean / median) or None, and {client: reason} for the rejected."""
        r = self.cfg.server.robust
        if (r.rule == "mean" and math.isinf(r.max_norm) and r.max_norm_x_median is None) \
                or not updates:
            return updates, weights, clients, None, {}
        out = robust_select(updates, rule=r.rule, max_norm=r.max_norm,
                            x_median=r.max_norm_x_median, norm_action=r.norm_action,
                            trim=r.trim, byzantine=r.byzantine, keep=r.keep)
        rejected = {clients[i]: why for i, why in sorted(out.rejected.items())}
        for c, why in rejected.items():
            log.warning("round %d: rejected client %d's update: %s", t, c, why)
        return (out.updates, [weights[i] for i in out.kept], [clients[i] for i in out.kept],
                out.aggregate, rejected)

    def guarded_aggregate(self, t: int, updates: list[torch.Tensor], weights: list[int],
                          clients: list[int], robust_g: torch.Tensor | None,
                          rejected: dict[int, str]) -> torch.Tensor | None:
        """The pseudo-gradient, never non-finite: while it is, the update with the largest
        norm is rejected (finite updates can still overflow a sum) and it is recomputed."""
        updates, weights, clients = list(updates), list(weights), list(clients)
        while True:
            g = robust_g if robust_g is not None else self.aggregate(t, updates, weights,
                                                                      clients)
            if g is None or bool(torch.isfinite(g).all()):
                return g
            if not updates:  # nothing left to blame (cannot happen: noise alone is finite)
                log.warning("round %d: non-finite pseudo-gradient; no step", t)
                return None
            worst = max(range(len(updates)), key=lambda i: (_norm(updates[i]), -i))
            c = clients.pop(worst)
            updates.pop(worst)
            weights.pop(worst)
            rejected[c] = "its update made the pseudo-gradient non-finite"
            log.warning("round %d: rejected client %d's update: %s", t, c, rejected[c])
            robust_g = None if robust_g is None else self._robust_again(updates)

    def _robust_again(self, updates: list[torch.Tensor]) -> torch.Tensor | None:
        if not updates:
            return None
        r = self.cfg.server.robust
        return robust_select(updates, rule=r.rule, trim=r.trim).aggregate

    def guarded_step(self, t: int, g: torch.Tensor) -> str | None:
        """The server step, undone if it would make P non-finite (P is never non-finite);
        returns why it was undone, else None."""
        before = self.P.clone(), {k: v.clone() for k, v in self.server.state_tensors().items()}
        steps = self.server.step_count
        self.server.step(self.P, g, self.method.step_mask(t))
        if bool(torch.isfinite(self.P).all()):
            return None
        self.P.copy_(before[0])
        self.server.load_state(before[1], steps)
        why = "the server step would make P non-finite; P and the optimizer state kept"
        log.warning("round %d: %s", t, why)
        return why

    def _download(self, mask: torch.Tensor | None, values: str, implicit: bool) -> bytes:
        """The download payload. P does not move within a round and encoding is
        deterministic, so clients sent the same mask get the same bytes: encode once per
        round, not once per client (a masked 22.7M-entry backbone costs ~2.5 s per encode).
        Keyed on P's identity and version."""
        key = (id(self.P), self.P._version, values, implicit)
        hit = self._down
        if hit is not None and hit[0] == key and _same_mask(hit[1], mask):
            return hit[2]
        payload = self._send(self.P, mask, values, implicit)
        self._down = (key, None if mask is None else mask.clone(), payload)
        return payload

    def _send(self, v: torch.Tensor, mask: torch.Tensor | None, values: str,
              implicit: bool) -> bytes:
        """Encode v (entries in mask). With implicit positions both ends already know the
        mask (a HetLoRA rank, a server-dictated pruning mask): only the values travel."""
        if implicit and mask is not None:
            return codec.encode(v[mask], None, values=values)
        return codec.encode(v, mask, values=values)

    def _receive(self, payload: bytes, mask: torch.Tensor | None) -> torch.Tensor:
        """Decode an upload: values only at `mask` when the server knows it, else positioned."""
        max_bytes = self.cfg.comm.max_bytes
        if mask is not None:
            out = torch.zeros(self.n, device=self.device)
            out[mask] = codec.decode(payload, int(mask.sum()), max_bytes=max_bytes).to(self.device)
            return out
        return codec.decode(payload, self.n, max_bytes=max_bytes).to(self.device)

    def aggregate(self, t: int, updates: list[torch.Tensor], weights: list[int],
                  clients: list[int] | None = None) -> torch.Tensor | None:
        """The pseudo-gradient: a plain (weighted) mean, or DP's clip-sum-noise-divide."""
        dp = self.cfg.dp
        if dp.enabled:  # noise even when nobody answered: an empty round must not show
            updates = [self.method.dp_contribution(u, c, self.P)
                       for u, c in zip(updates, clients or [])] if updates else updates
            g, info = privatize(updates, clip_norm=dp.clip, noise_multiplier=dp.noise_multiplier,
                                generator=torch_generator(self.cfg.seed, "dp_noise", t,
                                                          device=self.device),
                                cohort_size=self.cohort_size,
                                noise_cohort_size=dp.noise_cohort_size, template=self.P)
            # What a user tunes C from: how many updates the clip touched, and their norms.
            self.dp_round = {"dp_clipped_fraction": info["clipped_fraction"],
                             "dp_update_norm_median": float(np.median(info["norms"]))
                             if info["norms"] else None}
            return g
        if not updates:
            return None
        custom = self.method.aggregate(updates, clients, weights, self.P)
        if custom is not None:
            return custom
        return weighted_mean(updates, weights if self.cfg.server.weighted else None)

    @property
    def eligible(self) -> np.ndarray:
        """Clients that may be sampled: non-empty, and allowed by the method."""
        return self.method.eligible(self.task.data.eligible)

    @property
    def cohort_size(self) -> int:
        """m: the fixed cohort size, or the expected one (q N) under Poisson sampling."""
        return min(self.cfg.clients_per_round, len(self.eligible))

    def privacy(self, rounds: int) -> EpsilonReport:
        dp = self.cfg.dp
        return epsilon(noise_multiplier=dp.noise_multiplier, rounds=rounds,
                       sampling=self.cfg.sampling, population=len(self.eligible),
                       cohort_size=self.cohort_size, delta=dp.delta,
                       noise_cohort_size=dp.noise_cohort_size,
                       accountant=None if dp.accountant == "auto" else dp.accountant)

    def sample(self, t: int) -> np.ndarray:
        """Uniformly without replacement among non-empty clients, from the sampling stream."""
        eligible = self.eligible
        rng = np_rng(self.cfg.seed, "sampling", t)
        if self.cfg.sampling == "poisson":  # each client joins independently with prob q
            return eligible[rng.random(len(eligible)) < self.cohort_size / len(eligible)]
        return rng.choice(eligible, size=self.cohort_size, replace=False)

    def eval_split(self, full: bool = True) -> Split:
        """The test split, or (full=False with eval_max_examples set) its fixed subset."""
        test, k = self.task.data.test, self.cfg.eval_max_examples
        if full or k is None or k >= len(test):
            return test
        if self._eval_split is None:
            rng = np_rng(self.cfg.seed, "eval_subset")
            idx = torch.from_numpy(np.sort(rng.choice(len(test), size=k, replace=False)))
            self._eval_split = Split({name: v[idx] for name, v in test.inputs.items()},
                                     test.labels[idx])
        return self._eval_split

    def evaluate(self, full: bool = True) -> dict[str, float]:
        """Metrics of P (and the method's extra models) on the test split; rows evaluated
        on the eval_max_examples subset say so with `eval_examples`."""
        start = time.perf_counter()
        split = self.eval_split(full)
        self.adapter.load_(self.P)
        metrics = self.task.evaluate(self.task.model, split, self.cfg.eval_batch_size,
                                     self.device)
        for name, vector in self.method.eval_vectors(self.P).items():  # e.g. per-tier models
            self.adapter.load_(vector)
            sub = self.task.evaluate(self.task.model, split, self.cfg.eval_batch_size,
                                     self.device)
            metrics.update({f"{name}/{k}": v for k, v in sub.items()})
        if split is not self.task.data.test:
            metrics["eval_examples"] = len(split)
        return {**metrics, "eval_s": time.perf_counter() - start}

    # ---------------------------------------------------------------- state

    def checkpoint(self) -> None:
        tensors = {"P": self.P, **self.server.state_tensors(), **{
            f"method.{k}": v for k, v in self.method.state_tensors().items()}}
        meta = {"round": self.round, "server_steps": self.server.step_count,
                "cum_upload_bytes": self.ledger.cum_upload,
                "cum_download_bytes": self.ledger.cum_download,
                "method": self.method.state_json(), "n": self.n}
        rundir.save_checkpoint(self.out, tensors, meta)

    def _restore(self) -> None:
        layout = self.out / "layout.json"
        if layout.exists() and layout.read_text() != self.adapter.layout_json():
            raise rundir.RunDirError(
                f"{layout} does not match this model's adapter layout (another model.name, "
                "rank or target_modules?); nothing was changed")
        if not rundir.has_checkpoint(self.out):  # killed before its first checkpoint
            log.warning("%s has no checkpoint yet: starting again from round 0", self.out)
            for name in ("metrics.jsonl", "ledger.jsonl"):
                rundir.truncate_jsonl(self.out / name, 0)
            if not layout.exists():
                rundir.write_text(layout, self.adapter.layout_json())
            return
        tensors, meta = rundir.load_checkpoint(self.out)
        if meta["n"] != self.n:
            raise rundir.RunDirError(f"checkpoint has n={meta['n']}, this model n={self.n}")
        self.P.copy_(tensors["P"])
        self.server.load_state(tensors, meta["server_steps"])
        self.method.load_state({k[7:]: v.to(self.device) for k, v in tensors.items()
                                if k.startswith("method.")}, meta["method"])
        self.ledger.cum_upload = meta["cum_upload_bytes"]
        self.ledger.cum_download = meta["cum_download_bytes"]
        self.round = meta["round"]
        for name in ("metrics.jsonl", "ledger.jsonl"):
            rundir.truncate_jsonl(self.out / name, self.round)

    def write_summary(self) -> dict:
        rows = rundir.read_jsonl(self.out / "metrics.jsonl")
        # Subset evaluations (eval_max_examples) are progress signals, not results.
        evals = [r for r in rows if self.task.utility in r and "eval_examples" not in r]
        final = {k: v for k, v in (evals[-1] if evals else {}).items()
                 if k not in ("round", "clients", "aggregated", "dropped", "dropped_reasons",
                              "nodes", "late_replies")}
        summary = {
            "finished": self.round >= self.cfg.rounds, "rounds": self.round,
            "utility": self.task.utility,
            "final": {k: final[k] for k in final if not k.endswith("_bytes")},
            "best": (max if getattr(self.task, "higher_is_better", True) else min)(
                (r[self.task.utility] for r in evals), default=None),
            "higher_is_better": getattr(self.task, "higher_is_better", True),
            "total_upload_bytes": self.ledger.cum_upload,
            "total_download_bytes": self.ledger.cum_download,
            "dropped_uploads": sum(len(r.get("dropped", [])) for r in rows),
            "wall_s": float(sum(r["wall_s"] for r in rows)),
            "num_params": self.n, "dense_float32_bytes": 4 * self.n,
            "num_clients": len(self.task.data.clients),
            "empty_clients": self.task.data.empty_clients,
            "sampling": self.cfg.sampling, "threads": self.threads,
        }
        if self.cfg.dp.enabled:
            summary["privacy"] = self.privacy(self.round).to_dict()
        summary["rejected_updates"] = sum(len(r.get("rejected", {})) for r in rows)
        if getattr(self.task, "bad_rows", None):
            summary["bad_rows"] = self.task.bad_rows
        from safetensors.torch import save

        self.adapter.load_(self.P)
        rundir.write_bytes(self.out / "adapter.safetensors", save(
            {e.name: self.P[e.slice].view(e.shape).detach().cpu().contiguous()
             for e in self.adapter.layout}))
        hooks.run_end(self, summary)  # close the log sinks, export RUN/export (fedlora.export)
        rundir.write_json(self.out / "summary.json", summary)  # last: marks the run finished
        return summary


class Simulation(RoundServer):
    """One federated run in `out`, both halves in this process: `Simulation(cfg, out).run()`
    returns the summary. Client-held state lives in `out/clients/` (fedlora.client.store)."""

    def __init__(self, cfg: Config, out: str | Path, *, resume: bool = False,
                 progress: bool = True, task=None):
        super().__init__(cfg, out, resume=resume, progress=progress, task=task)
        self.runner = ClientRunner(self.task, ClientStore(self.out / "clients"),
                                   lockstep=cfg.client.lockstep)
        self.clients: ClientRunner | WorkerPool = self.runner
        self._given_task = task is not None
        self.personal = (PersonalEval(cfg, self.task, self.adapter, self.out,
                                      self.task.initial_vector, self.device)
                         if cfg.eval.personalized else None)
        if resume:
            self.runner.store.rollback(self.round)
            if self.personal is not None:
                self.personal.truncate(self.round)

    @classmethod
    def resume(cls, out: str | Path, rounds: int | None = None, **kw) -> Simulation:
        import yaml

        data = yaml.safe_load((Path(out) / "config.yaml").read_text())
        if rounds is not None:
            data["rounds"] = rounds
        sim = cls(config_from_dict(data), out, resume=True, **kw)
        if rounds is not None:
            sim.cfg.save(sim.out / "config.yaml")
        return sim

    def run(self) -> dict:
        """The loop: server half -> instructions -> client halves -> replies -> server half."""
        cfg = self.cfg
        bar = tqdm(total=cfg.rounds, initial=self.round, disable=not self.progress,
                   desc=f"{cfg.method.name} r={cfg.model.rank}", unit="round", leave=False)
        try:
            self.clients = self.start_workers()
            while not self.finished:
                t, tasks = self.open_round()
                results = self.clients.run_many(tasks)
                row = self.close_round(t, tasks, results)
                if self.task.utility in row:
                    bar.set_postfix({self.task.utility: f"{row[self.task.utility]:.3f}",
                                     "up": f"{self.ledger.cum_upload / 1e6:.1f}MB"})
                bar.update(1)
            bar.close()
            return self.write_summary()
        finally:
            if self.clients is not self.runner:
                self.clients.close()
                self.clients = self.runner
            self.lock.release()

    def start_workers(self) -> ClientRunner | WorkerPool:
        """`client.workers`: a pool of client processes (fedlora/workers.py), or this
        process's own runner where there is one worker or the run cannot use more (said
        once in the log)."""
        cfg = self.cfg
        p = resolve_workers(cfg.client.workers, cfg.clients_per_round, self.threads,
                            self.device)
        if p <= 1:
            return self.runner
        why = None
        if self._given_task:
            why = "the task object was passed in, and workers build theirs from the config"
        elif METHODS[cfg.method.name].client.save_state is not Client.save_state:
            why = f"method {cfg.method.name} keeps client-held state in this process"
        if why is not None:
            (log.info if cfg.client.workers == "auto" else log.warning)(
                "client.workers=%s: training clients in this process: %s",
                cfg.client.workers, why)
            return self.runner
        return WorkerPool(cfg, self.runner, p, self.threads)

    def client_round(self, t: int, c: int) -> tuple[torch.Tensor | None, dict]:
        """One client's whole exchange in round t (benchmarks time this): instruction,
        client half, reply; returns what the server decoded (None: dropped) and the stats."""
        ct = self.instruction(t, c)
        res = self.runner.run(ct)
        return self.receive(ct, res), res.stats

    def checkpoint(self) -> None:
        super().checkpoint()
        self.runner.store.commit(self.round)

    def client_eval(self, t: int) -> dict:
        """`eval.personalized`: each sampled client's global and deployed model on its local
        test split. The deployed model is the method's client half's `deploy`, from P and
        the client's held state, run on the client's side of this process."""
        if self.personal is None or not self.personal.due(t):
            return {}
        half = METHODS[self.cfg.method.name].client
        if half.deploy.__func__ is Client.deploy.__func__:  # deploys the global model
            return self.personal.evaluate(t, self.P)
        cl = self.cfg.client
        train = {"lr": cl.lr, "momentum": cl.momentum, "batch_size": cl.batch_size,
                 "epochs": cl.epochs, "max_steps": cl.max_steps}

        def deployed(c: int, P: torch.Tensor) -> torch.Tensor:
            ctx = ClientContext(self.task, self.adapter, c, self.cfg.seed, train,
                                self.runner.init, t)
            return half.deploy(P, self.runner.store.load(c), self.method.options(t, c), ctx)

        return self.personal.evaluate(t, self.P, deployed)


def run(cfg: Config, out: str | Path, **kw) -> dict:
    """Run `cfg` into run directory `out` and return its summary."""
    return Simulation(cfg, out, **kw).run()


def _norm(u: torch.Tensor) -> float:
    """l2 norm in float64 (inf/nan sort as the largest)."""
    x = float(torch.linalg.vector_norm(u.double()))
    return math.inf if math.isnan(x) else x
